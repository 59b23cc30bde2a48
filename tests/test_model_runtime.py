"""The model runtime: loading and validation (every refusal is one ModelError line), scoring, unknown state.
Synthetic data with explicit feature names: nothing here needs the probes, root or BPF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from model_export import train as tr
from model_export.synthetic import make_windows
from otel_ebpf_receiver import model as rt
from otel_ebpf_receiver.model import ModelError, load_model

from . import model_mutations as mm

NAMES = ("syscalls.rate_log1p", "syscalls.error_ratio", "file_open.rate_log1p",
         "exec.exec_rate_log1p", "xdp.packets_rate_log1p")
STATES = ("normal", "network_flood", "exec_storm", "file_open_storm")


@pytest.fixture(scope="module")
def trained() -> tr.Trained:
    table = make_windows(NAMES, STATES, per_state=150, separation=4.0, seed=1)
    return tr.fit(table, tr.TrainConfig(algorithm="kmeans", seed=1))


@pytest.fixture(scope="module")
def model_path(trained: tr.Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "state.onnx"
    tr.export(trained, path, version="test-v1")
    return path


def assert_one_line(err: ModelError, path: Path, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text
    assert str(path) in text
    for needle in needles:
        assert needle in text, text


def reject(path: Path, *needles: str, **kwargs) -> ModelError:
    with pytest.raises(ModelError) as info:
        load_model(path, **kwargs)
    assert_one_line(info.value, path, *needles)
    return info.value


def rewrite(model_path: Path, out: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    proto = onnx.load(str(model_path))
    edit(proto)
    out.write_bytes(proto.SerializeToString())
    return out


def set_meta(proto, key: str, value: str | None) -> None:  # type: ignore[no-untyped-def]
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key != key]
    del proto.metadata_props[:]
    for k, v in keep + ([(key, value)] if value is not None else []):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


# -- a good model ------------------------------------------------------------------------------------------------

def test_metadata_round_trip(trained: tr.Trained, model_path: Path) -> None:
    m = load_model(model_path, list(NAMES))
    assert m.version == "test-v1"
    assert m.algorithm == "kmeans" and m.distance_kind == "euclidean"
    assert m.feature_names == NAMES
    assert list(m.cluster_states) == trained.cluster_states
    assert sorted(set(m.cluster_states)) == sorted(STATES)
    assert np.allclose(m.thresholds, trained.thresholds)
    assert m.percentile == 99.0 and m.unknown_above == 1.5
    assert m.training["rows"] == 600 and m.training["label_counts"]["normal"] == 150
    assert m.training["purity"] == pytest.approx(1.0)
    assert m.states == sorted([*STATES, "unknown"])
    meta = {p.key: p.value for p in onnx.load(str(model_path)).metadata_props}
    assert set(rt.REQUIRED_METADATA) <= set(meta)
    assert json.loads(meta[rt.METADATA_FEATURES]) == list(NAMES)


def test_features_matched_by_name_not_position(model_path: Path) -> None:
    shuffled = list(reversed(NAMES)) + ["some.other_feature"]
    m = load_model(model_path, shuffled)
    window = {"syscalls.rate_log1p": 3.0, "xdp.packets_rate_log1p": 1.0}
    assert m.vector(window).tolist() == [[3.0, 0.0, 0.0, 0.0, 1.0]]


def test_predict_classifies_training_windows(trained: tr.Trained, model_path: Path) -> None:
    m = load_model(model_path, NAMES)
    hits = 0
    for row, label in zip(trained.X[::10], trained.labels[::10]):
        verdict = m.predict(dict(zip(NAMES, row.tolist())))
        assert verdict.model_version == "test-v1"
        assert verdict.score == pytest.approx(verdict.distance / m.thresholds[verdict.cluster])
        hits += verdict.state == label
    assert hits == len(trained.X[::10])


def test_unknown_beyond_threshold(trained: tr.Trained, model_path: Path) -> None:
    m = load_model(model_path, NAMES)
    scaler = trained.pipeline[0]
    centre = scaler.inverse_transform(trained.pipeline[-1].cluster_centers_)[0]
    at_centre = m.predict(dict(zip(NAMES, centre.tolist())))
    assert at_centre.score < 0.1 and at_centre.state == at_centre.nearest_state != "unknown"

    # Walk away from that centre along one feature until the score passes unknown_above.
    far = centre.copy()
    far[3] += 50 * scaler.scale_[3]
    verdict = m.predict(dict(zip(NAMES, far.tolist())))
    assert verdict.score > m.unknown_above
    assert verdict.state == "unknown" and verdict.nearest_state != "unknown"
    assert verdict.top_features[0][0] == NAMES[3] and verdict.top_features[0][1] > 10
    assert len(verdict.top_features) == 3


def test_score_edge_is_the_threshold(trained: tr.Trained, model_path: Path) -> None:
    """score <= unknown_above keeps the cluster's state; just above it is unknown."""
    m = load_model(model_path, NAMES)
    scaler, km = trained.pipeline[0], trained.pipeline[-1]
    c = 0
    limit = m.thresholds[c] * m.unknown_above
    for factor, expect_unknown in ((0.98, False), (1.02, True)):
        z = km.cluster_centers_[c].copy()
        z[0] += limit * factor
        v = m.predict(dict(zip(NAMES, scaler.inverse_transform(z[None])[0].tolist())))
        assert v.cluster == c
        assert (v.state == "unknown") is expect_unknown, v


