"""Synthetic labelled windows with explicit feature names: for tests, the benchmark and trying the toolchain
without a host to record on. Each state is a Gaussian blob around its own centre in feature space."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .windows import WindowTable

DEMO_FEATURES = (
    "syscalls.rate_log1p", "syscalls.error_ratio", "file_open.rate_log1p",
    "exec.exec_rate_log1p", "exec.fork_rate_log1p", "xdp.packets_rate_log1p",
)
DEMO_STATES = ("normal", "network_flood", "exec_storm", "file_open_storm")
DEMO_SIGNATURES = {  # the feature each demo incident pushes up
    "network_flood": "xdp.packets_rate_log1p",
    "exec_storm": "exec.exec_rate_log1p",
    "file_open_storm": "file_open.rate_log1p",
}


def make_windows(names: Sequence[str] = DEMO_FEATURES, states: Sequence[str] = DEMO_STATES, *,
                 per_state: int = 200, spread: float = 0.15, separation: float = 3.0, seed: int = 0,
                 start: float = 1_700_000_000.0) -> WindowTable:
    """``per_state`` windows per state, Gaussian noise ``spread`` (std) around each state's centre. The first
    state is the baseline; every other one moves its signature feature (DEMO_SIGNATURES, else the i-th
    feature) up by ``separation`` and the others a little at random."""
    rng = np.random.default_rng(seed)
    n = len(names)
    base = rng.uniform(1.0, 6.0, n)
    blocks, labels = [], []
    for i, state in enumerate(states):
        centre = base.copy()
        if i:
            sig = DEMO_SIGNATURES.get(state)
            j = list(names).index(sig) if sig in names else i % n
            centre += rng.normal(0.0, 0.3 * separation / np.sqrt(n), n)
            centre[j] += separation
        blocks.append(centre + rng.normal(0.0, spread, (per_state, n)))
        labels += [state] * per_state
    values = np.vstack(blocks)
    return WindowTable(
        names=tuple(names),
        timestamps=start + np.arange(len(values), dtype=np.float64),
        labels=np.asarray(labels, dtype=object),
        values=values,
        sources=[("<synthetic>", len(values))],
    )
