"""The state model inside a running agent with real probes: an exec storm flips system.state and it comes back;
every exported data point carries the state; models hot-swap by file drop and bad files are refused while the old
model keeps serving."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from model_export.lab import workloads as scenarios
from otel_ebpf_receiver.assembly import build_agent
from otel_ebpf_receiver.config import Config
from otel_ebpf_receiver.model import load_model
from otel_ebpf_receiver.model.watch import BUNDLED_MODEL_DIR
from otel_ebpf_receiver.telemetry import MODEL_ATTRIBUTE, STATE_ATTRIBUTE

from .helpers import data_points

pytestmark = [pytest.mark.bpf]
# The bundled model for the three probes this harness loads (default.onnx needs every host probe, network.onnx XDP too).
DEFAULT_MODEL = BUNDLED_MODEL_DIR / "core.onnx"


class Harness:
    def __init__(self, model_dir: str | None, probes=("syscalls", "file_open", "exec")) -> None:
        self.lines: list[str] = []
        self.reader = InMemoryMetricReader()
        self.logs = InMemoryLogRecordExporter()
        self.spans = InMemorySpanExporter()
        config = Config(model_dir=model_dir, probes=list(probes), exporter="none", live="off")
        self.agent = build_agent(config, metric_readers=[self.reader], log_exporter=self.logs,
                                 span_exporter=self.spans, say=self.lines.append)
        self.probes, self.telemetry, self.classifier = self.agent.probes, self.agent.telemetry, self.agent.classifier
        self.last = time.monotonic()

    def window(self):
        time.sleep(max(0.0, 1.0 - (time.monotonic() - self.last)))
        now = time.monotonic()
        verdict = self.agent.step(now - self.last)
        self.last = now
        return verdict

    def close(self) -> None:
        self.agent.close()


@pytest.fixture
def harness():
    created: list[Harness] = []

    def make(model_dir=None, **kw):
        h = Harness(model_dir, **kw)
        created.append(h)
        return h

    yield make
    for h in created:
        h.close()


def test_exec_storm_flips_the_state_and_it_returns_to_normal(harness):
    h = harness()
    states = []
    for _ in range(15):  # the debounced state starts "unknown" and settles within a few windows
        states.append(h.window().state)
        if states[-2:] == ["normal", "normal"]:
            break
    assert states[-1] == "normal", states
    storm = []
    with scenarios.exec_storm(max_seconds=30):
        for _ in range(10):
            storm.append(h.window().state)
            if storm[-2:] == ["exec_storm", "exec_storm"]:
                break
    assert "exec_storm" in storm[:8], storm
    after = []
    for _ in range(12):
        after.append(h.window().state)
        if after[-1] == "normal":
            break
    assert after[-1] == "normal", after
    # every data point exported during the test carries the state; the model version is on the points of what
    # the model decided (state metrics), not on every probe point (a model swap would duplicate every series)
    points = list(data_points(h.reader))
    assert points and all(STATE_ATTRIBUTE in p.attributes for _, p in points)
    assert all(MODEL_ATTRIBUTE in p.attributes for n, p in points if n.startswith("otel_ebpf_receiver.system_state."))
    assert not any(MODEL_ATTRIBUTE in p.attributes for n, p in points if n == "otel_ebpf_receiver.syscalls")
    seen_states = {p.attributes[STATE_ATTRIBUTE] for _, p in points}
    assert {"normal", "exec_storm"} <= seen_states
    transitions = {(p.attributes["system.state.from"], p.attributes["system.state.to"])
                   for n, p in points if n == "otel_ebpf_receiver.system_state.transitions"}
    assert ("normal", "exec_storm") in transitions and ("exec_storm", "normal") in transitions
    # a log event per change, with from/to, score and the features that moved most
    events = [r.log_record for r in h.logs.get_finished_logs() if r.log_record.event_name == "system.state.change"]
    to_storm = [e for e in events if e.attributes["system.state.to"] == "exec_storm"]
    assert to_storm and to_storm[0].attributes["system.state.top_feature.1"].startswith(("exec.", "syscalls."))
    # the incident is one span from entering to leaving the state
    h.agent.telemetry.tracer_provider.force_flush()
    incidents = [s for s in h.spans.get_finished_spans() if s.name == "system.state.incident"]
    assert incidents and incidents[0].attributes["system.state"] == "exec_storm"
    assert [e.name for e in incidents[0].events].count("system.state.transition") >= 2


def _copy_model(tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copy(DEFAULT_MODEL, target)
    return target


def _retrained_model(tmp_path: Path, version: str) -> Path:
    """A second valid model: the bundled training data exported under another version."""
    from model_export.cli import main as model_cli

    out = tmp_path / "staging" / f"{version}.onnx"
    out.parent.mkdir(exist_ok=True)
    csv = tmp_path / "staging" / "windows.csv"
    # Train a small model on windows recorded here and now, on the same features as the bundled one.
    from model_export.lab.record import Recorder

    rec = Recorder(("syscalls", "file_open", "exec")).start()
    try:
        with rec.labelled("normal", settle_windows=1):
            time.sleep(4)
        with scenarios.exec_storm(max_seconds=20), rec.labelled("exec_storm", settle_windows=1):
            time.sleep(4)
    finally:
        rec.stop()
    rec.save(str(csv))
    assert model_cli(["train", str(csv), "-o", str(tmp_path / "staging" / "t"), "--onnx", str(out),
                      "--version", version, "-q"]) == 0
    return out


def test_hot_swap_and_rejection_keep_a_model_serving(harness, tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    _copy_model(model_dir, "a.onnx")
    h = harness(str(model_dir))
    first = h.window().model_version
    assert first == load_model(DEFAULT_MODEL).version

    new_model = _retrained_model(tmp_path, "swap-test-v2")
    shutil.copy(new_model, model_dir / "b.onnx")  # a plain copy, not atomic
    versions = [h.window().model_version for _ in range(2)]
    assert versions[-1] == "swap-test-v2", versions  # within two intervals
    points = list(data_points(h.reader))
    assert any(p.attributes.get(MODEL_ATTRIBUTE) == "swap-test-v2" for _, p in points)

    bad_files = {
        "truncated.onnx": (model_dir / "b.onnx").read_bytes()[:200],
        "not-onnx.onnx": b"this is not a model\n" * 10,
    }
    for name, data in bad_files.items():
        (model_dir / name).write_bytes(data)
    wrong = _wrong_feature_names(new_model, tmp_path)
    shutil.copy(wrong, model_dir / "wrong-features.onnx")
    for _ in range(3):
        verdict = h.window()
    assert verdict.model_version == "swap-test-v2"  # the old model keeps serving
    rejected = [line for line in h.lines if "still serving swap-test-v2" in line]
    assert len(rejected) == 3, h.lines
    assert any("wrong-features.onnx" in line and "no_such_feature" in line for line in rejected), rejected
    events = [r.log_record for r in h.logs.get_finished_logs()
              if r.log_record.event_name == "system.state.model.rejected"]
    assert len(events) == 3


def _wrong_feature_names(model_path: Path, tmp_path: Path) -> Path:
    """Same model, one feature renamed in its metadata: same width, different names — must be refused by name."""
    import json

    import onnx

    model = onnx.load(str(model_path))
    for prop in model.metadata_props:
        if prop.key == "feature_names":
            names = json.loads(prop.value)
            names[0] = "no_such_feature"
            prop.value = json.dumps(names)
    out = tmp_path / "wrong.onnx"
    onnx.save(model, str(out))
    return out


def test_closing_the_agent_closes_its_mitigator(monkeypatch):
    """The mitigator's never-block list holds netlink sockets (one per watched namespace): closing the agent must
    release them, as it does the probes. Failed before: Agent.close() never reached the mitigator."""
    from otel_ebpf_receiver import assembly

    closed: list[str] = []

    class RecordingMitigator:
        name = "mitigation"
        metrics = ()

        def act(self, verdict) -> None:
            pass

        def read(self, seconds: float):
            from otel_ebpf_receiver.probes.base import Reading
            return Reading()

        def close(self) -> None:
            closed.append("mitigator")

    monkeypatch.setattr(assembly, "build_mitigator", lambda *args, **kwargs: RecordingMitigator())
    h = Harness(None, probes=("exec",))
    h.window()
    assert closed == []
    h.close()
    assert closed == ["mitigator"]
