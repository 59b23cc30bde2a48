"""The agent loop. Every interval one window goes through five stages, in this order:

    collect    read every probe's maps                          -> a Reading per probe
    featurize  merge the probes' features                       -> a FeatureWindow
    classify   score the window with the state model (debounced) -> a Verdict
    act        hand the verdict to the actors (mitigation)
    export     record every reading, and what the classifier and actors produced, with ``system.state`` attached

The agent is built by :func:`otel_ebpf_receiver.assembly.build_agent` (the one place that wires probes, model,
mitigation, telemetry and the live view). Stops cleanly on SIGINT/SIGTERM: every program detached, then a flush
with a short deadline.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

from .config import Config
from .features import FeatureWindow, merge
from .model.runtime import Verdict
from .probes.base import GAUGE, Metric, Probe, Reading
from .telemetry import MODEL_ATTRIBUTE, SELF_METRICS, STATE_ATTRIBUTE, MetricSink, Telemetry

log = logging.getLogger("otel_ebpf_receiver")
PROBE_NAME, PROBE_MODE = "otel_ebpf_receiver.probe.name", "otel_ebpf_receiver.probe.mode"


class MetricSource(Protocol):
    """Something other than a probe that has metrics to export each window (the classifier, the mitigator).
    Its readings are recorded with the window's state, after it acted on the window."""

    name: str
    metrics: Sequence[Metric]

    def read(self, seconds: float) -> Reading: ...


class Classifier(Protocol):
    """Turns a feature window into the verdict every data point carries."""

    @property
    def version(self) -> str: ...

    def classify(self, window: FeatureWindow) -> Verdict: ...

    def close(self) -> None: ...


class Actor(Protocol):
    """Acts on each window's verdict (mitigation); must never raise for a bad window."""

    def act(self, verdict: Verdict) -> None: ...


class NoModel:
    """Used when nothing classifies (recording, probe tests): every data point says what is known, which is
    nothing."""

    version = "none"

    def classify(self, window: FeatureWindow) -> Verdict:
        return Verdict.unknown(self.version)

    def close(self) -> None:
        pass


@dataclass
class WindowResult:
    """Everything one window produced, for whoever listens (the recorder, the lab, the live view)."""

    number: int
    window: FeatureWindow
    verdict: Verdict
    readings: dict[str, Reading]            # by probe name; a probe whose read failed is absent
    seconds: float                          # the window's length
    cost_seconds: float = 0.0               # what the agent spent on it


@dataclass
class ProbeHealth:
    """Per-probe map health as the kernel counts it (cumulative), turned into per-window increases."""

    previous: dict[tuple[str, str], int] = field(default_factory=dict)
    read_errors_reported: set[str] = field(default_factory=set)

    def increase(self, metric: str, probe: str, cumulative: int) -> int:
        last = self.previous.get((metric, probe), 0)
        self.previous[(metric, probe)] = cumulative
        return cumulative - last if cumulative >= last else cumulative


