// XDP ingress accounting and source blocklist (probe "xdp", see otel_ebpf_receiver/probes/xdp/probe.py).
//
// Per packet, in this order (the drop path is the short one):
//   1. parse Ethernet (up to two VLAN tags), IPv4 / IPv6 (+ up to 4 extension headers), TCP/UDP/ICMP;
//      every read is bounds-checked against data_end, and anything truncated or malformed is passed and
//      counted as "malformed" — the kernel's stack decides what to do with it, never this program;
//   2. count packets/bytes by family x transport and TCP flags in one per-CPU struct (frame sizes: step 5);
//   3. blocklist: single addresses in a hash per family (block_hosts4: 4-byte keys, block_hosts6), CIDR prefixes
//      in an LPM trie per family; a match that has not expired is dropped and counted on its entry. Why two
//      structures: with 10,000 addresses a trie walk costs ~35 ns on a miss and ~65 ns on a hit, a hash lookup
//      ~15 ns (bench/bench_xdp.py), and published bad-IP feeds are mostly single addresses. A host and a
//      covering prefix behave as one LPM trie would: the host entry, being the longer prefix, is the one that
//      matches and counts. A map whose "present" flag (list_present) is 0 never held an entry and is not looked
//      up: with no prefix listed, the pass path walks no trie;
//   4. allowlist (LPM trie, one per family), consulted only for blocklisted packets: a match passes (it wins
//      over any blocklist entry) and counts on the allowlist entry;
//   5. per-source statistics for passed packets in a bounded LRU hash, exact while the agent's last window was
//      calm and sampled under floods (see "Per-source sampling" below). The frame-size histogram is counted there
//      too, with the same decision and weight; dropped and non-IP frames count their size exactly.
//
// The lists key IPv4 sources by their 4 bytes (as xdp-filter does: the hash of a lookup covers 4 bytes, not 16);
// the per-source table keys every source as 16 bytes with IPv4 mapped to ::ffff:a.b.c.d. An IPv6 packet with a
// v4-mapped source is invalid on the wire (RFC 4291 2.5.5.2, the kernel drops it): the lists treat it as that
// IPv4 source, and so does the per-source table.
//
// Settings arrive as -D defines (map sizes, PIN_DIR, interface slots). The list maps are pinned under PIN_DIR
// and created beforehand by otel_ebpf_receiver/probes/xdp/blocklist.py with the layout below, so that bcc only
// ever adopts them. Python reads totals and per-source windows through bcc's types; the list layouts it packs
// without bcc (probes/xdp/lists.py) and the index constants are checked against this file at load.
//
// Per-source sampling. The per-source update (LRU hash lookup + three atomic adds) costs ~25 ns, as much as the
// rest of the pass path together, and it is paid per packet exactly when packets are many. So the agent sets
// xdp_config.sample_shift = k each window from the passed-packet rate of the window before (probes/xdp/sources.py:
// k = 0 at or below per_source_exact_below packets/s, else the smallest k that brings the updates under that rate).
// With k = 0 every packet is accounted exactly, as before. With k > 0 a passed packet updates its source when
//   - its source is in the hash sample: the top k bits of a multiplicative hash of the address are zero (one
//     source in 2^k; every packet of such a source counts with weight 1 — the distinct-source count is the
//     number of hash-sampled sources seen x 2^k), or else
//   - a per-CPU pseudo-random draw (an LCG in struct totals, no helper call) picks it with probability 2^-k;
//     it then counts with weight 2^k (packets, bytes, SYNs).
// Both tests are one AND with xdp_config.sample_mask (the top k bits set, written with k). Both estimators are
// unbiased; a source's packet count has a relative standard error of about sqrt(2^k / packets); packets, bytes,
// flags and verdicts in struct totals stay exact whatever k is. The frame-size buckets of passed packets are
// counted by the same decision with the same weight: unbiased under sampling (probe.py scales them to the exact
// packet count, so the histogram's count and sum stay exact), exact at k = 0. Counted per packet, this metric
// (no model feature reads it) cost 4 % of the sampled pass path (bench/bench_xdp.py).
//
// Time (expiry, last hit) is the kernel's coarse CLOCK_MONOTONIC, read only when a list entry matched (see
// entry_clock): TTLs run out in the kernel whether or not an agent runs, and the pass path reads no clock.

