// syscalls: system calls per syscall number, failures per (syscall, errno), calls per process.
//
// One hook, sys_exit: it carries both the syscall number and the return value, so counting there halves the
// work compared with pairing sys_enter/sys_exit (bcc's syscount counts at sys_exit too). Where the syscall hub
// can run (raw tracepoints, x86_64) this file is a part of its one raw sys_exit program (SYSCALL_HUB, see
// bpf/syscall_hub.bpf.c), which skips building the trace record; elsewhere it attaches the classic tracepoint.
// All hot counters are per-CPU: no atomic instructions, no cache-line bouncing between cores.
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

#include "common.bpf.h"
#include "syscall_hub.bpf.h"

#ifndef MAX_SYSCALLS
#define MAX_SYSCALLS 1024
#endif
#ifndef MAX_ERROR_KEYS
#define MAX_ERROR_KEYS 4096
#endif
#ifndef MAX_PROCESSES
#define MAX_PROCESSES 10240
#endif
// Per-process accounting costs a hash lookup, more than everything else here together, so it is sampled:
// every 2^PROCESS_SAMPLE_SHIFT-th call of each syscall number on each CPU is credited to the calling process
// with weight 2^PROCESS_SAMPLE_SHIFT. Top-N by rate only needs the busy processes, which are sampled often.
#ifndef PROCESS_SAMPLE_SHIFT
#define PROCESS_SAMPLE_SHIFT 6
#endif
#define PROCESS_SAMPLE_MASK ((1ULL << PROCESS_SAMPLE_SHIFT) - 1)

struct error_key {
    u32 nr;
    u32 err;
};

BPF_PERCPU_ARRAY(syscall_counts, u64, MAX_SYSCALLS);
BPF_PERCPU_HASH(syscall_errors, struct error_key, u64, MAX_ERROR_KEYS);
// Keyed by tgid; user space names the top processes from /proc, which keeps comm copies off the hot path.
BPF_TABLE("lru_percpu_hash", u32, u64, process_counts, MAX_PROCESSES);

static __always_inline int count_exit(u32 nr, long ret) {
    u64 sequence = 0;
    if (nr < MAX_SYSCALLS) {
        u64 *count = syscall_counts.lookup(&nr);
        if (count)
            sequence = ++(*count);
    }
    if (ret < 0 && ret >= -4095) {
        struct error_key key = {.nr = nr, .err = (u32)-ret};
        u64 *errors = syscall_errors.lookup(&key);
        if (errors) {
            (*errors)++;
        } else {
            u64 one = 1;
            if (syscall_errors.update(&key, &one) != 0)
                bump_stat(STAT_UPDATE_FAILED);
        }
    }
    if (sequence & PROCESS_SAMPLE_MASK)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 *calls = process_counts.lookup(&tgid);
    if (calls) {
        *calls += PROCESS_SAMPLE_MASK + 1;
    } else {
        u64 weight = PROCESS_SAMPLE_MASK + 1;
        if (process_counts.update(&tgid, &weight) == 0)
            bump_stat(STAT_NEW_KEYS);  // a process new to process_counts
        else
            bump_stat(STAT_UPDATE_FAILED);
    }
    return 0;
}

#ifdef SYSCALL_HUB
// Every syscall number counts: no switch.
static __always_inline void syscalls_on_syscall_exit(const struct syscall_exit *call) {
    count_exit((u32)call->nr, call->ret);
}
#else
TRACEPOINT_PROBE(raw_syscalls, sys_exit) {
    if (args->id < 0)
        return 0;
    return count_exit((u32)args->id, args->ret);
}
#endif

CHECK_PYTHON_CONSTANTS  // the constants Python reads (bpf/common.bpf.h)
