// block_io: block-device requests per device and direction — operations, bytes, total time, log2 latency buckets —
// and the requests in flight.
//
// Only tracepoint fields are used (dev, sector, bytes, rwbs from the tracefs format): the headers bcc compiles
// against are not the running kernel's, so struct request is never read. A request is therefore keyed by
// (dev, sector), which is unique among a device's in-flight read/write requests.
//
// Start of a request: block_rq_insert when QUEUE_TIME is defined and the kernel has it (the request entered the
// I/O scheduler or a dispatch list; requests issued directly never pass there), otherwise block_rq_issue. With
// queue time the total matches /proc/diskstats' time fields, which system.disk.operation_time is defined from;
// without it, it is the device's service time (like biolatency without -Q).
//
// Known blind spots, bounded rather than fixed: a front merge moves a queued request's start sector, so its entry
// is never completed under that key. The in-flight map is an LRU (stale entries are evicted, never fill it) and
// user space ignores entries older than a stale limit when it counts requests in flight.
#include <uapi/linux/ptrace.h>

#include "common.bpf.h"

#ifndef MAX_INFLIGHT
#define MAX_INFLIGHT 10240
#endif
#ifndef MAX_DEVICES
#define MAX_DEVICES 256
#endif
// At issue, an entry stamped at insert is kept as this request's start unless older than this: then it is a
// leftover of a request whose completion we could not match, and the issue starts a new one.
#ifndef MAX_QUEUE_NS
#define MAX_QUEUE_NS 10000000000ULL
#endif

#define DIR_READ 0
#define DIR_WRITE 1

// stats: STAT_NEW_KEYS counts requests entered into `start`, STAT_START_DONE those the program removed again.
enum block_io_stat { STAT_START_DONE = STAT_PROBE };

struct start_key {
    u32 dev;
    u32 pad;
    u64 sector;
};
struct start_val {
    u64 ts;      // bpf_ktime_get_ns() (CLOCK_MONOTONIC)
    u32 bytes;
    u32 dir;
};
struct stat_key {
    u32 dev;
    u32 dir;
};
struct disk_stats {
    u64 ops;
    u64 bytes;
    u64 time_ns;
    u64 slots[LATENCY_SLOTS];
};

BPF_TABLE("lru_hash", struct start_key, struct start_val, start, MAX_INFLIGHT);
BPF_PERCPU_HASH(disk_stats, struct stat_key, struct disk_stats, MAX_DEVICES * 2);
BPF_PERCPU_ARRAY(zero_stats, struct disk_stats, 1);  // a zeroed value to insert from, off the 512-byte stack

// rwbs is blk_fill_rwbs(): an optional 'F' (pre-flush), then the operation (R, W, D, F, N...), then flags.
static __always_inline int direction(char c0, char c1) {
    if (c0 == 'R')
        return DIR_READ;
    if (c0 == 'W' || (c0 == 'F' && c1 == 'W'))
        return DIR_WRITE;
    return -1;  // flush, discard, secure erase, write-zeroes, driver-private: not reads or writes
}

static __always_inline int stamp(u32 dev, u64 sector, u32 bytes, char c0, char c1, int at_issue) {
    int dir = direction(c0, c1);
    if (dir < 0)
        return 0;
    struct start_key key = {.dev = dev, .sector = sector};
    u64 now = bpf_ktime_get_ns();
    struct start_val *v = start.lookup(&key);
    if (v) {
#ifdef QUEUE_TIME
        // Insert means a new request at this sector (a requeued one is re-inserted and restarts: rare).
        if (!at_issue || now - v->ts > MAX_QUEUE_NS)
            v->ts = now;
#else
        v->ts = now;
#endif
        v->bytes = bytes;  // the issued request includes what merged into it while queued
        v->dir = dir;
        return 0;
    }
    struct start_val fresh = {.ts = now, .bytes = bytes, .dir = dir};
    if (start.update(&key, &fresh) == 0)
        bump_stat(STAT_NEW_KEYS);
    else
        bump_stat(STAT_UPDATE_FAILED);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_issue) {
    return stamp(args->dev, args->sector, args->bytes, args->rwbs[0], args->rwbs[1], 1);
}

#ifdef QUEUE_TIME
TRACEPOINT_PROBE(block, block_rq_insert) {
    return stamp(args->dev, args->sector, args->bytes, args->rwbs[0], args->rwbs[1], 0);
}
#endif

#ifdef HAVE_RQ_MERGE
// The request merged into another one is freed without completing: forget it (the survivor keeps its start).
TRACEPOINT_PROBE(block, block_rq_merge) {
    struct start_key key = {.dev = args->dev, .sector = args->sector};
    if (start.delete(&key) == 0)
        bump_stat(STAT_START_DONE);
    return 0;
}
#endif

TRACEPOINT_PROBE(block, block_rq_complete) {
    struct start_key key = {.dev = args->dev, .sector = args->sector};
    struct start_val *v = start.lookup(&key);
    if (!v)
        return 0;  // started before we attached, or not a read/write
    u64 now = bpf_ktime_get_ns();
    u64 delta = now > v->ts ? now - v->ts : 0;
    struct stat_key sk = {.dev = args->dev, .dir = v->dir};
    u32 bytes = v->bytes;
    if (start.delete(&key) == 0)
        bump_stat(STAT_START_DONE);

    struct disk_stats *s = disk_stats.lookup(&sk);
    if (!s) {
        u32 zero = 0;
        struct disk_stats *init = zero_stats.lookup(&zero);
        if (!init)
            return 0;
        if (disk_stats.update(&sk, init) != 0) {
            bump_stat(STAT_UPDATE_FAILED);
            return 0;
        }
        s = disk_stats.lookup(&sk);
        if (!s)
            return 0;
    }
    s->ops++;
    s->bytes += bytes;
    s->time_ns += delta;
    u32 slot = latency_slot(delta);
    s->slots[slot]++;
    return 0;
}

CHECK_PYTHON_CONSTANTS  // the constants Python reads (bpf/common.bpf.h)
