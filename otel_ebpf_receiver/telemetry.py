"""OpenTelemetry plumbing: resource, OTLP exporters (gRPC or HTTP), and the sink that turns probe readings into
instruments with ``system.state`` on every data point.

Everything about *where* data goes is the standard OTEL_* variables, read by the SDK's exporters themselves:
OTEL_EXPORTER_OTLP_[METRICS_|LOGS_|TRACES_]{ENDPOINT,HEADERS,TIMEOUT,PROTOCOL,INSECURE,CERTIFICATE},
OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME, OTEL_METRIC_EXPORT_INTERVAL.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from typing import Any, Iterable, Mapping, Sequence

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (ConsoleMetricExporter, MetricExporter, MetricExportResult,
                                              MetricsData, PeriodicExportingMetricReader)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource

from . import __version__
from .probes.base import COUNTER, GAUGE, HISTOGRAM, Metric

log = logging.getLogger("otel_ebpf_receiver")

SCOPE = "otel_ebpf_receiver"
STATE_ATTRIBUTE = "system.state"
MODEL_ATTRIBUTE = "system.state.model"
DEFAULT_EXPORT_INTERVAL_MS = 10_000  # when OTEL_METRIC_EXPORT_INTERVAL is unset (the SDK's own default is 60 s)

SELF_METRICS = (
    Metric("otel_ebpf_receiver.probe.attached", GAUGE, "1", "1 when the probe is attached, 0 when it was skipped.",
           ("probe.name", "probe.mode")),
    Metric("otel_ebpf_receiver.map.update_failures", COUNTER, "{update}",
           "BPF map updates that failed in the kernel (map full), per probe.", ("probe.name",)),
    Metric("otel_ebpf_receiver.map.evictions", COUNTER, "{entry}",
           "Entries evicted from bounded LRU maps, per probe.", ("probe.name",)),
    Metric("otel_ebpf_receiver.probe.read_errors", COUNTER, "{error}", "Probe map reads that raised an error.",
           ("probe.name",)),
    Metric("otel_ebpf_receiver.export.failures", COUNTER, "{export}", "Metric exports that failed.",
           ("exporter",)),
)


def otlp_protocol(signal: str) -> str:
    return (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()


def otlp_endpoint(signal: str) -> str:
    protocol = otlp_protocol(signal)
    default = "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318"
    return (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or default)


def _check_protocol(signal: str) -> str:
    from .errors import ConfigError

    protocol = otlp_protocol(signal)
    if protocol not in ("grpc", "http/protobuf"):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use grpc or http/protobuf")
    return protocol


def build_resource() -> Resource:
    """Our defaults, then anything from OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME on top (the user wins)."""
    attributes: dict[str, Any] = {
        "service.name": "otel-ebpf-receiver",
        "service.version": __version__,
        "host.name": socket.gethostname(),
        "os.type": platform.system().lower(),
        "host.arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine()),
    }
    try:
        with open("/etc/machine-id") as fh:
            machine_id = fh.read().strip()
        if machine_id:
            attributes["host.id"] = machine_id
    except OSError:
        pass
    return Resource.create({}).merge(Resource(attributes)).merge(OTELResourceDetector().detect())


class ReportingExporter(MetricExporter):
    """Wraps the real exporter: says once that export fails (one line, no traceback) and once that it recovered,
    and counts failures. The SDK keeps cumulative sums in memory, so nothing counted during an outage is lost."""

    def __init__(self, inner: MetricExporter, target: str) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self.inner = inner
        self.target = target
        self.failures = 0
        self.failing = False
        self._lock = threading.Lock()

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:  # an exporter bug must not kill the reader thread
            log.debug("exporter raised", exc_info=True)
            result, reason = MetricExportResult.FAILURE, type(exc).__name__
        else:
            reason = "not reachable or refused"
        with self._lock:
            if result is MetricExportResult.SUCCESS:
                if self.failing:
                    log.warning("metric export to %s recovered; cumulative counters carry on where they were", self.target)
                self.failing = False
            else:
                self.failures += 1
                if not self.failing:
                    log.warning("metric export to %s failed (%s); the agent keeps running and retries every export "
                                "interval — counters keep accumulating", self.target, reason)
                self.failing = True
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _quiet_sdk_loggers() -> None:
    # The OTLP exporters log a warning (with the gRPC status) on every retry; ReportingExporter says it once.
    for name in ("opentelemetry.exporter.otlp.proto.grpc.exporter", "opentelemetry.exporter.otlp.proto.grpc",
                 "opentelemetry.exporter.otlp.proto.http", "opentelemetry.sdk.metrics._internal.export",
                 "opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export",
                 "opentelemetry.sdk._logs._internal.export"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def metric_exporter(kind: str) -> tuple[MetricExporter, str]:
    if kind == "console":
        return ConsoleMetricExporter(), "console"
    protocol = _check_protocol("metrics")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter(), f"{otlp_endpoint('metrics')} ({protocol})"


class Telemetry:
    """Providers for metrics, logs (state-change events) and traces (incidents), built from one resource."""

    def __init__(self, exporter: str = "otlp", metric_readers: Sequence[Any] = (), resource: Resource | None = None,
                 log_exporter: Any = None, span_exporter: Any = None) -> None:
        _quiet_sdk_loggers()
        self.resource = resource or build_resource()
        readers = list(metric_readers)
        self.reporting: ReportingExporter | None = None
        if exporter != "none":
            inner, target = metric_exporter(exporter)
            self.reporting = ReportingExporter(inner, target)
            interval = int(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_EXPORT_INTERVAL_MS))
            readers.append(PeriodicExportingMetricReader(self.reporting, export_interval_millis=interval))
        self.meter_provider = MeterProvider(resource=self.resource, metric_readers=readers)
        self.meter = self.meter_provider.get_meter(SCOPE, __version__)
        self.logger_provider, self.logger = self._logs(exporter, log_exporter)
        self.tracer_provider, self.tracer = self._traces(exporter, span_exporter)

    def _logs(self, exporter: str, log_exporter: Any):
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, SimpleLogRecordProcessor

        provider = LoggerProvider(resource=self.resource)
        if log_exporter is not None:
            provider.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
        elif exporter == "otlp":
            if _check_protocol("logs") == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
            else:
                from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
            provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
        return provider, provider.get_logger(SCOPE, __version__)

    def _traces(self, exporter: str, span_exporter: Any):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        provider = TracerProvider(resource=self.resource)
        if span_exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        elif exporter == "otlp":
            if _check_protocol("traces") == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return provider, provider.get_tracer(SCOPE, __version__)

    def emit_event(self, name: str, attributes: Mapping[str, Any], body: str | None = None,
                   severity: str = "INFO") -> None:
        from opentelemetry._logs import SeverityNumber

        self.logger.emit(event_name=name, attributes=dict(attributes), body=body or name,
                         severity_text=severity, severity_number=getattr(SeverityNumber, severity))

    def shutdown(self) -> None:
        """Final flush, then stop. Bounded by the exporters' own timeouts (OTEL_EXPORTER_OTLP_TIMEOUT)."""
        for provider in (self.meter_provider, self.logger_provider, self.tracer_provider):
            try:
                provider.force_flush()
                provider.shutdown()
            except Exception:  # a dead collector must not turn a clean stop into a traceback
                log.debug("shutdown of %s failed", provider, exc_info=True)


