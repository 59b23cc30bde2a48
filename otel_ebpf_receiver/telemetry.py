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
from bisect import bisect_left
from typing import Any, Iterable, Mapping, Sequence

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import (ConsoleMetricExporter, MetricExporter, MetricExportResult,
                                              MetricsData, PeriodicExportingMetricReader)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import OTELResourceDetector, Resource

from . import __version__
from .kernel import log2hist
from .probes.base import COUNTER, GAUGE, HISTOGRAM, Metric

log = logging.getLogger("otel_ebpf_receiver")

SCOPE = "otel_ebpf_receiver"
STATE_ATTRIBUTE = "system.state"
MODEL_ATTRIBUTE = "system.state.model"
DEFAULT_EXPORT_INTERVAL_MS = 10_000  # when OTEL_METRIC_EXPORT_INTERVAL is unset (the SDK's own default is 60 s)

SELF_METRICS = (
    Metric("otel_ebpf_receiver.probe.attached", GAUGE, "{probe}", "1 when the probe is attached, 0 when it was skipped.",
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
            # One instance per host: a restarted agent continues the same series (the SDK's default is a
            # random UUID per process, which Prometheus turns into a new `instance` on every restart).
            attributes["service.instance.id"] = machine_id
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
        self.meter_provider = MeterProvider(resource=self.resource, metric_readers=readers, views=histogram_views())
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


# -- histograms of kernel log2 buckets -----------------------------------------------------------------------------
#
# The kernel hands us, per window, a count per log2 bucket and the exact sum. The API's Histogram.record() takes one
# value per call, so replaying thousands of events a second through it blows the per-window budget. Instead one
# record() call carries the whole window: a float whose value is the window's sum and which also carries the bucket
# counts (BulkHistogram). A View installs, for our meter's histograms, the SDK's explicit-bucket aggregation with
# one method overridden: aggregate() adds the counts to the buckets and the sum to the sum. Everything else —
# bucket storage, cumulative/delta temporality, attributes, cardinality limit, every reader and exporter — stays
# the SDK's own. Reliance on SDK internals is limited to the fields aggregate() touches (_lock, _value, _sum, _min,
# _max, _record_min_max, _get_empty_bucket_counts), and tests/test_histograms.py pins them.
#
# (Injecting data points at export time needs only public classes but two interception points — the exporter
# wrapper for OTLP and the reader itself for InMemoryMetricReader — and our own temporality bookkeeping.)


class BulkHistogram(float):
    """One window of pre-aggregated histogram data. Its float value is the sum of the window's values (so a
    plain aggregation that does not know this type would see one measurement of that sum)."""

    def __new__(cls, total: float, counts: Sequence[int], low: float, high: float) -> "BulkHistogram":
        self = super().__new__(cls, total)
        self.counts = counts      # one count per OTel bucket: len(boundaries) + 1
        self.low = low            # bucket-resolution bounds of the window's smallest and largest value
        self.high = high
        return self


def _bulk_subclass(base: type) -> type:
    """``base`` (the SDK's explicit-bucket aggregation) with an aggregate() that also takes a BulkHistogram."""

    class BulkAggregation(base):  # type: ignore[misc, valid-type]
        def aggregate(self, measurement: Any, should_sample_exemplar: bool = True) -> None:
            value = measurement.value
            if not isinstance(value, BulkHistogram):
                return super().aggregate(measurement, should_sample_exemplar)
            with self._lock:
                if self._value is None:
                    self._value = self._get_empty_bucket_counts()
                if len(value.counts) != len(self._value):
                    raise ValueError(f"{len(value.counts)} bucket counts for {len(self._value)} buckets")
                for index, count in enumerate(value.counts):
                    if count:
                        self._value[index] += count
                self._sum += float(value)
                if self._record_min_max:
                    self._min = min(self._min, value.low)
                    self._max = max(self._max, value.high)
            # No exemplar: a window of kernel events has no trace context.

    BulkAggregation.__name__ = BulkAggregation.__qualname__ = f"Bulk{base.__name__}"
    return BulkAggregation


class Log2BucketHistogramAggregation(ExplicitBucketHistogramAggregation):
    """The SDK's explicit-bucket histogram (bounds from the instrument's advisory) that also accepts
    :class:`BulkHistogram` measurements. Ordinary ``record(value)`` calls keep working unchanged."""

    _bulk_classes: dict[type, type] = {}

    def _create_aggregation(self, *args: Any, **kwargs: Any) -> Any:
        # Let the SDK build its own aggregation (whatever its constructor takes in this version), then give that
        # object one more accepted measurement type. Only public names are imported.
        aggregation = super()._create_aggregation(*args, **kwargs)
        base = type(aggregation)
        if base not in self._bulk_classes:
            self._bulk_classes[base] = _bulk_subclass(base)
        aggregation.__class__ = self._bulk_classes[base]
        return aggregation


def histogram_views() -> list[View]:
    """Views the MeterProvider needs for :meth:`MetricSink.record_histogram` (Telemetry installs them)."""
    return [View(instrument_type=Histogram, meter_name=SCOPE, aggregation=Log2BucketHistogramAggregation())]


def histogram_boundaries(metric: Metric) -> tuple[float, ...]:
    """Bucket bounds of a probe histogram: the kernel's log2 slots in the metric's unit."""
    return tuple(getattr(metric, "boundaries", None) or log2hist.boundaries(metric.unit))


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
            bounds = histogram_boundaries(metric)
            self._histograms[metric.name] = (self.meter.create_histogram(
                metric.name, metric.unit, metric.description, explicit_bucket_boundaries_advisory=list(bounds)), bounds)
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
                         state: Mapping[str, Any], total: float | None = None) -> None:
        """Add one window of kernel log2 buckets (``{upper bound: count}``, bounds in the metric's unit) and the
        window's exact sum ``total`` with one SDK call. Each count lands in the bucket whose upper bound is its key
        (a key above the last bound, or inf, in the overflow bucket). The exported min/max are at bucket resolution:
        the lower edge of the lowest and the upper edge of the highest non-empty bucket. Without ``total`` the sum
        is estimated from bucket midpoints."""
        instrument, bounds = self._histograms[name]
        counts = [0] * (len(bounds) + 1)
        for bound, count in buckets.items():
            if count > 0:
                # Keys come from the same log2hist formulas as the bounds; the tolerance absorbs float rounding.
                counts[bisect_left(bounds, bound * (1 - 1e-9))] += int(count)
        used = [i for i, c in enumerate(counts) if c]
        if not used:
            return
        lower = lambda i: bounds[i - 1] if i > 0 else 0.0  # noqa: E731
        if total is None:
            total = sum(c * (lower(i) + (bounds[i] if i < len(bounds) else lower(i))) / 2 for i, c in enumerate(counts))
        top = used[-1]
        high = bounds[top] if top < len(bounds) else max(float(total), bounds[-1])
        instrument.record(BulkHistogram(max(float(total), 0.0), counts, lower(used[0]), high), {**attributes, **state})
