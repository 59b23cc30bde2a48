"""The state-model file contract, shared by the exporter (``model_export``) and the runtime (``model.runtime``).

The model file is self-describing (written by ``model_export``, read here; this module owns the contract)::

    input    features   float32 [N, n_features]   raw feature values, in the order of metadata feature_names
    output   label      int64   [N]               cluster id, 0 <= label < n_clusters
    output   distances  float32 [N, n_clusters]   distance from the window to every cluster (see metadata distance)
    output   deviation  float32 [N, n_features]   scaled window minus the centre it was assigned to

    metadata_props (all strings; JSON where noted) — see the METADATA_* constants below.

Anomaly score (the exact definition)::

    score = distances[label] / distance_thresholds[label]

``distance_thresholds[k]`` is the ``threshold_percentile`` (default 99th) percentile of the distances of the
training windows that cluster k won, floored at the exporter's ``--min-threshold``. So score 1.0 means "as far
from its centre as the 99th-percentile training window of that cluster", score 2.0 twice as far. A window whose
score is above ``unknown_above`` (metadata, default 1.5) is reported as the state ``unknown``, whatever cluster
is nearest: the model has not seen anything like it. Distances are Euclidean in the standardised feature space
for kmeans and birch, Mahalanobis under the component's covariance for gmm (metadata ``distance``).

"Features that moved most" (:attr:`Verdict.top_features`) are the three largest ``|deviation|`` entries: how
many training standard deviations each feature is away from the centre of the assigned cluster.

No import of the probe registry happens here at import time: the runtime is given explicit feature-name lists.
"""

from __future__ import annotations

import os

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
"""Model files above this size are refused before they are read (ours are a few KiB)."""

UNKNOWN_STATE = "unknown"
MODEL_FORMAT = "otel-ebpf-receiver/state-model/1"

INPUT_NAME = "features"
OUTPUT_LABEL = "label"
OUTPUT_DISTANCES = "distances"
OUTPUT_DEVIATION = "deviation"
OUTPUT_NAMES = (OUTPUT_LABEL, OUTPUT_DISTANCES, OUTPUT_DEVIATION)

# metadata_props keys. Every one is required.
METADATA_FORMAT = "format"                  # MODEL_FORMAT
METADATA_VERSION = "model_version"          # free text, e.g. "kmeans-20261125T171417Z-3f2a9c01"
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

TOP_FEATURES = 3


class ModelError(Exception):
    """A model file that cannot be served. ``str()`` is one line: the file, what is wrong, what to do."""

    def __init__(self, path: str | os.PathLike[str], problem: str, hint: str) -> None:
        self.path = str(path)
        self.problem = _one_line(problem)
        self.hint = _one_line(hint)
        super().__init__(f"model {self.path}: {self.problem} — {self.hint}")


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
