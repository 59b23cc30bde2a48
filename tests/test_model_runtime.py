"""The model runtime: loading and validation (every refusal is one ModelError line), scoring, unknown state.
Synthetic data with explicit feature names: nothing here needs the probes, root or BPF."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from model_export import train as tr
from model_export.synthetic import make_windows
from otel_ebpf_receiver import model as rt
from otel_ebpf_receiver.model import ModelError, load_model

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
