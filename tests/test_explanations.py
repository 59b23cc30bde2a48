"""Explanations (model/contract.py, "Explanations"): a window that is not normal is explained by each feature's
signed share of its distance to the nearest normal cluster (``normal_deviation``), not by how it differs from the
centre of the cluster it was assigned to. The math on tiny hand-built models (kmeans: exact; gmm: sqrt(P_ii)), old
files without the output keep today's behaviour, the checks refuse a broken output, and the bundled models explain
a SYN flood by a SYN/packet feature and a failing API by an HTTP feature — in the verdict, the state-change event
and the incident span."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from model_export import onnx_graph as og
from model_export.train import TrainError
from model_export.upgrade import upgrade
from otel_ebpf_receiver.features import FeatureWindow
from otel_ebpf_receiver.model import ModelError, contract, load_model
from otel_ebpf_receiver.model.runtime import EXPLAINED_FROM_BOUNDS, EXPLAINED_FROM_CLUSTER, EXPLAINED_FROM_NORMAL
from otel_ebpf_receiver.model.watch import BUNDLED_MODEL_DIR
from otel_ebpf_receiver.state.classifier import EVENT_STATE_CHANGE, StateClassifier
from otel_ebpf_receiver.telemetry import Telemetry

NAMES = ("net.syn_rate", "cpu.busy")
SCALER_MEAN = np.array([10.0, 100.0])
SCALER_SCALE = np.array([2.0, 10.0])        # z = (x - mean) / scale
STATES = ["normal", "normal", "syn_flood", "exec_storm"]
CENTRES = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 6.0], [-5.0, -5.0]])   # in the scaled space


def raw(z) -> dict[str, float]:
    """The raw window whose scaled value is ``z``."""
    return dict(zip(NAMES, (np.asarray(z) * SCALER_SCALE + SCALER_MEAN).tolist()))


def hand_scaler():
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    scaler.mean_, scaler.scale_, scaler.var_ = SCALER_MEAN, SCALER_SCALE, SCALER_SCALE ** 2
    scaler.n_features_in_, scaler.n_samples_seen_ = 2, 100
    return scaler


def hand_kmeans():
    from sklearn.cluster import KMeans
    from sklearn.pipeline import Pipeline

    km = KMeans(n_clusters=len(CENTRES))
    km.cluster_centers_ = CENTRES.copy()
    km.n_features_in_ = 2
    return Pipeline([("scale", hand_scaler()), ("cluster", km)])


def hand_gmm(covariance_type: str, covariances: np.ndarray):
    from sklearn.mixture import GaussianMixture
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky
    from sklearn.pipeline import Pipeline

    gmm = GaussianMixture(n_components=len(CENTRES), covariance_type=covariance_type)
    gmm.means_, gmm.weights_ = CENTRES.copy(), np.full(len(CENTRES), 1 / len(CENTRES))
    gmm.covariances_ = covariances
    gmm.precisions_cholesky_ = _compute_precision_cholesky(covariances, covariance_type)
    gmm.n_features_in_ = 2
    return Pipeline([("scale", hand_scaler()), ("cluster", gmm)])


def write(tmp_path: Path, pipeline, algorithm: str, states: list[str] | None, name: str = "m.onnx",
          thresholds: float = 1.0) -> Path:
    """The pipeline as a model file (metadata by hand); ``states=None`` exports it without normal_deviation."""
    proto = og.build_onnx(pipeline, len(NAMES), states)
    meta = {
        contract.METADATA_FORMAT: contract.MODEL_FORMAT, contract.METADATA_VERSION: f"hand-{algorithm}",
        contract.METADATA_ALGORITHM: algorithm, contract.METADATA_FEATURES: json.dumps(list(NAMES)),
        contract.METADATA_STATES: json.dumps(STATES), contract.METADATA_DISTANCE: og.DISTANCE_KIND[algorithm],
        contract.METADATA_THRESHOLDS: json.dumps([thresholds] * len(STATES)),
        contract.METADATA_PERCENTILE: "99", contract.METADATA_UNKNOWN_ABOVE: "2.5", contract.METADATA_TRAINING: "{}",
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = tmp_path / name
    path.write_bytes(proto.SerializeToString())
    return path


# -- the math, by hand --------------------------------------------------------------------------------------------

def test_kmeans_explains_by_the_distance_to_the_nearest_normal_centre(tmp_path: Path) -> None:
    model = load_model(write(tmp_path, hand_kmeans(), "kmeans", STATES), None)
    assert model.explains_from_normal
    # z = (2.5, 6.0): nearest cluster syn_flood (0, 6), 2.5 away; nearest NORMAL centre is (4, 0) (6.18 < 6.50)
    v = model.predict(raw([2.5, 6.0]))
    assert v.state == "syn_flood" and v.explained_from == EXPLAINED_FROM_NORMAL
    assert [n for n, _ in v.top_features] == ["net.syn_rate", "cpu.busy"][::-1]  # cpu.busy first: +6 above normal
    (first, up), (second, down) = v.top_features
    assert up == pytest.approx(6.0, abs=1e-5) and down == pytest.approx(-1.5, abs=1e-5)   # signed: below normal
    # the squares are the terms of the squared distance to that normal centre, exactly
    distances = model.run(np.array([[2.5 * 2 + 10, 6.0 * 10 + 100]], dtype=np.float32))[1][0]
    assert up ** 2 + down ** 2 == pytest.approx(min(distances[0], distances[1]) ** 2, rel=1e-5)
    # what the old explanation said: the deviation from the syn_flood centre, (2.5, 0) — net.syn_rate first
    assert model.run(np.array([[15.0, 160.0]], dtype=np.float32))[2][0] == pytest.approx([2.5, 0.0], abs=1e-5)


def test_a_normal_window_is_explained_from_its_own_centre_and_unknown_from_normal(tmp_path: Path) -> None:
    model = load_model(write(tmp_path, hand_kmeans(), "kmeans", STATES), None)
    v = model.predict(raw([4.3, 0.2]))
    assert v.state == "normal" and v.explained_from == EXPLAINED_FROM_CLUSTER
    assert v.top_features[0][0] == "net.syn_rate" and v.top_features[0][1] == pytest.approx(0.3, abs=1e-5)
    # far from everything: unknown (score > 2.5), explained from the nearest normal centre (0, 0), not from
    # exec_storm (-5, -5), the nearest cluster
    v = model.predict(raw([-20.0, 3.0]))
    assert v.state == "unknown" and v.nearest_state == "exec_storm" and v.explained_from == EXPLAINED_FROM_NORMAL
    assert v.top_features == [("net.syn_rate", pytest.approx(-20.0, abs=1e-4)),
                              ("cpu.busy", pytest.approx(3.0, abs=1e-4))]


def test_gmm_weighs_each_feature_by_the_normal_components_precision(tmp_path: Path) -> None:
    # diag: normal components have std (1, 4) in the scaled space; exact Mahalanobis terms (z_i - mu_i) / sigma_i
    variances = np.array([[1.0, 16.0], [1.0, 16.0], [0.25, 0.25], [0.25, 0.25]])
    model = load_model(write(tmp_path, hand_gmm("diag", variances), "gmm", STATES), None)
    x = np.array([[1.0, 4.0]])        # Mahalanobis² to (0,0): 1 + 1 = 2; to (4,0): 9 + 1 = 10 → component 0
    out = model.run_all(np.asarray([list(raw(x[0]).values())], dtype=np.float32))
    assert out[3][0] == pytest.approx([1.0, 1.0], abs=1e-5)   # the raw difference (1, 4), each in its own σ
    assert float((out[3][0] ** 2).sum()) == pytest.approx(float(out[1][0][0]) ** 2, rel=1e-5)
    assert out[2][0].tolist() != pytest.approx(out[3][0].tolist())   # not what deviation says
    # full covariance: the documented approximation (z_i - mu_i)·sqrt(P_ii), against numpy
    full = np.array([[[1.0, 0.6], [0.6, 4.0]]] * 2 + [np.eye(2) * 0.25] * 2)
    pipeline = hand_gmm("full", full)
    model = load_model(write(tmp_path, pipeline, "gmm", STATES, "full.onnx"), None)
    X = np.array([[1.0, 4.0], [3.0, -2.0], [0.5, 6.0]]) * SCALER_SCALE + SCALER_MEAN
    got = model.run_all(X.astype(np.float32))[3]
    expected = og.reference_normal_deviation(pipeline, X, STATES)
    precision = np.linalg.inv(full[0])
    assert expected[0] == pytest.approx(np.array([1.0, 4.0]) * np.sqrt(np.diag(precision)))
    np.testing.assert_allclose(got, expected, rtol=og.RTOL, atol=og.ATOL)


def test_birch_explains_from_the_nearest_normal_subcluster(tmp_path: Path) -> None:
    from sklearn.cluster import Birch
    from sklearn.pipeline import Pipeline

    rng = np.random.default_rng(3)
    Z = np.vstack([c + rng.normal(0, 0.1, (40, 2)) for c in CENTRES])
    birch = Birch(n_clusters=None, threshold=0.5).fit(Z)
    subcluster_state = [STATES[int(np.argmin(((CENTRES - c) ** 2).sum(axis=1)))] for c in birch.subcluster_centers_]
    states = sorted(set(subcluster_state))
    birch.subcluster_labels_ = np.array([states.index(s) for s in subcluster_state])
    pipeline = Pipeline([("scale", hand_scaler()), ("cluster", birch)])
    proto = og.build_onnx(pipeline, 2, states)
    X = (np.array([[2.5, 6.0], [-20.0, 3.0], [4.1, 0.1]]) * SCALER_SCALE + SCALER_MEAN).astype(np.float32)
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run([contract.OUTPUT_NORMAL_DEVIATION], {contract.INPUT_NAME: X})[0]
    np.testing.assert_allclose(got, og.reference_normal_deviation(pipeline, X, states), rtol=og.RTOL, atol=og.ATOL)
    assert got[0] == pytest.approx([2.5 - 4.0, 6.0], abs=0.1)   # from the normal subclusters near (4, 0)


# -- old files and hostile ones -----------------------------------------------------------------------------------

def test_a_model_without_the_output_keeps_todays_explanation(tmp_path: Path) -> None:
    model = load_model(write(tmp_path, hand_kmeans(), "kmeans", None), None)
    assert not model.explains_from_normal and model.describe()["explanations"] == EXPLAINED_FROM_CLUSTER
    v = model.predict(raw([2.5, 6.0]))
    assert v.state == "syn_flood" and v.explained_from == EXPLAINED_FROM_CLUSTER
    assert v.top_features[0] == ("net.syn_rate", pytest.approx(2.5, abs=1e-5))
    # and one without a normal cluster at all gets no such output
    assert contract.OUTPUT_NORMAL_DEVIATION not in [
        o.name for o in og.build_onnx(hand_kmeans(), 2, ["a", "b", "c", "d"]).graph.output]


def test_upgrade_adds_the_output_and_changes_nothing_else(tmp_path: Path) -> None:
    old = write(tmp_path, hand_kmeans(), "kmeans", None, "old.onnx")
    model = upgrade(old, tmp_path / "new.onnx")
    assert model.explains_from_normal and model.version == load_model(old, None).version
    v = model.predict(raw([2.5, 6.0]))
    assert v.top_features[0] == ("cpu.busy", pytest.approx(6.0, abs=1e-5))
    with pytest.raises(TrainError, match="already has normal_deviation"):
        upgrade(tmp_path / "new.onnx", tmp_path / "again.onnx")
    with pytest.raises(TrainError, match="only kmeans"):
        upgrade(write(tmp_path, hand_gmm("diag", np.ones((4, 2))), "gmm", None, "g.onnx"), tmp_path / "g2.onnx")


@pytest.mark.parametrize("damage,message", [
    ("nan", "normal_deviation holds NaN"),
    ("width", "output 'normal_deviation' is declared with"),
    ("int", "output 'normal_deviation' is not a float32 tensor"),
])
def test_the_checks_refuse_a_broken_normal_deviation(tmp_path: Path, damage: str, message: str) -> None:
    proto = onnx.load(str(BUNDLED_MODEL_DIR / "core.onnx"))
    if damage == "nan":
        t = next(t for t in proto.graph.initializer if t.name == "normal_dev_centres")
        t.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(t).shape, np.nan, np.float32), t.name))
    else:
        out = next(o for o in proto.graph.output if o.name == contract.OUTPUT_NORMAL_DEVIATION)
        if damage == "width":
            out.type.tensor_type.shape.dim[1].dim_value = 3
        else:
            out.type.tensor_type.elem_type = onnx.TensorProto.INT64
    path = tmp_path / "broken.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelError) as caught:
        load_model(path, None)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# -- the bundled models: a SYN flood and a failing API ------------------------------------------------------------

def centre_windows(model_file: Path) -> list[tuple[str, dict[str, float]]]:
    """(state, raw window) at each cluster centre: the mean of the recorded lab windows that cluster holds."""
    proto = onnx.load(str(model_file))
    names = json.loads(next(p.value for p in proto.metadata_props if p.key == "feature_names"))
    states = json.loads(next(p.value for p in proto.metadata_props if p.key == "cluster_states"))
    scaler = next(n for n in proto.graph.node if n.op_type == "Scaler")
    attrs = {a.name: np.array(a.floats) for a in scaler.attribute}
    gather = next(n for n in proto.graph.node if n.op_type == "Gather")
    centres = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == gather.input[0])
    return [(s, dict(zip(names, (c / attrs["scale"] + attrs["offset"]).tolist()))) for s, c in zip(states, centres)]


NETWORK = BUNDLED_MODEL_DIR / "network.onnx"
DEFAULT = BUNDLED_MODEL_DIR / "default.onnx"
SYN_OR_PACKET = ("tcp.", "xdp.")


def jittered(window: dict[str, float], seed: int) -> dict[str, float]:
    """The window moved a little, never below zero where it was not: no rate or share is negative, and a negative
    one lies outside the benign bounds (a share of -0.05 read as beyond http.server_error_share's bound)."""
    rng = np.random.default_rng(seed)
    moved = {n: v + float(rng.normal(0, 0.05)) for n, v in window.items()}
    return {n: max(m, 0.0) if window[n] >= 0 else m for n, m in moved.items()}


def windows_of(state: str) -> list[dict[str, float]]:
    centres = [w for s, w in centre_windows(NETWORK) if s == state]
    assert centres, state
    return [w for c in centres for w in (c, *(jittered(c, seed) for seed in range(5)))]


@pytest.fixture(scope="module")
def network():
    return load_model(NETWORK, None, bundled=True)


@pytest.fixture(scope="module")
def default():
    return load_model(DEFAULT, None, bundled=True)


def test_bundled_models_carry_the_explanation_output(network, default) -> None:
    assert network.explains_from_normal and default.explains_from_normal
    assert load_model(BUNDLED_MODEL_DIR / "core.onnx", None, bundled=True).explains_from_normal


def test_a_syn_flood_is_explained_by_a_syn_or_packet_feature(network) -> None:
    for window in windows_of("syn_flood"):
        v = network.predict(window)
        assert v.state == "syn_flood" and v.explained_from == EXPLAINED_FROM_NORMAL
        names = [n for n, _ in v.top_features]
        assert names[0].startswith(SYN_OR_PACKET), v.top_features
        assert v.top_features[0][1] > 0                              # above normal
        assert any(n.startswith("xdp.syn") for n in names), v.top_features


def test_an_api_incident_is_explained_by_an_http_feature(network, default) -> None:
    for model in (network, default):
        for window in windows_of("api_degraded"):
            v = model.predict(window)
            assert v.state == "api_degraded" and v.explained_from == EXPLAINED_FROM_NORMAL
            assert v.top_features[0][0].startswith("http."), v.top_features
            assert v.top_features[0][1] > 0


def test_the_default_model_explains_a_syn_flood_it_flags_by_a_tcp_feature(default) -> None:
    """The host-only model is trained without floods (rebuild.py): a SYN flood it flags is unknown, and named by
    the victim's TCP features — from the nearest normal cluster, or as beyond the benign range (feature bounds,
    model/novelty.py); one it reads as normal (the quiet-lab flood) is not explained from normal."""
    flagged = 0
    for window in windows_of("syn_flood"):
        v = default.predict(window)
        if v.state == "normal":
            assert v.explained_from == EXPLAINED_FROM_CLUSTER
            continue
        flagged += 1
        assert v.explained_from in (EXPLAINED_FROM_NORMAL, EXPLAINED_FROM_BOUNDS), v
        assert v.top_features[0][0].startswith("tcp."), v
    assert flagged >= 1


def test_the_state_change_event_and_incident_span_name_the_syn_feature(network) -> None:
    class Serving:
        model = network

        def poll(self) -> None:
            pass

    logs, spans = InMemoryLogRecordExporter(), InMemorySpanExporter()
    telemetry = Telemetry(exporter="none", log_exporter=logs, span_exporter=spans)
    classifier = StateClassifier(Serving(), telemetry, lambda line: None)
    normal = next(w for s, w in centre_windows(NETWORK) if s == "normal")
    flood = windows_of("syn_flood")[0]
    try:
        states = [classifier.classify(FeatureWindow(float(t), normal)).state for t in range(4)]
        states += [classifier.classify(FeatureWindow(float(t), flood)).state for t in range(4, 8)]
        states += [classifier.classify(FeatureWindow(float(t), normal)).state for t in range(8, 13)]
        assert states[3] == "normal" and "syn_flood" in states and states[-1] == "normal", states
        telemetry.logger_provider.force_flush()
        telemetry.tracer_provider.force_flush()
        events = [r.log_record.attributes for r in logs.get_finished_logs()
                  if r.log_record.event_name == EVENT_STATE_CHANGE]
        to_flood = next(e for e in events if e["system.state.to"] == "syn_flood")
        assert to_flood["system.state.top_feature.reference"] == EXPLAINED_FROM_NORMAL
        assert to_flood["system.state.top_feature.1"].startswith(SYN_OR_PACKET)
        back = next(e for e in events if e["system.state.to"] == "normal" and e["system.state.from"] == "syn_flood")
        assert back["system.state.top_feature.reference"] == EXPLAINED_FROM_CLUSTER
        incident = next(s for s in spans.get_finished_spans() if s.name == "system.state.incident")
        entered = next(e for e in incident.events if e.name == "system.state.transition"
                       and e.attributes["system.state.to"] == "syn_flood")
        assert entered.attributes["system.state.top_feature.1"] == to_flood["system.state.top_feature.1"]
    finally:
        classifier.close()
        telemetry.tracer_provider.shutdown()
        telemetry.logger_provider.shutdown()
        telemetry.meter_provider.shutdown()
