"""Fast snapshots of bcc maps.

bcc's ``items()`` makes one bpf() syscall and several Python objects per entry; a 10,240-entry per-CPU map then
costs milliseconds per window. Here one BPF_MAP_LOOKUP_BATCH call (kernel ≥ 5.6) fills preallocated buffers,
read back as Python ints through one memoryview copy and summed over CPUs in C-level ``map`` loops. numpy is
kept for what needs it at scale (matching keys that came or went, the top of thousands of entries): after the
interval's pause each distinct numpy call costs 10-70 µs of cold caches on this machine kind, more than the
plain-Python work on a few hundred ints (bench/bench_window.py, README "Per-window cost").

What a read costs in the kernel (measured on this machine kind, 2 CPUs): a hash map's batch walks every bucket,
~3 ns per empty one (a 10,240-entry map has 16,384 buckets: ~45 µs even when empty) and ~150 ns per entry; an
array's batch copies its elements one by one (~170 ns each: 512 per-CPU u64 slots, ~90 µs). Counters that are
read all together therefore live in one array element holding a struct (:class:`PerCpuSlots`: one lookup, ~3 µs),
and maps keyed by what comes and goes (processes, paths) are drained each window where their counts may be
approximate (:meth:`MapSnapshot.drain`).
"""

from __future__ import annotations

import ctypes as ct
import errno
import operator
from itertools import compress
from typing import Any, Sequence

import numpy as np


def map_name(table: Any) -> str:
    """What names a bcc table in an error message. bcc's tables have no public ``name`` (asking for one turned
    every failed read into an AttributeError instead of the OSError that says what failed); the fd does."""
    return f"map fd {table.map_fd}"


class MapSnapshot:
    """Reusable batch reader for one map. ``read()`` returns (keys, values) ctypes arrays and a count."""

    def __init__(self, table: Any) -> None:
        from bcc import libbcc

        self._lib = libbcc.lib
        self.table = table
        self.capacity = table.max_entries
        self.keys = (table.Key * self.capacity)()
        self.values = (table.Leaf * self.capacity)()
        self._batch_supported = True
        # The batch call's arguments, built once: ctypes objects cost more than the call on a small map.
        self._key_size, self._leaf_size = ct.sizeof(table.Key), ct.sizeof(table.Leaf)
        self._in_batch, self._out_batch, self._count = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
        self._first = (ct.byref(self._out_batch), ct.byref(self.keys), ct.byref(self.values), ct.byref(self._count))

    def read(self) -> int:
        """Fill the buffers; return how many entries are valid."""
        if self._batch_supported:
            try:
                return self._read_batch()
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524):
                    raise
                self._batch_supported = False  # old kernel: fall back to key iteration once and for all
        return self._read_iter()

    def drain(self) -> int:
        """Fill the buffers and delete what was read (BPF_MAP_LOOKUP_AND_DELETE_BATCH, kernel >= 5.6): the map then
        holds only what the next window adds, and no per-key deltas are needed. For hash maps whose values may
        lose an increment made between the kernel's lookup and its delete (a top-N view, not an exact count)."""
        if self._batch_supported:
            try:
                return self._read_batch(delete=True)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524):
                    raise
                self._batch_supported = False
        n = self._read_iter()  # old kernel: read, then clear (one delete per key)
        self.table.clear()
        return n

    def _read_batch(self, delete: bool = False) -> int:
        batch = self._lib.bpf_lookup_and_delete_batch if delete else self._lib.bpf_lookup_batch
        fd, count = self.table.map_fd, self._count
        total = 0
        while total < self.capacity:
            count.value = self.capacity - total
            if total == 0:
                res = batch(fd, None, *self._first)
            else:  # the kernel stopped early (its buffer, a signal): go on from where it stopped
                self._in_batch.value = self._out_batch.value
                res = batch(fd, ct.byref(self._in_batch), ct.byref(self._out_batch),
                            ct.byref(self.keys, self._key_size * total), ct.byref(self.values, self._leaf_size * total),
                            ct.byref(count))
            err = -res if res < 0 else ct.get_errno()  # libbpf returns -errno and also sets errno
            total += count.value
            if res != 0:
                if err == errno.ENOENT:
                    break  # reached the end
                raise OSError(err, f"BPF_MAP_LOOKUP{'_AND_DELETE' if delete else ''}_BATCH on {map_name(self.table)}")
            if count.value == 0:
                break
        return total

    def _read_iter(self) -> int:
        n = 0
        for key, value in self.table.items():
            if n >= self.capacity:
                break
            self.keys[n] = key
            self.values[n] = value
            n += 1
        return n

    def u64_values(self, count: int, ncpu: int = 1) -> list[int]:
        """Values of a map of u64 as Python ints, summed over the ``ncpu`` copies of each entry for a per-CPU map."""
        return per_cpu_columns(u64_words(self.values, count * ncpu), ncpu)[0]

    def u32_keys(self, count: int) -> list[int]:
        return u32_words(self.keys, count)


