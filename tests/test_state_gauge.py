"""The state gauge otel_ebpf_receiver.system_state: one point per state the serving model can report, 1 for the
debounced state and 0 for the others, each point carrying its own system.state (the agent's window state does not
overwrite it) and the model's version; with no model, `unknown` at 1. And, with real probes, through the agent
into an in-memory reader."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_ebpf_receiver.features import FeatureWindow
from otel_ebpf_receiver.model import load_model
from otel_ebpf_receiver.model.watch import BUNDLED_MODEL_DIR
from otel_ebpf_receiver.probes.base import GAUGE, Metric
from otel_ebpf_receiver.state.classifier import STATE_GAUGE, StateClassifier
from otel_ebpf_receiver.telemetry import MODEL_ATTRIBUTE, STATE_ATTRIBUTE, MetricSink

from .helpers import data_points

MODEL = BUNDLED_MODEL_DIR / "core.onnx"


class Watcher:
    def __init__(self, model) -> None:
        self.model = model

    def poll(self) -> None:
        pass


def gauge_points(classifier: StateClassifier) -> dict[str, float]:
    reading = classifier.read(1.0)
    points = [(value, attrs) for name, value, attrs in reading.gauges if name == STATE_GAUGE]
    values = {attrs[STATE_ATTRIBUTE]: value for value, attrs in points}
    assert len(values) == len(points), "one point per state"
    return values


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL, bundled=True)


def test_one_point_per_model_state_and_the_current_one_is_1(model):
    classifier = StateClassifier(Watcher(model), None, lambda line: None)
    window = FeatureWindow(0.0, {name: 0.0 for name in model.feature_names})
    for _ in range(4):  # the debounced state starts unknown and takes a few windows to settle
        verdict = classifier.classify(window)
        values = gauge_points(classifier)
        assert sorted(values) == model.states
        assert values[verdict.state] == 1.0 and sum(values.values()) == 1.0, (verdict.state, values)
    assert len(model.states) > 2


def test_without_a_model_the_state_is_unknown_at_1():
    classifier = StateClassifier(Watcher(None), None, lambda line: None)
    classifier.classify(FeatureWindow(0.0, {}))
    assert gauge_points(classifier) == {"unknown": 1.0}


def test_a_points_own_state_wins_over_the_windows_state():
    """MetricSink.set_gauges merges the window's state attributes under the point's own: the gauge point about
    `normal` keeps system.state=normal in a window whose state is exec_storm."""
    reader = InMemoryMetricReader()
    sink = MetricSink(MeterProvider(metric_readers=[reader]).get_meter("t"),
                      [Metric(STATE_GAUGE, GAUGE, "{state}", "", (STATE_ATTRIBUTE, MODEL_ATTRIBUTE))])
    sink.set_gauges({STATE_GAUGE: [(0.0, {STATE_ATTRIBUTE: "normal"}), (1.0, {STATE_ATTRIBUTE: "exec_storm"})]},
                    {STATE_ATTRIBUTE: "exec_storm", MODEL_ATTRIBUTE: "m-1"})
    points = {p.attributes[STATE_ATTRIBUTE]: (p.value, p.attributes[MODEL_ATTRIBUTE])
              for name, p in data_points(reader) if name == STATE_GAUGE}
    assert points == {"normal": (0.0, "m-1"), "exec_storm": (1.0, "m-1")}


@pytest.mark.bpf
def test_the_agent_exports_the_state_gauge():
    from otel_ebpf_receiver.assembly import build_agent
    from otel_ebpf_receiver.config import Config

    reader = InMemoryMetricReader()
    agent = build_agent(Config(probes=["syscalls", "file_open", "exec"], exporter="none", live="off"),
                        metric_readers=[reader], say=lambda line: None)
    try:
        for _ in range(3):
            verdict = agent.step(0.2)
        states = agent.classifier.watcher.model.states
        points = {p.attributes[STATE_ATTRIBUTE]: p for name, p in data_points(reader) if name == STATE_GAUGE}
        assert sorted(points) == states
        assert {s for s, p in points.items() if p.value == 1.0} == {verdict.state}
        assert {p.attributes[MODEL_ATTRIBUTE] for p in points.values()} == {verdict.model_version}
    finally:
        agent.close()
