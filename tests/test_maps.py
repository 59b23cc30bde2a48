"""How probes read their maps each window (kernel/maps.py): per-key deltas of cumulative maps, drained maps, the
one-lookup per-CPU slots. The first tests need no kernel; the others read real maps and real probes and check
that the totals stay exact across windows, and that a drained map that fills counts what it lost."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from otel_ebpf_receiver.kernel.maps import KeyedDeltas, top_indices

from .helpers import open_file_n_times, run_python, syscall_loop, unique_name

U64 = np.uint64
GETPPID = {"otel_ebpf_receiver.syscall.name": "getppid"}


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=U64)


def test_keyed_deltas_same_keys_same_order():
    deltas = KeyedDeltas()
    assert deltas.update(ids(7, 3), ids(10, 5)).tolist() == [10, 5]  # first read: everything is new
    assert deltas.update(ids(7, 3), ids(12, 5)).tolist() == [2, 0]


def test_keyed_deltas_matches_keys_whatever_their_order():
    deltas = KeyedDeltas()
    deltas.update(ids(7, 3, 9), ids(10, 5, 1))
    # a key came (4), one went (9), the rest moved in the map's order
    assert deltas.update(ids(3, 4, 7), ids(8, 2, 10)).tolist() == [3, 2, 0]
    # a key that shrank was evicted and re-created: its whole value is new
    assert deltas.update(ids(3, 4, 7), ids(1, 2, 10)).tolist() == [1, 0, 0]


def test_keyed_deltas_compares_each_column():
    deltas = KeyedDeltas()
    deltas.update(ids(1, 2), np.array([[10, 1], [5, 0]], dtype=U64))
    got = deltas.update(ids(2, 1), np.array([[6, 2], [10, 4]], dtype=U64))
    assert got.tolist() == [[1, 2], [0, 3]]


def test_keyed_deltas_of_an_empty_map():
    deltas = KeyedDeltas()
    assert deltas.update(ids(), ids()).tolist() == []
    assert deltas.update(ids(5), ids(3)).tolist() == [3]
    assert deltas.update(ids(), ids()).tolist() == []


class FakeSnapshot:
    """What update_snapshot reads of a MapSnapshot: the keys buffer and the table's key type."""

    def __init__(self, keys: list[int]) -> None:
        import ctypes as ct

        self.table = type("Table", (), {"Key": ct.c_uint64})
        self.keys = (ct.c_uint64 * max(len(keys), 1))(*keys)


def test_keyed_deltas_from_snapshots_fast_and_slow_paths_agree_and_start_empty():
    deltas = KeyedDeltas()
    pairs = lambda *rows: [v for row in rows for v in row]  # noqa: E731  (flat, two columns per key)
    assert deltas.update_snapshot(FakeSnapshot([]), 0, pairs(), columns=2) == []  # nothing opened yet
    assert deltas.update_snapshot(FakeSnapshot([4, 9]), 2, pairs((3, 1), (5, 0)), columns=2) == [3, 1, 5, 0]
    # same keys, same order: matched by their bytes
    assert deltas.update_snapshot(FakeSnapshot([4, 9]), 2, pairs((4, 1), (7, 2)), columns=2) == [1, 0, 2, 2]
    # a new key, the order changed: matched by id
    assert deltas.update_snapshot(FakeSnapshot([9, 1, 4]), 3, pairs((8, 2), (6, 6), (4, 1)), columns=2) == \
        [1, 0, 6, 6, 0, 0]
    assert deltas.update_snapshot(FakeSnapshot([9, 1, 4]), 3, pairs((9, 2), (6, 6), (4, 3)), columns=2) == \
        [1, 0, 0, 0, 0, 2]
    # a value that shrank (evicted, re-created) is new as a whole, on both paths
    assert deltas.update_snapshot(FakeSnapshot([9, 1, 4]), 3, pairs((2, 2), (6, 6), (4, 3)), columns=2) == \
        [2, 0, 0, 0, 0, 0]
    single = KeyedDeltas()
    assert single.update_snapshot(FakeSnapshot([7]), 1, [5]) == [5]
    assert single.update_snapshot(FakeSnapshot([7, 8]), 2, [6, 1]) == [1, 1]
    assert single.update_snapshot(FakeSnapshot([7, 8]), 2, [9, 1]) == [3, 0]


def test_top_indices_largest_first_and_only_positive():
    assert top_indices([0, 5, 1, 9, 0], 2) == [3, 1]
    assert top_indices([0, 0], 3) == []


