"""The contract between a probe's C program and its Python class, checked when the probe loads.

Nothing about a struct is copied by hand into Python: bcc builds a ctypes type for every map's key and value from
the C, and :func:`dtype` turns it into the numpy dtype the probe reads the map's buffers with, fields by name.
What Python does rely on is declared in the probe class and checked right after the program compiles, before
anything is read — a mismatch would otherwise have the kernel write past a buffer or Python read the wrong bytes:

* ``Probe.maps``: for each map Python reads, the key and value fields it reads and at which type
  (:class:`MapContract`). bcc's sizes are compared with the kernel's too: bcc's types are themselves generated
  (and get two-dimensional arrays wrong).
* ``Probe.c_constants``: enum values and ``#define``s bcc cannot show (array indexes, slot counts), compared by the
  compiler itself: each ``.bpf.c`` ends with ``CHECK_PYTHON_CONSTANTS``, which the loader defines as one
  ``_Static_assert`` per constant (see bpf/common.bpf.h).

Either way a mismatch refuses the probe with one line naming the map and field (or the constant) and both values.
"""

from __future__ import annotations

import ctypes as ct
import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

import numpy as np

# bpf/common.bpf.h: the map-health counters every probe with a `stats` array keeps at the same index.
STAT_UPDATE_FAILED = 0
STAT_NEW_KEYS = 1
STAT_PROBE = 2  # a probe's own counters start here
COMMON_STATS = {"STAT_UPDATE_FAILED": STAT_UPDATE_FAILED, "STAT_NEW_KEYS": STAT_NEW_KEYS, "STAT_PROBE": STAT_PROBE}

U32, U64 = "<u4", "<u8"

# A key or value as Python reads it: a numpy dtype string for a scalar ("<u8"), or field name -> spec for a
# struct, naming only the fields Python reads. A spec is a dtype string ("<u4", "(28,)<u8"), None (read through
# bcc's own ctypes type: only its presence matters) or (count, {field: spec}) for an array of structs.
Shape = Union[str, Mapping[str, Any]]


class LayoutError(Exception):
    """One line: which map, which field, what C has and what Python reads."""


@dataclass(frozen=True)
class MapContract:
    """What Python reads from one map. ``value`` is per CPU for per-CPU maps."""

    key: Shape | None = None
    value: Shape | None = None


def dtype(ctype: Any) -> np.dtype:
    """numpy's view of a ctypes type bcc built from the C: field names, offsets and sizes as compiled."""
    dt = np.dtype(ctype)
    if dt.itemsize != ct.sizeof(ctype):  # numpy and ctypes disagree on padding: never read with it
        raise LayoutError(f"{getattr(ctype, '__name__', ctype)}: numpy sees {dt.itemsize} B, ctypes {ct.sizeof(ctype)} B")
    return dt


def value_type(table: Any) -> Any:
    """The ctypes type of one value, per CPU for per-CPU maps (bcc's ``Leaf`` there is an array over CPUs)."""
    return getattr(table, "sLeaf", table.Leaf)


def _describe(dt: np.dtype, offset: int | None = None) -> str:
    at = f" at offset {offset}" if offset is not None else ""
    return f"{dt.str if dt.subdtype is None else f'{dt.subdtype[0].str}{list(dt.shape)}'} ({dt.itemsize} B){at}"


def check_shape(where: str, ctype: Any, shape: Shape) -> None:
    """``shape`` (what Python reads) against bcc's type for it; raises :class:`LayoutError`."""
    _check(where, dtype(ctype), shape)


def _check(where: str, have: np.dtype, shape: Any) -> None:
    if isinstance(shape, str):
        want = np.dtype(shape)
        if have.fields is None and have == want:
            return
        if have.fields is not None and have.itemsize == want.itemsize and len(have.fields) == 1:
            return  # a one-field struct read as its field (struct addr16 as 16 bytes)
        raise LayoutError(f"{where} is {_describe(have)} in C, Python reads {_describe(want)}")
    if have.fields is None:
        raise LayoutError(f"{where} is {_describe(have)} in C, Python reads a struct with {', '.join(shape)}")
    for name, spec in shape.items():
        if name not in have.fields:
            raise LayoutError(f"{where} has no field {name} in C (it has {', '.join(have.names)})")
        got, offset = have.fields[name][:2]
        if spec is None:  # read through bcc's ctypes type: any type will do
            continue
        if isinstance(spec, tuple):  # (count, fields): an array of structs
            count, fields = spec
            if got.shape != (count,):
                raise LayoutError(f"{where} field {name} has {got.shape or 1} elements in C, Python reads {count}")
            _check(f"{where} field {name}", got.base, fields)
            continue
        want = np.dtype(spec)
        if got != want:
            raise LayoutError(f"{where} field {name} is {_describe(got, offset)} in C, Python reads {_describe(want)}")


def check_struct_offsets(where: str, ctype: Any, expected: Mapping[str, tuple[int, int]], size: int) -> None:
    """A hand-kept layout (name -> (offset, size), total size) against bcc's type: for layouts that must exist
    without bcc, such as the pinned list maps the CLI writes."""
    have = dtype(ctype)
    if have.fields is None:
        raise LayoutError(f"{where} is {_describe(have)} in C, Python packs a struct of {size} B")
    for name, (offset, nbytes) in expected.items():
        if name not in have.fields:
            raise LayoutError(f"{where} has no field {name} in C ({', '.join(have.names)}), Python packs one of "
                              f"{nbytes} B at offset {offset}")
        got, got_offset = have.fields[name][:2]
        if (got_offset, got.itemsize) != (offset, nbytes):
            raise LayoutError(f"{where} field {name} is {got.itemsize} B at offset {got_offset} in C, Python packs "
                              f"{nbytes} B at offset {offset}")
    if have.itemsize != size:
        raise LayoutError(f"{where} is {have.itemsize} B in C, Python packs {size} B")


def check_map(map_name: str, table: Any, contract: MapContract) -> None:
    """bcc's types for one map against the kernel's sizes and against what Python reads."""
    from ..kernel import bpfsys

    info = bpfsys.map_info(table.map_fd)
    key_size, value_size = ct.sizeof(table.Key), ct.sizeof(value_type(table))
    if (key_size, value_size) != (info.key_size, info.value_size):
        raise LayoutError(f"map {map_name}: bcc's types are key {key_size} B value {value_size} B, the kernel's map "
                          f"key {info.key_size} B value {info.value_size} B (a C type bcc cannot describe)")
    if contract.key is not None:
        check_shape(f"map {map_name} key", table.Key, contract.key)
    if contract.value is not None:
        check_shape(f"map {map_name} value", value_type(table), contract.value)


# ---- constants -----------------------------------------------------------------------------------------------

def constant_checks(constants: Mapping[str, int]) -> str:
    """The definition of CHECK_PYTHON_CONSTANTS: the compiler compares each C constant with Python's value."""
    return "".join(f'_Static_assert({name} == {value}, "{name}");' for name, value in constants.items())


_ASSERT = re.compile(r"static.assert\w* failed due to requirement '(?P<c>.+?) == (?P<py>.+?)'\s*\"(?P<name>[^\"]+)\"")


def constant_mismatch(compiler_line: str) -> str | None:
    """The one line to show for a failed constant check (None when the compiler line is something else)."""
    m = _ASSERT.search(compiler_line)
    if not m:
        return None
    return f"constant {m['name']} is {m['c']} in C, {m['py']} in Python"