class PerCpuSlots:
    """One element of a per-CPU array whose value is a struct of u64 counters (``struct { u64 count[N]; }``),
    read with one BPF_MAP_LOOKUP_ELEM into a reused buffer: :meth:`read` sums it over CPUs ((N,) totals),
    :meth:`increases` says which slots grew since its last call, and by how much."""

    def __init__(self, table: Any, index: int = 0) -> None:
        from bcc import libbcc

        self._lib = libbcc.lib
        self.table = table
        self._key = table.Key(index)
        self._value = table.Leaf()  # bcc: one sLeaf per possible CPU
        self._ncpu = ct.sizeof(table.Leaf) // ct.sizeof(table.sLeaf)
        self._words = ct.sizeof(table.Leaf) // 8
        self._slots = self._words // self._ncpu
        self._now = memoryview(self._value).cast("B").cast("Q")
        self._before = memoryview(bytes(ct.sizeof(table.Leaf))).cast("Q")  # all zero: every count is new at first

    def _lookup(self) -> None:
        if self._lib.bpf_lookup_elem(self.table.map_fd, ct.byref(self._key), ct.byref(self._value)) < 0:
            err = ct.get_errno()
            raise OSError(err, f"BPF_MAP_LOOKUP_ELEM on {map_name(self.table)}")

    def read(self) -> list[int]:
        """The N totals as Python ints (plain Python, no numpy: see :func:`per_cpu_sums`)."""
        self._lookup()
        return per_cpu_sums(u64_words(self._value, self._words), self._ncpu)

    def increases(self) -> list[tuple[int, int]]:
        """Read, and ``(slot, increase)`` for each slot whose total grew since the last call, in slot order
        (counters that only grow, like syscall counts). Only the words that changed become Python objects: after
        the interval's pause, making a Python int of each of the N x CPUs words costs more than the lookup."""
        self._lookup()
        now, before, size = self._now, self._before, self._slots
        moved = sorted({word % size for word in compress(range(len(now)), map(operator.ne, now, before))})
        out = [(slot, sum(now[slot + cpu * size] - before[slot + cpu * size] for cpu in range(self._ncpu)))
               for slot in moved]
        self._before = memoryview(bytes(self._value)).cast("Q")
        return out


def u64_words(buffer: Any, count: int) -> list[int]:
    """The first ``count`` u64 words of a ctypes buffer, as Python ints (one C-level copy)."""
    return memoryview(buffer).cast("B")[: count * 8].cast("Q").tolist()


def _summed(rows: list[list[int]]) -> list[int]:
    totals = rows[0]
    for row in rows[1:]:
        totals = list(map(operator.add, totals, row))
    return totals


def u32_words(buffer: Any, count: int) -> list[int]:
    """The first ``count`` u32 words of a ctypes buffer, as Python ints."""
    return memoryview(buffer).cast("B")[: count * 4].cast("I").tolist()


def per_cpu_sums(words: list[int], ncpu: int) -> list[int]:
    """One element of a per-CPU map (``ncpu`` copies of its words, one after the other), summed over CPUs.

    Plain Python on purpose: after the interval's pause each distinct numpy call costs 10-70 µs of cold caches
    on this machine kind (bench/bench_window.py), far more than these C-level ``map`` loops over a few hundred
    ints."""
    size = len(words) // ncpu
    return _summed([words[cpu * size:(cpu + 1) * size] for cpu in range(ncpu)]) if ncpu > 1 else words


def per_cpu_columns(words: list[int], ncpu: int, width: int = 1) -> list[list[int]]:
    """A batch of per-CPU values of ``width`` u64 words each (every entry: its ``ncpu`` copies in a row), summed
    over CPUs: one list per word of the value, each with one total per entry (plain Python, see above)."""
    block = ncpu * width
    return [_summed([words[cpu * width + column::block] for cpu in range(ncpu)]) for column in range(width)]


