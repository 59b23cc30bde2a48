"""block_io attaches to this kernel and counts direct I/O of a known size on a loop device of its own, through the
agent and the SDK's in-memory reader."""

from __future__ import annotations

import math
import os
import subprocess
import tempfile

import pytest

from otel_ebpf_receiver.probes.base import Hook
from otel_ebpf_receiver.probes.block_io import BlockIoProbe, device_name
from otel_ebpf_receiver.telemetry import STATE_ATTRIBUTE

from .helpers import data_points, make_agent, metric_sum

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def loop_device():
    """A 64 MiB file-backed loop device of our own, always detached."""
    with tempfile.TemporaryDirectory(prefix="otel-ebpf-blk-") as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as fh:
            fh.truncate(64 << 20)
        device = subprocess.run(["losetup", "--find", "--show", image], check=True, capture_output=True,
                                text=True, timeout=30).stdout.strip()
        try:
            yield device
        finally:
            subprocess.run(["losetup", "-d", device], check=False, timeout=30)


@pytest.fixture(scope="module", params=[True, False], ids=["insert-to-complete", "issue-to-complete"])
def agent(request):
    agent = make_agent(BlockIoProbe({"include_queue_time": request.param}))
    try:
        yield agent
    finally:
        agent.close()


def dd(*args: str) -> None:
    subprocess.run(["dd", *args, "status=none"], check=True, timeout=60)


def test_device_names_come_from_sysfs(loop_device):
    major, minor = os.major(os.stat(loop_device).st_rdev), os.minor(os.stat(loop_device).st_rdev)
    assert device_name(major << 20 | minor, {}) == os.path.basename(loop_device)
    assert device_name(4095 << 20 | 12345, {}) == "4095:12345"  # no such device: major:minor


def test_direct_reads_of_a_known_size_are_counted(agent, loop_device):
    name = os.path.basename(loop_device)
    where = {"system.device": name, "disk.io.direction": "read"}
    ops_before = metric_sum(agent.reader, "system.disk.operations", where)
    bytes_before = metric_sum(agent.reader, "system.disk.io", where)
    dd(f"if={loop_device}", "of=/dev/null", "bs=4k", "count=1500", "iflag=direct")
    agent.step(1.0)
    ops = metric_sum(agent.reader, "system.disk.operations", where) - ops_before
    nbytes = metric_sum(agent.reader, "system.disk.io", where) - bytes_before
    # O_DIRECT, one 4 KiB request at a time: nothing to merge or read ahead. Nobody else reads our loop device.
    assert 1500 <= ops <= 1502
    assert 1500 * 4096 <= nbytes <= 1502 * 4096
    assert metric_sum(agent.reader, "system.disk.operation_time", where) > 0

    histograms = [p for n, p in data_points(agent.reader)
                  if n == "otel_ebpf_receiver.disk.request.duration" and p.attributes.get("system.device") == name
                  and p.attributes.get("disk.io.direction") == "read"]
    assert sum(p.count for p in histograms) == metric_sum(agent.reader, "system.disk.operations", where)
    assert all(p.sum > 0 and STATE_ATTRIBUTE in p.attributes for p in histograms)
    features = agent.last_window.values
    assert features["block_io.read_ops_rate_log1p"] > 5  # >= 1500 reads in a 1 s window
    assert 0 < features["block_io.latency_p50_log1p_us"] <= features["block_io.latency_p99_log1p_us"]
    # r_await: the mean of this window's reads (our 1500 and whatever else read) — the probe's own operation_time
    # over its operations, within what the log2 buckets say.
    await_us = math.expm1(features["block_io.read_await_log1p_us"])
    assert 0 < await_us <= math.expm1(features["block_io.latency_p99_log1p_us"]) * 2


