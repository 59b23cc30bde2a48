"""Probe cost (probe_cost.py): each probe's CPU time in its BPF programs and its run count, from the kernel's
per-program statistics, reported only when the `bpf_stats` setting is on; the statistics go off again when the
agent closes; the setting parses like every other; doctor says whether statistics are on."""

from __future__ import annotations

import os
import subprocess

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_ebpf_receiver import config
from otel_ebpf_receiver.errors import ConfigError
from otel_ebpf_receiver.kernel import bpfsys
from otel_ebpf_receiver.probe_cost import STATS_FD_LINK, BpfStats, ProbeCost, stats_holders

from .helpers import REPO, metric_sum, syscall_loop, unique_name

CPU_TIME, RUNS = "otel_ebpf_receiver.probe.cpu_time", "otel_ebpf_receiver.probe.runs"
PROBE = "otel_ebpf_receiver.probe.name"


# -- the setting -----------------------------------------------------------------------------------------------
def test_bpf_stats_is_off_by_default_and_set_by_env_or_file(tmp_path):
    assert config.load(environ={}).bpf_stats == "off"
    assert config.load(environ={config.ENV_BPF_STATS: "on"}).bpf_stats == "on"
    path = tmp_path / "agent.yaml"
    path.write_text("bpf_stats: on\n")  # YAML 1.1 reads a bare `on` as true
    assert config.load({"config": str(path)}, environ={}).bpf_stats == "on"
    path.write_text("bpf_stats: off\n")
    assert config.load({"config": str(path)}, environ={}).bpf_stats == "off"


def test_a_bad_bpf_stats_value_is_one_line_naming_where_it_came_from():
    with pytest.raises(ConfigError) as caught:
        config.load(environ={config.ENV_BPF_STATS: "sometimes"})
    assert config.ENV_BPF_STATS in str(caught.value) and "off or on" in str(caught.value)
    assert "\n" not in str(caught.value)


# -- per-window increases, without a kernel --------------------------------------------------------------------
class FakeProbe:
    def __init__(self, name: str, fds: dict[str, int]) -> None:
        self.name, self.fds = name, fds

    def program_fds(self) -> dict[str, int]:
        return self.fds

    def cost_name(self) -> str:
        return self.name


def test_each_window_reports_the_increase_summed_over_a_probes_programs():
    kernel = {10: (1_000, 5), 11: (2_000, 7), 20: (500, 1)}  # fd -> cumulative (run time ns, runs)
    probes = [FakeProbe("http", {"enter_read": 10, "exit_read": 11}), FakeProbe("exec", {"exec": 20})]
    cost = ProbeCost(probes, BpfStats(), prog_stats=lambda fd: kernel[fd])
    kernel.update({10: (4_000, 8), 11: (2_500, 9), 20: (500, 1)})
    counters = {(name, attrs[PROBE]): value for name, value, attrs in cost.read(1.0).counters}
    assert counters == {(CPU_TIME, "http"): 3_500 / 1e9, (RUNS, "http"): 5.0,
                        (CPU_TIME, "exec"): 0.0, (RUNS, "exec"): 0.0}


def test_a_program_that_went_away_stops_counting_without_failing_the_window():
    def prog_stats(fd: int) -> tuple[int, int]:
        if fd == 11:
            raise bpfsys.BpfError(9, "Bad file descriptor")
        return 100, 1

    cost = ProbeCost([FakeProbe("http", {"a": 10, "b": 11})], BpfStats(), prog_stats=prog_stats)
    assert [value for _, value, _ in cost.read(1.0).counters] == [0.0, 0.0]


# -- with the kernel -------------------------------------------------------------------------------------------
def build(bpf_stats: str, reader: InMemoryMetricReader):
    from otel_ebpf_receiver.assembly import build_agent

    cfg = config.Config(probes=["syscalls"], exporter="none", live="off", bpf_stats=bpf_stats)
    return build_agent(cfg, classify=False, metric_readers=[reader], say=print)


def holds_stats_fd() -> bool:
    fds = os.listdir("/proc/self/fd")
    return any(_readlink(f"/proc/self/fd/{fd}") == STATS_FD_LINK for fd in fds)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


@pytest.mark.bpf
@pytest.mark.timeout(120)
def test_with_bpf_stats_on_the_syscalls_probe_reports_its_cpu_time_and_runs_growing_under_load():
    reader = InMemoryMetricReader()
    agent = build("on", reader)
    try:
        assert holds_stats_fd(), "bpf_stats on must hold a BPF_ENABLE_STATS fd"
        agent.step(1.0)
        syscall_loop(unique_name("pc"), 20_000)
        agent.step(1.0)
        first_time, first_runs = metric_sum(reader, CPU_TIME, {PROBE: "syscalls"}), \
            metric_sum(reader, RUNS, {PROBE: "syscalls"})
        assert first_runs >= 40_000  # 20,000 getppid + 20,000 close(-1), each one sys_exit run
        assert first_time > 0
        syscall_loop(unique_name("pc"), 20_000)
        agent.step(1.0)
        assert metric_sum(reader, RUNS, {PROBE: "syscalls"}) >= first_runs + 40_000
        assert metric_sum(reader, CPU_TIME, {PROBE: "syscalls"}) > first_time
        # Nanoseconds become seconds: tens of thousands of runs take well under a second, and more than 1 ns each.
        assert first_runs * 1e-9 < first_time < 1.0
    finally:
        agent.close()
    assert not holds_stats_fd(), "closing the agent must turn the statistics off again"


@pytest.mark.bpf
@pytest.mark.timeout(120)
def test_with_bpf_stats_off_the_cost_metrics_are_absent():
    reader = InMemoryMetricReader()
    agent = build("off", reader)
    try:
        assert not holds_stats_fd()
        agent.step(1.0)
        syscall_loop(unique_name("pc"), 5_000)
        agent.step(1.0)
        assert metric_sum(reader, "otel_ebpf_receiver.syscalls") > 0  # the probe itself works
        names = {metric.name for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
                 for metric in sm.metrics}
        assert CPU_TIME not in names and RUNS not in names
    finally:
        agent.close()


@pytest.mark.bpf
def test_program_info_names_the_program_and_its_id_as_bpftool_does():
    from otel_ebpf_receiver.probes.syscalls import SyscallsProbe

    probe = SyscallsProbe()
    probe.load()
    try:
        (function, fd), = probe.program_fds().items()
        info = bpfsys.prog_info(fd)
        shown = subprocess.run(["bpftool", "prog", "show", "id", str(info.id)], capture_output=True, text=True,
                               timeout=10).stdout
        assert f"{info.id}:" in shown and f"name {info.name}" in shown and info.name and info.name in function
        assert info.run_time_ns is not None and info.run_cnt is not None
    finally:
        probe.close()


@pytest.mark.bpf
@pytest.mark.timeout(60)
def test_doctor_says_whether_statistics_are_on_and_what_the_setting_is():
    env = {**os.environ, config.ENV_BPF_STATS: "on"}
    out = subprocess.run([str(REPO / ".venv/bin/otel-ebpf-receiver"), "doctor"], capture_output=True, text=True,
                         env=env, timeout=60).stdout
    line = next(line for line in out.splitlines() if "BPF statistics" in line)
    assert "kernel.bpf_stats_enabled=" in line and f"bpf_stats: on ({config.ENV_BPF_STATS})" in line
    stats = BpfStats()
    assert stats.open() is None
    try:
        assert os.getpid() in [pid for pid, _ in stats_holders()]
    finally:
        stats.close()
    assert os.getpid() not in [pid for pid, _ in stats_holders()]
