// file_open: file opens and failed opens per process name, and the most-opened paths.
//
// The path is read at sys_exit, when we know whether the open succeeded; user memory is still mapped then. In the
// syscall hub (SYSCALL_HUB, bpf/syscall_hub.bpf.c) the path pointer is still in the saved registers at exit; with
// the classic tracepoints it is saved at sys_enter. Paths are unbounded keys, so they live in an LRU map that user
// space drains each window (only the top paths are reported); it counts what was evicted as new keys inserted minus
// entries drained. The counts per process name stay cumulative (exact) and are never deleted.
//
// Reading and hashing the path is half of what an open costs here (measured: ~165 of ~310 ns per open, a user-memory
// string copy and a 128-byte key hashed into a map all CPUs share), and a web server opens a file per request. So paths are sampled where there is plenty to sample, as sched times its waits (PATH_SAMPLE_SHIFT =
// k > 0): on each CPU the first PATHS_EXACT_PER_TICK successful opens of a jiffy all count their path; beyond that
// one in 2^k, at random, counts 2^k times (sample_log2_weight, common.bpf.h). A quiet host's paths stay exact; a busy
// one's top paths are unbiased estimates (relative standard error about sqrt(2^k / opens): ~1 % at 80,000 opens of
// one path).
#include <linux/sched.h>

#include "common.bpf.h"
#include "syscall_hub.bpf.h"

#ifndef MAX_INFLIGHT
#define MAX_INFLIGHT 10240
#endif
#ifndef MAX_COMMS
#define MAX_COMMS 4096
#endif
#ifndef MAX_PATHS
#define MAX_PATHS 4096  // distinct paths opened in one window (drained each window)
#endif
#ifndef PATH_BYTES
#define PATH_BYTES 128
#endif
#ifndef PATH_SAMPLE_SHIFT
#define PATH_SAMPLE_SHIFT 0
#endif
#ifndef PATHS_EXACT_PER_TICK
#define PATHS_EXACT_PER_TICK 16
#endif

struct comm_key {
    char comm[TASK_COMM_LEN];
};
struct open_counts {
    u64 opens;
    u64 failed;
};
struct path_key {
    char path[PATH_BYTES];
};
// Per CPU: the key being built (too large for the 512-byte BPF stack) and the sampling's jiffy and count.
struct path_scratch {
    struct path_key key;
    u64 tick;     // the jiffy `counted` counts in
    u64 counted;  // paths counted exactly in that jiffy
};

#ifndef SYSCALL_HUB
BPF_HASH(inflight, u64, const char *, MAX_INFLIGHT);
#endif
BPF_PERCPU_HASH(comm_counts, struct comm_key, struct open_counts, MAX_COMMS);
BPF_TABLE("lru_hash", struct path_key, u64, path_counts, MAX_PATHS);
BPF_PERCPU_ARRAY(path_scratch, struct path_scratch, 1);

static __always_inline int count_open(const char *path, long ret) {
    struct comm_key ck = {};
    bpf_get_current_comm(&ck.comm, sizeof(ck.comm));
    struct open_counts *counts = comm_counts.lookup(&ck);
    if (!counts) {
        struct open_counts zero = {};
        if (comm_counts.update(&ck, &zero) != 0) {
            bump_stat(STAT_UPDATE_FAILED);
            return 0;
        }
        counts = comm_counts.lookup(&ck);
        if (!counts)
            return 0;
    }
    counts->opens++;
    if (ret < 0) {
        counts->failed++;
        return 0;
    }

    u32 zero_index = 0;
    struct path_scratch *scratch = path_scratch.lookup(&zero_index);
    if (!scratch)
        return 0;
    u64 weight = 1;
    if (PATH_SAMPLE_SHIFT) {
        int sampled = sample_log2_weight(&scratch->tick, &scratch->counted, PATHS_EXACT_PER_TICK, PATH_SAMPLE_SHIFT);
        if (sampled < 0)
            return 0;
        weight = 1ULL << sampled;
    }
    struct path_key *pk = &scratch->key;
    __builtin_memset(pk->path, 0, sizeof(pk->path));
    bpf_probe_read_user_str(pk->path, sizeof(pk->path), path);
    u64 *hits = path_counts.lookup(pk);
    if (hits) {
        __sync_fetch_and_add(hits, weight);
    } else {
        if (path_counts.update(pk, &weight) == 0)
            bump_stat(STAT_NEW_KEYS);  // a path new to path_counts
        else
            bump_stat(STAT_UPDATE_FAILED);
    }
    return 0;
}

#ifdef SYSCALL_HUB
static __always_inline void file_open_on_syscall_exit(const struct syscall_exit *call) {
    const char *path;
    switch (call->nr) {
    case __NR_openat:  // (dirfd, path, flags, mode)
        path = (const char *)call->si;
        break;
#ifdef __NR_openat2  // Linux >= 5.6: (dirfd, path, how, size)
    case __NR_openat2:
        path = (const char *)call->si;
        break;
#endif
#ifdef __NR_open  // not on arm64 and other newer arches: (path, flags, mode)
    case __NR_open:
        path = (const char *)call->di;
        break;
#endif
    default:
        return;
    }
    if (compat_syscall(call))
        return;
    count_open(path, call->ret);
}
#else
static __always_inline int on_enter(const char *filename) {
    u64 id = bpf_get_current_pid_tgid();
    if (inflight.update(&id, &filename) != 0)
        bump_stat(STAT_UPDATE_FAILED);
    return 0;
}

static __always_inline int on_exit(long ret) {
    u64 id = bpf_get_current_pid_tgid();
    const char **filename = inflight.lookup(&id);
    if (!filename)
        return 0;  // entered before we attached
    const char *path = *filename;
    inflight.delete(&id);
    return count_open(path, ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return on_enter(args->filename); }
TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return on_exit(args->ret); }

#ifdef HAVE_SYS_ENTER_OPEN  // not on arm64 and other newer arches
TRACEPOINT_PROBE(syscalls, sys_enter_open) { return on_enter(args->filename); }
TRACEPOINT_PROBE(syscalls, sys_exit_open) { return on_exit(args->ret); }
#endif

#ifdef HAVE_SYS_ENTER_OPENAT2  // Linux >= 5.6
TRACEPOINT_PROBE(syscalls, sys_enter_openat2) { return on_enter(args->filename); }
TRACEPOINT_PROBE(syscalls, sys_exit_openat2) { return on_exit(args->ret); }
#endif
#endif  // SYSCALL_HUB

CHECK_PYTHON_CONSTANTS  // the constants Python reads (bpf/common.bpf.h)
