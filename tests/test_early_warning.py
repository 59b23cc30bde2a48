"""The build-up detector: fires during a slow ramp well before the level is abnormal, and rarely on noise."""

from __future__ import annotations

import random

from otel_ebpf_receiver.state.early_warning import EarlyWarning


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


def test_small_packets_signal_counts_small_frames_not_large_ones():
    import math

    from otel_ebpf_receiver.state.early_warning import small_packets_rate_log1p

    def window(pps, frame):
        return {"xdp.packets_rate_log1p": math.log1p(pps), "xdp.bytes_rate_log1p": math.log1p(pps * frame)}

    assert small_packets_rate_log1p(window(20_000, 60)) > math.log1p(19_000)   # a flood of minimal frames
    assert small_packets_rate_log1p(window(300_000, 1500)) == 0.0               # a bulk transfer
    assert small_packets_rate_log1p({"xdp.syn_ratio": 0.5}) is None             # no XDP features: no signal


def test_a_long_shift_clears_soon_after_it_ends():
    ew = EarlyWarning(signals=("x",), warmup=5)
    for _ in range(50):
        ew.update({"x": 1.0})
    for _ in range(300):  # five minutes far above the baseline: the CUSUM is capped, not thousands
        ew.update({"x": 9.0})
    assert ew.active and ew.scores()["x"] == ew.cap * ew.h
    back = next(i for i in range(200) if not (ew.update({"x": 1.0}) or ew.active))
    assert back <= ew.cap * ew.h / ew.k + ew.clear_windows + 2, back


def test_a_benign_level_shift_is_accepted_while_the_state_stays_normal():
    ew = EarlyWarning(signals=("x",), warmup=5, accept_after=30)
    for _ in range(50):
        ew.update({"x": 1.0}, normal=True)
    fired = [ew.update({"x": 3.0}, normal=True) is not None for _ in range(200)]
    assert fired.count(True) == 1  # one warning, then the new level is the baseline: no second one
    assert not ew.active
    # The same shift while the classifier says something else is not accepted.
    ew2 = EarlyWarning(signals=("x",), warmup=5, accept_after=30)
    for _ in range(50):
        ew2.update({"x": 1.0}, normal=True)
    for _ in range(200):
        ew2.update({"x": 3.0}, normal=False)
    assert ew2.active


def test_a_dip_does_not_make_the_return_to_the_usual_level_a_build_up():
    ew = EarlyWarning(signals=("x",), warmup=5, floors={"x": 0.5})
    for _ in range(60):
        ew.update({"x": 5.0})
    for _ in range(60):  # a minute of large frames only: the small-packet rate drops to zero
        assert ew.update({"x": 0.0}) is None
    assert all(ew.update({"x": 5.0}) is None for _ in range(60))
