// http: HTTP/1.x requests and responses seen by server processes, from syscall tracepoints only (no kprobes, no
// uprobes): requests per method, responses per status code, request latency.
//
// Which sockets: only connections a process accepted (accept/accept4 return value), keyed by (tgid, fd), so only
// the server side is counted — a client on the same host is not counted twice. An optional comm filter is
// applied at accept time, where it costs nothing.
//
// What is read: at most 8 bytes at the start of a received buffer ("METHOD ") and 12 at the start of a sent one
// ("HTTP/1.x NNN"), into the BPF stack, matched here as whole words; only counters leave the kernel — never
// payload bytes. And only where the connection's phase says an answer can be there:
//   NEW      accepted, nothing transferred yet: a read is checked for a request line, a write (the server
//            speaking first) or a read that is not a request line proves the connection is not HTTP/1.x (TLS,
//            HTTP/2, a database protocol...): it is forgotten at once;
//   IDLE     HTTP, no request pending: a read is checked for a request line, a write returns at once (the rest
//            of a response);
//   REQUEST  a request line was read: a read returns at once (request body, headers), a write is checked for a
//            status line; a final one (>= 200) goes back to IDLE, a 1xx (100 Continue) stays.
// So one request costs one checked read and one checked write, however many reads and writes carry it.
//
// Cost per system call (the syscall hub, SYSCALL_HUB, bpf/syscall_hub.bpf.c: one raw sys_exit program for all
// syscall-based probes): a call this part does not watch leaves at the switch; a read/write-family call that
// transferred nothing (EAGAIN: an event loop's last read) leaves before any lookup; any other watched call pays
// one array load (conn_slots, inlined by the JIT) and a compare of its (tgid, fd): most descriptors, including
// a server's own files, leave right there. A tracked connection's state lives in that slot, so no hash lookup
// is paid per request; only slots two connections hash to fall back to the conns hash (see conn_slots). With
// the classic tracepoints (fallback) the same checks happen at entry and the buffer is remembered until exit.
//
// Latency: from the recv that returned a request line to the send that starts the response (status line) on the
// same (tgid, fd): the server's time to first response byte, not including sending the body.
#include <uapi/linux/ptrace.h>

#include "common.bpf.h"
#include "syscall_hub.bpf.h"

#ifndef MAX_CONNS
#define MAX_CONNS 16384
#endif
#ifndef CONN_SLOT_BITS
#define CONN_SLOT_BITS 14  // the loader passes log2 of MAX_CONNS rounded up
#endif
#define CONN_SLOTS (1u << CONN_SLOT_BITS)
#ifndef MAX_KEYS
#define MAX_KEYS 4096
#endif
#define METHOD_BYTES 8   // "OPTIONS " and "CONNECT " are the longest
#define STATUS_BYTES 12  // "HTTP/1.1 200"
#define MAX_THREADS_IN_IO 10240

enum method { M_NONE = 0, M_GET, M_POST, M_PUT, M_DELETE, M_HEAD, M_PATCH, M_OPTIONS, M_CONNECT, M_TRACE };
enum phase { P_NEW = 0, P_IDLE, P_REQUEST };
enum buffer_kind { BUF_PLAIN = 0, BUF_IOVEC = 1, BUF_MSGHDR = 2 };
// stats: STAT_NEW_KEYS counts keys inserted into requests and responses.
enum http_stat { STAT_CONNS_TRACKED = STAT_PROBE, STAT_CONNS_NOT_HTTP, STAT_CONNS_OVERFLOW };

// The syscall ABI (stable, unlike kernel-internal structs): struct iovec and the start of struct user_msghdr.
struct iovec_abi {
    u64 base;
    u64 len;
};
struct msghdr_abi {
    u64 msg_name;
    u32 msg_namelen;
    u32 pad;
    u64 msg_iov;
    u64 msg_iovlen;
};

