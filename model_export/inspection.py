"""What a training run says about itself: the text report (purity, silhouette, confusion matrix, warnings) and a
PCA scatter of the windows by label and by predicted state (``report.txt`` and ``clusters.png`` next to the
model)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from otel_ebpf_receiver import model as runtime

if TYPE_CHECKING:
    from .train import Trained


def report(trained: Trained) -> str:
    ev = trained.evaluation
    assert ev is not None
    sil = "n/a" if np.isnan(ev.silhouette) else f"{ev.silhouette:.3f}"
    lines = [
        f"algorithm {trained.algorithm}, {len(trained.cluster_states)} clusters, "
        f"{len(trained.feature_names)} features, {len(trained.X)} windows "
        f"({trained.training['labelled_rows']} labelled)",
        f"purity {ev.purity:.3f}  (share of labelled windows whose cluster's majority label is their own)",
        f"silhouette {sil}  (-1..1, higher = tighter and better separated clusters)",
        f"unknown on training data {np.mean(ev.states == runtime.UNKNOWN_STATE):.2%}  "
        f"(score > {trained.config.unknown_above:g}; score = distance / p{trained.config.percentile:g} "
        f"of the cluster's training distances)",
    ]
    weights = trained.training.get("feature_weights")
    if weights:
        low = sorted(weights.items(), key=lambda kv: kv[1])[:5]
        lines.append(f"feature weights (share of variance between the {trained.training.get('segments')} steady "
                     f"workloads; scale floor {trained.config.scale_floor:g}): lowest "
                     + ", ".join(f"{n} {w:.2f}" for n, w in low))
    lines += [
        "",
        "cluster  state                 windows  purity  threshold",
    ]
    for c, st in enumerate(trained.cluster_states):
        pur = "-" if np.isnan(ev.cluster_purity[c]) else f"{ev.cluster_purity[c]:.3f}"
        lines.append(f"{c:7d}  {st:20s}  {ev.cluster_sizes[c]:7d}  {pur:>6s}  {trained.thresholds[c]:9.4f}")
    lines += ["", "confusion matrix (rows: label, columns: predicted state)"]
    width = max([len(n) for n in ev.confusion_labels] + [5])
    cols = [max(len(s), 6) for s in ev.confusion_states]
    lines.append(" " * width + "  " + "  ".join(f"{s:>{w}s}" for s, w in zip(ev.confusion_states, cols)))
    for name, row in zip(ev.confusion_labels, ev.confusion):
        lines.append(f"{name:{width}s}  " + "  ".join(f"{v:{w}d}" for v, w in zip(row, cols)))
    if ev.warnings:
        lines += [""] + [f"warning: {w}" for w in ev.warnings]
    return "\n".join(lines)


def plot(trained: Trained, path: str | os.PathLike[str], *, max_points: int = 20000) -> Path:
    """Two PCA panels of the standardised windows: coloured by label (what you said), and by predicted
    state (what the model says). Centres are black crosses with their cluster id."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    ev = trained.evaluation
    assert ev is not None
    Z = trained.pipeline[0].transform(trained.X.astype(np.float64))
    rng = np.random.default_rng(trained.config.seed)
    idx = rng.choice(len(Z), max_points, replace=False) if len(Z) > max_points else np.arange(len(Z))
    n_comp = min(2, Z.shape[1])
    pca = PCA(n_components=n_comp, random_state=trained.config.seed).fit(Z)

    def project(a: np.ndarray) -> np.ndarray:
        p = pca.transform(a)
        return p if n_comp == 2 else np.column_stack([p[:, 0], np.zeros(len(p))])

    P = project(Z[idx])
    centres = project(_centres(trained))
    names = sorted({lab or "(none)" for lab in trained.labels} | set(ev.states))
    palette = {n: f"C{i % 10}" for i, n in enumerate(x for x in names if x not in ("(none)", "unknown"))}
    palette.update({"(none)": "#cccccc", runtime.UNKNOWN_STATE: "#555555"})

    fig = Figure(figsize=(13, 6), dpi=100)
    FigureCanvasAgg(fig)
    sil = "n/a" if np.isnan(ev.silhouette) else f"{ev.silhouette:.3f}"
    ratio = pca.explained_variance_ratio_
    for ax, values, title in (
        (fig.add_subplot(1, 2, 1), [lab or "(none)" for lab in trained.labels[idx]], "by label (training truth)"),
        (fig.add_subplot(1, 2, 2), list(ev.states[idx]), "by predicted state"),
    ):
        values = np.asarray(values, dtype=object)
        for name in sorted(set(values)):
            sel = values == name
            ax.scatter(P[sel, 0], P[sel, 1], s=6, alpha=0.6, color=palette[name], label=f"{name} ({sel.sum()})")
        ax.scatter(centres[:, 0], centres[:, 1], marker="x", s=80, color="black", linewidths=2)
        for c, (x, y) in enumerate(centres):
            ax.annotate(f"{c}:{trained.cluster_states[c]}", (x, y), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
        ax.set_title(title)
        ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)" if n_comp == 2 else "")
        ax.legend(fontsize=8, markerscale=2, loc="best")
    fig.suptitle(f"{trained.algorithm}, {len(trained.cluster_states)} clusters, purity {ev.purity:.3f}, "
                 f"silhouette {sil}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


def _centres(trained: Trained) -> np.ndarray:
    est = trained.pipeline[-1]
    if trained.algorithm == "kmeans":
        return est.cluster_centers_
    if trained.algorithm == "gmm":
        return est.means_
    Z = trained.pipeline[0].transform(trained.X.astype(np.float64))
    clusters = trained.evaluation.clusters
    return np.stack([Z[clusters == c].mean(axis=0) if np.any(clusters == c) else np.zeros(Z.shape[1])
                     for c in range(len(trained.cluster_states))])
