"""exec: process exec per program name, processes and threads created, processes exited (the talk's execve
example)."""

from __future__ import annotations

import os

from ..kernel.maps import MapSnapshot, percpu_array_u64
from .base import (COUNTER, CounterDeltas, Feature, Hook, Metric, Probe, Reading, TopItem, decode_comm, log1p_rate,
                   tracepoint_has_field)
from .contract import COMMON_STATS, STAT_UPDATE_FAILED, U64, MapContract

# enum counter_index in bpf/exec.bpf.c (checked at load).
PROCESSES_CREATED, THREADS_CREATED, PROCESS_EXITS, EXECS, COUNTER_MAX = range(5)
EXIT_HOOK = Hook("sched:sched_process_exit")


class ExecProbe(Probe):
    name = "exec"
    summary = "exec per program, process/thread creation, process exits"
    hooks = (Hook("sched:sched_process_exec"), Hook("task:task_newtask"), EXIT_HOOK)
    metrics = (
        # Same meaning as the semantic convention: processes (not threads) created.
        Metric("system.process.created", COUNTER, "{process}", "Processes created (fork/clone without CLONE_THREAD)."),
        Metric("otel_ebpf_receiver.threads.created", COUNTER, "{thread}", "Threads created (clone with CLONE_THREAD)."),
        Metric("otel_ebpf_receiver.process.exits", COUNTER, "{process}", "Processes that exited (whole thread group)."),
        Metric("otel_ebpf_receiver.exec", COUNTER, "{exec}", "Successful execve/execveat, per new program name.",
               ("process.executable.name",)),
    )
    features = (
        Feature("exec.exec_rate_log1p", "log1p(execs per second per CPU)"),
        Feature("exec.fork_rate_log1p", "log1p(processes created per second per CPU)"),
        Feature("exec.thread_rate_log1p", "log1p(threads created per second per CPU)"),
    )

    maps = {"counters": MapContract(value=U64), "exec_counts": MapContract(key={"comm": None}, value=U64),
            "stats": MapContract(value=U64)}
    c_constants = {"PROCESSES_CREATED": PROCESSES_CREATED, "THREADS_CREATED": THREADS_CREATED,
                   "PROCESS_EXITS": PROCESS_EXITS, "EXECS": EXECS, "COUNTER_MAX": COUNTER_MAX, **COMMON_STATS}

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._totals = CounterDeltas()
        self._per_comm = CounterDeltas()
        self._execs_last_window = -1  # the first read walks exec_counts whatever happened
        self._ncpu = os.cpu_count() or 1

    def cflags(self) -> list[str]:
        return ["-DHAVE_GROUP_DEAD"] if tracepoint_has_field(EXIT_HOOK, "group_dead") else []

    def load(self) -> None:
        super().load()
        self._comm_snapshot = MapSnapshot(self.bpf["exec_counts"])

    def read(self, seconds: float) -> Reading:
        reading = Reading()
        counters = percpu_array_u64(self.bpf["counters"])
        created = self._totals.delta("created", int(counters[PROCESSES_CREATED]))
        threads = self._totals.delta("threads", int(counters[THREADS_CREATED]))
        exits = self._totals.delta("exits", int(counters[PROCESS_EXITS]))
        execs = self._totals.delta("execs", int(counters[EXECS]))
        for metric, value in (("system.process.created", created), ("otel_ebpf_receiver.threads.created", threads),
                              ("otel_ebpf_receiver.process.exits", exits)):
            if value:
                reading.counters.append((metric, value, {}))

        # exec_counts changes only on an exec, which bumps EXECS first: without execs in this window or the last
        # one (an exec bumped just before our counters read may update exec_counts just after our map read), the
        # map is as last read and its walk (every hash bucket, tens of µs) is skipped. Exact either way.
        if execs or self._execs_last_window:
            snap = self._comm_snapshot
            for i in range(snap.read()):
                comm = decode_comm(snap.keys[i].comm)
                delta = self._per_comm.delta(comm, int(sum(snap.values[i])))
                if delta:
                    reading.counters.append(("otel_ebpf_receiver.exec", delta, {"process.executable.name": comm}))
        self._execs_last_window = execs

        reading.map_update_failures = int(percpu_array_u64(self.bpf["stats"])[STAT_UPDATE_FAILED])
        reading.rate, reading.rate_unit = execs / seconds, "execs/s"
        reading.top = [TopItem("processes created", created / seconds, "processes/s"),
                       TopItem("threads created", threads / seconds, "threads/s")]
        reading.features = {
            "exec.exec_rate_log1p": log1p_rate(execs / self._ncpu, seconds),
            "exec.fork_rate_log1p": log1p_rate(created / self._ncpu, seconds),
            "exec.thread_rate_log1p": log1p_rate(threads / self._ncpu, seconds),
        }
        return reading
