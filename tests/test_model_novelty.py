"""Novelty by feature (model/contract.py, "Novelty"): benign bounds in the model's metadata make a window that is
nearest a normal cluster but has a few features far out of the benign range ``unknown``, explained by those
features; a model without the bounds behaves as before; the loader refuses bounds it cannot trust.
Synthetic data, no root."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from model_export import train as tr
from model_export.bounds import benign_bounds
from model_export.synthetic import make_windows
from otel_ebpf_receiver.model import METADATA_FEATURE_BOUNDS, ModelError, load_model
from otel_ebpf_receiver.model.novelty import FeatureBounds, novelty_score
from otel_ebpf_receiver.model.runtime import EXPLAINED_FROM_BOUNDS

NAMES = tuple(f"syscalls.f{i:02d}" for i in range(40))
STATES = ("normal", "exec_storm")
MOVED = (3, 17, 31)                 # the 3 of 40 features the novel window moves


@pytest.fixture(scope="module")
def table():
    return make_windows(NAMES, STATES, per_state=200, spread=0.15, separation=3.0, seed=3)


@pytest.fixture(scope="module")
def models(table, tmp_path_factory: pytest.TempPathFactory):
    config = tr.TrainConfig(algorithm="kmeans", clusters=2, unknown_above=2.5, seed=0, bounds_margin=0.5)
    trained = tr.fit(table, config)
    assert trained.bounds is not None and trained.training["feature_bounds"]["margin"] == 0.5
    out = tmp_path_factory.mktemp("novelty")
    with_bounds = tr.export(trained, out / "bounds.onnx", version="with-bounds").model
    trained.bounds = None
    without = tr.export(trained, out / "plain.onnx", version="plain").model
    return with_bounds, without


def benign_centre(table) -> np.ndarray:
    return table.values[table.labels == "normal"].mean(axis=0)


def novel_window(table) -> np.ndarray:
    """The benign centre with 3 of 40 features moved 1.3 benign ranges up (beyond a bound at margin 0.5)."""
    benign = table.values[table.labels == "normal"]
    x = benign_centre(table).copy()
    for i in MOVED:
        x[i] += 1.3 * (benign[:, i].max() - benign[:, i].min())
    return x[None, :].astype(np.float32)


def test_three_of_forty_features_far_out_leave_normal_only_with_bounds(table, models) -> None:
    with_bounds, without = models
    x = novel_window(table)
    plain = without.predict_vector(x)
    assert plain.state == "normal", plain          # the whole-vector distance dilutes the move
    assert plain.score <= without.unknown_above
    novel = with_bounds.predict_vector(x)
    assert novel.state == "unknown" and novel.raw_state == "unknown" and novel.nearest_state == "normal"
    assert novel.score > with_bounds.unknown_above and novel.score > plain.score
    assert novel.explained_from == EXPLAINED_FROM_BOUNDS
    assert sorted(name for name, _ in novel.top_features) == sorted(NAMES[i] for i in MOVED)
    assert all(excess > 0 for _, excess in novel.top_features)
    assert with_bounds.describe()["novelty"] == "feature_bounds" and without.describe()["novelty"] == "none"


def test_benign_and_incident_windows_keep_their_state_with_bounds(table, models) -> None:
    with_bounds, without = models
    x = benign_centre(table)[None, :].astype(np.float32)
    assert with_bounds.predict_vector(x).state == "normal"
    assert with_bounds.predict_vector(x).score == pytest.approx(without.predict_vector(x).score)
    # an incident lies beyond benign bounds by definition: nearest exec_storm, it stays exec_storm
    storm = table.values[table.labels == "exec_storm"].mean(axis=0)[None, :].astype(np.float32)
    v = with_bounds.predict_vector(storm)
    assert v.state == "exec_storm" and v.explained_from != EXPLAINED_FROM_BOUNDS
    # below the low bound counts too, signed negative
    low = benign_centre(table).copy()
    benign = table.values[table.labels == "normal"]
    low[MOVED[0]] -= 3.0 * (benign[:, MOVED[0]].max() - benign[:, MOVED[0]].min())
    v = with_bounds.predict_vector(low[None, :].astype(np.float32))
    assert v.state == "unknown" and v.top_features[0][0] == NAMES[MOVED[0]] and v.top_features[0][1] < 0


def test_every_benign_training_window_is_inside_its_bounds(table) -> None:
    bounds = benign_bounds(table, margin=0.0)
    benign = table.values[table.labels == "normal"]
    assert not bounds.excess(benign.astype(np.float32)).any()
    assert bounds.excess(table.values[table.labels == "exec_storm"]).any()


def test_a_constant_benign_feature_gets_a_band_not_a_point() -> None:
    table = make_windows(("a.x", "a.y"), ("normal",), per_state=20, seed=0)
    table.values[:, 1] = 5.0
    bounds = benign_bounds(table, margin=0.0, floor=0.1)
    assert bounds.low[1] < 5.0 < bounds.high[1] and bounds.high[1] - bounds.low[1] == pytest.approx(0.1, abs=1e-3)
    FeatureBounds.from_json(bounds.to_json(), 2)   # what the exporter writes, the runtime accepts


def test_an_event_rate_never_seen_in_benign_time_allows_one_event_a_second() -> None:
    """A rate benign time never saw (0 throughout): one event a second is not novel, a burst is; a constant
    feature that is not a rate keeps the plain floor."""
    table = make_windows(("tcp.timeouts_rate_log1p", "a.share"), ("normal",), per_state=20, seed=0)
    table.values[:, :] = 0.0
    bounds = benign_bounds(table, margin=0.0, floor=0.1)
    once, burst = math.log1p(1.0), math.log1p(50.0)
    assert not bounds.excess(np.array([once, 0.0])).any()
    assert bounds.excess(np.array([burst, 0.0]))[0] > 0
    assert bounds.high[1] == pytest.approx(0.05, abs=1e-3)


def test_a_host_quieter_than_benign_time_is_not_novel_but_a_busier_one_is() -> None:
    """An event rate's low bound reaches below zero events (a quiet host reads normal, not unknown); its high side is
    the recording's, as wide as without the rule. Other features keep both sides."""
    table = make_windows(("syscalls.rate_log1p", "a.share"), ("normal",), per_state=20, seed=0)
    table.values[:, 0] = np.linspace(math.log1p(30.0), math.log1p(3000.0), len(table.values))
    table.values[:, 1] = np.linspace(0.4, 0.6, len(table.values))
    bounds = benign_bounds(table, margin=0.1)
    span = math.log1p(3000.0) - math.log1p(30.0)
    assert bounds.low[0] < 0.0 and bounds.high[0] == pytest.approx(math.log1p(3000.0) + 0.1 * span, rel=1e-4)
    assert not bounds.excess(np.array([0.0, 0.5])).any() and not bounds.excess(np.array([math.log1p(5.0), 0.5])).any()
    assert bounds.excess(np.array([math.log1p(6000.0), 0.5]))[0] > 0
    assert bounds.excess(np.array([math.log1p(300.0), 0.3]))[1] < 0


