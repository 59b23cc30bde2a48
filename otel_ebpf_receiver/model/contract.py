"""The state-model file contract, shared by the exporter (``model_export``) and the runtime (``model.runtime``).

The model file is self-describing (written by ``model_export``, read here; this module owns the contract)::

    input    features   float32 [N, n_features]   raw feature values, in the order of metadata feature_names
    output   label      int64   [N]               cluster id, 0 <= label < n_clusters
    output   distances  float32 [N, n_clusters]   distance from the window to every cluster (see metadata distance)
    output   deviation  float32 [N, n_features]   scaled window minus the centre it was assigned to
    output   normal_deviation  float32 [N, n_features]   optional: each feature's signed share of the distance
                                                  to the nearest ``normal`` cluster (below)

    metadata_props (all strings; JSON where noted) — see the METADATA_* constants below.

Anomaly score (the exact definition)::

    score = distances[label] / distance_thresholds[label]

``distance_thresholds[k]`` is the ``threshold_percentile`` (default 99th) percentile of the distances of the
training windows that cluster k won, floored at the exporter's ``--min-threshold``. So score 1.0 means "as far
from its centre as the 99th-percentile training window of that cluster", score 2.0 twice as far. A window whose
score is above ``unknown_above`` (metadata, default 1.5) is reported as the state ``unknown``, whatever cluster
is nearest: the model has not seen anything like it. A model with ``feature_bounds`` raises the score of a window nearest a
normal cluster to its novelty score when a feature leaves its benign range ("Novelty", below). Distances are Euclidean in the standardised feature space
for kmeans and birch, Mahalanobis under the component's covariance for gmm (metadata ``distance``).

Explanations (:attr:`Verdict.top_features`, "moved most" in the state-change event and the incident span): the
three features that put the window in its state, largest first, signed (+ above normal, − below):

* a window the model calls ``normal``: the largest ``|deviation|``, how far (in the scaled space: training
  standard deviations divided by the feature's weight) each feature is from the centre of its own normal cluster;
* any other state, ``unknown`` included: the largest ``|normal_deviation|``, why the window is not normal. Its
  square is the feature's term of the squared distance to the nearest cluster whose state is ``normal``
  (``NORMAL_STATE``; nearest in the model's own distance, for birch its nearest normal subcluster): for
  euclidean models ``normal_deviation = z − c``, the scaled window minus that centre, whose squares sum to the
  squared distance exactly. For gmm it is
  ``(z_i − μ_i)·sqrt(P_ii)``, with P the nearest normal component's precision matrix: exact for diag and
  spherical covariances; for full and tied ones an approximation that ignores the correlations between features
  (each feature in units of its standard deviation given the others).

``normal_deviation`` is optional: a model without it (exported before it existed, or without a normal cluster)
explains every window by ``deviation`` from its assigned centre, as before. When present it is checked like the
other outputs (declared float32 [N, n_features], no NaN).

Novelty (optional metadata ``feature_bounds``): per feature, the range benign (``normal``-labelled) training time
covered, widened by a margin calibrated on held-out benign time — JSON ``{"low": [...], "high": [...]}``, one
finite number per feature in the order of ``feature_names``, ``low < high``. A whole-vector distance dilutes a
large move of a few features among dozens; this check does not. For a window whose nearest cluster is ``normal``::

    excess_i = max(x_i - high_i, low_i - x_i, 0) / (high_i - low_i)      # bound widths beyond the bound
    if any excess_i > 0:  score = max(score, unknown_above * (1 + max_i excess_i));  state = unknown

and the features beyond their bound explain the window (largest excess first, signed: + above, − below;
``Verdict.explained_from == "benign_bounds"``). A window nearest a named incident is left alone: incidents lie
beyond benign bounds by definition. A model without the key behaves as before.

What may drive mitigation (the attack-state rule): a window's state triggers blocking only when the operator lists it
in ``mitigation.attack_states`` AND the serving model declares it an attack state. A model declares its attack
states in the optional metadata ``attack_states`` (JSON list, each one of its cluster states, never ``unknown``);
a bundled model (shipped in the package, built by the lab from labelled attack scenarios) declares every cluster
state it has. So a model file dropped in the model directory that merely names a cluster ``syn_flood`` classifies,
but never blocks anything until its metadata says so explicitly.

The model directory is an input like any other; :func:`load_model <.runtime.load_model>` bounds what a file can do
with the limits below (sizes, operators, time and memory of a test run in a child process).

No import of the probe registry happens here at import time: the runtime is given explicit feature-name lists.
"""

