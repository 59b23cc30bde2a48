"""What the kernel does not need to know about a list entry — reason, added-at, and the expiry as wall-clock time —
kept in a JSON file in a root-only state dir (``/var/lib/otel-ebpf-receiver/blocklist.json``), written atomically
under a lock. bpffs does not survive a reboot, the sidecar does: when the maps have to be created afresh, the
entries it holds that have not expired are put back. Another process's changes (the CLI while the agent runs)
show up as a changed file, and :meth:`Sidecar.load` says which rows came and went."""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .lists import ALLOW, BLOCK, DEFAULT_PIN_DIR, BlocklistError

Rows = dict[str, dict[str, dict[str, Any]]]  # list kind -> cidr -> {reason, added_at, expires_at[, forced]}


def sidecar_path(pin_dir: str, state_dir: str, stem: str = "blocklist") -> Path:
    """The default pin dir keeps the plain name; any other pin dir gets its own file in the same state dir.
    ``stem`` names other state kept per pin dir (mitigation's offences: ``mitigation.json``)."""
    if pin_dir.rstrip("/") == DEFAULT_PIN_DIR:
        return Path(state_dir) / f"{stem}.json"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", pin_dir.strip("/")).strip("-")
    return Path(state_dir) / f"{stem}-{slug}.json"


def write_json_atomically(path: Path, data: Any) -> None:
    """Readers see the old file or the new one, never half of one, even after a crash (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, separators=(",", ":"), sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def empty_rows() -> Rows:
    return {BLOCK: {}, ALLOW: {}}


class Sidecar:
    """The sidecar file of one pin dir: ``rows`` as last read or written, and the file stamp they belong to."""

    def __init__(self, pin_dir: str, state_dir: str) -> None:
        self.pin_dir = pin_dir
        self.state_dir = Path(state_dir)
        self.path = sidecar_path(pin_dir, state_dir)
        self.rows: Rows = empty_rows()
        self.stamp: tuple[int, int] | None = None   # (mtime_ns, inode) of the file the rows came from

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Writers take this lock around "change the map, then the file", so a reader that takes it sees both."""
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise BlocklistError(f"cannot use state dir {self.state_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    @property
    def changed(self) -> bool:
        return self.file_stamp() != self.stamp

    def load(self) -> list[tuple[str, str, dict[str, Any] | None]]:
        """Re-read the file if it changed since the rows were taken. Returns what another process changed,
        as (kind, cidr, row) for rows that appeared and (kind, cidr, None) for rows that went — empty on the
        first read, when there is nothing to compare with."""
        stamp = self.file_stamp()
        if stamp is not None and stamp == self.stamp:
            return []
        fresh = empty_rows()
        if stamp is not None:
            try:
                data = json.loads(self.path.read_text())
                for kind in (BLOCK, ALLOW):
                    fresh[kind] = {str(k): dict(v) for k, v in data.get(kind, {}).items()}
            except (OSError, ValueError, AttributeError, TypeError, RecursionError):
                # A damaged sidecar loses reasons and wall-clock expiries, never entries (they are in the maps).
                fresh = empty_rows()
        changes: list[tuple[str, str, dict[str, Any] | None]] = []
        if self.stamp is not None:
            for kind in (BLOCK, ALLOW):
                changes += [(kind, cidr, fresh[kind][cidr]) for cidr in sorted(fresh[kind].keys() - self.rows[kind].keys())]
                changes += [(kind, cidr, None) for cidr in sorted(self.rows[kind].keys() - fresh[kind].keys())]
        self.rows = fresh
        self.stamp = stamp
        return changes

    def save(self) -> None:
        write_json_atomically(self.path, {"version": 1, "pin_dir": self.pin_dir, BLOCK: self.rows[BLOCK],
                                          ALLOW: self.rows[ALLOW]})
        self.stamp = self.file_stamp()
