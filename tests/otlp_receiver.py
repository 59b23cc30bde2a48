"""A loopback OTLP receiver (gRPC and HTTP/protobuf) that keeps every request, for the agent's export tests.
The real Collector is exercised in test_collector_configs.py; this one lets a test stop and restart the
endpoint at will and look at raw requests."""

from __future__ import annotations

import socket
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Store:
    def __init__(self) -> None:
        self.metrics: list[Any] = []
        self.logs: list[Any] = []
        self.traces: list[Any] = []
        self.lock = threading.Lock()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request, context):  # noqa: N802 (gRPC naming)
        with self.store.lock:
            self.store.metrics.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request, context):  # noqa: N802
        with self.store.lock:
            self.store.logs.append(request)
        return logs_service_pb2.ExportLogsServiceResponse()


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request, context):  # noqa: N802
        with self.store.lock:
            self.store.traces.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """``with OtlpReceiver("grpc") as r: ... r.endpoint``; ``r.stop()`` / ``r.start()`` simulate an outage."""

    def __init__(self, protocol: str = "grpc", port: int | None = None) -> None:
        self.protocol = protocol
        self.port = port or free_port()
        self.store = _Store()
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OtlpReceiver":
        if self.protocol == "grpc":
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self.store), server)
            logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(self.store), server)
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self.store), server)
            server.add_insecure_port(f"127.0.0.1:{self.port}")
            server.start()
        else:
            store = self.store
            kinds = {"/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest, store.metrics),
                     "/v1/logs": (logs_service_pb2.ExportLogsServiceRequest, store.logs),
                     "/v1/traces": (trace_service_pb2.ExportTraceServiceRequest, store.traces)}

            class Handler(BaseHTTPRequestHandler):
                def do_POST(self):  # noqa: N802
                    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    message_type, sink = kinds.get(self.path, (None, None))
                    if message_type is None:
                        self.send_response(404)
                        self.end_headers()
                        return
                    request = message_type()
                    request.ParseFromString(body)
                    with store.lock:
                        sink.append(request)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.end_headers()

                def log_message(self, *args):
                    pass

            server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        if self.protocol == "grpc":
            self._server.stop(grace=None).wait()
        else:
            self._server.shutdown()
            self._server.server_close()
        self._server = None

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- reading what arrived -----------------------------------------------------------------------------------
    def points(self) -> Iterator[tuple[dict, str, Any]]:
        """(resource attributes, metric name, data point) for every sum/gauge data point received."""
        with self.store.lock:
            requests = list(self.store.metrics)
        for request in requests:
            for rm in request.resource_metrics:
                resource = {a.key: _value(a.value) for a in rm.resource.attributes}
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        kind = metric.WhichOneof("data")
                        for point in getattr(metric, kind).data_points:
                            yield resource, metric.name, point

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.2)
        return False

    def log_records(self) -> Iterator[Any]:
        with self.store.lock:
            requests = list(self.store.logs)
        for request in requests:
            for rl in request.resource_logs:
                for sl in rl.scope_logs:
                    yield from sl.log_records


def attributes(point: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in point.attributes}


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None
