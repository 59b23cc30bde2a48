"""The model_export toolchain: ONNX ↔ scikit-learn parity per algorithm, the refusal to write a model that
fails it, cluster naming and thresholds, the windows CSV format, and the CLI train → export → info round trip."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from model_export import inspection
from model_export import onnx_graph as og
from model_export import train as tr
from model_export import windows as w
from model_export.cli import build_parser, main
from model_export.synthetic import make_windows
from otel_ebpf_receiver.model import load_model

REPO = Path(__file__).resolve().parent.parent
NAMES = ("syscalls.rate_log1p", "syscalls.error_ratio", "file_open.rate_log1p", "exec.exec_rate_log1p",
         "exec.fork_rate_log1p", "xdp.packets_rate_log1p")
STATES = ("normal", "network_flood", "exec_storm", "file_open_storm")


@pytest.fixture(scope="module")
def table() -> w.WindowTable:
    return make_windows(NAMES, STATES, per_state=120, separation=4.0, seed=2)


# -- parity ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm,extra", [
    ("kmeans", {}),
    ("gmm", {"gmm_covariance": "full"}),
    ("gmm", {"gmm_covariance": "diag"}),
    ("gmm", {"gmm_covariance": "tied"}),
    ("gmm", {"gmm_covariance": "spherical"}),
    ("birch", {"birch_threshold": 0.3}),
])
def test_parity_sklearn_onnxruntime(table: w.WindowTable, tmp_path: Path, algorithm: str, extra: dict) -> None:
    trained = tr.fit(table, tr.TrainConfig(algorithm=algorithm, seed=2, **extra))
    exported = tr.export(trained, tmp_path / "m.onnx")
    assert exported.parity.ok

    # Independently of export's own check: run the written file on training windows and on windows the
    # model has never seen (between and beyond the clusters), through the runtime.
    rng = np.random.default_rng(5)
    unseen = table.values[rng.choice(len(table), 200)] + rng.normal(0, 1.5, (200, len(NAMES)))
    X32 = np.vstack([trained.X, unseen]).astype(np.float32)
    model = load_model(tmp_path / "m.onnx", list(NAMES))
    label, dist, dev = model.run(X32)
    ref_label, ref_dist, ref_dev = og.reference_outputs(trained.pipeline, X32.astype(np.float64))
    assert np.array_equal(label, ref_label), "labels must be identical"
    assert np.array_equal(label[: len(trained.X)], trained.pipeline.predict(trained.X.astype(np.float64)))
    # tolerance: |onnx - sklearn| <= 1e-4 + 1e-4 * |sklearn|
    np.testing.assert_allclose(dist, ref_dist, rtol=og.RTOL, atol=og.ATOL)
    np.testing.assert_allclose(dev, ref_dev, rtol=og.RTOL, atol=og.ATOL)
    assert model.distance_kind == og.DISTANCE_KIND[algorithm]
    if algorithm == "kmeans":  # sklearn's own distances, not ours
        Z = trained.pipeline[0].transform(X32.astype(np.float64))
        np.testing.assert_allclose(dist, trained.pipeline[-1].transform(Z), rtol=og.RTOL, atol=og.ATOL)
    # the explanation output (the table has a normal state): same tolerance, on seen and unseen windows
    assert model.explains_from_normal
    normal_dev = model.run_all(X32)[3]
    ref_normal = og.reference_normal_deviation(trained.pipeline, X32.astype(np.float64), trained.cluster_states)
    np.testing.assert_allclose(normal_dev, ref_normal, rtol=og.RTOL, atol=og.ATOL)


def test_kmeans_parity_tight_clusters(tmp_path: Path) -> None:
    """Windows very close to their centroid: where |x|²-2x·c+|c|² in float32 loses everything."""
    rng = np.random.default_rng(0)
    n = 20
    centres = rng.normal(0, 3, (4, n))
    X = np.vstack([c + rng.normal(0, 0.002, (200, n)) for c in centres])
    X[:, 3] += 50
    labels = np.repeat(np.array(list("abcd"), dtype=object), 200)
    t = w.WindowTable(tuple(f"f{i}" for i in range(n)), np.arange(len(X), dtype=float), labels, X)
    exported = tr.export(tr.fit(t, tr.TrainConfig()), tmp_path / "tight.onnx")
    assert exported.parity.ok and exported.parity.max_abs_distance_error < 1e-4


def test_export_refuses_on_parity_failure(table: w.WindowTable, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    trained = tr.fit(table, tr.TrainConfig())
    real = tr.onnx_outputs

    def off_by_one_row(*args, **kwargs):  # type: ignore[no-untyped-def]
        label, dist, dev, *explanation = real(*args, **kwargs)
        label = label.copy()
        label[7] = (label[7] + 1) % dist.shape[1]
        return (label, dist, dev, *explanation)

    monkeypatch.setattr(tr, "onnx_outputs", off_by_one_row)
    out = tmp_path / "refused.onnx"
    with pytest.raises(tr.TrainError, match="refusing.*1 label mismatches.*row 7"):
        tr.export(trained, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_refuses_on_normal_deviation_parity_failure(table: w.WindowTable, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    trained = tr.fit(table, tr.TrainConfig())
    real = tr.onnx_outputs

    def explanation_off(*args, **kwargs):  # type: ignore[no-untyped-def]
        label, dist, dev, normal_dev = real(*args, **kwargs)
        normal_dev = normal_dev.copy()
        normal_dev[11, 2] += 0.01
        return label, dist, dev, normal_dev

    monkeypatch.setattr(tr, "onnx_outputs", explanation_off)
    with pytest.raises(tr.TrainError, match="refusing.*1 normal deviations.*row 11"):
        tr.export(trained, tmp_path / "refused.onnx")


def test_export_is_atomic_and_self_describing(table: w.WindowTable, tmp_path: Path) -> None:
    trained = tr.fit(table, tr.TrainConfig(percentile=95, unknown_above=2.0))
    exported = tr.export(trained, tmp_path / "a.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["a.onnx"]  # no temporary left behind
    proto = onnx.load(str(tmp_path / "a.onnx"))
    assert [i.name for i in proto.graph.input] == ["features"]
    assert [o.name for o in proto.graph.output] == ["label", "distances", "deviation", "normal_deviation"]
    assert {o.domain: o.version for o in proto.opset_import}[""] == og.TARGET_OPSET
    m = exported.model
    assert m.percentile == 95 and m.unknown_above == 2.0
    assert m.version.startswith("kmeans-")
    # same training directory → same graph → same version hash
    assert tr.export(trained, tmp_path / "b.onnx").model.version == m.version


# -- naming clusters and thresholds ---------------------------------------------------------------------------------

def test_majority_states() -> None:
    clusters = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    labels = np.array(["normal", "normal", "flood", "b", "a", "", "", "x"], dtype=object)
    assert tr.majority_states(clusters, labels, 5) == ["normal", "a", "unknown", "x", "unknown"]


def test_distance_thresholds() -> None:
    clusters = np.array([0] * 100 + [1] * 3)
    distances = np.concatenate([np.arange(100, dtype=float), [0.0, 0.0, 0.0]])
    thr = tr.distance_thresholds(clusters, distances, 3, 99.0, floor=0.25)
    assert thr[0] == pytest.approx(np.percentile(np.arange(100), 99))
    assert thr[1] == 0.25 and thr[2] == 0.25  # identical windows / empty cluster: the floor


def test_evaluation_report(table: w.WindowTable) -> None:
    labels = table.labels.copy()
    labels[:10] = ""  # unlabelled windows are clustered but do not vote
    t = w.WindowTable(table.names, table.timestamps, labels, table.values)
    trained = tr.fit(t, tr.TrainConfig(clusters=3))  # fewer clusters than labels
    ev = trained.evaluation
    assert ev.confusion.sum() == len(t) and "(none)" in ev.confusion_labels
    assert any("majority of no cluster" in msg for msg in ev.warnings)
    assert 0 < ev.purity < 1 and -1 <= ev.silhouette <= 1
    text = inspection.report(trained)
    assert "confusion matrix" in text and "purity" in text and "warning:" in text


# -- the windows CSV ------------------------------------------------------------------------------------------------

@dataclass
class FakeFeatureWindow:  # the shape of otel_ebpf_receiver.features.FeatureWindow
    timestamp: float
    values: dict


def test_windows_round_trip_bit_exact(tmp_path: Path) -> None:
    path = tmp_path / "rec.csv"
    rows = [w.LabelledWindow(1.5, "normal", {"a.x": 0.1, "b.y": 1 / 3}),
            (2.5, "exec_storm", {"a.x": 1e-300, "b.y": 12345.678901234567}),
            w.LabelledWindow(3.5, "", {"b.y": 2.0})]  # a.x absent: an idle counter is 0
    assert w.write_windows(path, ["a.x", "b.y"], rows) == 3
    assert path.read_text().splitlines()[0] == "timestamp,label,a.x,b.y"
    t = w.read_windows(path)
    assert t.names == ("a.x", "b.y")
    assert t.values.tolist() == [[0.1, 1 / 3], [1e-300, 12345.678901234567], [0.0, 2.0]]
    assert t.labels.tolist() == ["normal", "exec_storm", ""] and t.timestamps.tolist() == [1.5, 2.5, 3.5]
    assert w.read_windows(path, ["b.y"]).values.tolist() == [[1 / 3], [12345.678901234567], [2.0]]


def test_windows_append_and_feature_window_objects(tmp_path: Path) -> None:
    path = tmp_path / "rec.csv"
    w.write_windows(path, ["a", "b"], [FakeFeatureWindow(1.0, {"a": 1.0, "b": 2.0})], label="normal")
    w.write_windows(path, ["a", "b"], [FakeFeatureWindow(2.0, {"a": 3.0})], label="flood", append=True)
    with w.WindowWriter(path, ["a", "b"]) as writer:
        writer.write(3.0, "flood", {"b": 4.0})
    t = w.read_windows(path)
    assert t.values.tolist() == [[1.0, 2.0], [3.0, 0.0], [0.0, 4.0]]
    assert t.labels.tolist() == ["normal", "flood", "flood"]
    with pytest.raises(w.WindowsFormatError, match="record into a new file"):
        w.write_windows(path, ["a", "c"], [], append=True)


@pytest.mark.parametrize("text,needle", [
    ("", "empty file"),
    ("time,label,a\n1,x,2\n", "header must start"),
    ("timestamp,label\n", "no feature columns"),
    ("timestamp,label,a,a\n", "duplicate"),
    ("timestamp,label,a\n1,x\n", ":2: 2 cells"),
    ("timestamp,label,a\n1,x,2\n2,x,abc\n", ":3:"),
    ("timestamp,label,a\n1,x,nan\n", "non-finite"),
    ("timestamp,label,a\n1,bad label,1\n", "label 'bad label'"),
])
def test_windows_bad_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(w.WindowsFormatError, match=needle.replace("(", r"\(")):
        w.read_windows(path)


def test_windows_refuse_bad_values(tmp_path: Path) -> None:
    with pytest.raises(w.WindowsFormatError, match="non-finite"):
        w.write_windows(tmp_path / "x.csv", ["a"], [(1.0, "normal", {"a": math.inf})])
    with pytest.raises(w.WindowsFormatError, match="label"):
        w.write_windows(tmp_path / "y.csv", ["a"], [(1.0, "a,b", {"a": 1.0})])


def test_read_many_columns(tmp_path: Path) -> None:
    w.write_windows(tmp_path / "1.csv", ["a", "b"], [(1.0, "n", {"a": 1.0, "b": 2.0})])
    w.write_windows(tmp_path / "2.csv", ["b", "a"], [(2.0, "f", {"a": 3.0, "b": 4.0})])
    w.write_windows(tmp_path / "3.csv", ["a", "c"], [(3.0, "f", {"a": 5.0, "c": 6.0})])
    t = w.read_many([tmp_path / "1.csv", tmp_path / "2.csv"])
    assert t.names == ("a", "b") and t.values.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(w.WindowsFormatError, match="extra: c; missing: b"):
        w.read_many([tmp_path / "1.csv", tmp_path / "3.csv"])
    assert w.read_many([tmp_path / "1.csv", tmp_path / "3.csv"], ["a"]).values.tolist() == [[1.0], [5.0]]


# -- the CLI --------------------------------------------------------------------------------------------------------

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_export.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_cli_train_export_info_round_trip(tmp_path: Path) -> None:
    r = run_cli("synthetic", "-o", "demo.csv", "--per-state", "80", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "demo.csv", "-o", "out", "--clusters", "4", "--seed", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for needle in ("purity", "silhouette", "confusion matrix", "exec_storm", "next: otel-ebpf-model export"):
        assert needle in r.stdout
    png = tmp_path / "out" / "clusters.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "out" / "pipeline.joblib").exists() and (tmp_path / "out" / "metadata.json").exists()

    r = run_cli("export", "out", "-o", "models/state.onnx", "--version", "v42", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "0 label mismatches" in r.stdout

    r = run_cli("info", "models/state.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for needle in ("v42", "kmeans", "network_flood", "xdp.packets_rate_log1p", "threshold", "unknown"):
        assert needle in r.stdout

    r = run_cli("info", "models/state.onnx", "--json", cwd=tmp_path)
    import json
    info = json.loads(r.stdout)
    assert info["model_version"] == "v42" and len(info["clusters"]) == 4
    assert info["feature_names"][0] == "syscalls.rate_log1p"


def test_cli_train_with_onnx_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t = make_windows(NAMES, STATES, per_state=60, seed=4)
    rows = [(ts, lab, dict(zip(t.names, v))) for ts, lab, v in zip(t.timestamps, t.labels, t.values)]
    w.write_windows(tmp_path / "rec.csv", t.names, rows)
    assert main(["train", str(tmp_path / "rec.csv"), "-o", str(tmp_path / "d"), "--algorithm", "gmm",
                 "--onnx", str(tmp_path / "g.onnx"), "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_model(tmp_path / "g.onnx", NAMES).algorithm == "gmm"

    (tmp_path / "bad.onnx").write_text("nope")
    assert main(["info", str(tmp_path / "bad.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("otel-ebpf-model: error: model ") and err.count("\n") == 1
    assert main(["export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.onnx")]) == 1
    assert "run `otel-ebpf-model train" in capsys.readouterr().err


def test_help_has_examples() -> None:
    parser = build_parser()
    assert "otel-ebpf-model train" in parser.format_help()
    subs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("train", "export", "info"):
        assert "examples:" in subs[name].format_help()


def test_training_refusals(table: w.WindowTable) -> None:
    with pytest.raises(tr.TrainError, match="lower --clusters"):  # one subcluster cannot make 4 clusters
        tr.fit(table, tr.TrainConfig(algorithm="birch", birch_threshold=100.0))
    unlabelled = w.WindowTable(table.names, table.timestamps, np.full(len(table), "", dtype=object), table.values)
    with pytest.raises(tr.TrainError, match="--clusters K"):
        tr.fit(unlabelled, tr.TrainConfig())
    with pytest.raises(tr.TrainError, match="unknown algorithm"):
        tr.fit(table, tr.TrainConfig(algorithm="dbscan"))


def test_train_on_a_feature_subset(table: w.WindowTable, tmp_path: Path) -> None:
    rows = [(ts, lab, dict(zip(table.names, v))) for ts, lab, v in zip(table.timestamps, table.labels, table.values)]
    w.write_windows(tmp_path / "rec.csv", table.names, rows)
    subset = "xdp.packets_rate_log1p,exec.exec_rate_log1p,file_open.rate_log1p"
    assert main(["train", str(tmp_path / "rec.csv"), "-o", str(tmp_path / "d"), "--features", subset,
                 "--onnx", str(tmp_path / "s.onnx"), "-q"]) == 0
    model = load_model(tmp_path / "s.onnx", NAMES)
    assert list(model.feature_names) == subset.split(",")
    assert model.predict({}).state in model.states


def test_segment_weighting_tames_a_jittery_feature(tmp_path: Path) -> None:
    """Two workloads, each steady for a while (a gap in time between them): a feature that separates them keeps
    weight ~1, one that only jitters within each gets little; the exported model applies the same weighting."""
    rng = np.random.default_rng(7)
    n = 200
    ts = np.concatenate([np.arange(n, dtype=float), 1000.0 + np.arange(n)])
    labels = np.array(["normal"] * n + ["exec_storm"] * n, dtype=object)
    signal = np.concatenate([rng.normal(1.0, 0.1, n), rng.normal(6.0, 0.1, n)])
    jitter = rng.normal(0.0, 3.0, 2 * n)  # a p99 latency of a handful of requests: loud, and says nothing
    table = w.WindowTable(("exec.exec_rate_log1p", "http.latency_p99_log1p_ms"), ts, labels,
                          np.column_stack([signal, jitter]))
    assert list(tr.segments(table)[[0, n - 1, n, 2 * n - 1]]) == [0, 0, 1, 1]
    weights = tr.feature_weights(table)
    assert weights[0] > 0.95 and weights[1] == pytest.approx(0.05)
    trained = tr.fit(table, tr.TrainConfig(clusters=2, weighting="segments", scale_floor=0.1))
    assert trained.training["feature_weights"]["http.latency_p99_log1p_ms"] == pytest.approx(0.05)
    # A storm window with an extreme latency is still the storm, and close to its centre.
    exported = tr.export(trained, tmp_path / "w.onnx")
    verdict = exported.model.predict({"exec.exec_rate_log1p": 6.0, "http.latency_p99_log1p_ms": 9.0})
    assert verdict.state == "exec_storm" and verdict.score < 2.0
    assert "feature weights" in inspection.report(trained)


def test_the_database_volume_wants_a_disk_backed_directory() -> None:
    """io_degraded throttles the disk under the volume's backing file: a tmpfs has none, and says so in one line."""
    from model_export.lab.workloads import _whole_disk

    with pytest.raises(RuntimeError, match="disk-backed filesystem"):
        _whole_disk(os.stat("/dev/shm").st_dev)
    root = os.stat("/").st_dev
    if Path(f"/sys/dev/block/{os.major(root)}:{os.minor(root)}").exists():
        major, minor = _whole_disk(root).split(":")
        assert not Path(f"/sys/dev/block/{major}:{minor}/partition").exists()  # a whole disk, not a partition