def test_nan_feature_is_unknown(model_path: Path) -> None:
    v = load_model(model_path, NAMES).predict({NAMES[0]: float("nan")})
    assert v.state == "unknown"


def test_session_is_single_threaded_no_spin() -> None:
    opts = rt.session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


# -- refusals -----------------------------------------------------------------------------------------------------

def test_feature_name_mismatch_rejected_by_name(model_path: Path) -> None:
    # Same count, one name different: a column-count check would accept this.
    available = list(NAMES[:-1]) + ["xdp.bytes_rate_log1p"]
    err = reject(model_path, "xdp.packets_rate_log1p", "probe xdp", "enable probe xdp",
                 available_features=available, feature_owner=lambda n: n.split(".")[0])
    assert "xdp.bytes_rate_log1p" not in err.problem


def test_feature_missing_from_unknown_probe(model_path: Path) -> None:
    reject(model_path, "xdp.packets_rate_log1p", "unknown to this agent",
           available_features=list(NAMES[:-1]), feature_owner=lambda n: None)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_file(model_path: Path, tmp_path: Path, fraction: float) -> None:
    data = model_path.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: int(len(data) * fraction)])
    reject(bad)


@pytest.mark.parametrize("content", [b"hello, I am not a model\n", os.urandom(4096), b"\x08" * 10])
def test_not_onnx(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(content)
    reject(bad)


def test_empty_and_missing(tmp_path: Path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    reject(tmp_path / "empty.onnx", "empty")
    reject(tmp_path / "absent.onnx", "cannot read")
    reject(tmp_path, "not a regular file")


def test_oversize(model_path: Path, tmp_path: Path) -> None:
    reject(model_path, "limit", max_bytes=100)
    huge = tmp_path / "huge.onnx"
    with open(huge, "wb") as fh:  # sparse: refused from its size, never read
        fh.truncate(rt.DEFAULT_MAX_BYTES + 1)
    reject(huge, f"{rt.DEFAULT_MAX_BYTES + 1} bytes", "limit")


def test_external_data_rejected(model_path: Path, tmp_path: Path) -> None:
    from onnx import numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    proto = onnx.load(str(model_path))
    for i, t in enumerate(proto.graph.initializer):  # only raw_data tensors can move out of the file
        proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="weights.bin",
                                   size_threshold=0)
    out = tmp_path / "external.onnx"
    onnx.save(proto, str(out))
    assert (tmp_path / "weights.bin").exists()
    reject(out, "external data")


def test_missing_metadata(model_path: Path, tmp_path: Path) -> None:
    bad = rewrite(model_path, tmp_path / "nometa.onnx", lambda p: set_meta(p, rt.METADATA_THRESHOLDS, None))
    reject(bad, "distance_thresholds")


def test_wrong_format(model_path: Path, tmp_path: Path) -> None:
    bad = rewrite(model_path, tmp_path / "v9.onnx", lambda p: set_meta(p, rt.METADATA_FORMAT, "something/9"))
    reject(bad, "something/9")


@pytest.mark.parametrize("key,value,needle", [
    (rt.METADATA_THRESHOLDS, "[1.0]", "thresholds"),
    (rt.METADATA_THRESHOLDS, "[0, 1, 1, 1]", "> 0"),
    (rt.METADATA_FEATURES, "not json", "JSON"),
    (rt.METADATA_FEATURES, '["a", "a", "b", "c", "d"]', "distinct"),
    (rt.METADATA_FEATURES, '["a", "b"]', "width"),
    (rt.METADATA_UNKNOWN_ABOVE, "-1", "positive"),
    (rt.METADATA_STATES, '["normal"]', "1 clusters"),
])
def test_inconsistent_metadata(model_path: Path, tmp_path: Path, key: str, value: str, needle: str) -> None:
    bad = rewrite(model_path, tmp_path / "inconsistent.onnx", lambda p: set_meta(p, key, value))
    reject(bad, needle)


def test_graph_not_following_contract(trained: tr.Trained, model_path: Path, tmp_path: Path) -> None:
    """A valid ONNX model of the same pipeline straight from skl2onnx, with our metadata: wrong outputs."""
    from skl2onnx import to_onnx

    proto = to_onnx(trained.pipeline, trained.X[:1], target_opset=17)
    for p in onnx.load(str(model_path)).metadata_props:
        e = proto.metadata_props.add()
        e.key, e.value = p.key, p.value
    bad = tmp_path / "plain.onnx"
    bad.write_bytes(proto.SerializeToString())
    reject(bad)
    reject(bad, "inputs are", bundled=True)  # the bundled path reads inputs and outputs from the session


@pytest.mark.parametrize("path", mm.BUNDLED, ids=lambda p: p.name)
def test_every_bundled_model_passes_every_check_and_loads_the_same_without_onnx(path: Path) -> None:
    """The agent loads bundled models without onnx (runtime.load_model): the ONNX-level checks they skip there
    run here, on every bundled file, and both paths give the same model."""
    full = load_model(path)  # every check, the sandboxed first run included
    bundled = load_model(path, bundled=True)
    assert (bundled.version, bundled.feature_names, bundled.metadata) == (full.version, full.feature_names,
                                                                          full.metadata)
    window = {name: float(i % 7) for i, name in enumerate(full.feature_names)}
    assert bundled.predict(window) == full.predict(window)


def test_loading_the_bundled_models_does_not_import_onnx() -> None:
    code = ("import json, sys\n"
            "from otel_ebpf_receiver.model.watch import best_bundled_model\n"
            "model = best_bundled_model([], lambda line: None)\n"
            "from otel_ebpf_receiver.model.runtime import load_model\n"
            "from otel_ebpf_receiver.model.watch import BUNDLED_MODEL_DIR\n"
            "versions = [load_model(p, bundled=True).version for p in sorted(BUNDLED_MODEL_DIR.glob('*.onnx'))]\n"
            "print(json.dumps([versions, sorted(m for m in sys.modules if m.split('.')[0] == 'onnx')]))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    versions, onnx_modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(versions) == len(mm.BUNDLED) and onnx_modules == []


# -- hostile files (issue 14): every refusal is a ModelError line, never another exception ---------------------


def hostile(tmp_path: Path, data: bytes, name: str = "hostile.onnx") -> Path:
    out = tmp_path / name
    out.write_bytes(data)
    return out


@pytest.mark.parametrize("key", [rt.METADATA_TRAINING, rt.METADATA_FEATURES, rt.METADATA_THRESHOLDS])
def test_deeply_nested_metadata_is_refused_not_a_recursion_error(model_path: Path, tmp_path: Path,
                                                                 key: str) -> None:
    bad = hostile(tmp_path, mm.with_metadata(model_path.read_bytes(), key, mm.deep(100_000)))
    reject(bad, key, "nested deeper")


@pytest.mark.parametrize("value", [f"[{mm.HUGE_INT}, 1, 1, 1]", "[1e999, 1, 1, 1]", "[NaN, 1, 1, 1]",
                                   "[true, 1, 1, 1]"])
def test_threshold_that_is_no_finite_float_is_refused(model_path: Path, tmp_path: Path, value: str) -> None:
    bad = hostile(tmp_path, mm.with_metadata(model_path.read_bytes(), rt.METADATA_THRESHOLDS, value))
    reject(bad, "distance_thresholds")


@pytest.mark.parametrize("key,value,needle", [
    (rt.METADATA_STATES, '["normal", "network_flood", "exec_storm", "bad\\nname"]', "cluster_states"),
    (rt.METADATA_STATES, '["normal", "network_flood", "exec_storm", "\\u001b[31mred"]', "cluster_states"),
    (rt.METADATA_STATES, '["normal", "network_flood", "exec_storm", "Upper"]', "cluster_states"),
    (rt.METADATA_STATES, '["normal", "network_flood", "exec_storm", "' + "x" * 65 + '"]', "cluster_states"),
    (rt.METADATA_STATES, '["normal", "network_flood", "exec_storm", 7]', "cluster_states"),
    (rt.METADATA_VERSION, "v1\nINFO fake log line", "model_version"),
    (rt.METADATA_VERSION, "v1\x1b[2J", "model_version"),
    (rt.METADATA_VERSION, "v" * 129, "model_version"),
    (rt.METADATA_VERSION, "ünïcode", "model_version"),
    (rt.METADATA_ALGORITHM, "kmeans\n", "algorithm"),
    (rt.METADATA_FEATURES, json.dumps([*NAMES[:-1], "xdp.\u001b[0m"]), "feature_names"),
    (rt.METADATA_TRAINING, '{"created": "\\u001b[2J"}', "control characters"),
    (rt.METADATA_PERCENTILE, "101", "percentile"),
    (rt.METADATA_ATTACK_STATES, '["syn_flood"]', "attack_states"),
    (rt.METADATA_ATTACK_STATES, '["unknown"]', "attack_states"),
    (rt.METADATA_ATTACK_STATES, '["network_flood", "network_flood"]', "attack_states"),
])
def test_free_text_fields_are_validated(model_path: Path, tmp_path: Path, key: str, value: str,
                                        needle: str) -> None:
    err = reject(hostile(tmp_path, mm.with_metadata(model_path.read_bytes(), key, value)), needle)
    assert str(err).isprintable()


def test_attack_states_are_declared_explicitly_or_by_the_bundle(model_path: Path, tmp_path: Path) -> None:
    assert load_model(model_path, NAMES).attack_states == frozenset()  # names a network_flood cluster, declares none
    declared = hostile(tmp_path, mm.with_metadata(model_path.read_bytes(), rt.METADATA_ATTACK_STATES,
                                                              '["network_flood"]'))
    assert load_model(declared, NAMES).attack_states == {"network_flood"}
    bundled = load_model(mm.BUNDLED[0], bundled=True)
    assert bundled.attack_states == set(bundled.cluster_states) - {"unknown"}


@pytest.mark.parametrize("op", ["Loop", "ConstantOfShape", "Expand", "If"])
def test_operators_outside_the_allowlist_are_refused_by_name(model_path: Path, tmp_path: Path, op: str) -> None:
    reject(hostile(tmp_path, mm.with_operator(model_path.read_bytes(), op)), f"operator {op!r}")


@pytest.mark.parametrize("where", ["initializer", "function", "training_info", "sparse_attribute"])
def test_external_data_is_found_everywhere(model_path: Path, tmp_path: Path, where: str) -> None:
    reject(hostile(tmp_path, mm.external_in(model_path.read_bytes(), where)), "external data")


def test_tensors_declaring_more_than_they_hold_are_refused(model_path: Path, tmp_path: Path) -> None:
    def huge(p) -> None:  # type: ignore[no-untyped-def]
        p.graph.initializer.append(mm.empty_tensor("huge", [1 << 20, 1 << 20]))
    reject(rewrite(model_path, tmp_path / "huge.onnx", huge), "elements")

    def sparse(p) -> None:  # type: ignore[no-untyped-def]
        values = onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [1.0])
        indices = onnx.helper.make_tensor("i", onnx.TensorProto.INT64, [1], [0])
        p.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, [1 << 31, 1 << 20]))
    reject(rewrite(model_path, tmp_path / "sparse.onnx", sparse), "sparse")


