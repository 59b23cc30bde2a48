"""Kernel log2 histograms: what a slot means, its bounds in a metric's unit, quantiles of one window.

Every probe histogram is filled in the kernel the way bcc's tools do it: ``slot = bpf_log2l(value)`` where
bpf_log2l(v) = floor(log2(v)) + 1 (and 1 for v = 0). So slot s >= 1 holds the integers in [2^(s-1), 2^s - 1] and
its values are all below 2^s: the upper bound of slot s is 2^s kernel units (slot 0 never fills). The C programs
clamp to ``SLOTS - 1``, the overflow slot, whose upper bound is infinity.

Latencies are measured in the kernel in nanoseconds and divided by 1000 before the log2 (like biolatency and
runqlat), so a latency histogram's kernel unit is the microsecond; the OTel metric's unit is the second.

The exported OTel histogram uses exactly these bounds (see ``telemetry.Log2BucketHistogramAggregation``), so its
bucket i is kernel slot i and the counts are the kernel's, not a re-binning.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

# Slots 0..LATENCY_SLOTS-1 in the C programs: 2^26 us ~ 67 s is the last finite bound, slot 27 is the overflow.
LATENCY_SLOTS = 28
# Sizes (bytes, packets...) go up to 2^32 before the overflow slot.
SIZE_SLOTS = 34

# metric unit -> (one kernel unit expressed in the metric's unit, number of kernel slots)
_UNITS: dict[str, tuple[float, int]] = {
    "s": (1e-6, LATENCY_SLOTS),     # kernel microseconds -> seconds
    "ms": (1e-3, LATENCY_SLOTS),
    "us": (1.0, LATENCY_SLOTS),
}


def unit_scale(unit: str) -> tuple[float, int]:
    """(kernel unit in the metric's unit, slots) for a metric unit; other units (By, {packet}) are counted as is."""
    return _UNITS.get(unit, (1.0, SIZE_SLOTS))


def boundaries(unit: str) -> tuple[float, ...]:
    """The explicit bucket boundaries of a log2 histogram in ``unit``: 2^0 .. 2^(slots-2) kernel units.

    slots-1 finite bounds give ``slots`` OTel buckets, the last one (above the last bound) being the overflow slot.
    """
    scale, slots = unit_scale(unit)
    return tuple(float(2 ** k) * scale for k in range(slots - 1))


def upper_bound(slot: int, unit: str) -> float:
    """Upper bound of kernel slot ``slot`` in the metric's unit; inf for the overflow slot."""
    scale, slots = unit_scale(unit)
    return math.inf if slot >= slots - 1 else float(2 ** slot) * scale


def buckets_from_slots(counts: Sequence[int], unit: str) -> dict[float, int]:
    """Non-zero slot counts as ``{upper bound: count}`` (the shape of ``Reading.histograms``)."""
    return {upper_bound(slot, unit): int(c) for slot, c in enumerate(counts) if c}


def quantile(counts: Sequence[int], q: float) -> float:
    """The q-quantile in kernel units (e.g. microseconds) of a window's slot counts, 0.0 when empty.

    Linear interpolation inside the slot that holds the q-th value, between its lower edge 2^(s-1) (0 for slot
    1) and its upper edge 2^s; the overflow slot answers its lower edge. Resolution is a factor of two, which is
    what a log2 histogram can tell and plenty for a model feature on a log scale.
    """
    total = sum(int(c) for c in counts)
    if total <= 0:
        return 0.0
    rank = q * total
    seen = 0
    last = len(counts) - 1
    for slot, c in enumerate(counts):
        c = int(c)
        if c <= 0:
            continue
        if seen + c >= rank:
            low = 0.0 if slot <= 1 else float(2 ** (slot - 1))
            if slot == last:
                return low
            high = float(2 ** slot)
            return low + (high - low) * max(0.0, rank - seen) / c
        seen += c
    return float(2 ** max(0, last - 1))


def quantile_of_buckets(buckets: Mapping[float, int], q: float, unit: str) -> float:
    """Like :func:`quantile` but from ``{upper bound: count}`` in the metric's unit; answers in the metric's unit."""
    scale, slots = unit_scale(unit)
    counts = [0] * slots
    for bound, c in buckets.items():
        slot = slots - 1 if math.isinf(bound) else round(math.log2(bound / scale))
        counts[min(max(slot, 0), slots - 1)] += int(c)
    return quantile(counts, q) * scale
