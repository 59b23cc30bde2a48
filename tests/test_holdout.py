"""Held-out evaluation (model_export/lab/holdout.py) and the per-metric two-means baseline (model_export/baseline.py):
the split never trains on a held-out window, the baseline flags what it should on a synthetic series, the debounce
counts alarms as the agent would, and the whole evaluation runs offline on a small synthetic recording in which one
family moves only 3 of 40 features — found held out only with the novelty check. No root."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from model_export import train as tr
from model_export.baseline import TwoMeansBaseline, lagged, preprocess
from model_export.lab import holdout, holdout_table
from model_export.lab.cli import main as lab_main
from model_export.synthetic import make_windows
from model_export.windows import WindowTable, WindowWriter

NAMES = tuple(f"syscalls.f{i:02d}" for i in range(40))


def write(path: Path, table: WindowTable) -> Path:
    with WindowWriter(str(path), table.names) as writer:
        for timestamp, label, row in zip(table.timestamps, table.labels, table.values):
            writer.write(float(timestamp), label, dict(zip(table.names, row.tolist())))
    return path


def recording(seed: int = 5, move: float = 1.0) -> WindowTable:
    """normal, two incidents, normal again (4 runs, 3 s gaps as the lab's drain), and a family ``subtle`` that
    moves 3 of 40 features by ``move`` benign ranges."""
    blocks = []
    start = 1_700_000_000.0
    for states in (("normal",), ("exec_storm",), ("file_open_storm",), ("subtle",), ("normal",)):
        part = make_windows(NAMES, ("normal", "exec_storm", "file_open_storm") if states[0] != "subtle"
                            else ("normal",), per_state=120, seed=seed, start=start)
        keep = part.labels == states[0] if states[0] != "subtle" else np.ones(len(part), dtype=bool)
        values = part.values[keep]
        if states[0] == "subtle":
            span = np.ptp(values, axis=0)
            values = values.copy()
            values[:, [4, 20, 33]] += move * span[[4, 20, 33]]
        n = len(values)
        blocks.append(WindowTable(NAMES, start + np.arange(n, dtype=np.float64),
                                  np.array([states[0]] * n, dtype=object), values))
        start += n + 3.0
    return WindowTable(NAMES, np.concatenate([b.timestamps for b in blocks]),
                       np.concatenate([b.labels for b in blocks]), np.concatenate([b.values for b in blocks]))


def test_no_held_out_window_is_ever_trained_on(tmp_path: Path) -> None:
    main = write(tmp_path / "main.csv", recording())
    extra = write(tmp_path / "benign.csv", make_windows(NAMES, ("normal",), per_state=30, start=1_800_000_000.0))
    split = holdout.load_split(str(main), [str(extra)])
    labels = split.table.labels
    assert split.families == ["exec_storm", "file_open_storm", "subtle"]
    assert split.extra_benign.sum() == 30 and not (split.extra_benign & split.held_benign).any()
    # the last quarter of each benign run, and only benign windows
    for run in np.unique(split.runs[~split.extra_benign & (labels == "normal")]):
        idx = np.flatnonzero(split.runs == run)
        held = split.held_benign[idx]
        assert held.sum() == math.ceil(0.25 * len(idx)) and held[-1] and not held[0]
        assert split.table.timestamps[idx][held].min() > split.table.timestamps[idx][~held].max()
    assert (labels[split.held_benign] == "normal").all()
    for family in [None, *split.families]:
        train = split.training(family)
        assert not (train & (split.held_benign | split.extra_benign)).any()
        if family:
            assert not (train & (labels == family)).any()
            assert all((train & (labels == other)).any() for other in split.families if other != family)


def test_benign_recordings_must_be_benign_and_match(tmp_path: Path) -> None:
    main = write(tmp_path / "main.csv", recording())
    attack = write(tmp_path / "attack.csv", make_windows(NAMES, ("exec_storm",), per_state=5))
    with pytest.raises(ValueError, match="only windows labelled"):
        holdout.load_split(str(main), [str(attack)])
    other = write(tmp_path / "other.csv", make_windows(("exec.other",), ("normal",), per_state=5))
    with pytest.raises(ValueError, match="lacks feature"):
        holdout.load_split(str(main), [str(other)])


def test_lags_stay_within_a_run() -> None:
    values = np.arange(6, dtype=np.float64)[:, None]
    runs = np.array([0, 0, 0, 1, 1, 1])
    v = lagged(values, runs, 2)[:, 0, :]
    assert v.tolist() == [[0, 0, 0], [1, 0, 0], [2, 1, 0], [3, 3, 3], [4, 3, 3], [5, 4, 3]]
    # a run id that comes back after another is a new run: nothing is borrowed across the one in between
    v = lagged(values, np.array([0, 0, 1, 0, 0, 0]), 2)[:, 0, :]
    assert v.tolist() == [[0, 0, 0], [1, 0, 0], [2, 2, 2], [3, 3, 3], [4, 3, 3], [5, 4, 3]]
    # Netdata's differencing and smoothing look back within the run too
    x = np.array([1.0, 3.0, 6.0, 10.0, 20.0, 31.0])[:, None]
    assert preprocess(x, runs, diff=1)[:, 0].tolist() == [0, 2, 3, 0, 10, 11]
    assert preprocess(x, runs, diff=1, smooth=2)[:, 0].tolist() == [0, 1, 2.5, 0, 5, 10.5]


def test_the_baseline_never_lags_across_a_scenario_boundary() -> None:
    """A benign scenario starts right after a flood (different label, no gap): its first windows are benign and
    must not be flagged for what the flood did in the seconds before it."""
    rng = np.random.default_rng(3)
    n = 60
    benign = lambda: rng.normal(5.0, 0.2, (n, 40))  # noqa: E731
    flood = rng.normal(5.0, 0.2, (n, 40))
    flood[:, :8] += 40.0
    values = np.concatenate([benign(), flood, benign()])
    labels = np.array(["normal"] * n + ["syn_flood"] * n + ["normal"] * n, dtype=object)
    table = WindowTable(NAMES, 1_700_000_000.0 + np.arange(3 * n, dtype=np.float64), labels, values)
    runs = tr.segments(table)
    assert len(np.unique(runs)) == 3
    model = TwoMeansBaseline().fit(values[:n], runs[:n])
    bits = model.bits(values, runs)
    assert bits[n:2 * n, :8].all()                 # the flood: its 8 features, every window
    assert not bits[2 * n:2 * n + 3, :8].any()     # the next scenario's first windows: lags from itself only
    # the same windows as one run (lags across the boundary) would have flagged them
    assert model.bits(values, np.zeros(3 * n, dtype=int))[2 * n:2 * n + 2, :8].any()


def test_the_baseline_flags_a_large_move_in_a_few_features_and_not_a_benign_window() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(5.0, 0.2, (600, 40))
    model = TwoMeansBaseline().fit(train, np.zeros(600, dtype=int))
    assert model.min_features_ == 1                # 1 % of 40 features: one bit flags a window
    typical = np.repeat(np.median(train, axis=0)[None, :], 6, axis=0)   # benign: the middle of its training
    moved = typical.copy()
    moved[3:, [4, 20, 33]] += 3.0                  # 15 standard deviations in 3 of 40 features, from window 3
    runs = np.zeros(6, dtype=int)
    assert not model.flags(typical, runs).any() and model.anomaly_rate(typical, runs).max() == 0
    assert model.flags(moved, runs).tolist() == [False, False, False, True, True, True]
    assert set(np.flatnonzero(model.bits(moved, runs)[3:].any(axis=0))) == {4, 20, 33}
    assert model.anomaly_rate(moved, runs)[3] == pytest.approx(3 / 40)
    # the thresholds are the user's: at 10 % of the features (4 of 40), 3 moved features no longer flag
    strict = TwoMeansBaseline(share=0.10).fit(train, np.zeros(600, dtype=int))
    assert strict.min_features_ == 4 and not strict.flags(moved, runs).any()
    with pytest.raises(ValueError, match="percentile"):
        TwoMeansBaseline(percentile=0).fit(train, np.zeros(600, dtype=int))


def test_the_baseline_flags_a_spike_in_one_metric_of_forty() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(5.0, 0.2, (600, 40))
    model = TwoMeansBaseline().fit(train, np.zeros(600, dtype=int))
    benign = rng.normal(5.0, 0.2, (400, 40))
    flags = model.flags(benign, np.zeros(400, dtype=int))
    # 40 metrics each beyond its p99 1 % of the time, any one flags: about 1 - 0.99^40 = 33 % of benign windows
    assert 0.1 < flags.mean() < 0.6
    spiked = benign.copy()
    spiked[200:210, 7] += 5.0
    bits = model.bits(spiked, np.zeros(400, dtype=int))
    assert bits[200:210, 7].all() and model.flags(spiked, np.zeros(400, dtype=int))[200:210].all()
    # one metric of forty is 2.5 %: below a 5 % share the spike alone no longer flags
    strict = TwoMeansBaseline(share=0.05).fit(train, np.zeros(600, dtype=int))
    assert not strict.flags(np.full((3, 40), 5.0) + np.eye(3, 40) * 5.0, np.arange(3)).any()


def test_a_metric_constant_in_training_flags_any_change() -> None:
    train = np.full((50, 2), 1.0)
    train[:, 1] = np.linspace(0, 1, 50)
    model = TwoMeansBaseline().fit(train, np.zeros(50, dtype=int))
    assert model.thresholds_[0] == 0.0 and len(model.centres_[0]) == 1
    assert model.bits(np.array([[1.0, 0.5], [1.01, 0.5]]), np.array([0, 1]))[:, 0].tolist() == [False, True]


def test_debounced_alarms_count_like_the_agent() -> None:
    states = np.array(["normal", "unknown", "normal", "normal", "unknown", "unknown", "unknown", "normal"],
                      dtype=object)
    assert holdout.debounced_alarms(states, np.zeros(len(states), dtype=int)) == 1
    # a run boundary restarts the debounce: one unknown at the end of a run and one at the start of the next
    assert holdout.debounced_alarms(np.array(["normal", "unknown", "unknown", "normal"], dtype=object),
                                    np.array([0, 0, 1, 1])) == 0


def test_the_margin_is_the_smallest_that_clears_what_a_margin_can_clear() -> None:
    assert holdout.chosen_margin({0.0: 8, 0.5: 0, 1.0: 0}, base=0) == 0.5
    # two windows beyond their bound at every margin: the margin stops where widening stops helping
    assert holdout.chosen_margin({0.0: 8, 0.25: 3, 0.5: 2, 1.0: 2, 4.0: 2}, base=0) == 0.5
    assert holdout.chosen_margin({0.0: 4, 0.5: 3, 1.0: 1}, base=1) == 1.0   # the distance alone flags one


def test_reported_states_are_debounced_per_run_like_the_agent() -> None:
    states = np.array(["normal", "unknown", "normal", "syn_flood", "syn_flood", "normal", "normal", "normal",
                       "unknown", "unknown"], dtype=object)
    runs = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    out = holdout.reported(states, runs, np.ones(len(states), dtype=bool))
    # one window is noise; two in a row enter; three normal windows to leave; a new run starts from normal
    assert out.tolist() == ["normal", "normal", "normal", "normal", "syn_flood", "syn_flood", "syn_flood",
                            "normal", "normal", "unknown"]
    # windows outside the mask keep their state and do not count towards the debounce
    masked = np.array([True, False, True, True, True, True, True, True, True, True])
    assert holdout.reported(states, runs, masked)[1] == "unknown"


def test_held_out_evaluation_end_to_end(tmp_path: Path) -> None:
    main = write(tmp_path / "main.csv", recording())
    split = holdout.load_split(str(main))
    reference = tr.export(tr.fit(recording(), tr.TrainConfig(clusters=4)), tmp_path / "ref.onnx").model
    result = holdout.evaluate(split, margin=0.25, say=lambda _line: None, reference=reference)
    subtle = result["families"]["subtle"]
    # the whole-vector distance dilutes 3 moved features of 40; the benign bounds do not
    assert subtle["held_out_distance"] < 0.5 and subtle["held_out_novelty"] > 0.9
    for family in ("exec_storm", "file_open_storm"):
        row = result["families"][family]
        assert row["in_sample_named_distance"] > 0.9 and row["held_out_novelty"] > 0.9
    assert result["benign"]["hold-out of the main recording (calibration)"]["windows"] == split.held_benign.sum()
    text = holdout_table.markdown(result, "main.csv")
    assert "| subtle | 120 |" in text and "bundled network.onnx" in text
    # the baseline side by side: per family, overall, and on benign time
    header = next(line for line in text.splitlines() if line.startswith("| family |"))
    assert ("held-out not normal (+novelty) | held-out not normal (reported) | baseline not normal |" in header
            and "F1 baseline" in header)
    assert "| two-means baseline | 360 |" in text and "| product: model + novelty check | 360 |" in text
    assert "| product as the agent reports it (debounced) | 360 |" in text
    assert "baseline raw all / worst" in text and "at precision >= 0.99, as reported: **" in text
    assert "window flagged at >= 1 % of the features (>= 1 of 40)" in text
    base = result["overall"]["baseline"]
    assert base["tp"] == sum(round(r["held_out_baseline"] * r["windows"]) for r in result["families"].values())
    assert base["negatives"] == 3 * split.held_benign.sum() and result["baseline"]["fits"] == 1
    assert result["families"]["subtle"]["held_out_baseline"] > 0.9   # 3 features moved a benign range: bits
    best_base = max(base["f1"], result["overall"]["baseline_reported"]["f1"])
    for view in ("novelty", "reported"):
        product = result["overall"][view]
        assert result["beats_baseline"][view] == (product["precision"] >= 0.99 and product["f1"] > best_base)
    # as reported: the debounce drops each incident run's first window, and nothing is found that was not flagged
    for family in ("exec_storm", "file_open_storm", "subtle"):
        row = result["families"][family]
        assert row["held_out_novelty"] - 1.5 / row["windows"] <= row["held_out_reported"] <= row["held_out_novelty"]
    assert result["families"]["exec_storm"]["bundled_named"] > 0.9   # a model trained on it, scored beside


def test_the_cli_says_one_line_for_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("not,a,recording\n1,2,3\n")
    assert lab_main(["holdout", "--windows", str(bad)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: lab:") and "\n" not in err
    assert lab_main(["holdout", "--windows", str(tmp_path / "missing.csv")]) != 0
    assert "\n" not in capsys.readouterr().err.strip()
    main = write(tmp_path / "main.csv", recording())
    assert lab_main(["holdout", "--windows", str(main), "--baseline-rate", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert "baseline share must be in (0, 1]" in err and "\n" not in err


def test_segments_split_runs_as_the_lab_records_them() -> None:
    table = recording()
    assert len(np.unique(tr.segments(table))) == 5