from __future__ import annotations

import os
import re
from typing import Any

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
"""Model files above this size are refused before they are read (ours are a few KiB)."""

UNKNOWN_STATE = "unknown"
MODEL_FORMAT = "otel-ebpf-receiver/state-model/1"

INPUT_NAME = "features"
OUTPUT_LABEL = "label"
OUTPUT_DISTANCES = "distances"
OUTPUT_DEVIATION = "deviation"
OUTPUT_NAMES = (OUTPUT_LABEL, OUTPUT_DISTANCES, OUTPUT_DEVIATION)
OUTPUT_NORMAL_DEVIATION = "normal_deviation"   # optional (see "Explanations" above)
NORMAL_STATE = "normal"                        # the baseline state: what explanations measure from

# metadata_props keys. Every one is required.
METADATA_FORMAT = "format"                  # MODEL_FORMAT
METADATA_VERSION = "model_version"          # printable ASCII, e.g. "kmeans-20261125T171417Z-3f2a9c01"
METADATA_ALGORITHM = "algorithm"            # kmeans | gmm | birch
METADATA_FEATURES = "feature_names"         # JSON list, the input columns in order
METADATA_STATES = "cluster_states"          # JSON list, state name of cluster i at index i
METADATA_DISTANCE = "distance"              # "euclidean" (standardised space) | "mahalanobis"
METADATA_THRESHOLDS = "distance_thresholds"  # JSON list of floats > 0, score denominator per cluster
METADATA_PERCENTILE = "threshold_percentile"  # e.g. "99": which training-distance percentile the thresholds are
METADATA_UNKNOWN_ABOVE = "unknown_above"    # e.g. "1.5": score above this → state "unknown"
METADATA_TRAINING = "training"              # JSON object: rows, files, label counts, purity, silhouette, ...
REQUIRED_METADATA = (
    METADATA_FORMAT, METADATA_VERSION, METADATA_ALGORITHM, METADATA_FEATURES, METADATA_STATES,
    METADATA_DISTANCE, METADATA_THRESHOLDS, METADATA_PERCENTILE, METADATA_UNKNOWN_ABOVE, METADATA_TRAINING,
)
# Optional: JSON list of the cluster states that may drive mitigation (the attack-state rule above).
METADATA_ATTACK_STATES = "attack_states"
# Optional: JSON {"low": [...], "high": [...]}, the benign range of each feature (Novelty, above).
METADATA_FEATURE_BOUNDS = "feature_bounds"

TOP_FEATURES = 3

# -- what a file may contain (names go raw into attributes, logs and `otel-ebpf-model info`) ------------------
STATE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
FEATURE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,127}")
WORD = re.compile(r"[a-z][a-z0-9_]{0,31}")            # algorithm, distance
MAX_VERSION_CHARS = 128
MAX_METADATA_CHARS = 1024 * 1024   # one metadata value; ours are < 4 KiB (training facts)
MAX_JSON_DEPTH = 16                # ours nest 3 deep; deeper JSON is refused before anything walks it
MAX_FEATURES = 1024
MAX_CLUSTERS = 4096

# -- what a graph may contain -----------------------------------------------------------------------------------
# Exactly the operators model_export/onnx_graph.py emits (kmeans, gmm, birch; skl2onnx's Scaler). None of them
# loops, branches or takes its output shape from a tensor's values, so the cost of one run is fixed by the input
# shape — which is always (1, n_features) in the agent — and is measured once, at load, in a child process.
ALLOWED_OPERATORS = frozenset({
    ("", "Add"), ("", "ArgMax"), ("", "ArgMin"), ("", "Gather"), ("", "Identity"), ("", "MatMul"), ("", "Mul"),
    ("", "ReduceMin"), ("", "ReduceSumSquare"), ("", "Sqrt"), ("", "Sub"), ("", "Transpose"), ("", "Unsqueeze"),
    ("ai.onnx.ml", "Scaler"),
})
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
MAX_NODES = 1024                   # ours have 10-20
MAX_TENSOR_ELEMENTS = 4 * 1024 * 1024  # one initializer; more float32 than a DEFAULT_MAX_BYTES file can hold

