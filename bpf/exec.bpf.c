// exec: process exec (per new process name), process and thread creation, process exits.
//
// task:task_newtask carries clone_flags, which is the only tracepoint that tells a new process from a new
// thread without reading task_struct (whose layout we must not assume).
#include <linux/sched.h>

#include "common.bpf.h"

#ifndef MAX_COMMS
#define MAX_COMMS 4096
#endif

enum counter_index {
    PROCESSES_CREATED = 0,
    THREADS_CREATED = 1,
    PROCESS_EXITS = 2,
    EXECS = 3,
    COUNTER_MAX = 4,
};

struct comm_key {
    char comm[TASK_COMM_LEN];
};

BPF_PERCPU_ARRAY(counters, u64, COUNTER_MAX);
BPF_PERCPU_HASH(exec_counts, struct comm_key, u64, MAX_COMMS);

static __always_inline void bump(u32 index) {
    u64 *v = counters.lookup(&index);
    if (v)
        (*v)++;
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    bump(EXECS);
    struct comm_key key = {};
    bpf_get_current_comm(&key.comm, sizeof(key.comm));  // already the new program's name
    u64 *count = exec_counts.lookup(&key);
    if (count) {
        (*count)++;
    } else {
        u64 one = 1;
        if (exec_counts.update(&key, &one) != 0)
            bump_stat(STAT_UPDATE_FAILED);
    }
    return 0;
}

TRACEPOINT_PROBE(task, task_newtask) {
    bump((args->clone_flags & CLONE_THREAD) ? THREADS_CREATED : PROCESSES_CREATED);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
#ifdef HAVE_GROUP_DEAD
    if (args->group_dead)
        bump(PROCESS_EXITS);
#else
    // Older kernels: the thread-group leader exiting stands for the process.
    u64 id = bpf_get_current_pid_tgid();
    if ((u32)id == (u32)(id >> 32))
        bump(PROCESS_EXITS);
#endif
    return 0;
}

CHECK_PYTHON_CONSTANTS  // the constants Python reads (bpf/common.bpf.h)
