"""The pinned list maps under the pin dir: checked for their layout before use, created when absent, and moved over
from the previous layout (:func:`migrate_legacy_hosts`)."""

from __future__ import annotations

import errno
import os
import re
import struct
from dataclasses import dataclass, field

from ...kernel import bpfsys
from .lists import (DEFAULT_PIN_DIR, HOST4_KEY, HOST6_KEY, LEGACY_HOSTS, LEGACY_HOSTS_LAYOUT, LIST_MAPS, MAP_NAMES,
                    PRESENT_INDEX, PRESENT_LAYOUT, PRESENT_MAP, PRESENT_VALUE, VALUE, BlocklistError, ListFull,
                    MapLayout, _V4_MAPPED)

_PIN_DIR_OK = re.compile(r"^/[A-Za-z0-9_./-]+$")  # it ends up in a C string literal (-DPIN_DIR="...")


def check_pin_dir(pin_dir: str) -> str:
    if not _PIN_DIR_OK.match(pin_dir) or "/../" in pin_dir + "/" or "/./" in pin_dir + "/":
        raise BlocklistError(f"pin_dir {pin_dir!r}: use an absolute path of letters, digits and _ . - /")
    return pin_dir.rstrip("/")


def bpffs_mounted(path: str = "/sys/fs/bpf") -> bool:
    try:
        with open("/proc/self/mounts") as fh:
            return any(line.split()[1] == path and line.split()[2] == "bpf" for line in fh)
    except OSError:
        return False


def open_pinned_map(path: str, layout: MapLayout, *, create_entries: int | None, name: str) -> tuple[int, bool]:
    """fd of the map pinned at ``path`` after checking its layout (``layout.max_entries`` None: any size);
    when nothing is pinned there, creates a map of ``create_entries`` and pins it (None: don't create).
    Returns (fd, created)."""
    for _ in range(3):  # another process may create the same pin between our get and our pin
        try:
            fd = bpfsys.obj_get(path)
        except bpfsys.BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise BlocklistError(f"cannot open pinned map {path}: {exc.strerror}") from None
            if create_entries is None:
                raise BlocklistError(f"no blocklist at {path}: start the agent or run `block` once to create it") from None
            try:
                fd = bpfsys.map_create(layout.map_type, layout.key_size, layout.value_size,
                                       create_entries, layout.flags, name)
            except bpfsys.BpfError as exc2:
                raise BlocklistError(f"cannot create map {name} ({layout.describe(create_entries)}): "
                                     f"{exc2.strerror}") from None
            try:
                bpfsys.obj_pin(fd, path)
            except bpfsys.BpfError as exc2:
                bpfsys.close(fd)
                if exc2.errno == errno.EEXIST:
                    continue
                raise BlocklistError(f"cannot pin map {name} at {path}: {exc2.strerror} "
                                     f"(the pin dir must be on a bpffs, e.g. under /sys/fs/bpf)") from None
            return fd, True
        try:
            info = bpfsys.map_info(fd)
        except bpfsys.BpfError:
            bpfsys.close(fd)
            raise BlocklistError(f"{path} is pinned but is not a BPF map; remove it (rm {path})") from None
        if (info.type, info.key_size, info.value_size, info.flags) != (
                layout.map_type, layout.key_size, layout.value_size, layout.flags) or (
                layout.max_entries is not None and info.max_entries != layout.max_entries):
            bpfsys.close(fd)
            have = MapLayout(info.type, info.key_size, info.value_size, info.max_entries, info.flags)
            raise BlocklistError(
                f"pinned map {path} has layout [{have.describe()}], expected [{layout.describe()}]: "
                f"made by another version or with other sizes; set the sizes it has, or remove the pin "
                f"(rm {path}) to start that list empty")
        return fd, False
    raise BlocklistError(f"cannot create or open pinned map {path}: it keeps changing")


def open_present(pin_dir: str, *, create: bool) -> tuple[int, bool]:
    """fd of the pinned "present" flags (lists.PRESENT_MAP), created (all 0) when absent and ``create``."""
    return open_pinned_map(os.path.join(pin_dir, PRESENT_MAP), PRESENT_LAYOUT,
                           create_entries=PRESENT_LAYOUT.max_entries if create else None, name=PRESENT_MAP)


def mark_present(fd: int, map_name: str) -> None:
    """Set the flag of a blocklist map; call it before inserting into that map (never after, never cleared)."""
    index = PRESENT_INDEX.get(map_name)
    if index is not None:
        bpfsys.map_update(fd, struct.pack("=I", index), PRESENT_VALUE.pack(1))


def present_flags(fd: int) -> dict[str, bool]:
    out = {}
    for name, index in PRESENT_INDEX.items():
        raw = bpfsys.map_lookup(fd, struct.pack("=I", index), PRESENT_VALUE.size)
        out[name] = bool(raw is not None and PRESENT_VALUE.unpack(raw)[0])
    return out


def has_entries(fd: int, key_size: int) -> bool:
    """Whether a hash or trie holds at least one key."""
    return not bpfsys.map_is_empty(fd, key_size)