#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/in.h>

#include "common.bpf.h"

#ifndef PER_SOURCE_ENTRIES
#define PER_SOURCE_ENTRIES 65536
#endif
#ifndef BLOCKLIST_ENTRIES
#define BLOCKLIST_ENTRIES 100000
#endif
#ifndef ALLOWLIST_ENTRIES
#define ALLOWLIST_ENTRIES 10000
#endif
#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/otel-ebpf-receiver"
#endif
// Per-interface totals: the loader maps each watched ifindex to a slot; the last slot is "any other".
#ifndef IFACE_SLOTS
#define IFACE_SLOTS 1
#endif
#ifndef IFACE_SLOT
#define IFACE_SLOT(ifindex) 0
#endif

#define FAM_OTHER 0      // not IP (ARP, LLDP...) or an IP header we could not read
#define FAM_IPV4 1
#define FAM_IPV6 2
#define L4_OTHER 0
#define L4_TCP 1
#define L4_UDP 2
#define L4_ICMP 3        // ICMP for IPv4, ICMPv6 for IPv6
#define PROTO_SLOTS 12   // FAM x L4
#define SIZE_SLOTS 17    // log2 of the frame length, last slot is >= 64 KiB
#define SIZE16_SLOTS 128 // frames of 16..2047 bytes by 16 bytes, folded into the log2 slots by Python: a shift
                         // instead of bpf_log2l's ~20 dependent instructions (~3 ns) on every packet

#define FLAG_SYN 0       // SYN without ACK: a connection attempt
#define FLAG_SYNACK 1
#define FLAG_RST 2
#define FLAG_FIN 3

#define VERDICT_PASS 0   // no list matched
#define VERDICT_DROP 1   // blocklist match
#define VERDICT_ALLOW 2  // blocklisted, but passed because the allowlist matched too

// ---- pinned list maps (layout checked by blocklist.py before loading) ------------------------------------
struct addr4 {
    u32 addr;            // network byte order
};

struct addr16 {
    u32 w[4];            // network byte order; IPv4 as ::ffff:a.b.c.d
};

struct lpm4_key {
    u32 prefixlen;
    u32 addr;            // network byte order
};

struct lpm6_key {
    u32 prefixlen;
    u32 addr[4];
};

struct list_entry {
    u64 hits;            // packets matched
    u64 last_hit_ns;     // CLOCK_MONOTONIC_COARSE of the last match, 0 = never
    u64 expires_ns;      // CLOCK_MONOTONIC after which the entry no longer matches, 0 = never
};

BPF_TABLE_PINNED("hash", struct addr4, struct list_entry, block_hosts4, BLOCKLIST_ENTRIES,
                 PIN_DIR "/block_hosts4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct addr16, struct list_entry, block_hosts6, BLOCKLIST_ENTRIES,
                 PIN_DIR "/block_hosts6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm4_key, struct list_entry, block_v4, BLOCKLIST_ENTRIES,
                 PIN_DIR "/block_v4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm6_key, struct list_entry, block_v6, BLOCKLIST_ENTRIES,
                 PIN_DIR "/block_v6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm4_key, struct list_entry, allow_v4, ALLOWLIST_ENTRIES,
                 PIN_DIR "/allow_v4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm6_key, struct list_entry, allow_v6, ALLOWLIST_ENTRIES,
                 PIN_DIR "/allow_v6", BPF_F_NO_PREALLOC);

// "Present" flags, one u32 per blocklist map (lists.py PRESENT_INDEX): 0 = that map never held an entry, skip it.
// Userspace sets a flag to 1 before the first insert into its map and never clears it, so a flag can be stale
// only towards "present" (one lookup too many), never towards a skipped entry. An array lookup with a constant
// key is inlined by the verifier (a bounds check and an add), against a helper call and a trie walk.
#define PRESENT_HOSTS4 0
#define PRESENT_HOSTS6 1
#define PRESENT_V4 2
#define PRESENT_V6 3
#define PRESENT_SLOTS 4
BPF_TABLE_PINNED("array", u32, u32, list_present, PRESENT_SLOTS, PIN_DIR "/list_present", 0);

