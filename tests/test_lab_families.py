"""Issue 13, item 2: each new incident family moves the features it is there for, and its benign look-alike —
busy the same way — does not. Driven in the lab with every probe recording, as `make model` records them."""

from __future__ import annotations

import math
import statistics
import time

import pytest

from model_export.lab.connections import CONNECT_RATE
from model_export.lab.record import Recorder
from model_export.lab.scenarios import SCENARIOS, record_scenario
from otel_ebpf_receiver.probes.tcp import TcpProbe

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(420)]

PLAN = (("memory_pressure", 10), ("cache_reads", 10), ("connection_refused", 8), ("short_connections", 8),
        ("link_degraded", 12), ("paced_transfer", 8), ("random_source_udp_flood", 8))


@pytest.fixture(scope="module")
def recorded():
    """{scenario: [feature values of each of its windows]}, every scenario in one lab."""
    from model_export.lab.testbed import Testbed

    windows: dict[str, list[dict[str, float]]] = {}
    with Testbed(say=lambda line: None) as bed:
        recorder = Recorder(settings={"xdp": bed.xdp_settings}, say=lambda line: None)
        recorder.start()
        try:
            for name, seconds in PLAN:
                before = len(recorder.windows)
                record_scenario(recorder, bed, SCENARIOS[name], seconds, settle_windows=2)
                windows[name] = [values for _, _, values in recorder.windows[before:]]
                with recorder.labelled(None, settle_windows=0):
                    time.sleep(4)  # the load drains before the next, as `make model` records
        finally:
            recorder.stop()
    return windows


def median(recorded, scenario: str, feature: str) -> float:
    values = [w[feature] for w in recorded[scenario]]
    assert values, f"{scenario} recorded no window"
    return statistics.median(values)


def test_memory_pressure_stalls_in_reclaim_and_its_look_alike_never_does(recorded):
    assert median(recorded, "memory_pressure", "memory.reclaim_stall_rate_log1p") > math.log1p(10)
    assert median(recorded, "memory_pressure", "memory.reclaim_stall_share") > 0
    assert max(w["memory.reclaim_stall_rate_log1p"] for w in recorded["cache_reads"]) == 0
    assert all(w["memory.oom_kill_rate_log1p"] == 0 for name in ("memory_pressure", "cache_reads")
               for w in recorded[name])
    # Busy the same way: the look-alike reads at least as much (from the page cache).
    assert median(recorded, "cache_reads", "syscalls.rate_log1p") >= median(recorded, "memory_pressure",
                                                                            "syscalls.rate_log1p") - 0.5


def test_refused_connections_reset_and_healthy_short_connections_do_not(recorded):
    assert median(recorded, "connection_refused", "tcp.resets_rate_log1p") > math.log1p(CONNECT_RATE / 2)
    assert median(recorded, "short_connections", "tcp.resets_rate_log1p") < math.log1p(5)
    assert median(recorded, "short_connections", "tcp.new_connections_rate_log1p") > math.log1p(CONNECT_RATE / 2)
    assert median(recorded, "connection_refused", "tcp.connect_failures_rate_log1p") > math.log1p(CONNECT_RATE / 2)
    assert median(recorded, "short_connections", "tcp.connect_failures_rate_log1p") < math.log1p(5)


def test_a_degraded_link_retransmits_and_times_out_where_a_paced_transfer_does_not(recorded):
    degraded = median(recorded, "link_degraded", "tcp.retransmits_rate_log1p")
    assert degraded > math.log1p(2)
    if TcpProbe.sees_congestion():
        # What tells them apart (the feature's reason to exist): a lossy link times out, a fast clean transfer does
        # not. Their retransmit rates alone do not: a CI run's paced transfer retransmitted 4.6 a second to the
        # shaped link's 10.
        assert median(recorded, "link_degraded", "tcp.timeouts_rate_log1p") > 0
        assert median(recorded, "paced_transfer", "tcp.timeouts_rate_log1p") == 0
    else:  # retransmits are all this kernel shows
        assert degraded > median(recorded, "paced_transfer", "tcp.retransmits_rate_log1p") + 1


def test_the_link_is_shaped_on_every_port_during_the_scenario_and_not_after(bed):
    with SCENARIOS["link_degraded"].drive(bed, 1):
        assert bed.lab.switch("tc", "qdisc", "show").stdout.count("qdisc tbf") == len(bed.lab.hosts)
    assert "tbf" not in bed.lab.switch("tc", "qdisc", "show").stdout


def test_a_random_source_udp_flood_has_many_sources(recorded):
    assert SCENARIOS["random_source_udp_flood"].label == "random_source_flood"
    assert median(recorded, "random_source_udp_flood", "xdp.distinct_sources_log1p") > math.log1p(1000)
    assert median(recorded, "random_source_udp_flood", "xdp.top_source_share") < 0.05


def test_sigterm_to_the_lab_undoes_what_it_made():
    """A recording stopped by SIGTERM (kill, timeout, a CI runner) still removes its namespaces, pins, memory cgroup,
    servers and working-set file: the lab unwinds as on Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from .helpers import wait_for

    proc = subprocess.Popen([sys.executable, "-m", "model_export.lab", "record", "-o", "/dev/null", "--scenarios",
                             "memory_pressure:60"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prefix = f"oer{proc.pid}-"

    def lab_namespaces() -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]

    def memory_groups() -> list[Path]:
        roots = [Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")]
        return [g for root in roots if root.is_dir() for g in root.glob(f"oer-lab-memory-{proc.pid}")]

    try:
        assert wait_for(lambda: memory_groups(), timeout=60), "the scenario never started"
        assert lab_namespaces()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130, proc.stderr.read()[-500:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lab_namespaces() == []
    assert memory_groups() == []
    assert not list(Path("/sys/fs/bpf").glob(f"oer-lab-{proc.pid}-*"))
    assert not [f for f in os.listdir("/var/tmp") if f.startswith("oer-working-set-")]
