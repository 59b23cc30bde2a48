"""memory: memory pressure as processes feel it — reclaim stalls (direct, and forced by a cgroup's memory limit),
kswapd reclaim rounds, OOM kills — from the vmscan and oom tracepoints (bpf/memory.bpf.c says why these).

Free memory is not pressure: a host with a full page cache is healthy. A task that must reclaim before its
allocation succeeds is not, and the time it spends there is added to whatever it was doing (a request, a query).
The features give the state model that time as a share of the window, per CPU, so that a memory-starved host or
container is a direction of its own, not a look-alike of CPU saturation or slow disks."""

from __future__ import annotations

import os

from ..kernel import log2hist
from ..kernel.maps import increase_or_zero, percpu_array_u64
from .base import COUNTER, HISTOGRAM, CounterDeltas, Feature, Hook, Metric, Probe, Reading, TopItem, log1p_rate
from .contract import COMMON_STATS, STAT_UPDATE_FAILED, U64, MapContract
from .loader import hook_exists

# enum counter_index in bpf/memory.bpf.c (checked at load).
(DIRECT_STALLS, DIRECT_STALL_NS, CGROUP_STALLS, CGROUP_STALL_NS, RECLAIMED_PAGES, KSWAPD_WAKES, OOM_KILLS,
 COUNTER_MAX) = range(8)
SLOTS = log2hist.LATENCY_SLOTS
MEMCG_RECLAIM = Hook("vmscan:mm_vmscan_memcg_reclaim_begin")  # only with CONFIG_MEMCG
RECLAIM_KIND = "otel_ebpf_receiver.memory.reclaim.kind"  # direct (the host is short) or cgroup (its limit is)
KINDS = (("direct", DIRECT_STALLS, DIRECT_STALL_NS), ("cgroup", CGROUP_STALLS, CGROUP_STALL_NS))


