"""Benign bounds per feature for the runtime's novelty check (otel_ebpf_receiver/model/contract.py, "Novelty"):
what `train` writes as the model's ``feature_bounds`` metadata when ``TrainConfig.bounds_margin`` is set."""

from __future__ import annotations

import numpy as np

from otel_ebpf_receiver.model.contract import NORMAL_STATE
from otel_ebpf_receiver.model.novelty import FeatureBounds

from .windows import WindowTable


def benign_bounds(table: WindowTable, margin: float, percentiles: tuple[float, float] = (0.0, 100.0),
                   floor: float = 0.0) -> FeatureBounds:
    """The benign range of each feature (runtime contract, "Novelty"): between ``percentiles`` of the windows
    labelled ``normal``, widened on each side by ``margin`` times that range's width — the width floored at
    ``floor`` (in the feature's unit) and at a float32-safe minimum, so a feature constant in benign time gets a
    band, not a point. Raises ValueError without normal windows."""
    benign = table.values[np.asarray(table.labels, dtype=object) == NORMAL_STATE]
    if not len(benign):
        raise ValueError(f"no window labelled {NORMAL_STATE!r}: benign bounds need benign time")
    if margin < 0 or not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise ValueError("bounds margin must be >= 0 and the percentiles 0 <= low < high <= 100")
    low, high = np.percentile(benign, percentiles, axis=0)
    span = high - low
    # float32 resolution at the value's size: the runtime sees float32 windows, and a benign training window must
    # not round past its own bound (nor may the two bounds round onto each other)
    resolution = np.maximum(np.maximum(abs(low), abs(high)) * 1e-5, 1e-6)
    width = np.maximum(np.maximum(span, max(floor, 0.0)), resolution)
    pad = (width - span) / 2 + margin * width + resolution
    return FeatureBounds(low - pad, high + pad)
