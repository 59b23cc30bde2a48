"""Real backends for end-to-end tests: the project's Collector (build/otelcol/otelcol-ebpf), Debian's Prometheus and
Jaeger v2 (build/jaeger/jaeger), started on free loopback ports with their state in a tmp dir, and always stopped.

    with start_collector(tmp_path / "otelcol") as col, \\
         start_prometheus(tmp_path / "prom", scrape={"otelcol-ebpf": [col.prometheus_address]}) as prom:
        ...send OTLP to col.otlp_grpc_endpoint...
        prom.wait_for_series('otel_ebpf_receiver_syscalls_total{host_name="testhost"}')
        col.wait_for_records("logs", lambda r: r["eventName"] == "system.state.change")
        col.stop(); ...; col.start()    # an outage: same ports, same file_storage queue and JSON files

Nothing here imports the agent (otel_ebpf_receiver): these helpers only spawn binaries and read what they expose.
Every address is 127.0.0.1 (the tests never send traffic anywhere else).

Longer than usual because it is one small client per backend (build, start, wait, query, stop) for three backends
whose start-up and outage handling the two end-to-end test files share; split per backend, each part would
repeat the process and port handling.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

REPO = Path(__file__).resolve().parent.parent
COLLECTOR_CONFIG_DIR = REPO / "collector-config"
OTELCOL_BIN = REPO / "build" / "otelcol" / "otelcol-ebpf"
JAEGER_BIN = REPO / "build" / "jaeger" / "jaeger"
PROMETHEUS_BIN = Path("/usr/bin/prometheus")
PROMTOOL_BIN = Path("/usr/bin/promtool")
LOOPBACK = "127.0.0.1"

# What the file exporter writes per signal: the top-level key of each JSON line, and the lists under it.
_FILE_SIGNALS = {
    "metrics": ("resourceMetrics", "scopeMetrics", "metrics"),
    "logs": ("resourceLogs", "scopeLogs", "logRecords"),
    "traces": ("resourceSpans", "scopeSpans", "spans"),
}


class BackendError(RuntimeError):
    """A backend did not start or did not answer in time; the message carries the tail of its log."""


def build_collector(timeout: float = 1200) -> Path:
    """`make -f collector-config/collector.mk collector` (a no-op when the binary is up to date); raises on failure."""
    proc = subprocess.run(["make", "-f", "collector-config/collector.mk", "collector"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not OTELCOL_BIN.exists():
        raise BackendError(f"building the Collector failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return OTELCOL_BIN


def build_jaeger(timeout: float = 1200) -> Path:
    """`make -f collector-config/collector.mk jaeger` (Jaeger v2, about 5-6 minutes cold); raises on failure."""
    proc = subprocess.run(["make", "-f", "collector-config/collector.mk", "jaeger"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not JAEGER_BIN.exists():
        raise BackendError(f"building Jaeger failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return JAEGER_BIN


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it; another process could take it first: rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_kept_for_restarts() -> int:
    """A TCP port free on 127.0.0.1, below the kernel's ephemeral range (ip_local_port_range). For a server that is
    stopped and restarted on the same port (an outage test): while it is down, a free_port() of another test or an
    outgoing connection's source port comes from the ephemeral range, so neither can take this one meanwhile."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise BackendError(f"no free TCP port between 10000 and {low} on {LOOPBACK}")