def test_training_without_the_train_extra_is_one_line(tmp_path):
    """An agent-only install (`make run`) has no scikit-learn: `otel-ebpf-model train` says how to get it."""
    code = ("import importlib.abc, sys\n"
            "class NoSklearn(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('sklearn', 'skl2onnx'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoSklearn())\n"
            "from model_export.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    csv = tmp_path / "w.csv"
    assert main(["synthetic", "-o", str(csv), "--per-state", "20"]) == 0
    result = subprocess.run([sys.executable, "-c", code, "train", str(csv), "-o", str(tmp_path / "m")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "make setup-train" in result.stderr and "sklearn" in result.stderr


def test_export_declares_attack_states_and_only_states_the_model_has(table: w.WindowTable, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """A self-trained model drives mitigation only for the states its metadata declares (contract.py); export is
    where the operator declares them. Failed before: there was no way to write ``attack_states``, so a model
    trained on one's own host could never block anything."""
    trained = tr.fit(table, tr.TrainConfig(clusters=len(STATES), seed=1))
    tr.save(trained, tmp_path / "d")
    assert main(["export", str(tmp_path / "d"), "-o", str(tmp_path / "plain.onnx"), "-q"]) == 0
    assert load_model(tmp_path / "plain.onnx", NAMES).attack_states == frozenset()
    assert main(["info", str(tmp_path / "plain.onnx")]) == 0
    assert "attacks    none declared" in capsys.readouterr().out

    assert main(["export", str(tmp_path / "d"), "-o", str(tmp_path / "armed.onnx"), "-q",
                 "--attack-states", "network_flood, exec_storm,network_flood"]) == 0
    capsys.readouterr()
    assert load_model(tmp_path / "armed.onnx", NAMES).attack_states == {"exec_storm", "network_flood"}
    assert main(["info", str(tmp_path / "armed.onnx")]) == 0
    assert "attacks    exec_storm, network_flood" in capsys.readouterr().out

    for bad in ("unknown", "no_such_state"):
        assert main(["export", str(tmp_path / "d"), "-o", str(tmp_path / "bad.onnx"), "-q",
                     "--attack-states", bad]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--attack-states {bad}: not a state of this model" in err, err
        assert not (tmp_path / "bad.onnx").exists()
