"""Benign bounds per feature for the runtime's novelty check (otel_ebpf_receiver/model/contract.py, "Novelty"):
what `train` writes as the model's ``feature_bounds`` metadata when ``TrainConfig.bounds_margin`` is set."""

from __future__ import annotations

import numpy as np

from otel_ebpf_receiver.model.contract import NORMAL_STATE
from otel_ebpf_receiver.model.novelty import FeatureBounds

from .windows import WindowTable

# A feature named ``..._rate_log1p`` is log1p of events per second (the probes' convention): its benign band is at
# least one event a second wide on each side of a constant benign rate, before the margin. Without it a kind of
# event benign training time never saw (a TCP retransmission timeout, an XDP drop) was novel at its first single
# occurrence: measured on the 2026-12-02 plan recording, one timeout a second in 2 benign hold-out windows, beyond
# the bound at every margin.
# Nor is an event rate novel for being low: its benign range reaches down to no events at all. A host quieter than
# the recording's idle is not a state the model never saw (the core model's lowest benign system-call rate was 11 a
# second; a quiet CI host read `unknown` below it, 2026-12-02). An outage that stops traffic is an absence for an
# alert on the exported rate, not a state for this check.
EVENT_RATE_SUFFIX = "rate_log1p"
EVENTS_FLOOR = 1.0


def benign_bounds(table: WindowTable, margin: float, percentiles: tuple[float, float] = (0.0, 100.0),
                   floor: float = 0.0) -> FeatureBounds:
    """The benign range of each feature (runtime contract, "Novelty"): between ``percentiles`` of the windows
    labelled ``normal``, widened on each side by ``margin`` times that range's width — the width floored at
    ``floor`` (in the feature's unit), for event rates at two log1p(:data:`EVENTS_FLOOR`), and at a float32-safe
    minimum, so a feature constant in benign time gets a band, not a point. An event rate's low bound is below zero
    events (a quiet host is not novel). Raises ValueError without normal windows."""
    benign = table.values[np.asarray(table.labels, dtype=object) == NORMAL_STATE]
    if not len(benign):
        raise ValueError(f"no window labelled {NORMAL_STATE!r}: benign bounds need benign time")
    if margin < 0 or not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise ValueError("bounds margin must be >= 0 and the percentiles 0 <= low < high <= 100")
    low, high = np.percentile(benign, percentiles, axis=0)
    is_rate = np.array([name.endswith(EVENT_RATE_SUFFIX) for name in table.names], dtype=bool)
    span = high - low
    # float32 resolution at the value's size: the runtime sees float32 windows, and a benign training window must
    # not round past its own bound (nor may the two bounds round onto each other)
    resolution = np.maximum(np.maximum(abs(low), abs(high)) * 1e-5, 1e-6)
    floors = np.where(is_rate, max(floor, 2 * np.log1p(EVENTS_FLOOR)), max(floor, 0.0))
    width = np.maximum(np.maximum(span, floors), resolution)
    pad = (width - span) / 2 + margin * width + resolution
    # the rates' low side reaches below zero events by the same pad; the width and the high side stay the recording's
    return FeatureBounds(np.where(is_rate, np.minimum(low, 0.0), low) - pad, high + pad)