static __always_inline int present(u32 index)
{
    u32 *flag = list_present.lookup(&index);
    return !flag || *flag;  // no flag to read (cannot happen for an array): look the map up, fail closed
}

// ---- statistics (owned by this program, not pinned: counters restart with the agent) ----------------------
struct totals {
    u64 packets[PROTO_SLOTS];
    u64 bytes[PROTO_SLOTS];
    u64 tcp_flags[4];
    u64 size_log2[SIZE_SLOTS];
    u64 verdicts[3];         // [VERDICT_PASS] stays 0: probe.py takes packets - drop - allow (one add less)
    u64 malformed;
    u64 src_inserts;         // new keys created in per_source (evictions = inserts - current size)
    u64 src_update_failures; // per_source updates the kernel refused
    u64 src_rng;             // per-CPU LCG state for per-source sampling (see above)
    u64 src_sampled;         // per_source updates made (packets accounted to a source, unweighted)
    u64 size16[SIZE16_SLOTS]; // frame lengths [16 i, 16 i + 16) for 1 <= i < SIZE16_SLOTS; others in size_log2
                              // (sampled with the per-source decision for passed packets: see the top)
};
BPF_PERCPU_ARRAY(xdp_totals, struct totals, IFACE_SLOTS);

// Written by userspace each interval. `epoch` is bumped once per read; each source keeps the counts of the
// current and the previous epoch in two slots, so the reader gets complete per-window counts without clearing.
// (List expiry used to compare with a clock the agent wrote here; it stood still while no agent ran, which made
// five-minute automatic blocks indefinite after a crash. The kernel's clock is now read on a list match only.)
//
// Not a bcc table: probe.py creates this 1-entry array itself (packing struct config by hand: its size and the
// mask's offset are checked below) and passes its fd as XDP_CONFIG_FD. The program then reads it as a direct map
// value — an ld_imm64 of BPF_PSEUDO_MAP_VALUE, as libbpf compiles a global variable — instead of a map lookup on
// every passed packet (-2.4 % of the sampled pass path).
struct config {
    u32 epoch;
    u32 sample_shift;        // k: per-source sampling (0 = every packet), at most MAX_SAMPLE_SHIFT
    u64 sample_mask;         // the top k bits set (0 = every packet): what sample_source tests
};
#define MAX_SAMPLE_SHIFT 16
#define XDP_CONFIG_SIZE sizeof(struct config)
#define XDP_CONFIG_MASK_AT __builtin_offsetof(struct config, sample_mask)
#ifndef XDP_CONFIG_FD
#error "XDP_CONFIG_FD: the fd of the xdp_config array, created by probes/xdp/probe.py"
#endif

static __always_inline struct config *xdp_config(void)
{
    return (struct config *)bpf_pseudo_fd(BPF_PSEUDO_MAP_VALUE, XDP_CONFIG_FD);
}

struct src_window {
    u64 packets;
    u64 bytes;
    u64 syns;
    u32 epoch;
    u32 pad;
};

struct src_stats {
    struct src_window win[2];  // win[epoch & 1] is being written, the other one holds the last window
};
#ifndef NO_PER_SOURCE
BPF_TABLE("lru_hash", struct addr16, struct src_stats, per_source, PER_SOURCE_ENTRIES);
#endif

// bpf_log2l(v) is floor(log2(v)) + 1: slot s holds lengths in [2^(s-1), 2^s).
static __always_inline u32 size_slot(u64 len)
{
    u32 slot = bpf_log2l(len);
    return slot < SIZE_SLOTS ? slot : SIZE_SLOTS - 1;
}

// Frame-size histogram: 16-byte buckets for frames of 16..2047 bytes (folded into the log2 slots by Python: a
// shift instead of bpf_log2l's ~20 dependent instructions), log2 slots for the others.
static __always_inline void count_size(struct totals *t, u64 len, u64 weight)
{
    if (len - 16 < (SIZE16_SLOTS - 1) * 16)
        t->size16[(len >> 4) & (SIZE16_SLOTS - 1)] += weight;
    else
        t->size_log2[size_slot(len)] += weight;
}

