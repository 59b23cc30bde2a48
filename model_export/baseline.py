"""The per-metric baseline of issue 13, in the style of Netdata's anomaly bits: what the state model must beat.

Per feature (metric, one column of the window feature vector), a two-means model (k-means, k = 2) over the vector
(value, value one window earlier, two windows earlier), fitted on benign windows only. A feature's anomaly bit is
set in a window when that vector is further from both centres than the 99th percentile of its training distances;
the window's anomaly rate is the share of features with their bit set (Netdata's host "anomaly rate"), and the
window is flagged when that rate is at least 1 % (with 38 features: any one bit).

Netdata's own ML (``[ml]`` in netdata.conf) does the same per dimension with k = 2, a 0.99 anomaly-score
threshold and a 1.0 % host anomaly-rate threshold, but first differences the value (``num samples to diff = 1``),
smooths it (``num samples to smooth = 3``) and uses five lags (``num samples to lag = 5``). The defaults here are
issue 13's definition (the value itself, two lags); ``diff``, ``smooth`` and ``lags`` give Netdata's preprocessing
when wanted (``otel-ebpf-lab holdout --baseline-diff 1 --baseline-smooth 3 --baseline-lags 5``).

Lags, differences and smoothing look back only within a run of consecutive windows (``runs``: an id per window;
``model_export.train.segments`` gives one per scenario: one label, no gap longer than the windows' spacing allows),
never across a scenario boundary: the first windows of a run repeat their own first value for the lags they lack
(the seconds before a scenario started are not part of it). A feature constant in training gets one centre and
threshold 0: any change sets its bit, as it would in Netdata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

LAGS = 2
PERCENTILE = 99.0
SHARE = 0.01


def run_starts(runs: np.ndarray) -> np.ndarray:
    """Per window, the index of the first window of its run: a run is a block of consecutive windows with one id
    (an id that comes back after another starts a new run — windows are taken in the order given)."""
    runs = np.asarray(runs)
    new = np.ones(len(runs), dtype=bool)
    new[1:] = runs[1:] != runs[:-1]
    return np.maximum.accumulate(np.where(new, np.arange(len(runs)), 0)) if len(runs) else np.zeros(0, dtype=int)


def earlier(runs: np.ndarray, lag: int) -> np.ndarray:
    """Per window, the index of the window ``lag`` before it in its run, or of its run's first window."""
    return np.maximum(np.arange(len(runs)) - lag, run_starts(runs))


def preprocess(values: np.ndarray, runs: np.ndarray, diff: int = 0, smooth: int = 1) -> np.ndarray:
    """Netdata's preprocessing, within runs: ``diff`` times the change from the previous window (0 for a run's
    first window), then the mean of the last ``smooth`` of those (fewer at a run's start)."""
    x = np.asarray(values, dtype=np.float64)
    for _ in range(diff):
        x = x - x[earlier(runs, 1)]
    if smooth > 1:
        x = np.mean([x[earlier(runs, k)] for k in range(smooth)], axis=0)
    return x


def lagged(values: np.ndarray, runs: np.ndarray, lags: int = LAGS) -> np.ndarray:
    """(N, n_features, lags + 1): each window's value and its ``lags`` predecessors within its run."""
    x = np.asarray(values, dtype=np.float64)
    return np.stack([x[earlier(runs, lag)] for lag in range(lags + 1)], axis=2)


@dataclass
class TwoMeansBaseline:
    """``fit`` on benign windows, then ``bits`` / ``anomaly_rate`` / ``flags`` per window. Hyperparameters are the
    fields without ``_``; learned attributes end in ``_``."""

    percentile: float = PERCENTILE  # a feature's bit: beyond this percentile of its own training distances
    share: float = SHARE            # a window is flagged when at least this share of its features have their bit
    lags: int = LAGS
    diff: int = 0
    smooth: int = 1
    seed: int = 0
    centres_: list[np.ndarray] = field(default_factory=list)   # per feature: (1 or 2, lags + 1)
    thresholds_: np.ndarray = field(default_factory=lambda: np.zeros(0))
    min_features_: int = 0          # bits a window needs to be flagged: ceil(share * features)

    def check(self) -> None:
        """One line per bad setting (the CLI passes them from the user)."""
        if not 0 < self.percentile <= 100:
            raise ValueError(f"baseline percentile must be in (0, 100], not {self.percentile:g}")
        if not 0 < self.share <= 1:
            raise ValueError(f"baseline share must be in (0, 1] (0.01 = 1 % of the features), not {self.share:g}")
        if self.lags < 0 or self.diff < 0 or self.smooth < 1:
            raise ValueError(f"baseline needs lags >= 0, diff >= 0, smooth >= 1 (got {self.lags}, {self.diff}, "
                             f"{self.smooth})")

    def vectors(self, values: np.ndarray, runs: np.ndarray) -> np.ndarray:
        """(N, n_features, lags + 1): what each feature's two-means model sees in each window."""
        return lagged(preprocess(values, runs, self.diff, self.smooth), runs, self.lags)

    def fit(self, values: np.ndarray, runs: np.ndarray) -> "TwoMeansBaseline":
        from sklearn.cluster import KMeans

        self.check()
        vectors = self.vectors(values, runs)
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
        # 1e-9: a share of exactly k features (0.01 of 100) needs k bits, not k + 1 from float rounding
        self.min_features_ = max(1, math.ceil(self.share * len(self.centres_) - 1e-9))
        return self

    @staticmethod
    def _distance(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
        return np.sqrt(((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)).min(axis=1)

    def bits(self, values: np.ndarray, runs: np.ndarray) -> np.ndarray:
        """(N, n_features) bool: the feature is anomalous in that window."""
        vectors = self.vectors(values, runs)
        if vectors.shape[1] != len(self.centres_):
            raise ValueError(f"the baseline was fitted on {len(self.centres_)} features, not {vectors.shape[1]}")
        out = np.zeros(vectors.shape[:2], dtype=bool)
        for j, centres in enumerate(self.centres_):
            out[:, j] = self._distance(vectors[:, j, :], centres) > self.thresholds_[j]
        return out

    def anomaly_rate(self, values: np.ndarray, runs: np.ndarray) -> np.ndarray:
        """(N,) the share of features with their bit set (Netdata's host anomaly rate, per window)."""
        return self.bits(values, runs).mean(axis=1)

    def flags(self, values: np.ndarray, runs: np.ndarray) -> np.ndarray:
        """(N,) bool: at least ``share`` of the features are anomalous."""
        return self.bits(values, runs).sum(axis=1) >= self.min_features_
