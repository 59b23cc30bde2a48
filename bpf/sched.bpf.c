// sched: run-queue latency (log2 buckets of microseconds from wakeup, or from preemption, to running again) and
// context switches, voluntary and involuntary. Python side: otel_ebpf_receiver/probes/sched.py.
//
// These hooks fire tens of thousands of times a second on a busy host, so the per-event work is small:
// * raw tracepoints (USE_RAW_TRACEPOINT) where the kernel's BTF shows the TP_PROTO we expect: the program gets the
//   kernel's own arguments, without the classic tracepoint's record (two 16-byte comms, pids, priorities) being
//   built for it first. Threads are keyed by their task_struct address, so neither wakeup nor switch reads a
//   field of the task, except the pid of the thread switched in when per-thread waits are on (its offset comes
//   from BTF: the installed headers may belong to another kernel). Otherwise classic tracepoints, keyed by pid;
// * counters and the histogram share one per-CPU array slot (one lookup, no atomics, no shared cache lines); the
//   only shared map is the enqueue timestamp per thread, which must be shared because a thread is often woken on
//   one CPU and run on another;
// * sampling where there is plenty to sample (LATENCY_SAMPLE_SHIFT = k > 0): on each CPU the first
//   EXACT_PER_TICK wakeups or preemptions of a jiffy are all timed; beyond that, one in 2^k, at random, is timed
//   and counts 2^k times (its weight travels with its timestamp). A quiet host is timed exactly, where a p99 of
//   few waits would not survive sampling; a busy one pays for a sample, which is plenty for a p99. Switch counts
//   stay exact. The others cost a random number, and their switch-in a lookup that misses. Random, not every
//   2^k-th: a periodic pattern (a ping-pong wakes A, B, A, B...) would otherwise time the same thread every time.
//   The histogram, the latency sum and the per-thread waits are weighted sums: unbiased estimates.
#include "common.bpf.h"  // latency_slot()

#ifndef MAX_QUEUED
#define MAX_QUEUED 10240
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 10240
#endif
#ifndef LATENCY_SAMPLE_SHIFT
#define LATENCY_SAMPLE_SHIFT 0
#endif
#ifndef EXACT_PER_TICK
#define EXACT_PER_TICK 8
#endif
#define WEIGHT_BIT 60  // queued_at values: the weight's log2 above bit 60, ns below (36 years of uptime)
#define STAMP_MASK ((1ULL << WEIGHT_BIT) - 1)
// Classic tracepoint only: prev_state as the tracepoint reports it, the task state bits below TASK_REPORT_MAX plus
// TASK_REPORT_MAX itself for a preemption ("R+" in the trace output). The loader derives the mask from the
// tracepoint's print format when it can.
#ifndef TASK_STATE_MASK
#define TASK_STATE_MASK 0xff
#endif

// Everything a CPU counts, in one per-CPU slot: one map lookup per event.
struct sched_stats {
    u64 switches;        // every context switch (like the ctxt line of /proc/stat)
    u64 involuntary;     // a runnable task was switched out (preempted or yielded)
    u64 latency_sum_ns;  // sum of the (sampled) run-queue latencies in the histogram
    u64 update_failed;
    u64 slots[LATENCY_SLOTS];
    u64 tick;            // the jiffy `timed` counts in (sampling only)
    u64 timed;           // wakeups timed exactly in that jiffy
};

// thread -> when it became runnable, 0 once it ran. Entries are written in place and never deleted: an update plus
// a delete per switch cost about twice as much, and the LRU drops threads that exited.
BPF_TABLE("lru_hash", u64, u64, queued_at, MAX_QUEUED);
BPF_PERCPU_ARRAY(cpu_stats, struct sched_stats, 1);

// How many threads hashing to each slot have a wait running in queued_at. Most switch-ins end no timed wait (waits
// are sampled beyond EXACT_PER_TICK, and the idle task and blocked threads' switch-ins never started one), and a
// hash lookup that misses costs more than the rest of the switch together; an array load (inlined, ~2 ns) says
// "certainly not queued" for them. Written only when a wait starts or ends, so its cache lines stay shared. A slot
// that counts too high (an LRU eviction of a running wait, two CPUs racing) costs a lookup; one that counts too low
// (a wakeup racing the switch-in of the same thread) can drop that one wait, like a sample not taken.
#ifndef QUEUED_HINT_BITS
#define QUEUED_HINT_BITS 12
#endif
BPF_ARRAY(queued_hint, u32, 1 << QUEUED_HINT_BITS);

static __always_inline u32 *hint_of(u64 key) {
    u32 slot = (u32)((key * 0x9E3779B97F4A7C15ULL) >> (64 - QUEUED_HINT_BITS));  // Fibonacci hashing
    return queued_hint.lookup(&slot);
}

#ifdef PER_THREAD
// Run-queue wait per thread id, for the top-N view: user space ranks the threads and names only those few. One
// more per-CPU lookup per timed switch-in; compiled out with top_threads = 0.
BPF_TABLE("lru_percpu_hash", u32, u64, thread_wait, MAX_THREADS);
#endif

