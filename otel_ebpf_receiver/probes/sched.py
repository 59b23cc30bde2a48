"""sched: run-queue latency (how long runnable threads wait for a CPU) and context switches, voluntary and
involuntary — the CPU-contention view that load averages blur. Kernel side: bpf/sched.bpf.c.

Cost (README, "Scheduler probe cost"): raw tracepoints where the kernel's BTF shows the expected TP_PROTO, classic
tracepoints otherwise. Switch counts (voluntary, involuntary) are exact. Run-queue waits are timed exactly up to
``latency_exact_per_tick`` per CPU per jiffy; beyond that 1 in 2^``latency_sample_shift`` is timed, at random, and
weighs 2^k in the histogram, its sum and the per-thread waits (unbiased estimates; the kernel applies the weights,
so the maps read as before). A quiet host is thus timed exactly, a busy one by a sample of thousands a second.
"""

from __future__ import annotations

import math
import os
import re
import time

from ..kernel import btf, log2hist
from ..kernel.maps import MapSnapshot, PerCpuSlots, increase_or_zero, top_indices
from .base import (COUNTER, GAUGE, HISTOGRAM, CounterDeltas, Feature, Hook, Metric, Probe, Reading, TopItem, log1p_rate,
                   ratio, tracefs_root)
from .contract import U32, U64, MapContract, dtype, value_type

SLOTS = log2hist.LATENCY_SLOTS
# The counters of struct sched_stats (bpf/sched.bpf.c) Python reads, by name; the histogram is its `slots`.
COUNTER_FIELDS = ("switches", "involuntary", "latency_sum_ns", "update_failed")
SWITCHES, INVOLUNTARY, LATENCY_SUM_NS, UPDATE_FAILED = range(len(COUNTER_FIELDS))  # positions in COUNTER_FIELDS
SWITCH_HOOK = Hook("sched:sched_switch")
# The raw tracepoints' TP_PROTO as argument sizes in bytes: sched_switch(bool preempt, struct task_struct *prev,
# struct task_struct *next, unsigned int prev_state) since Linux 5.18; sched_wakeup(_new)(struct task_struct *p).
RAW_SIGNATURES = {"sched_switch": (1, 8, 8, 4), "sched_wakeup": (8,), "sched_wakeup_new": (8,)}
DEFAULT_STATE_MASK = 0xFF  # TASK_REPORT_MAX - 1 since Linux 4.14
OWNER_CACHE_SECONDS = 10.0  # a thread's name can change (exec, prctl): looked up again after this


def task_state_mask() -> int:
    """The bits of sched_switch's prev_state that are task states (the bit above them flags a preemption).

    Read from the tracepoint's print format, which spells the mask out: ``REC->prev_state & ((((0x0 | 0x1 | ...
    | 0x40) + 1) << 1) - 1)``. Falls back to 0xff, its value on every kernel since 4.14.
    """
    root = tracefs_root()
    try:
        text = (root / "events" / "sched" / "sched_switch" / "format").read_text() if root else ""
    except OSError:
        text = ""
    start = text.find("REC->prev_state & (")
    if start < 0:
        return DEFAULT_STATE_MASK
    i = start + len("REC->prev_state & ")
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            expr = text[i:j + 1]
            break
    else:
        return DEFAULT_STATE_MASK
    if not re.fullmatch(r"[0-9a-fA-Fx|+<>\-() ]+", expr):
        return DEFAULT_STATE_MASK
    try:
        mask = int(eval(expr, {"__builtins__": {}}, {}))  # digits and | + << - ( ) only, checked above
    except Exception:
        return DEFAULT_STATE_MASK
    return mask if 0 < mask < 1 << 16 else DEFAULT_STATE_MASK


def thread_owner(tid: int) -> tuple[int, str]:
    """(tgid, comm) of a thread id from /proc (/proc/<tid> exists for every thread, listed or not)."""
    try:
        with open(f"/proc/{tid}/status") as fh:
            name, tgid = "", tid
            for line in fh:
                if line.startswith("Name:"):
                    name = line.split(None, 1)[1].strip() if len(line.split()) > 1 else ""
                elif line.startswith("Tgid:"):
                    tgid = int(line.split()[1])
                    break
            return tgid, name
    except (OSError, ValueError):
        return tid, "[exited]"


