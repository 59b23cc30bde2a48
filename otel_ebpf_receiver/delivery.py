"""What happens to telemetry between the agent and the Collector, said once and counted.

Metrics are cumulative sums kept in memory: a failed export loses nothing, the next one carries the totals
(:class:`ReportingExporter` says once that export fails and once that it recovered). Log records (state changes,
block and audit events) and spans (incidents) are different: the SDK's batch processor hands each record to the
exporter once, and a record whose export fails is gone — silently, because the SDK's own warnings are one line
per retry and we silence them. :class:`Delivery` counts every such record per signal and reason:

    queue_full     the batch queue is full (the Collector has been away long enough for it to fill up)
    export_failed  the export of its batch failed (Collector unreachable, refused, timed out)
    shutdown       still queued or in flight when the agent stopped and the flush deadline passed

and, for log records, per event name (``event.name``), so what was lost is known: a few state changes, or the
block events of an attack.

The queue bound is ours, applied before the SDK's: the SDK's own queue (a deque with a maximum length) drops the
oldest record without telling anyone, and what it drops is visible only through private fields. So
:class:`AdmittingLogProcessor` / :class:`AdmittingSpanProcessor` refuse (and count) a record when
``max_queue`` records are waiting, and the SDK's queue is made one batch longer than that so it never drops by
itself. Everything here uses only the SDK's public interfaces (processor and exporter classes).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Callable, Sequence

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

log = logging.getLogger("otel_ebpf_receiver")

DROP_REASONS = ("queue_full", "export_failed", "shutdown")
RECORD_NAMES = {"logs": "log records", "spans": "spans"}


class ReportingExporter(MetricExporter):
    """Wraps the real metric exporter: says once that export fails (one line, no traceback) and once that it
    recovered, and counts failures. The SDK keeps cumulative sums in memory, so nothing counted during an outage is
    lost."""

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


class Delivery:
    """The fate of one signal's records (``logs`` or ``spans``): accepted, exported, dropped per reason and per
    event name (a log record's ``event_name``; spans have none). Says once when records start being lost and once
    when export works again (with how many were lost meanwhile)."""

    def __init__(self, signal: str, target: str, max_queue: int) -> None:
        self.signal = signal
        self.target = target
        self.max_queue = max_queue
        self.accepted = 0
        self.exported = 0
        self.failures = 0            # export calls that failed
        self.dropped: Counter[str] = Counter()                   # by reason
        self.dropped_events: Counter[tuple[str, str]] = Counter()  # by (reason, event name)
        self.queued: Counter[str] = Counter()      # accepted, not yet handed to the exporter, by event name
        self.in_flight: Counter[str] = Counter()   # handed to the exporter, result not known yet, by event name
        self.failing = False
        self._dropped_when_failing_began = 0
        self._lock = threading.Lock()

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def admit(self, name: str = "") -> bool:
        """A record (of event ``name``) is about to be queued: False (and counted as dropped) when the queue is
        full."""
        with self._lock:
            if self.queued.total() >= self.max_queue:
                self._drop("queue_full", [name], "its queue is full")
                return False
            self.queued[name] += 1
            self.accepted += 1
            return True

    def handed(self, names: Sequence[str]) -> None:
        with self._lock:
            for name in names:
                if self.queued[name] > 0:
                    self.queued[name] -= 1
                self.in_flight[name] += 1
            self.queued += Counter()  # drops zero entries

    def finished(self, names: Sequence[str], ok: bool, reason: str = "") -> None:
        with self._lock:
            for name in names:
                if self.in_flight[name] > 0:
                    self.in_flight[name] -= 1
            self.in_flight += Counter()
            if ok:
                self.exported += len(names)
                if self.failing:
                    lost = self.dropped_total - self._dropped_when_failing_began
                    log.warning("%s export to %s recovered; %d %s were lost meanwhile (counted in "
                                "otel_ebpf_receiver.export.dropped)", self._name, self.target, lost,
                                RECORD_NAMES[self.signal])
                self.failing = False
            else:
                self.failures += 1
                self._drop("export_failed", names, reason or "not reachable or refused")

    def abandon(self) -> int:
        """At the end of shutdown: whatever is still queued or in flight will not be delivered. Returns it."""
        with self._lock:
            left = self.queued + self.in_flight
            for name, count in left.items():
                self.dropped["shutdown"] += count
                self.dropped_events[("shutdown", name)] += count
            self.queued, self.in_flight = Counter(), Counter()
            return left.total()

    @property
    def _name(self) -> str:
        return {"logs": "log", "spans": "span"}[self.signal]

    def _drop(self, reason: str, names: Sequence[str], why: str) -> None:
        """Called with the lock held."""
        if not self.failing:
            self._dropped_when_failing_began = self.dropped_total
            log.warning("%s export to %s failed (%s); %s are dropped until it works again, counted in "
                        "otel_ebpf_receiver.export.dropped", self._name, self.target, why, RECORD_NAMES[self.signal])
            self.failing = True
        self.dropped[reason] += len(names)
        for name in names:
            self.dropped_events[(reason, name)] += 1


def event_name(record: Any) -> str:
    """The event name of a log record as the SDK hands it to processors and exporters ("" when it has none)."""
    inner = getattr(record, "log_record", record)
    return getattr(inner, "event_name", None) or ""


def _outcome(call: Callable[[], Any], success: Any) -> tuple[Any, bool, str]:
    try:
        result = call()
    except Exception as exc:  # the batch processor would log it (silenced) and drop the batch
        log.debug("exporter raised", exc_info=True)
        return None, False, type(exc).__name__
    return result, result is success, ""


def accounted_log_exporter(inner: Any, delivery: Delivery) -> Any:
    from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult

    class AccountedLogExporter(LogRecordExporter):
        def export(self, batch: Sequence[Any]) -> LogRecordExportResult:
            names = [event_name(record) for record in batch]
            delivery.handed(names)
            result, ok, reason = _outcome(lambda: inner.export(batch), LogRecordExportResult.SUCCESS)
            delivery.finished(names, ok, reason)
            return result if result is not None else LogRecordExportResult.FAILURE

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return inner.force_flush(timeout_millis)

    return AccountedLogExporter()


def accounted_span_exporter(inner: Any, delivery: Delivery) -> Any:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class AccountedSpanExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            names = [""] * len(spans)
            delivery.handed(names)
            result, ok, reason = _outcome(lambda: inner.export(spans), SpanExportResult.SUCCESS)
            delivery.finished(names, ok, reason)
            return result if result is not None else SpanExportResult.FAILURE

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return inner.force_flush(timeout_millis)

    return AccountedSpanExporter()


def admitting_log_processor(inner: Any, delivery: Delivery) -> Any:
    """``inner`` (a batch processor) behind :meth:`Delivery.admit`."""
    from opentelemetry.sdk._logs import LogRecordProcessor

    class AdmittingLogProcessor(LogRecordProcessor):
        def on_emit(self, log_record: Any) -> None:
            if delivery.admit(event_name(log_record)):
                inner.on_emit(log_record)

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return inner.force_flush(timeout_millis)

    return AdmittingLogProcessor()


def admitting_span_processor(inner: Any, delivery: Delivery) -> Any:
    from opentelemetry.sdk.trace import SpanProcessor

    class AdmittingSpanProcessor(SpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            inner.on_start(span, parent_context=parent_context)

        def on_end(self, span: Any) -> None:
            if delivery.admit():
                inner.on_end(span)

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return inner.force_flush(timeout_millis)

    return AdmittingSpanProcessor()


def run_with_deadline(work: Callable[[], None], seconds: float, name: str) -> bool:
    """Run ``work`` in a daemon thread; True if it finished within ``seconds``. A daemon thread still blocked in
    an export when the process exits is simply dropped: the deadline is what the user waits, whatever the
    Collector does."""
    done = threading.Event()

    def target() -> None:
        try:
            work()
        except Exception:
            log.debug("%s failed", name, exc_info=True)
        finally:
            done.set()

    threading.Thread(target=target, name=name, daemon=True).start()
    return done.wait(seconds)