struct conn_key {
    u32 tgid;
    u32 fd;
};
// One connection's state: in its conn_slots slot, or, when another connection held that slot at accept, in conns.
// 32 bytes: a slot never straddles two cache lines.
struct conn {
    u64 owner;       // conn_slots: (tgid << 32 | fd) of the connection held here, 0 when free
    u64 ts;          // phase NEW: when it was accepted (see close_exit); REQUEST: when the request was read
    u32 accept_tid;  // the thread that accepted it
    u32 listen_fd;   // the listening socket it was accepted from: user space resolves the port from it
    u32 overflow;    // conn_slots: conns entries whose key hashes to this slot (an upper bound, see forget_conn)
    u16 method;      // of the pending request
    u16 phase;       // enum phase
};
struct pending {
    u64 buf;
    u32 fd;
    u16 kind;
    u16 sending;
};
struct request_key {
    u32 tgid;
    u32 listen_fd;
    u32 method;
};
struct response_key {
    u32 tgid;
    u32 listen_fd;
    u16 method;
    u16 status;
};
struct response_val {
    u64 count;
    u64 sum_ns;
    u64 slots[LATENCY_SLOTS];
};

// conn_slots: a direct-mapped table of tracked connections, indexed by a hash of (tgid, fd). An array lookup is a
// few inlined instructions where a hash lookup hashes the key and walks a bucket, and it is paid on every read,
// write and close of every process that ever accepted a connection. A slot is claimed with compare-and-swap at
// accept; a connection whose slot is held by another goes to conns and counts in the slot's overflow, so a slot
// with overflow 0 that does not hold (tgid, fd) proves "not tracked". conns is an LRU: an entry left behind
// (a process that exited with connections open) is evicted in time; overflow is never lowered for those, which
// costs the slot a hash lookup, never a miss.
BPF_ARRAY(conn_slots, struct conn, CONN_SLOTS);
BPF_TABLE("lru_hash", struct conn_key, struct conn, conns, MAX_CONNS);
#ifndef SYSCALL_HUB
// thread -> the tracked recv/send it is in; thread -> listening fd of the accept it is in. Entries live for one
// syscall; LRU so that one left behind by an unusual exit path can never fill them. (The hub reads both from the
// registers at exit and needs neither.)
BPF_TABLE("lru_hash", u64, struct pending, in_io, MAX_THREADS_IN_IO);
BPF_TABLE("lru_hash", u64, u32, accepting, MAX_THREADS_IN_IO);
#endif
BPF_TABLE("lru_percpu_hash", struct request_key, u64, requests, MAX_KEYS);
BPF_TABLE("lru_percpu_hash", struct response_key, struct response_val, responses, MAX_KEYS);
BPF_PERCPU_ARRAY(zero_response, struct response_val, 1);
#ifdef FILTER_COMMS
struct http_comm_key {
    char comm[16];
};
BPF_HASH(comm_filter, struct http_comm_key, u8, 64);  // filled by user space before attaching
#endif

// ---- accept / close: which (tgid, fd) are server connections --------------------------------------------------
static __always_inline u64 conn_owner(u32 tgid, u32 fd) { return ((u64)tgid << 32) | fd; }

// Fibonacci hashing: a process's consecutive descriptor numbers land far apart.
static __always_inline u32 conn_slot(u32 tgid, u32 fd) {
    return ((tgid * 0x9E3779B1u + fd) * 0x9E3779B1u) >> (32 - CONN_SLOT_BITS);
}

static __always_inline struct conn *find_conn(u32 tgid, u32 fd) {
    u32 index = conn_slot(tgid, fd);
    struct conn *slot = conn_slots.lookup(&index);
    if (!slot)
        return NULL;
    if (slot->owner == conn_owner(tgid, fd))
        return slot;
    if (!slot->overflow)
        return NULL;  // the common case: not a tracked connection
    struct conn_key key = {.tgid = tgid, .fd = fd};
    return conns.lookup(&key);
}

