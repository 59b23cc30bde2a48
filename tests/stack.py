"""`make stack`: the local observability stack on this host in one command, until Ctrl-C or SIGTERM.

    agent (otel-ebpf-receiver run, every probe) --OTLP--> otelcol-ebpf (collector-config/local.yaml)
        --> Prometheus (collector-config/prometheus.yml + alert-rules.yml) scrapes its /metrics page
        --> Jaeger v2 (collector-config/jaeger.yaml) receives the incident traces

examples:
  sudo make stack                                          # fixed loopback ports (below); Ctrl-C stops it all
  sudo make stack STACK_ARGS="--prometheus-port 19090 --jaeger-port 26686"
  sudo .venv/bin/python -m tests.stack --free-ports --duration 5m --state-dir /tmp/stack

Stopping (Ctrl-C, SIGTERM, --duration) stops the agent first (it detaches every BPF program and flushes its last
window), then Prometheus, the Collector and Jaeger; the state directory (logs, Prometheus' TSDB, the Collector's
JSON files) is removed unless --state-dir named it. Nothing is installed as a service or enabled.

It lives next to tests/backends.py because it is those backends started together: the same start, wait and stop
code the end-to-end tests use, with fixed ports instead of free ones. The agent's OTEL_* settings come from here
only (the caller's OTEL_* variables are dropped), so the links printed below always show this agent's data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from otel_ebpf_receiver.durations import DurationError, parse_duration

from . import backends
from .backends import LOOPBACK, REPO

SERVICE = "otel-ebpf-receiver"
INCIDENT_SPAN = "system.state.incident"
TRACE_PAGE = REPO / "deploy" / "jaeger-ui"

# Fixed loopback ports: the defaults of the shipped configs, so a browser bookmark keeps working.
DEFAULT_PORTS = {
    "prometheus": 9090,           # Prometheus UI and API
    "jaeger_query": 16686,        # Jaeger query API and trace page
    "jaeger_otlp": 14317,         # Jaeger's OTLP/gRPC receiver (the Collector's trace exporter sends here)
    "jaeger_query_grpc": 16685,
    "jaeger_health": 13134,
    "jaeger_telemetry": 8899,
    "otlp_grpc": 4317,            # the Collector's OTLP/gRPC receiver (the agent sends here)
    "otlp_http": 4318,
    "collector_metrics": 8889,    # the Collector's prometheus exporter page (scraped)
    "collector_health": 13133,
    "collector_telemetry": 8888,  # the Collector's own metrics (scraped: the export-failure alerts)
}

# The state timeline: the agent's state gauge, 1 for the current state and 0 for every other state the model can
# report (all of them every window, so none lingers at a stale 1). `max by` merges model versions and hosts.
STATE_TIMELINE = "max by (system_state) (otel_ebpf_receiver_system_state)"
# What drove it: processes started per second, split by the state the host was in.
EXEC_RATE = "sum by (system_state) (rate(otel_ebpf_receiver_exec_total[6s]))"
AGENT_READY = "attached "        # the agent's "attached <probes>; exporting metrics to ..." line
AGENT_START_TIMEOUT = 240        # seconds, generous: bcc compiles every probe's C at start, slowly on busy cores
AGENT_STOP_TIMEOUT = 30


class StackError(RuntimeError):
    """Something the user can fix (a port in use, a missing binary, not root): printed as one line."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: unwind, stopping everything started so far."""


