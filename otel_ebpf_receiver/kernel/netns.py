"""Entering a network namespace from one thread, for as long as a block runs.

BPF maps and programs are not tied to a network namespace, only an XDP attachment is: the agent stays in the root
namespaces (where tracefs and bpffs are visible) and :func:`in_netns` lets the calling thread enter a namespace
just long enough to resolve an interface and attach (or detach) XDP, then come back.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Iterator

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """A namespace that cannot be entered; ``str()`` is one line."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the enclosed code (this thread only) inside network namespace ``name`` (from ``ip netns``);
    ``None`` or ``""`` stays where we are. Sockets created inside keep belonging to that namespace."""
    if not name:
        yield
        return
    path = name if name.startswith("/") else os.path.join(NETNS_RUN_DIR, name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {name!r} does not exist (ip netns list)") from None
    origin = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(origin)
    finally:
        os.close(target)
        os.close(origin)
