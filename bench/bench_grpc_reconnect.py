"""How long after a long Collector outage the first OTLP/gRPC export gets through, with gRPC's default channel
options and with the agent's (otel_ebpf_receiver.otel_env.GRPC_CHANNEL_OPTIONS), in the same run.

    .venv/bin/python bench/bench_grpc_reconnect.py [--minutes 6] [--rounds 4]

Each variant is what the agent runs: three SDK exporters (metrics, logs, spans) to one endpoint, each exporting
every second. Each round nothing listens there for --minutes (gRPC's reconnect backoff reaches its ceiling after
about 5 minutes), then a gRPC server offering the three OTLP services starts on each endpoint; the bench records,
per variant and exporter, the seconds from the server's start to that exporter's first successful export, then
stops the servers for the next round. Both variants run side by side in one process, on their own ports. Where the
next reconnect attempt falls is luck (anywhere within the current backoff), hence several rounds.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter  # noqa: E402
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter  # noqa: E402
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc  # noqa: E402
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from otel_ebpf_receiver.otel_env import GRPC_CHANNEL_OPTIONS  # noqa: E402

VARIANTS = {"gRPC defaults": None, "agent's options": GRPC_CHANNEL_OPTIONS}
GIVE_UP_SECONDS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_data() -> dict[str, object]:
    reader = InMemoryMetricReader()
    MeterProvider(metric_readers=[reader]).get_meter("bench").create_counter("c").add(1)
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    with tracer_provider.get_tracer("bench").start_as_current_span("s"):
        pass
    return {"metrics": reader.get_metrics_data(), "spans": spans.get_finished_spans(), "logs": []}


class Receiver(metrics_service_pb2_grpc.MetricsServiceServicer, logs_service_pb2_grpc.LogsServiceServicer,
               trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):  # noqa: N802 (gRPC's name); one class answers the three services
        kind = type(request).__name__
        if kind.startswith("ExportMetrics"):
            return metrics_service_pb2.ExportMetricsServiceResponse()
        if kind.startswith("ExportLogs"):
            return logs_service_pb2.ExportLogsServiceResponse()
        return trace_service_pb2.ExportTraceServiceResponse()


def serve(endpoint: str) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Receiver(), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Receiver(), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    server.add_insecure_port(endpoint)
    server.start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=6, help="how long nothing listens per round (default 6)")
    parser.add_argument("--rounds", type=int, default=4, help="outages in a row (default 4)")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the SDK says every failed export; the table says what matters
    data = sample_data()
    endpoints = {variant: f"127.0.0.1:{free_port()}" for variant in VARIANTS}
    kinds = {"metrics": OTLPMetricExporter, "logs": OTLPLogExporter, "spans": OTLPSpanExporter}
    up_at: dict[str, float] = {}                     # variant -> when its server started, this round
    first_ok: dict[tuple[int, str, str], float] = {}  # (round, variant, signal) -> seconds
    round_number = [0]
    stop = threading.Event()

    def export_every_second(variant: str, signal: str) -> None:
        exporter = kinds[signal](endpoint=endpoints[variant], insecure=True, channel_options=VARIANTS[variant])
        while not stop.is_set():
            ok = exporter.export(data[signal]).name == "SUCCESS"
            key = (round_number[0], variant, signal)
            if ok and variant in up_at and key not in first_ok:
                first_ok[key] = time.monotonic() - up_at[variant]
            stop.wait(1)

    threads = [threading.Thread(target=export_every_second, args=(v, s), daemon=True) for v in VARIANTS for s in kinds]
    for thread in threads:
        thread.start()
    print(f"{args.rounds} rounds: nothing listens for {args.minutes:g} min, then a receiver; 3 exporters per "
          f"variant export every second", flush=True)
    for number in range(args.rounds):
        round_number[0] = number
        up_at.clear()
        time.sleep(args.minutes * 60)
        servers = []
        for variant, endpoint in endpoints.items():
            servers.append(serve(endpoint))
            up_at[variant] = time.monotonic()
        deadline = time.monotonic() + GIVE_UP_SECONDS
        while time.monotonic() < deadline and sum(1 for k in first_ok if k[0] == number) < len(threads):
            time.sleep(0.2)
        for server in servers:
            server.stop(0)
        print(f"round {number + 1}: " + ", ".join(
            f"{v} {max((first_ok.get((number, v, s), float('inf')) for s in kinds)):.1f} s" for v in VARIANTS),
            flush=True)
    stop.set()
    print(f"\nseconds from the receiver's start to the first successful export, after {args.minutes:g} min down "
          f"({args.rounds} rounds; median and max over rounds and the three exporters):")
    for variant in VARIANTS:
        values = sorted(first_ok.get((n, variant, s), float("inf")) for n in range(args.rounds) for s in kinds)
        print(f"  {variant:<16} median {values[len(values) // 2]:6.1f}   max {values[-1]:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