// The clock of list entries, read at most once per packet and only once an entry matched: a kernel clock costs
// 20-45 ns per read on a VM (bench/bench_xdp.py), and normal traffic matches no entry. The coarse clock (to the
// last tick, a few ms) is plenty for TTLs of seconds to days. 0 in *now means "not read yet".
static __always_inline u64 entry_clock(u64 *now)
{
    if (!*now)
        *now = bpf_ktime_get_coarse_ns();
    return *now;
}

// A list entry that matches now, or 0 when absent or expired. The kernel ignores an expired entry at once, agent
// or not; the agent (or the `blocklist` verb) removes it from the map and the sidecar at its next expiry pass.
static __always_inline struct list_entry *live(struct list_entry *e, u64 *now)
{
    if (e && e->expires_ns && entry_clock(now) >= e->expires_ns)
        return 0;
    return e;
}

static __always_inline void hit(struct list_entry *e, u64 now)
{
    __sync_fetch_and_add(&e->hits, 1);
    e->last_hit_ns = now;
}

#ifndef NO_PER_SOURCE
// The hash-sample test of the comment at the top; sources.py computes the same hash to estimate distinct sources.
// fold: the four 32-bit words of struct addr16 xor-ed, computed while parsing (for IPv4 one xor with ::ffff).
static __always_inline u64 source_hash(u64 fold)
{
    return fold * 0x9E3779B97F4A7C15ULL;
}

// exact (shift 0): atomic adds, so that no CPU's count is lost. Sampled (shift > 0): plain adds, no locked
// instruction; two CPUs updating the same source at the same instant can lose one update, far inside the sampling
// error.
static __always_inline void account_source(struct totals *t, u32 epoch, struct addr16 *key, u64 len, u32 syn,
                                           u64 weight, int exact)
{
    t->src_sampled++;
    struct src_stats *s = per_source.lookup(key);
    if (!s) {
        struct src_stats init = {};
        struct src_window *w0 = &init.win[epoch & 1];
        w0->packets = weight;
        w0->bytes = len * weight;
        w0->syns = syn * weight;
        w0->epoch = epoch;
        if (per_source.insert(key, &init) == 0) {
            t->src_inserts++;
            return;
        }
        s = per_source.lookup(key);   // another CPU created it meanwhile
        if (!s) {
            t->src_update_failures++;
            return;
        }
    }
    struct src_window *w = &s->win[epoch & 1];
    if (w->epoch != epoch) {
        // First packet of this source in this epoch: the slot still holds the epoch before last.
        // Two CPUs can race here and lose a few counts of the new window; statistics tolerate that.
        w->packets = 0;
        w->bytes = 0;
        w->syns = 0;
        w->epoch = epoch;
    }
    if (exact) {
        __sync_fetch_and_add(&w->packets, weight);
        __sync_fetch_and_add(&w->bytes, len * weight);
        if (syn)
            __sync_fetch_and_add(&w->syns, weight);
        return;
    }
    w->packets += weight;
    w->bytes += len * weight;
    w->syns += syn * weight;
}

// Per-source accounting of one passed packet, sampled when the agent asked for it (comment at the top), and its
// frame size with the same weight. The key (struct addr16) is built only for a packet that is accounted: an IPv4
// source (saddr) as ::ffff:a.b.c.d, an IPv6 one copied while parsing (src6); fold is source_hash's input.
// Per packet, the common case under a flood costs one test per draw: the config's mask has the top k bits set
// (0 when exact), so a source is in the hash sample when its hash has none of them, and a draw picks the packet
// when the LCG's next value has none of them.
static __always_inline void sample_source(struct totals *t, u32 fam, u32 saddr, struct addr16 *src6, u64 fold,
                                          u64 len, u32 syn)
{
    struct config *cfg = xdp_config();
    u64 mask = cfg->sample_mask;
    u64 weight = 1;
    if (source_hash(fold) & mask) {  // not in the hash sample (never so when exact): a 2^-k draw, weight 2^k
        u64 r = t->src_rng * 6364136223846793005ULL + 1442695040888963407ULL;
        t->src_rng = r;
        if (r & mask)
            return;
        u32 k = cfg->sample_shift;
        weight = 1ULL << (k < MAX_SAMPLE_SHIFT ? k : MAX_SAMPLE_SHIFT);
    }
    count_size(t, len, weight);
    struct addr16 v4key = {{0, 0, bpf_htonl(0xffff), saddr}};
    account_source(t, cfg->epoch, fam == FAM_IPV4 ? &v4key : src6, len, syn, weight, mask == 0);
}
#endif