def per_cpu_rows(words: list[int], ncpu: int, width: int) -> list[list[int]]:
    """A batch of per-CPU structs of ``width`` u64 words (every entry: its ``ncpu`` copies in a row), summed over
    CPUs: one list of ``width`` totals per entry (for the few entries of a per-device map; plain Python)."""
    copies = [words[i * width:(i + 1) * width] for i in range(len(words) // width)]
    return [_summed(copies[i:i + ncpu]) for i in range(0, len(copies), ncpu)]


def increase_or_zero(value: int, previous: int) -> int:
    """A log2 histogram slot's count this window (cumulative slots only grow; never negative)."""
    return value - previous if value > previous else 0


def increase(value: int, previous: int) -> int:
    """What a cumulative counter gained; a value below the previous one was reset or re-created: all new."""
    return value - previous if value >= previous else value


def possible_cpus() -> int:
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


def percpu_array_u64(table: Any) -> list[int]:
    """All slots of a per-CPU u64 array, summed over CPUs, as Python ints (buffers reused across windows).

    A list, not a numpy array: callers index a few slots (map-health counters, a probe's totals), and after the
    interval's pause each numpy call costs tens of µs of cold caches, more than this read itself."""
    snap = getattr(table, "_oer_snapshot", None)
    if snap is None:
        snap = table._oer_snapshot = MapSnapshot(table)
    n = snap.read()
    per_slot = snap.u64_values(n, ct.sizeof(table.Leaf) // 8)
    if n == table.max_entries:  # an array's batch returns every slot, in index order
        return per_slot
    totals = [0] * table.max_entries
    for key, total in zip(snap.u32_keys(n), per_slot):
        totals[key] = total
    return totals


# Odd 64-bit multipliers: a key's bytes, read as u64 words, are folded into one id by a dot product mod 2^64.
# Collisions between two live keys of a bounded map are astronomically unlikely and would only merge two rows.
_FOLD = np.array([(0x9E3779B97F4A7C15 ^ (i * 0xBF58476D1CE4E5B9)) & 0xFFFFFFFFFFFFFFFF | 1 for i in range(64)],
                 dtype=np.uint64)


class KeyedDeltas:
    """Vectorised per-key increases between two snapshots of a cumulative map with (possibly large) keys.

    The Python-loop version costs ~1 µs per entry; a path map with thousands of keys made it the most expensive
    part of a window. Here keys become u64 ids, matched against the previous snapshot with one searchsorted.
    A key whose value shrank was evicted and re-created: its whole value is new.
    """

    def __init__(self) -> None:
        self._ids = np.zeros(0, dtype=np.uint64)      # the previous snapshot, in the map's order
        self._values = np.zeros(0, dtype=np.uint64)
        self._raw: bytes | None = None                # its keys' bytes (see update_snapshot)
        self._listed: list[int] = []                  # the previous snapshot's values (see update_snapshot)

    def update_snapshot(self, snapshot: MapSnapshot, count: int, values: list[int], columns: int = 1) -> list[int]:
        """:meth:`update` for the first ``count`` keys of a snapshot, whose values are ``columns`` ints per key
        (flat, as Python ints); returns the increases the same way. The usual window of a cumulative map has the
        same keys in the same order as the last one: one bytes comparison then stands for matching them, and the
        increases are a C-level ``map`` without numpy (cheaper after the interval's pause, see
        :func:`per_cpu_sums`). Keys that came or went are matched by id in numpy."""
        raw = ct.string_at(snapshot.keys, count * ct.sizeof(snapshot.table.Key))
        previous, self._listed = self._listed, values
        if raw == self._raw and len(previous) == len(values):
            return list(map(increase, values, previous))
        self._raw = raw
        shape = (-1, columns) if columns > 1 else (-1,)
        self._values = np.array(previous, dtype=np.uint64).reshape(shape)  # what update() compares against
        current = np.array(values, dtype=np.uint64).reshape(shape)
        return self.update(self.key_ids(snapshot, count), current).ravel().tolist()

    @staticmethod
    def key_ids(snapshot: MapSnapshot, count: int) -> np.ndarray:
        key_size = ct.sizeof(snapshot.table.Key)
        if key_size % 8:
            raw = np.frombuffer(snapshot.keys, dtype=np.uint8, count=count * key_size).reshape(count, key_size)
            padded = np.zeros((count, -(-key_size // 8) * 8), dtype=np.uint8)
            padded[:, :key_size] = raw
            words = padded.view(np.uint64)
        else:
            words = np.frombuffer(snapshot.keys, dtype=np.uint64, count=count * key_size // 8).reshape(
                count, key_size // 8)  # not -1: an empty map has no rows to infer it from
        return (words * _FOLD[: words.shape[1]]).sum(axis=1, dtype=np.uint64)  # arrays wrap mod 2^64 silently

    def update(self, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Increase of each current key since the previous call (same order as ``ids``). ``values`` is (n,) or
        (n, columns): each column is compared on its own."""
        if self._values.shape == values.shape and np.array_equal(ids, self._ids):
            previous = self._values  # the usual window: no key came or went, and a hash iterates in the same order
        else:
            previous = np.zeros_like(values)
            if len(self._ids) and len(ids):
                order = np.argsort(self._ids)
                sorted_ids = self._ids[order]
                pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
                found = sorted_ids[pos] == ids
                previous[found] = self._values[order[pos[found]]]
        deltas = np.where(values >= previous, values - previous, values)
        self._ids, self._values = ids.copy(), values.copy()
        return deltas


def top_indices(values: Sequence[int], n: int) -> list[int]:
    """Indices of the n largest positive values, largest first."""
    if len(values) <= 256:  # the usual window: a sort of Python ints is cheaper than four numpy calls
        order = sorted((i for i, v in enumerate(values) if v > 0), key=values.__getitem__, reverse=True)
        return order[:n]
    array = np.asarray(values, dtype=np.uint64)
    positive = np.flatnonzero(array > 0)
    if len(positive) > n:
        positive = positive[np.argpartition(array[positive], -n)[-n:]]
    return positive[np.argsort(array[positive])[::-1]].tolist()