@dataclass
class Process:
    """A spawned binary whose stdout+stderr go to a log file (never a pipe that could fill up and block it)."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise BackendError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def spawn(name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})}, cwd=cwd)
    return Process(name, popen, log_path)


def wait_for_port(port: int, host: str = LOOPBACK, timeout: float = 30, process: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process:
            process.check_alive()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        if time.monotonic() > deadline:
            tail = f"\n{process.log_tail()}" if process else ""
            raise BackendError(f"nothing listens on {host}:{port} after {timeout:.0f} s{tail}")
        time.sleep(0.1)


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP error statuses are returned, connection errors raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_for_http(url: str, timeout: float = 30, process: Process | None = None) -> bytes:
    """Poll until `url` answers 200; returns the body."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process:
            process.check_alive()
        try:
            status, body = http_get(url, timeout=2)
            if status == 200:
                return body
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as err:
            last = str(err)
        time.sleep(0.2)
    tail = f"\n{process.log_tail()}" if process else ""
    raise BackendError(f"{url} not ready after {timeout:.0f} s ({last}){tail}")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str | Callable[[], str],
               interval: float = 0.5) -> Any:
    """Poll `predicate` until it returns something truthy; return that, or raise naming `what` (a callable is
    called only then, so the message can show what was seen at the end of the wait)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


# --- the Collector ---------------------------------------------------------------------------------------------

@dataclass
class Collector:
    process: Process
    config: Path
    otlp_grpc_port: int
    otlp_http_port: int
    prometheus_port: int
    health_port: int
    telemetry_port: int
    file_dir: Path
    storage_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def otlp_grpc_endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT / OTLP*Exporter(endpoint=...) with insecure=True."""
        return f"http://{LOOPBACK}:{self.otlp_grpc_port}"

    @property
    def otlp_http_endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.otlp_http_port}"

    @property
    def prometheus_address(self) -> str:
        """host:port of the prometheus exporter's /metrics (a scrape target)."""
        return f"{LOOPBACK}:{self.prometheus_port}"

    @property
    def telemetry_address(self) -> str:
        """host:port of the Collector's own /metrics."""
        return f"{LOOPBACK}:{self.telemetry_port}"

    @property
    def running(self) -> bool:
        return self.process.popen.poll() is None

    def stop(self, timeout: float = 10) -> None:
        """Stop the Collector (SIGTERM: it drains what it can, then exits). :meth:`start` brings it back."""
        self.process.stop(timeout)

    def start(self, timeout: float = 30) -> None:
        """Start it again after :meth:`stop` with the same config, environment, ports and directories: a restart
        as systemd would do it, so the file_storage queues and the JSON files carry on. Returns once /health
        answers 200. Its output is appended to the same log file."""
        if self.running:
            raise BackendError(f"{self.process.name} is already running (pid {self.process.popen.pid})")
        # Assigned before waiting, so whoever stops this Collector stops this process even if it never gets ready.
        self.process = spawn(self.process.name, self.process.popen.args, self.process.log_path, self.env)
        wait_for_http(f"http://{self.env['OTELCOL_HEALTH_ENDPOINT']}/", timeout, self.process)

    def scrape(self) -> str:
        """The prometheus exporter's page, as Prometheus would scrape it."""
        return http_get(f"http://{self.prometheus_address}/metrics")[1].decode()

    def records(self, signal: str) -> list[dict]:
        return file_exporter_records(self.file_dir / f"{signal}.jsonl", signal)

    def wait_for_records(self, signal: str, match: Callable[[dict], bool] = lambda r: True,
                         timeout: float = 30) -> list[dict]:
        """File-exporter records of `signal` (metrics, logs, traces) for which `match` is true; waits for one."""
        def found() -> list[dict]:
            self.process.check_alive()
            return [r for r in self.records(signal) if match(r)]
        return wait_until(found, timeout, f"a matching {signal} record in {self.file_dir}/{signal}.jsonl")


