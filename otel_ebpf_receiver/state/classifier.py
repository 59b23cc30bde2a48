"""Between the agent and the model runtime: which model serves (bundled default, then the model directory, hot
swapped), debounce, early warning, and what a state change produces — a log event, a transition counter, and an
incident span (``incidents.py``)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from ..errors import ConfigError
from ..features import FeatureWindow, feature_names
from ..model.contract import UNKNOWN_STATE
from ..model.runtime import EXPLAINED_FROM_BOUNDS, EXPLAINED_FROM_NORMAL, Verdict
from ..model.watch import DEFAULT_MODEL_DIR, ModelWatcher, best_bundled_model
from ..probes.base import COUNTER, GAUGE, Metric, Reading
from .debounce import StateDebouncer
from .early_warning import EarlyWarning
from .incidents import BASELINE_STATES, EVENT_WARNING, Incidents

log = logging.getLogger("otel_ebpf_receiver")

EVENT_STATE_CHANGE = "system.state.change"
EVENT_MODEL_SWAP = "system.state.model.swap"
EVENT_MODEL_REJECTED = "system.state.model.rejected"
EVENT_MODEL_FAULT = "system.state.model.invalid_output"
SIGNAL_ATTRIBUTE = "otel_ebpf_receiver.early_warning.signal"  # which early-warning signal (a feature name)
STATE_GAUGE = "otel_ebpf_receiver.system_state"


class StateClassifier:
    """What the agent calls each window (:meth:`classify`); also a metric source like a probe (:meth:`read`)."""

    name = "system_state"
    metrics = (
        # One series per state the serving model can report, always present: dashboards draw the state timeline
        # from it and alerts key on it. (Every other point carries the state too, but a state's series there only
        # exist while something counted in it, and linger after it ended.) Unit {state}, not 1: the Collector's
        # Prometheus naming would append _ratio to a gauge with unit 1.
        Metric(STATE_GAUGE, GAUGE, "{state}",
               "1 for the current (debounced) system state, 0 for each other state the serving model can report.",
               ("system.state", "system.state.model")),
        Metric("otel_ebpf_receiver.system_state.anomaly_score", GAUGE, "{score}",
               "Distance of this window to its cluster relative to the training distances (>1: beyond the "
               "99th percentile of training; above the model's threshold the state is 'unknown')."),
        Metric("otel_ebpf_receiver.system_state.transitions", COUNTER, "{transition}",
               "Changes of the reported (debounced) system state.", ("system.state.from", "system.state.to")),
        Metric("otel_ebpf_receiver.system_state.warnings", COUNTER, "{warning}",
               "Early warnings: a sustained build-up (CUSUM over the baseline) before the state flips.",
               (SIGNAL_ATTRIBUTE,)),
        Metric("otel_ebpf_receiver.early_warning.cusum", GAUGE, "{score}",
               "CUSUM of each early-warning signal; a warning fires above early_warning.threshold (h).",
               (SIGNAL_ATTRIBUTE,)),
        Metric("otel_ebpf_receiver.system_state.model_swaps", COUNTER, "{swap}",
               "State models loaded by hot swap or SIGHUP."),
        Metric("otel_ebpf_receiver.system_state.model_rejections", COUNTER, "{model}",
               "Model files refused (corrupt, wrong features, failed test inference); the old model kept serving."),
        Metric("otel_ebpf_receiver.system_state.invalid_outputs", COUNTER, "{window}",
               "Windows whose model output broke the contract (label out of range, NaN, wrong shape); reported "
               "as state 'unknown'."),
    )

    def __init__(self, watcher: ModelWatcher | None, telemetry: Any, say: Callable[[str], None], *,
                 enter_windows: int = 2, exit_windows: int = 3) -> None:
        self.watcher = watcher
        self.telemetry = telemetry
        self.say = say
        self.debouncer = StateDebouncer(enter_windows, exit_windows, baseline=BASELINE_STATES)
        host = telemetry.resource.attributes.get("host.name", "") if telemetry is not None else ""
        self.incidents = Incidents(telemetry.tracer, host) if telemetry is not None else None
        self._pending = Reading()
        self.early_warning = EarlyWarning()
        self.warning_listeners: list[Callable[[Any], None]] = []
        self._faults_reported: set[int] = set()   # id() of models whose invalid output was already said

    @property
    def version(self) -> str:
        model = self.watcher.model
        return model.version if model is not None else "none"

    # -- hot swap callbacks -----------------------------------------------------------------------------------
    def on_swap(self, old: Any, new: Any) -> None:
        self._pending.counters.append(("otel_ebpf_receiver.system_state.model_swaps", 1, {}))
        self.say(f"state model {new.version} now serving (from {new.path.name}"
                 + (f", replacing {old.version}" if old is not None else "")
                 + f"; attack states: {', '.join(sorted(new.attack_states)) or 'none declared'})")
        if self.telemetry is not None:
            self.telemetry.emit_event(EVENT_MODEL_SWAP, {
                "system.state.model": new.version, "system.state.model.previous": old.version if old else "none",
                "file.path": str(new.path)})

    def on_reject(self, path: Path, error: Exception) -> None:
        self._pending.counters.append(("otel_ebpf_receiver.system_state.model_rejections", 1, {}))
        self.say(f"{error}; still serving {self.version}")
        if self.telemetry is not None:
            self.telemetry.emit_event(EVENT_MODEL_REJECTED, {"file.path": str(path), "error.message": str(error),
                                                             "system.state.model": self.version}, severity="WARN")

    # -- each window -------------------------------------------------------------------------------------------
    def classify(self, window: FeatureWindow) -> Verdict:
        self.watcher.poll()
        model = self.watcher.model
        if model is None:
            self._report_state(UNKNOWN_STATE, [UNKNOWN_STATE])
            return Verdict.unknown()
        raw = model.predict(window.values)
        if log.isEnabledFor(logging.DEBUG):  # `--log-level debug`: every window's own answer, before debouncing
            log.debug("window: model says %s (cluster %d, score %.2f); %s", raw.raw_state, raw.cluster, raw.score,
                      " ".join(f"{name}={value:.3g}" for name, value in window.values.items()))
        if raw.fault:
            self._on_fault(model, raw.fault)
        debounced = self.debouncer.update(raw.state)
        # mitigation acts only on a state the serving model declares (the attack-state rule, model/contract.py)
        verdict = dataclasses.replace(raw, state=debounced.state,
                                      declared_attack=debounced.state in model.attack_states)
        self._report_state(verdict.state, model.states)
        self._pending.gauges.append(("otel_ebpf_receiver.system_state.anomaly_score", raw.score, {}))
        if self.incidents is not None:
            self.incidents.on_window(raw.score)
        if debounced.transition is not None:
            self._on_transition(debounced.transition, raw, model.version)
        self._early_warning(window, raw, debounced.state, model.version)
        return verdict

    def _report_state(self, state: str, states: list[str]) -> None:
        """The state gauge: 1 for ``state``, 0 for every other state of the serving model. The point's own
        ``system.state`` says which state the value is about (the agent adds the window's state under it only
        where a point does not set it)."""
        self._pending.gauges.extend((STATE_GAUGE, 1.0 if name == state else 0.0, {"system.state": name})
                                    for name in sorted(set(states) | {state}))

    def _on_fault(self, model: Any, fault: str) -> None:
        self._pending.counters.append(("otel_ebpf_receiver.system_state.invalid_outputs", 1, {}))
        if id(model) in self._faults_reported:
            return
        self._faults_reported.add(id(model))
        self.say(f"state model {model.version} gave an invalid output ({fault}); such windows are 'unknown' — "
                 f"re-export the model (further ones are only counted)")
        if self.telemetry is not None:
            self.telemetry.emit_event(EVENT_MODEL_FAULT, {"system.state.model": model.version,
                                                          "error.message": fault}, severity="WARN")

    def _early_warning(self, window: FeatureWindow, raw: Any, state: str, model_version: str) -> None:
        was_active = self.early_warning.active
        warning = self.early_warning.update({**window.values, "anomaly_score": float(raw.score)},
                                            normal=state in BASELINE_STATES)
        self._pending.gauges.extend(("otel_ebpf_receiver.early_warning.cusum", value, {SIGNAL_ATTRIBUTE: name})
                                    for name, value in self.early_warning.scores().items())
        if warning is not None:
            for name in warning.signals:
                self._pending.counters.append(("otel_ebpf_receiver.system_state.warnings", 1,
                                               {SIGNAL_ATTRIBUTE: name}))
            attrs = {"early_warning.signals": ",".join(warning.signals), "early_warning.cusum": warning.cusum,
                     "early_warning.z": warning.z, "early_warning.value": warning.value, "system.state": state,
                     "system.state.anomaly_score": float(raw.score)}
            log.warning("early warning: %s building up (CUSUM %.1f, %+.1fσ) while the state is %s",
                        ", ".join(warning.signals), warning.cusum, warning.z, state)
            if self.telemetry is not None:
                self.telemetry.emit_event(EVENT_WARNING, attrs, body="abnormal traffic building up", severity="WARN")
                self.incidents.warning(state, attrs, model_version)
            for listener in self.warning_listeners:
                listener(warning)
        elif was_active and not self.early_warning.active and self.incidents is not None:
            self.incidents.warning_cleared(state)

    def _on_transition(self, transition: Any, raw: Any, model_version: str) -> None:
        from_state, to_state = transition.from_state, transition.to_state
        self._pending.counters.append(("otel_ebpf_receiver.system_state.transitions", 1,
                                       {"system.state.from": from_state, "system.state.to": to_state}))
        # why (model/contract.py, "Explanations"): leaving normal, the features furthest from the nearest normal
        # cluster; back to normal, what moved most from the normal centre
        unit = "w" if raw.explained_from == EXPLAINED_FROM_BOUNDS else "σ"   # bound widths beyond the benign range
        moved = ", ".join(f"{name} {dev:+.1f}{unit}" for name, dev in raw.top_features)
        reference = {EXPLAINED_FROM_NORMAL: "from normal", EXPLAINED_FROM_BOUNDS: "beyond benign range"}.get(
            raw.explained_from, "moved most")
        log.info("state %s → %s (score %.2f; %s: %s)", from_state, to_state, raw.score, reference, moved or "-")
        if self.telemetry is None:
            return
        explanation: dict[str, Any] = {"system.state.top_feature.reference": raw.explained_from or "none"}
        for rank, (name, deviation) in enumerate(raw.top_features, 1):
            explanation[f"system.state.top_feature.{rank}"] = name
            explanation[f"system.state.top_feature.{rank}.deviation"] = float(deviation)
        attributes = {"system.state.from": from_state, "system.state.to": to_state,
                      "system.state.anomaly_score": float(raw.score), "system.state.model": model_version,
                      "system.state.windows": transition.windows, **explanation}
        self.telemetry.emit_event(EVENT_STATE_CHANGE, attributes, body=f"system state {from_state} -> {to_state}")
        self.incidents.on_transition(from_state, to_state, float(raw.score), model_version, explanation)

    def read(self, seconds: float) -> Reading:
        """Metrics produced since the last window (recorded by the agent with the new state attached)."""
        reading, self._pending = self._pending, Reading()
        return reading

    def close(self) -> None:
        if self.incidents is not None:
            self.incidents.close()


def build_classifier(config: Config, probe_names: list[str], telemetry: Any, say: Callable[[str], None]) -> Any:
    """The best-fitting bundled model serves until the model directory offers a valid one; a bad or missing model
    never stops the agent: it reports ``system.state=unknown`` and says why, once."""
    available = feature_names(probe_names)
    model_dir = Path(config.model_dir) if config.model_dir else DEFAULT_MODEL_DIR
    if model_dir != DEFAULT_MODEL_DIR and not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist; create it or drop --model-dir to use "
                          f"{DEFAULT_MODEL_DIR}")
    if model_dir == DEFAULT_MODEL_DIR:  # also when configured by name (the README's example does)
        model_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    classifier = StateClassifier(None, telemetry, say)
    fallback = best_bundled_model(available, say)
    if fallback is not None:
        say(f"state model {fallback.version} serving (bundled {fallback.path.name}, "
            f"{len(fallback.feature_names)} features)")
    classifier.watcher = ModelWatcher(model_dir, available, classifier.on_swap, classifier.on_reject,
                                      model=fallback)
    classifier.watcher.load_initial()
    if classifier.watcher.model is None:
        say("no usable state model: system.state is 'unknown' until a valid .onnx file appears in " + str(model_dir))
    return classifier
