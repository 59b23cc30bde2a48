"""What the probes cost while the agent runs: each probe's CPU time inside its BPF programs and how many times they
ran, from the kernel's own per-program accounting (``bpf_prog_info.run_time_ns`` / ``run_cnt``).

That cost is paid inside *other* processes — in every system call, context switch or packet a program is attached
to — so the agent's own CPU time does not show it; this does. The kernel counts only while BPF statistics are on,
and counting costs a clock read per program run, so it is a setting (``bpf_stats: on``), off by default; the README
("Probe cost") gives the measured price. With the setting on, :class:`BpfStats` turns statistics on with the
BPF_ENABLE_STATS fd rather than the sysctl: the kernel turns them off again when the fd closes, including when the
agent is killed, so nothing stays on behind it. (Tetragon's ``tetragon_overhead_program_seconds_total`` reads the
same fields.)
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .kernel import bpfsys
from .probes.base import COUNTER, CounterDeltas, Metric, Probe, Reading

PROBE_NAME = "otel_ebpf_receiver.probe.name"
SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
STATS_FD_LINK = "anon_inode:bpf-stats"  # what /proc/PID/fd/N points to for a BPF_ENABLE_STATS fd

ProgStats = Callable[[int], tuple[int, int]]


def kernel_prog_stats(fd: int) -> tuple[int, int]:
    """(run time ns, run count) of one program, cumulative since it was loaded."""
    info = bpfsys.prog_info(fd)
    return info.run_time_ns or 0, info.run_cnt or 0


def sysctl_enabled() -> bool | None:
    """kernel.bpf_stats_enabled as the sysctl says (None when unreadable). The sysctl shows only its own
    switch, not statistics that a process turned on with BPF_ENABLE_STATS: see :func:`stats_holders`."""
    try:
        return SYSCTL.read_text().strip() == "1"
    except OSError:
        return None


def stats_holders() -> list[tuple[int, str]]:
    """(pid, command) of every process holding a BPF_ENABLE_STATS fd, i.e. keeping statistics on."""
    holders = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            held = any(os.readlink(fd) == STATS_FD_LINK for fd in (proc / "fd").iterdir())
            if held:
                holders.append((int(proc.name), (proc / "comm").read_text().strip()))
        except OSError:  # exited meanwhile, or a kernel thread without fds
            continue
    return holders


class BpfStats:
    """Keeps the kernel's per-program statistics on while it is open."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.how = ""

    def open(self) -> str | None:
        """Turn statistics on; None when they are on, else one line saying why they are not."""
        try:
            self.fd = bpfsys.enable_stats()
            self.how = "BPF_ENABLE_STATS"
            return None
        except bpfsys.BpfError as exc:
            if sysctl_enabled():  # an older kernel, where the sysctl someone set is the only switch
                self.how = "sysctl kernel.bpf_stats_enabled=1"
                return None
            if exc.errno == errno.EINVAL:
                return ("bpf_stats on: this kernel cannot turn BPF statistics on per process (BPF_ENABLE_STATS "
                        "needs Linux 5.8); set sysctl kernel.bpf_stats_enabled=1 to report probe CPU time")
            return f"bpf_stats on: cannot turn BPF statistics on ({exc.strerror}); probe CPU time is not reported"

    def close(self) -> None:
        if self.fd is not None:
            bpfsys.close(self.fd)
            self.fd = None


class ProbeCost:
    """A MetricSource: per probe, the increase of its programs' run time (seconds) and run count each window."""

    name = "probe_cost"
    metrics = (
        Metric("otel_ebpf_receiver.probe.cpu_time", COUNTER, "s",
               "CPU time spent in the probe's BPF programs, on whichever CPU and in whichever process they ran "
               "(kernel run_time_ns; reported when bpf_stats is on).", (PROBE_NAME,)),
        Metric("otel_ebpf_receiver.probe.runs", COUNTER, "{run}",
               "Times the probe's BPF programs ran (kernel run_cnt; reported when bpf_stats is on).",
               (PROBE_NAME,)),
    )

    def __init__(self, probes: Sequence[Probe], stats: BpfStats, prog_stats: ProgStats = kernel_prog_stats) -> None:
        self.probes = list(probes)
        self.stats = stats
        self.prog_stats = prog_stats
        self._time = CounterDeltas()
        self._runs = CounterDeltas()
        self.totals(record=True)  # baseline: the first window reports that window, not everything since load

    def totals(self, record: bool = False) -> dict[str, tuple[int, int]]:
        """probe name -> (run time ns, runs) increase since the last call, summed over its programs. Probes that
        share one program (the syscall hub) share one name, ``syscalls+file_open+http``: counted once."""
        out: dict[str, tuple[int, int]] = {}
        for probe in self.probes:
            name = probe.cost_name()
            if name in out:
                continue
            time_ns = runs = 0
            for function, fd in probe.program_fds().items():
                try:
                    run_time, count = self.prog_stats(fd)
                except OSError:  # the program went away (probe closed): nothing more to count
                    continue
                time_ns += self._time.delta((name, function), run_time)
                runs += self._runs.delta((name, function), count)
            out[name] = (time_ns, runs)
        return out

    def read(self, seconds: float) -> Reading:
        reading = Reading()
        for probe, (time_ns, runs) in self.totals().items():
            attributes: Mapping[str, str] = {PROBE_NAME: probe}
            reading.counters.append(("otel_ebpf_receiver.probe.cpu_time", time_ns / 1e9, attributes))
            reading.counters.append(("otel_ebpf_receiver.probe.runs", float(runs), attributes))
        return reading

    def close(self) -> None:
        self.stats.close()


def build_probe_cost(setting: str, probes: Sequence[Probe], say: Callable[[str], None]) -> ProbeCost | None:
    """The cost source the ``bpf_stats`` setting asks for: None when it is off or statistics cannot be turned
    on (said in one line)."""
    if setting != "on":
        return None
    stats = BpfStats()
    problem = stats.open()
    if problem:
        say(problem)
        return None
    return ProbeCost(probes, stats)


__all__ = ["BpfStats", "ProbeCost", "build_probe_cost", "stats_holders", "sysctl_enabled"]