# -- what loading may cost --------------------------------------------------------------------------------------
# The first session and test runs of a new graph happen in a child process (model/sandbox.py) under these limits,
# so a pathological graph is refused without touching the agent. The agent's window loop waits for the child:
# 5 s is 10x a cold child's start (python + onnxruntime, ~0.5 s) plus our graphs' few milliseconds.
SANDBOX_SECONDS = 5.0
SANDBOX_MEMORY_BYTES = 512 * 1024 * 1024  # address space the graph may add on top of the child's own imports
# One inference must stay far below a window (1 s): ours take ~50 µs, so 250 ms only ever refuses a broken graph.
MAX_RUN_SECONDS = 0.25


class ModelError(Exception):
    """A model file that cannot be served. ``str()`` is one line of printable text: the file, what is wrong, what
    to do (file names and messages can come from a hostile file: control characters are shown as ``?``)."""

    def __init__(self, path: str | os.PathLike[str], problem: str, hint: str) -> None:
        self.path = printable(str(path), 200)
        self.problem = printable(problem)
        self.hint = printable(hint)
        super().__init__(f"model {self.path}: {self.problem} — {self.hint}")


def printable(text: str, limit: int = 300) -> str:
    """One line, at most ``limit`` characters, no control characters (newlines, ANSI escapes)."""
    flat = " ".join(str(text).split())
    flat = "".join(c if c.isprintable() else "?" for c in flat)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def output_problem(label: Any, distances: Any, deviation: Any, rows: int, n_clusters: int, n_features: int, *,
                   allow_nan: bool = False, normal_deviation: Any = None) -> str | None:
    """Why the outputs of one run break the contract (shapes, label range, NaN, negative distance), or None.
    ``normal_deviation`` is checked like ``deviation`` when the model has that output (None: it has not).

    Infinite distances are allowed: "infinitely far from every centre" is a valid answer (the score makes the
    window ``unknown``). NaN is allowed only with ``allow_nan`` (the input itself held NaN: a probe's fault, not
    the model's). Cheap enough for every window: attribute reads and one vectorised test per output."""
    import numpy as np

    if not all(isinstance(o, np.ndarray) for o in (label, distances, deviation)):
        return "outputs are not tensors"
    if label.shape != (rows,) or label.dtype.kind not in "iu":
        return f"label has shape {label.shape} and type {label.dtype}, expected ({rows},) int64"
    if distances.shape != (rows, n_clusters) or distances.dtype.kind != "f":
        return f"distances have shape {distances.shape}, expected ({rows}, {n_clusters}) float"
    if deviation.shape != (rows, n_features) or deviation.dtype.kind != "f":
        return f"deviation has shape {deviation.shape}, expected ({rows}, {n_features}) float"
    if normal_deviation is not None and (not isinstance(normal_deviation, np.ndarray)
                                         or normal_deviation.shape != (rows, n_features)
                                         or normal_deviation.dtype.kind != "f"):
        shape = getattr(normal_deviation, "shape", "?")
        return f"normal_deviation has shape {shape}, expected ({rows}, {n_features}) float"
    if rows:
        low, high = int(label.min()), int(label.max())
        if low < 0 or high >= n_clusters:
            return f"label {low if low < 0 else high} is outside 0..{n_clusters - 1}"
    if allow_nan:
        if (distances < 0).any():
            return "distances hold negative values"
        return None
    if not (distances >= 0).all():  # also false for NaN
        return "distances hold NaN or negative values"
    if np.isnan(deviation).any():
        return "deviation holds NaN"
    if normal_deviation is not None and np.isnan(normal_deviation).any():
        return "normal_deviation holds NaN"
    return None