static __always_inline void forget_conn(u32 tgid, u32 fd) {
    u32 index = conn_slot(tgid, fd);
    struct conn *slot = conn_slots.lookup(&index);
    if (!slot)
        return;
    if (slot->owner == conn_owner(tgid, fd)) {
        slot->owner = 0;  // free for the next accept (only this connection's own syscalls write this value)
        return;
    }
    struct conn_key key = {.tgid = tgid, .fd = fd};
    if (slot->overflow && conns.delete(&key) == 0)
        __sync_fetch_and_add(&slot->overflow, -1);  // a race to below 0 wraps to "maybe": costs a lookup, never a miss
}

static __always_inline int track_accept(u64 id, u32 listen_fd, long ret) {
    if (ret < 0)
        return 0;
#ifdef FILTER_COMMS
    struct http_comm_key ck = {};
    bpf_get_current_comm(&ck.comm, sizeof(ck.comm));
    if (!comm_filter.lookup(&ck))
        return 0;
#endif
    u32 tgid = id >> 32, fd = (u32)ret;
    u64 owner = conn_owner(tgid, fd);
    struct conn val = {.ts = bpf_ktime_get_ns(), .accept_tid = (u32)id, .listen_fd = listen_fd, .phase = P_NEW};
    u32 index = conn_slot(tgid, fd);
    struct conn *slot = conn_slots.lookup(&index);
    if (!slot)
        return 0;
    struct conn_key key = {.tgid = tgid, .fd = fd};
    if (slot->owner != owner && slot->overflow && conns.delete(&key) == 0)
        __sync_fetch_and_add(&slot->overflow, -1);  // a stale entry of this (tgid, fd): this accept replaces it
    // Claimed before accept returns: no read of the new descriptor can come first.
    if (slot->owner == owner || __sync_val_compare_and_swap(&slot->owner, 0, owner) == 0) {
        slot->ts = val.ts;
        slot->accept_tid = val.accept_tid;
        slot->listen_fd = listen_fd;
        slot->method = M_NONE;
        slot->phase = P_NEW;
        bump_stat(STAT_CONNS_TRACKED);
        return 0;
    }
    if (conns.update(&key, &val) == 0) {  // the slot holds another connection
        __sync_fetch_and_add(&slot->overflow, 1);
        bump_stat(STAT_CONNS_TRACKED);
        bump_stat(STAT_CONNS_OVERFLOW);
    } else {
        bump_stat(STAT_UPDATE_FAILED);
    }
    return 0;
}

// ---- what a read or write carried ---------------------------------------------------------------------------------
// Little-endian words of the bytes a buffer starts with, compared in one instruction each.
#define W2(a, b) ((u64)(a) | (u64)(b) << 8)
#define W4(a, b, c, d) (W2(a, b) | W2(c, d) << 16)
#define W8(a, b, c, d, e, f, g, h) (W4(a, b, c, d) | W4(e, f, g, h) << 32)
#define BYTES(n) ((1ull << (8 * (n))) - 1)  // a mask of the first n < 8 bytes

// w is the first 8 bytes, zero past what was transferred: zero never matches a letter or a space.
static __always_inline u16 match_method(u64 w) {
    if ((w & BYTES(4)) == W4('G', 'E', 'T', ' '))
        return M_GET;
    if ((w & BYTES(5)) == W8('P', 'O', 'S', 'T', ' ', 0, 0, 0))
        return M_POST;
    if ((w & BYTES(4)) == W4('P', 'U', 'T', ' '))
        return M_PUT;
    if ((w & BYTES(5)) == W8('H', 'E', 'A', 'D', ' ', 0, 0, 0))
        return M_HEAD;
    if ((w & BYTES(7)) == W8('D', 'E', 'L', 'E', 'T', 'E', ' ', 0))
        return M_DELETE;
    if ((w & BYTES(6)) == W8('P', 'A', 'T', 'C', 'H', ' ', 0, 0))
        return M_PATCH;
    if (w == W8('O', 'P', 'T', 'I', 'O', 'N', 'S', ' '))
        return M_OPTIONS;
    if (w == W8('C', 'O', 'N', 'N', 'E', 'C', 'T', ' '))
        return M_CONNECT;
    if ((w & BYTES(6)) == W8('T', 'R', 'A', 'C', 'E', ' ', 0, 0))
        return M_TRACE;
    return M_NONE;
}