@pytest.mark.bpf
def test_per_cpu_slots_and_a_drained_map_read_what_was_written():
    from bcc import BPF

    from otel_ebpf_receiver.kernel.maps import MapSnapshot, PerCpuSlots, percpu_array_u64

    bpf = BPF(text="struct slots { u64 count[16]; };\n"
                   "BPF_PERCPU_ARRAY(slots, struct slots, 1);\n"
                   "BPF_PERCPU_ARRAY(health, u64, 8);\n"
                   'BPF_TABLE("lru_hash", u32, u64, drained, 64);\n')
    try:
        table = bpf["slots"]
        value = table.Leaf()
        for cpu in range(len(value)):
            value[cpu].count[3] = 10 + cpu
            value[cpu].count[15] = 1
        table[table.Key(0)] = value
        totals = PerCpuSlots(table).read()
        ncpu = len(value)
        assert totals[3] == sum(10 + c for c in range(ncpu)) and totals[15] == ncpu and sum(totals) == totals[3] + ncpu
        grown = PerCpuSlots(table)  # increases(): only the slots that grew since the last call, summed over CPUs
        assert grown.increases() == [(3, sum(10 + c for c in range(ncpu))), (15, ncpu)]
        assert grown.increases() == []
        value[ncpu - 1].count[7] += 4
        value[0].count[3] += 5
        table[table.Key(0)] = value
        assert grown.increases() == [(3, 5), (7, 4)]

        health = bpf["health"]
        per_cpu = health.Leaf()
        for cpu in range(ncpu):
            per_cpu[cpu] = 1 << (8 * cpu)
        health[health.Key(1)] = per_cpu
        assert percpu_array_u64(health) == [0, sum(1 << (8 * c) for c in range(ncpu)), 0, 0, 0, 0, 0, 0]

        drained = bpf["drained"]
        snap = MapSnapshot(drained)
        for window in range(3):
            for k in range(40):
                drained[drained.Key(k)] = drained.Leaf(k + window)
            n = snap.drain()
            assert n == 40
            assert sorted(zip(snap.u32_keys(n), snap.u64_values(n))) == \
                [(k, k + window) for k in range(40)]
            assert len(drained) == 0  # the next window starts empty
    finally:
        bpf.cleanup()


@pytest.mark.bpf
def test_syscall_counts_stay_exact_across_windows():
    from otel_ebpf_receiver.assembly import load_probes

    (probe,) = load_probes(["syscalls"], {}, print)
    try:
        probe.read(1.0)
        for n in (30_000, 7_000):
            syscall_loop(unique_name("sw"), n)
            reading = probe.read(1.0)
            getppid = sum(v for name, v, a in reading.counters if name == "otel_ebpf_receiver.syscalls" and a == GETPPID)
            assert n <= getppid <= n + 200  # other processes rarely call getppid
            assert reading.features["syscalls.active_processes_log1p"] > 0
    finally:
        probe.close()


def top_path_rate(reading, path: str) -> float:
    return sum(v for name, v, a in reading.gauges
               if name == "otel_ebpf_receiver.file_opens.top_path.rate" and a["file.path"] == path)


@pytest.mark.bpf
def test_drained_paths_count_each_window_exactly_and_a_full_map_counts_evictions():
    from otel_ebpf_receiver.assembly import load_probes

    # path_sample_shift 0: every path counted, so each window's count is exact at any rate (sampling: test_probes_bpf)
    (probe,) = load_probes(["file_open"], {"file_open": {"max_paths": 64, "path_sample_shift": 0}}, print)
    try:
        with tempfile.TemporaryDirectory(prefix="otel-ebpf-drain-") as tmp:
            target = os.path.join(tmp, "target")
            others = [os.path.join(tmp, f"f{i}") for i in range(300)]
            for path in [target, *others]:
                open(path, "w").close()
            probe.read(1.0)
            # each window holds only its own opens: 700 then 300, not 700 then 1000
            comm = unique_name("dw")
            for n in (700, 300):
                open_file_n_times(comm, target, n)
                reading = probe.read(1.0)
                assert top_path_rate(reading, target) == n
                opens = sum(v for name, v, a in reading.counters
                            if name == "otel_ebpf_receiver.file_opens" and a["process.executable.name"] == comm)
                assert n <= opens <= n + 5  # the child's own exit path may open a file or two
            evictions_before = reading.map_evictions
            # 300 distinct paths into a 64-entry map in one window: at least 300 - 64 of them were evicted
            run_python("import os, sys\nfor p in sys.argv[1:]:\n    os.close(os.open(p, os.O_RDONLY))\n", *others)
            reading = probe.read(1.0)
            assert reading.map_evictions - evictions_before >= 300 - 64
            assert reading.map_update_failures == 0  # an LRU map evicts, it does not refuse
            # the next window starts from an empty map: the target's count is exact again, evictions do not go back
            open_file_n_times(unique_name("df"), target, 250)
            after = probe.read(1.0)
            assert top_path_rate(after, target) == 250
            assert after.map_evictions >= reading.map_evictions
    finally:
        probe.close()


def test_top_process_names_are_reused_while_in_the_top_and_read_again_at_least_every_refresh():
    from otel_ebpf_receiver.probes.syscalls import TopNames

    reads: list[int] = []
    names = {1: "old", 2: "two"}
    top = TopNames(read=lambda pid: reads.append(pid) or names[pid], refresh=3)
    for window in range(7):
        top.next_window()
        assert top.name(1) in ("old", "new")
        if window == 1:
            names[1] = "new"  # an exec while it stays in the top: shown once read again
        if window in (0, 4):
            assert top.name(2) == "two"  # left the top in between: read afresh when it comes back
    assert reads == [1, 2, 1, 2, 1]  # pid 1 at windows 0, 3, 6; pid 2 each time it entered the top
    top.next_window()
    assert top.name(1) == "new"
