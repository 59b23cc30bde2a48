"""`--health-addr HOST:PORT`: liveness and readiness over HTTP, for a supervisor (Kubernetes probes, systemd
watchdogs, a load balancer) that cannot read the agent's log.

    GET /healthz   200 while windows keep coming: the last one ended less than STALE_INTERVALS intervals ago
                   (before the first: since start). 503 otherwise — the loop is stuck (a probe read hanging, the
                   process starved). JSON body: {"status", "last_window_age_seconds", "max_age_seconds", "windows"}.
    GET /readyz    200 once probes are attached and a state model serves; 503 with the reasons otherwise.

The server is the standard library's, in a daemon thread. The agent's loop never waits on it: a window listener
stores the time of the window in one attribute (a single assignment, atomic under the GIL), and the handlers
only read that and the agent's own attributes. No lock is taken in the agent's hot path.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from .errors import AgentError, ConfigError

STALE_INTERVALS = 3  # windows missed before /healthz says the loop is stuck


def parse_address(value: str, where: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 hosts in brackets, [::1]:13134) -> (host, port); a one-line ConfigError otherwise."""
    host, sep, port = str(value).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"health address {value!r} (from {where}) must be HOST:PORT, e.g. 127.0.0.1:13134")
    return host, int(port)


class HealthState:
    """What the endpoints answer, from the agent's windows (:meth:`on_window` is a window listener)."""

    def __init__(self, agent: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.agent = agent
        self.clock = clock
        self.started_at = clock()
        self.last_window_at: float | None = None

    def on_window(self, result: Any) -> None:
        self.last_window_at = self.clock()

    def healthz(self) -> tuple[int, dict[str, Any]]:
        last = self.last_window_at
        age = self.clock() - (last if last is not None else self.started_at)
        max_age = STALE_INTERVALS * self.agent.config.interval
        body = {"status": "ok" if age <= max_age else "stale", "last_window_age_seconds": round(age, 3),
                "max_age_seconds": max_age, "windows": self.agent.windows}
        if last is None:
            body["last_window_age_seconds"] = None
            body["seconds_since_start"] = round(age, 3)
        return (200 if age <= max_age else 503), body

    def readyz(self) -> tuple[int, dict[str, Any]]:
        probes = [p.name for p in self.agent.probes]
        model = self.agent.classifier.version
        reasons = []
        if not probes:
            reasons.append("no probe is attached")
        if model == "none":
            reasons.append("no state model is serving (see the agent's log: the bundled model did not fit, or "
                           "the model directory holds no valid .onnx file)")
        body = {"status": "ready" if not reasons else "not ready", "probes": probes, "model": model}
        if reasons:
            body["reasons"] = reasons
        return (503 if reasons else 200), body


class HealthServer:
    """The HTTP server in a daemon thread; :meth:`close` stops it."""

    def __init__(self, host: str, port: int, state: HealthState) -> None:
        routes = {"/healthz": state.healthz, "/readyz": state.readyz}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                answer = routes.get(self.path.split("?", 1)[0])
                code, body = answer() if answer is not None else (404, {"error": "try /healthz or /readyz"})
                payload = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:  # probes every few seconds must not fill the log
                pass

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise AgentError(f"cannot serve health checks on {host}:{port} ({exc.strerror}); choose another "
                             f"--health-addr or stop what listens there") from None
        self.httpd.daemon_threads = True
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_health(address: str, agent: Any) -> HealthServer | None:
    """Start answering /healthz and /readyz for ``agent`` on ``address`` (HOST:PORT); None when it is empty."""
    if not address:
        return None
    host, port = parse_address(address, "health_addr")
    state = HealthState(agent)
    server = HealthServer(host, port, state)
    agent.window_listeners.append(state.on_window)
    return server
