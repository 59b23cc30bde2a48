"""The memory probe sees memory pressure the test makes inside a memory-limited cgroup: a process that reads a
file larger than its cgroup's limit makes the kernel reclaim page cache on its behalf (stalls, no kill), and one
that allocates past the limit is killed by the OOM killer (exactly one kill). The tracepoints are system-wide, so
other pressure on the host could only add; this host has none unless a test makes it."""

from __future__ import annotations

import signal
import time

import pytest

from model_export.lab.pressure import MemoryCgroup, working_set
from otel_ebpf_receiver.probes.memory import MemoryProbe

from .helpers import unique_name

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]

LIMIT = 32 << 20


@pytest.fixture(scope="module")
def probe():
    assert MemoryProbe.unavailable_reason() is None, MemoryProbe.unavailable_reason()
    p = MemoryProbe()
    p.load()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def cgroup():
    if not MemoryCgroup.available():
        pytest.skip("no memory cgroup controller on this host")
    group = MemoryCgroup(LIMIT, unique_name("oer-mem"))
    try:
        yield group
    finally:
        group.remove()


def total(reading, name: str, **attrs) -> float:
    return sum(v for n, v, a in reading.counters if n == name and all(a.get(k) == w for k, w in attrs.items()))


KIND = "otel_ebpf_receiver.memory.reclaim.kind"
READ_FILE = ("import sys\n"
             "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
             "    while f.read(1 << 20):\n"
             "        pass\n")
ALLOCATE = ("chunks = []\n"
            "for _ in range(256):\n"
            "    chunks.append(bytearray(1 << 20))\n"  # 256 MiB, touched: far past the 32 MiB limit
            "print('survived')\n")


def test_reading_a_file_larger_than_the_cgroup_limit_stalls_in_cgroup_reclaim_without_a_kill(probe, cgroup):
    # 128 MiB on disk, 4x the limit, written back and dropped from the page cache (dirty pages cannot be dropped:
    # the reader would find them cached, charged to the writer, and never reclaim): the reader faults it in.
    with working_set(128) as big:
        probe.read(1.0)
        started = time.monotonic()
        result = cgroup.run(READ_FILE, big)
        reading = probe.read(time.monotonic() - started)
    assert result.returncode == 0, result.stderr[-300:]
    stalls = total(reading, "otel_ebpf_receiver.memory.reclaim.stalls", **{KIND: "cgroup"})
    assert stalls >= 10, reading.counters  # ~96 MiB had to be reclaimed, a batch of pages per stall
    assert total(reading, "otel_ebpf_receiver.memory.reclaim.stall_time", **{KIND: "cgroup"}) > 0
    assert total(reading, "otel_ebpf_receiver.memory.reclaimed_pages") >= (64 << 20) // 4096
    assert total(reading, "otel_ebpf_receiver.memory.oom_kills") == 0
    (histogram,) = [h for h in reading.histograms if h[0] == "otel_ebpf_receiver.memory.reclaim.stall.duration"]
    assert sum(histogram[1].values()) == total(reading, "otel_ebpf_receiver.memory.reclaim.stalls")
    assert reading.features["memory.reclaim_stall_rate_log1p"] > 0
    assert 0 < reading.features["memory.reclaim_stall_share"] <= 1
    assert reading.features["memory.oom_kill_rate_log1p"] == 0


def test_allocating_past_the_cgroup_limit_is_one_oom_kill(probe, cgroup):
    probe.read(1.0)
    started = time.monotonic()
    result = cgroup.run(ALLOCATE)
    reading = probe.read(time.monotonic() - started)
    assert result.returncode == -signal.SIGKILL and "survived" not in result.stdout, (result.returncode, result.stdout)
    assert total(reading, "otel_ebpf_receiver.memory.oom_kills") == 1
    assert total(reading, "otel_ebpf_receiver.memory.reclaim.stalls", **{KIND: "cgroup"}) >= 1  # tried first
    assert reading.features["memory.oom_kill_rate_log1p"] > 0


def test_a_quiet_window_is_all_zero(probe):
    probe.read(1.0)
    time.sleep(0.2)
    reading = probe.read(0.2)
    assert reading.features == {"memory.reclaim_stall_share": 0.0, "memory.reclaim_stall_rate_log1p": 0.0,
                                "memory.kswapd_wake_rate_log1p": 0.0, "memory.oom_kill_rate_log1p": 0.0}
    assert reading.counters == [] and reading.histograms == []