static __always_inline struct sched_stats *this_cpu(void) {
    u32 zero = 0;
    return cpu_stats.lookup(&zero);
}

// A thread became runnable: start its wait (if this one is timed).
static __always_inline void enqueue(struct sched_stats *s, u64 key) {
    u64 weight_log2 = 0;
    if (LATENCY_SAMPLE_SHIFT) {
        int sampled = sample_log2_weight(&s->tick, &s->timed, EXACT_PER_TICK, LATENCY_SAMPLE_SHIFT);
        if (sampled < 0)
            return;
        weight_log2 = sampled;
    }
    u64 stamp = bpf_ktime_get_ns() | (weight_log2 << WEIGHT_BIT);
    u64 *queued = queued_at.lookup(&key);
    int started = 0;
    if (queued) {
        started = *queued == 0;
        *queued = stamp;  // a second wakeup of a queued thread restarts its wait (as runqlat does)
    } else if (queued_at.update(&key, &stamp) == 0) {
        started = 1;
    } else {
        s->update_failed++;
    }
    u32 *hint = started ? hint_of(key) : 0;
    if (hint)
        __sync_fetch_and_add(hint, 1);
}

// A thread is switched in: end its wait, if one was started. Returns the weighted wait in ns, or -1.
static __always_inline s64 dequeue(struct sched_stats *s, u64 key) {
    u32 *hint = hint_of(key);
    if (!hint || *hint == 0)
        return -1;  // no thread of this slot has a wait running
    u64 *queued = queued_at.lookup(&key);
    if (!queued || !*queued)
        return -1;  // not timed (sampled out), queued before we attached, or its wakeup was not seen
    u64 stamp = *queued;
    *queued = 0;
    __sync_fetch_and_add(hint, -1);
    u64 start = stamp & STAMP_MASK, weight = 1ULL << ((stamp >> WEIGHT_BIT) & 15);
    u64 now = bpf_ktime_get_ns();
    u64 delta = now > start ? now - start : 0;
    s->slots[latency_slot(delta)] += weight;
    s->latency_sum_ns += delta * weight;
    return delta * weight;
}

#ifdef PER_THREAD
static __always_inline void thread_waited(u32 tid, u64 delta) {
    u64 *w = thread_wait.lookup(&tid);
    if (w)
        *w += delta;
    else
        thread_wait.update(&tid, &delta);  // an LRU map: makes room by evicting the coldest thread
}
#endif

#ifdef USE_RAW_TRACEPOINT
// TP_PROTO(struct task_struct *p)
static __always_inline int on_wakeup(u64 task) {
    struct sched_stats *s = this_cpu();
    if (s && task)
        enqueue(s, task);
    return 0;
}
RAW_TRACEPOINT_PROBE(sched_wakeup) { return on_wakeup(ctx->args[0]); }
RAW_TRACEPOINT_PROBE(sched_wakeup_new) { return on_wakeup(ctx->args[0]); }

// TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state), Linux 5.18+
RAW_TRACEPOINT_PROBE(sched_switch) {
    struct sched_stats *s = this_cpu();
    if (!s)
        return 0;
    s->switches++;
    // prev is current here: its pid is at hand without reading the task. A task switched out while still
    // TASK_RUNNING did not block: it was preempted (or yielded) and goes straight back to the run queue, so its
    // wait starts now. The idle task (pid 0) "runs" too but is not a preemption.
    if ((u32)bpf_get_current_pid_tgid() != 0 && ((u8)ctx->args[0] || (u32)ctx->args[3] == 0)) {
        s->involuntary++;
        enqueue(s, ctx->args[1]);
    }
    s64 delta = dequeue(s, ctx->args[2]);
#ifdef PER_THREAD
    if (delta >= 0) {
        u32 tid = 0;
        bpf_probe_read_kernel(&tid, sizeof(tid), (void *)(ctx->args[2] + TASK_PID_OFFSET));
        if (tid)
            thread_waited(tid, delta);
    }
#endif
    return 0;
}
#else
static __always_inline int on_wakeup(u32 pid) {
    struct sched_stats *s = this_cpu();
    if (s && pid)  // the idle task is never queued
        enqueue(s, pid);
    return 0;
}
TRACEPOINT_PROBE(sched, sched_wakeup) { return on_wakeup(args->pid); }
TRACEPOINT_PROBE(sched, sched_wakeup_new) { return on_wakeup(args->pid); }

TRACEPOINT_PROBE(sched, sched_switch) {
    struct sched_stats *s = this_cpu();
    if (!s)
        return 0;
    u32 prev = args->prev_pid;
    s->switches++;
    if (prev != 0 && (args->prev_state & TASK_STATE_MASK) == 0) {
        s->involuntary++;
        enqueue(s, prev);
    }
    u32 next = args->next_pid;
    if (next == 0)
        return 0;
    s64 delta = dequeue(s, next);
#ifdef PER_THREAD
    if (delta >= 0)
        thread_waited(next, delta);
#endif
    return 0;
}
#endif

CHECK_PYTHON_CONSTANTS  // the constants Python reads (bpf/common.bpf.h)
