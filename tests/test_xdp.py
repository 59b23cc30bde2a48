"""The XDP probe counts what a namespace host sends, exactly: per source, per protocol, per TCP flag, per size.

Every test builds its own lab (a victim and three clients on a bridge, no default routes) and its own pin dir,
attaches the program to the victim's eth0 from the root namespace, and reads the probe like the agent does."""

from __future__ import annotations

import math
import os

import pytest

from model_export.lab.netns import ping
from otel_ebpf_receiver.probes.base import COUNTER, GAUGE, HISTOGRAM
from otel_ebpf_receiver.probes.xdp import XdpProbe
from otel_ebpf_receiver.probes.xdp.probe import SYN_SHARE_PRIOR_SEGMENTS

from .xdp_support import counter_where, gauge, lab, pin_dir, probe, send_udp, settings  # noqa: F401

pytestmark = [pytest.mark.bpf, pytest.mark.netns]


def test_attaches_in_native_mode_on_veth(probe, lab):
    assert probe.mode == "xdp native"
    assert lab.xdp_programs() == probe.attached_program_ids()


def test_exact_per_source_counts_for_icmp_and_udp_over_ipv4(probe, lab):
    c0, c1 = lab.hosts["client0"], lab.hosts["client1"]
    send_udp(lab, "client0", 50)
    ping(lab, "client0", lab.victim.ipv4, 20)
    send_udp(lab, "client1", 7)
    reading = probe.read(1.0)

    s0 = probe.source_window(c0.ipv4)
    assert s0 is not None and s0.packets_per_s == 70
    assert probe.source_window(c1.ipv4).packets_per_s == 7
    assert probe.source_window(lab.hosts["client2"].ipv4) is None
    eth0 = {"network.interface.name": "eth0"}
    assert counter_where(reading, "otel_ebpf_receiver.xdp.packets",
                         {**eth0, "network.type": "ipv4", "network.transport": "udp"}) == 57
    assert counter_where(reading, "otel_ebpf_receiver.xdp.packets",
                         {**eth0, "network.type": "ipv4", "network.transport": "icmp"}) == 20
    # The semantic convention's system.network.packet.count names the interface system.device.
    assert counter_where(reading, "system.network.packet.count",
                         {"system.device": "eth0", "network.io.direction": "receive"}) == 77
    assert gauge(reading, "otel_ebpf_receiver.xdp.sources") == [2.0]
    top = probe.top_sources(3)
    assert [t.address for t in top] == [c0.ipv4, c1.ipv4]
    assert top[0].share == pytest.approx(70 / 77)
    assert reading.features["xdp.top_source_share"] == pytest.approx(70 / 77)
    assert reading.features["xdp.udp_rate_log1p"] == pytest.approx(math.log1p(57))
    assert gauge(reading, "otel_ebpf_receiver.xdp.top_source.packet_rate", {"source.address": c0.ipv4}) == [70.0]

    # The next window starts from zero for every source.
    send_udp(lab, "client1", 3)
    probe.read(1.0)
    assert probe.source_window(c0.ipv4) is None
    assert probe.source_window(c1.ipv4).packets_per_s == 3


def test_exact_per_source_counts_over_ipv6(probe, lab):
    c2 = lab.hosts["client2"]
    send_udp(lab, "client2", 30, v6=True)
    ping(lab, "client2", lab.victim.ipv6, 10)
    reading = probe.read(1.0)
    s = probe.source_window(c2.ipv6)
    assert s is not None and s.packets_per_s == 40
    assert counter_where(reading, "otel_ebpf_receiver.xdp.packets",
                         {"network.type": "ipv6", "network.transport": "udp"}) == 30
    assert counter_where(reading, "otel_ebpf_receiver.xdp.packets",
                         {"network.type": "ipv6", "network.transport": "icmp"}) == 10