def programs_using_map(map_id: int) -> list[int]:
    """Ids of the loaded BPF programs that use the map (a previous version's XDP program left attached)."""
    users: list[int] = []
    for prog_id in bpfsys.prog_ids():
        try:
            fd = bpfsys.prog_fd_by_id(prog_id)
        except bpfsys.BpfError:
            continue  # unloaded meanwhile
        try:
            if map_id in bpfsys.prog_map_ids(fd):
                users.append(prog_id)
        except bpfsys.BpfError:
            pass
        finally:
            bpfsys.close(fd)
    return users


@dataclass
class Migration:
    """What :func:`migrate_legacy_hosts` moved: entries per new map, and the programs still using the old map."""

    moved: dict[str, int] = field(default_factory=dict)
    old_programs: list[int] = field(default_factory=list)


def migrate_legacy_hosts(pin_dir: str, host_entries: int | None, *, old_program_ok: bool) -> Migration | None:
    """Move the previous layout's single addresses (``block_hosts``, 16-byte keys with IPv4 as ::ffff:a.b.c.d) to
    ``block_hosts4``/``block_hosts6``, values untouched — hits, last hit and the expiry on the kernel's clock — and
    unpin it. None when there is nothing to migrate. Call it under the sidecar lock, before opening the maps.

    Safe to interrupt or repeat: the "present" flags are set before the first copy, every copy is an overwrite
    of the same value, and the old pin goes only after the last entry was copied — so a blocked entry is never
    lost, whatever fails in between (a full map: the old pin stays and the error says which).
    ``old_program_ok``: a previous version's program may still be attached (an agent killed before the upgrade)
    and it reads only the old map. The agent migrates anyway, because it replaces that program in place right
    after; a CLI verb must not — the entries it adds would go to maps the attached program never reads — and
    refuses with one line until the agent has started."""
    path = os.path.join(pin_dir, LEGACY_HOSTS)
    try:
        old = bpfsys.obj_get(path)
    except bpfsys.BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise BlocklistError(f"cannot open pinned map {path}: {exc.strerror}") from None
    fds: list[int] = [old]
    try:
        try:
            info = bpfsys.map_info(old)
        except bpfsys.BpfError:
            raise BlocklistError(f"{path} is pinned but is not a BPF map; remove it (rm {path})") from None
        want = LEGACY_HOSTS_LAYOUT
        if (info.type, info.key_size, info.value_size, info.flags) != (
                want.map_type, want.key_size, want.value_size, want.flags):
            have = MapLayout(info.type, info.key_size, info.value_size, info.max_entries, info.flags)
            raise BlocklistError(f"pinned map {path} has layout [{have.describe()}], not the previous version's "
                                 f"[{want.describe()}]: remove it (rm {path})")
        result = Migration(old_programs=programs_using_map(info.id))
        if result.old_programs and not old_program_ok:
            ids = ", ".join(str(i) for i in result.old_programs)
            raise BlocklistError(f"the lists in {pin_dir} have the previous version's layout and its XDP program "
                                 f"(id {ids}) still enforces them: start the agent once — it moves them over "
                                 f"(entries, TTLs and hit counts kept) and replaces that program")
        size = host_entries or info.max_entries
        specs = {spec.name: spec for spec in LIST_MAPS}
        new: dict[str, int] = {}
        for name in ("block_hosts4", "block_hosts6"):
            fd, _ = open_pinned_map(os.path.join(pin_dir, name), specs[name].layout(host_entries),
                                    create_entries=size, name=name)
            fds.append(fd)
            new[name] = fd
        present, _ = open_present(pin_dir, create=True)
        fds.append(present)
        for raw in bpfsys.map_keys(old, LEGACY_HOSTS_LAYOUT.key_size):
            value = bpfsys.map_lookup(old, raw, VALUE.size)
            if value is None:
                continue  # removed meanwhile
            name, key = (("block_hosts4", HOST4_KEY.pack(raw[12:16])) if raw[:12] == _V4_MAPPED
                         else ("block_hosts6", HOST6_KEY.pack(raw)))
            if name not in result.moved:
                mark_present(present, name)
                result.moved[name] = 0
            try:
                bpfsys.map_update(new[name], key, value)
            except bpfsys.BpfError as exc:
                if exc.errno in (errno.ENOSPC, errno.E2BIG, errno.ENOMEM):
                    raise ListFull(f"cannot move {path} to {name}: {name} is full "
                                   f"({bpfsys.map_info(new[name]).max_entries} entries); raise "
                                   f"probe_settings.xdp.blocklist_entries (nothing was lost: {path} stays)") from None
                raise BlocklistError(f"cannot move {path} to {name}: {exc.strerror}") from None
            result.moved[name] += 1
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # another process finished the same migration
        return result
    finally:
        for fd in fds:
            bpfsys.close(fd)


def remove_pins(pin_dir: str = DEFAULT_PIN_DIR) -> None:
    """Unpin the list maps (and a previous layout's) and remove the directory if it is then empty (tests, and a
    deliberate reset)."""
    for name in MAP_NAMES:
        try:
            os.unlink(os.path.join(pin_dir, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(pin_dir)
    except OSError:
        pass
