"""tcp: connections opened (as client or server) and closed, state transitions, retransmissions, resets sent
and received — from the sock/tcp tracepoints only (this kernel offers no kprobes)."""

from __future__ import annotations

from ..kernel.maps import percpu_array_u64
from .base import (COUNTER, CounterDeltas, Feature, Hook, Metric, Probe, Reading, TopItem, log1p_rate,
                   tracepoint_fields)
from .contract import U64, MapContract

# Indexes into tcp_counts, as in bpf/tcp.bpf.c (compared with it at load); each is followed by its IPv6 twin.
TCP_STATES = 16
IDX_OPENED_CLIENT, IDX_OPENED_SERVER, IDX_CLOSED, IDX_RETRANSMITS, IDX_RST_SENT, IDX_RST_RECEIVED = 32, 34, 36, 38, 40, 42
IDX_CONNECT_FAILED, IDX_CA_RECOVERY, IDX_CA_LOSS = 44, 46, 48
COUNTERS = 50
NETWORK_TYPES = ("ipv4", "ipv6")  # the family index: 0 = AF_INET, 1 = AF_INET6
TCP_ROLE = "otel_ebpf_receiver.tcp.role"  # client or server: no semantic-convention attribute says which
CONGESTION_STATE = "otel_ebpf_receiver.tcp.congestion_state"  # recovery (duplicate ACKs) or loss (timeout)

# include/net/tcp_states.h, named as the semantic convention's network.connection.state values.
STATE_NAMES = {1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait_1", 5: "fin_wait_2", 6: "time_wait",
               7: "close", 8: "close_wait", 9: "last_ack", 10: "listen", 11: "closing", 12: "new_syn_recv"}



def state_name(state: int) -> str | None:
    """Kernel TCP state number -> network.connection.state (None for a state this table does not know)."""
    return STATE_NAMES.get(state)


SET_STATE = Hook("sock:inet_sock_set_state")
SEND_RESET = Hook("tcp:tcp_send_reset")
CONG_STATE_SET = Hook("tcp:tcp_cong_state_set")  # optional: 6.0+; without it the congestion counts stay 0


def _series() -> list[tuple[str, int, dict[str, str], tuple[str, ...]]]:
    """Every exported series of tcp_counts: (metric, slot, attributes, the feature totals it adds to), in the
    order a window reports them. Built once: a window then only compares counts (the attribute dicts are shared,
    read-only)."""
    rows = []
    for fam, network_type in enumerate(NETWORK_TYPES):
        attrs = {"network.type": network_type}
        for index, role in ((IDX_OPENED_CLIENT, "client"), (IDX_OPENED_SERVER, "server")):
            rows.append(("otel_ebpf_receiver.tcp.connections.opened", index + fam, {**attrs, TCP_ROLE: role},
                         ("opened",)))
        rows.append(("otel_ebpf_receiver.tcp.connections.closed", IDX_CLOSED + fam, attrs, ("closed",)))
        rows.append(("otel_ebpf_receiver.tcp.connections.failed", IDX_CONNECT_FAILED + fam, attrs, ("failed",)))
        for index, state in ((IDX_CA_RECOVERY, "recovery"), (IDX_CA_LOSS, "loss")):
            rows.append(("otel_ebpf_receiver.tcp.congestion_events", index + fam, {**attrs, CONGESTION_STATE: state},
                         ("timeouts",) if index == IDX_CA_LOSS else ()))
        for state, name in STATE_NAMES.items():
            rows.append(("otel_ebpf_receiver.tcp.state_transitions", fam * TCP_STATES + state,
                         {**attrs, "network.connection.state": name}, ()))
        rows.append(("otel_ebpf_receiver.tcp.retransmits", IDX_RETRANSMITS + fam, attrs, ("retransmits",)))
        for index, direction in ((IDX_RST_SENT, "transmit"), (IDX_RST_RECEIVED, "receive")):
            rows.append(("otel_ebpf_receiver.tcp.resets", index + fam, {**attrs, "network.io.direction": direction},
                         ("resets",)))
    return rows


SERIES = _series()