def test_probe_vectors_catch_a_label_out_of_range_at_load(model_path: Path, tmp_path: Path) -> None:
    """A graph fine on the zero vector (the only load-time check before) but out of range on the large one."""
    m = load_model(model_path, NAMES)
    zero_cluster = m.predict_vector(rt.probe_vectors(len(NAMES))[0][1]).cluster
    large_cluster = m.predict_vector(dict(rt.probe_vectors(len(NAMES)))["large"]).cluster
    assert zero_cluster != large_cluster
    bad = hostile(tmp_path, mm.relabel(model_path.read_bytes(), {large_cluster: 99}))
    reject(bad, "large vector", "label 99")


def centre_window(m: rt.StateModel, data: bytes, cluster: int) -> dict[str, float]:
    """The raw feature values at a cluster's centre, read from the graph (Scaler attributes, centres tensor)."""
    from onnx import numpy_helper

    proto = mm.load(data)
    scaler = next(n for n in proto.graph.node if n.op_type == "Scaler")
    attrs = {a.name: np.array(a.floats) for a in scaler.attribute}
    gather = next(n for n in proto.graph.node if n.op_type == "Gather")
    centres = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == gather.input[0])
    raw = centres[cluster] / attrs["scale"] + attrs["offset"]
    return dict(zip(m.feature_names, raw.tolist()))


