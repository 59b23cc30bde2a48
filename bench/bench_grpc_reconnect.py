"""How long after a long Collector outage the first OTLP/gRPC export gets through, with gRPC's default channel
options and with the agent's (otel_ebpf_receiver.telemetry.GRPC_CHANNEL_OPTIONS), in the same run.

    .venv/bin/python bench/bench_grpc_reconnect.py [--minutes 10]

Each variant is what the agent runs: three SDK exporters (metrics, logs, spans) to one endpoint, each exporting
every second while nothing listens there. After --minutes a gRPC server offering the three OTLP services starts on
each endpoint, and the bench prints, per variant and exporter, the seconds from the server's start to that
exporter's first successful export. Both variants run side by side in one process, on their own ports.
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

from otel_ebpf_receiver.telemetry import GRPC_CHANNEL_OPTIONS  # noqa: E402

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
    parser.add_argument("--minutes", type=float, default=10, help="how long nothing listens (default 10)")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the SDK says every failed export; the table says what matters
    data = sample_data()
    endpoints = {variant: f"127.0.0.1:{free_port()}" for variant in VARIANTS}
    kinds = {"metrics": OTLPMetricExporter, "logs": OTLPLogExporter, "spans": OTLPSpanExporter}
    up_at: dict[str, float] = {}
    first_ok: dict[tuple[str, str], float] = {}
    started = time.monotonic()

    def export_every_second(variant: str, signal: str) -> None:
        exporter = kinds[signal](endpoint=endpoints[variant], insecure=True, channel_options=VARIANTS[variant])
        while time.monotonic() - started < args.minutes * 60 + GIVE_UP_SECONDS:
            ok = exporter.export(data[signal]).name == "SUCCESS"
            if ok and variant in up_at:
                first_ok[(variant, signal)] = time.monotonic() - up_at[variant]
                return
            time.sleep(1)

    threads = [threading.Thread(target=export_every_second, args=(v, s), daemon=True) for v in VARIANTS for s in kinds]
    for thread in threads:
        thread.start()
    print(f"nothing listens for {args.minutes:g} min; 3 exporters per variant export every second", flush=True)
    time.sleep(args.minutes * 60)
    servers = []
    for variant, endpoint in endpoints.items():
        servers.append(serve(endpoint))
        up_at[variant] = time.monotonic()
    for thread in threads:
        thread.join()
    for server in servers:
        server.stop(0)
    print(f"\nseconds from the receiver's start to the first successful export, after {args.minutes:g} min down:")
    print(f"  {'variant':<16} " + " ".join(f"{s:>8}" for s in kinds))
    for variant in VARIANTS:
        cells = [first_ok.get((variant, s)) for s in kinds]
        print(f"  {variant:<16} " + " ".join(f"{c:8.1f}" if c is not None else f"{'>' + str(GIVE_UP_SECONDS):>8}"
                                              for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
