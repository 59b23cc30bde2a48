"""Each first probe attaches to this kernel and counts a workload the test drives with known numbers, read
through the agent and the OpenTelemetry SDK's in-memory reader (the export path users get)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_ebpf_receiver.assembly import build_agent, load_probes
from otel_ebpf_receiver.config import Config
from otel_ebpf_receiver.telemetry import STATE_ATTRIBUTE

from .helpers import (data_points, exec_n_times, fail_open_n_times, metric_sum, open_file_n_times, syscall_loop,
                      unique_name)

pytestmark = [pytest.mark.bpf]

GETPPID = {"otel_ebpf_receiver.syscall.name": "getppid"}
CLOSE_EBADF = {"otel_ebpf_receiver.syscall.name": "close", "error.type": "EBADF"}


@pytest.fixture(scope="module")
def agent():
    lines: list[str] = []
    reader = InMemoryMetricReader()
    # Paths counted exactly at any rate (path_sample_shift 0), so the path counts below are exact; the default,
    # sampled beyond a rate, has its own test.
    agent = build_agent(Config(probes=["syscalls", "file_open", "exec"], exporter="none", live="off",
                               probe_settings={"file_open": {"path_sample_shift": 0}}),
                        classify=False, metric_readers=[reader], say=lines.append)
    assert [p.name for p in agent.probes] == ["syscalls", "file_open", "exec"], lines
    agent.reader = reader
    agent.step(1.0)  # baseline
    try:
        yield agent
    finally:
        agent.close()


def test_file_open_counts_a_known_number_of_opens_per_process(agent):
    comm = unique_name("fo")
    with tempfile.NamedTemporaryFile(prefix="otel-ebpf-test-") as target:
        open_file_n_times(comm, target.name, 1000)
        agent.step(1.0)
        opens = metric_sum(agent.reader, "otel_ebpf_receiver.file_opens", {"process.executable.name": comm})
        # The child opens nothing else after renaming itself; allow a few for the interpreter's exit path.
        assert 1000 <= opens <= 1005
        assert metric_sum(agent.reader, "otel_ebpf_receiver.file_open_failures", {"process.executable.name": comm}) <= 5
        top_paths = {p.attributes["file.path"]: p.value for n, p in data_points(agent.reader)
                     if n == "otel_ebpf_receiver.file_opens.top_path.rate"}
        # +1: the test itself created the file through open().
        assert 1000 <= top_paths.get(target.name, 0) <= 1001, top_paths
        # The hottest path's rate as a feature: per CPU, over the step's 1 s.
        rate = agent.last_window.values["file_open.top_path_rate_log1p"]
        ncpu = os.cpu_count() or 1
        assert math.log1p(1000 / ncpu) <= rate <= math.log1p(1001 / ncpu) + 1e-9, rate


def test_sampled_paths_weigh_what_they_stand_for_and_the_per_process_counts_stay_exact():
    """Every path sampled (none exact per jiffy), 1 in 8 at random: each counted open weighs 8, so the path's
    count is a multiple of 8 near the true one (relative standard error sqrt(8 / 20,000) = 2 %; the bound is 7
    of them), while the per-process-name count stays exact."""
    reader = InMemoryMetricReader()
    agent = build_agent(Config(probes=["file_open"], exporter="none", live="off",
                               probe_settings={"file_open": {"path_sample_shift": 3, "paths_exact_per_tick": 0}}),
                        classify=False, metric_readers=[reader], say=print)
    try:
        assert "then 1 in 8" in agent.probes[0].mode, agent.probes[0].mode
        agent.step(1.0)
        comm = unique_name("fs")
        with tempfile.NamedTemporaryFile(prefix="otel-ebpf-test-") as target:
            open_file_n_times(comm, target.name, 20000)
            agent.step(1.0)
            opens = metric_sum(reader, "otel_ebpf_receiver.file_opens", {"process.executable.name": comm})
            assert 20000 <= opens <= 20005
            top_paths = {p.attributes["file.path"]: p.value for n, p in data_points(reader)
                         if n == "otel_ebpf_receiver.file_opens.top_path.rate"}
            counted = top_paths.get(target.name, 0)
            assert counted % 8 == 0 and abs(counted - 20000) <= 0.14 * 20000, top_paths
    finally:
        agent.close()


def test_file_open_counts_failed_opens(agent):
    comm = unique_name("ff")
    fail_open_n_times(comm, f"/nonexistent/{comm}", 300)
    agent.step(1.0)
    failures = metric_sum(agent.reader, "otel_ebpf_receiver.file_open_failures", {"process.executable.name": comm})
    assert 300 <= failures <= 305


def test_exec_counts_execs_of_a_unique_binary(agent):
    created_before = metric_sum(agent.reader, "system.process.created")
    name = exec_n_times(200)
    agent.step(1.0)
    assert metric_sum(agent.reader, "otel_ebpf_receiver.exec", {"process.executable.name": name}) == 200
    assert metric_sum(agent.reader, "system.process.created") - created_before >= 200
    assert metric_sum(agent.reader, "otel_ebpf_receiver.process.exits") >= 200


def test_exec_counts_stay_exact_across_windows_that_skip_the_per_name_map():
    """A window without execs (in it or the one before) does not walk exec_counts; the per-name counts stay
    exact when execs come back."""
    import shutil
    import subprocess

    (probe,) = load_probes(["exec"], {}, print)
    name = unique_name("ex")

    def per_name(reading):
        return sum(v for metric, v, a in reading.counters
                   if metric == "otel_ebpf_receiver.exec" and a == {"process.executable.name": name})

    try:
        probe.read(1.0)
        with tempfile.TemporaryDirectory() as tmp:
            binary = os.path.join(tmp, name)
            shutil.copy("/bin/true", binary)
            for n in (30, 0, 0, 0, 7, 0, 12):
                for _ in range(n):
                    subprocess.run([binary], check=True)
                assert per_name(probe.read(1.0)) == n
    finally:
        probe.close()


def test_syscalls_counts_a_known_loop_and_its_failures(agent):
    comm = unique_name("sc")
    before = metric_sum(agent.reader, "otel_ebpf_receiver.syscalls", GETPPID)
    failed_before = metric_sum(agent.reader, "otel_ebpf_receiver.syscalls.failed",
                               CLOSE_EBADF)
    pid = syscall_loop(comm, 50_000)
    agent.step(1.0)
    getppid = metric_sum(agent.reader, "otel_ebpf_receiver.syscalls", GETPPID) - before
    assert 50_000 <= getppid <= 50_000 + 200  # other processes rarely call getppid
    ebadf = metric_sum(agent.reader, "otel_ebpf_receiver.syscalls.failed",
                       CLOSE_EBADF) - failed_before
    assert 50_000 <= ebadf <= 50_000 + 200
    top = [p for n, p in data_points(agent.reader) if n == "otel_ebpf_receiver.syscalls.top_process.rate"]
    # Per-process counts are sampled (1 in 64 per syscall number and CPU): ±10 % on 100,000 calls.
    assert any(p.attributes["process.pid"] == pid and 90_000 <= p.value <= 115_000 for p in top), \
        [(p.attributes, p.value) for p in top]


def test_every_data_point_carries_the_state(agent):
    points = list(data_points(agent.reader))
    assert points
    missing = [n for n, p in points if STATE_ATTRIBUTE not in p.attributes]
    assert not missing


def test_features_are_finite_and_named_by_the_schema(agent):
    from otel_ebpf_receiver.features import feature_names

    agent.step(1.0)
    values = agent.last_window.values
    assert set(feature_names(["syscalls", "file_open", "exec"])) <= set(values)
    assert all(v == v and abs(v) < 1e6 for v in values.values())


def test_syscalls_probe_falls_back_to_the_classic_tracepoint():
    probes = load_probes(["syscalls"], {"syscalls": {"force_tracepoint": True}}, print)
    try:
        assert probes[0].mode == "tracepoint"
        probes[0].read(1.0)
        syscall_loop(unique_name("tp"), 1000)
        reading = probes[0].read(1.0)
        assert sum(v for n, v, a in reading.counters if a.get("otel_ebpf_receiver.syscall.name") == "getppid") >= 1000
    finally:
        for p in probes:
            p.close()


def test_missing_hook_disables_only_that_probe(monkeypatch):
    from otel_ebpf_receiver import assembly
    from otel_ebpf_receiver.probes.base import Hook
    from otel_ebpf_receiver.probes.exec import ExecProbe

    class GhostProbe(ExecProbe):
        name = "ghost"
        hooks = (Hook("nonexistent_category:no_such_event"),)

    monkeypatch.setitem(assembly.REGISTRY, "ghost", GhostProbe)
    lines: list[str] = []
    probes = load_probes(["ghost", "exec"], {}, lines.append)
    try:
        assert [p.name for p in probes] == ["exec"]
        assert lines == [f"probe ghost disabled: tracepoint nonexistent_category:no_such_event not found on kernel "
                         f"{os.uname().release}"]
    finally:
        for p in probes:
            p.close()
