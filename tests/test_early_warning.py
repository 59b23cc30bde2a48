"""The build-up detector: fires during a slow ramp well before the level is abnormal, and rarely on noise."""

from __future__ import annotations

import random

from otel_ebpf_receiver.early_warning import EarlyWarning


def test_warns_early_on_a_slow_ramp():
    rng = random.Random(1)
    ew = EarlyWarning(signals=("x",))
    for _ in range(120):  # baseline: noisy but stationary
        assert ew.update({"x": 5.0 + rng.gauss(0, 0.2)}) is None
    fired_at = None
    for step in range(60):  # linear ramp of +3.0 over 60 windows (15 baseline std)
        level = 5.0 + 3.0 * step / 60
        if ew.update({"x": level + rng.gauss(0, 0.2)}) is not None:
            fired_at = step
            break
    assert fired_at is not None and fired_at < 18, fired_at  # before 30 % of the ramp


def test_rare_false_alarms_on_stationary_noise():
    rng = random.Random(2)
    ew = EarlyWarning(signals=("x",))
    alarms = sum(ew.update({"x": 5.0 + rng.gauss(0, 0.2)}) is not None for _ in range(20_000))
    assert alarms <= 3


def test_warning_clears_and_can_fire_again():
    ew = EarlyWarning(signals=("x",), warmup=5)
    for _ in range(50):
        ew.update({"x": 1.0})
    assert any(ew.update({"x": 3.0}) for _ in range(20))
    assert ew.active
    for _ in range(200):
        ew.update({"x": 1.0})
    assert not ew.active


def test_missing_and_non_finite_signals_are_ignored():
    ew = EarlyWarning(signals=("x", "y"))
    for _ in range(100):
        assert ew.update({"x": float("nan")}) is None
    assert ew.scores() == {}