def test_sustained_read_await_is_the_smallest_of_three_windows(agent, loop_device):
    """Reads in three windows in a row: the sustained feature is the smallest of their three means, then a fresh
    probe (no history) says 0 until it has three windows, its baseline step's included."""
    awaits = []
    for _ in range(3):
        dd(f"if={loop_device}", "of=/dev/null", "bs=4k", "count=300", "iflag=direct")
        agent.step(1.0)
        awaits.append(agent.last_window.values["block_io.read_await_log1p_us"])
    assert min(awaits) > 0  # our reads were in every window
    assert agent.last_window.values["block_io.read_await_sustained_log1p_us"] == min(awaits)

    # A fresh probe's baseline step is its first window: whatever the host read meanwhile (a CI run's own reads made
    # it > 0) is one of the three. With two windows it says 0; with the third, the smallest of all three.
    fresh = make_agent(BlockIoProbe({"include_queue_time": True}))
    try:
        fresh_awaits = [fresh.last_window.values["block_io.read_await_log1p_us"]]
        assert fresh.last_window.values["block_io.read_await_sustained_log1p_us"] == 0.0
        for _ in range(2):
            dd(f"if={loop_device}", "of=/dev/null", "bs=4k", "count=300", "iflag=direct")
            fresh.step(1.0)
            fresh_awaits.append(fresh.last_window.values["block_io.read_await_log1p_us"])
            assert fresh_awaits[-1] > 0
            if len(fresh_awaits) < 3:
                assert fresh.last_window.values["block_io.read_await_sustained_log1p_us"] == 0.0
        assert fresh.last_window.values["block_io.read_await_sustained_log1p_us"] == min(fresh_awaits)
    finally:
        fresh.close()
        agent.step(1.0)  # the module's agent saw the fresh one's reads too: count them now, not in the next test


def test_direct_writes_are_counted_per_direction(agent, loop_device):
    name = os.path.basename(loop_device)
    where = {"system.device": name, "disk.io.direction": "write"}
    ops_before = metric_sum(agent.reader, "system.disk.operations", where)
    bytes_before = metric_sum(agent.reader, "system.disk.io", where)
    reads_before = metric_sum(agent.reader, "system.disk.operations", {**where, "disk.io.direction": "read"})
    dd("if=/dev/zero", f"of={loop_device}", "bs=64k", "count=200", "oflag=direct")
    agent.step(1.0)
    ops = metric_sum(agent.reader, "system.disk.operations", where) - ops_before
    nbytes = metric_sum(agent.reader, "system.disk.io", where) - bytes_before
    assert 200 <= ops <= 202
    assert 200 * 65536 <= nbytes <= 200 * 65536 + 2 * 4096
    assert metric_sum(agent.reader, "system.disk.operations", {**where, "disk.io.direction": "read"}) == reads_before


def test_inflight_gauge_reports_the_device(agent, loop_device):
    name = os.path.basename(loop_device)
    dd(f"if={loop_device}", "of=/dev/null", "bs=4k", "count=10", "iflag=direct")
    agent.step(1.0)
    inflight = [p.value for n, p in data_points(agent.reader)
                if n == "otel_ebpf_receiver.disk.inflight" and p.attributes.get("system.device") == name]
    assert inflight and all(v >= 0 for v in inflight)


def test_queue_depth_is_the_windows_request_time_over_its_length(agent, loop_device):
    """iostat's aqu-sz: the requests' time in the window (what system.disk.operation_time adds, every disk and
    direction) divided by the window's length."""
    time_before = metric_sum(agent.reader, "system.disk.operation_time", {})
    dd(f"if={loop_device}", "of=/dev/null", "bs=4k", "count=300", "iflag=direct")
    agent.step(2.0)
    busy_seconds = metric_sum(agent.reader, "system.disk.operation_time", {}) - time_before
    assert busy_seconds > 0
    assert agent.last_window.values["block_io.queue_depth_log1p"] == pytest.approx(math.log1p(busy_seconds / 2.0))


def test_a_missing_hook_gives_one_line():
    class NoBlockLayer(BlockIoProbe):
        hooks = (Hook("block:no_such_event"),)

    reason = NoBlockLayer.unavailable_reason()
    assert reason and "\n" not in reason and "block:no_such_event" in reason
