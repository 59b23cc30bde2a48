"""The pinned list maps under the pin dir: checked for their layout before use, created when absent."""

from __future__ import annotations

import errno
import os
import re

from ...kernel import bpfsys
from .lists import DEFAULT_PIN_DIR, MAP_NAMES, BlocklistError, MapLayout

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


def remove_pins(pin_dir: str = DEFAULT_PIN_DIR) -> None:
    """Unpin the list maps and remove the directory if it is then empty (tests, and a deliberate reset)."""
    for name in MAP_NAMES:
        try:
            os.unlink(os.path.join(pin_dir, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(pin_dir)
    except OSError:
        pass
