// sched: run-queue latency (log2 buckets of microseconds from wakeup, or from preemption, to running again) and
// context switches, voluntary and involuntary.
//
// These tracepoints fire tens of thousands of times a second on a busy host, so the per-event work is small:
// counters and the histogram share one per-CPU array slot (one lookup, no atomics, no shared cache lines); the
// only shared map is the enqueue timestamp per thread, which must be shared because a thread is often woken on one
// CPU and run on another. Only tracepoint fields are read (pid, prev_state...), never struct task_struct.
#include <uapi/linux/ptrace.h>

#include "common.bpf.h"  // latency_slot()

#ifndef MAX_QUEUED
#define MAX_QUEUED 10240
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 10240
#endif
// prev_state as the tracepoint reports it: the task state bits below TASK_REPORT_MAX, plus TASK_REPORT_MAX itself
// when the switch was a preemption ("R+" in the trace output). TASK_REPORT_MAX is 0x100 on 4.14+ kernels; the
// loader derives the mask from the tracepoint's print format when it can.
#ifndef TASK_STATE_MASK
#define TASK_STATE_MASK 0xff
#endif

// Everything a CPU counts, in one per-CPU slot: one map lookup per event.
struct sched_stats {
    u64 switches;        // every context switch (like the ctxt line of /proc/stat)
    u64 involuntary;     // a runnable task was switched out (preempted or yielded)
    u64 latency_sum_ns;  // sum of the run-queue latencies in the histogram
    u64 update_failed;
    u64 slots[LATENCY_SLOTS];
};

// tid -> when it became runnable, 0 once it ran. Entries are written in place and never deleted: an update plus a
// delete per switch cost about twice as much, and the LRU drops threads that exited.
BPF_TABLE("lru_hash", u32, u64, queued_at, MAX_QUEUED);
BPF_PERCPU_ARRAY(cpu_stats, struct sched_stats, 1);

#ifdef PER_THREAD
// Run-queue wait per thread, for the top-N view: user space ranks the threads and names only those few. Keyed by
// tid because the tracepoint does not carry the tgid of the thread switched in. One more per-CPU lookup per
// switch-in; compiled out with top_threads = 0.
struct wait_stats {
    u64 wait_ns;
    u64 waits;
};
BPF_TABLE("lru_percpu_hash", u32, struct wait_stats, thread_wait, MAX_THREADS);
#endif

static __always_inline struct sched_stats *this_cpu(void) {
    u32 zero = 0;
    return cpu_stats.lookup(&zero);
}

static __always_inline int enqueue(u32 tid) {
    if (tid == 0)
        return 0;  // the idle task is never queued
    u64 now = bpf_ktime_get_ns();
    u64 *queued = queued_at.lookup(&tid);
    if (queued)
        *queued = now;  // a second wakeup of a queued thread restarts its wait (as runqlat does)
    else if (queued_at.update(&tid, &now) != 0) {
        struct sched_stats *s = this_cpu();
        if (s)
            s->update_failed++;
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup) { return enqueue(args->pid); }
TRACEPOINT_PROBE(sched, sched_wakeup_new) { return enqueue(args->pid); }

TRACEPOINT_PROBE(sched, sched_switch) {
    struct sched_stats *s = this_cpu();
    if (!s)
        return 0;
    u32 prev = args->prev_pid;
    s->switches++;
    // A task switched out while still TASK_RUNNING did not block: it was preempted (or yielded) and goes straight
    // back to the run queue, so its wait starts now. The idle task "runs" too but is not a preemption.
    if (prev != 0 && (args->prev_state & TASK_STATE_MASK) == 0) {
        s->involuntary++;
        enqueue(prev);
    }

    u32 next = args->next_pid;
    if (next == 0)
        return 0;
    u64 *queued = queued_at.lookup(&next);
    if (!queued || !*queued)
        return 0;  // queued before we attached, or its wakeup was not seen
    u64 now = bpf_ktime_get_ns();
    u64 delta = now > *queued ? now - *queued : 0;
    *queued = 0;
    u32 slot = latency_slot(delta);
    s->slots[slot]++;
    s->latency_sum_ns += delta;
#ifdef PER_THREAD
    struct wait_stats *w = thread_wait.lookup(&next);
    if (w) {
        w->wait_ns += delta;
        w->waits++;
    } else {
        struct wait_stats first = {.wait_ns = delta, .waits = 1};
        thread_wait.update(&next, &first);  // an LRU map: makes room by evicting the coldest thread
    }
#endif
    return 0;
}

CHECK_PYTHON_CONSTANTS  // the constants Python reads (bpf/common.bpf.h)