def collector_env(workdir: Path, ports: Mapping[str, int] | None = None) -> tuple[dict[str, str], dict[str, int]]:
    """The OTELCOL_* variables local.yaml reads: free ports (or those given in `ports`), and directories under
    `workdir`."""
    ports = {name: (ports or {}).get(name) or free_port()
             for name in ("otlp_grpc", "otlp_http", "prometheus", "health", "telemetry")}
    env = {
        "OTELCOL_OTLP_GRPC_ENDPOINT": f"{LOOPBACK}:{ports['otlp_grpc']}",
        "OTELCOL_OTLP_HTTP_ENDPOINT": f"{LOOPBACK}:{ports['otlp_http']}",
        "OTELCOL_PROMETHEUS_ENDPOINT": f"{LOOPBACK}:{ports['prometheus']}",
        "OTELCOL_HEALTH_ENDPOINT": f"{LOOPBACK}:{ports['health']}",
        "OTELCOL_TELEMETRY_HOST": LOOPBACK,
        "OTELCOL_TELEMETRY_PORT": str(ports["telemetry"]),
        "OTELCOL_FILE_DIR": str(workdir / "export"),
        "OTELCOL_STORAGE_DIR": str(workdir / "queue"),
        # A trace/log backend port where nothing listens (free_port): exports queue on disk and retry, which is
        # what a host with its backend down looks like. Tests that run a backend override it.
        "OTELCOL_TRACES_ENDPOINT": f"{LOOPBACK}:{free_port()}",
    }
    return env, ports


@contextlib.contextmanager
def start_collector(workdir: Path, config: Path = COLLECTOR_CONFIG_DIR / "local.yaml",
                    env: Mapping[str, str] | None = None, timeout: float = 30,
                    ports: Mapping[str, int] | None = None) -> Iterator[Collector]:
    """Run otelcol-ebpf with `config` (local.yaml by default) on free ports; yields once /health answers 200.
    `env` overrides any OTELCOL_* variable (e.g. OTELCOL_TRACES_ENDPOINT to point at a real backend); `ports`
    fixes some ports (otlp_grpc, otlp_http, prometheus, health, telemetry: see collector_env)."""
    if not OTELCOL_BIN.exists():
        raise BackendError(f"{OTELCOL_BIN} is missing: run `make -f collector-config/collector.mk collector`")
    workdir.mkdir(parents=True, exist_ok=True)
    full_env, ports = collector_env(workdir, ports)
    full_env.update(env or {})
    process = spawn("otelcol-ebpf", [str(OTELCOL_BIN), f"--config={config}"], workdir / "otelcol.log", full_env)
    collector = Collector(process, config, ports["otlp_grpc"], ports["otlp_http"], ports["prometheus"],
                          ports["health"], ports["telemetry"], Path(full_env["OTELCOL_FILE_DIR"]),
                          Path(full_env["OTELCOL_STORAGE_DIR"]), full_env)
    try:
        wait_for_http(f"http://{full_env['OTELCOL_HEALTH_ENDPOINT']}/", timeout, process)
        yield collector
    finally:
        collector.process.stop()  # the current process: a test may have restarted it (Collector.start)


def read_jsonl(path: Path) -> list[dict]:
    """Complete JSON lines of `path` (a line still being written is skipped); [] when the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def attributes(kv_list: list[dict] | None) -> dict[str, Any]:
    """OTLP/JSON attributes ([{"key":..., "value": {"stringValue": ...}}]) as a plain dict."""
    out = {}
    for kv in kv_list or []:
        value = kv.get("value", {})
        out[kv["key"]] = next(iter(value.values()), None) if value else None
    return out


def file_exporter_records(path: Path, signal: str) -> list[dict]:
    """Flatten the file exporter's OTLP/JSON lines into one dict per metric, log record or span, each with
    `resource` and `scope` added (attributes as plain dicts under `resource` and `attrs`)."""
    top, scopes_key, items_key = _FILE_SIGNALS[signal]
    out = []
    for line in read_jsonl(path):
        for res in line.get(top, []):
            resource = attributes(res.get("resource", {}).get("attributes"))
            for scope in res.get(scopes_key, []):
                for item in scope.get(items_key, []):
                    out.append({**item, "resource": resource, "scope": scope.get("scope", {}),
                                "attrs": attributes(item.get("attributes"))})
    return out


# --- Prometheus --------------------------------------------------------------------------------------------------

@dataclass
class Prometheus:
    process: Process
    port: int
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data`, raises on an API error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = http_get(url)
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            raise BackendError(f"Prometheus {path} {params}: HTTP {status} {doc}")
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; the `result` list of a vector: [{"metric": {labels}, "value": [ts, "v"]}, ...]."""
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """The value of an expression that yields at most one series (e.g. a sum); None when it yields none."""
        result = self.query(expr)
        if len(result) > 1:
            raise BackendError(f"{expr} yields {len(result)} series, expected one: {result}")
        return float(result[0]["value"][1]) if result else None

    def wait_for_series(self, expr: str, timeout: float = 30) -> list[dict]:
        """Poll `expr` until it returns at least one series."""
        def found() -> list[dict]:
            self.process.check_alive()
            return self.query(expr)
        return wait_until(found, timeout, f"Prometheus series for {expr}")

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def rules(self) -> list[dict]:
        return self.api("rules")["groups"]


