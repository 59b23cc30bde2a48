"""file_open: file opens and failed opens per process name; the most-opened paths (the talk's "how many times is
this file opened").

How a window reads (kept to two batch reads and plain Python, see kernel/maps.py): opens and failures per process
name stay cumulative in their per-CPU hash (exact counts) and are compared by key; the path counts are
drained each window (a top-N view: an increment racing with the drain may be lost), so the read holds only the
paths opened this window instead of every path the LRU map still remembers. Only the names that moved and the top
paths become Python objects.

Cost (README, "Probe cost"): the per-name counts are exact; the paths are counted exactly up to
``paths_exact_per_tick`` successful opens per CPU per jiffy, and beyond that 1 in 2^``path_sample_shift`` at random,
weighing 2^k (the kernel applies the weight, so the map reads as before): a web server opening a file per request
pays the path copy and its hash for one request in eight, and its top paths are unbiased estimates.
"""

from __future__ import annotations

import ctypes as ct
import os
from itertools import chain

from ..kernel.maps import KeyedDeltas, MapSnapshot, per_cpu_columns, percpu_array_u64, top_indices, u64_words
from .base import (COUNTER, GAUGE, Feature, Hook, Metric, Probe, Reading, TopItem, decode_comm, hook_exists,
                   log1p_rate, ratio)
from .contract import COMMON_STATS, STAT_NEW_KEYS, STAT_UPDATE_FAILED, U64, MapContract

OPTIONAL_HOOKS = {"HAVE_SYS_ENTER_OPEN": "open", "HAVE_SYS_ENTER_OPENAT2": "openat2"}


