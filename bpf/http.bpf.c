// http: HTTP/1.x requests and responses seen by server processes, from syscall tracepoints only (no kprobes, no
// uprobes): requests per method, responses per status code, request latency.
//
// Which sockets: only connections a process accepted (accept/accept4 return value), keyed by (tgid, fd), so only
// the server side is counted — a client on the same host is not counted twice. An optional comm filter is
// applied at accept time, where it costs nothing.
//
// What is read: at most PREFIX bytes at the start of a recv/send buffer, into the BPF stack; they are matched
// here against "METHOD " and "HTTP/1.x NNN" and only counters leave the kernel — never payload bytes.
//
// Cost: in the syscall hub (SYSCALL_HUB, bpf/syscall_hub.bpf.c: one raw sys_exit program for all syscall-based
// probes) every other syscall pays a few compares; a read/write-family call or a close pays one array load
// ("does any process hashing to this slot hold a tracked connection?", see servers) and, only when the answer is
// maybe, one hash lookup ("is (tgid, fd) an accepted connection?"); an untracked descriptor returns right there.
// The arguments (fd, buffer) are still in the saved registers at exit. With the classic tracepoints (fallback)
// the same check happens at entry and the buffer is remembered until exit. A connection whose first payload, in
// either direction, is not HTTP/1.x (TLS, HTTP/2, a database protocol...) is forgotten at once.
//
// Latency: from the recv that returned a request line to the send that starts the response (status line) on the
// same (tgid, fd): the server's time to first response byte, not including sending the body.
#include <uapi/linux/ptrace.h>

#include "common.bpf.h"
#include "syscall_hub.bpf.h"

#ifndef MAX_CONNS
#define MAX_CONNS 16384
#endif
#ifndef MAX_KEYS
#define MAX_KEYS 4096
#endif
#define PREFIX 16
#define MAX_THREADS_IN_IO 10240

