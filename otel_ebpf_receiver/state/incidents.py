"""One incident span per non-normal episode, from leaving the baseline state to returning, with span events for
each transition, early warning and mitigation (so Jaeger/Tempo show the incident timeline)."""

from __future__ import annotations

from typing import Any, Mapping

from ..model.contract import NORMAL_STATE

BASELINE_STATES = (NORMAL_STATE,)
EVENT_WARNING = "system.state.warning"
INCIDENT_SPAN = "system.state.incident"


class Incidents:
    """One span per non-normal episode: opened when the host leaves the baseline, closed when it returns.
    Other parts of the agent (early warning, mitigation) add span events to the open incident."""

    def __init__(self, tracer: Any, host: str) -> None:
        self.tracer = tracer
        self.host = host
        self.span: Any = None
        self.peak_score = 0.0
        self.states: list[str] = []

    @property
    def open(self) -> bool:
        return self.span is not None

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        if self.span is not None:
            self.span.add_event(name, attributes)

    def warning(self, state: str, attributes: dict[str, Any], model_version: str) -> None:
        """An early warning opens the incident (if none is open) before the state flips: the span then shows
        how long the build-up was visible before it became a state."""
        if self.span is None:
            self.peak_score = 0.0
            self.states = []
            self.span = self.tracer.start_span(INCIDENT_SPAN, attributes={
                "system.state": state, "system.state.model": model_version, "host.name": self.host,
                "system.state.opened_by": "early_warning"})
        self.span.add_event(EVENT_WARNING, attributes)

    def warning_cleared(self, state: str) -> None:
        """A warning that never became a non-normal state closes its incident."""
        if self.span is not None and not self.states and state in BASELINE_STATES:
            self.span.set_attribute("system.state.outcome", "warning_cleared")
            self.span.end()
            self.span = None

    def on_window(self, score: float) -> None:
        if self.span is not None:
            self.peak_score = max(self.peak_score, score)

    def on_transition(self, from_state: str, to_state: str, score: float, model_version: str,
                      explanation: Mapping[str, Any] | None = None) -> None:
        """``explanation``: the state-change event's ``system.state.top_feature.*`` attributes, which the span's
        transition event carries too (why the host left normal, in the trace view)."""
        attrs = {"system.state.from": from_state, "system.state.to": to_state, "system.state.anomaly_score": score,
                 **(explanation or {})}
        if to_state in BASELINE_STATES:
            if self.span is not None:
                self.span.add_event("system.state.transition", attrs)
                self.span.set_attribute("system.state.peak_score", self.peak_score)
                self.span.set_attribute("system.state.sequence", ",".join(self.states))
                self.span.end()
                self.span = None
            return
        if self.span is None:
            self.peak_score = score
            self.states = []
            self.span = self.tracer.start_span(INCIDENT_SPAN, attributes={
                "system.state": to_state, "system.state.model": model_version, "host.name": self.host,
                "system.state.from": from_state})
        elif not self.states:  # opened by an early warning: the incident is named by the state it became
            self.span.set_attribute("system.state", to_state)
        self.states.append(to_state)
        self.span.add_event("system.state.transition", attrs)

    def close(self) -> None:
        if self.span is not None:
            self.span.set_attribute("system.state.peak_score", self.peak_score)
            self.span.set_attribute("system.state.sequence", ",".join(self.states))
            self.span.add_event("agent.stopped", {})
            self.span.end()
            self.span = None
