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
teach the detector that the ramp is normal. S is capped at ``cap`` x h: evidence beyond "certainly shifted" adds
nothing, and without a ceiling a 30 s flood (z in the hundreds) would keep S above zero — the warning active and
the baseline frozen — for hours after the flood ended; with it, a shift that ended drains in cap*h/k windows.

Three more rules keep benign traffic quiet (measured with the scenario lab's detection report, model_export/lab.py):

* a dip (a large transfer pushes the small-packet rate and the SYN share down, a quiet minute pushes everything
  down) teaches the baseline only slowly (``alpha_down``), else the return to the usual level looks like a build-up;
* a warning that lasts ``accept_after`` windows while the classifier keeps saying ``normal`` was a benign shift:
  its level becomes the new baseline and the warning clears (see :meth:`EarlyWarning.update`);
* each signal has a floor under its standard deviation (``DEFAULT_FLOORS``): the size of a change that matters.

Signals: the rate of *small* packets (derived: a flood is many small frames, a bulk transfer many large ones), the
SYN share, distinct sources, TCP resets, and the model's anomaly score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

SMALL_FRAME = 512      # bytes: a window whose mean received frame is this big or bigger has no "small" packets
MIN_FRAME = 64         # bytes: the smallest Ethernet frame


def small_packets_rate_log1p(values: Mapping[str, float]) -> float | None:
    """log1p(received packets/s, times how far the window's mean frame is below SMALL_FRAME): floods are many
    small frames (SYNs, small datagrams), while a large transfer is many MTU-sized ones — the raw packet rate
    rises for both, this signal only for the first (and for interactive traffic, which is small too)."""
    p, b = values.get("xdp.packets_rate_log1p"), values.get("xdp.bytes_rate_log1p")
    if p is None or b is None:
        return None
    pps, bps = math.expm1(p), math.expm1(b)
    if pps <= 0:
        return 0.0
    small = min(1.0, max(0.0, (SMALL_FRAME - bps / pps) / (SMALL_FRAME - MIN_FRAME)))
    return math.log1p(pps * small)


# Signals computed from the window's features (when the features they need are there).
DERIVED = {"xdp.small_packets_rate_log1p": small_packets_rate_log1p}

DEFAULT_SIGNALS = (
    "xdp.small_packets_rate_log1p",
    "xdp.syn_ratio",
    "xdp.distinct_sources_log1p",
    "tcp.resets_rate_log1p",
    "anomaly_score",
)

# The smallest standard deviation each signal is judged by, in its own unit: the size of a change that means
# something. Log rates: 0.5 (a 65 % change); the SYN share of TCP segments: 0.2 (interactive traffic moves it by
# ~0.1 as its mix changes, a SYN flood by 0.5-0.8); the anomaly score: 1.0 (benign workloads sit anywhere between
# 0.3 and 1.2). Below these, a signal that sits still (idle, a count that is always 2) would call any small change
# many sigmas. Measured with the scenario lab's detection report (model_export/lab.py).
DEFAULT_FLOORS = {
    "xdp.small_packets_rate_log1p": 0.5,
    "xdp.syn_ratio": 0.2,
    "xdp.distinct_sources_log1p": 0.5,
    "tcp.resets_rate_log1p": 0.5,
    "anomaly_score": 1.0,
}


@dataclass
class SignalState:
    mean: float = 0.0
    var: float = 0.0
    seen: int = 0
    cusum: float = 0.0
    last_z: float = 0.0
    recent: float = 0.0       # fast EWMA of the value (always learning): the level a benign shift is accepted at


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
    alpha_down: float = 0.002  # EWMA weight in a dip (z < -dip): ~8 minutes of memory
    dip: float = 2.0          # standard deviations below the baseline that make a window a dip
    warmup: int = 20          # windows before any warning (the baseline must exist first)
    floor: float = 0.05       # minimum std, in the feature's unit, for a signal without its own floor
    floors: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FLOORS))
    clear_windows: int = 5    # windows with every CUSUM at 0 before a warning is considered over
    cap: float = 2.0          # S never exceeds cap * h (see the module docstring)
    accept_after: int = 30    # windows a warning may last while the host stays normal before its level is accepted
    _state: dict[str, SignalState] = field(default_factory=dict)
    active: bool = False
    _quiet: int = 0
    _normal_while_active: int = 0

    def update(self, values: Mapping[str, float], normal: bool | None = None) -> Warning | None:
        """Feed one window; returns a Warning on the window a warning starts, else None. ``normal``: whether the
        host's reported state is normal this window (None: not known). A warning that lasts ``accept_after``
        windows while the state stays normal was a benign shift (traffic resuming after a quiet hour, a long
        transfer): its signals' baselines move to the new level and the warning clears. Without this, the
        baseline — frozen while S > 0 — would never learn the new level and the warning would never end."""
        fired: list[tuple[str, SignalState, float]] = []
        for name in self.signals:
            if name in values:
                x = float(values[name])
            elif name in DERIVED:
                derived = DERIVED[name](values)
                if derived is None:
                    continue
                x = float(derived)
            else:
                continue
            if not math.isfinite(x):
                continue
            st = self._state.setdefault(name, SignalState(mean=x, recent=x))
            st.recent += 0.3 * (x - st.recent)
            std = max(math.sqrt(st.var), self.floors.get(name, self.floor))
            z = (x - st.mean) / std
            st.last_z = z
            if st.seen >= self.warmup:
                st.cusum = min(self.cap * self.h, max(0.0, st.cusum + z - self.k))
            if st.cusum == 0.0:  # learn only while nothing is building up
                delta = x - st.mean
                a = self.alpha_down if z < -self.dip and st.seen >= self.warmup else self.alpha
                st.mean += a * delta
                st.var = (1 - a) * (st.var + a * delta * delta)
            st.seen += 1
            if st.cusum > self.h:
                fired.append((name, st, x))
        if self.active and normal:
            self._normal_while_active += 1
            if self._normal_while_active >= self.accept_after:
                self.accept()
                return None
        else:
            self._normal_while_active = 0
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

    def accept(self) -> None:
        """Take the current level of every building-up signal as its new baseline; the warning is over."""
        for st in self._state.values():
            if st.cusum > 0.0:
                st.mean, st.cusum = st.recent, 0.0
        self.active = False
        self._quiet = self._normal_while_active = 0

    def rearm(self) -> None:
        """Forget the evidence (every CUSUM back to 0, no warning active) but keep the learned baselines: the next
        build-up is reported at once, without a new warm-up (the scenario lab does this between scenarios)."""
        for st in self._state.values():
            st.cusum = 0.0
        self.active = False
        self._quiet = self._normal_while_active = 0

    def reset(self, names: Iterable[str] | None = None) -> None:
        for name in list(names or self._state):
            self._state.pop(name, None)
        self.active = False
