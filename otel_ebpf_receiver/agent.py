"""The agent: load probes, then every interval read their maps, build the feature window, classify the state and
record everything into OpenTelemetry with ``system.state`` attached. Stops cleanly on SIGINT/SIGTERM: final
flush, every program detached."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import Config
from .errors import AgentError, PrivilegeError, ProbeError
from .features import FeatureWindow, merge
from .probes import REGISTRY
from .probes.base import GAUGE, Probe, Reading
from .telemetry import MODEL_ATTRIBUTE, SELF_METRICS, STATE_ATTRIBUTE, MetricSink, Telemetry

log = logging.getLogger("otel_ebpf_receiver")

# Capabilities that let a process load tracing and XDP programs (linux/capability.h numbers).
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39


def effective_capabilities() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = effective_capabilities()
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    if not (has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))):
        raise PrivilegeError("must run as root (or with CAP_BPF and CAP_PERFMON) to load eBPF programs; "
                             "try: sudo otel-ebpf-receiver run")


@dataclass
class StateVerdict:
    state: str
    model_version: str
    score: float = 0.0
    cluster: int = -1
    top_features: list[tuple[str, float]] = field(default_factory=list)

    def attributes(self) -> dict[str, str]:
        return {STATE_ATTRIBUTE: self.state, MODEL_ATTRIBUTE: self.model_version}


class NoModel:
    """Used until a model loads: every data point still says what is known, which is nothing."""

    version = "none"

    def classify(self, window: FeatureWindow) -> StateVerdict:
        return StateVerdict("unknown", self.version)


def load_probes(names: list[str], settings: dict[str, dict[str, Any]], say: Callable[[str], None],
                on_event: Callable[[str, dict[str, Any]], None] | None = None) -> list[Probe]:
    """Instantiate and attach; a probe that cannot run here is skipped with one line, never a crash.
    ``on_event(name, attributes)`` receives probe events (blocklist changes) as OTel log events."""
    loaded: list[Probe] = []
    explicit = bool(names)
    for name in names or list(REGISTRY):
        cls = REGISTRY[name]
        reason = cls.unavailable_reason()
        if reason:
            say(f"probe {name} disabled: {reason}")
            continue
        probe = cls(settings.get(name))
        if on_event is not None and hasattr(probe, "on_event"):
            probe.on_event = on_event
        try:
            probe.load()
        except ProbeError as exc:
            say(str(exc))
            continue
        except AgentError:
            raise
        except Exception as exc:  # bcc raises bare Exceptions for attach failures
            say(f"probe {name} disabled: {exc}")
            probe.close()
            continue
        loaded.append(probe)
    if not loaded:
        what = ", ".join(names) if explicit else "any probe"
        raise AgentError(f"could not attach {what} on this kernel; run `otel-ebpf-receiver doctor` to see why")
    return loaded


class Agent:
    def __init__(self, config: Config, telemetry: Telemetry, probes: list[Probe],
                 classifier: Any = None, live_view: Any = None, mitigator: Any = None) -> None:
        self.config = config
        self.telemetry = telemetry
        self.probes = probes
        self.classifier = classifier or NoModel()
        self.live_view = live_view
        self.mitigator = mitigator
        self.xdp = next((p for p in probes if p.name == "xdp"), None)
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.windows = 0
        self.verdict = StateVerdict("unknown", getattr(self.classifier, "version", "none"))
        self.last_window: FeatureWindow | None = None
        self.last_window_seconds = 0.0
        self.window_listeners: list[Callable[[FeatureWindow, StateVerdict], None]] = []
        # The classifier reports like a probe (anomaly score, transitions), so its metrics are declared alongside.
        self.sources: list[Any] = list(probes) + [s for s in (self.classifier, mitigator) if hasattr(s, "read")]
        metrics = [m for source in self.sources for m in source.metrics] + list(SELF_METRICS)
        self.sink = MetricSink(telemetry.meter, metrics)
        self._health: dict[tuple[str, str], int] = {}
        self._read_errors_reported: set[str] = set()
        attached = [(1.0, {"probe.name": p.name, "probe.mode": p.mode}) for p in probes]
        skipped = [(0.0, {"probe.name": n, "probe.mode": "disabled"})
                   for n in (config.probes or REGISTRY) if n not in {p.name for p in probes}]
        self._attached_gauge = {"otel_ebpf_receiver.probe.attached": attached + skipped}
        self._failures_seen = 0

    # -- lifecycle ------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())

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

    def close(self) -> None:
        """Flush telemetry, then detach every program (in that order: the last window's data go out first)."""
        if hasattr(self.classifier, "close"):
            self.classifier.close()  # ends an open incident span, so it is exported too
        self.telemetry.shutdown()
        for probe in self.probes:
            probe.close()

    # -- one window -----------------------------------------------------------------------------------------
    def step(self, seconds: float) -> StateVerdict:
        """Read every probe, classify the window, act on it (mitigation), record everything with the state."""
        started = time.perf_counter()
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            reload = getattr(self.classifier, "request_reload", None)
            if reload:
                reload()
        readings = self._read_probes(seconds)
        window = FeatureWindow(time.time(), merge(r.features for _, r in readings))
        self.verdict = self.classifier.classify(window)
        if self.mitigator is not None and self.xdp is not None:
            self.mitigator.step(self.verdict.state, self.xdp.top_sources(self.xdp.settings["top_sources"]))
        for source in self.sources[len(self.probes):]:  # classifier, mitigator: what they produced this window
            readings.append((source, source.read(seconds)))
        self._record(readings, self.verdict.attributes())
        self.windows += 1
        self.last_window = window
        for listener in self.window_listeners:
            listener(window, self.verdict)
        self.last_window_seconds = time.perf_counter() - started
        if self.live_view is not None:
            self.live_view.render(self)
        return self.verdict

    def _read_probes(self, seconds: float) -> list[tuple[Any, Reading]]:
        readings: list[tuple[Any, Reading]] = []
        for probe in self.probes:
            try:
                readings.append((probe, probe.read(seconds)))
            except Exception as exc:  # a read must never stop the agent; say it once per probe
                self._record_health("otel_ebpf_receiver.probe.read_errors", probe.name, None, 1)
                if probe.name not in self._read_errors_reported:
                    log.warning("probe %s: reading its maps failed (%s); it will be retried every interval",
                                probe.name, exc)
                    self._read_errors_reported.add(probe.name)
        return readings

    def _record(self, readings: list[tuple[Any, Reading]], state: dict[str, str]) -> None:
        gauges: dict[str, list[tuple[float, Any]]] = dict(self._attached_gauge)
        for source, reading in readings:
            for name, value, attrs in reading.counters:
                self.sink.add(name, value, attrs, state)
            for metric in source.metrics:  # a gauge with no values this window reports nothing
                if metric.kind == GAUGE:
                    gauges.setdefault(metric.name, [])
            for name, value, attrs in reading.gauges:
                gauges[name].append((value, attrs))
            for name, buckets, total, attrs in reading.histograms:
                self.sink.record_histogram(name, buckets, attrs, state, total=total)
            if isinstance(source, Probe):
                self._record_health("otel_ebpf_receiver.map.update_failures", source.name, state,
                                    reading.map_update_failures, cumulative=True)
                self._record_health("otel_ebpf_receiver.map.evictions", source.name, state, reading.map_evictions,
                                    cumulative=True)
        reporting = self.telemetry.reporting
        if reporting is not None and reporting.failures != self._failures_seen:
            self.sink.add("otel_ebpf_receiver.export.failures", reporting.failures - self._failures_seen,
                          {"exporter": self.config.exporter}, state)
            self._failures_seen = reporting.failures
        self.sink.set_gauges(gauges, state)

    def _record_health(self, metric: str, probe: str, state: Any, value: int, cumulative: bool = False) -> None:
        if cumulative:
            key = (metric, probe)
            previous = self._health.get(key, 0)
            self._health[key] = value
            value = value - previous if value >= previous else value
        if value:
            self.sink.add(metric, value, {"probe.name": probe}, state or self.verdict.attributes())


def build_mitigator(config: Config, probes: list[Probe], telemetry: Telemetry, classifier: Any,
                    say: Callable[[str], None]) -> Any:
    from .mitigation import HardAllowlist, MitigationSettings, Mitigator

    settings = MitigationSettings(**config.mitigation)
    if settings.mode == "off":
        return None
    xdp = next((p for p in probes if p.name == "xdp"), None)
    if xdp is None or xdp.blocklist is None:
        say(f"mitigation {settings.mode} needs the xdp probe (probe_settings.xdp.interfaces); mitigation is off")
        return None
    extra = [(e.cidr, "XDP allowlist") for e in xdp.blocklist.list("allow")]
    allow = HardAllowlist.build(settings, netns=[None] + ([xdp.netns] if xdp.netns else []), extra=extra)
    incidents = getattr(classifier, "incidents", None)
    say(f"mitigation {settings.mode}: attack states {', '.join(settings.attack_states)}; "
        f"{len(allow.networks)} protected prefixes")
    return Mitigator(settings, xdp.blocklist, allow, emit=telemetry.emit_event,
                     span_event=incidents.event if incidents is not None else None)


def run(config: Config, *, metric_readers=(), say: Callable[[str], None] | None = None) -> None:
    """`otel-ebpf-receiver run`: everything between the CLI and the loop."""
    say = say or (lambda line: log.warning(line))
    check_privileges()
    telemetry = Telemetry(config.exporter, metric_readers=metric_readers)
    try:
        probes = load_probes(config.probes, config.probe_settings, say, on_event=telemetry.emit_event)
    except AgentError:
        telemetry.shutdown()
        raise
    from .live import LiveView, live_enabled
    from .state import build_classifier

    try:
        classifier = build_classifier(config, [p.name for p in probes], telemetry, say)
        mitigator = build_mitigator(config, probes, telemetry, classifier, say)
    except AgentError:
        for probe in probes:
            probe.close()
        telemetry.shutdown()
        raise
    live = LiveView(sys.stdout) if live_enabled(config.live, sys.stdout) else None
    agent = Agent(config, telemetry, probes, classifier=classifier, live_view=live, mitigator=mitigator)
    agent.install_signal_handlers()
    attached = ", ".join(f"{p.name} ({p.mode})" for p in probes)
    log.info("attached %s; exporting via %s every %s ms; state model %s", attached,
             telemetry.reporting.target if telemetry.reporting else "nothing (exporter=none)",
             os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "10000"), getattr(classifier, "version", "none"))
    try:
        agent.run()
    finally:
        agent.close()
        log.info("stopped: telemetry flushed, %d probe(s) detached", len(probes))