@dataclass
class Stack:
    prometheus: backends.Prometheus
    collector: backends.Collector
    jaeger: backends.Jaeger
    agent: backends.Process
    state_dir: Path

    @property
    def processes(self) -> list[backends.Process]:
        return [self.agent, self.prometheus.process, self.collector.process, self.jaeger.process]

    def check_alive(self) -> None:
        for process in self.processes:
            process.check_alive()

    def links(self, graph_range: str = "15m") -> dict[str, str]:
        return {
            "prometheus": self.prometheus.url,
            "state_timeline": timeline_url(self.prometheus.url, graph_range),
            "jaeger": self.jaeger.query_url,
            "incident_traces": incident_search_url(self.jaeger.query_url),
            "collector_health": f"http://{self.collector.env['OTELCOL_HEALTH_ENDPOINT']}/",
            "collector_metrics": f"http://{self.collector.prometheus_address}/metrics",
            "otlp_grpc": self.collector.otlp_grpc_endpoint,
        }

    def describe(self) -> dict:
        """What stack.json holds: the links, the pids and where the logs are (the test reads it)."""
        return {"links": self.links(), "pids": {p.name: p.popen.pid for p in self.processes},
                "logs": {p.name: str(p.log_path) for p in self.processes}, "state_dir": str(self.state_dir),
                "collector_files": str(self.collector.file_dir)}


def prometheus_time(unix: float) -> str:
    """A moment as the classic graph page's console tab takes it (`moment_input`, UTC). Its graph's `end_input`
    has whole minutes only, so the timeline always ends now."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix))


def timeline_url(prometheus_url: str, graph_range: str = "15m") -> str:
    """Prometheus' graph page with the state timeline above the exec rate that drove it, ending now."""
    panels = {}
    for i, expr in enumerate((STATE_TIMELINE, EXEC_RATE)):
        panels.update({f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": graph_range})
    return f"{prometheus_url}/classic/graph?{urllib.parse.urlencode(panels)}"


def incident_search_url(jaeger_url: str, lookback: str = "1h") -> str:
    query = {"service": SERVICE, "operation": INCIDENT_SPAN, "lookback": lookback, "limit": "20"}
    return f"{jaeger_url}/search?{urllib.parse.urlencode(query)}"


def bpf_prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds open (the `prog_id:` line of each BPF fd's fdinfo)."""
    ids = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    with contextlib.suppress(OSError):
        for entry in fdinfo.iterdir():
            with contextlib.suppress(OSError):
                for line in entry.read_text().splitlines():
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
    return ids


def loaded_bpf_prog_ids() -> set[int]:
    """Every BPF program loaded in the kernel (bpftool)."""
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, check=True).stdout
    return {prog["id"] for prog in json.loads(out or "[]")}


def check_ports_free(ports: dict[str, int], flags: dict[str, str]) -> None:
    """Refuse a fixed port something already listens on: the stack would otherwise look ready while a browser
    talks to that other program."""
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                hint = f"pass {flags[name]} PORT or " if name in flags else ""
                raise StackError(f"port {port} ({name}) is in use on {LOOPBACK}: stop what listens there, "
                                 f"or {hint}use --free-ports") from None


def jaeger_config(state_dir: Path) -> Path:
    """collector-config/jaeger.yaml with the trace page (deploy/jaeger-ui) as the query service's UI."""
    doc = yaml.safe_load((backends.COLLECTOR_CONFIG_DIR / "jaeger.yaml").read_text())
    doc["extensions"]["jaeger_query"]["ui"] = {"assets_path": str(TRACE_PAGE)}
    path = state_dir / "jaeger.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def agent_env(otlp_endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        # Every second, like the window: Prometheus (2 s scrape) shows a state change within a few seconds.
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        # The SDK's batch processors wait 5 s by default; 1 s brings incidents and events to Jaeger sooner.
        "OTEL_BSP_SCHEDULE_DELAY": "1000",
        "OTEL_BLRP_SCHEDULE_DELAY": "1000",
    })
    return env


@contextlib.contextmanager
def start_agent(state_dir: Path, otlp_endpoint: str, probes: str | None, model_dir: str | None,
                timeout: float = AGENT_START_TIMEOUT) -> Iterator[backends.Process]:
    argv = [sys.executable, "-m", "otel_ebpf_receiver", "run", "--live", "off"]
    argv += ["--probes", probes] if probes else []
    argv += ["--model-dir", model_dir] if model_dir else []
    log_path = state_dir / "agent.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(argv, cwd=REPO, env=agent_env(otlp_endpoint), stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT)
    agent = backends.Process("agent", popen, log_path)
    try:
        backends.wait_until(lambda: agent.check_alive() or AGENT_READY in agent.log_tail(1_000_000), timeout,
                            lambda: f"the agent to attach its probes:\n{agent.log_tail()}", interval=0.2)
        yield agent
    finally:
        agent.stop(AGENT_STOP_TIMEOUT)


