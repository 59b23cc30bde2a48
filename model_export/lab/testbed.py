"""The lab's test bed: hosts in network namespaces, the victim's JSON API, benign HTTP clients.

The hosts (:class:`model_export.lab.netns.Lab`, one virtual switch, nothing routed beyond it; the victim has no
default route, so answers to forged sources die inside the lab)::

    victim   10.200.0.1    JSON API :8080 (Python; healthy or degraded), iperf3 server :5201 while a transfer runs
    client0  10.200.0.10   benign API client (and the address a forged flood claims)
    client1  10.200.0.11   the attacker (hping3, trafgen)
    client2  10.200.0.12   benign API client, iperf3 client

The agent's XDP probe watches the victim's ``eth0`` (:attr:`Testbed.xdp_settings`: attached from here, counted
there); every other probe watches the whole host, the lab's own processes included. Every process the bed starts
runs under ``timeout`` and is killed when the bed closes.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from otel_ebpf_receiver.mitigation import AUTO_REASON_PREFIX
from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist
from otel_ebpf_receiver.probes.xdp.pins import remove_pins

from .netns import Host, Lab

HTTP_PORT = 8080
HTTP_RATE = 10.0               # requests/s per benign client
SERVER_MAX_SECONDS = 4 * 3600  # backstop for the lab's servers (killed at close anyway)

ATTACKER = "client1"
BENIGN = ("client0", "client2")

say_default: Callable[[str], None] = lambda line: print(f"lab: {line}", file=sys.stderr, flush=True)  # noqa: E731


class Testbed:
    """The lab's hosts and servers. A context manager: everything it started or created is gone on exit (processes
    first — a process survives the deletion of its namespace — then namespaces, then the test pin dir)."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, *, pin_dir: str | None = None, state_dir: str | None = None,
                 say: Callable[[str], None] = say_default) -> None:
        self.lab = Lab(clients=3)
        self.say = say
        self.tmp = Path(tempfile.mkdtemp(prefix="oer-lab-"))
        # Our own pin dir unless told otherwise: the lab never touches a real agent's blocklist.
        self.pin_dir = pin_dir or f"/sys/fs/bpf/oer-lab-{os.getpid()}-{self.tmp.name[-6:]}"
        self.state_dir = state_dir or str(self.tmp / "state")
        self._own_pins = pin_dir is None
        self._procs: list[subprocess.Popen] = []
        self._blocklist: Blocklist | None = None
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Testbed":
        try:
            self.lab.create()
            if self._own_pins:
                remove_pins(self.pin_dir)
            www = self.tmp / "www"
            www.mkdir()
            (www / "index.html").write_text("<html><body>" + "lab " * 1000 + "</body></html>\n")
            self.set_api_mode("ok")
            self.spawn("victim", [sys.executable, "-c", API_SERVER, self.victim.ipv4, str(HTTP_PORT), str(www),
                                  str(self.api_mode_file)], SERVER_MAX_SECONDS)
            if not self.wait_for_port(HTTP_PORT):
                raise RuntimeError(f"the lab's HTTP server did not come up on {self.victim.ipv4}:{HTTP_PORT}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            procs, self._procs = self._procs, []
        for proc in procs:
            stop(proc)
        if self._blocklist is not None:
            self._blocklist.close()
            self._blocklist = None
        self.lab.close()
        if self._own_pins:
            remove_pins(self.pin_dir)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the victim's API -------------------------------------------------------------------------------------------
    @property
    def api_mode_file(self) -> Path:
        return self.tmp / "api-mode"

    def set_api_mode(self, mode: str) -> None:
        """``ok`` or ``degraded`` (the server answers half its requests 503, every one slowly); read per request."""
        if mode not in API_MODES:
            raise ValueError(f"API mode must be one of {', '.join(API_MODES)}, not {mode!r}")
        tmp = self.api_mode_file.with_suffix(".new")
        tmp.write_text(mode)
        tmp.replace(self.api_mode_file)

    # -- hosts and settings -------------------------------------------------------------------------------------------
    @property
    def victim(self) -> Host:
        return self.lab.victim

    @property
    def attacker(self) -> Host:
        return self.lab.hosts[ATTACKER]

    @property
    def benign(self) -> list[Host]:
        return [self.lab.hosts[name] for name in BENIGN]

    @property
    def xdp_settings(self) -> dict[str, Any]:
        """probe_settings.xdp for the agent: the victim's eth0, attached from the root namespace, our pin dir."""
        return {"interfaces": [self.victim.ifname], "netns": self.victim.netns, "pin_dir": self.pin_dir,
                "state_dir": self.state_dir}

    @property
    def blocklist(self) -> Blocklist:
        """A handle on the agent's pinned lists, independent of the agent's own (as the CLI would open it)."""
        if self._blocklist is None:
            self._blocklist = Blocklist(self.pin_dir, self.state_dir)
        return self._blocklist

    # -- processes ----------------------------------------------------------------------------------------------------
    def spawn(self, host: str | Host, argv: Sequence[str], seconds: float, **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` in the host's namespace under ``timeout`` (the time bound), in its own session."""
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        cmd = ["ip", "netns", "exec", self.lab.host(host).netns, "timeout", "-k", "2", f"{max(1, math.ceil(seconds))}",
               *argv]
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        stop(proc)
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)

    def wait_for_port(self, port: int, host: str = "client0", timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lab.inside(host):
                sock = socket.socket()
            try:
                sock.settimeout(0.5)
                sock.connect((self.victim.ipv4, port))
                return True
            except OSError:
                time.sleep(0.1)
            finally:
                sock.close()
        return False

    def clear_auto_blocks(self) -> int:
        """Remove what mitigation added (``auto:`` entries), so that scenarios start from the same lists."""
        removed = 0
        for entry in self.blocklist.list():
            if (entry.reason or "").startswith(AUTO_REASON_PREFIX) and self.blocklist.unblock(entry.cidr):
                removed += 1
        return removed


def stop(proc: subprocess.Popen) -> None:
    """TERM the process group, KILL it if it is still there after 2 s."""
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


# The victim's service: a small JSON API on Python's http.server — GET /index.html, POST and PUT /api/items — whose
# behaviour the lab switches through a mode file: "ok", or "degraded" (an overloaded backend: every answer 250 ms
# late, every other one 503). Nothing is logged; the process is bounded by the lab's timeout.
API_MODES = ("ok", "degraded")
API_SERVER = r"""
import http.server, itertools, json, sys, time
bind, port, www, mode_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
counter = itertools.count()
page = open(www + "/index.html", "rb").read()

def mode():
    try:
        with open(mode_file) as f:
            return f.read().strip()
    except OSError:
        return "ok"

class Api(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body, ctype="application/json"):
        if mode() == "degraded":
            time.sleep(0.25)
            if next(counter) % 2 == 0:
                status, body, ctype = 503, b'{"error": "backend unavailable"}', "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            self.answer(200, page, "text/html")
        else:
            self.answer(404, b'{"error": "not found"}')

    def body(self):
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self):
        self.answer(201, json.dumps({"created": len(self.body())}).encode())

    def do_PUT(self):
        self.answer(200, json.dumps({"updated": len(self.body())}).encode())

http.server.ThreadingHTTPServer((bind, port), Api).serve_forever()
"""

# A benign client: paced requests in an API's mix (GET 70 %, POST 20 %, PUT 10 %), one line per request
# ("<unix time> <1|0> <seconds>": 1 for a 2xx answer). Bounded by count and time.
HTTP_CLIENT = r"""
import http.client, sys, time
host, port = sys.argv[1], int(sys.argv[2])
rate, seconds, limit = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
METHODS = ("GET", "GET", "POST", "GET", "PUT", "GET", "GET", "POST", "GET", "GET")
deadline = time.monotonic() + seconds
next_at = time.monotonic()
for i in range(limit):
    now = time.monotonic()
    if now >= deadline:
        break
    time.sleep(max(0.0, next_at - now))
    next_at = max(next_at + 1.0 / rate, time.monotonic() - 1.0)
    started, ok = time.time(), 0
    try:
        conn = http.client.HTTPConnection(host, port, timeout=2.0)
        method = METHODS[i % len(METHODS)]
        if method == "GET":
            conn.request("GET", "/index.html")
        else:
            conn.request(method, "/api/items", body=b'{"name": "lab", "qty": 1}',
                         headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        ok = int(200 <= resp.status < 300 and len(resp.read()) > 0)
        conn.close()
    except Exception:
        pass
    print(f"{started:.3f} {ok} {time.time() - started:.4f}", flush=True)
"""


class HttpLoad:
    """Benign HTTP clients in their namespaces against the victim's server; every request's outcome is kept."""

    def __init__(self, bed: Testbed, seconds: float, hosts: Sequence[Host] | None = None,
                 rate: float = HTTP_RATE) -> None:
        self.bed = bed
        self.requests: list[tuple[float, bool, float]] = []
        self._lock = threading.Lock()
        self._procs = []
        self._readers = []
        limit = int(seconds * rate) + 1
        for host in hosts or bed.benign:
            proc = bed.spawn(host, [sys.executable, "-c", HTTP_CLIENT, bed.victim.ipv4, str(HTTP_PORT), str(rate),
                                    str(seconds), str(limit)], seconds + 5, stdout=subprocess.PIPE, text=True)
            reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
            reader.start()
            self._procs.append(proc)
            self._readers.append(reader)

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            parts = line.split()
            if len(parts) == 3:
                with self._lock:
                    self.requests.append((float(parts[0]), parts[1] == "1", float(parts[2])))

    def stop(self) -> None:
        for proc in self._procs:
            self.bed.stop(proc)
        for reader in self._readers:
            reader.join(timeout=5)

    def success(self, since: float = 0.0, until: float = math.inf) -> tuple[int, int]:
        """(succeeded, sent) among requests started in [since, until)."""
        with self._lock:
            chosen = [ok for t, ok, _ in self.requests if since <= t < until]
        return sum(chosen), len(chosen)


@contextlib.contextmanager
def http_load(bed: Testbed, seconds: float, hosts: Sequence[Host] | None = None,
              rate: float = HTTP_RATE) -> Iterator[HttpLoad]:
    load = HttpLoad(bed, seconds, hosts, rate)
    try:
        yield load
    finally:
        load.stop()

