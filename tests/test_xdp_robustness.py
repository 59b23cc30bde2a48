"""Hostile input: a random-source flood larger than the per-source table, and truncated or malformed frames.
Nothing may crash, nothing may be dropped that is not blocklisted, and the blocklist must stay untouched."""

from __future__ import annotations

import socket
import struct
import subprocess

import pytest

from model_export.lab.netns import raw_frames
from otel_ebpf_receiver.probes.xdp import XdpProbe

from .xdp_support import UdpSink, blocklist, counter_where, gauge, lab, pin_dir, send_udp, settings  # noqa: F401

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

DROP = {"otel_ebpf_receiver.xdp.verdict": "drop"}
PASS = {"otel_ebpf_receiver.xdp.verdict": "pass"}


def test_random_source_flood_larger_than_the_source_table(settings, lab, blocklist):
    blocklist.block(lab.hosts["client1"].ipv4, reason="known bad")
    blocklist.block("2001:db8::/32")
    before = {e.cidr: (e.hits, e.reason) for e in blocklist.list()}
    probe = XdpProbe({**settings, "per_source_entries": 1024})
    probe.load()
    try:
        probe.read(1.0)
        # Bounded: 6000 packets, about 20k/s, forged random IPv4 sources. The victim has no default route, so its
        # ICMP port-unreachable answers to the forged sources die inside the lab.
        lab.run("client0", "timeout", "30", "hping3", "-q", "--udp", "--rand-source", "-p", "7", "-i", "u50",
                "-c", "6000", lab.victim.ipv4, check=False, timeout=40)
        reading = probe.read(1.0)
        assert reading.map_evictions > 3000
        assert reading.map_update_failures == 0
        distinct = gauge(reading, "otel_ebpf_receiver.xdp.sources")[0]
        assert 5000 < distinct <= 6005  # a stray lab packet (IPv6 MLD from ::) may join the window
        assert reading.features["xdp.distinct_sources_log1p"] > 8
        assert reading.features["xdp.top_source_share"] < 0.01
        assert len(probe.top_sources(10)) == 10
        passed = counter_where(reading, "otel_ebpf_receiver.xdp.verdicts", PASS)
        assert 5900 <= passed <= 6005  # a forged source may land on client1's address: then it is dropped

        # The lists are a separate structure: untouched, and still enforced.
        after = {e.cidr: (e.hits, e.reason) for e in blocklist.list()}
        assert after.keys() == before.keys()
        assert after["2001:db8::/32"] == before["2001:db8::/32"]
        sink = UdpSink(lab)
        try:
            send_udp(lab, "client1", 5)
            send_udp(lab, "client2", 5)
            assert sink.drain() == {lab.hosts["client2"].ipv4: 5}
        finally:
            sink.close()
    finally:
        probe.close()
    assert lab.xdp_programs() == []


def _eth(ethertype: int) -> bytes:
    return b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + struct.pack("!H", ethertype)


def _ipv4(src: str, proto: int, payload: bytes, ihl: int = 5, total: int | None = None) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total if total is not None else 20 + len(payload), 0, 0, 64,
                      proto, 0, socket.inet_aton(src), socket.inet_aton("10.200.0.1"))
    return hdr + payload


def test_truncated_and_malformed_frames_pass_untouched(settings, lab, blocklist):
    victim_mac = bytes.fromhex(lab.victim.mac.replace(":", ""))
    c0 = lab.hosts["client0"].ipv4
    blocked = lab.hosts["client2"].ipv4
    blocklist.block(blocked)

    def eth(ethertype: int) -> bytes:
        return victim_mac + bytes.fromhex(lab.hosts["client0"].mac.replace(":", "")) + struct.pack("!H", ethertype)

    malformed = [
        eth(0x0800),                                                 # IPv4 EtherType, nothing after it
        eth(0x0800) + b"\x45\x00\x00",                               # IPv4 header cut after 3 bytes
        eth(0x0800) + _ipv4(c0, 17, b"")[:19],                       # one byte short of a header
        eth(0x0800) + _ipv4(c0, 17, b"x" * 8, ihl=3),                # IHL below 5
        eth(0x0800) + bytes([0x65]) + _ipv4(c0, 17, b"x" * 8)[1:],   # version 6 in an IPv4 frame
        eth(0x0800) + _ipv4(c0, 6, b"\x00\x50\x00"),                 # TCP header of 3 bytes
        eth(0x0800) + _ipv4(c0, 17, b"\x00\x07"),                    # UDP header of 2 bytes
        eth(0x86DD) + b"\x60\x00\x00\x00\x00\x08\x11",               # IPv6 header cut short
        eth(0x86DD) + b"\x60" + b"\x00" * 5 + b"\x00\x40" + socket.inet_pton(socket.AF_INET6, lab.hosts["client0"].ipv6)
        + socket.inet_pton(socket.AF_INET6, lab.victim.ipv6) + b"\x06\x00",  # hop-by-hop header cut short
    ]  # (a cut VLAN tag cannot cross the lab's bridge, the receive path drops it: see the test_run test below)
    # A valid IP header from a blocklisted source, with a truncated TCP header: the source is known, so it drops.
    blocked_truncated = eth(0x0800) + _ipv4(blocked, 6, b"\x00\x50")
    probe = XdpProbe(settings)
    probe.load()
    sink = UdpSink(lab)
    try:
        probe.read(1.0)
        raw_frames(lab, "client0", malformed + [blocked_truncated])
        send_udp(lab, "client0", 3)  # and normal traffic still flows afterwards
        assert sink.drain() == {c0: 3}
        reading = probe.read(1.0)
        assert counter_where(reading, "otel_ebpf_receiver.xdp.malformed_packets", {}) == len(malformed) + 1
        assert counter_where(reading, "otel_ebpf_receiver.xdp.verdicts", DROP) == 1
        assert counter_where(reading, "otel_ebpf_receiver.xdp.verdicts", PASS) == len(malformed) + 3
        assert blocklist.lookup(blocked).hits == 1
    finally:
        sink.close()
        probe.close()


def test_prog_test_run_on_truncated_frames_returns_pass(settings, lab, tmp_path):
    """The same through BPF_PROG_TEST_RUN (bpftool prog run): frame by frame, the verdict is XDP_PASS (2)."""
    probe = XdpProbe(settings)
    probe.load()
    try:
        prog_id = probe.attached_program_ids()[0]
        frames = {
            "eth_only": _eth(0x0800),
            "ipv4_cut": _eth(0x0800) + b"\x45\x00",
            "ipv4_ihl_15_short": _eth(0x0800) + _ipv4("192.0.2.1", 6, b"", ihl=15),
            "tcp_cut": _eth(0x0800) + _ipv4("192.0.2.1", 6, b"\x00"),
            "ipv6_frag_cut": _eth(0x86DD) + b"\x60\x00\x00\x00\x00\x08\x2c\x40" + b"\x20" * 32 + b"\x11\x00",
            "vlan_vlan_cut": _eth(0x88A8) + b"\x00\x01\x81\x00",
        }
        for name, frame in frames.items():
            path = tmp_path / f"{name}.bin"
            path.write_bytes(frame)
            out = subprocess.run(["bpftool", "prog", "run", "id", str(prog_id), "data_in", str(path)],
                                 capture_output=True, text=True)
            assert "Return value: 2," in out.stdout + out.stderr, (name, out.stdout, out.stderr)
    finally:
        probe.close()
