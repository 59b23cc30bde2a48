"""Resident memory of the real agent with every default probe, sampled while it runs for N minutes.

    sudo .venv/bin/python bench/bench_memory.py --minutes 10
    sudo .venv/bin/python bench/bench_memory.py --minutes 3 --tree /tmp/before   # another checkout, same way

The agent is started as `otel-ebpf-receiver run` is (`python -m otel_ebpf_receiver run --live off`), exporting
over OTLP/gRPC every 10 s to a loopback sink in this process that accepts and discards (so the SDK's export path
runs as in production, without a Collector). Its VmRSS is read every ``--every`` seconds from /proc/PID/status.
Printed: RSS right after start (the first sample once the agent says it attached), after N minutes, the peak of
the samples, the peak including loading (VmHWM), and the per-library breakdown (/proc/PID/smaps) after start and
at the end.
``--tree`` runs the agent from another source tree (e.g. ``git archive COMMIT | tar -x -C /tmp/before``) to
compare before and after a change on the same host; the host's own load is whatever it is (say so).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from otel_ebpf_receiver.memory import mappings  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from bench_probes import stop  # noqa: E402

ATTACHED = "attached "  # the agent's log line once every probe is loaded and the model serves


def start_sink() -> tuple[object, int]:
    """A loopback OTLP/gRPC endpoint that answers every export with success and keeps nothing."""
    import grpc
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):  # noqa: N802 (gRPC naming)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    class Logs(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request, context):  # noqa: N802
            return logs_service_pb2.ExportLogsServiceResponse()

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def breakdown(pid: int) -> dict[str, tuple[int, int]]:
    """Mapping (file path, or [heap], [anon], [stack]) -> (resident KiB, of which anonymous KiB)."""
    rss: dict[str, tuple[int, int]] = {}
    for m in mappings(pid):
        name = (m.path if m.path.startswith("/") else m.name).split("site-packages/", 1)[-1]
        r, a = rss.get(name, (0, 0))
        rss[name] = (r + m.rss, a + m.anonymous)
    return rss


def breakdown_rows(start: dict[str, tuple[int, int]], end: dict[str, tuple[int, int]],
                   top: int) -> list[tuple[str, int, int, int]]:
    """(mapping, RSS after start, RSS at the end, anonymous at the end), largest at the end first; the rest summed."""
    rows = sorted(((n, start.get(n, (0, 0))[0], *end.get(n, (0, 0))) for n in set(start) | set(end)),
                  key=lambda row: (-row[2], -row[1]))
    rest = rows[top:]
    if rest:
        rows = rows[:top] + [(f"{len(rest)} other mappings", sum(r[1] for r in rest), sum(r[2] for r in rest),
                              sum(r[3] for r in rest))]
    return rows


def mb(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the agent runs (default 10)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between RSS samples (default 10)")
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree to run the agent from (default: this)")
    parser.add_argument("--top", type=int, default=12, help="mappings shown in the breakdown")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_memory: must run as root (the agent loads eBPF programs); try: sudo .venv/bin/python "
              "bench/bench_memory.py", file=sys.stderr)
        return 2
    if not (args.tree / "otel_ebpf_receiver" / "__main__.py").is_file():
        print(f"bench_memory: {args.tree} holds no otel_ebpf_receiver/__main__.py", file=sys.stderr)
        return 2
    sink, port = start_sink()
    env = {**os.environ, "PYTHONPATH": str(args.tree.resolve()), "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_METRIC_EXPORT_INTERVAL": "10000"}
    for name in ("OTEL_SDK_DISABLED", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER", "OTEL_TRACES_EXPORTER"):
        env.pop(name, None)
    duration = args.minutes * 60
    with tempfile.TemporaryFile(mode="w+") as log:
        agent = subprocess.Popen([sys.executable, "-m", "otel_ebpf_receiver", "run", "--live", "off",
                                  "--duration", f"{int(duration + 120)}s"],
                                 cwd=args.tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        samples: list[tuple[float, int]] = []
        try:
            deadline = time.monotonic() + 180
            while True:  # wait for "attached": loading (compiling every probe) takes seconds to a minute
                log.seek(0)
                if ATTACHED in log.read():
                    break
                if agent.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    print(f"bench_memory: the agent did not start:\n{log.read()}", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            started = time.monotonic()
            at_start = breakdown(agent.pid)
            while True:
                elapsed = time.monotonic() - started
                samples.append((elapsed, status_kib(agent.pid, "VmRSS")))
                print(f"  {elapsed:6.0f} s  RSS {mb(samples[-1][1])} MB", file=sys.stderr, flush=True)
                if elapsed >= duration or agent.poll() is not None:
                    break
                time.sleep(min(args.every, max(0.0, duration - elapsed)))
            if agent.poll() is not None:
                log.seek(0)
                print(f"bench_memory: the agent stopped early:\n{log.read()}", file=sys.stderr)
                return 1
            hwm = status_kib(agent.pid, "VmHWM")
            rows = breakdown_rows(at_start, breakdown(agent.pid), args.top)
        finally:
            stop(agent)
            sink.stop(grace=None)
    peak_at, peak = max(samples, key=lambda s: s[1])
    print(f"Agent with every default probe, run from {args.tree}, {args.minutes:g} min, RSS sampled every "
          f"{args.every:g} s ({len(samples)} samples):\n")
    print("| | RSS MB |\n|---|---:|")
    print(f"| after start (all probes attached, model serving) | {mb(samples[0][1])} |")
    print(f"| after {samples[-1][0] / 60:.1f} min | {mb(samples[-1][1])} |")
    print(f"| peak of the samples (at {peak_at / 60:.1f} min) | {mb(peak)} |")
    print(f"| peak including loading (VmHWM) | {mb(hwm)} |")
    print("\nResident memory by mapping (/proc/PID/smaps):\n")
    print(f"| mapping | RSS MB after start | RSS MB after {samples[-1][0] / 60:.1f} min | of which anonymous MB |")
    print("|---|---:|---:|---:|")
    for name, first, last, anon in rows:
        print(f"| {name} | {mb(first)} | {mb(last)} | {mb(anon)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
