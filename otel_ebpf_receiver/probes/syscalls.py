"""syscalls: system calls per syscall name, failures per syscall and errno, top processes by syscall rate.

How a window reads (it runs every interval, so it is kept to a few lookups and no numpy, see kernel/maps.py):
calls per syscall number are one per-CPU element read with one lookup and compared with the previous totals
(exact, cumulative); failures per (syscall, errno) stay cumulative in their hash and are compared by key
(exact); the sampled per-process counts are drained each window (sampled already, so an increment racing
with the drain may be lost). Only the numbers that moved become Python objects, with their attributes cached.
"""

from __future__ import annotations

import errno
import math
import os
from typing import Callable

from ..kernel.maps import (KeyedDeltas, MapSnapshot, PerCpuSlots, percpu_array_u64, possible_cpus,
                           top_indices, u64_words)
from .base import COUNTER, GAUGE, Feature, Hook, Metric, Probe, Reading, TopItem, damped_share, log1p_rate, ratio
from .contract import COMMON_STATS, STAT_NEW_KEYS, STAT_UPDATE_FAILED, U32, U64, MapContract

MAX_SYSCALLS = 512  # x86_64 has ~460; all are read each window, with one lookup
NAME_REFRESH_WINDOWS = 10  # a top process's name is read again from /proc at least this often
SYSCALL_NAME = "otel_ebpf_receiver.syscall.name"  # no semantic-convention attribute names a syscall
# The live report's idle host made a few hundred calls a second, 58-61 % of them failing (polls that time out), and
# read as an incident; the lab's busy scenarios make 10^3-10^6. With 500 clean calls a second assumed, idle's 0.6
# reads ~0.2 and a busy host's share barely moves.
ERROR_SHARE_PRIOR_CALLS = 500


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
    try:  # os.open/os.read: half the cost of a Python file object, and it runs for each top process each window
        fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY)
    except OSError:
        return "[exited]"
    try:
        return os.read(fd, 64).strip().decode("utf-8", "replace")
    except OSError:
        return "[exited]"
    finally:
        os.close(fd)