class Agent:
    def __init__(self, config: Config, telemetry: Telemetry, probes: Sequence[Probe], *,
                 classifier: Classifier | None = None, sources: Sequence[MetricSource] = (),
                 actors: Sequence[Actor] = (), skipped_probes: Sequence[str] = (),
                 on_reload: Callable[[], None] | None = None) -> None:
        self.config = config
        self.telemetry = telemetry
        self.probes = list(probes)
        self.classifier: Classifier = classifier or NoModel()
        self.sources = list(sources)
        self.actors = list(actors)
        self.on_reload = on_reload
        self.stop_event = threading.Event()
        self.windows = 0
        self.verdict = Verdict.unknown(self.classifier.version)
        self.last: WindowResult | None = None
        self.window_listeners: list[Callable[[WindowResult], None]] = []
        self.closers: list[Callable[[], None]] = []  # run at close, after the probes are detached
        metrics = [m for p in self.probes for m in p.metrics] + [m for s in self.sources for m in s.metrics]
        self.sink = MetricSink(telemetry.meter, metrics + list(SELF_METRICS), telemetry.cardinality_limit)
        self._gauge_names = [m.name for m in metrics if m.kind == GAUGE]
        self._health = ProbeHealth()
        attached = [(1.0, {PROBE_NAME: p.name, PROBE_MODE: p.mode}) for p in self.probes]
        skipped = [(0.0, {PROBE_NAME: n, PROBE_MODE: "disabled"}) for n in skipped_probes]
        self._attached_gauge = {"otel_ebpf_receiver.probe.attached": attached + skipped}
        self._export_health_seen: dict[tuple[str, ...], int] = {}

    @property
    def last_window(self) -> FeatureWindow | None:
        return self.last.window if self.last is not None else None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        if self.on_reload is not None:  # SIGHUP: the model watcher re-validates the model directory next window
            on_reload = self.on_reload
            signal.signal(signal.SIGHUP, lambda *_: on_reload())

    def run(self) -> None:
        interval = self.config.interval
        # The first read only establishes baselines: kernel counters start at zero when we attach, but the
        # first window would otherwise be shorter than the others.
        last = time.monotonic()
        next_tick = last + interval
        while not self.stop_event.is_set():
            if self.stop_event.wait(max(0.0, next_tick - time.monotonic())):
                break
            now = time.monotonic()
            self.step(now - last)
            last = now
            next_tick += interval
            if next_tick < now:  # we fell behind (suspend, overload): skip missed ticks instead of bursting
                next_tick = now + interval
        self.read_last_window(time.monotonic() - last)

    def read_last_window(self, seconds: float) -> None:
        """At stop: what the probes counted since the last window, exported with the last verdict (a partial
        window is too short to classify). Without it, up to one interval of events would never be exported."""
        try:
            readings = self.collect(seconds)
            self.export(readings, self.verdict, seconds)
        except Exception as exc:  # the stop must go on: detach and flush
            log.warning("reading the last window failed (%s)", exc)

    def close(self) -> None:
        """Detach every program, end the open incident, then flush telemetry with a short deadline
        (telemetry.FLUSH_DEADLINE_SECONDS) whatever the Collector does: nothing stays attached while the agent
        waits on a Collector that is away. `run` has read the last window before."""
        for probe in self.probes:
            try:
                probe.close()
            except Exception as exc:  # one probe failing to detach must not keep the others attached
                log.warning("probe %s: detaching failed (%s)", probe.name, exc)
        for release in self.closers:
            release()
        self.classifier.close()
        self.telemetry.shutdown()

    # -- one window -----------------------------------------------------------------------------------------
    def step(self, seconds: float) -> Verdict:
        started = time.perf_counter()
        readings = self.collect(seconds)
        window = self.featurize(readings)
        verdict = self.classify(window)
        self.act(verdict)
        self.export(readings, verdict, seconds)
        self.windows += 1
        self.last = WindowResult(self.windows, window, verdict, readings, seconds, time.perf_counter() - started)
        for listener in self.window_listeners:
            listener(self.last)
        return verdict

    def collect(self, seconds: float) -> dict[str, Reading]:
        """Every probe's reading; a read that fails is reported (once per probe) and never stops the agent."""
        readings: dict[str, Reading] = {}
        for probe in self.probes:
            try:
                readings[probe.name] = probe.read(seconds)
            except Exception as exc:
                self._add_health("otel_ebpf_receiver.probe.read_errors", probe.name, 1)
                if probe.name not in self._health.read_errors_reported:
                    log.warning("probe %s: reading its maps failed (%s); it will be retried every interval",
                                probe.name, exc)
                    self._health.read_errors_reported.add(probe.name)
        return readings

    def featurize(self, readings: dict[str, Reading]) -> FeatureWindow:
        return FeatureWindow(time.time(), merge(r.features for r in readings.values()))

    def classify(self, window: FeatureWindow) -> Verdict:
        self.verdict = self.classifier.classify(window)
        return self.verdict

    def act(self, verdict: Verdict) -> None:
        for actor in self.actors:
            actor.act(verdict)

    def export(self, readings: dict[str, Reading], verdict: Verdict, seconds: float) -> None:
        """Record the probes' readings and the other sources' (read now: they include what classify and act
        produced) with this window's state attached.

        Every point carries ``system.state``; only the sources' points (classifier, mitigation: what the model
        decided) also carry ``system.state.model``. On a probe's points it would duplicate every series at each
        model swap, for a value the state metrics already carry."""
        state = {STATE_ATTRIBUTE: verdict.state}
        decided = self.state_attributes(verdict)
        gauges: dict[str, list[tuple[float, dict]]] = dict(self._attached_gauge)
        gauges.update((name, []) for name in self._gauge_names)  # a gauge with no values this window reports nothing
        gauge_state: dict[str, dict[str, str]] = {}
        all_readings = [(r, state) for r in readings.values()] + [(s.read(seconds), decided) for s in self.sources]
        for reading, attributes in all_readings:
            by_metric: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
            for metric, value, attrs in reading.counters:
                by_metric.setdefault(metric, []).append((value, attrs))
            for metric, increases in by_metric.items():
                self.sink.add_all(metric, increases, attributes)
            for metric, value, attrs in reading.gauges:
                gauges[metric].append((value, attrs))
                gauge_state[metric] = attributes
            for metric, buckets, total, attrs in reading.histograms:
                self.sink.record_histogram(metric, buckets, attrs, attributes, total=total)
        for name, reading in readings.items():
            self._add_health("otel_ebpf_receiver.map.update_failures", name,
                             self._health.increase("update_failures", name, reading.map_update_failures), state)
            self._add_health("otel_ebpf_receiver.map.evictions", name,
                             self._health.increase("evictions", name, reading.map_evictions), state)
        self._export_delivery_health(state)
        by_attributes: dict[tuple, dict[str, list]] = {}
        for name, points in gauges.items():
            key = tuple(sorted(gauge_state.get(name, state).items()))
            by_attributes.setdefault(key, {})[name] = points
        for key, values in by_attributes.items():
            self.sink.set_gauges(values, dict(key))

    def _export_delivery_health(self, state: dict[str, str]) -> None:
        """Failed exports (per signal) and log records / spans that were dropped (per signal, reason and event
        name) since the last window, from the telemetry's cumulative counts."""
        for (what, kind), total in self.telemetry.export_health().items():
            if what != "failures":
                continue
            increase = total - self._export_health_seen.get((what, kind), 0)
            self._export_health_seen[(what, kind)] = total
            if increase:
                self.sink.add("otel_ebpf_receiver.export.failures", increase, {"signal": kind}, state)
        for (kind, reason, name), total in self.telemetry.dropped_events().items():
            increase = total - self._export_health_seen.get((kind, reason, name), 0)
            self._export_health_seen[(kind, reason, name)] = total
            if increase:
                attributes = {"signal": kind, "reason": reason} | ({"event.name": name} if name else {})
                self.sink.add("otel_ebpf_receiver.export.dropped", increase, attributes, state)

    @staticmethod
    def state_attributes(verdict: Verdict) -> dict[str, str]:
        """What the sources' points carry: the state and the model that decided it."""
        return {STATE_ATTRIBUTE: verdict.state, MODEL_ATTRIBUTE: verdict.model_version}

    def _add_health(self, metric: str, probe: str, value: int, state: dict[str, str] | None = None) -> None:
        if value:
            self.sink.add(metric, value, {PROBE_NAME: probe}, state or {STATE_ATTRIBUTE: self.verdict.state})
