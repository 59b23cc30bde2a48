"""syscalls: system calls per syscall name, failures per syscall and errno, top processes by syscall rate."""

from __future__ import annotations

import errno
import math
import os

import numpy as np

from ..kernel.maps import KeyedDeltas, MapSnapshot, percpu_array_u64, possible_cpus, top_indices
from .base import (COUNTER, GAUGE, CounterDeltas, Feature, Hook, Metric, Probe, Reading, TopItem, log1p_rate,
                   ratio)
from .contract import COMMON_STATS, STAT_NEW_KEYS, STAT_UPDATE_FAILED, U32, U64, MapContract

MAX_SYSCALLS = 512  # x86_64 has ~460; every slot is read each window
SYSCALL_NAME = "otel_ebpf_receiver.syscall.name"  # no semantic-convention attribute names a syscall


def _syscall_names() -> dict[int, str]:
    from bcc.syscall import syscalls  # number -> bytes name, for this arch

    return {nr: name.decode() for nr, name in syscalls.items()}


def syscall_name(nr: int, names: dict[int, str]) -> str:
    """Syscall number -> syscall.name from this arch's table, or syscall_<nr> for a number it does not know."""
    return names.get(nr, f"syscall_{nr}")


def error_type(err: int) -> str:
    """errno value -> error.type: its symbolic name (ENOENT), or the number when this platform has no name for it."""
    return errno.errorcode.get(err, str(err))


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as fh:
            return fh.read().strip().decode("utf-8", "replace")
    except OSError:
        return "[exited]"


class SyscallsProbe(Probe):
    name = "syscalls"
    summary = "system calls per name, failures per errno, busiest processes"
    hooks = (Hook("raw_syscalls:sys_exit"),)
    metrics = (
        Metric("otel_ebpf_receiver.syscalls", COUNTER, "{call}", "System calls completed, per syscall name.",
               (SYSCALL_NAME,)),
        Metric("otel_ebpf_receiver.syscalls.failed", COUNTER, "{call}",
               "System calls that returned an error, per syscall name and errno.", (SYSCALL_NAME, "error.type")),
        Metric("otel_ebpf_receiver.syscalls.top_process.rate", GAUGE, "{call}/s",
               "System call rate of the busiest processes this interval (top N only, bounded cardinality).",
               ("process.pid", "process.executable.name")),
    )
    features = (
        Feature("syscalls.rate_log1p", "log1p(system calls per second per CPU)"),
        Feature("syscalls.error_ratio", "failed / all system calls"),
        Feature("syscalls.top_process_share", "share of all calls made by the busiest process"),
        Feature("syscalls.active_processes_log1p", "log1p(processes that made a call this interval)"),
    )

    # force_tracepoint: use the classic tracepoint even where the syscall hub's raw tracepoint works.
    # process_sample_shift: per-process counts are sampled every 2^shift calls (0 = count every call, exact).
    defaults = {"top_processes": 5, "max_processes": 10240, "force_tracepoint": False, "process_sample_shift": 6}
    maps = {"syscall_counts": MapContract(value=U64),
            "syscall_errors": MapContract(key={"nr": None, "err": None}, value=U64),
            "process_counts": MapContract(key=U32, value=U64),
            "stats": MapContract(value=U64)}
    c_constants = COMMON_STATS
    syscall_hub = True

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.top_n = self.settings["top_processes"]
        self.max_processes = self.settings["max_processes"]
        self._names = _syscall_names()
        self._calls = CounterDeltas()
        self._errors = CounterDeltas()
        self._procs = KeyedDeltas()
        self._ncpu_possible = possible_cpus()
        self._snapshots: dict[str, MapSnapshot] = {}
        self._ncpu = os.cpu_count() or 1

    def cflags(self) -> list[str]:
        return [f"-DMAX_SYSCALLS={MAX_SYSCALLS}", f"-DMAX_PROCESSES={self.max_processes}",
                f"-DPROCESS_SAMPLE_SHIFT={self.settings['process_sample_shift']}"]

    def on_loaded(self) -> None:
        self._snapshots = {name: MapSnapshot(self.bpf[name]) for name in ("syscall_errors", "process_counts")}

    def syscall_name(self, nr: int) -> str:
        return syscall_name(nr, self._names)

    def read(self, seconds: float) -> Reading:
        reading = Reading()
        total_calls = 0.0
        counts = percpu_array_u64(self.bpf["syscall_counts"])
        for nr in counts.nonzero()[0]:
            delta = self._calls.delta(int(nr), int(counts[nr]))
            if delta:
                total_calls += delta
                reading.counters.append(("otel_ebpf_receiver.syscalls", delta,
                                         {SYSCALL_NAME: self.syscall_name(int(nr))}))

        total_errors = 0.0
        snap = self._snapshots["syscall_errors"]
        n = snap.read()
        for i in range(n):
            key = snap.keys[i]
            delta = self._errors.delta((key.nr, key.err), int(sum(snap.values[i])))
            if delta:
                total_errors += delta
                reading.counters.append(("otel_ebpf_receiver.syscalls.failed", delta, {
                    SYSCALL_NAME: self.syscall_name(key.nr),
                    "error.type": error_type(key.err),
                }))

        snap = self._snapshots["process_counts"]
        n = snap.read()
        pids = snap.u32_keys(n)
        deltas = self._procs.update(pids.astype(np.uint64), snap.u64_values(n, self._ncpu_possible))
        top = top_indices(deltas, self.top_n)
        active = int(np.count_nonzero(deltas))
        for i in top:
            pid, rate = int(pids[i]), float(deltas[i]) / seconds
            command = process_name(pid)
            reading.top.append(TopItem(f"{command} (pid {pid})", rate, "calls/s"))
            reading.gauges.append(("otel_ebpf_receiver.syscalls.top_process.rate", rate,
                                   {"process.pid": pid, "process.executable.name": command}))

        stats = percpu_array_u64(self.table("stats"))
        reading.map_update_failures = int(stats[STAT_UPDATE_FAILED])
        reading.map_evictions = max(0, int(stats[STAT_NEW_KEYS]) - n)

        reading.features = {
            "syscalls.rate_log1p": log1p_rate(total_calls / self._ncpu, seconds),
            "syscalls.error_ratio": ratio(total_errors, total_calls),
            # per-process counts are sampled (weight 2^shift): at a few calls a second one sample can exceed the
            # total, and a share is at most 1
            "syscalls.top_process_share": min(1.0, ratio(float(deltas[top[0]]), total_calls)) if len(top) else 0.0,
            "syscalls.active_processes_log1p": math.log1p(active),
        }
        reading.rate, reading.rate_unit = total_calls / seconds, "calls/s"
        return reading
