"""OpenTelemetry plumbing: resource, exporters (OTLP over gRPC or HTTP, console), and the sink that turns probe
readings into instruments with ``system.state`` on every data point.

*Where* data go is the standard OTEL_* variables (otel_env.py checks them; the SDK's exporters read them):
OTEL_EXPORTER_OTLP_[METRICS_|LOGS_|TRACES_]{ENDPOINT,HEADERS,TIMEOUT,PROTOCOL,INSECURE,CERTIFICATE,COMPRESSION},
OTEL_{METRICS,LOGS,TRACES}_EXPORTER, OTEL_SDK_DISABLED, OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME,
OTEL_METRIC_EXPORT_INTERVAL. *What* gets lost on the way is counted in delivery.py.

Longer than usual because the sink's three instrument kinds (counters kept as totals, latest-value gauges, bulk
log2 histograms) belong with the views and the provider that give them their cardinality limit and aggregation.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
import time
from bisect import bisect_left
from typing import Any, Iterable, Mapping, Sequence

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, ObservableCounter, ObservableGauge
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import OTELResourceDetector, Resource

from . import __version__, otel_env
from .delivery import (Delivery, ReportingExporter, accounted_log_exporter, accounted_span_exporter,
                       admitting_log_processor, admitting_span_processor, run_with_deadline)
from .kernel import log2hist
from .otel_env import otlp_endpoint, otlp_exporter, otlp_protocol  # noqa: F401 (doctor imports from here)
from .probes.base import COUNTER, GAUGE, HISTOGRAM, Metric

log = logging.getLogger("otel_ebpf_receiver")

SCOPE = "otel_ebpf_receiver"
STATE_ATTRIBUTE = "system.state"
MODEL_ATTRIBUTE = "system.state.model"
OVERFLOW_ATTRIBUTES = {"otel.metric.overflow": True}  # the spec's (and the SDK's) overflow series
OVERFLOW_KEY = frozenset(OVERFLOW_ATTRIBUTES.items())
DEFAULT_CARDINALITY_LIMIT = 2000  # series per metric; the spec's and the SDK's default
FLUSH_DEADLINE_SECONDS = 3.0      # the final flush at stop, whatever the Collector does
BATCH_QUEUE_DEFAULT = 2048        # OTEL_BLRP_MAX_QUEUE_SIZE / OTEL_BSP_MAX_QUEUE_SIZE when unset (the SDK's)
BATCH_SIZE_DEFAULT = 512          # OTEL_BLRP_MAX_EXPORT_BATCH_SIZE / OTEL_BSP_MAX_EXPORT_BATCH_SIZE when unset

SELF_METRICS = (
    Metric("otel_ebpf_receiver.probe.attached", GAUGE, "{probe}", "1 when the probe is attached, 0 when it was skipped.",
           ("otel_ebpf_receiver.probe.name", "otel_ebpf_receiver.probe.mode")),
    Metric("otel_ebpf_receiver.map.update_failures", COUNTER, "{update}",
           "BPF map updates that failed in the kernel (map full), per probe.", ("otel_ebpf_receiver.probe.name",)),
    Metric("otel_ebpf_receiver.map.evictions", COUNTER, "{entry}",
           "Entries evicted from bounded LRU maps, per probe.", ("otel_ebpf_receiver.probe.name",)),
    Metric("otel_ebpf_receiver.probe.read_errors", COUNTER, "{error}", "Probe map reads that raised an error.",
           ("otel_ebpf_receiver.probe.name",)),
    Metric("otel_ebpf_receiver.export.failures", COUNTER, "{export}",
           "Exports that failed, per signal (metrics, logs, spans).", ("signal",)),
    Metric("otel_ebpf_receiver.export.dropped", COUNTER, "{record}",
           "Log records and spans that never reached the Collector, per signal and reason (queue_full, "
           "export_failed, shutdown), and per event name for log records (event.name: system.state.change, "
           "mitigation.block, ...). Metrics are cumulative and lose nothing to a failed export.",
           ("signal", "reason", "event.name")),
)


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


def _quiet_sdk_loggers() -> None:
    # The OTLP exporters and batch processors log a warning (with the gRPC status) on every retry or dropped
    # record; ReportingExporter and Delivery say it once and count it.
    for name in ("opentelemetry.exporter.otlp.proto.grpc.exporter", "opentelemetry.exporter.otlp.proto.grpc",
                 "opentelemetry.exporter.otlp.proto.http", "opentelemetry.sdk.metrics._internal.export",
                 "opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export",
                 "opentelemetry.sdk._logs._internal.export"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def exporter_kinds(exporter: str | None, signal: str) -> tuple[str, ...]:
    """Which exporters a signal gets: none when OTEL_SDK_DISABLED=true; else the agent's own setting (--exporter,
    OTEL_EBPF_RECEIVER_EXPORTER, the config file) for every signal when it is given; else OTEL_<SIGNAL>_EXPORTER."""
    if otel_env.sdk_disabled():
        return ()
    if exporter is not None:
        return () if exporter == "none" else (exporter,)
    return otel_env.signal_exporters(signal)


def metric_exporter(kind: str) -> tuple[MetricExporter, str]:
    if kind == "console":
        return ConsoleMetricExporter(), "console"
    return otlp_exporter("metrics")


def _batch_sizes(prefix: str) -> tuple[int, int]:
    """(queue bound, batch size) from OTEL_BLRP_* / OTEL_BSP_* (checked by otel_env), the SDK's defaults else."""
    queue = int(os.environ.get(f"{prefix}_MAX_QUEUE_SIZE", "").strip() or BATCH_QUEUE_DEFAULT)
    batch = int(os.environ.get(f"{prefix}_MAX_EXPORT_BATCH_SIZE", "").strip() or BATCH_SIZE_DEFAULT)
    return queue, min(batch, queue)