struct status_line {
    u64 version;  // "HTTP/1.0" or "HTTP/1.1"
    u8 space, d0, d1, d2;
};

static __always_inline int is_digit(u8 c) { return c >= '0' && c <= '9'; }

// "HTTP/1.0 200" or "HTTP/1.1 404": the status code, else 0.
static __always_inline u16 match_status(const struct status_line *s) {
    if (s->version != W8('H', 'T', 'T', 'P', '/', '1', '.', '1') && s->version != W8('H', 'T', 'T', 'P', '/', '1', '.', '0'))
        return 0;
    if (s->space != ' ' || !(s->d0 >= '1' && s->d0 <= '5') || !is_digit(s->d1) || !is_digit(s->d2))
        return 0;
    return (s->d0 - '0') * 100 + (s->d1 - '0') * 10 + (s->d2 - '0');
}

// Copies the first min(transferred, size) bytes into dst (size bytes), zeroed by the caller: the buffer itself,
// the first iovec, or the msghdr's first iovec. 0 when nothing could be read.
static __always_inline u32 read_start(void *dst, u32 size, u64 addr, u16 kind, long ret) {
    u64 room = ret;
    if (kind == BUF_MSGHDR) {
        struct msghdr_abi msg = {};
        if (bpf_probe_read_user(&msg, sizeof(msg), (void *)addr) != 0 || !msg.msg_iovlen)
            return 0;
        addr = msg.msg_iov;
    }
    if (kind != BUF_PLAIN) {
        struct iovec_abi iov = {};
        if (bpf_probe_read_user(&iov, sizeof(iov), (void *)addr) != 0)
            return 0;
        addr = iov.base;
        room = iov.len < room ? iov.len : room;
    }
    u32 n = room < size ? room : size;  // never read past what was transferred: the buffer may be shorter
    if (n == 0 || n > size || bpf_probe_read_user(dst, n, (void *)addr) != 0)
        return 0;
    return n;
}

static __always_inline void count_request(u32 tgid, struct conn *conn, u16 method) {
    conn->ts = bpf_ktime_get_ns();
    conn->method = method;
    conn->phase = P_REQUEST;
    struct request_key rk = {.tgid = tgid, .listen_fd = conn->listen_fd, .method = method};
    u64 *count = requests.lookup(&rk);
    if (count) {
        (*count)++;
    } else {
        u64 one = 1;
        if (requests.update(&rk, &one) == 0)
            bump_stat(STAT_NEW_KEYS);
        else
            bump_stat(STAT_UPDATE_FAILED);
    }
}

static __always_inline void count_response(u32 tgid, struct conn *conn, u16 status) {
    u64 now = bpf_ktime_get_ns();
    struct response_key rk = {.tgid = tgid, .listen_fd = conn->listen_fd, .method = conn->method, .status = status};
    u64 delta = now > conn->ts ? now - conn->ts : 0;
    if (status >= 200)
        conn->phase = P_IDLE;  // answered; a 1xx (100 Continue) is followed by the final response
    struct response_val *r = responses.lookup(&rk);
    if (!r) {
        u32 zero = 0;
        struct response_val *init = zero_response.lookup(&zero);
        if (!init)
            return;
        if (responses.update(&rk, init) != 0) {
            bump_stat(STAT_UPDATE_FAILED);
            return;
        }
        bump_stat(STAT_NEW_KEYS);
        r = responses.lookup(&rk);
        if (!r)
            return;
    }
    r->count++;
    r->sum_ns += delta;
    u32 slot = latency_slot(delta);
    r->slots[slot]++;
}

