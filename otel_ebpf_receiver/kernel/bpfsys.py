"""The few bpf(2) commands we need without bcc: create, pin, open and describe maps, and read or write their entries;
describe programs (their run time and run count) and turn the kernel's per-program statistics on.

Why not bcc for these: the blocklist must be editable when no agent runs (``otel-ebpf-receiver block`` is a
plain CLI verb, and bcc needs a compiled program to hand out a map), and a pinned map's layout must be checked
*before* bcc adopts it (bcc 0.26 reuses a pin without comparing key or value sizes).

Everything here is a thin, synchronous wrapper: errors raise :class:`BpfError` carrying ``errno``.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import platform
import struct
from dataclasses import dataclass

# x86_64 and arm64 syscall numbers; other architectures are not a target of this agent.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}.get(platform.machine(), 321)

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_LOAD = 5
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_ENABLE_STATS = 32  # Linux 5.8
BPF_STATS_RUN_TIME = 0

PROG_TYPE_TRACING = 26
ATTACH_TRACE_RAW_TP = 23  # a BTF-typed raw tracepoint program ("tp_btf")

MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_LPM_TRIE = 11
MAP_TYPE_NAMES = {MAP_TYPE_HASH: "hash", MAP_TYPE_ARRAY: "array", MAP_TYPE_PERCPU_ARRAY: "percpu_array",
                  MAP_TYPE_LRU_HASH: "lru_hash", MAP_TYPE_LPM_TRIE: "lpm_trie"}

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_NO_PREALLOC = 1  # required by LPM tries

_ATTR_SIZE = 128  # larger than every command's part of union bpf_attr that we use; the tail stays zero

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A failed bpf(2) call: ``errno`` and a message naming what we tried."""


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return ret


def _attr(fmt: str, *values) -> ctypes.Array:
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says about a map (``struct bpf_map_info``, the part we compare)."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self.type, str(self.type))


@dataclass(frozen=True)
class ProgInfo:
    """What the kernel says about a program (``struct bpf_prog_info``, the part we read). ``run_time_ns`` and
    ``run_cnt`` are cumulative since load and grow only while BPF statistics are on; None when this kernel's
    struct is too short to have them (before 5.1)."""

    type: int
    id: int
    name: str
    run_time_ns: int | None
    run_cnt: int | None


# Offsets in struct bpf_prog_info (include/uapi/linux/bpf.h): they only ever grow at the end.
_PROG_INFO_NAME = 64
_PROG_INFO_RUN_TIME_NS = 192
_PROG_INFO_SIZE = 208  # up to and including run_cnt


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               name: str = "") -> int:
    """New map; returns its fd (the caller closes it or pins it)."""
    raw_name = name.encode()[:15]
    attr = _attr("=IIIIIII16s", map_type, key_size, value_size, max_entries, flags, 0, 0, raw_name)
    return _bpf(BPF_MAP_CREATE, attr)


def obj_pin(fd: int, path: str) -> None:
    path_buf = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, _attr("=QII", _addr(path_buf), fd, 0))


def obj_get(path: str) -> int:
    """fd of a pinned object; raises BpfError(ENOENT) when nothing is pinned there."""
    path_buf = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, _attr("=QII", _addr(path_buf), 0, 0))


def map_fd_by_id(map_id: int) -> int:
    return _bpf(BPF_MAP_GET_FD_BY_ID, _attr("=III", map_id, 0, 0))


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(88)  # struct bpf_map_info up to and past name[16]
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, ctypes.sizeof(info), _addr(info)))
    mtype, mid, ksz, vsz, maxe, flags, name = struct.unpack_from("=IIIIII16s", info, 0)
    return MapInfo(mtype, mid, ksz, vsz, maxe, flags, name.split(b"\0", 1)[0].decode())


def prog_fd_by_id(prog_id: int) -> int:
    """fd of a loaded program (the caller closes it)."""
    return _bpf(BPF_PROG_GET_FD_BY_ID, _attr("=III", prog_id, 0, 0))


def prog_test_run(fd: int, data: bytes, repeat: int = 1) -> int:
    """Run a loaded program ``repeat`` times on one packet (BPF_PROG_TEST_RUN, as ``bpftool prog run``): its
    return value. Its maps are updated as by real traffic; used by the XDP bench and tests."""
    buf = ctypes.create_string_buffer(data, len(data))
    attr = _attr("=IIIIQQI", fd, 0, len(data), 0, _addr(buf), 0, repeat)
    _bpf(BPF_PROG_TEST_RUN, attr)
    return struct.unpack_from("=I", attr, 4)[0]


def prog_ids() -> list[int]:
    """Ids of every loaded BPF program (BPF_PROG_GET_NEXT_ID until ENOENT)."""
    ids: list[int] = []
    while True:
        attr = _attr("=III", ids[-1] if ids else 0, 0, 0)
        try:
            _bpf(BPF_PROG_GET_NEXT_ID, attr)
        except BpfError as exc:
            if exc.errno == _errno.ENOENT:
                return ids
            raise
        ids.append(struct.unpack_from("=I", attr, 4)[0])


# struct bpf_prog_info: nr_map_ids (u32) and map_ids (u64 pointer to u32[])
_PROG_INFO_NR_MAP_IDS = 52
_PROG_INFO_MAP_IDS = 56