def test_bounds_need_benign_windows() -> None:
    table = make_windows(("a.x",), ("exec_storm",), per_state=5)
    with pytest.raises(ValueError, match="normal"):
        benign_bounds(table, 0.5)


def test_novelty_score_is_above_unknown_only_beyond_a_bound() -> None:
    assert novelty_score(0.0, 2.5) == 0.0
    assert novelty_score(1e-9, 2.5) > 2.5 and novelty_score(2.0, 2.5) == pytest.approx(7.5)


N = len(NAMES)


@pytest.mark.parametrize("value,needle", [
    (json.dumps({"low": [1.0] * N, "high": [0.0] * N}), "below"),
    (json.dumps({"low": [0.0] * N, "high": [0.0] * N}), "below"),
    (json.dumps({"low": [0.0] * (N - 1), "high": [1.0] * (N - 1)}), "one number per feature"),
    (json.dumps({"low": [-1e39] * N, "high": [1e39] * N}), "float32"),
    (json.dumps({"low": ["0"] * N, "high": [1.0] * N}), "finite numbers"),
    (json.dumps({"low": [False] * N, "high": [True] * N}), "finite numbers"),
    ('{"low": [NaN], "high": [1]}', "NaN"),
    (json.dumps({"low": [0.0] * N}), "exactly"),
    (json.dumps({"low": [0.0] * N, "high": [1.0] * N, "extra": 1}), "exactly"),
    (json.dumps([[0.0] * N, [1.0] * N]), "exactly"),
    ("[" * 100 + "]" * 100, "nested"),
])
def test_the_loader_refuses_hostile_bounds(models, tmp_path: Path, value: str, needle: str) -> None:
    with_bounds, _ = models
    proto = onnx.load(str(with_bounds.path))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_FEATURE_BOUNDS)
    entry.value = value
    path = tmp_path / "hostile.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelError) as info:
        load_model(path)
    text = str(info.value)
    assert "\n" not in text and METADATA_FEATURE_BOUNDS in text and needle in text, text