// Does a read (sending = 0) or write on a connection in this phase need its bytes looked at?
static __always_inline int wants(const struct conn *conn, u16 sending) {
    return sending ? conn->phase != P_IDLE : conn->phase != P_REQUEST;
}

// A recv or send of ret > 0 bytes on the tracked connection conn, in a phase that wants it (see the top).
static __always_inline void inspect_io(u32 tgid, u32 fd, struct conn *conn, struct pending io, long ret) {
    if (io.sending) {
        if (conn->phase == P_REQUEST) {
            struct status_line s = {};
            if (read_start(&s, STATUS_BYTES, io.buf, io.kind, ret)) {
                u16 status = match_status(&s);
                if (status)
                    count_response(tgid, conn, status);
            }
            return;  // anything else in a response (a header write, a retry) waits for the status line
        }
    } else {
        u64 w = 0;
        if (!read_start(&w, METHOD_BYTES, io.buf, io.kind, ret))
            return;  // unreadable: no verdict
        u16 method = match_method(w);
        if (method) {
            count_request(tgid, conn, method);
            return;
        }
    }
    if (conn->phase == P_NEW) {
        // The first payload of this connection is not an HTTP/1.x request: stop looking at it.
        forget_conn(tgid, fd);
        bump_stat(STAT_CONNS_NOT_HTTP);
    }
}

#ifdef SYSCALL_HUB
// ---- the syscall hub's part: everything at sys_exit, arguments from the saved registers -------------------------
#ifndef CLOSE_RACE_NS
#define CLOSE_RACE_NS 20000
#endif

// close() releases the descriptor number before its sys_exit, so another thread of the process may accept a new
// connection on the same number in between, and its entry must survive this close. An entry the closing thread
// did not insert itself, inserted within CLOSE_RACE_NS and with no payload seen yet, is that connection's; any
// other is the closed connection's. (The classic path deletes at sys_enter_close, before the number is free.)
static __always_inline void close_exit(u64 id, u32 fd) {
    u32 tgid = id >> 32;
    struct conn *conn = find_conn(tgid, fd);
    if (!conn)
        return;  // the common case: not an accepted connection
    if (conn->accept_tid != (u32)id && conn->phase == P_NEW && bpf_ktime_get_ns() - conn->ts < CLOSE_RACE_NS)
        return;
    forget_conn(tgid, fd);
}

static __always_inline void http_on_syscall_exit(const struct syscall_exit *call) {
    struct pending io = {.buf = call->si, .fd = (u32)call->di, .kind = BUF_PLAIN, .sending = 0};
    switch (call->nr) {
    case __NR_accept4:  // (listen fd, addr, addrlen, flags) -> the new fd
#ifdef __NR_accept
    case __NR_accept:
#endif
        if (!compat_syscall(call))
            track_accept(bpf_get_current_pid_tgid(), (u32)call->di, call->ret);
        return;
    case __NR_close:
        close_exit(bpf_get_current_pid_tgid(), (u32)call->di);
        return;
    case __NR_read:  // (fd, buf, count)
        break;
    case __NR_write:
        io.sending = 1;
        break;
#ifdef __NR_recvfrom
    case __NR_recvfrom:  // (fd, buf, len, flags, addr, addrlen)
        break;
#endif
#ifdef __NR_sendto
    case __NR_sendto:
        io.sending = 1;
        break;
#endif
#ifdef __NR_recvmsg
    case __NR_recvmsg:  // (fd, msghdr, flags)
        io.kind = BUF_MSGHDR;
        break;
#endif
#ifdef __NR_sendmsg
    case __NR_sendmsg:
        io.kind = BUF_MSGHDR;
        io.sending = 1;
        break;
#endif
#ifdef __NR_readv
    case __NR_readv:  // (fd, iovec, count)
        io.kind = BUF_IOVEC;
        break;
#endif
#ifdef __NR_writev
    case __NR_writev:
        io.kind = BUF_IOVEC;
        io.sending = 1;
        break;
#endif
    default:
        return;
    }
    if (call->ret <= 0)
        return;  // EAGAIN, error or end of stream: nothing was transferred, nothing to look up
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct conn *conn = find_conn(tgid, io.fd);
    if (!conn || !wants(conn, io.sending))
        return;  // the common cases: not an accepted connection; a body or the rest of a response
    inspect_io(tgid, io.fd, conn, io, call->ret);
}

