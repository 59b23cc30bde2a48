"""The bundled state models tell performance degradation and API misbehaviour apart from normal: each test drives
one condition in the scenario lab against the agent as `run` assembles it and reads the state it reports.

* io_degraded: a database reading its volume (a loop device in direct-I/O mode) at a steady rate is normal; its
  storage capped to a tenth (a block cgroup) is io_degraded; uncapped, normal again.
* cpu_saturated: every CPU busy twice over (stress-ng) while the web clients keep asking.
* api_degraded: the lab's API answers every other request 503, all of them late; healthy again, normal.

Each runs twice: with every probe (XDP on the lab victim: network.onnx serves) and without the XDP probe (the
host-only default.onnx serves). Mitigation is off: these are not attacks, and nothing may be blocked anyway."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Callable, Iterator

import pytest

from model_export.lab import workloads
from model_export.lab.detection import AgentRig
from model_export.lab.testbed import Testbed, http_load
from model_export.lab.traffic import api_degraded
from otel_ebpf_receiver.probes import DEFAULT_PROBES

from .helpers import wait_for

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

SETTLE_S = 40.0       # how long the agent may take to report normal before a condition starts
CONDITION_S = 16.0    # how long each condition lasts
RECOVER_S = 25.0      # how long it may take to report normal again after
LOAD_S = SETTLE_S * 3 + CONDITION_S + RECOVER_S + 30  # time bound of the background loads

MODELS = {
    "network.onnx": (),                                               # every probe
    "default.onnx": tuple(name for name in DEFAULT_PROBES if name != "xdp"),
}


def seen(r: AgentRig, since: int) -> list[tuple[str, str, float]]:
    return [(w.state, w.raw_state, round(w.score, 2)) for w in r.windows[since:]]


@contextlib.contextmanager
def agent(bed: Testbed, model: str) -> Iterator[AgentRig]:
    r = AgentRig(bed, mode="off", probes=MODELS[model], say=lambda line: None)
    try:
        r.start()
        assert model in " ".join(r.lines), r.lines  # the model these tests mean is the one serving
        yield r
    finally:
        r.close()


def settle(r: AgentRig) -> None:
    ok = wait_for(lambda: [w.state for w in r.windows[-3:]] == ["normal"] * 3, SETTLE_S)
    assert ok, f"never settled on normal: {seen(r, -15)}"


def check_condition(r: AgentRig, state: str, drive: Callable[[], contextlib.AbstractContextManager]) -> None:
    """``drive`` on for CONDITION_S: the reported state becomes ``state`` (most windows once it had time to
    enter); off: normal again."""
    start = len(r.windows)
    with drive():
        time.sleep(CONDITION_S)
        during = seen(r, start)
    entered = during[4:]  # the first windows: load starting, and the debounce (2 windows to enter)
    counts = Counter(s for s, _, _ in entered)
    assert counts[state] >= len(entered) / 2, f"expected mostly {state}: {during}"
    stop = len(r.windows)
    back = wait_for(lambda: [w.state for w in r.windows[-2:]] == ["normal"] * 2 and len(r.windows) > stop + 2,
                    RECOVER_S)
    assert back, f"not normal again after {state}: {seen(r, stop)}"


@pytest.mark.parametrize("model", MODELS)
def test_a_slowed_database_volume_is_io_degraded(bed, model):
    with agent(bed, model) as r, http_load(bed, LOAD_S), workloads.database_reads(LOAD_S) as volume:
        settle(r)  # the healthy database is part of normal
        check_condition(r, "io_degraded", volume.slowed)


@pytest.mark.parametrize("model", MODELS)
def test_cpu_saturation_is_cpu_saturated(bed, model):
    with agent(bed, model) as r, http_load(bed, LOAD_S):
        settle(r)
        check_condition(r, "cpu_saturated", lambda: workloads.cpu_saturated(CONDITION_S + 5))


@pytest.mark.parametrize("model", MODELS)
def test_a_failing_slow_api_is_api_degraded(bed, model):
    with agent(bed, model) as r, http_load(bed, LOAD_S) as load:
        settle(r)
        began = time.time()
        check_condition(r, "api_degraded", lambda: api_degraded(bed, CONDITION_S))
        ok, sent = load.success(since=began, until=began + CONDITION_S)
        assert 0 < ok < sent  # the API really failed part of its requests, and answered the rest
        # explained by an HTTP feature (model/contract.py, "Explanations"), not by whatever else moved
        entered = [e.attributes for e in r.events("system.state.change")
                   if e.attributes["system.state.to"] == "api_degraded"]
        assert entered and entered[0]["system.state.top_feature.1"].startswith("http."), entered
