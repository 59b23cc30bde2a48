"""file_open: file opens and failed opens per process name; the most-opened paths (the talk's "how many times is
this file opened")."""

from __future__ import annotations

import os


from ..kernel.maps import KeyedDeltas, MapSnapshot, percpu_array_u64, top_indices
from .base import (COUNTER, GAUGE, CounterDeltas, Feature, Hook, Metric, Probe, Reading, TopItem, decode_comm,
                   hook_exists, log1p_rate, ratio)
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
    )

    # force_tracepoint: the classic openat/open/openat2 tracepoints even where the syscall hub works.
    defaults = {"top_paths": 5, "max_paths": 8192, "force_tracepoint": False}
    maps = {"comm_counts": MapContract(key={"comm": None}, value={"opens": U64, "failed": U64}),
            "path_counts": MapContract(key={"path": None}, value=U64),
            "stats": MapContract(value=U64)}
    c_constants = COMMON_STATS
    syscall_hub = True

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.top_n = self.settings["top_paths"]
        self.max_paths = self.settings["max_paths"]
        self._opens = CounterDeltas()
        self._failed = CounterDeltas()
        self._paths = KeyedDeltas()
        self._ncpu = os.cpu_count() or 1

    def cflags(self) -> list[str]:
        flags = [f"-DMAX_PATHS={self.max_paths}"]
        for define, syscall in OPTIONAL_HOOKS.items():
            if hook_exists(Hook(f"syscalls:sys_enter_{syscall}")) and hook_exists(Hook(f"syscalls:sys_exit_{syscall}")):
                flags.append(f"-D{define}")
        return flags

    def on_loaded(self) -> None:
        self._comm_snapshot = MapSnapshot(self.bpf["comm_counts"])
        self._path_snapshot = MapSnapshot(self.bpf["path_counts"])
        if self.hub is None:
            self.mode = "tracepoint (" + ", ".join(
                ["openat"] + [s for d, s in OPTIONAL_HOOKS.items() if f"-D{d}" in self.cflags()]) + ")"

    def read(self, seconds: float) -> Reading:
        reading = Reading()
        total_opens = total_failed = 0.0
        snap = self._comm_snapshot
        for i in range(snap.read()):
            comm = decode_comm(snap.keys[i].comm)
            per_cpu = snap.values[i]
            opens = sum(v.opens for v in per_cpu)
            failed = sum(v.failed for v in per_cpu)
            d_opens, d_failed = self._opens.delta(comm, opens), self._failed.delta(comm, failed)
            attrs = {"process.executable.name": comm}
            if d_opens:
                total_opens += d_opens
                reading.counters.append(("otel_ebpf_receiver.file_opens", d_opens, attrs))
            if d_failed:
                total_failed += d_failed
                reading.counters.append(("otel_ebpf_receiver.file_open_failures", d_failed, attrs))

        snap = self._path_snapshot
        n = snap.read()
        deltas = self._paths.update(KeyedDeltas.key_ids(snap, n), snap.u64_values(n))
        successful = float(deltas.sum())
        top = top_indices(deltas, self.top_n)
        for i in top:
            path = snap.keys[i].path.decode("utf-8", "replace")  # ctypes stops at the NUL
            rate = float(deltas[i]) / seconds
            reading.top.append(TopItem(path, rate, "opens/s"))
            reading.gauges.append(("otel_ebpf_receiver.file_opens.top_path.rate", rate, {"file.path": path}))

        stats = percpu_array_u64(self.table("stats"))
        reading.map_update_failures = int(stats[STAT_UPDATE_FAILED])
        reading.map_evictions = max(0, int(stats[STAT_NEW_KEYS]) - n)
        reading.rate, reading.rate_unit = total_opens / seconds, "opens/s"
        reading.features = {
            "file_open.rate_log1p": log1p_rate(total_opens / self._ncpu, seconds),
            "file_open.failure_ratio": ratio(total_failed, total_opens),
            "file_open.top_path_share": ratio(float(deltas[top[0]]), successful) if len(top) else 0.0,
        }
        return reading
