"""Per-source numbers stay right when the XDP probe samples them (bpf/xdp.bpf.c "Per-source sampling",
otel_ebpf_receiver/probes/xdp/sources.py).

The probe is attached to a lab victim's eth0 (real XDP on a veth in a namespace of our own); the packets are fed
to the attached program with BPF_PROG_TEST_RUN, which updates its maps as real traffic would (ingress ifindex 0:
they count on the "other" interface slot, apart from anything the lab itself sends). Known mix: three busy
sources, one SYN source and thousands of one-packet sources; for the frame-size histogram, which is sampled with
the same decision, busy sources of three frame sizes."""

from __future__ import annotations

import ipaddress
import math
import socket
import struct

import numpy as np
import pytest

from otel_ebpf_receiver.kernel import bpfsys
from otel_ebpf_receiver.probes.xdp.sources import (MAX_SAMPLE_SHIFT, in_hash_sample, sample_mask, sample_shift,
                                                   size_counts)

from .xdp_support import blocklist, counter_where, gauge, lab, pin_dir, probe, settings  # noqa: F401

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

OTHER = {"network.interface.name": "other"}
BUSY = {"198.51.100.1": 200_000, "198.51.100.2": 100_000, "198.51.100.3": 20_000}
SYN_SOURCE, SYN_PACKETS = "198.51.100.4", 30_000
SINGLES = [str(ipaddress.IPv4Address("10.64.0.0") + i) for i in range(4096)]


def frame(src: str, *, syn: bool = False, size: int = 64) -> bytes:
    """Ethernet + IPv4 + UDP (or a TCP SYN) from src to 192.0.2.1, size bytes (>= 64); checksums do not matter to
    XDP."""
    if syn:
        l4 = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
        proto = 6
    else:
        payload = size - 14 - 20 - 8
        l4 = struct.pack("!HHHH", 40000, 9, 8 + payload, 0) + b"x" * payload
        proto = 17
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, socket.inet_aton(src),
                     socket.inet_aton("192.0.2.1"))
    return (b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + ip + l4).ljust(64, b"\0")


def feed(probe, mix: dict[str, int], singles: list[str], sizes: dict[str, int] | None = None) -> int:
    fd = bpfsys.prog_fd_by_id(probe.attached_program_ids()[0])
    try:
        for src, n in mix.items():
            size = (sizes or {}).get(src, 64)
            assert bpfsys.prog_test_run(fd, frame(src, syn=src == SYN_SOURCE, size=size), n) == 2  # XDP_PASS
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


def sizes_of(reading) -> tuple[dict[float, int], float]:
    (_, buckets, total, _), = [h for h in reading.histograms
                               if h[0] == "otel_ebpf_receiver.xdp.packet.size" and h[3] == OTHER]
    return buckets, total


def test_sample_mask_has_the_top_k_bits():
    assert sample_mask(0) == 0
    assert sample_mask(1) == 1 << 63
    assert sample_mask(5) == 0xF800_0000_0000_0000
    assert sample_mask(MAX_SAMPLE_SHIFT) == 0xFFFF_0000_0000_0000
    with pytest.raises(ValueError):
        sample_mask(MAX_SAMPLE_SHIFT + 1)


@pytest.mark.parametrize("estimates,packets,nbytes,expected", [
    ([0, 5, 3], 8, 100, [0, 5, 3]),             # exact (k = 0): unchanged
    ([0, 6, 3], 8, 100, [0, 5, 3]),             # one packet counted in its bucket, not yet in the total
    ([0, 32, 64, 0], 100, 1e4, [0, 33, 67, 0]),  # sampled: scaled to the exact count, largest remainder
    ([16, 16, 16], 50, 1e3, [17, 17, 16]),      # ties: the first buckets get the odd packets
    ([0, 0, 0, 0, 0, 0, 0, 0], 3, 192, [0, 0, 0, 0, 0, 0, 0, 3]),  # none sampled: the mean size's bucket (64 B)
    ([0, 0, 0], 3, 192, [0, 0, 3]),             # ... or the last one
    ([4, 4], 0, 0, [0, 0]),                     # no packet this window
])
def test_size_counts_add_up_to_the_exact_packet_count(estimates, packets, nbytes, expected):
    assert size_counts(np.array(estimates, dtype=float), packets, nbytes).tolist() == expected


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
    assert sizes_of(reading) == ({128.0: total}, 64.0 * total)  # 64-byte frames: the [64, 128) bucket, exact


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


def test_sampled_frame_sizes_keep_exact_totals_and_unbiased_buckets(probe, blocklist):
    """Passed frames count their size with the per-source decision and weight; the histogram's count and sum stay
    the exact packet and byte totals; dropped frames count their size exactly."""
    k = 4
    probe.set_sample_shift(k)
    sizes = {"198.51.100.1": 64, "198.51.100.2": 600, "198.51.100.3": 1400}
    mix = {"198.51.100.1": 100_000, "198.51.100.2": 60_000, "198.51.100.3": 20_000}
    dropped, dropped_n = "203.0.113.9", 777
    blocklist.block(dropped)
    total = feed(probe, mix, SINGLES, sizes)
    fd = bpfsys.prog_fd_by_id(probe.attached_program_ids()[0])
    try:
        assert bpfsys.prog_test_run(fd, frame(dropped, size=300), dropped_n) == 1  # XDP_DROP
    finally:
        bpfsys.close(fd)
    reading = probe.read(1.0)

    buckets, nbytes = sizes_of(reading)
    expected = {128.0: mix["198.51.100.1"] + len(SINGLES), 1024.0: mix["198.51.100.2"], 2048.0: mix["198.51.100.3"]}
    assert sum(buckets.values()) == total + dropped_n  # the histogram's count: exact
    assert nbytes == sum(n * sizes[a] for a, n in mix.items()) + 64 * len(SINGLES) + 300 * dropped_n  # its sum
    # The dropped frames, counted exactly; scaling to the exact total moves them by its error (~0.5 % here).
    assert abs(buckets.pop(512.0) - dropped_n) <= 0.05 * dropped_n
    assert set(buckets) == set(expected)
    for bound, n in expected.items():  # within 5 standard errors: sd = sqrt(2^k * n) packets (sources.py)
        assert abs(buckets[bound] - n) <= 5 * math.sqrt((1 << k) * n) + 1, (bound, buckets[bound], n)
