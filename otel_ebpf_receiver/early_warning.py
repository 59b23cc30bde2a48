"""Early warning: is traffic "gradually building up into a series of not normal requests" (the talk)?

Method: per signal, an EWMA baseline (mean and variance) learned while the signal looks normal, and a one-sided
CUSUM on the standardised excess over that baseline:

    z_t = (x_t - mean_{t-1}) / max(std_{t-1}, floor)
    S_t = max(0, S_{t-1} + z_t - k)          warning when S_t > h

Why this and not a threshold: a ramp is a small but *persistent* increase. A threshold fires only when the level
is already abnormal (which is when the state classifier flips anyway); CUSUM accumulates evidence of a sustained
shift and fires while each single window still looks almost normal. ``k`` (the slack, in standard deviations)
ignores ordinary noise, ``h`` trades detection delay against false alarms: with k=0.5, h=8 a stationary Gaussian
signal raises a false alarm about once in several thousand windows (ARL0), while a shift of 1.5 σ is detected in
about 8 windows. The baseline does not learn while the CUSUM is accumulating (S > 0), so a slow ramp cannot
teach the detector that the ramp is normal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

DEFAULT_SIGNALS = (
    "xdp.packets_rate_log1p",
    "xdp.syn_ratio",
    "xdp.distinct_sources_log1p",
    "tcp.resets_rate_log1p",
    "anomaly_score",
)


@dataclass
class SignalState:
    mean: float = 0.0
    var: float = 0.0
    seen: int = 0
    cusum: float = 0.0
    last_z: float = 0.0


@dataclass(frozen=True)
class Warning:
    """Raised on the window the CUSUM of at least one signal crosses ``h``."""

    signals: tuple[str, ...]
    cusum: float
    z: float
    value: float


@dataclass
class EarlyWarning:
    signals: tuple[str, ...] = DEFAULT_SIGNALS
    k: float = 0.5            # slack, in baseline standard deviations
    h: float = 8.0            # decision threshold
    alpha: float = 0.02       # EWMA weight: ~50 windows of memory
    warmup: int = 20          # windows before any warning (the baseline must exist first)
    floor: float = 0.05       # minimum std, in the feature's unit: idle signals are not infinitely sensitive
    clear_windows: int = 5    # windows with every CUSUM at 0 before a warning is considered over
    _state: dict[str, SignalState] = field(default_factory=dict)
    active: bool = False
    _quiet: int = 0

    def update(self, values: Mapping[str, float]) -> Warning | None:
        """Feed one window; returns a Warning on the window a warning starts, else None."""
        fired: list[tuple[str, SignalState, float]] = []
        for name in self.signals:
            if name not in values:
                continue
            x = float(values[name])
            if not math.isfinite(x):
                continue
            st = self._state.setdefault(name, SignalState(mean=x))
            std = max(math.sqrt(st.var), self.floor)
            z = (x - st.mean) / std
            st.last_z = z
            if st.seen >= self.warmup:
                st.cusum = max(0.0, st.cusum + z - self.k)
            if st.cusum == 0.0:  # learn only while nothing is building up
                delta = x - st.mean
                st.mean += self.alpha * delta
                st.var = (1 - self.alpha) * (st.var + self.alpha * delta * delta)
            st.seen += 1
            if st.cusum > self.h:
                fired.append((name, st, x))
        if fired:
            self._quiet = 0
            if not self.active:
                self.active = True
                top = max(fired, key=lambda f: f[1].cusum)
                return Warning(tuple(f[0] for f in fired), top[1].cusum, top[1].last_z, top[2])
            return None
        if self.active and all(st.cusum == 0.0 for st in self._state.values()):
            self._quiet += 1
            if self._quiet >= self.clear_windows:
                self.active = False
        return None

    def scores(self) -> dict[str, float]:
        """CUSUM per signal (for a gauge: how close each is to warning, h = threshold)."""
        return {name: st.cusum for name, st in self._state.items()}

    def reset(self, names: Iterable[str] | None = None) -> None:
        for name in list(names or self._state):
            self._state.pop(name, None)
        self.active = False