@contextlib.contextmanager
def start_stack(state_dir: Path, ports: dict[str, int | None], probes: str | None = None,
                model_dir: str | None = None) -> Iterator[Stack]:
    """Jaeger, the Collector (traces → Jaeger), Prometheus (scraping the Collector) and the agent, in that order;
    stopped in the reverse order. A port of None is picked free."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with backends.start_jaeger(state_dir / "jaeger", config=jaeger_config(state_dir), ports={
                "otlp": ports["jaeger_otlp"], "query_http": ports["jaeger_query"],
                "query_grpc": ports["jaeger_query_grpc"], "health": ports["jaeger_health"],
                "telemetry": ports["jaeger_telemetry"]}) as jaeger, \
         backends.start_collector(state_dir / "otelcol", env={
                "OTELCOL_TRACES_ENDPOINT": jaeger.otlp_grpc_address,
                # Jaeger takes no logs: it refuses them and the Collector drops them (nothing piles up in the queue).
                # The state-change events stay readable in otelcol/export/logs.jsonl.
                "OTELCOL_LOGS_ENDPOINT": jaeger.otlp_grpc_address}, ports={
                "otlp_grpc": ports["otlp_grpc"], "otlp_http": ports["otlp_http"],
                "prometheus": ports["collector_metrics"], "health": ports["collector_health"],
                "telemetry": ports["collector_telemetry"]}) as collector, \
         backends.start_prometheus(state_dir / "prometheus", port=ports["prometheus"], scrape={
                "otelcol-ebpf": [collector.prometheus_address],
                "otelcol-ebpf-self": [collector.telemetry_address]}) as prometheus, \
         start_agent(state_dir, collector.otlp_grpc_endpoint, probes, model_dir) as agent:
        yield Stack(prometheus, collector, jaeger, agent, state_dir)


def _interrupt(signum: int, frame) -> None:
    # Once: a second Ctrl-C while stopping must not cut the clean-up short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def say(line: str) -> None:
    print(line, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="make stack", description=doc[0], epilog="\n\n".join(doc[1:3]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus-port", type=int, default=DEFAULT_PORTS["prometheus"],
                        help="Prometheus UI/API port (default %(default)s)")
    parser.add_argument("--jaeger-port", type=int, default=DEFAULT_PORTS["jaeger_query"],
                        help="Jaeger query API and trace page port (default %(default)s)")
    parser.add_argument("--otlp-port", type=int, default=DEFAULT_PORTS["otlp_grpc"],
                        help="the Collector's OTLP/gRPC port, where the agent sends (default %(default)s)")
    parser.add_argument("--free-ports", action="store_true",
                        help="every port picked free (several stacks, or tests, on one host)")
    parser.add_argument("--duration", help="stop by itself after this long, e.g. 90s, 10m (default: until Ctrl-C)")
    parser.add_argument("--state-dir", type=Path,
                        help="keep logs, Prometheus' TSDB and the Collector's files here (default: a temporary "
                             "directory, removed when the stack stops)")
    parser.add_argument("--probes", help="the agent's probes, comma-separated (default: every probe this kernel "
                                         "supports)")
    parser.add_argument("--model-dir", help="the agent's model directory (default: the agent's own default)")
    return parser.parse_args(argv)


def resolve_ports(args: argparse.Namespace) -> dict[str, int | None]:
    if args.free_ports:
        return {name: None for name in DEFAULT_PORTS}
    ports = {**DEFAULT_PORTS, "prometheus": args.prometheus_port, "jaeger_query": args.jaeger_port,
             "otlp_grpc": args.otlp_port}
    check_ports_free(ports, {"prometheus": "--prometheus-port", "jaeger_query": "--jaeger-port",
                             "otlp_grpc": "--otlp-port"})
    return ports


def check_host() -> None:
    if os.geteuid() != 0:
        raise StackError("must run as root (the agent loads eBPF programs): try `sudo make stack`")
    for binary, fix in ((backends.OTELCOL_BIN, "make collector"), (backends.JAEGER_BIN, "make jaeger"),
                        (backends.PROMETHEUS_BIN, "make host")):
        if not binary.exists():
            raise StackError(f"{binary} is missing: run `{fix}` (or `make stack`, which builds what is missing)")


def print_links(stack: Stack) -> None:
    links = stack.links()
    say("stack: up; Ctrl-C (or SIGTERM) stops everything it started")
    say(f"  Prometheus  {links['state_timeline']}")
    say(f"              (state timeline; alerts: {links['prometheus']}/classic/alerts)")
    say(f"  Jaeger      {links['incident_traces']}")
    say(f"  Collector   {links['collector_health']} (health), {links['collector_metrics']} (what Prometheus scrapes)")
    say(f"  agent       OTLP/gRPC to {links['otlp_grpc']}; log {stack.agent.log_path}")
    say(f"  state       {stack.state_dir}")


def watch(stack: Stack, deadline: float | None) -> None:
    """Until the deadline (or a signal): relay the agent's log lines (state changes, export trouble), and fail
    as soon as any part of the stack died."""
    shown = 0
    while deadline is None or time.monotonic() < deadline:
        stack.check_alive()
        lines = stack.agent.log_tail(10_000_000).splitlines()
        for line in lines[shown:]:
            say(f"  {line}")
        shown = len(lines)
        time.sleep(0.5)


def one_line(err: Exception) -> str:
    """The error's first line, and the last line of the log tail it carries (what the process said last)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    head = lines[0].rstrip(":") if lines else type(err).__name__
    return f"{head}: {lines[-1]}" if len(lines) > 1 else head


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        duration = parse_duration(args.duration, "--duration") if args.duration else None
    except DurationError as err:
        say(f"stack: {err}")
        return 2
    try:
        check_host()
        ports = resolve_ports(args)
    except StackError as err:
        say(f"stack: {err}")
        return 1
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    keep = args.state_dir is not None
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="otel-ebpf-stack-"))
    deadline = time.monotonic() + duration if duration else None
    stack, prog_ids, outcome, failed = None, set(), "stopped", False
    try:
        say(f"stack: starting Jaeger, the Collector, Prometheus and the agent (state in {state_dir})")
        with start_stack(state_dir, ports, args.probes, args.model_dir) as stack:
            prog_ids = bpf_prog_ids(stack.agent.popen.pid)
            (state_dir / "stack.json").write_text(json.dumps(stack.describe(), indent=2))
            print_links(stack)
            watch(stack, deadline)
            outcome = f"stopped after {args.duration}"
            say("stack: stopping")
    except Interrupted as sig:
        outcome = f"stopped by {sig}"
    # BackendError: a backend died or never got ready; AssertionError: wait_until's timeout (the agent never
    # attached). Both messages start with the one line that says which.
    except (StackError, backends.BackendError, AssertionError) as err:
        outcome, failed = one_line(err), True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    report = [outcome]
    if stack is not None:
        code = stack.agent.popen.returncode
        left = prog_ids & loaded_bpf_prog_ids()
        report.append(f"agent (pid {stack.agent.popen.pid}) exited with {code}")
        report.append(f"{len(left)} of its BPF programs still loaded: ids {sorted(left)}" if left else
                      f"all {len(prog_ids)} of its BPF programs detached")
        failed = failed or code != 0 or bool(left)
    say("stack: " + "; ".join(report))
    if failed:
        say(f"stack: logs kept in {state_dir}")
    elif not keep:
        shutil.rmtree(state_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
