"""The tcp probe counts connections, resets and retransmissions that the test causes. The tracepoints are
system-wide, so other TCP activity on the host can only add: counts are checked as lower bounds (and loose upper
bounds where a stray connection is unlikely)."""

from __future__ import annotations

import math
import socket
import time

import pytest

from model_export.lab.netns import Lab
from otel_ebpf_receiver.probes.base import COUNTER
from otel_ebpf_receiver.probes.tcp import TcpProbe

pytestmark = [pytest.mark.bpf]


@pytest.fixture(scope="module")
def probe():
    assert TcpProbe.unavailable_reason() is None, TcpProbe.unavailable_reason()
    p = TcpProbe()
    p.load()
    p.read(1.0)
    try:
        yield p
    finally:
        p.close()


def total(reading, name: str, **attrs) -> float:
    return sum(v for n, v, a in reading.counters if n == name and all(a.get(k.replace("__", ".")) == w
                                                                        for k, w in attrs.items()))


def test_local_connections_are_counted_as_opened_and_closed(probe):
    n = 25
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(n)
        for _ in range(n):
            client = socket.create_connection(server.getsockname())
            conn, _ = server.accept()
            client.close()
            conn.close()
    time.sleep(0.1)
    reading = probe.read(1.0)
    opened = lambda role: total(reading, "otel_ebpf_receiver.tcp.connections.opened", network__type="ipv4",
                                otel_ebpf_receiver__tcp__role=role)
    assert n <= opened("client") <= n + 20
    assert n <= opened("server") <= n + 20
    # Each side ends in CLOSE (the active closer after TIME_WAIT, which the kernel tracks separately).
    assert total(reading, "otel_ebpf_receiver.tcp.connections.closed", network__type="ipv4") >= n
    assert total(reading, "otel_ebpf_receiver.tcp.state_transitions", network__connection__state="established") >= 2 * n
    assert reading.features["tcp.new_connections_rate_log1p"] > 0
    assert total(reading, "otel_ebpf_receiver.tcp.connections.failed") <= 20  # anything else the host did meanwhile


@pytest.mark.parametrize("family,address", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_connecting_to_a_closed_port_counts_a_reset_each_way(probe, family, address):
    with socket.socket(family) as s:  # find a port nobody listens on
        s.bind((address, 0))
        port = s.getsockname()[1]
    n = 10
    for _ in range(n):
        with socket.socket(family) as s:
            with pytest.raises(ConnectionRefusedError):
                s.connect((address, port))
    reading = probe.read(1.0)
    network_type = "ipv4" if family == socket.AF_INET else "ipv6"
    sent = total(reading, "otel_ebpf_receiver.tcp.resets", network__type=network_type, network__io__direction="transmit")
    received = total(reading, "otel_ebpf_receiver.tcp.resets", network__type=network_type, network__io__direction="receive")
    assert n <= sent <= n + 20
    assert n <= received <= n + 20
    assert total(reading, "otel_ebpf_receiver.tcp.state_transitions", network__type=network_type,
                 network__connection__state="syn_sent") >= n
    assert reading.features["tcp.resets_rate_log1p"] >= 3.0  # log1p(>= 20 resets/s) = 3.04
    assert n <= total(reading, "otel_ebpf_receiver.tcp.connections.failed", network__type=network_type) <= n + 20
    assert reading.features["tcp.connect_failures_rate_log1p"] >= math.log1p(n)


@pytest.mark.netns
def test_unanswered_syns_are_retransmitted(probe):
    # A client in a namespace connects to an address whose (static) neighbour never answers: the SYN is
    # retransmitted after the initial 1 s RTO. Nothing leaves the lab.
    with Lab(clients=1) as lab:
        client = lab.hosts["client0"]
        client.ip("neigh", "replace", "10.200.0.99", "lladdr", "02:00:00:00:ff:ff", "dev", "eth0", "nud", "permanent")
        s = lab.socket("client0", socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(("10.200.0.99", 80))
        except BlockingIOError:
            pass
        time.sleep(1.6)
        s.close()
    reading = probe.read(1.0)
    assert total(reading, "otel_ebpf_receiver.tcp.retransmits", network__type="ipv4") >= 1
    assert reading.features["tcp.retransmits_rate_log1p"] > 0
    # The SYN's retransmission timer fired: the connection entered the loss state (where the kernel says so).
    timeouts = total(reading, "otel_ebpf_receiver.tcp.congestion_events", network__type="ipv4",
                     otel_ebpf_receiver__tcp__congestion_state="loss")
    if TcpProbe.sees_congestion():
        assert timeouts >= 1
        assert reading.features["tcp.timeouts_rate_log1p"] > 0
    else:
        assert timeouts == 0 and reading.features["tcp.timeouts_rate_log1p"] == 0


def test_every_emitted_metric_is_declared(probe):
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", 1))
        except ConnectionRefusedError:
            pass
    reading = probe.read(1.0)
    declared = {m.name: m for m in TcpProbe.metrics}
    for name, value, attrs in reading.counters:
        assert declared[name].kind == COUNTER
        assert set(attrs) <= set(declared[name].attributes), (name, attrs)
    assert set(reading.features) == {f.name for f in TcpProbe.features}