class MemoryProbe(Probe):
    name = "memory"
    summary = "reclaim stalls (direct, cgroup limit), kswapd rounds, OOM kills"
    hooks = (Hook("vmscan:mm_vmscan_direct_reclaim_begin"), Hook("vmscan:mm_vmscan_direct_reclaim_end"),
             Hook("vmscan:mm_vmscan_kswapd_wake"), Hook("oom:mark_victim"))
    metrics = (
        Metric("otel_ebpf_receiver.memory.reclaim.stalls", COUNTER, "{stall}",
               "Allocations that had to reclaim memory first: direct (the host is short) or cgroup (the "
               "cgroup's memory limit is reached).", (RECLAIM_KIND,)),
        Metric("otel_ebpf_receiver.memory.reclaim.stall_time", COUNTER, "s",
               "Time tasks spent reclaiming memory before their allocation could succeed.", (RECLAIM_KIND,)),
        Metric("otel_ebpf_receiver.memory.reclaim.stall.duration", HISTOGRAM, "s",
               "Duration of each reclaim stall, both kinds (the kernel's log2 buckets)."),
        Metric("otel_ebpf_receiver.memory.reclaimed_pages", COUNTER, "{page}", "Pages freed by those stalls."),
        Metric("otel_ebpf_receiver.memory.kswapd.wakeups", COUNTER, "{wakeup}",
               "Background reclaim rounds started by kswapd (memory getting low, no task stalled yet)."),
        Metric("otel_ebpf_receiver.memory.oom_kills", COUNTER, "{process}", "Processes the OOM killer chose."),
    )
    features = (
        Feature("memory.reclaim_stall_share", "seconds tasks spent in reclaim stalls per second per CPU, in [0, 1]"),
        Feature("memory.reclaim_stall_rate_log1p", "log1p(reclaim stalls per second per CPU)"),
        Feature("memory.kswapd_wake_rate_log1p", "log1p(kswapd reclaim rounds per second)"),
        Feature("memory.oom_kill_rate_log1p", "log1p(OOM kills per second)"),
    )

    maps = {"counters": MapContract(value=U64), "stall_slots": MapContract(value=U64),
            "stats": MapContract(value=U64)}
    c_constants = {"DIRECT_STALLS": DIRECT_STALLS, "DIRECT_STALL_NS": DIRECT_STALL_NS, "CGROUP_STALLS": CGROUP_STALLS,
                   "CGROUP_STALL_NS": CGROUP_STALL_NS, "RECLAIMED_PAGES": RECLAIMED_PAGES,
                   "KSWAPD_WAKES": KSWAPD_WAKES, "OOM_KILLS": OOM_KILLS, "COUNTER_MAX": COUNTER_MAX,
                   "LATENCY_SLOTS": SLOTS, **COMMON_STATS}

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._deltas = CounterDeltas()
        self._last_slots: list[int] | None = None
        self._stalls_last_window = -1  # the first read takes the slots whatever happened
        self._ncpu = os.cpu_count() or 1

    def cflags(self) -> list[str]:
        return [f"-DLATENCY_SLOTS={SLOTS}"] + (["-DHAVE_MEMCG_RECLAIM"] if hook_exists(MEMCG_RECLAIM) else [])

    def read(self, seconds: float) -> Reading:
        reading = Reading()
        counters = percpu_array_u64(self.bpf["counters"])
        delta = {i: self._deltas.delta(i, int(counters[i])) for i in range(COUNTER_MAX)}
        stalls = stall_ns = 0
        for kind, count_index, ns_index in KINDS:
            stalls += delta[count_index]
            stall_ns += delta[ns_index]
            if delta[count_index]:
                attrs = {RECLAIM_KIND: kind}
                reading.counters.append(("otel_ebpf_receiver.memory.reclaim.stalls", delta[count_index], attrs))
                reading.counters.append(("otel_ebpf_receiver.memory.reclaim.stall_time", delta[ns_index] / 1e9,
                                         attrs))
        for metric, index in (("otel_ebpf_receiver.memory.reclaimed_pages", RECLAIMED_PAGES),
                              ("otel_ebpf_receiver.memory.kswapd.wakeups", KSWAPD_WAKES),
                              ("otel_ebpf_receiver.memory.oom_kills", OOM_KILLS)):
            if delta[index]:
                reading.counters.append((metric, delta[index], {}))

        # A stall adds to its counter first and to stall_slots just after: without stalls in this window or the
        # last one (one counted just before our counters read may reach its slot just after our slots read), the
        # slots are as last read and their read (a map syscall) is skipped. Exact either way.
        if stalls or self._stalls_last_window:
            cumulative = percpu_array_u64(self.bpf["stall_slots"])
            previous = self._last_slots if self._last_slots is not None else [0] * len(cumulative)
            self._last_slots = cumulative
            window = list(map(increase_or_zero, cumulative, previous))  # plain Python, no numpy: kernel/maps.py
            if any(window):
                reading.histograms.append(("otel_ebpf_receiver.memory.reclaim.stall.duration",
                                           log2hist.buckets_from_slots(window, "s"), stall_ns / 1e9, {}))
        self._stalls_last_window = stalls

        reading.map_update_failures = int(percpu_array_u64(self.bpf["stats"])[STAT_UPDATE_FAILED])
        stall_share = min(1.0, stall_ns / 1e9 / seconds / self._ncpu) if seconds > 0 else 0.0
        reading.rate, reading.rate_unit = stalls / seconds if seconds > 0 else 0.0, "stalls/s"
        reading.top = [TopItem("time in reclaim stalls", stall_share * 100, "% of CPU time"),
                       TopItem("OOM kills", delta[OOM_KILLS], "this window")]
        reading.features = {
            "memory.reclaim_stall_share": stall_share,
            "memory.reclaim_stall_rate_log1p": log1p_rate(stalls / self._ncpu, seconds),
            "memory.kswapd_wake_rate_log1p": log1p_rate(delta[KSWAPD_WAKES], seconds),
            "memory.oom_kill_rate_log1p": log1p_rate(delta[OOM_KILLS], seconds),
        }
        return reading