class SchedProbe(Probe):
    name = "sched"
    summary = "run-queue latency histogram, context switches (voluntary / involuntary)"
    hooks = (Hook("sched:sched_wakeup"), Hook("sched:sched_wakeup_new"), SWITCH_HOOK)
    metrics = (
        Metric("otel_ebpf_receiver.sched.runqueue.latency", HISTOGRAM, "s",
               "Time runnable threads waited for a CPU: from wakeup (or preemption) to running (log2 buckets)."),
        Metric("otel_ebpf_receiver.sched.context_switches", COUNTER, "{switch}",
               "Context switches; involuntary when the thread switched out was still runnable (preempted or "
               "yielded), as the kernel counts nivcsw.", ("process.context_switch.type",)),
        Metric("otel_ebpf_receiver.sched.top_thread.runqueue.wait", GAUGE, "1",
               "Share of the interval spent runnable but waiting for a CPU, for the threads that waited most "
               "(top N only, bounded cardinality).", ("thread.id", "process.pid", "process.executable.name")),
    )
    features = (
        Feature("sched.context_switch_rate_log1p", "log1p(context switches per second per CPU)"),
        Feature("sched.involuntary_share", "involuntary / all context switches"),
        Feature("sched.runqueue_latency_p99_log1p_us",
                "log1p(99th percentile run-queue latency in microseconds, this interval)"),
    )
    # top_threads: how many of the threads that waited most are reported (0 compiles per-thread accounting out).
    # latency_sample_shift: beyond latency_exact_per_tick wakeups/preemptions per CPU per jiffy, time 1 in 2^k
    # (0: time every one). force_tracepoint: 1 keeps the classic tracepoints where raw ones would do.
    defaults = {"max_queued_threads": 10240, "top_threads": 5, "max_threads": 10240, "latency_sample_shift": 3,
                "latency_exact_per_tick": 8, "force_tracepoint": 0}
    maps = {"cpu_stats": MapContract(value={**{name: U64 for name in COUNTER_FIELDS}, "slots": f"({SLOTS},)<u8"}),
            "thread_wait": MapContract(key=U32, value=U64)}  # compiled in when top_threads > 0
    c_constants = {"LATENCY_SLOTS": SLOTS}

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.top_n = self.settings["top_threads"]
        self.sample_shift = min(int(self.settings["latency_sample_shift"]), 15)  # 4 bits in the kernel's stamp
        self._raw_pid_offset: int | None = None  # task_struct.pid, when the raw tracepoints are usable
        self._raw_checked = False
        self._deltas = CounterDeltas()
        self._last_slots: list[int] | None = None
        self._ncpu = os.cpu_count() or 1
        self._owners: dict[int, tuple[float, int, str]] = {}  # tid -> (looked up at, tgid, comm)

    def _owner(self, tid: int) -> tuple[int, str]:
        """thread_owner() cached for OWNER_CACHE_SECONDS: the same busy threads top the list window after window."""
        now = time.monotonic()
        cached = self._owners.get(tid)
        if cached and now - cached[0] < OWNER_CACHE_SECONDS:
            return cached[1], cached[2]
        pid, comm = thread_owner(tid)
        if comm == "[exited]" and cached:
            return cached[1], cached[2]
        if len(self._owners) > 4096:
            self._owners.clear()
        self._owners[tid] = (now, pid, comm)
        return pid, comm

    def raw_tracepoints_usable(self) -> bool:
        """True when this kernel's BTF shows the TP_PROTOs bpf/sched.bpf.c reads (and task_struct.pid's offset)."""
        if not self._raw_checked:
            self._raw_checked = True
            self._raw_pid_offset = None
            if not self.settings["force_tracepoint"]:
                from bcc import BPF

                facts = btf.read_facts((("task_struct", "pid"),), tuple(RAW_SIGNATURES)) \
                    if BPF.support_raw_tracepoint() else None
                if facts and all(facts.tracepoint_args[tp] == sig for tp, sig in RAW_SIGNATURES.items()):
                    self._raw_pid_offset = facts.member_offsets[("task_struct", "pid")]
        return self._raw_pid_offset is not None

    def cflags(self) -> list[str]:
        flags = [f"-DMAX_QUEUED={self.settings['max_queued_threads']}", f"-DLATENCY_SLOTS={SLOTS}",
                 f"-DLATENCY_SAMPLE_SHIFT={self.sample_shift}",
                 f"-DEXACT_PER_TICK={self.settings['latency_exact_per_tick']}"]
        if self.raw_tracepoints_usable():
            flags += ["-DUSE_RAW_TRACEPOINT", f"-DTASK_PID_OFFSET={self._raw_pid_offset}"]
        else:
            flags.append(f"-DTASK_STATE_MASK={task_state_mask():#x}")
        if self.top_n:
            flags += ["-DPER_THREAD", f"-DMAX_THREADS={self.settings['max_threads']}"]
        return flags

    def contract_maps(self):
        return self.maps if self.top_n else {k: v for k, v in self.maps.items() if k != "thread_wait"}

    def load(self) -> None:
        super().load()
        self.mode = "raw_tracepoint" if self.raw_tracepoints_usable() else "tracepoint"
        if self.sample_shift:
            self.mode += (f", waits timed exactly up to {self.settings['latency_exact_per_tick']}/CPU/jiffy, "
                          f"then 1 in {1 << self.sample_shift}")
        self._stats = PerCpuSlots(self.bpf["cpu_stats"])  # one element per CPU, all u64: summed in one read
        self._stats_dtype = dtype(value_type(self.bpf["cpu_stats"]))
        fields = self._stats_dtype.fields
        self._counter_words = [fields[name][1] // 8 for name in COUNTER_FIELDS]
        self._slots_word = fields["slots"][1] // 8
        self._wait_snapshot = MapSnapshot(self.bpf["thread_wait"]) if self.top_n else None

    def _top_threads(self, seconds: float, reading: Reading) -> None:
        """Rank threads by run-queue wait this interval. The map is drained each window (it holds only the threads
        that waited since the last read), so no per-thread deltas are kept and the read is as small as the
        window's activity; an increment racing the drain is lost, which a top-N share can afford."""
        snap = self._wait_snapshot
        n = snap.drain()
        if not n or seconds <= 0:
            return
        ncpu = len(snap.values[0])
        wait = snap.u64_values(n, ncpu)  # weighted in the kernel: a sampled wait counts 2^k times
        for i in top_indices(wait, self.top_n):
            tid = int(snap.keys[i])
            pid, comm = self._owner(tid)
            share = float(min(1.0, wait[i] / 1e9 / seconds))
            reading.top.append(TopItem(f"{comm} (tid {tid})", share * 100, "% of the window waiting"))
            reading.gauges.append(("otel_ebpf_receiver.sched.top_thread.runqueue.wait", share,
                                   {"thread.id": tid, "process.pid": pid, "process.executable.name": comm}))

    def read(self, seconds: float) -> Reading:
        reading = Reading()
        # struct sched_stats is all u64: one lookup summed over CPUs, then the fields at their (checked) offsets.
        # Plain Python, no numpy: see kernel/maps.py.
        totals = self._stats.read()
        counters = [totals[word] for word in self._counter_words]
        switches = self._deltas.delta("switches", counters[SWITCHES])
        involuntary = self._deltas.delta("involuntary", counters[INVOLUNTARY])
        latency_ns = self._deltas.delta("latency_ns", counters[LATENCY_SUM_NS])
        if switches:
            reading.counters.append(("otel_ebpf_receiver.sched.context_switches", max(0, switches - involuntary),
                                     {"process.context_switch.type": "voluntary"}))
            reading.counters.append(("otel_ebpf_receiver.sched.context_switches", involuntary,
                                     {"process.context_switch.type": "involuntary"}))

        cumulative = totals[self._slots_word:self._slots_word + SLOTS]
        previous = self._last_slots if self._last_slots is not None else [0] * SLOTS
        self._last_slots = cumulative
        counts = list(map(increase_or_zero, cumulative, previous))
        if any(counts):
            reading.histograms.append(("otel_ebpf_receiver.sched.runqueue.latency",
                                       log2hist.buckets_from_slots(counts, "s"), latency_ns / 1e9, {}))
        if self.top_n:
            self._top_threads(seconds, reading)
        self.last_p99_us = log2hist.quantile(counts, 0.99)
        self.last_switch_rate = switches / seconds if seconds > 0 else 0.0
        reading.rate, reading.rate_unit = self.last_switch_rate, "switches/s"
        reading.map_update_failures = counters[UPDATE_FAILED]
        reading.features = {
            "sched.context_switch_rate_log1p": log1p_rate(switches / self._ncpu, seconds),
            "sched.involuntary_share": ratio(involuntary, switches),
            "sched.runqueue_latency_p99_log1p_us": math.log1p(self.last_p99_us),
        }
        return reading
