"""Per-source windows of the XDP probe: the busiest sources, the distinct-source count, and their sampling.

bpf/xdp.bpf.c keeps, per source address, the packets, bytes and SYNs of the current and the previous epoch
(``per_source``, an LRU hash). Under floods it samples (read "Per-source sampling" in the C file): with shift k > 0
a source in the hash sample (top k bits of ``source_hash`` zero: one source in 2^k) counts every packet with weight
1, any other source counts a packet drawn with probability 2^-k with weight 2^k. The numbers read here are then
unbiased estimates — a source's packet count within about sqrt(2^k / packets) (relative standard error), the
distinct count within about 1 / sqrt(hash-sampled sources seen) — and exact when k = 0.

``sample_shift`` chooses k for the next window from the packet rate of the one that closed: 0 (exact) at or below
``exact_below`` packets/s, else the smallest k that brings the expected per-source updates to that rate or under.

The frame-size histogram of passed packets rides on the same decision (a packet accounted to its source also counts
its size, with the same weight), so under sampling its buckets are estimates too; ``size_counts`` gives them the
window's exact packet count back.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass

import numpy as np

from ..base import ratio

MAX_SAMPLE_SHIFT = 16  # the C file's MAX_SAMPLE_SHIFT
HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # the C file's source_hash()
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


@dataclass(frozen=True)
class SourceRate:
    """One source's traffic in the last window (passed traffic; blocked sources count on their list entry)."""

    address: str
    packets_per_s: float
    bytes_per_s: float
    syn_share: float          # SYNs / packets from this source
    bytes_per_packet: float
    share: float              # of all packets from all sources this window


def source_address(raw: bytes) -> str:
    """A struct addr16 (IPv4 as ::ffff:a.b.c.d) -> source.address as users write it."""
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def sample_shift(packets_per_s: float, exact_below: float) -> int:
    """k for the next window: 0 while the rate is at most ``exact_below`` (0 or less: never sample)."""
    if exact_below <= 0 or packets_per_s <= exact_below:
        return 0
    return min(MAX_SAMPLE_SHIFT, math.ceil(math.log2(packets_per_s / exact_below)))


def sample_mask(shift: int) -> int:
    """struct config's sample_mask for shift k: the top k of 64 bits set (0 at k = 0: every packet counts)."""
    if not 0 <= shift <= MAX_SAMPLE_SHIFT:
        raise ValueError(f"per-source sampling shift {shift} is outside 0..{MAX_SAMPLE_SHIFT}")
    return ((1 << shift) - 1) << (64 - shift) if shift else 0


def size_counts(estimates: np.ndarray, packets: int, nbytes: float) -> np.ndarray:
    """One window's frame-size buckets (log2 slots), scaled so that they add up to the exact packet count.

    ``estimates`` are the kernel's bucket deltas: exact at k = 0 (then returned as they are, but for the packets
    counted in one place and not yet in the other while we read), unbiased weighted counts under sampling. Scaling
    them to ``packets`` keeps the histogram's count and sum (``nbytes``) exact, and only its shape estimated.
    Rounding is by largest remainder. A window with packets but none sampled puts them all in the bucket of its
    mean frame size."""
    estimates = np.asarray(estimates, dtype=np.float64)
    out = np.zeros(len(estimates), dtype=np.int64)
    if packets <= 0:
        return out
    total = estimates.sum()
    if total <= 0:
        out[min(int(nbytes / packets).bit_length(), len(out) - 1)] = packets
        return out
    scaled = estimates * (packets / total)
    out[:] = np.floor(scaled)
    short = int(packets - out.sum())
    if short > 0:
        out[np.argsort(out - scaled, kind="stable")[:short]] += 1
    return out


def in_hash_sample(keys: np.ndarray, shift: int) -> np.ndarray:
    """Which struct addr16 keys (n x 16 bytes) are in the hash sample of shift k, as the C file decides it."""
    if shift <= 0:
        return np.ones(len(keys), dtype=bool)
    words = np.ascontiguousarray(keys).view(np.uint32).reshape(len(keys), 4)  # native order, as the kernel loads them
    folded = (words[:, 0] ^ words[:, 1] ^ words[:, 2] ^ words[:, 3]).astype(np.uint64)
    with np.errstate(over="ignore"):
        hashed = folded * HASH_MULTIPLIER
    return (hashed >> np.uint64(64 - shift)) == 0


class SourceWindows:
    """The sources of the last closed window: keys (n x 16 bytes), windows (packets, bytes, syns) and its length."""

    def __init__(self, keys: np.ndarray, wins: np.ndarray, seconds: float, shift: int) -> None:
        self.keys, self.wins, self.seconds, self.shift = keys, wins, seconds, shift
        self.total = float(wins["packets"].sum()) if len(wins) else 0.0

    def distinct(self) -> float:
        """Distinct sources with passed traffic: exact at k = 0, else hash-sampled sources seen x 2^k."""
        if self.shift <= 0:
            return float(len(self.wins))
        return float(in_hash_sample(self.keys, self.shift).sum()) * float(1 << self.shift)

    def top_share(self) -> float:
        return float(self.wins["packets"].max()) / self.total if self.total > 0 else 0.0

    def _rate(self, i: int, address: str) -> SourceRate:
        s = self.seconds
        packets, nbytes, syns = (float(self.wins[f][i]) for f in ("packets", "bytes", "syns"))
        return SourceRate(address, packets / s if s > 0 else 0.0, nbytes / s if s > 0 else 0.0, ratio(syns, packets),
                          ratio(nbytes, packets), ratio(packets, self.total))

    def top(self, n: int) -> list[SourceRate]:
        """The n busiest sources, busiest first."""
        if n <= 0 or not len(self.wins):
            return []
        k = min(n, len(self.wins))
        packets = self.wins["packets"].astype(np.int64)
        idx = np.argpartition(-packets, k - 1)[:k]
        idx = idx[np.argsort(-packets[idx], kind="stable")]
        return [self._rate(int(i), source_address(self.keys[i].tobytes())) for i in idx]

    def find(self, address: str) -> SourceRate | None:
        """One source's numbers (None when it sent nothing that passed, or was not sampled)."""
        packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        raw = np.frombuffer(_V4_MAPPED + packed if len(packed) == 4 else packed, dtype=np.uint8)
        match = np.nonzero((self.keys == raw).all(axis=1))[0]
        return self._rate(int(match[0]), address) if len(match) else None
