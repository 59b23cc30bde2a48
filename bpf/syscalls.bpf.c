// syscalls: system calls per syscall number, failures per (syscall, errno), calls per process.
//
// One hook, sys_exit: it carries both the syscall number and the return value, so counting there halves the
// work compared with pairing sys_enter/sys_exit (bcc's syscount counts at sys_exit too). Where the syscall hub
// can run (raw tracepoints, x86_64) this file is a part of its one raw sys_exit program (SYSCALL_HUB, see
// bpf/syscall_hub.bpf.c), which skips building the trace record; elsewhere it attaches the classic tracepoint.
// All hot counters are per-CPU: no atomic instructions, no cache-line bouncing between cores.
//
// The calls per syscall number are one per-CPU array element holding every number's counter, not one element per
// number: user space then reads them all with one lookup (a few µs) instead of a batch over 512 elements, which
// the kernel copies one by one (~90 µs a window). In the kernel it is the same single per-CPU array lookup.
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

#include "common.bpf.h"
#include "syscall_hub.bpf.h"

#ifndef MAX_SYSCALLS
#define MAX_SYSCALLS 1024
#endif
_Static_assert((MAX_SYSCALLS & (MAX_SYSCALLS - 1)) == 0, "MAX_SYSCALLS is a power of two (an index mask)");
#ifndef MAX_ERROR_KEYS
#define MAX_ERROR_KEYS 4096
#endif
#ifndef MAX_PROCESSES
#define MAX_PROCESSES 4096  // processes sampled in one window (drained each window)
#endif
// Per-process accounting costs a hash lookup, more than everything else here together, so it is sampled:
// every 2^PROCESS_SAMPLE_SHIFT-th call of each syscall number on each CPU is credited to the calling process
// with weight 2^PROCESS_SAMPLE_SHIFT. Top-N by rate only needs the busy processes, which are sampled often.
#ifndef PROCESS_SAMPLE_SHIFT
#define PROCESS_SAMPLE_SHIFT 6
#endif
#define PROCESS_SAMPLE_MASK ((1ULL << PROCESS_SAMPLE_SHIFT) - 1)

struct syscall_slots {
    u64 count[MAX_SYSCALLS];  // calls completed per syscall number, cumulative since load
};
struct error_key {
    u32 nr;
    u32 err;
};

BPF_PERCPU_ARRAY(syscall_counts, struct syscall_slots, 1);
BPF_PERCPU_HASH(syscall_errors, struct error_key, u64, MAX_ERROR_KEYS);
// Keyed by tgid; user space names the top processes from /proc, which keeps comm copies off the hot path. User
// space drains it each window (sampled counts: an increment racing with the drain may be lost), so it only holds
// the processes sampled in one window.
BPF_TABLE("lru_percpu_hash", u32, u64, process_counts, MAX_PROCESSES);

static __always_inline int count_exit(u32 nr, long ret) {
    u64 sequence = 0;
    u32 zero = 0;
    struct syscall_slots *slots = syscall_counts.lookup(&zero);
    if (slots && nr < MAX_SYSCALLS) {
        // clang re-derives the index from the unchecked register after the compare, which the verifier refuses:
        // the empty asm hides the compare from clang, so the mask stays and bounds the index.
        u32 slot = nr;
        asm volatile("" : "+r"(slot));
        sequence = ++slots->count[slot & (MAX_SYSCALLS - 1)];
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