class MetricSink:
    """Creates one instrument per declared metric and records readings with the state attributes.

    Counters are synchronous and receive per-window increases, so each ``system.state`` series accumulates exactly
    what happened while the host was in that state and their sum is the kernel's total. Gauges are observable:
    the callback reports only the latest window's values, so a process that left the top N stops being exported
    (a synchronous gauge would repeat its last value forever).
    """

    def __init__(self, meter: Any, metrics: Iterable[Metric]) -> None:
        self.meter = meter
        self._counters: dict[str, Any] = {}
        self._histograms: dict[str, Any] = {}
        self._latest: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        for metric in metrics:
            self.declare(metric)

    def declare(self, metric: Metric) -> None:
        if metric.name in self._counters or metric.name in self._latest or metric.name in self._histograms:
            raise ValueError(f"metric {metric.name!r} declared twice")
        if metric.kind == COUNTER:
            self._counters[metric.name] = self.meter.create_counter(metric.name, metric.unit, metric.description)
        elif metric.kind == GAUGE:
            self._latest[metric.name] = []
            self.meter.create_observable_gauge(metric.name, [self._callback(metric.name)], metric.unit,
                                               metric.description)
        elif metric.kind == HISTOGRAM:
            self._histograms[metric.name] = self.meter.create_histogram(metric.name, metric.unit, metric.description)
        else:
            raise ValueError(f"metric {metric.name!r}: unknown kind {metric.kind!r}")

    def _callback(self, name: str):
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                return [Observation(value, attrs) for value, attrs in self._latest[name]]

        return observe

    def add(self, name: str, value: float, attributes: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        if value:
            self._counters[name].add(value, {**attributes, **state})

    def set_gauges(self, values: Mapping[str, list[tuple[float, Mapping[str, Any]]]], state: Mapping[str, Any]) -> None:
        """Replace the latest values of the given gauges (each list is this window's complete set)."""
        with self._lock:
            for name, points in values.items():
                self._latest[name] = [(v, {**attrs, **state}) for v, attrs in points]

    def record_histogram(self, name: str, buckets: Mapping[float, int], attributes: Mapping[str, Any],
                         state: Mapping[str, Any]) -> None:
        """Kernel log2 histograms arrive as counts per bucket; each count is recorded at its bucket's upper bound."""
        instrument = self._histograms[name]
        attrs = {**attributes, **state}
        for bound, count in buckets.items():
            for _ in range(int(count)):
                instrument.record(bound, attrs)
