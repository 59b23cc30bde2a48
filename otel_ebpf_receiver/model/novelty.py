"""Novelty by feature (model/contract.py, "Novelty"): a window nearest a ``normal`` cluster that puts even one
feature beyond the range benign training time covered is not normal.

Why beside the distance: the distance sums every feature's term, so a large move of 3 features out of 40 is
diluted by the 37 that sit still (and by the weights that quiet a jittery feature); the per-feature bound sees
it alone. The bounds are numbers in the model's metadata (``feature_bounds``), checked by ``checks.py`` and
applied by :meth:`StateModel.predict_vector <.runtime.StateModel.predict_vector>`; the exporter computes them
(``model_export.train.feature_bounds``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

LOW, HIGH = "low", "high"


@dataclass(frozen=True)
class FeatureBounds:
    """The benign range of each feature, in the model's feature order; ``low < high`` everywhere (checked)."""

    low: np.ndarray     # (n,) float64
    high: np.ndarray    # (n,) float64

    @classmethod
    def from_json(cls, value: Any, n_features: int) -> "FeatureBounds":
        """From the parsed metadata value, or ValueError saying what is wrong (never anything else)."""
        if not isinstance(value, dict) or set(value) != {LOW, HIGH}:
            raise ValueError(f'must be an object with exactly "{LOW}" and "{HIGH}"')
        rows = []
        for key in (LOW, HIGH):
            items = value[key]
            if not isinstance(items, list) or len(items) != n_features:
                raise ValueError(f"{key} must list one number per feature ({n_features})")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in items):
                raise ValueError(f"{key} must hold finite numbers")
            rows.append(np.asarray(items, dtype=np.float64))
        low, high = rows
        # float32 inputs: the bounds must stay apart once the window is float32 too
        if not (np.all(high - low > 0) and np.all(np.isfinite(high - low))
                and np.all(np.abs(np.concatenate([low, high])) < np.finfo(np.float32).max)):
            raise ValueError(f"every {LOW} must be below its {HIGH}, within float32 range")
        return cls(low, high)

    def to_json(self) -> dict[str, list[float]]:
        return {LOW: [float(v) for v in self.low], HIGH: [float(v) for v in self.high]}

    def excess(self, x: np.ndarray) -> np.ndarray:
        """Bound widths beyond the bound, signed (+ above ``high``, − below ``low``, 0 inside), for a batch
        ``x`` of shape (N, n) or one row (n,). NaN features give 0: a NaN explains nothing."""
        x = np.asarray(x, dtype=np.float64)
        width = self.high - self.low
        with np.errstate(invalid="ignore"):
            above = np.where(x > self.high, (x - self.high) / width, 0.0)
            below = np.where(x < self.low, (x - self.low) / width, 0.0)
        return above + below

    def beyond(self, row: Sequence[float], names: Sequence[str], n: int) -> tuple[float, list[tuple[str, float]]]:
        """For one window (its features as Python floats, in the model's order): the largest excess (0.0 inside
        every bound) and the ``n`` features furthest beyond their bound, largest first, with their signed excess.

        The same numbers as :meth:`excess` (float64 arithmetic, NaN gives 0), in plain Python: it runs every
        window, and after the interval's pause each distinct numpy call costs tens of µs of cold caches, more than
        these few dozen floats (bench/bench_window.py)."""
        low, high, width = self._listed()
        excess = [(v - hi) / w if v > hi else (v - lo) / w if v < lo else 0.0
                  for v, lo, hi, w in zip(row, low, high, width)]
        size = list(map(abs, excess))
        top = max(size, default=0.0)
        if top <= 0.0:
            return 0.0, []
        order = sorted(range(len(size)), key=lambda i: -size[i])[:n]  # stable, like argsort(kind="stable")
        return top, [(names[i], excess[i]) for i in order if size[i] > 0.0]

    def _listed(self) -> tuple[list[float], list[float], list[float]]:
        listed = self.__dict__.get("_as_lists")
        if listed is None:  # once per model: the bounds and widths as Python floats
            listed = (self.low.tolist(), self.high.tolist(), (self.high - self.low).tolist())
            object.__setattr__(self, "_as_lists", listed)  # a cache on a frozen dataclass
        return listed


def novelty_score(excess: float, unknown_above: float) -> float:
    """The anomaly score a window gets from its largest excess: above ``unknown_above`` as soon as one feature
    is beyond its bound (then the window is ``unknown``), growing with how far; 0.0 inside every bound."""
    return unknown_above * (1.0 + excess) if excess > 0.0 else 0.0


__all__ = ["FeatureBounds", "novelty_score"]
