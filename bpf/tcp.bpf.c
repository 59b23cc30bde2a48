// tcp: connections opened and closed, state transitions, retransmissions and resets (probe "tcp", see
// otel_ebpf_receiver/probes/tcp.py). Tracepoints only: their fields come from tracefs at compile time, so
// nothing here depends on the layout of struct sock, which our headers (Debian 6.1) do not match.
//
// One per-CPU array of counters, indexed by (what, family); family 0 = IPv4, 1 = IPv6.

#include "common.bpf.h"

#define TCP_STATES 16           // tcp_states.h: 1 ESTABLISHED .. 12 NEW_SYN_RECV; room to grow
#define IDX_STATE(fam, s) ((fam) * TCP_STATES + (s))
#define IDX_OPENED_CLIENT 32    // + family: SYN_SENT -> ESTABLISHED (we connected)
#define IDX_OPENED_SERVER 34    // + family: SYN_RECV -> ESTABLISHED (we accepted)
#define IDX_CLOSED 36           // + family: any -> CLOSE
#define IDX_RETRANSMITS 38      // + family
#define IDX_RST_SENT 40         // + family
#define IDX_RST_RECEIVED 42     // + family
#define IDX_CONNECT_FAILED 44   // + family: SYN_SENT -> CLOSE (our connection attempt was refused, reset or timed out)
#define IDX_CA_RECOVERY 46      // + family: a connection entered fast recovery (loss seen by duplicate ACKs / SACK)
#define IDX_CA_LOSS 48          // + family: a connection entered the loss state (its retransmission timer fired)
#define COUNTERS 50

#define AF_INET_ 2
#define AF_INET6_ 10
#define IPPROTO_TCP_ 6
#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_ 2
#define TCP_SYN_RECV_ 3
#define TCP_CLOSE_ 7
#define TCP_CA_RECOVERY_ 3      // include/net/tcp.h enum tcp_ca_state
#define TCP_CA_LOSS_ 4

BPF_PERCPU_ARRAY(tcp_counts, u64, COUNTERS);

static __always_inline void bump(u32 index)
{
    u64 *v = tcp_counts.lookup(&index);
    if (v)
        (*v)++;
}

static __always_inline u32 fam_index(u16 family)
{
    return family == AF_INET6_ ? 1 : 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != IPPROTO_TCP_)
        return 0;
    u32 fam = fam_index(args->family);
    u32 state = args->newstate;
    if (state < TCP_STATES)
        bump(IDX_STATE(fam, state));
    if (state == TCP_ESTABLISHED_) {
        if (args->oldstate == TCP_SYN_SENT_)
            bump(IDX_OPENED_CLIENT + fam);
        else if (args->oldstate == TCP_SYN_RECV_)
            bump(IDX_OPENED_SERVER + fam);
    } else if (state == TCP_CLOSE_) {
        bump(IDX_CLOSED + fam);
        if (args->oldstate == TCP_SYN_SENT_)
            bump(IDX_CONNECT_FAILED + fam);
    }
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    bump(IDX_RETRANSMITS + fam_index(args->family));
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    bump(IDX_RST_RECEIVED + fam_index(args->family));
    return 0;
}

#ifdef HAVE_CONG_STATE_SET
// tcp:tcp_cong_state_set (6.0+, the loader defines HAVE_CONG_STATE_SET where tracefs has it): called on congestion
// state changes only, so it costs nothing while the network is healthy. Entering Loss is a retransmission timeout,
// which a full-speed transfer on a good link almost never has and a lossy or overloaded link has every second.
TRACEPOINT_PROBE(tcp, tcp_cong_state_set)
{
    u32 fam = fam_index(args->family);
    if (args->cong_state == TCP_CA_LOSS_)
        bump(IDX_CA_LOSS + fam);
    else if (args->cong_state == TCP_CA_RECOVERY_)
        bump(IDX_CA_RECOVERY + fam);
    return 0;
}
#endif

// tcp:tcp_send_reset gained an `enum sk_rst_reason` field (6.10) that bcc cannot declare from our headers, so
// this one is a plain function attached by the loader, reading the family at an offset taken from the
// tracepoint's format file (the tracepoint's own ABI, not a kernel struct): SEND_RESET_FAMILY_OFFSET is the
// `family` field where there is one, else the start of the sockaddr in `saddr` (sa_family comes first).
int on_tcp_send_reset(void *ctx)
{
#ifdef SEND_RESET_FAMILY_OFFSET
    u16 family = 0;
    bpf_probe_read_kernel(&family, sizeof(family), (char *)ctx + SEND_RESET_FAMILY_OFFSET);
    bump(IDX_RST_SENT + fam_index(family));
#else
    bump(IDX_RST_SENT);
#endif
    return 0;
}

CHECK_PYTHON_CONSTANTS  // the constants Python reads (bpf/common.bpf.h)
