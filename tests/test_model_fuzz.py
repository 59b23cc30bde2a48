"""The model fuzzer: mutated copies of the bundled models (bytes, graphs, metadata payloads) through the real loader.
Every file is either refused with one printable ModelError line, or served safely: predict on real-looking windows
never raises and returns a state the model can report. Nothing else escapes. Then the same files at agent level:
the classifier keeps the old model serving, a model cannot make mitigation act by naming a cluster, and the real
CLI starts with hostile files in its model directory.

Reproduce: the run prints its seed; ``MODEL_FUZZ_SEED=S MODEL_FUZZ_INDEX=I pytest tests/test_model_fuzz.py -k fuzz``
replays case I alone (``MODEL_FUZZ_COUNT`` changes how many cases a run makes)."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from otel_ebpf_receiver.model import ModelError, StateModel, Verdict, load_model, probe_vectors, sandbox
from otel_ebpf_receiver.model.contract import STATE_NAME
from otel_ebpf_receiver.model.watch import ModelWatcher

from . import model_mutations as mm

SEED = int(os.environ.get("MODEL_FUZZ_SEED", "20261201"))
COUNT = int(os.environ.get("MODEL_FUZZ_COUNT", "1200"))
ONLY = os.environ.get("MODEL_FUZZ_INDEX")
MAX_MESSAGE = 800   # path (<= 200) + problem (<= 300) + hint (<= 300)

BASES = [p.read_bytes() for p in mm.BUNDLED]


def centre_windows(data: bytes) -> list[dict[str, float]]:
    """Raw feature values at every cluster centre of a bundled model (its Scaler and centres tensor)."""
    from onnx import numpy_helper

    proto = mm.load(data)
    names = json.loads(mm.meta(proto)["feature_names"])
    scaler = next(n for n in proto.graph.node if n.op_type == "Scaler")
    attrs = {a.name: np.array(a.floats) for a in scaler.attribute}
    gather = next(n for n in proto.graph.node if n.op_type == "Gather")
    centres = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == gather.input[0])
    return [dict(zip(names, (c / attrs["scale"] + attrs["offset"]).tolist())) for c in centres]


def real_looking_windows() -> list[dict[str, float]]:
    """The centres of every bundled model's clusters, seeded windows in the features' ranges (log1p rates
    0-14, ratios and shares 0-1), an idle host, a NaN feature and absurd values."""
    windows = [w for data in BASES for w in centre_windows(data)]
    names = sorted({n for w in windows for n in w})
    rng = random.Random(SEED)
    for _ in range(12):
        windows.append({n: rng.uniform(0, 14) if "log1p" in n else rng.uniform(0, 1) for n in names})
    windows += [{}, {names[0]: float("nan")}, {n: 1e30 for n in names}, {n: -1e30 for n in names}]
    return windows


WINDOWS = real_looking_windows()
AVAILABLE = sorted({n for w in WINDOWS for n in w})


def check_served(model: StateModel) -> None:
    assert model.version.isprintable() and len(model.version) <= 128
    assert all(STATE_NAME.fullmatch(s) for s in model.cluster_states)
    for window in WINDOWS:
        verdict = model.predict(window)
        assert isinstance(verdict, Verdict)
        assert verdict.state in model.states, verdict
        assert verdict.fault == "" or (verdict.state == "unknown" and "\n" not in verdict.fault), verdict


def run_case(index: int, path: Path) -> tuple[str, list[str], str]:
    """(outcome, mutations applied, detail); raises AssertionError or anything that escaped load_model."""
    data, applied = mm.mutate(random.Random(f"{SEED}/{index}"), BASES)
    path.write_bytes(data)
    try:
        model = load_model(path, AVAILABLE)
    except ModelError as err:
        text = str(err)
        assert "\n" not in text and text.isprintable() and len(text) <= MAX_MESSAGE, repr(text)
        return "refused", applied, err.problem.split(" (")[0][:60]
    check_served(model)
    return "served", applied, model.version


def test_fuzz_bundled_models(tmp_path: Path) -> None:
    indices = [int(ONLY)] if ONLY is not None else range(COUNT)
    children = 0
    real_run_child = sandbox._run_child

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal children
        children += 1
        return real_run_child(*args, **kwargs)

    sandbox._run_child = counting
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    started = time.monotonic()
    try:
        for index in indices:
            try:
                outcome, applied, _ = run_case(index, tmp_path / "case.onnx")
                outcomes[outcome] += 1
            except Exception as exc:  # anything but a clean refusal or a safe model is a finding
                failures.append(f"index {index}: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        sandbox._run_child = real_run_child
    elapsed = time.monotonic() - started
    print(f"\nmodel fuzz: seed {SEED}, {len(indices)} mutated models, {outcomes['refused']} refused, "
          f"{outcomes['served']} served, {len(failures)} failures, {children} child test runs, {elapsed:.1f} s")
    assert not failures, (f"{len(failures)} of {len(indices)} cases escaped; reproduce one with "
                          f"MODEL_FUZZ_SEED={SEED} MODEL_FUZZ_INDEX=<index>:\n" + "\n".join(failures[:20]))
    if ONLY is None:
        assert outcomes["refused"] > 0 and outcomes["served"] > 0  # the catalogue reaches both ends


def test_fuzz_cases_are_reproducible() -> None:
    for index in (0, 7, COUNT - 1):
        first = mm.mutate(random.Random(f"{SEED}/{index}"), BASES)
        assert mm.mutate(random.Random(f"{SEED}/{index}"), BASES) == first


# -- at agent level ------------------------------------------------------------------------------------------------

def hostile_files(directory: Path) -> list[str]:
    base = BASES[0]
    files = {
        "deep.onnx": mm.with_metadata(base, "training", mm.deep(100_000)),
        "huge-int.onnx": mm.with_metadata(base, "distance_thresholds", f"[{mm.HUGE_INT}]"),
        "loop.onnx": mm.with_operator(base, "Loop"),
        "bomb.onnx": mm.memory_bomb(base),
        "external.onnx": mm.external_in(base, "function"),
        "ansi.onnx": mm.with_metadata(base, "model_version", "v\x1b[2J\nFAKE"),
        "truncated.onnx": base[: len(base) // 2],
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    os.mkfifo(directory / "fifo.onnx")
    (directory / "link.onnx").symlink_to(mm.BUNDLED[0])
    return [*files, "fifo.onnx", "link.onnx"]


def make_classifier(directory: Path, lines: list[str]):  # type: ignore[no-untyped-def]
    from otel_ebpf_receiver.state.classifier import StateClassifier

    classifier = StateClassifier(None, None, lines.append)
    fallback = load_model(mm.BUNDLED[0], bundled=True)
    names = list(fallback.feature_names)
    classifier.watcher = ModelWatcher(directory, names, classifier.on_swap, classifier.on_reject, model=fallback)
    classifier.watcher.load_initial()
    return classifier, fallback


def window(values: dict[str, float]):  # type: ignore[no-untyped-def]
    from otel_ebpf_receiver.features import FeatureWindow

    return FeatureWindow(time.time(), values)


def test_classifier_keeps_serving_through_hostile_files(tmp_path: Path) -> None:
    names = hostile_files(tmp_path)
    lines: list[str] = []
    classifier, fallback = make_classifier(tmp_path, lines)
    for values in WINDOWS[:20]:
        verdict = classifier.classify(window(values))
        assert verdict.model_version == fallback.version
    rejected = [line for line in lines if "still serving" in line]
    assert len(rejected) == len(names)  # each once
    assert all(line.isprintable() for line in lines)


def test_a_model_that_faults_on_real_windows_is_reported_once_and_the_agent_goes_on(tmp_path: Path) -> None:
    good = load_model(mm.BUNDLED[0], bundled=True)
    reached = {good.predict_vector(x).cluster for _, x in probe_vectors(len(good.feature_names))}
    victim = next(c for c in range(len(good.cluster_states)) if c not in reached)
    (tmp_path / "faulty.onnx").write_bytes(mm.relabel(BASES[0], {victim: 1000}))
    lines: list[str] = []
    classifier, _ = make_classifier(tmp_path, lines)
    assert classifier.watcher.model.path.name == "faulty.onnx"
    bad_window = centre_windows(BASES[0])[victim]
    verdicts = [classifier.classify(window(bad_window)) for _ in range(3)]
    assert all(v.fault and v.state == "unknown" for v in verdicts)
    assert sum("invalid output" in line for line in lines) == 1
    counted = [c for c in classifier.read(1.0).counters if c[0].endswith("invalid_outputs")]
    assert len(counted) == 3


def test_naming_a_cluster_an_attack_state_does_not_make_mitigation_act(tmp_path: Path) -> None:
    """The attack-state rule: a model file in the directory that names every cluster syn_flood classifies every
    window syn_flood, and mitigation (dry-run) still does nothing until the file declares attack_states."""
    from otel_ebpf_receiver.mitigation import HardAllowlist, MitigationSettings, Mitigator
    from otel_ebpf_receiver.probes.xdp import SourceRate

    base = mm.load(BASES[0])
    k = mm.n_clusters(base)
    everything_syn = mm.with_metadata(BASES[0], "cluster_states", json.dumps(["syn_flood"] * k))
    for name, data in (("undeclared.onnx", everything_syn),
                       ("declared.onnx", mm.with_metadata(everything_syn, "attack_states", '["syn_flood"]'))):
        directory = tmp_path / name.split(".")[0]
        directory.mkdir()
        (directory / name).write_bytes(data)
        classifier, _ = make_classifier(directory, [])
        settings = MitigationSettings(mode="dry-run")
        events: list[str] = []
        attacker = SourceRate("10.9.0.1", 20_000, 1.2e6, 1.0, 60.0, 0.9)
        mitigator = Mitigator(settings, None, HardAllowlist.build(settings, netns=()),
                              emit=lambda n, a: events.append(n), top_sources=lambda: [attacker])
        for _ in range(4):
            verdict = classifier.classify(window(centre_windows(BASES[0])[0]))
            mitigator.act(verdict)
        assert verdict.state == "syn_flood"
        assert (events != []) is (name == "declared.onnx"), (name, events)


@pytest.mark.bpf
def test_the_agent_starts_with_hostile_files_in_its_model_directory(tmp_path: Path) -> None:
    """The real CLI, as root: it starts, serves the good file, refuses each hostile one with one line, stops on
    SIGTERM with status 0, and prints no traceback."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "good.onnx").write_bytes(BASES[0])
    names = hostile_files(models)
    agent = subprocess.Popen([sys.executable, "-m", "otel_ebpf_receiver", "run", "--exporter", "none", "--probes",
                              "syscalls,file_open,exec", "--live", "off", "--interval", "500ms", "--model-dir",
                              str(models)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(agent.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120  # compiling three probes with bcc takes seconds on a busy machine
        while time.monotonic() < deadline and agent.poll() is None \
                and not any("now serving (from good.onnx" in line for line in err_lines):
            time.sleep(0.2)
        time.sleep(2)  # a few windows with the hostile files still there
        assert agent.poll() is None, "".join(err_lines)[-3000:]
    finally:
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=30)
        reader.join(10)
    err = "".join(err_lines)
    assert agent.returncode == 0, err[-3000:]
    assert "Traceback" not in err + out
    for name in names:
        refusals = [line for line in err_lines if f"{models / name}" in line]
        assert len(refusals) == 1, (name, err[-3000:])
    assert "now serving (from good.onnx" in err, err[-3000:]