class TopNames:
    """Names of the top processes, from /proc, reused while a process stays in the top N for up to ``refresh``
    windows: five procfs reads were a fifth of this probe's window. A process that stays busy across an exec shows
    its old name for at most that many windows; one that enters the top is always read afresh."""

    def __init__(self, read: Callable[[int], str] = process_name, refresh: int = NAME_REFRESH_WINDOWS) -> None:
        self._read, self._refresh = read, refresh
        self._window = 0
        self._last: dict[int, tuple[str, int]] = {}  # last window's top: pid -> (name, window it was read)
        self._this: dict[int, tuple[str, int]] = {}

    def next_window(self) -> None:
        self._window += 1
        self._last, self._this = self._this, {}

    def name(self, pid: int) -> str:
        cached = self._last.get(pid)
        if cached is None or cached[1] <= self._window - self._refresh:
            cached = (self._read(pid), self._window)
        self._this[pid] = cached
        return cached[0]


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
        Feature("syscalls.error_ratio",
                f"failed / (all system calls + {ERROR_SHARE_PRIOR_CALLS} a second): the failed share, damped when quiet"),
        Feature("syscalls.top_process_share", "share of all calls made by the busiest process"),
        Feature("syscalls.active_processes_log1p", "log1p(processes that made a call this interval)"),
    )

    # force_tracepoint: use the classic tracepoint even where the syscall hub's raw tracepoint works.
    # process_sample_shift: per-process counts are sampled every 2^shift calls (0 = count every call; the map is
    # drained each window, so an increment racing with the drain may still be lost).
    defaults = {"top_processes": 5, "max_processes": 4096, "force_tracepoint": False, "process_sample_shift": 6}
    maps = {"syscall_counts": MapContract(value={"count": f"({MAX_SYSCALLS},)<u8"}),
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
        self._errors = KeyedDeltas()
        self._attrs: dict[int, dict[str, str]] = {}  # syscall number, or (errno << 32 | nr) -> attributes
        self._ncpu_possible = possible_cpus()
        self._snapshots: dict[str, MapSnapshot] = {}
        self._counts: PerCpuSlots | None = None
        self._top_names = TopNames()
        self._drained = 0  # process_counts entries drained since load (evictions = inserted - drained)
        self._evictions = 0
        self._ncpu = os.cpu_count() or 1

    def cflags(self) -> list[str]:
        return [f"-DMAX_SYSCALLS={MAX_SYSCALLS}", f"-DMAX_PROCESSES={self.max_processes}",
                f"-DPROCESS_SAMPLE_SHIFT={self.settings['process_sample_shift']}"]

    def on_loaded(self) -> None:
        self._snapshots = {name: MapSnapshot(self.bpf[name]) for name in ("syscall_errors", "process_counts")}
        self._counts = PerCpuSlots(self.bpf["syscall_counts"])

    def syscall_name(self, nr: int) -> str:
        return syscall_name(nr, self._names)

    def _call_attrs(self, nr: int) -> dict[str, str]:
        attrs = self._attrs.get(nr)
        if attrs is None:
            attrs = self._attrs[nr] = {SYSCALL_NAME: self.syscall_name(nr)}
        return attrs

    def _error_attrs(self, key: int) -> dict[str, str]:
        attrs = self._attrs.get(key)
        if attrs is None:  # key: nr in the low 32 bits, errno in the high ones (struct error_key, little-endian)
            nr, err = key & 0xFFFFFFFF, key >> 32
            attrs = self._attrs[key] = {SYSCALL_NAME: self.syscall_name(nr), "error.type": error_type(err)}
        return attrs

    def read(self, seconds: float) -> Reading:
        reading = Reading()
        moved = self._counts.increases()  # u64 totals only grow (the array is never cleared)
        total_calls = float(sum(increase for _, increase in moved))
        attrs = self._attrs
        reading.counters.extend(("otel_ebpf_receiver.syscalls", increase, attrs.get(nr) or self._call_attrs(nr))
                                for nr, increase in moved)

        snap = self._snapshots["syscall_errors"]
        n = snap.read()  # cumulative (exact); a plain hash: keys are never evicted
        error_deltas = self._errors.update_snapshot(snap, n, snap.u64_values(n, self._ncpu_possible))
        moved = [i for i, d in enumerate(error_deltas) if d]
        total_errors = float(sum(error_deltas))
        keys = u64_words(snap.keys, n)  # struct error_key as one u64
        reading.counters.extend(("otel_ebpf_receiver.syscalls.failed", error_deltas[i],
                                 attrs.get(keys[i]) or self._error_attrs(keys[i])) for i in moved)

        stats = percpu_array_u64(self.table("stats"))  # before the drain: inserted keys it counts were drained
        snap = self._snapshots["process_counts"]
        n = snap.drain()
        self._drained += n
        pids = snap.u32_keys(n)
        samples = snap.u64_values(n, self._ncpu_possible)
        top = top_indices(samples, self.top_n)
        self._top_names.next_window()
        active = n - samples.count(0)
        for i in top:
            pid, rate = pids[i], samples[i] / seconds
            command = self._top_names.name(pid)
            reading.top.append(TopItem(f"{command} (pid {pid})", rate, "calls/s"))
            reading.gauges.append(("otel_ebpf_receiver.syscalls.top_process.rate", rate,
                                   {"process.pid": pid, "process.executable.name": command}))

        reading.map_update_failures = int(stats[STAT_UPDATE_FAILED])
        # Inserted before the stats read minus drained so far: a lower bound of the evictions, kept monotonic.
        self._evictions = max(self._evictions, int(stats[STAT_NEW_KEYS]) - self._drained)
        reading.map_evictions = self._evictions

        reading.features = {
            "syscalls.rate_log1p": log1p_rate(total_calls / self._ncpu, seconds),
            "syscalls.error_ratio": damped_share(total_errors, total_calls, seconds, ERROR_SHARE_PRIOR_CALLS),
            # per-process counts are sampled (weight 2^shift): at a few calls a second one sample can exceed the
            # total, and a share is at most 1
            "syscalls.top_process_share": min(1.0, ratio(float(samples[top[0]]), total_calls)) if top else 0.0,
            "syscalls.active_processes_log1p": math.log1p(active),
        }
        reading.rate, reading.rate_unit = total_calls / seconds, "calls/s"
        return reading
