// syscalls: system calls per syscall number, failures per (syscall, errno), calls per process.
//
// One hook, sys_exit: it carries both the syscall number and the return value, so counting there halves the
// work compared with pairing sys_enter/sys_exit (bcc's syscount counts at sys_exit too). Where the kernel
// supports raw tracepoints and the arch is known we attach the raw one: it skips building the trace record.
// All hot counters are per-CPU: no atomic instructions, no cache-line bouncing between cores.
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

#include "common.bpf.h"

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

#ifdef USE_RAW_TRACEPOINT
// The x86_64 pt_regs frame is a stable layout (it is the saved-register frame), so the generic headers we
// compile against describe it correctly even on a newer kernel.
#include <asm/ptrace.h>
// raw_syscalls:sys_exit(struct pt_regs *regs, long ret); the syscall number is in orig_ax (x86_64 only).
RAW_TRACEPOINT_PROBE(sys_exit) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long nr = -1;
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    if (nr < 0)
        return 0;
    return count_exit((u32)nr, (long)ctx->args[1]);
}
#else
TRACEPOINT_PROBE(raw_syscalls, sys_exit) {
    if (args->id < 0)
        return 0;
    return count_exit((u32)args->id, args->ret);
}
#endif

CHECK_PYTHON_CONSTANTS  // the constants Python reads (bpf/common.bpf.h)
