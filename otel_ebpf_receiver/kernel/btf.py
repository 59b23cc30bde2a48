"""The few facts a bcc program needs from the running kernel's BTF (/sys/kernel/btf/vmlinux): a struct member's
byte offset and a raw tracepoint's argument list.

Why: bcc compiles against the installed kernel headers, which may belong to another kernel than the running one (a
distribution's headers under a custom kernel), so ``task->pid`` compiled from them can read the wrong bytes. BTF
describes the running kernel itself. A raw tracepoint's arguments are its TP_PROTO; the kernel declares each as
``typedef void (*btf_trace_<name>)(void *, <TP_PROTO args>)``, so their count and sizes say which signature this
kernel has (sched_switch gained ``unsigned int prev_state`` in 5.18).

Only the type section is walked (BTF format: include/uapi/linux/btf.h), once, and nothing of it is kept.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F
INT, PTR, STRUCT, UNION, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC_PROTO, TYPE_TAG = 1, 2, 4, 5, 8, 9, 10, 11, 13, 18
# Bytes that follow the 12-byte btf_type, per kind: fixed, and per vlen item.
_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0), 15: (0, 12),
          17: (4, 0), 19: (0, 12)}
_MODIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


@dataclass(frozen=True)
class Facts:
    """What :func:`read_facts` found; None where the kernel's BTF does not have it."""

    member_offsets: dict[tuple[str, str], int | None]  # (struct, member) -> byte offset
    tracepoint_args: dict[str, tuple[int, ...] | None]  # raw tracepoint -> size in bytes of each TP_PROTO argument
    # raw tracepoint -> BTF id of its btf_trace_<name> typedef: what a BTF-typed program (tp_btf) is loaded against
    tracepoint_type_ids: dict[str, int | None] = field(default_factory=dict)


def read_facts(members: tuple[tuple[str, str], ...], tracepoints: tuple[str, ...],
               path: Path = VMLINUX) -> Facts | None:
    """Member offsets and raw tracepoint argument sizes, or None when there is no (readable) BTF."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < 24 or struct.unpack_from("<H", data)[0] != MAGIC:
        return None
    hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<5I", data, 4)
    strings = data[hdr_len + str_off: hdr_len + str_off + str_len]

    def name_at(offset: int) -> str:
        end = strings.find(b"\0", offset)
        return strings[offset:end].decode("ascii", "replace")

    def name_offset(name: str) -> int:
        at = strings.find(b"\0" + name.encode() + b"\0")
        return at + 1 if at >= 0 else -1

    wanted_structs = {name_offset(s): s for s, _ in members}
    wanted_typedefs = {name_offset("btf_trace_" + t): t for t in tracepoints}
    # Pass 1: where every type starts (ids are positions, from 1), and the types we were asked about.
    starts = [0]
    structs: dict[str, int] = {}
    typedefs: dict[str, int] = {}
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    while pos + 12 <= end:
        name_off, info = struct.unpack_from("<II", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        starts.append(pos)
        if kind in (STRUCT, UNION) and name_off in wanted_structs:
            structs.setdefault(wanted_structs[name_off], len(starts) - 1)
        elif kind == TYPEDEF and name_off in wanted_typedefs:
            typedefs.setdefault(wanted_typedefs[name_off], len(starts) - 1)
        fixed, per_item = _EXTRA.get(kind, (0, 0))
        pos += 12 + fixed + per_item * vlen

    def header(type_id: int) -> tuple[int, int, int, int, int]:
        name_off, info, size_or_type = struct.unpack_from("<III", data, starts[type_id])
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size_or_type

    def size_of(type_id: int) -> int | None:
        for _ in range(32):  # through typedefs and qualifiers
            if type_id == 0 or type_id >= len(starts):
                return None
            _, kind, _, _, size_or_type = header(type_id)
            if kind in _MODIFIERS:
                type_id = size_or_type
                continue
            if kind == PTR:
                return 8
            return size_or_type if kind in (INT, STRUCT, UNION, 6, 16, 19) else None
        return None

    offsets: dict[tuple[str, str], int | None] = {}
    for struct_name, member in members:
        offsets[(struct_name, member)] = None
        type_id = structs.get(struct_name)
        if type_id is None:
            continue
        _, _, vlen, kind_flag, _ = header(type_id)
        for i in range(vlen):
            m_name, _, m_offset = struct.unpack_from("<III", data, starts[type_id] + 12 + 12 * i)
            if name_at(m_name) == member:
                bits = m_offset & 0xFFFFFF if kind_flag else m_offset
                offsets[(struct_name, member)] = bits // 8 if bits % 8 == 0 else None
                break

    args: dict[str, tuple[int, ...] | None] = {}
    for tp in tracepoints:
        args[tp] = None
        type_id = typedefs.get(tp)
        if type_id is None:
            continue
        pointer = header(type_id)[4]
        if pointer >= len(starts) or header(pointer)[1] != PTR:
            continue
        proto = header(pointer)[4]
        if proto >= len(starts) or header(proto)[1] != FUNC_PROTO:
            continue
        vlen = header(proto)[2]
        params = [struct.unpack_from("<II", data, starts[proto] + 12 + 8 * i)[1] for i in range(vlen)]
        sizes = [size_of(p) for p in params[1:]]  # the first is the tracepoint's `void *__data`
        args[tp] = None if None in sizes else tuple(sizes)  # type: ignore[arg-type]
    return Facts(offsets, args, {tp: typedefs.get(tp) for tp in tracepoints})