// Frames that are not IP, or whose Ethernet/VLAN/IP header is cut short, pass untouched: counted as family
// "other" (and malformed, if so) and nothing else.
static __always_inline int pass_other(struct totals *t, u64 len, u32 malformed)
{
    t->packets[FAM_OTHER * 4 + L4_OTHER]++;
    t->bytes[FAM_OTHER * 4 + L4_OTHER] += len;
    count_size(t, len, 1);
    if (malformed)
        t->malformed++;
    return XDP_PASS;
}

// Everything after the IP header, for one family. Inlined once per family with fam (and, for IPv4, lists4 and a
// null src6) constant, so that the IPv4 path carries none of IPv6's variables: the compiler neither keeps them
// alive nor spills them where the two paths would otherwise join.
static __always_inline int ip_packet(struct totals *t, void *data_end, u64 len, u32 fam, u32 l4, u8 proto,
                                     void *l4h, u32 malformed, u32 lists4, u32 saddr, struct addr16 *src6, u64 fold)
{
    u32 syn = 0;
    if (proto == IPPROTO_TCP) {
        l4 = L4_TCP;
        struct tcphdr *tcp = l4h;
        if (tcp) {
            if ((void *)(tcp + 1) > data_end) {
                malformed = 1;  // still an IP packet from a known source: the lists apply
            } else {
                if (tcp->syn) {
                    if (tcp->ack) {
                        t->tcp_flags[FLAG_SYNACK]++;
                    } else {
                        t->tcp_flags[FLAG_SYN]++;
                        syn = 1;
                    }
                }
                if (tcp->rst)
                    t->tcp_flags[FLAG_RST]++;
                if (tcp->fin)
                    t->tcp_flags[FLAG_FIN]++;
            }
        }
    } else if (proto == IPPROTO_UDP) {
        l4 = L4_UDP;
        if (l4h && l4h + sizeof(struct udphdr) > data_end)
            malformed = 1;
    }

    u32 pslot = fam * 4 + l4;
    if (pslot < PROTO_SLOTS) {
        t->packets[pslot]++;
        t->bytes[pslot] += len;
    }
    if (malformed)
        t->malformed++;

    // Blocklist: exact addresses, then prefixes, each only if its map ever held an entry. Only a blocklisted
    // packet consults the allowlist, which wins: the pass path (most packets) pays for at most one hash and one
    // trie lookup — with no prefix listed, one 4-byte hash lookup for IPv4 — and no clock.
    u64 now = 0;
    struct list_entry *e = 0, *a = 0;
    if (lists4) {
        struct addr4 h4 = {saddr};
        if (present(PRESENT_HOSTS4))
            e = live(block_hosts4.lookup(&h4), &now);
        if (!e && present(PRESENT_V4)) {
            struct lpm4_key k4 = {32, saddr};
            e = live(block_v4.lookup(&k4), &now);
        }
        if (e) {
            struct lpm4_key k4 = {32, saddr};
            a = live(allow_v4.lookup(&k4), &now);
        }
    } else {
        struct lpm6_key k6 = {128, {src6->w[0], src6->w[1], src6->w[2], src6->w[3]}};
        if (present(PRESENT_HOSTS6))
            e = live(block_hosts6.lookup(src6), &now);
        if (!e && present(PRESENT_V6))
            e = live(block_v6.lookup(&k6), &now);
        if (e)
            a = live(allow_v6.lookup(&k6), &now);
    }
    if (a) {
        hit(a, entry_clock(&now));
        t->verdicts[VERDICT_ALLOW]++;
    } else if (e) {
        hit(e, entry_clock(&now));
        t->verdicts[VERDICT_DROP]++;
        count_size(t, len, 1);
        return XDP_DROP;
    }
#ifdef NO_PER_SOURCE
    count_size(t, len, 1);
#else
    sample_source(t, fam, saddr, src6, fold, len, syn);  // counts the frame size too, with the same weight
#endif
    return XDP_PASS;
}