def test_tcp_flags_syn_share_and_sizes(probe, lab):
    victim = lab.victim.ipv4
    hping = ["timeout", "20", "hping3", "-q", "-i", "u2000", "-p", "8080"]
    lab.run("client0", *hping, "-S", "-c", "20", victim, check=False)
    lab.run("client1", *hping, "-S", "-A", "-c", "5", victim, check=False)
    lab.run("client1", *hping, "-R", "-c", "3", victim, check=False)
    reading = probe.read(1.0)
    flags = {f: counter_where(reading, "otel_ebpf_receiver.xdp.tcp_flags", {"otel_ebpf_receiver.tcp.flag": f})
             for f in ("syn", "syn_ack", "rst", "fin")}
    assert flags == {"syn": 20, "syn_ack": 5, "rst": 3, "fin": 0}
    assert probe.source_window(lab.hosts["client0"].ipv4).syn_share == 1.0
    assert probe.source_window(lab.hosts["client1"].ipv4).syn_share == 0.0
    assert reading.features["xdp.syn_ratio"] == pytest.approx(20 / (28 + SYN_SHARE_PRIOR_SEGMENTS))
    assert reading.features["xdp.syn_synack_imbalance"] > 0
    assert reading.features["xdp.udp_rate_log1p"] == 0

    send_udp(lab, "client2", 4, size=1000)  # 1042-byte frames: the [1024, 2048) bucket
    reading = probe.read(1.0)
    (name, buckets, total, attrs), = [h for h in reading.histograms if h[0] == "otel_ebpf_receiver.xdp.packet.size"]
    assert buckets == {2048.0: 4} and total == 4 * 1042 and attrs == {"network.interface.name": "eth0"}


def test_every_emitted_metric_is_declared_with_its_kind(probe, lab):
    send_udp(lab, "client0", 5)
    ping(lab, "client1", lab.victim.ipv6, 2)
    reading = probe.read(1.0)
    declared = {m.name: m for m in XdpProbe.metrics}
    for kind, rows in ((COUNTER, reading.counters), (GAUGE, reading.gauges), (HISTOGRAM, reading.histograms)):
        for row in rows:
            metric = declared[row[0]]
            assert metric.kind == kind, row
            assert set(row[-1]) <= set(metric.attributes), row
    assert set(reading.features) == {f.name for f in XdpProbe.features}


def test_generic_mode_when_asked(settings, lab):
    p = XdpProbe({**settings, "mode": "generic"})
    p.load()
    try:
        assert p.mode == "xdp generic"
        p.read(1.0)
        send_udp(lab, "client0", 9)
        p.read(1.0)
        assert p.source_window(lab.hosts["client0"].ipv4).packets_per_s == 9
    finally:
        p.close()
    assert lab.xdp_programs() == []


def test_close_detaches_but_keeps_the_lists_pinned(settings, lab, pin_dir):
    # Choice: close() detaches the program (no XDP left on the interface) and keeps the list maps pinned, so the
    # blocklist survives for the next start and the CLI keeps working. Only an agent that dies without closing
    # leaves its program attached (netlink attachments outlive the process), which keeps the blocklist enforced.
    p = XdpProbe(settings)
    p.load()
    assert lab.xdp_programs()
    p.close()
    assert lab.xdp_programs() == []
    out = lab.victim.ip("-d", "link", "show", "dev", "eth0").stdout
    assert "xdp" not in out, out
    assert sorted(os.listdir(pin_dir)) == ["allow_v4", "allow_v6", "block_hosts4", "block_hosts6", "block_v4",
                                           "block_v6", "list_present"]


def test_no_interface_is_a_one_line_error(settings):
    from otel_ebpf_receiver.errors import ProbeError

    with pytest.raises(ProbeError, match="no interface to watch"):
        XdpProbe({**settings, "interfaces": []}).load()
    with pytest.raises(ProbeError, match="interface nosuch0 not found in network namespace"):
        XdpProbe({**settings, "interfaces": ["nosuch0"]}).load()


def test_a_foreign_xdp_program_is_never_replaced(settings, lab):
    from bcc import BPF

    from otel_ebpf_receiver.errors import ProbeError
    from otel_ebpf_receiver.kernel.netns import in_netns

    other = BPF(text="int someone_else(struct xdp_md *ctx) { return XDP_PASS; }")
    with in_netns(lab.victim.netns):
        BPF.attach_xdp("eth0", other.load_func("someone_else", BPF.XDP), 1 << 1)
    try:
        before = lab.xdp_programs()
        with pytest.raises(ProbeError, match="already runs XDP program someone_else"):
            XdpProbe(settings).load()
        assert lab.xdp_programs() == before
    finally:
        with in_netns(lab.victim.netns):
            BPF.remove_xdp("eth0", 1 << 1)
        other.cleanup()
