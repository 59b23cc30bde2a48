"""kernel/btf.py reads member offsets and raw tracepoint signatures from BTF: a hand-built BTF blob (golden), the
running kernel's BTF, and the sched probe's fallback to classic tracepoints when BTF does not say what it needs."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from otel_ebpf_receiver.kernel import btf
from otel_ebpf_receiver.probes import sched


def btf_blob() -> bytes:
    """Types: 1 int (4 B), 2 struct task_struct {int a; int pid @ byte 1264}, 3 ptr -> 2, 4 bool (1 B), 5 u64 (8 B),
    6 func_proto (void *, bool, task *, task *, int), 7 ptr -> 6, 8 typedef btf_trace_sched_switch -> 7, 9 enum
    (two values, skipped over), 10 func_proto (void *, task *), 11 ptr -> 10, 12 typedef btf_trace_sched_wakeup."""
    names = [b"", b"int", b"task_struct", b"a", b"pid", b"bool", b"u64", b"btf_trace_sched_switch", b"e", b"x",
             b"btf_trace_sched_wakeup"]
    strings, at = b"", {}
    for name in names:
        at[name] = len(strings)
        strings += name + b"\0"

    def t(name, kind, vlen, size_or_type, kind_flag=0):
        return struct.pack("<III", at[name], (kind << 24) | (kind_flag << 31) | vlen, size_or_type)

    types = (t(b"int", 1, 0, 4) + struct.pack("<I", 32)
             + t(b"task_struct", 4, 2, 2000) + struct.pack("<III", at[b"a"], 1, 0)
             + struct.pack("<III", at[b"pid"], 1, 1264 * 8)
             + t(b"", 2, 0, 2)
             + t(b"bool", 1, 0, 1) + struct.pack("<I", 8)
             + t(b"u64", 1, 0, 8) + struct.pack("<I", 64)
             + t(b"", 13, 5, 0) + b"".join(struct.pack("<II", 0, ty) for ty in (3, 4, 3, 3, 1))
             + t(b"", 2, 0, 6)
             + t(b"btf_trace_sched_switch", 8, 0, 7)
             + t(b"e", 6, 2, 4) + struct.pack("<Ii", at[b"x"], 1) + struct.pack("<Ii", at[b"x"], 2)
             + t(b"", 13, 2, 0) + struct.pack("<IIII", 0, 3, 0, 3)
             + t(b"", 2, 0, 10)
             + t(b"btf_trace_sched_wakeup", 8, 0, 11))
    header = struct.pack("<HBBIIIII", btf.MAGIC, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def test_golden_blob(tmp_path: Path):
    path = tmp_path / "vmlinux"
    path.write_bytes(btf_blob())
    facts = btf.read_facts((("task_struct", "pid"), ("task_struct", "nope"), ("nothing", "pid")),
                           ("sched_switch", "sched_wakeup", "missing"), path)
    assert facts.member_offsets == {("task_struct", "pid"): 1264, ("task_struct", "nope"): None,
                                    ("nothing", "pid"): None}
    assert facts.tracepoint_args == {"sched_switch": (1, 8, 8, 4), "sched_wakeup": (8,), "missing": None}


def test_no_or_bad_btf_is_none(tmp_path: Path):
    assert btf.read_facts((), (), tmp_path / "absent") is None
    (tmp_path / "junk").write_bytes(b"\0" * 64)
    assert btf.read_facts((), (), tmp_path / "junk") is None


@pytest.mark.skipif(not btf.VMLINUX.exists(), reason="no kernel BTF")
def test_running_kernel_has_the_sched_signatures():
    facts = btf.read_facts((("task_struct", "pid"),), tuple(sched.RAW_SIGNATURES))
    assert facts is not None and facts.member_offsets[("task_struct", "pid")] > 0
    # Linux >= 5.18 (this machine runs 6.x): sched_switch has prev_state.
    assert facts.tracepoint_args == sched.RAW_SIGNATURES


def test_sched_falls_back_to_classic_tracepoints_without_btf(monkeypatch):
    pytest.importorskip("bcc")
    monkeypatch.setattr(btf, "read_facts", lambda *a, **k: None)
    probe = sched.SchedProbe()
    flags = probe.cflags()
    assert "-DUSE_RAW_TRACEPOINT" not in flags and any(f.startswith("-DTASK_STATE_MASK=") for f in flags)


def test_sched_falls_back_when_the_signature_differs(monkeypatch):
    pytest.importorskip("bcc")
    old = btf.Facts({("task_struct", "pid"): 1264}, {"sched_switch": (1, 8, 8), "sched_wakeup": (8,),
                                                      "sched_wakeup_new": (8,)})  # before Linux 5.18
    monkeypatch.setattr(btf, "read_facts", lambda *a, **k: old)
    assert "-DUSE_RAW_TRACEPOINT" not in sched.SchedProbe().cflags()