class FileOpenProbe(Probe):
    name = "file_open"
    summary = "file opens and failures per process, most-opened paths"
    hooks = (Hook("syscalls:sys_enter_openat"), Hook("syscalls:sys_exit_openat"))
    metrics = (
        Metric("otel_ebpf_receiver.file_opens", COUNTER, "{open}", "open/openat/openat2 calls, per process name.",
               ("process.executable.name",)),
        Metric("otel_ebpf_receiver.file_open_failures", COUNTER, "{open}",
               "open/openat/openat2 calls that failed, per process name.", ("process.executable.name",)),
        Metric("otel_ebpf_receiver.file_opens.top_path.rate", GAUGE, "{open}/s",
               "Successful opens per second of the most-opened paths this interval (top N only).", ("file.path",)),
    )
    features = (
        Feature("file_open.rate_log1p", "log1p(file opens per second per CPU)"),
        Feature("file_open.failure_ratio", "failed / all opens"),
        Feature("file_open.top_path_share", "share of successful opens that went to the most-opened path"),
        # A share alone cannot tell one file opened 200,000 times a second from a quiet host's one open.
        Feature("file_open.top_path_rate_log1p", "log1p(opens per second per CPU of the most-opened path)"),
    )

    # force_tracepoint: the classic openat/open/openat2 tracepoints even where the syscall hub works.
    # path_sample_shift: beyond paths_exact_per_tick successful opens per CPU per jiffy, count 1 path in 2^k
    # (0: count every one).
    defaults = {"top_paths": 5, "max_paths": 4096, "force_tracepoint": False, "path_sample_shift": 3,
                "paths_exact_per_tick": 16}
    maps = {"comm_counts": MapContract(key={"comm": None}, value={"opens": U64, "failed": U64}),
            "path_counts": MapContract(key={"path": None}, value=U64),
            "stats": MapContract(value=U64)}
    c_constants = COMMON_STATS
    syscall_hub = True

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.top_n = self.settings["top_paths"]
        self.max_paths = self.settings["max_paths"]
        self.sample_shift = min(max(int(self.settings["path_sample_shift"]), 0), 16)
        self._comms = KeyedDeltas()  # (opens, failed) per process name, cumulative in the kernel
        self._attrs: dict[bytes, dict[str, str]] = {}  # comm -> attributes
        self._drained = 0  # path_counts entries drained since load (evictions = inserted - drained)
        self._evictions = 0
        self._ncpu = os.cpu_count() or 1

    def cflags(self) -> list[str]:
        flags = [f"-DMAX_PATHS={self.max_paths}", f"-DPATH_SAMPLE_SHIFT={self.sample_shift}",
                 f"-DPATHS_EXACT_PER_TICK={max(int(self.settings['paths_exact_per_tick']), 0)}"]
        for define, syscall in OPTIONAL_HOOKS.items():
            if hook_exists(Hook(f"syscalls:sys_enter_{syscall}")) and hook_exists(Hook(f"syscalls:sys_exit_{syscall}")):
                flags.append(f"-D{define}")
        return flags

    def on_loaded(self) -> None:
        self._comm_snapshot = MapSnapshot(self.bpf["comm_counts"])
        self._path_snapshot = MapSnapshot(self.bpf["path_counts"])
        table = self.bpf["comm_counts"]
        self._comm_cpus = ct.sizeof(table.Leaf) // ct.sizeof(table.sLeaf)
        if self.hub is None:
            self.mode = "tracepoint (" + ", ".join(
                ["openat"] + [s for d, s in OPTIONAL_HOOKS.items() if f"-D{d}" in self.cflags()]) + ")"
        if self.sample_shift:
            self.mode += (f", paths counted exactly up to {self.settings['paths_exact_per_tick']}/CPU/jiffy, "
                          f"then 1 in {1 << self.sample_shift}")

    def read(self, seconds: float) -> Reading:
        reading = Reading()
        snap = self._comm_snapshot
        n = snap.read()
        # struct open_counts {opens, failed} per CPU -> opens, failed totals per name, flat as (opens, failed) pairs
        opens, failed = per_cpu_columns(u64_words(snap.values, n * self._comm_cpus * 2), self._comm_cpus, 2)
        deltas = self._comms.update_snapshot(snap, n, list(chain.from_iterable(zip(opens, failed))), columns=2)
        total_opens = float(sum(deltas[0::2]))
        total_failed = float(sum(deltas[1::2]))
        for i, (d_opens, d_failed) in enumerate(zip(deltas[0::2], deltas[1::2])):
            if not (d_opens or d_failed):
                continue
            comm = snap.keys[i].comm  # bytes up to the NUL
            attrs = self._attrs.get(comm)
            if attrs is None:
                attrs = self._attrs[comm] = {"process.executable.name": decode_comm(comm)}
            if d_opens:
                reading.counters.append(("otel_ebpf_receiver.file_opens", d_opens, attrs))
            if d_failed:
                reading.counters.append(("otel_ebpf_receiver.file_open_failures", d_failed, attrs))

        stats = percpu_array_u64(self.table("stats"))  # before the drain: inserted keys it counts were drained
        snap = self._path_snapshot
        n = snap.drain()
        self._drained += n
        hits = snap.u64_values(n)
        successful = float(sum(hits))
        top = top_indices(hits, self.top_n)
        for i in top:
            path = snap.keys[i].path.decode("utf-8", "replace")  # ctypes stops at the NUL
            rate = float(hits[i]) / seconds
            reading.top.append(TopItem(path, rate, "opens/s"))
            reading.gauges.append(("otel_ebpf_receiver.file_opens.top_path.rate", rate, {"file.path": path}))

        reading.map_update_failures = int(stats[STAT_UPDATE_FAILED])
        # Inserted before the stats read minus drained so far: a lower bound of the evictions, kept monotonic.
        self._evictions = max(self._evictions, int(stats[STAT_NEW_KEYS]) - self._drained)
        reading.map_evictions = self._evictions
        reading.rate, reading.rate_unit = total_opens / seconds, "opens/s"
        reading.features = {
            "file_open.rate_log1p": log1p_rate(total_opens / self._ncpu, seconds),
            "file_open.failure_ratio": ratio(total_failed, total_opens),
            "file_open.top_path_share": ratio(float(hits[top[0]]), successful) if len(top) else 0.0,
            "file_open.top_path_rate_log1p": log1p_rate(float(hits[top[0]]) / self._ncpu, seconds) if len(top) else 0.0,
        }
        return reading