def _seconds(duration: str) -> float:
    """A Prometheus duration with a single unit (500ms, 2s, 1m, 1h) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", str(duration).strip())
    if not match:
        raise ValueError(f"unsupported Prometheus duration {duration!r}")
    return float(match.group(1)) * units[match.group(2)]


def render_prometheus_config(scrape: Mapping[str, list[str]],
                             template: Path | None = COLLECTOR_CONFIG_DIR / "prometheus.yml",
                             scrape_interval: str | None = None) -> dict:
    """The repository's prometheus.yml with each job's targets replaced (job name -> ["host:port", ...]); jobs not
    named are dropped. rule_files become absolute (they are relative to the template). `template=None` gives a
    bare config with just those jobs."""
    doc: dict = yaml.safe_load(template.read_text()) if template else {"global": {"scrape_interval": "1s"}}
    glob = doc.setdefault("global", {})
    if scrape_interval:
        glob["scrape_interval"] = scrape_interval
    # Prometheus refuses a scrape_timeout longer than the scrape_interval (the template's 2 s with a 1 s interval).
    if _seconds(glob.get("scrape_timeout", "10s")) > _seconds(glob.get("scrape_interval", "1m")):
        glob["scrape_timeout"] = glob["scrape_interval"]
    jobs = {job["job_name"]: job for job in doc.get("scrape_configs", [])}
    configs = []
    for name, targets in scrape.items():
        job = dict(jobs.get(name, {"job_name": name}))
        job["static_configs"] = [{"targets": list(targets)}]
        interval = job.get("scrape_interval", glob.get("scrape_interval", "1m"))
        if _seconds(job.get("scrape_timeout", glob.get("scrape_timeout", "10s"))) > _seconds(interval):
            job["scrape_timeout"] = interval
        configs.append(job)
    doc["scrape_configs"] = configs
    if template:
        doc["rule_files"] = [str((template.parent / r).resolve()) for r in doc.get("rule_files", [])]
    doc.pop("alerting", None)  # no Alertmanager in tests
    return doc


@contextlib.contextmanager
def start_prometheus(workdir: Path, scrape: Mapping[str, list[str]] | None = None, config: dict | None = None,
                     remote_write_receiver: bool = False, timeout: float = 60,
                     scrape_interval: str | None = None, port: int | None = None) -> Iterator[Prometheus]:
    """Debian's Prometheus with its TSDB in `workdir`, on a free port (or `port`); yields once /-/ready answers 200.
    Either `scrape` (jobs of the repository's prometheus.yml -> targets, see render_prometheus_config; optionally
    with another global `scrape_interval`, e.g. "1s") or a whole `config` dict."""
    if config is None:
        config = render_prometheus_config(scrape or {}, scrape_interval=scrape_interval)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = port or free_port()
    argv = [str(PROMETHEUS_BIN), f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{port}", "--log.level=warn"]
    if remote_write_receiver:
        argv.append("--web.enable-remote-write-receiver")
    process = spawn("prometheus", argv, workdir / "prometheus.log", cwd=workdir)
    try:
        wait_for_http(f"http://{LOOPBACK}:{port}/-/ready", timeout, process)
        yield Prometheus(process, port, config_path)
    finally:
        process.stop()


# --- Jaeger v2 ---------------------------------------------------------------------------------------------------

@dataclass
class Jaeger:
    process: Process
    otlp_grpc_port: int
    query_port: int

    @property
    def otlp_grpc_address(self) -> str:
        """host:port for a Collector's otlp_grpc exporter (OTELCOL_TRACES_ENDPOINT, OTELCOL_JAEGER_ENDPOINT)."""
        return f"{LOOPBACK}:{self.otlp_grpc_port}"

    @property
    def query_url(self) -> str:
        return f"http://{LOOPBACK}:{self.query_port}"

    def traces(self, service: str, **params: str) -> list[dict]:
        """Jaeger's HTTP query API: traces of `service` ({"traceID", "spans": [...], "processes": {...}})."""
        query = urllib.parse.urlencode({"service": service, "limit": "100", **params})
        status, body = http_get(f"{self.query_url}/api/traces?{query}")
        if status == 404:
            return []  # the service is not known yet
        if status != 200:
            raise BackendError(f"Jaeger /api/traces: HTTP {status} {body[:300]!r}")
        return json.loads(body).get("data") or []

    def wait_for_span(self, service: str, operation: str, timeout: float = 30,
                      match: Callable[[dict], bool] = lambda span: True) -> dict:
        """The first span named `operation` from `service` for which `match` is true, polling until Jaeger has it.
        The span's `process` ({"serviceName", "tags"}) is added from its trace."""
        def found() -> dict | None:
            self.process.check_alive()
            for trace in self.traces(service, operation=operation):
                for span in trace["spans"]:
                    if span["operationName"] == operation:
                        span = {**span, "process": trace.get("processes", {}).get(span.get("processID"), {})}
                        if match(span):
                            return span
            return None
        return wait_until(found, timeout, f"span {operation!r} of service {service!r} in Jaeger")


