"""Held-out detection (issue 13, item 1): leave one incident family out of training, and ask the model trained
without it whether that family's windows are still "not normal".

    otel-ebpf-lab holdout --windows build/model/windows.csv [--benign MORE.csv ...] [--markdown FILE.md]
                          [--baseline-rate 1] [--baseline-percentile 99]

Offline, on a recording of the training plan (``otel-ebpf-lab record`` or the one ``make model`` leaves in
build/model/windows.csv); no root, no lab. For each family F (every recorded label but ``normal``):

1. the training windows are the recording minus F's windows minus the benign hold-out: the last
   :data:`BENIGN_TAIL` of every benign run (each benign scenario's last quarter, never trained on by any model
   here), plus every window of the ``--benign`` recordings;
2. the model is trained exactly as ``network.onnx`` is (model_export.lab.rebuild: its recipe and its ``fit``),
   exported to ONNX in a scratch directory, loaded by the agent's own loader (``load_model``) and every window is
   scored by ``StateModel.predict_vector`` — the agent's classify path, ``unknown`` by score included;
3. on F's windows: recall as "not normal" (any state but ``normal``, ``unknown`` included); on the benign
   hold-out: false alarms per hour, per window (raw) and as state changes after the agent's debounce
   (state/debounce.py, 2 windows in, 3 out).

Each model is scored twice: with the distance alone, and with the novelty check (benign bounds per feature,
otel_ebpf_receiver/model/novelty.py). The bounds' margin is the smallest of :data:`MARGINS` with which the model
trained on every family raises no more benign hold-out windows of the main recording than the distance alone
(a calibration on that hold-out; ``--benign`` recordings are never used for it, so their false alarms are an
independent measure). The in-sample columns come from that all-family model on the windows it was trained on.
The per-metric two-means baseline (model_export/baseline.py, Netdata's anomaly bits: per feature of the model,
two means over the value and its two lags within a scenario; a window is flagged when >= ``--baseline-rate`` % of
the features lie beyond their ``--baseline-percentile`` of training distances) is trained in every fold on that
fold's benign training windows — the very windows the fold's model has as ``normal`` — and scored on the same
windows. Per family, F1 counts the family's windows as positives and the benign hold-out as negatives; overall,
every fold's family windows are positives and every fold's verdicts on the benign hold-out are negatives (each
fold is one model, so the benign hold-out counts once per fold, for the product and the baseline alike). The
product is the model with its novelty check (``+novelty``), as the bundled models ship; it is scored per window
as the model gives it and as the agent reports it (``reported``: through the agent's debounce, what every data point
carries), and the baseline likewise (its flags debounced the same way).
The bundled ``network.onnx`` is scored beside (``--no-bundled``: not): on the recording it was trained on (the
shipped one, or the one ``make model`` just made) its column is in-sample; on another recording of the same plan it
says how the shipped model does on scenarios it knows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from otel_ebpf_receiver.model import NORMAL_STATE, ModelError, load_model
from otel_ebpf_receiver.model.runtime import StateModel
from otel_ebpf_receiver.model.watch import BUNDLED_MODEL_DIR
from otel_ebpf_receiver.state.debounce import StateDebouncer
from otel_ebpf_receiver.state.incidents import BASELINE_STATES

from .. import train as tr
from ..baseline import LAGS as BASELINE_LAGS, PERCENTILE as BASELINE_PERCENTILE, SHARE as BASELINE_SHARE
from ..baseline import TwoMeansBaseline
from ..bounds import benign_bounds
from ..windows import WindowTable, read_windows
from . import rebuild
from .holdout_table import (BASELINE, BASELINE_REPORTED, DETECTORS, PRECISION_BAR, PRODUCT, REPORTED, VARIANTS,
                            markdown)

BENIGN_TAIL = 0.25
MARGINS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
ENTER_WINDOWS, EXIT_WINDOWS = 2, 3     # the agent's debounce defaults (state/classifier.py)
WINDOW_SECONDS = 1.0
UNKNOWN_ABOVE = 2.5                     # rebuild's default (otel-ebpf-lab rebuild --unknown-above)


def rows(table: WindowTable, mask: np.ndarray) -> WindowTable:
    return WindowTable(table.names, table.timestamps[mask], table.labels[mask], table.values[mask],
                       sources=table.sources)


def in_time_order(table: WindowTable) -> WindowTable:
    return rows(table, np.argsort(table.timestamps, kind="stable"))


def benign_tail(labels: np.ndarray, runs: np.ndarray, share: float = BENIGN_TAIL) -> np.ndarray:
    """The last ``share`` (rounded up) of every run labelled ``normal``, in row order: the benign hold-out."""
    held = np.zeros(len(labels), dtype=bool)
    for run in np.unique(runs):
        idx = np.flatnonzero(runs == run)
        if labels[idx[0]] == NORMAL_STATE:
            held[idx[len(idx) - math.ceil(share * len(idx)):]] = True
    return held


@dataclass
class Split:
    """Everything the evaluation needs, windows in time order: the main recording, then ``--benign`` ones."""

    table: WindowTable
    runs: np.ndarray                # run id per window (train.segments; --benign runs numbered after)
    held_benign: np.ndarray         # benign hold-out of the main recording (calibration + measure)
    extra_benign: np.ndarray        # windows of --benign recordings (measure only)
    families: list[str] = field(default_factory=list)

    def training(self, family: str | None) -> np.ndarray:
        """Rows a model may train on: never the benign hold-out or extra benign windows, never ``family``."""
        mask = ~self.held_benign & ~self.extra_benign
        return mask & (self.table.labels != family) if family else mask


def load_split(windows: str, benign: Sequence[str] = (), share: float = BENIGN_TAIL) -> Split:
    main = in_time_order(read_windows(windows))
    runs = tr.segments(main)
    parts, run_parts, extra = [main], [runs], [np.zeros(len(main), dtype=bool)]
    for path in benign:
        more = in_time_order(read_windows(path))
        missing = [n for n in main.names if n not in more.names]
        if missing:
            raise ValueError(f"{path} lacks feature {missing[0]} of {windows}: record both with the same probes")
        order = [more.names.index(n) for n in main.names]
        more = WindowTable(main.names, more.timestamps, more.labels, more.values[:, order])
        if set(more.labels) - {NORMAL_STATE}:
            raise ValueError(f"{path}: --benign recordings must hold only windows labelled {NORMAL_STATE!r}")
        run_parts.append(tr.segments(more) + sum(len(np.unique(r)) for r in run_parts))
        parts.append(more)
        extra.append(np.ones(len(more), dtype=bool))
    table = WindowTable(main.names, np.concatenate([p.timestamps for p in parts]),
                        np.concatenate([p.labels for p in parts]), np.concatenate([p.values for p in parts]))
    all_runs = np.concatenate(run_parts)
    held = np.concatenate([benign_tail(main.labels, runs, share), np.zeros(len(table) - len(main), dtype=bool)])
    families = sorted({lab for lab in main.labels if lab and lab != NORMAL_STATE})
    if not families:
        raise ValueError(f"{windows} holds no incident label: record the training plan (otel-ebpf-lab record)")
    return Split(table, all_runs, held, np.concatenate(extra), families)


def score(model: StateModel, values: np.ndarray) -> np.ndarray:
    """The agent's verdict per window (``predict_vector``, one window at a time as the agent calls it)."""
    x = values.astype(np.float32)
    return np.array([model.predict_vector(x[i:i + 1]).state for i in range(len(x))], dtype=object)