def prog_map_ids(fd: int, most: int = 64) -> list[int]:
    """Ids of the maps a loaded program uses (up to ``most``)."""
    ids = (ctypes.c_uint32 * most)()
    info = ctypes.create_string_buffer(_PROG_INFO_MAP_IDS + 8)
    struct.pack_into("=I", info, _PROG_INFO_NR_MAP_IDS, most)
    struct.pack_into("=Q", info, _PROG_INFO_MAP_IDS, ctypes.addressof(ids))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, ctypes.sizeof(info), _addr(info)))
    count = min(struct.unpack_from("=I", info, _PROG_INFO_NR_MAP_IDS)[0], most)
    return list(ids)[:count]


def prog_info(fd: int) -> ProgInfo:
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    attr = _attr("=IIQ", fd, ctypes.sizeof(info), _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    filled = struct.unpack_from("=I", attr, 4)[0]  # the kernel writes back how much of its struct it had
    ptype, pid = struct.unpack_from("=II", info, 0)
    name = info.raw[_PROG_INFO_NAME:_PROG_INFO_NAME + 16].split(b"\0", 1)[0].decode()
    if filled < _PROG_INFO_SIZE:
        return ProgInfo(ptype, pid, name, None, None)
    run_time_ns, run_cnt = struct.unpack_from("=QQ", info, _PROG_INFO_RUN_TIME_NS)
    return ProgInfo(ptype, pid, name, run_time_ns, run_cnt)


def prog_load(prog_type: int, insns: bytes, license: str, name: str = "", expected_attach_type: int = 0,
              attach_btf_id: int = 0) -> int:
    """Load a program from instructions already relocated (bcc's compiled and map-resolved bytes); returns its
    fd. On failure the BpfError's message ends with the verifier's last line, which says why."""
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(64 * 1024)
    # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level, log_size, log_buf,
    # kern_version, prog_flags, prog_name[16], prog_ifindex, expected_attach_type, prog_btf_fd,
    # func_info_rec_size, func_info, func_info_cnt, line_info_rec_size, line_info, line_info_cnt, attach_btf_id
    attr = _attr("=IIQQIIQII16sIIIIQIIQII", prog_type, len(insns) // 8, _addr(insn_buf), _addr(license_buf),
                 1, ctypes.sizeof(log), _addr(log), 0, 0, name.encode()[:15], 0, expected_attach_type, 0,
                 0, 0, 0, 0, 0, 0, attach_btf_id)
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except BpfError as exc:
        lines = [line for line in log.value.decode("utf-8", "replace").splitlines() if line.strip()]
        raise BpfError(exc.errno, f"{exc.strerror}: {lines[-1]}" if lines else exc.strerror) from None


def raw_tracepoint_open(prog_fd: int) -> int:
    """Attach a BTF-typed raw tracepoint program to the tracepoint it was loaded for; the returned link fd keeps
    it attached, and closing it (or the process dying) detaches it."""
    return _bpf(BPF_RAW_TRACEPOINT_OPEN, _attr("=QI", 0, prog_fd))


def enable_stats() -> int:
    """Turn on the kernel's per-program run time and run count; they stay on while the returned fd is open (and
    go off by themselves when the process dies, unlike the sysctl kernel.bpf_stats_enabled). Raises BpfError
    (EINVAL) on kernels before 5.8."""
    return _bpf(BPF_ENABLE_STATS, _attr("=I", BPF_STATS_RUN_TIME))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _attr("=IIQQQ", fd, 0, _addr(kbuf), _addr(vbuf), 0))
    except BpfError as exc:
        if exc.errno == _errno.ENOENT:
            return None
        raise
    return vbuf.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, _attr("=IIQQQ", fd, 0, _addr(kbuf), _addr(vbuf), flags))


def map_delete(fd: int, key: bytes) -> bool:
    """True when the key was there."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _attr("=IIQQQ", fd, 0, _addr(kbuf), 0, 0))
    except BpfError as exc:
        if exc.errno == _errno.ENOENT:
            return False
        raise
    return True


def map_is_empty(fd: int, key_size: int) -> bool:
    """Whether a hash or trie holds no key: one GET_NEXT_KEY, not a walk."""
    nbuf = ctypes.create_string_buffer(key_size)
    try:
        _bpf(BPF_MAP_GET_NEXT_KEY, _attr("=IIQQ", fd, 0, 0, _addr(nbuf)))
    except BpfError as exc:
        if exc.errno == _errno.ENOENT:
            return True
        raise
    return False


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key, by GET_NEXT_KEY: two syscalls per entry, fine for list maps read on demand."""
    keys: list[bytes] = []
    cur = None
    nbuf = ctypes.create_string_buffer(key_size)
    while True:
        kbuf = ctypes.create_string_buffer(cur, key_size) if cur is not None else None
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, _attr("=IIQQ", fd, 0, _addr(kbuf), _addr(nbuf)))
        except BpfError as exc:
            if exc.errno == _errno.ENOENT:
                return keys
            raise
        cur = nbuf.raw
        keys.append(cur)
        if len(keys) > 50_000_000:  # a map changing under us faster than we walk it
            raise BpfError(_errno.E2BIG, "map walk did not terminate")


def close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