def cardinality_views(limit: int) -> list[View]:
    """Views for our meter: every instrument keeps at most ``limit`` series; further attribute sets go into one
    ``otel.metric.overflow=true`` series (the SDK's mechanism). Histograms also get the bulk aggregation."""
    return [View(instrument_type=Histogram, meter_name=SCOPE, aggregation=Log2BucketHistogramAggregation(),
                 aggregation_cardinality_limit=limit),
            View(instrument_type=Counter, meter_name=SCOPE, aggregation_cardinality_limit=limit),
            View(instrument_type=ObservableCounter, meter_name=SCOPE, aggregation_cardinality_limit=limit),
            View(instrument_type=ObservableGauge, meter_name=SCOPE, aggregation_cardinality_limit=limit)]


class Telemetry:
    """Providers for metrics, logs (state-change, block and audit events) and traces (incidents), one resource.

    ``exporter`` (otlp, console, none) applies to every signal; None leaves the choice to OTEL_<SIGNAL>_EXPORTER.
    ``cardinality_limit`` caps the series of each of our metrics."""

    def __init__(self, exporter: str | None = "otlp", metric_readers: Sequence[Any] = (),
                 resource: Resource | None = None, log_exporter: Any = None, span_exporter: Any = None,
                 cardinality_limit: int = DEFAULT_CARDINALITY_LIMIT) -> None:
        _quiet_sdk_loggers()
        if exporter != "none":  # with none (tests, the lab) no OTEL_* setting is read
            otel_env.check()
        self.resource = resource or build_resource()
        self.cardinality_limit = cardinality_limit
        readers = list(metric_readers)
        self.reporting: list[ReportingExporter] = []
        for kind in exporter_kinds(exporter, "metrics"):
            inner, target = metric_exporter(kind)
            self.reporting.append(ReportingExporter(inner, target))
            readers.append(PeriodicExportingMetricReader(self.reporting[-1],
                                                         export_interval_millis=otel_env.export_interval_ms()))
        # No atexit shutdown: the agent stops them itself, with a deadline (see shutdown); an atexit handler
        # would wait again, for as long as the exporters' own timeouts, on a Collector that is not there.
        self.meter_provider = MeterProvider(resource=self.resource, metric_readers=readers,
                                            views=cardinality_views(cardinality_limit), shutdown_on_exit=False)
        self.meter = self.meter_provider.get_meter(SCOPE, __version__)
        self.deliveries: list[Delivery] = []
        self.logger_provider, self.logger = self._logs(exporter_kinds(exporter, "logs"), log_exporter)
        self.tracer_provider, self.tracer = self._traces(exporter_kinds(exporter, "traces"), span_exporter)

    def _logs(self, kinds: Sequence[str], log_exporter: Any):
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import (BatchLogRecordProcessor, ConsoleLogRecordExporter,
                                                    SimpleLogRecordProcessor)

        provider = LoggerProvider(resource=self.resource, shutdown_on_exit=False)
        if log_exporter is not None:
            provider.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
        for kind in kinds:
            if kind == "console":
                inner, target = ConsoleLogRecordExporter(), "console"
            else:
                inner, target = otlp_exporter("logs")
            queue, batch = _batch_sizes("OTEL_BLRP")
            delivery = Delivery("logs", target, queue)
            self.deliveries.append(delivery)
            # The SDK's queue is one batch longer than ours, so it never drops on its own (see delivery.py).
            processor = BatchLogRecordProcessor(accounted_log_exporter(inner, delivery), max_queue_size=queue + batch,
                                                max_export_batch_size=batch)
            provider.add_log_record_processor(admitting_log_processor(processor, delivery))
        return provider, provider.get_logger(SCOPE, __version__)

    def _traces(self, kinds: Sequence[str], span_exporter: Any):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

        provider = TracerProvider(resource=self.resource, shutdown_on_exit=False)
        if span_exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        for kind in kinds:
            if kind == "console":
                inner, target = ConsoleSpanExporter(), "console"
            else:
                inner, target = otlp_exporter("traces")
            queue, batch = _batch_sizes("OTEL_BSP")
            delivery = Delivery("spans", target, queue)
            self.deliveries.append(delivery)
            processor = BatchSpanProcessor(accounted_span_exporter(inner, delivery), max_queue_size=queue + batch,
                                           max_export_batch_size=batch)
            provider.add_span_processor(admitting_span_processor(processor, delivery))
        return provider, provider.get_tracer(SCOPE, __version__)

    @property
    def targets(self) -> str:
        """Where metrics go, for the start-up line."""
        return ", ".join(r.target for r in self.reporting) or "nothing"

    def export_health(self) -> dict[tuple[str, str], int]:
        """Cumulative failures and drops: {("failures", signal): n, (reason, signal): n}, for the self-metrics."""
        health: dict[tuple[str, str], int] = {}
        health[("failures", "metrics")] = sum(r.failures for r in self.reporting)
        for delivery in self.deliveries:
            key = ("failures", delivery.signal)
            health[key] = health.get(key, 0) + delivery.failures
            for reason, count in delivery.dropped.items():
                health[(reason, delivery.signal)] = health.get((reason, delivery.signal), 0) + count
        return health

    def dropped_events(self) -> dict[tuple[str, str, str], int]:
        """Cumulative drops by (signal, reason, event name); the event name is "" for spans."""
        dropped: dict[tuple[str, str, str], int] = {}
        for delivery in self.deliveries:
            for (reason, name), count in delivery.dropped_events.items():
                key = (delivery.signal, reason, name)
                dropped[key] = dropped.get(key, 0) + count
        return dropped

    def emit_event(self, name: str, attributes: Mapping[str, Any], body: str | None = None,
                   severity: str = "INFO") -> None:
        from opentelemetry._logs import SeverityNumber

        self.logger.emit(event_name=name, attributes=dict(attributes), body=body or name,
                         severity_text=severity, severity_number=getattr(SeverityNumber, severity))

    def shutdown(self, deadline_seconds: float = FLUSH_DEADLINE_SECONDS) -> dict[str, int]:
        """Final flush, then stop, within ``deadline_seconds`` in total whatever the Collector does (the exporters'
        own timeouts, OTEL_EXPORTER_OTLP_TIMEOUT, are 10 s per attempt by default). Returns the log records and
        spans that will not be delivered, per signal (also said in one line)."""
        ends_at = time.monotonic() + deadline_seconds

        def remaining_ms() -> int:
            return max(0, int((ends_at - time.monotonic()) * 1000))

        def flush_and_stop() -> None:
            # Logs and spans first: they are lost if not sent; metrics are cumulative and only lose the increase
            # since their last export.
            for provider in (self.logger_provider, self.tracer_provider, self.meter_provider):
                try:
                    provider.force_flush(remaining_ms())
                    if provider is self.meter_provider:
                        provider.shutdown(timeout_millis=remaining_ms())
                    else:
                        provider.shutdown()
                except Exception:  # a dead collector must not turn a clean stop into a traceback
                    log.debug("shutdown of %s failed", provider, exc_info=True)

        finished = run_with_deadline(flush_and_stop, deadline_seconds, "otel-flush")
        lost: dict[str, int] = {}
        for delivery in self.deliveries:
            left = delivery.abandon()
            if left or delivery.dropped_total:
                lost[delivery.signal] = lost.get(delivery.signal, 0) + delivery.dropped_total
        if not finished:
            log.warning("the final flush did not finish within %.0f s (Collector unreachable?); stopping anyway",
                        deadline_seconds)
        if lost:
            log.warning("not delivered during this run: %s", ", ".join(
                f"{count} {'log records' if signal == 'logs' else 'spans'}" for signal, count in sorted(lost.items())))
        return lost


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

    Counters receive per-window increases, so each ``system.state`` series accumulates exactly what happened while
    the host was in that state and their sum is the kernel's total. They are observable counters over totals the
    sink keeps itself: a window adds to a dict entry, and the SDK sees the totals only when a reader collects (once
    per export interval), instead of one synchronous ``Counter.add`` per series per window through the SDK's
    attribute checks and aggregation (the biggest share of a window's export). Past ``cardinality_limit`` series a
    metric's further attribute sets add to one ``otel.metric.overflow=true`` series, as the SDK does. Gauges are
    observable:
    the callback reports only the latest window's values, so a process that left the top N stops being exported
    (a synchronous gauge would repeat its last value forever).
    """

    def __init__(self, meter: Any, metrics: Iterable[Metric],
                 cardinality_limit: int = DEFAULT_CARDINALITY_LIMIT) -> None:
        self.meter = meter
        self.cardinality_limit = cardinality_limit
        self._counters: dict[str, dict[frozenset, list]] = {}  # name -> attribute set -> [attributes, total]
        # (name, state items, attribute items) as given -> the same [attributes, total] entry: a window's adds then
        # skip building the merged dict and its frozenset (most series come back every window). Only series under
        # the cardinality limit are remembered, so this stays as bounded as the series themselves.
        self._entries: dict[tuple, list] = {}
        self._histograms: dict[str, Any] = {}
        self._latest: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        for metric in metrics:
            self.declare(metric)

    def declare(self, metric: Metric) -> None:
        if metric.name in self._counters or metric.name in self._latest or metric.name in self._histograms:
            raise ValueError(f"metric {metric.name!r} declared twice")
        if metric.kind == COUNTER:
            self._counters[metric.name] = {}
            self.meter.create_observable_counter(metric.name, [self._totals_callback(metric.name)], metric.unit,
                                                 metric.description)
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

    def _totals_callback(self, name: str):
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                return [Observation(total, attrs) for attrs, total in self._counters[name].values()]

        return observe

    def add(self, name: str, value: float, attributes: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        self.add_all(name, ((value, attributes),), state)

    def add_all(self, name: str, increases: Iterable[tuple[float, Mapping[str, Any]]],
                state: Mapping[str, Any]) -> None:
        """Add each (increase, attributes) of one counter, all with the same state attributes, under one lock."""
        state_items = tuple(state.items())
        entries = self._entries
        with self._lock:
            series = self._counters[name]
            for value, attributes in increases:
                if not value:
                    continue
                if value < 0:  # what the SDK's Counter.add does with one: drop it, say so
                    log.warning("counter %s: negative increase %r dropped", name, value)
                    continue
                fast = (name, state_items, tuple(attributes.items()))
                entry = entries.get(fast)
                if entry is None:
                    merged = {**attributes, **state}
                    key = frozenset(merged.items())
                    entry = series.get(key)
                    if entry is None:
                        if len(series) >= self.cardinality_limit:  # as the SDK: the limit, then one overflow series
                            key, merged = OVERFLOW_KEY, dict(OVERFLOW_ATTRIBUTES)
                            entry = series.get(key)
                        if entry is None:
                            entry = series[key] = [merged, 0]
                    if key is not OVERFLOW_KEY:
                        entries[fast] = entry
                entry[1] += value

    def set_gauges(self, values: Mapping[str, list[tuple[float, Mapping[str, Any]]]], state: Mapping[str, Any]) -> None:
        """Replace the latest values of the given gauges (each list is this window's complete set). A gauge keeps
        at most ``cardinality_limit`` points a window; the rest become one ``otel.metric.overflow=true`` point
        with the last of their values (what the SDK does for its own overflow series)."""
        with self._lock:
            for name, points in values.items():
                # A point's own system.state wins (the classifier's state gauge: one point per state).
                latest = [(v, {**state, **attrs}) for v, attrs in points[:self.cardinality_limit]]
                if len(points) > self.cardinality_limit:
                    latest.append((points[-1][0], dict(OVERFLOW_ATTRIBUTES)))
                self._latest[name] = latest

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