def test_label_out_of_range_on_a_real_window_is_unknown_not_a_crash(tmp_path: Path) -> None:
    """A cluster no probe vector reaches is relabelled out of range: the file loads, and the windows that land
    there are reported unknown with the fault said, instead of an IndexError in the agent's window."""
    data = mm.BUNDLED[0].read_bytes()
    good = load_model(mm.BUNDLED[0], bundled=True)
    reached = {good.predict_vector(x).cluster for _, x in rt.probe_vectors(len(good.feature_names))}
    victim = next(c for c in range(len(good.cluster_states)) if c not in reached)
    m = load_model(hostile(tmp_path, mm.relabel(data, {victim: len(good.cluster_states) + 3})))
    window = centre_window(good, data, victim)
    assert good.predict(window).cluster == victim
    verdict = m.predict(window)
    assert verdict.state == "unknown" and verdict.cluster == -1
    assert "outside" in verdict.fault and m.faults == 1


class StubSession:
    """Stands in for onnxruntime: returns what a broken graph could."""

    def __init__(self, outputs) -> None:  # type: ignore[no-untyped-def]
        self.outputs = outputs

    def get_inputs(self):  # type: ignore[no-untyped-def]
        return [type("Input", (), {"name": "features"})()]

    def run(self, names, feeds):  # type: ignore[no-untyped-def]
        if isinstance(self.outputs, Exception):
            raise self.outputs
        return self.outputs


