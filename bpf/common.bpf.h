// common.bpf.h: what every probe's program shares — map-health counters, the latency histogram slot, and the
// check of the constants Python reads. Included as "common.bpf.h": probes/base.py passes -I<bpf dir> to bcc.
//
// The C <-> Python contract (see otel_ebpf_receiver/probes/contract.py):
// * struct layouts are never copied into Python: it takes them from the ctypes types bcc builds for each map and
//   checks, at load, that the fields it reads are there with the size it reads them at;
// * constants bcc cannot show Python (enum values, #defines used as array indexes) are declared once more in the
//   probe's Python class and compared here at compile time: a file ends with CHECK_PYTHON_CONSTANTS, which the
//   loader defines as one _Static_assert per constant, so a mismatch refuses the probe with one line.
#ifndef OTEL_EBPF_COMMON_BPF_H
#define OTEL_EBPF_COMMON_BPF_H

#ifndef CHECK_PYTHON_CONSTANTS
#define CHECK_PYTHON_CONSTANTS  // compiled outside the loader (a test, by hand): nothing to compare with
#endif

// ---- map health: the per-CPU `stats` array ----------------------------------------------------------------------
// Index 0 and 1 mean the same in every probe (user space turns them into the map_update_failures and map_evictions
// self-metrics); a probe numbers its own counters from STAT_PROBE on, below STAT_SLOTS.
enum common_stat {
    STAT_UPDATE_FAILED = 0,  // a map update the kernel refused (map full, out of memory)
    STAT_NEW_KEYS = 1,       // keys this program inserted into its LRU map: evictions = inserts - deletes - present
    STAT_PROBE = 2,          // the first index a probe may use for its own counters
    STAT_SLOTS = 8,
};

// ---- latency histograms -----------------------------------------------------------------------------------------
#ifndef LATENCY_SLOTS
#define LATENCY_SLOTS 28  // log2 of microseconds; the last slot is the overflow (see kernel/log2hist.py)
#endif

// The log2 slot of a duration in nanoseconds, counted in microseconds: bpf_log2l(v) is floor(log2(v)) + 1, so
// slot s holds [2^(s-1), 2^s) µs and slot 0 anything under 1 µs.
static __always_inline u32 latency_slot(u64 ns) {
    u32 slot = bpf_log2l(ns / 1000);
    return slot < LATENCY_SLOTS ? slot : LATENCY_SLOTS - 1;
}

// ---- sampling where there is plenty to sample ----------------------------------------------------------------------
// On each CPU the first `exact` events of a jiffy are all taken; beyond that one in 2^shift, at random (a periodic
// pattern, such as a ping-pong waking A, B, A, B or a server alternating two files, would otherwise take the same
// one every time). *tick and *taken are the caller's per-CPU state. Returns the log2 of the event's weight (0: taken
// exactly), or -1 when it is not taken. sched times its waits this way, file_open counts its paths.
static __always_inline int sample_log2_weight(u64 *tick, u64 *taken, u64 exact, u32 shift) {
    u64 now = bpf_jiffies64();
    if (now != *tick) {
        *tick = now;
        *taken = 0;
    }
    if (*taken < exact) {
        (*taken)++;
        return 0;
    }
    if (bpf_get_prandom_u32() & ((1U << shift) - 1))
        return -1;
    return shift;
}

#endif  // OTEL_EBPF_COMMON_BPF_H

// ---- per program part, outside the include guard --------------------------------------------------------------
// When the syscall hub (probes/syscall_hub.py) composes several probes into one program, each probe's part gets
// its own copy of what follows, renamed <probe>_stats / <probe>_bump_stat by the loader: the same index means
// the same counter in every probe, but each probe keeps its own counters.
BPF_PERCPU_ARRAY(stats, u64, STAT_SLOTS);

static __always_inline void bump_stat(u32 index) {
    u64 *v = stats.lookup(&index);
    if (v)
        (*v)++;
}