def jaeger_tags(tags: list[dict] | None) -> dict[str, Any]:
    """Jaeger's [{"key", "type", "value"}] tags (span tags, process tags, log fields) as a plain dict."""
    return {t["key"]: t.get("value") for t in tags or []}


@contextlib.contextmanager
def start_jaeger(workdir: Path, config: Path = COLLECTOR_CONFIG_DIR / "jaeger.yaml",
                 timeout: float = 30, ports: Mapping[str, int] | None = None) -> Iterator[Jaeger]:
    """Jaeger v2 (build/jaeger/jaeger) with collector-config/jaeger.yaml: in-memory store, free ports (or those
    given in `ports`: otlp, query_http, query_grpc, health, telemetry)."""
    if not JAEGER_BIN.exists():
        raise BackendError(f"{JAEGER_BIN} is missing: run `make -f collector-config/collector.mk jaeger`")
    ports = {name: (ports or {}).get(name) or free_port()
             for name in ("otlp", "query_http", "query_grpc", "health", "telemetry")}
    env = {
        "JAEGER_OTLP_GRPC_ENDPOINT": f"{LOOPBACK}:{ports['otlp']}",
        "JAEGER_QUERY_HTTP_ENDPOINT": f"{LOOPBACK}:{ports['query_http']}",
        "JAEGER_QUERY_GRPC_ENDPOINT": f"{LOOPBACK}:{ports['query_grpc']}",
        "JAEGER_HEALTH_ENDPOINT": f"{LOOPBACK}:{ports['health']}",
        "JAEGER_TELEMETRY_PORT": str(ports["telemetry"]),
    }
    process = spawn("jaeger", [str(JAEGER_BIN), f"--config={config}"], workdir / "jaeger.log", env)
    try:
        wait_for_http(f"http://{env['JAEGER_HEALTH_ENDPOINT']}/status", timeout, process)
        wait_for_port(ports["otlp"], process=process)
        yield Jaeger(process, ports["otlp"], ports["query_http"])
    finally:
        process.stop()