def nearest(model: StateModel, values: np.ndarray) -> np.ndarray:
    x = values.astype(np.float32)
    return np.array([model.predict_vector(x[i:i + 1]).nearest_state for i in range(len(x))], dtype=object)


def debounced_alarms(states: np.ndarray, runs: np.ndarray) -> int:
    """State changes away from normal after the agent's debounce, each run of windows debounced on its own from
    ``normal`` (a benign run starts in a known-normal state)."""
    shown = reported(states, runs, np.ones(len(states), dtype=bool))
    alarms = 0
    for run in np.unique(runs):
        sequence = [NORMAL_STATE, *shown[runs == run]]
        alarms += sum(1 for before, after in zip(sequence, sequence[1:]) if after != before and after != NORMAL_STATE)
    return alarms


def reported(states: np.ndarray, runs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per window, the state the agent reports on every data point (``system.state``): the model's states
    through the agent's debounce, the windows of ``mask`` of each run in time order, each run from ``normal``.
    Windows outside ``mask`` keep their state."""
    out = states.copy()
    for run in np.unique(runs[mask]):
        where = np.flatnonzero(mask & (runs == run))
        debouncer = StateDebouncer(ENTER_WINDOWS, EXIT_WINDOWS, baseline=BASELINE_STATES, initial=NORMAL_STATE)
        out[where] = [debouncer.update(state).state for state in states[where]]
    return out


def train(split: Split, family: str | None, workdir: Path, say: Callable[[str], None]) -> tuple[tr.Trained, StateModel]:
    """network.onnx's recipe (model_export.lab.rebuild) on the training rows with ``family`` held out, exported
    without benign bounds and loaded by the runtime's loader."""
    spec = rebuild.MODELS[0]
    clusters = spec.clusters
    names = [n for n in split.table.names if spec.wanted(n)]
    part = rebuild.select(rows(split.table, split.training(family)), names, set())
    with contextlib.redirect_stdout(io.StringIO()):
        trained = rebuild.fit(part, replace(rebuild.recipe(clusters, UNKNOWN_ABOVE), bounds_margin=None), say=say)
    return trained, tr.export(trained, workdir / f"{family or 'all'}-distance.onnx").model


def bounded(trained: tr.Trained, split: Split, margin: float, path: Path) -> StateModel:
    """The same model with benign bounds from its own benign training windows (as TrainConfig.bounds_margin
    would compute them), exported and loaded."""
    benign = rows(split.table, split.training(None))
    trained.bounds = benign_bounds(rebuild.select(benign, list(trained.feature_names), set()), margin,
                                   floor=trained.config.scale_floor)
    try:
        return tr.export(trained, path).model
    finally:
        trained.bounds = None


def calibrate(split: Split, model: StateModel, say: Callable[[str], None]) -> float:
    """The smallest margin of MARGINS with which ``model`` (trained on every family) flags no more benign hold-out
    windows of the main recording than its distance alone does (the runtime's own bounds arithmetic), or than the
    widest margin does: a window beyond its bound at every margin is not the margin's to clear, and chasing it
    widened every bound to the widest (measured: held-out recall of three families 1.00 -> 0.5-0.6)."""
    values = split.table.values[split.held_benign]
    verdicts = [model.predict_vector(values[i:i + 1].astype(np.float32)) for i in range(len(values))]
    states = np.array([v.state for v in verdicts], dtype=object)
    near = np.array([v.nearest_state for v in verdicts], dtype=object)
    base = int(np.sum(states != NORMAL_STATE))
    training = rebuild.select(rows(split.table, split.training(None)), list(model.feature_names), set())
    floor = rebuild.recipe(1, UNKNOWN_ABOVE).scale_floor
    flagged = {}
    for margin in MARGINS:
        bounds = benign_bounds(training, margin, floor=floor)
        beyond = np.abs(bounds.excess(values.astype(np.float32))).max(axis=1) > 0
        flagged[margin] = int(np.sum((states != NORMAL_STATE) | ((near == NORMAL_STATE) & beyond)))
        say(f"margin {margin:g}: {flagged[margin]} of {len(values)} benign hold-out windows not normal "
            f"(distance alone: {base})")
    return chosen_margin(flagged, base)


def chosen_margin(flagged: dict[float, int], base: int) -> float:
    """Of the margins tried (ascending), the smallest flagging no more windows than the distance alone (``base``)
    or than the widest margin: windows beyond a bound at every margin are left to be counted, not chased."""
    margins = sorted(flagged)
    enough = max(base, flagged[margins[-1]])
    return next(margin for margin in margins if flagged[margin] <= enough)


def f1(tp: int, fp: int, positives: int) -> tuple[float, float]:
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / positives if positives else float("nan")
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, f


def fold_baseline(split: Split, family: str | None, names: Sequence[str], template: TwoMeansBaseline,
                  cache: dict) -> tuple[np.ndarray, TwoMeansBaseline]:
    """The two-means baseline of one fold: fitted on that fold's benign training windows (on the fold model's
    features), flags on every window (its lags need the windows before). The benign training windows do not
    depend on which incident family is held out, so folds with the same windows share one fit (a cache, not a
    shortcut: the fit is deterministic)."""
    table = split.table
    benign_training = split.training(family) & (table.labels == NORMAL_STATE)
    key = (benign_training.tobytes(), tuple(names))
    if key not in cache:
        columns = [list(table.names).index(n) for n in names]
        values = table.values[:, columns]
        fitted = replace(template).fit(values[benign_training], split.runs[benign_training])
        flags = fitted.flags(values, split.runs)
        cache[key] = np.where(flags, "anomalous", NORMAL_STATE).astype(object), fitted
    return cache[key]


def overall(states: dict, split: Split, detector: str) -> dict:
    """Pooled over the folds: each fold's family windows (positives) and its verdicts on the benign hold-out
    (negatives), by the fold's own model."""
    benign = split.held_benign | split.extra_benign
    tp = fp = positives = negatives = 0
    for family in split.families:
        verdicts, positive = states[family][detector], split.table.labels == family
        tp += int(np.sum(verdicts[positive] != NORMAL_STATE))
        fp += int(np.sum(verdicts[benign] != NORMAL_STATE))
        positives, negatives = positives + int(positive.sum()), negatives + int(benign.sum())
    precision, f = f1(tp, fp, positives)
    return {"tp": tp, "fp": fp, "positives": positives, "negatives": negatives, "precision": precision,
            "recall": tp / positives if positives else float("nan"), "f1": f}


def evaluate(split: Split, margin: float | None = None, say: Callable[[str], None] = print,
             reference: StateModel | None = None, baseline: TwoMeansBaseline | None = None) -> dict:
    """Every number of the held-out table (see the module docstring). ``reference``: a model to score beside
    (the bundled network.onnx); ``baseline``: the two-means
    baseline's settings (default: issue 13's), fitted anew in every fold."""
    template = baseline if baseline is not None else TwoMeansBaseline()
    template.check()
    table, labels = split.table, split.table.labels
    benign = split.held_benign | split.extra_benign
    # model (held-out family; None: all; "bundled": reference) -> variant or BASELINE -> states
    states: dict[str | None, dict[str, np.ndarray]] = {}
    fits: dict = {}
    with tempfile.TemporaryDirectory(prefix="holdout-") as tmp:
        for family in [None, *split.families]:
            say(f"training without {family}" if family else "training on every family")
            trained, without = train(split, family, Path(tmp), say)
            if family is None and margin is None:
                margin = calibrate(split, without, say)
            with_bounds = bounded(trained, split, margin, Path(tmp) / f"{family or 'all'}-novelty.onnx")
            mask = benign | (labels == family) if family else benign | (labels != NORMAL_STATE)
            states[family] = {}
            for variant, model in zip(VARIANTS, (without, with_bounds)):
                out = np.full(len(table), NORMAL_STATE, dtype=object)
                out[mask] = score(model, table.values[mask])
                states[family][variant] = out
            states[family][BASELINE], fitted = fold_baseline(split, family, trained.feature_names, template, fits)
            states[family][REPORTED] = reported(states[family][PRODUCT], split.runs, mask)
            states[family][BASELINE_REPORTED] = reported(states[family][BASELINE], split.runs, mask)
    if reference is not None:   # the bundled model, as it ships
        columns = [list(table.names).index(n) for n in reference.feature_names]
        states["bundled"] = {variant: score(reference, table.values[:, columns]) for variant in VARIANTS}
    result: dict = {"margin": margin, "families": {}, "benign": {}, "reference": reference is not None,
                    "baseline": {"percentile": fitted.percentile, "rate": fitted.share, "lags": fitted.lags,
                                 "diff": fitted.diff, "smooth": fitted.smooth, "features": len(fitted.centres_),
                                 "min_features": fitted.min_features_, "fits": len(fits)}}
    for family in split.families:
        positive = labels == family
        row: dict = {"windows": int(positive.sum())}
        for variant in VARIANTS:
            inside = states[None][variant][positive]
            row[f"in_sample_not_normal_{variant}"] = float(np.mean(inside != NORMAL_STATE))
            row[f"in_sample_named_{variant}"] = float(np.mean(inside == family))
        for variant in DETECTORS:
            held = states[family][variant]
            tp, fp = int(np.sum(held[positive] != NORMAL_STATE)), int(np.sum(held[benign] != NORMAL_STATE))
            precision, f = f1(tp, fp, int(positive.sum()))
            row.update({f"held_out_{variant}": tp / positive.sum(), f"fp_{variant}": fp,
                        f"precision_{variant}": precision, f"f1_{variant}": f})
        if reference is not None:
            row["bundled_not_normal"] = float(np.mean(states["bundled"]["distance"][positive] != NORMAL_STATE))
            row["bundled_named"] = float(np.mean(states["bundled"]["distance"][positive] == family))
        result["families"][family] = row
    result["overall"] = {detector: overall(states, split, detector) for detector in DETECTORS}
    # per view (each window's verdict as the model gives it; as the agent reports it), against the baseline's
    # better F1 of its two views
    base_f1 = max(result["overall"][b]["f1"] for b in (BASELINE, BASELINE_REPORTED))
    result["beats_baseline"] = {view: bool(result["overall"][view]["precision"] >= PRECISION_BAR
                                           and result["overall"][view]["f1"] > base_f1)
                                for view in (PRODUCT, REPORTED)}
    for name, mask in (("hold-out of the main recording (calibration)", split.held_benign),
                       ("--benign recordings (independent)", split.extra_benign)):
        if not mask.any():
            continue
        hours = mask.sum() * WINDOW_SECONDS / 3600
        entry: dict = {"windows": int(mask.sum()), "minutes": mask.sum() * WINDOW_SECONDS / 60}
        for variant in (*VARIANTS, BASELINE):
            per_model = [(int(np.sum(by[variant][mask] != NORMAL_STATE)),
                          debounced_alarms(by[variant][mask], split.runs[mask]), family or "all")
                         for family, by in states.items() if family != "bundled"]
            worst_raw = max(per_model)
            worst_deb = max(per_model, key=lambda t: t[1])
            entry[variant] = {"raw_per_hour_all": per_model[0][0] / hours,
                              "debounced_per_hour_all": per_model[0][1] / hours,
                              "raw_per_hour_worst": worst_raw[0] / hours, "worst_raw_model": worst_raw[2],
                              "debounced_per_hour_worst": worst_deb[1] / hours, "worst_debounced_model": worst_deb[2]}
        if reference is not None:
            bundled = states["bundled"]["distance"][mask]
            entry["bundled"] = {"raw_per_hour": int(np.sum(bundled != NORMAL_STATE)) / hours,
                                "debounced_per_hour": debounced_alarms(bundled, split.runs[mask]) / hours}
        result["benign"][name] = entry
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``otel-ebpf-lab holdout``."""
    parser.add_argument("--windows", required=True, metavar="FILE.csv",
                        help="a recording of the training plan (otel-ebpf-lab record; make model's "
                             "build/model/windows.csv)")
    parser.add_argument("--benign", action="append", default=[], metavar="FILE.csv",
                        help="more benign time, never trained on (windows labelled normal only); repeatable")
    parser.add_argument("--margin", type=float, help="benign bounds margin (default: calibrated, see above)")
    parser.add_argument("--markdown", metavar="FILE.md", help="also write the table here")
    parser.add_argument("--no-bundled", action="store_true",
                        help="do not score the bundled network.onnx beside")
    parser.add_argument("--baseline-rate", type=float, default=100 * BASELINE_SHARE, metavar="PCT",
                        help="two-means baseline: flag a window when at least PCT %% of the features have their "
                             "anomaly bit (default %(default)g, Netdata's host anomaly rate threshold)")
    parser.add_argument("--baseline-percentile", type=float, default=BASELINE_PERCENTILE, metavar="P",
                        help="two-means baseline: a feature's bit is set beyond the P-th percentile of its "
                             "training distances (default %(default)g)")
    parser.add_argument("--baseline-lags", type=int, default=BASELINE_LAGS, metavar="N",
                        help="two-means baseline: lags per feature (default %(default)s; Netdata: 5)")
    parser.add_argument("--baseline-diff", type=int, default=0, metavar="N",
                        help="two-means baseline: difference the values N times first (default 0; Netdata: 1)")
    parser.add_argument("--baseline-smooth", type=int, default=1, metavar="N",
                        help="two-means baseline: mean of the last N (differenced) values (default 1; Netdata: 3)")


def run(args: argparse.Namespace) -> int:
    """``otel-ebpf-lab holdout``."""
    from ..windows import WindowsFormatError

    say = lambda line: print(f"holdout: {line}", flush=True)  # noqa: E731
    try:
        split = load_split(args.windows, args.benign)
    except (OSError, WindowsFormatError) as exc:
        raise ValueError(str(exc)) from None
    say(f"{len(split.table)} windows, families {', '.join(split.families)}; benign hold-out "
        f"{int(split.held_benign.sum())} + {int(split.extra_benign.sum())} windows")
    reference = None
    if not args.no_bundled:
        bundled = BUNDLED_MODEL_DIR / rebuild.MODELS[0].filename
        try:
            reference = load_model(bundled, split.table.names, bundled=True)
        except ModelError as exc:
            say(f"not scoring the bundled model beside: {exc}")
    baseline = TwoMeansBaseline(percentile=args.baseline_percentile, share=args.baseline_rate / 100,
                                lags=args.baseline_lags, diff=args.baseline_diff, smooth=args.baseline_smooth)
    baseline.check()
    text = markdown(evaluate(split, args.margin, say, reference, baseline), ", ".join([args.windows, *args.benign]))
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
    return 0