class TcpProbe(Probe):
    name = "tcp"
    summary = "TCP connections opened/closed, state transitions, retransmits, resets"
    hooks = (SET_STATE, Hook("tcp:tcp_retransmit_skb"), SEND_RESET, Hook("tcp:tcp_receive_reset"))
    metrics = (
        Metric("otel_ebpf_receiver.tcp.connections.opened", COUNTER, "{connection}",
               "TCP connections established: as client (SYN_SENT→ESTABLISHED) or server (SYN_RECV→ESTABLISHED).",
               ("network.type", TCP_ROLE)),
        Metric("otel_ebpf_receiver.tcp.connections.closed", COUNTER, "{connection}",
               "TCP sockets that reached CLOSE (including connection attempts that failed).", ("network.type",)),
        Metric("otel_ebpf_receiver.tcp.connections.failed", COUNTER, "{connection}",
               "TCP connection attempts of this host that failed (SYN_SENT→CLOSE: refused, reset or timed out).",
               ("network.type",)),
        Metric("otel_ebpf_receiver.tcp.congestion_events", COUNTER, "{event}",
               "TCP connections entering fast recovery (loss seen by duplicate ACKs) or the loss state (retransmission "
               "timeout); kernels without tcp:tcp_cong_state_set (before 6.0) report none.",
               ("network.type", CONGESTION_STATE)),
        Metric("otel_ebpf_receiver.tcp.state_transitions", COUNTER, "{transition}",
               "TCP socket state changes, per new state.", ("network.type", "network.connection.state")),
        Metric("otel_ebpf_receiver.tcp.retransmits", COUNTER, "{segment}", "TCP segments retransmitted.",
               ("network.type",)),
        Metric("otel_ebpf_receiver.tcp.resets", COUNTER, "{segment}",
               "TCP resets sent (transmit) or received (receive).", ("network.type", "network.io.direction")),
    )
    features = (
        Feature("tcp.resets_rate_log1p", "log1p(TCP resets sent + received per second)"),
        Feature("tcp.retransmits_rate_log1p", "log1p(TCP retransmitted segments per second)"),
        Feature("tcp.new_connections_rate_log1p", "log1p(TCP connections established per second, both roles)"),
        # Connection health (issue 13): a rate, not a share of attempts — a host whose only attempts are an exporter
        # retrying a backend that is not there fails every one of them, about once a second.
        Feature("tcp.connect_failures_rate_log1p", "log1p(failed TCP connection attempts per second)"),
        # Link health: retransmits alone cannot tell a lossy link from a fast transfer's fast retransmits.
        Feature("tcp.timeouts_rate_log1p", "log1p(TCP retransmission timeouts per second: connections entering loss)"),
    )

    maps = {"tcp_counts": MapContract(value=U64)}
    c_constants = {"TCP_STATES": TCP_STATES, "IDX_STATE(1, 0)": TCP_STATES, "IDX_OPENED_CLIENT": IDX_OPENED_CLIENT,
                   "IDX_OPENED_SERVER": IDX_OPENED_SERVER, "IDX_CLOSED": IDX_CLOSED, "IDX_RETRANSMITS": IDX_RETRANSMITS,
                   "IDX_RST_SENT": IDX_RST_SENT, "IDX_RST_RECEIVED": IDX_RST_RECEIVED,
                   "IDX_CONNECT_FAILED": IDX_CONNECT_FAILED, "IDX_CA_RECOVERY": IDX_CA_RECOVERY,
                   "IDX_CA_LOSS": IDX_CA_LOSS, "COUNTERS": COUNTERS}

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._deltas = CounterDeltas()

    def cflags(self) -> list[str]:
        flags = ["-DHAVE_CONG_STATE_SET"] if self.sees_congestion() else []
        fields = tracepoint_fields(SEND_RESET)
        if "family" in fields:
            return [*flags, f"-DSEND_RESET_FAMILY_OFFSET={fields['family'][0]}"]
        if fields.get("saddr", (0, 0))[1] >= 16:  # a struct sockaddr_in(6): sa_family first
            return [*flags, f"-DSEND_RESET_FAMILY_OFFSET={fields['saddr'][0]}"]
        return flags

    @staticmethod
    def sees_congestion() -> bool:
        """Whether this kernel has the tracepoint the congestion counts come from (and the fields they read)."""
        fields = tracepoint_fields(CONG_STATE_SET)
        return "cong_state" in fields and "family" in fields

    def load(self) -> None:
        super().load()
        # The one handler bcc cannot declare by itself (see the C file).
        self.bpf.attach_tracepoint(tp=SEND_RESET.tracepoint, fn_name="on_tcp_send_reset")

    def read(self, seconds: float) -> Reading:
        reading = Reading()
        counts = percpu_array_u64(self.bpf["tcp_counts"])
        sums = dict.fromkeys(("opened", "closed", "resets", "retransmits", "failed", "timeouts"), 0.0)
        delta = self._deltas.delta
        for metric, index, attrs, totals in SERIES:
            d = delta(index, float(counts[index]))
            if d:
                reading.counters.append((metric, d, attrs))
                for total in totals:
                    sums[total] += d
        opened, closed, resets, retransmits = sums["opened"], sums["closed"], sums["resets"], sums["retransmits"]
        reading.features = {
            "tcp.resets_rate_log1p": log1p_rate(resets, seconds),
            "tcp.retransmits_rate_log1p": log1p_rate(retransmits, seconds),
            "tcp.new_connections_rate_log1p": log1p_rate(opened, seconds),
            "tcp.connect_failures_rate_log1p": log1p_rate(sums["failed"], seconds),
            "tcp.timeouts_rate_log1p": log1p_rate(sums["timeouts"], seconds),
        }
        if seconds > 0:
            reading.rate, reading.rate_unit = opened / seconds, "connections/s"
            reading.top = [TopItem("closed", closed / seconds, "connections/s"),
                           TopItem("retransmitted", retransmits / seconds, "segments/s"),
                           TopItem("resets sent + received", resets / seconds, "segments/s")]
        return reading
