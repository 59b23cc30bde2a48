"""Per-source numbers stay right when the XDP probe samples them (bpf/xdp.bpf.c "Per-source sampling",
otel_ebpf_receiver/probes/xdp/sources.py).

The probe is attached to a lab victim's eth0 (real XDP on a veth in a namespace of our own); the packets are fed
to the attached program with BPF_PROG_TEST_RUN, which updates its maps as real traffic would (ingress ifindex 0:
they count on the "other" interface slot, apart from anything the lab itself sends). Known mix: three busy
sources, one SYN source and thousands of one-packet sources."""

from __future__ import annotations

import ipaddress
import math
import socket
import struct

import pytest

from otel_ebpf_receiver.kernel import bpfsys
from otel_ebpf_receiver.probes.xdp.sources import MAX_SAMPLE_SHIFT, in_hash_sample, sample_shift

from .xdp_support import counter_where, gauge, lab, pin_dir, probe, settings  # noqa: F401

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

OTHER = {"network.interface.name": "other"}
BUSY = {"198.51.100.1": 200_000, "198.51.100.2": 100_000, "198.51.100.3": 20_000}
SYN_SOURCE, SYN_PACKETS = "198.51.100.4", 30_000
SINGLES = [str(ipaddress.IPv4Address("10.64.0.0") + i) for i in range(4096)]


def frame(src: str, *, syn: bool = False) -> bytes:
    """Ethernet + IPv4 + UDP (or a TCP SYN) from src to 192.0.2.1, 64 bytes; checksums do not matter to XDP."""
    if syn:
        l4 = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
        proto = 6
    else:
        l4 = struct.pack("!HHHH", 40000, 9, 8 + 18, 0) + b"x" * 18
        proto = 17
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, socket.inet_aton(src),
                     socket.inet_aton("192.0.2.1"))
    return (b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + ip + l4).ljust(64, b"\0")


def feed(probe, mix: dict[str, int], singles: list[str]) -> int:
    fd = bpfsys.prog_fd_by_id(probe.attached_program_ids()[0])
    try:
        for src, n in mix.items():
            assert bpfsys.prog_test_run(fd, frame(src, syn=src == SYN_SOURCE), n) == 2  # XDP_PASS
        for src in singles:
            bpfsys.prog_test_run(fd, frame(src), 1)
    finally:
        bpfsys.close(fd)
    return sum(mix.values()) + len(singles)


def test_sample_shift_is_zero_below_the_threshold_and_grows_with_the_rate():
    assert sample_shift(50_000, 50_000) == 0
    assert sample_shift(50_001, 50_000) == 1
    assert sample_shift(1_000_000, 50_000) == 5          # 1e6 / 2^5 = 31,250 updates/s
    assert sample_shift(1e12, 50_000) == MAX_SAMPLE_SHIFT
    assert sample_shift(1e9, 0) == 0                      # 0: never sample


def test_exact_per_source_numbers_at_shift_zero(probe):
    mix = {"198.51.100.1": 3000, "198.51.100.2": 1000, SYN_SOURCE: 200}
    total = feed(probe, mix, SINGLES[:50])
    reading = probe.read(1.0)
    assert counter_where(reading, "otel_ebpf_receiver.xdp.packets", OTHER) == total
    assert gauge(reading, "otel_ebpf_receiver.xdp.sources") == [53.0]
    top = probe.top_sources(3)
    assert [(t.address, t.packets_per_s) for t in top] == [("198.51.100.1", 3000), ("198.51.100.2", 1000),
                                                          (SYN_SOURCE, 200)]
    assert top[2].syn_share == 1.0 and top[0].syn_share == 0.0
    assert top[0].share == pytest.approx(3000 / total)
    assert probe.per_source_shift == 0  # 4,250 packets/s is far below per_source_exact_below


def test_sampled_per_source_numbers_within_the_documented_error(probe):
    k = 4
    probe.set_sample_shift(k)
    mix = {**BUSY, SYN_SOURCE: SYN_PACKETS}
    total = feed(probe, mix, SINGLES)
    reading = probe.read(1.0)

    # Totals stay exact whatever the shift.
    assert counter_where(reading, "otel_ebpf_receiver.xdp.packets", OTHER) == total
    assert counter_where(reading, "otel_ebpf_receiver.xdp.tcp_flags", {**OTHER, "otel_ebpf_receiver.tcp.flag": "syn"}) \
        == SYN_PACKETS

    # The busy sources, in order, each within 5 standard errors (sd = sqrt(2^k * n) packets, sources.py).
    top = probe.top_sources(4)
    assert [t.address for t in top] == ["198.51.100.1", "198.51.100.2", SYN_SOURCE, "198.51.100.3"]
    for t in top:
        n = mix[t.address]
        assert abs(t.packets_per_s - n) <= 5 * math.sqrt((1 << k) * n), (t.address, t.packets_per_s, n)
        assert t.bytes_per_packet == 64.0
        assert t.syn_share == (1.0 if t.address == SYN_SOURCE else 0.0)
    assert top[0].share == pytest.approx(BUSY["198.51.100.1"] / total, rel=0.05)
    assert reading.features["xdp.top_source_share"] == pytest.approx(top[0].share)

    # Hash sample: the kernel and sources.py agree on which sources it holds, and those count every packet.
    packed = [b"\0" * 10 + b"\xff\xff" + socket.inet_aton(a) for a in SINGLES]
    import numpy as np
    sampled = in_hash_sample(np.frombuffer(b"".join(packed), dtype=np.uint8).reshape(-1, 16), k)
    expected_exact = {a for a, s in zip(SINGLES, sampled) if s}
    seen = {a: probe.source_window(a) for a in SINGLES}
    exact_seen = {a for a, s in seen.items() if s is not None and s.packets_per_s == 1}
    weighted_seen = {a for a, s in seen.items() if s is not None and s.packets_per_s == 1 << k}
    assert 4096 / (1 << k) / 2 < len(expected_exact) < 4096 / (1 << k) * 2
    assert exact_seen == expected_exact
    assert not weighted_seen & expected_exact
    assert len(exact_seen) + len(weighted_seen) == sum(1 for s in seen.values() if s is not None)

    # Distinct sources: hash-sampled sources seen x 2^k, within 5 standard errors of the truth.
    distinct = gauge(reading, "otel_ebpf_receiver.xdp.sources")[0]
    truth = len(SINGLES) + len(mix)
    assert abs(distinct - truth) <= 5 * math.sqrt(truth * (1 << k)), distinct
    # 354,096 packets/s from this window: the agent samples the next one as sample_shift() says.
    assert probe.per_source_shift == sample_shift(total, probe.settings["per_source_exact_below"]) > 0
