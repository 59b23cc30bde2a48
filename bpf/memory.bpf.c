// memory: memory pressure as processes feel it (probe "memory", see otel_ebpf_receiver/probes/memory.py).
//
// Free memory and page-cache sizes say little about pressure; what hurts is an allocation that has to reclaim
// before it can succeed. The kernel traces exactly that: a task entering and leaving direct reclaim (the whole
// machine is short), and reclaim a cgroup's memory limit forces on its own tasks (only that cgroup is short).
// Their time is a stall the task pays inside whatever it was doing. Also counted: kswapd starting a background
// reclaim round (memory getting low, nobody stalled yet) and the OOM killer choosing a victim.
//
// All of these are rare next to system calls or context switches: a begin/end pair costs one small hash update
// and one delete, per-CPU counters take the rest. Tracepoints only.
#include "common.bpf.h"

#ifndef MAX_RECLAIMING
#define MAX_RECLAIMING 10240
#endif

enum counter_index {
    DIRECT_STALLS = 0,
    DIRECT_STALL_NS = 1,
    CGROUP_STALLS = 2,
    CGROUP_STALL_NS = 3,
    RECLAIMED_PAGES = 4,
    KSWAPD_WAKES = 5,
    OOM_KILLS = 6,
    COUNTER_MAX = 7,
};

BPF_PERCPU_ARRAY(counters, u64, COUNTER_MAX);
BPF_PERCPU_ARRAY(stall_slots, u64, LATENCY_SLOTS);  // log2 µs of each stall, both kinds
BPF_HASH(reclaiming_since, u32, u64, MAX_RECLAIMING);  // thread id -> when its reclaim began

static __always_inline void add(u32 index, u64 value) {
    u64 *v = counters.lookup(&index);
    if (v)
        *v += value;
}

static __always_inline int begin(void) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 now = bpf_ktime_get_ns();
    if (reclaiming_since.update(&tid, &now) != 0)
        bump_stat(STAT_UPDATE_FAILED);
    return 0;
}

static __always_inline int end(u32 stalls, u32 stall_ns, u64 reclaimed) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 *since = reclaiming_since.lookup(&tid);
    if (!since)
        return 0;  // began before we attached
    u64 now = bpf_ktime_get_ns();
    u64 delta = now > *since ? now - *since : 0;
    reclaiming_since.delete(&tid);
    add(stalls, 1);
    add(stall_ns, delta);
    add(RECLAIMED_PAGES, reclaimed);
    u32 slot = latency_slot(delta);
    u64 *count = stall_slots.lookup(&slot);
    if (count)
        (*count)++;
    return 0;
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_direct_reclaim_begin) { return begin(); }
TRACEPOINT_PROBE(vmscan, mm_vmscan_direct_reclaim_end) {
    return end(DIRECT_STALLS, DIRECT_STALL_NS, args->nr_reclaimed);
}

#ifdef HAVE_MEMCG_RECLAIM  // CONFIG_MEMCG
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_begin) { return begin(); }
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_end) {
    return end(CGROUP_STALLS, CGROUP_STALL_NS, args->nr_reclaimed);
}
#endif

TRACEPOINT_PROBE(vmscan, mm_vmscan_kswapd_wake) {
    add(KSWAPD_WAKES, 1);
    return 0;
}

TRACEPOINT_PROBE(oom, mark_victim) {
    add(OOM_KILLS, 1);
    return 0;
}

CHECK_PYTHON_CONSTANTS  // the constants Python reads (bpf/common.bpf.h)