enum method { M_NONE = 0, M_GET, M_POST, M_PUT, M_DELETE, M_HEAD, M_PATCH, M_OPTIONS, M_CONNECT, M_TRACE };
enum buffer_kind { BUF_PLAIN = 0, BUF_IOVEC = 1, BUF_MSGHDR = 2 };
// stats: STAT_NEW_KEYS counts keys inserted into requests and responses.
enum http_stat { STAT_CONNS_TRACKED = STAT_PROBE, STAT_CONNS_NOT_HTTP };

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
struct conn_val {
    u64 request_ts;  // when the pending request was read, 0 when none is pending
    u64 accept_ts;   // when it was accepted (see close_exit)
    u32 accept_tid;  // the thread that accepted it
    u32 listen_fd;   // the listening socket it was accepted from: user space resolves the port from it
    u16 method;      // of the pending request
    u16 is_http;     // 1 once a request was seen: from then on non-matching data are bodies, not a verdict
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

BPF_TABLE("lru_hash", struct conn_key, struct conn_val, conns, MAX_CONNS);
// Most processes never accept a connection: their reads, writes and closes should not pay a hash lookup. servers
// counts the conns entries of the processes whose tgid falls in each slot, an upper bound (an entry the LRU
// evicts or an accept overwrites is never subtracted), so 0 proves "no tracked connection here" with one array
// load, which the JIT inlines; anything else falls through to the conns lookup.
#define SERVER_SLOTS 4096
BPF_ARRAY(servers, u32, SERVER_SLOTS);
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
static __always_inline struct conn_val *tracked_conn(struct conn_key *key) {
    u32 slot = key->tgid & (SERVER_SLOTS - 1);
    u32 *servers_here = servers.lookup(&slot);
    if (!servers_here || !*servers_here)
        return NULL;  // no process hashing here holds a tracked connection
    return conns.lookup(key);
}

static __always_inline void forget_conn(struct conn_key *key) {
    if (conns.delete(key) != 0)
        return;
    u32 slot = key->tgid & (SERVER_SLOTS - 1);
    u32 *servers_here = servers.lookup(&slot);
    if (servers_here && *servers_here)
        __sync_fetch_and_add(servers_here, -1);  // a race to below 0 wraps to "maybe": costs a lookup, never a miss
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
    struct conn_key key = {.tgid = id >> 32, .fd = (u32)ret};
    struct conn_val val = {.listen_fd = listen_fd, .accept_ts = bpf_ktime_get_ns(), .accept_tid = (u32)id};
    if (conns.update(&key, &val) == 0) {
        // Counted before accept returns: no read of the new descriptor can come first.
        u32 slot = key.tgid & (SERVER_SLOTS - 1);
        u32 *servers_here = servers.lookup(&slot);
        if (servers_here)
            __sync_fetch_and_add(servers_here, 1);
        bump_stat(STAT_CONNS_TRACKED);
    } else {
        bump_stat(STAT_UPDATE_FAILED);
    }
    return 0;
}

static __always_inline u16 match_method(const char *b) {
    // b is PREFIX bytes, zero-padded past what was transferred: padding never matches a letter or a space.
    if (b[0] == 'G' && b[1] == 'E' && b[2] == 'T' && b[3] == ' ')
        return M_GET;
    if (b[0] == 'P') {
        if (b[1] == 'O' && b[2] == 'S' && b[3] == 'T' && b[4] == ' ')
            return M_POST;
        if (b[1] == 'U' && b[2] == 'T' && b[3] == ' ')
            return M_PUT;
        if (b[1] == 'A' && b[2] == 'T' && b[3] == 'C' && b[4] == 'H' && b[5] == ' ')
            return M_PATCH;
        return M_NONE;
    }
    if (b[0] == 'D' && b[1] == 'E' && b[2] == 'L' && b[3] == 'E' && b[4] == 'T' && b[5] == 'E' && b[6] == ' ')
        return M_DELETE;
    if (b[0] == 'H' && b[1] == 'E' && b[2] == 'A' && b[3] == 'D' && b[4] == ' ')
        return M_HEAD;
    if (b[0] == 'O' && b[1] == 'P' && b[2] == 'T' && b[3] == 'I' && b[4] == 'O' && b[5] == 'N' && b[6] == 'S' &&
        b[7] == ' ')
        return M_OPTIONS;
    if (b[0] == 'C' && b[1] == 'O' && b[2] == 'N' && b[3] == 'N' && b[4] == 'E' && b[5] == 'C' && b[6] == 'T' &&
        b[7] == ' ')
        return M_CONNECT;
    if (b[0] == 'T' && b[1] == 'R' && b[2] == 'A' && b[3] == 'C' && b[4] == 'E' && b[5] == ' ')
        return M_TRACE;
    return M_NONE;
}

static __always_inline int is_digit(char c) { return c >= '0' && c <= '9'; }

// "HTTP/1.0 200" or "HTTP/1.1 404": the status code, else 0.
static __always_inline u16 match_status(const char *b) {
    if (!(b[0] == 'H' && b[1] == 'T' && b[2] == 'T' && b[3] == 'P' && b[4] == '/' && b[5] == '1' && b[6] == '.' &&
          (b[7] == '0' || b[7] == '1') && b[8] == ' '))
        return 0;
    if (!(b[9] >= '1' && b[9] <= '5' && is_digit(b[10]) && is_digit(b[11])))
        return 0;
    return (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
}

static __always_inline void count_request(struct conn_key *key, struct conn_val *conn, u16 method, u64 now) {
    conn->request_ts = now;
    conn->method = method;
    conn->is_http = 1;
    struct request_key rk = {.tgid = key->tgid, .listen_fd = conn->listen_fd, .method = method};
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

static __always_inline void count_response(struct conn_key *key, struct conn_val *conn, u16 status, u64 now) {
    struct response_key rk = {.tgid = key->tgid, .listen_fd = conn->listen_fd, .method = conn->method,
                              .status = status};
    u64 delta = now > conn->request_ts ? now - conn->request_ts : 0;
    if (status >= 200)
        conn->request_ts = 0;  // answered; a 1xx (100 Continue) is followed by the final response
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

// What a recv or send on a tracked connection transferred: match its first bytes, count, or forget the
// connection when its first payload is not HTTP/1.x. `conn` may be NULL: then (tgid, fd) is looked up once the
// payload is read (the classic path, whose entry lookup may be stale by now).
static __always_inline int inspect_io(struct conn_key *key, struct conn_val *conn, struct pending io, long ret) {
    if (ret <= 0)
        return 0;  // EAGAIN, error or end of stream: nothing was transferred

    // Where the first transferred bytes are: the buffer, the first iovec, or the msghdr's first iovec.
    u64 addr = io.buf;
    u64 room = ret;
    if (io.kind == BUF_MSGHDR) {
        struct msghdr_abi msg = {};
        if (bpf_probe_read_user(&msg, sizeof(msg), (void *)addr) != 0 || !msg.msg_iovlen)
            return 0;
        addr = msg.msg_iov;
    }
    if (io.kind != BUF_PLAIN) {
        struct iovec_abi iov = {};
        if (bpf_probe_read_user(&iov, sizeof(iov), (void *)addr) != 0)
            return 0;
        addr = iov.base;
        room = iov.len < room ? iov.len : room;
    }
    char b[PREFIX] = {};
    u32 n = PREFIX;
    if (room < PREFIX)
        n = room;  // never read past what was transferred (the buffer may be shorter than PREFIX)
    if (n == 0 || n > PREFIX || bpf_probe_read_user(b, n, (void *)addr) != 0)
        return 0;

    if (!conn) {
        conn = tracked_conn(key);
        if (!conn)
            return 0;  // closed meanwhile by another thread
    }
    u64 now = bpf_ktime_get_ns();
    if (!io.sending) {
        u16 method = match_method(b);
        if (method) {
            count_request(key, conn, method, now);
            return 0;
        }
    } else if (conn->request_ts) {
        u16 status = match_status(b);
        if (status) {
            count_response(key, conn, status, now);
            return 0;
        }
    }
    if (!conn->is_http) {
        // The first payload of this connection is not HTTP/1.x: stop looking at it.
        forget_conn(key);
        bump_stat(STAT_CONNS_NOT_HTTP);
    }
    return 0;
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
    struct conn_key key = {.tgid = id >> 32, .fd = fd};
    struct conn_val *conn = tracked_conn(&key);
    if (!conn)
        return;  // the common case: not an accepted connection
    if (conn->accept_tid != (u32)id && !conn->is_http && bpf_ktime_get_ns() - conn->accept_ts < CLOSE_RACE_NS)
        return;
    forget_conn(&key);
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
    struct conn_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = io.fd};
    struct conn_val *conn = tracked_conn(&key);
    if (!conn)
        return;  // the common case: not an accepted connection, nothing more to do
    inspect_io(&key, conn, io, call->ret);
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
    struct conn_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = (u32)args->fd};
    if (tracked_conn(&key))
        forget_conn(&key);
    return 0;
}

// recv / send: remember the buffer at entry when the fd is a tracked connection.
static __always_inline int io_enter(u64 fd, const void *buf, u16 kind, u16 sending) {
    u64 id = bpf_get_current_pid_tgid();
    struct conn_key key = {.tgid = id >> 32, .fd = (u32)fd};
    if (!tracked_conn(&key))
        return 0;  // the common case: not an accepted connection
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
    struct conn_key key = {.tgid = id >> 32, .fd = io.fd};
    return inspect_io(&key, NULL, io, ret);
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