@pytest.mark.parametrize("outputs,needle", [
    ([np.array([9]), np.zeros((1, 4), np.float32), np.zeros((1, 5), np.float32)], "outside"),
    ([np.array([-1]), np.zeros((1, 4), np.float32), np.zeros((1, 5), np.float32)], "outside"),
    ([np.array([0]), np.full((1, 4), np.nan, np.float32), np.zeros((1, 5), np.float32)], "NaN"),
    ([np.array([0]), np.zeros((1, 4), np.float32), np.full((1, 5), np.nan, np.float32)], "NaN"),
    ([np.array([0]), np.zeros((1, 3), np.float32), np.zeros((1, 5), np.float32)], "shape"),
    ([np.array([0, 1]), np.zeros((2, 4), np.float32), np.zeros((2, 5), np.float32)], "shape"),
    ([np.array([0.5]), np.zeros((1, 4), np.float32), np.zeros((1, 5), np.float32)], "type"),
    ([np.array([0]), np.array([[-1.0, 0, 0, 0]], np.float32), np.zeros((1, 5), np.float32)], "negative"),
    ([[0], {"a": 1}, None], "not tensors"),
    (RuntimeError("onnxruntime: bad index"), "inference failed"),
])
def test_predict_never_raises_on_bad_outputs(model_path: Path, outputs: object, needle: str) -> None:
    m = load_model(model_path, NAMES)
    m._session = StubSession(outputs)
    verdict = m.predict({NAMES[0]: 1.0})
    assert verdict.state == verdict.raw_state == "unknown" and needle in verdict.fault, verdict
    assert "\n" not in verdict.fault


def test_infinite_distance_is_unknown_without_a_fault(model_path: Path) -> None:
    m = load_model(model_path, NAMES)
    m._session = StubSession([np.array([0]), np.full((1, 4), np.inf, np.float32), np.zeros((1, 5), np.float32)])
    verdict = m.predict({})
    assert verdict.state == "unknown" and verdict.fault == "" and verdict.nearest_state == m.cluster_states[0]
