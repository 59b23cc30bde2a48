"""The per-metric baseline of issue 13, in the style of Netdata's anomaly bits: what the state model must beat.

Per feature (metric), a two-means model over the vector (value, value one window earlier, two windows earlier),
fitted on benign windows only. A feature's bit is set in a window when that vector is further from both centres
than the 99th percentile of its training distances; a window is flagged when at least 1 % of the features have
their bit set (with 38 features: any one).

Lags are taken within a run of consecutive windows (``model_export.train.segments``: one label, no gap longer
than the windows' spacing allows); the first windows of a run repeat their own value for the lags they lack (the
seconds before a recording started are not in it). A feature constant in training gets one centre and threshold 0:
any change sets its bit, as it would in Netdata.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LAGS = 2
PERCENTILE = 99.0
SHARE = 0.01


def lagged(values: np.ndarray, runs: np.ndarray, lags: int = LAGS) -> np.ndarray:
    """(N, n_features, lags + 1): each window's value and its ``lags`` predecessors within its run (``runs``: a
    run id per window, windows of a run in time order as given)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.repeat(values[:, :, None], lags + 1, axis=2)
    for lag in range(1, lags + 1):
        for i in range(len(values)):
            j = i - lag
            # the nearest earlier window of the same run, or the first one of the run
            while j < i and (j < 0 or runs[j] != runs[i]):
                j += 1
            out[i, :, lag] = values[j]
    return out


@dataclass
class TwoMeansBaseline:
    """``fit`` on benign windows, then ``flags`` per window. Learned attributes end in ``_``."""

    percentile: float = PERCENTILE
    share: float = SHARE
    lags: int = LAGS
    seed: int = 0
    centres_: list[np.ndarray] = field(default_factory=list)   # per feature: (1 or 2, lags + 1)
    thresholds_: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def fit(self, values: np.ndarray, runs: np.ndarray) -> "TwoMeansBaseline":
        from sklearn.cluster import KMeans

        vectors = lagged(values, runs, self.lags)
        if not len(vectors):
            raise ValueError("the baseline needs benign windows to train on")
        self.centres_, thresholds = [], []
        for j in range(vectors.shape[1]):
            points = vectors[:, j, :]
            if len(np.unique(points, axis=0)) < 2:
                centres = points[:1].copy()
            else:
                centres = KMeans(n_clusters=2, n_init=10, random_state=self.seed).fit(points).cluster_centers_
            self.centres_.append(centres)
            thresholds.append(float(np.percentile(self._distance(points, centres), self.percentile)))
        self.thresholds_ = np.asarray(thresholds)
        return self

    @staticmethod
    def _distance(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
        return np.sqrt(((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)).min(axis=1)

    def bits(self, values: np.ndarray, runs: np.ndarray) -> np.ndarray:
        """(N, n_features) bool: the feature is anomalous in that window."""
        vectors = lagged(values, runs, self.lags)
        out = np.zeros(vectors.shape[:2], dtype=bool)
        for j, centres in enumerate(self.centres_):
            out[:, j] = self._distance(vectors[:, j, :], centres) > self.thresholds_[j]
        return out

    def flags(self, values: np.ndarray, runs: np.ndarray) -> np.ndarray:
        """(N,) bool: at least ``share`` of the features are anomalous."""
        return self.bits(values, runs).mean(axis=1) >= self.share