#else
// ---- classic tracepoints: remember at entry, match at exit ------------------------------------------------------
static __always_inline int accept_enter(int listen_fd) {
    u64 id = bpf_get_current_pid_tgid();
    u32 fd = listen_fd;
    accepting.update(&id, &fd);
    return 0;
}

static __always_inline int accept_exit(long ret) {
    u64 id = bpf_get_current_pid_tgid();
    u32 *listen_fd = accepting.lookup(&id);
    if (!listen_fd)
        return 0;
    u32 lfd = *listen_fd;
    accepting.delete(&id);
    return track_accept(id, lfd, ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { return accept_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return accept_exit(args->ret); }
#ifdef HAVE_ACCEPT
TRACEPOINT_PROBE(syscalls, sys_enter_accept) { return accept_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return accept_exit(args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_close) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (find_conn(tgid, (u32)args->fd))
        forget_conn(tgid, (u32)args->fd);
    return 0;
}

// recv / send: remember the buffer at entry when the fd is a tracked connection in a phase that wants it.
static __always_inline int io_enter(u64 fd, const void *buf, u16 kind, u16 sending) {
    u64 id = bpf_get_current_pid_tgid();
    struct conn *conn = find_conn(id >> 32, (u32)fd);
    if (!conn || !wants(conn, sending))
        return 0;  // the common cases: not an accepted connection; a body or the rest of a response
    struct pending p = {.buf = (u64)buf, .fd = (u32)fd, .kind = kind, .sending = sending};
    in_io.update(&id, &p);
    return 0;
}

static __always_inline int io_exit(long ret) {
    u64 id = bpf_get_current_pid_tgid();
    struct pending *p = in_io.lookup(&id);
    if (!p)
        return 0;
    struct pending io = *p;
    in_io.delete(&id);
    if (ret <= 0)
        return 0;
    u32 tgid = id >> 32;
    struct conn *conn = find_conn(tgid, io.fd);  // again: another thread may have closed it meanwhile
    if (conn && wants(conn, io.sending))
        inspect_io(tgid, io.fd, conn, io, ret);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { return io_enter(args->fd, args->buf, BUF_PLAIN, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return io_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { return io_enter(args->fd, args->buf, BUF_PLAIN, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return io_exit(args->ret); }
#ifdef HAVE_RECVFROM
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return io_enter(args->fd, args->ubuf, BUF_PLAIN, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return io_exit(args->ret); }
#endif
#ifdef HAVE_SENDTO
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return io_enter(args->fd, args->buff, BUF_PLAIN, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return io_exit(args->ret); }
#endif
#ifdef HAVE_RECVMSG
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return io_enter(args->fd, args->msg, BUF_MSGHDR, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return io_exit(args->ret); }
#endif
#ifdef HAVE_SENDMSG
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return io_enter(args->fd, args->msg, BUF_MSGHDR, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return io_exit(args->ret); }
#endif
#ifdef HAVE_READV
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return io_enter(args->fd, args->vec, BUF_IOVEC, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return io_exit(args->ret); }
#endif
#ifdef HAVE_WRITEV
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return io_enter(args->fd, args->vec, BUF_IOVEC, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return io_exit(args->ret); }
#endif
#endif  // SYSCALL_HUB

CHECK_PYTHON_CONSTANTS  // the constants Python reads (bpf/common.bpf.h)