static __always_inline int ipv4_packet(struct totals *t, struct iphdr *ip, void *data_end, u64 len)
{
    if ((void *)(ip + 1) > data_end || ip->ihl < 5 || ip->version != 4)
        return pass_other(t, len, 1);
    u32 saddr = ip->saddr;
    u8 proto = ip->protocol;
    void *l4h = 0;
    // Only the first fragment carries the transport header.
    if ((ip->frag_off & bpf_htons(0x1fff)) == 0)
        l4h = (void *)ip + ip->ihl * 4;
    return ip_packet(t, data_end, len, FAM_IPV4, proto == IPPROTO_ICMP ? L4_ICMP : L4_OTHER, proto, l4h, 0, 1, saddr,
                     0, bpf_htonl(0xffff) ^ saddr);
}

static __always_inline int ipv6_packet(struct totals *t, struct ipv6hdr *ip6, void *data_end, u64 len)
{
    if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
        return pass_other(t, len, 1);
    struct addr16 src6;  // the IPv6 host list's key and the per-source key
    __builtin_memcpy(&src6, &ip6->saddr, 16);
    // A v4-mapped source goes through the IPv4 lists, as that IPv4 address.
    u32 lists4 = src6.w[2] == bpf_htonl(0xffff) && src6.w[0] == 0 && src6.w[1] == 0;
    u32 malformed = 0, l4 = L4_OTHER;
    u8 proto = ip6->nexthdr;
    void *next = ip6 + 1;
    void *l4h = next;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (proto != 0 && proto != 43 && proto != 60 && proto != 44 && proto != 51)
            break;  // not hop-by-hop, routing, destination options, fragment or AH
        u8 *ext = next;
        if ((void *)(ext + 8) > data_end) {
            l4h = 0;
            malformed = 1;
            break;
        }
        u8 nh = ext[0];
        if (proto == 44) {
            // Fragment header: a non-first fragment has no transport header.
            u16 off = (ext[2] << 8 | ext[3]) & 0xfff8;
            next = ext + 8;
            l4h = off ? 0 : next;
        } else if (proto == 51) {
            next = ext + ((u32)ext[1] + 2) * 4;
            l4h = next;
        } else {
            next = ext + ((u32)ext[1] + 1) * 8;
            l4h = next;
        }
        proto = nh;
    }
    if (proto == 58)  // IPPROTO_ICMPV6
        l4 = L4_ICMP;
    return ip_packet(t, data_end, len, FAM_IPV6, l4, proto, l4h, malformed, lists4, src6.w[3], &src6,
                     src6.w[0] ^ src6.w[1] ^ src6.w[2] ^ src6.w[3]);
}

int otel_ebpf_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    u64 len = data_end - data;

    u32 ifslot = IFACE_SLOT(ctx->ingress_ifindex);
    struct totals *t = xdp_totals.lookup(&ifslot);
    if (!t)
        return XDP_PASS;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return pass_other(t, len, 1);
    u16 h_proto = *(u16 *)(data + 12);  // not eth->h_proto: struct ethhdr is packed, read byte by byte
    void *cursor = eth + 1;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (h_proto != bpf_htons(ETH_P_8021Q) && h_proto != bpf_htons(ETH_P_8021AD))
            break;
        if (cursor + 4 > data_end)
            return pass_other(t, len, 1);
        h_proto = *(u16 *)(cursor + 2);
        cursor += 4;
    }
    if (h_proto == bpf_htons(ETH_P_IP))
        return ipv4_packet(t, cursor, data_end, len);
    if (h_proto == bpf_htons(ETH_P_IPV6))
        return ipv6_packet(t, cursor, data_end, len);
    return pass_other(t, len, 0);
}

CHECK_PYTHON_CONSTANTS  // the constants Python reads (bpf/common.bpf.h)
