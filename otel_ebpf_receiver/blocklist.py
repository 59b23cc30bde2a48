"""The source blocklist and allowlist that bpf/xdp.bpf.c enforces, managed with or without a running agent.

Where things live, and why:

* **The lists are pinned maps** under the pin dir (default ``/sys/fs/bpf/otel-ebpf-receiver``, mode 0700):
  ``block_hosts`` (hash of single addresses), ``block_v4``/``block_v6`` (LPM tries of CIDR prefixes) and
  ``allow_v4``/``allow_v6`` (LPM tries). Addresses are 16 bytes with IPv4 as ``::ffff:a.b.c.d``; the tries are
  per family so an IPv4 walk compares 4 bytes, not 16. Single addresses go to the hash because bad-IP feeds
  are mostly single addresses and a hash lookup is 2-4x cheaper than a trie walk over 10,000 entries (numbers
  in bench/bench_xdp.py); users never see the split — ``block 192.0.2.7`` and ``block 192.0.2.0/24`` are the
  same verb, and a host inside a blocked prefix matches (and counts) as the longer prefix, as in one trie.
  A prefix written as IPv4-mapped IPv6 (``::ffff:192.0.2.0/120``) is stored as what matches on the wire
  (``192.0.2.0/24``).
* **Pinning** means the lists and their hit counters survive an agent restart, and that ``block`` works before
  any agent ever ran: whoever needs the maps first creates them with the layout below, and everyone checks that
  layout (type, key size, value size, flags and — for the agent — max entries) before use, refusing a foreign
  or stale pin with one line instead of misreading it.
* **Each entry's value is what the kernel needs**: hits, last hit and the expiry, in ``CLOCK_MONOTONIC`` ns.
  The program compares the expiry with a clock the agent writes into it every interval (reading a kernel clock
  per packet costs 20-45 ns on a VM), so an expired entry stops matching within one interval even before
  :meth:`Blocklist.expire` — called by the agent each interval and at start-up — removes it and logs the event.
  While no agent runs, that clock stands still: entries that expire meanwhile are removed by the next start.
* **What the kernel does not need** — reason, added-at, and the expiry as wall-clock time — is a JSON sidecar
  in a root-only state dir (``/var/lib/otel-ebpf-receiver/blocklist.json``), written atomically under a lock.
  bpffs does not survive a reboot, the sidecar does: when this module has to create the maps afresh it
  re-inserts the sidecar's entries that have not expired, so a reboot keeps the list (hit counts restart).

Every change can be reported through ``on_event(name, attributes)``; the agent wires that to OpenTelemetry
logs. Changes made by another process (the CLI while the agent runs) are noticed through the sidecar and
reported by the agent with ``blocklist.origin = external``.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import ipaddress
import json
import os
import re
import struct
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from . import bpfsys
from .errors import AgentError

DEFAULT_PIN_DIR = "/sys/fs/bpf/otel-ebpf-receiver"
DEFAULT_STATE_DIR = "/var/lib/otel-ebpf-receiver"
DEFAULT_BLOCKLIST_ENTRIES = 100_000  # per map: single addresses, IPv4 prefixes, IPv6 prefixes
DEFAULT_ALLOWLIST_ENTRIES = 10_000   # per family

BLOCK = "block"
ALLOW = "allow"

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
EventSink = Callable[[str, dict[str, Any]], None]

# Layouts shared with bpf/xdp.bpf.c: struct addr16, lpm4_key, lpm6_key, list_entry.
_HOST = struct.Struct("=16s")
_KEY4 = struct.Struct("=I4s")
_KEY6 = struct.Struct("=I16s")
_VALUE = struct.Struct("=QQQ")  # hits, last_hit_ns, expires_ns (CLOCK_MONOTONIC, 0 = never)
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"

_PIN_DIR_OK = re.compile(r"^/[A-Za-z0-9_./-]+$")  # it ends up in a C string literal (-DPIN_DIR="...")


class BlocklistError(AgentError):
    """A user-facing error: ``str(exc)`` is one line saying what is wrong and what to do."""


@dataclass(frozen=True)
class MapLayout:
    map_type: int
    key_size: int
    value_size: int
    max_entries: int | None  # None: adopt whatever size the pinned map has (CLI verbs)
    flags: int

    def describe(self, max_entries: int | None = None) -> str:
        size = self.max_entries if max_entries is None else max_entries
        return (f"{bpfsys.MAP_TYPE_NAMES.get(self.map_type, self.map_type)} key {self.key_size} B "
                f"value {self.value_size} B max_entries {size if size is not None else 'any'} flags {self.flags:#x}")


@dataclass(frozen=True)
class ListMap:
    """One pinned map: which list, which prefixes it holds, and its key layout."""

    name: str
    kind: str
    map_type: int
    key: struct.Struct

    def layout(self, max_entries: int | None) -> MapLayout:
        return MapLayout(self.map_type, self.key.size, _VALUE.size, max_entries, bpfsys.BPF_F_NO_PREALLOC)


LIST_MAPS = (
    ListMap("block_hosts", BLOCK, bpfsys.MAP_TYPE_HASH, _HOST),
    ListMap("block_v4", BLOCK, bpfsys.MAP_TYPE_LPM_TRIE, _KEY4),
    ListMap("block_v6", BLOCK, bpfsys.MAP_TYPE_LPM_TRIE, _KEY6),
    ListMap("allow_v4", ALLOW, bpfsys.MAP_TYPE_LPM_TRIE, _KEY4),
    ListMap("allow_v6", ALLOW, bpfsys.MAP_TYPE_LPM_TRIE, _KEY6),
)
MAP_NAMES = tuple(m.name for m in LIST_MAPS)


@dataclass
class Entry:
    """One list entry as users see it. Times are wall-clock seconds (``time.time()``), None when unknown/never."""

    cidr: str
    list: str
    hits: int
    last_hit: float | None
    reason: str | None
    added_at: float | None
    expires_at: float | None


# ---- addresses ----------------------------------------------------------------------------------------------

def parse_cidr(text: str) -> Network:
    """An address or a prefix; IPv4-mapped IPv6 prefixes become the IPv4 prefix that matches on the wire."""
    raw = text.strip()
    if not raw:
        raise BlocklistError("empty address")
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError:
        raise BlocklistError(_why_not_cidr(raw)) from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.network_address.ipv4_mapped:
        net = ipaddress.IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96))
    return net


def _why_not_cidr(raw: str) -> str:
    addr, _, plen = raw.partition("/")
    try:
        ip_addr = ipaddress.ip_address(addr)
    except ValueError:
        return f"{raw!r} is not an IP address or CIDR prefix"
    if plen:
        limit = ip_addr.max_prefixlen
        if not plen.isdigit() or int(plen) > limit:
            return f"{raw!r}: prefix length must be 0-{limit} for IPv{ip_addr.version}"
        loose = ipaddress.ip_network(raw, strict=False)
        return f"{raw!r} has host bits set; did you mean {loose}?"
    return f"{raw!r} is not an IP address or CIDR prefix"


def _map_for(kind: str, net: Network) -> str:
    if kind == BLOCK and net.prefixlen == net.max_prefixlen:
        return "block_hosts"
    return f"{kind}_v{net.version}"


def _encode(map_name: str, net: Network) -> bytes:
    if map_name == "block_hosts":
        packed = net.network_address.packed
        return _HOST.pack(_V4_MAPPED + packed if net.version == 4 else packed)
    if net.version == 4:
        return _KEY4.pack(net.prefixlen, net.network_address.packed)
    return _KEY6.pack(net.prefixlen, net.network_address.packed)


def _decode(map_name: str, raw: bytes) -> Network:
    if map_name == "block_hosts":
        addr = raw[:16]
        if addr[:12] == _V4_MAPPED:
            return ipaddress.IPv4Network(addr[12:16])
        return ipaddress.IPv6Network(addr)
    if map_name.endswith("_v4"):
        plen, addr = _KEY4.unpack(raw)
        return ipaddress.IPv4Network((ipaddress.IPv4Address(addr), plen))
    plen, addr = _KEY6.unpack(raw)
    return ipaddress.IPv6Network((ipaddress.IPv6Address(addr), plen))


# ---- time -------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``2h``, ``1d``, ``1h30m`` or plain seconds → seconds (> 0)."""
    raw = str(text).strip().lower()
    try:
        seconds = float(raw)
    except ValueError:
        parts = _DURATION.findall(raw)
        if not parts or "".join(n + u for n, u in parts) != raw:
            raise BlocklistError(f"bad duration {text!r}: use e.g. 30s, 10m, 2h, 1d or 1h30m") from None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0:
        raise BlocklistError(f"bad duration {text!r}: must be more than zero")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{max(seconds, 0)}s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(out) == 2:
            break
    return "".join(out)


def _wall_to_mono_ns(wall: float) -> int:
    """The kernel compares against CLOCK_MONOTONIC(_COARSE); wall-clock expiries are converted at write time."""
    return max(1, time.monotonic_ns() + int((wall - time.time()) * 1e9))


def _mono_ns_to_wall(ns: int) -> float:
    return time.time() - (time.monotonic_ns() - ns) / 1e9


# ---- pins ---------------------------------------------------------------------------------------------------

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


def sidecar_path(pin_dir: str, state_dir: str) -> Path:
    """The default pin dir keeps the plain name; any other pin dir gets its own file in the same state dir."""
    if pin_dir.rstrip("/") == DEFAULT_PIN_DIR:
        return Path(state_dir) / "blocklist.json"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", pin_dir.strip("/")).strip("-")
    return Path(state_dir) / f"blocklist-{slug}.json"


# ---- the lists ----------------------------------------------------------------------------------------------

class Blocklist:
    """The pinned lists plus their sidecar. Usable by the agent and by one-shot CLI commands alike.

    ``blocklist_entries`` (per map) and ``allowlist_entries`` (per family): None adopts whatever the pinned maps
    have (and uses the defaults when creating them), which is what CLI verbs want. The agent passes its settings
    so that a map of another size is refused rather than silently used.

    ``reconcile`` walks every map once to bring the sidecar in step (entries added with bpftool, entries the
    kernel already treats as expired); the agent does it at start, one-shot CLI changes skip it.
    """

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, state_dir: str = DEFAULT_STATE_DIR, *,
                 blocklist_entries: int | None = None, allowlist_entries: int | None = None,
                 create: bool = True, reconcile: bool = True, on_event: EventSink | None = None) -> None:
        self.pin_dir = check_pin_dir(pin_dir)
        self.state_dir = Path(state_dir)
        self.sidecar = sidecar_path(self.pin_dir, state_dir)
        self.on_event = on_event
        self._fds: dict[str, int] = {}
        self._meta: dict[str, dict[str, dict[str, Any]]] = {BLOCK: {}, ALLOW: {}}
        self._meta_stamp: tuple[int, int] | None = None
        self._counts: tuple[Any, dict[tuple[str, int], int]] | None = None
        self.created = False
        self.expired_on_open: list[str] = []  # entries whose TTL passed while nobody had the lists open
        if not bpffs_mounted():
            raise BlocklistError("bpffs is not mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf, "
                                 "or run deploy/host-setup.sh)")
        if create:
            try:
                os.makedirs(self.pin_dir, mode=0o700, exist_ok=True)
                os.chmod(self.pin_dir, 0o700)
            except OSError as exc:
                raise BlocklistError(f"cannot create pin dir {self.pin_dir}: {exc.strerror}") from None
        sizes = {BLOCK: blocklist_entries, ALLOW: allowlist_entries}
        defaults = {BLOCK: DEFAULT_BLOCKLIST_ENTRIES, ALLOW: DEFAULT_ALLOWLIST_ENTRIES}
        try:
            for spec in LIST_MAPS:
                fd, created = open_pinned_map(
                    os.path.join(self.pin_dir, spec.name), spec.layout(sizes[spec.kind]),
                    create_entries=(sizes[spec.kind] or defaults[spec.kind]) if create else None, name=spec.name)
                self._fds[spec.name] = fd
                self.created |= created
            with self._locked():
                self._load_meta()
                if self.created:
                    self._restore_from_sidecar()
                if reconcile or self.created:
                    self._reconcile()
        except BaseException:
            self.close()
            raise

    # -- lifecycle --------------------------------------------------------------------------------------------
    def close(self) -> None:
        for fd in self._fds.values():
            bpfsys.close(fd)
        self._fds.clear()

    def __enter__(self) -> "Blocklist":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map_fd(self, name: str) -> int:
        return self._fds[name]

    # -- changes ----------------------------------------------------------------------------------------------
    def block(self, cidr: str, ttl: float | None = None, reason: str | None = None) -> Entry:
        """Block a source address or prefix; an existing entry gets the new TTL and reason and keeps its hits."""
        net = parse_cidr(cidr)
        with self._locked():
            self._load_meta()
            entry = self._add(BLOCK, net, ttl, reason)
            self._save_meta()
        return entry

    def unblock(self, cidr: str) -> bool:
        """True when the prefix was blocked."""
        net = parse_cidr(cidr)
        with self._locked():
            self._load_meta()
            removed = self._remove(BLOCK, net, "unblock")
            self._save_meta()
        return removed

    def allow(self, cidr: str, reason: str | None = None, ttl: float | None = None) -> Entry:
        """Allowlisted sources always pass, even when a blocklist entry covers them."""
        net = parse_cidr(cidr)
        with self._locked():
            self._load_meta()
            entry = self._add(ALLOW, net, ttl, reason)
            self._save_meta()
        return entry

    def disallow(self, cidr: str) -> bool:
        net = parse_cidr(cidr)
        with self._locked():
            self._load_meta()
            removed = self._remove(ALLOW, net, "disallow")
            self._save_meta()
        return removed

    def import_file(self, path: str, ttl: float | None = None, reason: str | None = None,
                    ) -> tuple[list[str], list[tuple[int, str, str]]]:
        """Block every address or prefix of a file: one per line, ``#`` starts a comment, blank lines are fine,
        ``-`` reads stdin. Returns (added prefixes, [(line number, text, why skipped)]). Entries already blocked
        are skipped, not refreshed, so re-importing a feed is idempotent and keeps their TTLs."""
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise BlocklistError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        added: list[str] = []
        skipped: list[tuple[int, str, str]] = []
        seen: dict[str, int] = {}
        why = reason or f"imported from {os.path.basename(path) if path != '-' else 'stdin'}"
        with self._locked():
            self._load_meta()
            try:
                for lineno, line in enumerate(text.splitlines(), 1):
                    item = line.split("#", 1)[0].strip()
                    if not item:
                        continue
                    try:
                        net = parse_cidr(item)
                        cidr = str(net)
                        if cidr in seen:
                            skipped.append((lineno, item, f"duplicate of line {seen[cidr]}"))
                            continue
                        seen[cidr] = lineno
                        if self._lookup(BLOCK, net) is not None:
                            skipped.append((lineno, item, "already blocked"))
                            continue
                        self._add(BLOCK, net, ttl, why, emit=False)
                        added.append(cidr)
                    except _ListFull as exc:
                        skipped.append((lineno, item, str(exc)))
                        break
                    except BlocklistError as exc:
                        skipped.append((lineno, item, str(exc)))
            finally:
                self._save_meta()
        self._emit("otel_ebpf_receiver.blocklist.import", {
            "blocklist.file": str(path), "blocklist.added": len(added), "blocklist.skipped": len(skipped)})
        return added, skipped

    def expire(self, now: float | None = None) -> list[str]:
        """Remove entries whose TTL has passed (the kernel already ignores them); returns their prefixes.
        Cheap when nothing is due: the sidecar is re-read only when another process changed it."""
        now = time.time() if now is None else now
        with self._locked():
            self._load_meta(report_external=True)
            due = [(kind, cidr) for kind in (BLOCK, ALLOW) for cidr, m in self._meta[kind].items()
                   if m.get("expires_at") is not None and m["expires_at"] <= now]
            for kind, cidr in due:
                self._remove(kind, parse_cidr(cidr), "expire")
            if due:
                self._save_meta()
        return [cidr for _, cidr in due]

    # -- reading ----------------------------------------------------------------------------------------------
    def list(self, kind: str = BLOCK) -> list[Entry]:
        """Entries as the kernel has them (the truth), with the sidecar's reason and times."""
        self._refresh_if_changed()
        out = []
        for spec in LIST_MAPS:
            if spec.kind != kind:
                continue
            fd = self._fds[spec.name]
            for raw in bpfsys.map_keys(fd, spec.key.size):
                value = bpfsys.map_lookup(fd, raw, _VALUE.size)
                if value is not None:
                    out.append(self._entry(kind, _decode(spec.name, raw), _VALUE.unpack(value)))
        out.sort(key=lambda e: (ipaddress.ip_network(e.cidr).version, ipaddress.ip_network(e.cidr)))
        return out

    def lookup(self, cidr: str, kind: str = BLOCK) -> Entry | None:
        """The entry for exactly this prefix (not the longest match), or None."""
        net = parse_cidr(cidr)
        value = self._lookup(kind, net)
        if value is None:
            return None
        self._refresh_if_changed()
        if str(net) not in self._meta[kind]:
            # Another process (the agent, a CLI call) writes the map entry first and the sidecar right after,
            # under the lock: taking the lock waits for its sidecar, so the entry comes with its reason and TTL.
            with self._locked():
                self._load_meta(report_external=True)
        return self._entry(kind, net, value)

    def counts(self) -> dict[tuple[str, int], int]:
        """Entries per (list, IP version), from the sidecar kept in step with the maps (no map walk, so cheap
        enough for every interval)."""
        self._refresh_if_changed()
        if self._counts is not None and self._counts[0] == self._meta_stamp:
            return dict(self._counts[1])
        out = {(kind, family): 0 for kind in (BLOCK, ALLOW) for family in (4, 6)}
        for kind in (BLOCK, ALLOW):
            for cidr in self._meta[kind]:
                out[(kind, 6 if ":" in cidr else 4)] += 1
        self._counts = (self._meta_stamp, out)
        return dict(out)

    # -- internals ----------------------------------------------------------------------------------------------
    def _entry(self, kind: str, net: Network, value: tuple[int, int, int]) -> Entry:
        hits, last_hit_ns, expires_ns = value
        meta = self._meta[kind].get(str(net), {})
        expires_at = meta.get("expires_at")
        if expires_at is None and expires_ns:
            expires_at = _mono_ns_to_wall(expires_ns)
        return Entry(str(net), kind, hits, _mono_ns_to_wall(last_hit_ns) if last_hit_ns else None,
                     meta.get("reason"), meta.get("added_at"), expires_at)

    def _lookup(self, kind: str, net: Network) -> tuple[int, int, int] | None:
        name = _map_for(kind, net)
        value = bpfsys.map_lookup(self._fds[name], _encode(name, net), _VALUE.size)
        return _VALUE.unpack(value) if value is not None else None

    def _add(self, kind: str, net: Network, ttl: float | None, reason: str | None, *, emit: bool = True) -> Entry:
        if kind == BLOCK and net.prefixlen == 0:
            raise BlocklistError(f"refusing to block every IPv{net.version} source ({net}); block narrower prefixes")
        if ttl is not None and not ttl > 0:
            raise BlocklistError("ttl must be more than zero")
        now = time.time()
        expires_at = now + ttl if ttl is not None else None
        name = _map_for(kind, net)
        fd = self._fds[name]
        key = _encode(name, net)
        old = self._lookup(kind, net)
        hits, last_hit_ns = (old[0], old[1]) if old else (0, 0)
        # Hits are carried over; a packet counted between our read and this write is lost (rare, harmless).
        value = _VALUE.pack(hits, last_hit_ns, _wall_to_mono_ns(expires_at) if expires_at else 0)
        try:
            bpfsys.map_update(fd, key, value)
        except bpfsys.BpfError as exc:
            if exc.errno in (errno.ENOSPC, errno.E2BIG, errno.ENOMEM):
                size = bpfsys.map_info(fd).max_entries
                raise _ListFull(f"{name} is full ({size} entries); raise probe_settings.xdp.{kind}list_entries "
                                f"and remove the pin to resize it") from None
            raise BlocklistError(f"cannot update {name}: {exc.strerror}") from None
        cidr = str(net)
        previous = self._meta[kind].get(cidr, {})
        meta = {"reason": reason if reason is not None else previous.get("reason"),
                "added_at": previous.get("added_at") or now, "expires_at": expires_at}
        self._meta[kind][cidr] = meta
        if emit:
            attrs: dict[str, Any] = {"blocklist.cidr": cidr, "blocklist.list": kind}
            if meta["reason"]:
                attrs["blocklist.reason"] = meta["reason"]
            if ttl is not None:
                attrs["blocklist.ttl_s"] = float(ttl)
            self._emit(f"otel_ebpf_receiver.blocklist.{kind}", attrs)
        return Entry(cidr, kind, hits, _mono_ns_to_wall(last_hit_ns) if last_hit_ns else None,
                     meta["reason"], meta["added_at"], expires_at)

    def _remove(self, kind: str, net: Network, event: str) -> bool:
        cidr = str(net)
        name = _map_for(kind, net)
        value = self._lookup(kind, net)
        removed = bpfsys.map_delete(self._fds[name], _encode(name, net))
        meta = self._meta[kind].pop(cidr, None)
        if removed:
            attrs: dict[str, Any] = {"blocklist.cidr": cidr, "blocklist.list": kind,
                                     "blocklist.hits": int(value[0]) if value else 0}
            if meta and meta.get("reason"):
                attrs["blocklist.reason"] = meta["reason"]
            self._emit(f"otel_ebpf_receiver.blocklist.{event}", attrs)
        return removed

    def _emit(self, name: str, attributes: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(name, attributes)
            except Exception:  # a failing log pipeline must never break the blocklist
                pass

    def _restore_from_sidecar(self) -> None:
        """Maps were just created (first run, or bpffs emptied by a reboot): put back what has not expired."""
        now = time.time()
        for kind in (BLOCK, ALLOW):
            for cidr, meta in list(self._meta[kind].items()):
                expires_at = meta.get("expires_at")
                if expires_at is not None and expires_at <= now:
                    continue  # _reconcile drops the row
                try:
                    net = parse_cidr(cidr)
                    if self._lookup(kind, net) is None:
                        name = _map_for(kind, net)
                        bpfsys.map_update(self._fds[name], _encode(name, net),
                                          _VALUE.pack(0, 0, _wall_to_mono_ns(expires_at) if expires_at else 0))
                except (BlocklistError, bpfsys.BpfError):
                    continue

    def _reconcile(self) -> None:
        """Make the sidecar describe exactly the maps: drop rows whose key is gone, add rows (no reason) for keys
        someone put there with bpftool, and remove entries the kernel already treats as expired."""
        now_mono = time.monotonic_ns()
        changed = False
        present: dict[str, set[str]] = {BLOCK: set(), ALLOW: set()}
        for spec in LIST_MAPS:
            fd = self._fds[spec.name]
            for raw in bpfsys.map_keys(fd, spec.key.size):
                net = _decode(spec.name, raw)
                value = bpfsys.map_lookup(fd, raw, _VALUE.size)
                if value is not None:
                    expires_ns = _VALUE.unpack(value)[2]
                    if expires_ns and expires_ns <= now_mono:
                        self._remove(spec.kind, net, "expire")
                        self.expired_on_open.append(str(net))
                        changed = True
                        continue
                present[spec.kind].add(str(net))
                if str(net) not in self._meta[spec.kind]:
                    self._meta[spec.kind][str(net)] = {"reason": None, "added_at": None, "expires_at": None}
                    changed = True
        for kind in (BLOCK, ALLOW):
            for cidr in [c for c in self._meta[kind] if c not in present[kind]]:
                del self._meta[kind][cidr]
                changed = True
        if changed or self._stamp() is None:
            self._save_meta()

    # sidecar
    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.sidecar.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise BlocklistError(f"cannot use state dir {self.state_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.sidecar.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def _load_meta(self, report_external: bool = False) -> None:
        stamp = self._stamp()
        if stamp is not None and stamp == self._meta_stamp:
            return
        fresh: dict[str, dict[str, dict[str, Any]]] = {BLOCK: {}, ALLOW: {}}
        if stamp is not None:
            try:
                data = json.loads(self.sidecar.read_text())
                for kind in (BLOCK, ALLOW):
                    fresh[kind] = {str(k): dict(v) for k, v in data.get(kind, {}).items()}
            except (OSError, ValueError, AttributeError, TypeError):
                # A damaged sidecar loses reasons and wall-clock expiries, never entries (they are in the maps).
                fresh = {BLOCK: {}, ALLOW: {}}
        if report_external and self._meta_stamp is not None:
            for kind in (BLOCK, ALLOW):
                for cidr in sorted(fresh[kind].keys() - self._meta[kind].keys()):
                    attrs = {"blocklist.cidr": cidr, "blocklist.list": kind, "blocklist.origin": "external"}
                    if fresh[kind][cidr].get("reason"):
                        attrs["blocklist.reason"] = fresh[kind][cidr]["reason"]
                    self._emit(f"otel_ebpf_receiver.blocklist.{kind}", attrs)
                for cidr in sorted(self._meta[kind].keys() - fresh[kind].keys()):
                    self._emit(f"otel_ebpf_receiver.blocklist.{'unblock' if kind == BLOCK else 'disallow'}",
                               {"blocklist.cidr": cidr, "blocklist.list": kind, "blocklist.origin": "external"})
        self._meta = fresh
        self._meta_stamp = stamp

    def _refresh_if_changed(self) -> None:
        if self._stamp() != self._meta_stamp:
            with self._locked():
                self._load_meta(report_external=True)

    def _save_meta(self) -> None:
        tmp = self.sidecar.with_name(self.sidecar.name + f".tmp{os.getpid()}")
        data = {"version": 1, "pin_dir": self.pin_dir, BLOCK: self._meta[BLOCK], ALLOW: self._meta[ALLOW]}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, separators=(",", ":"), sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.sidecar)
        self._meta_stamp = self._stamp()


class _ListFull(BlocklistError):
    pass


# ---- command line -------------------------------------------------------------------------------------------

CLI_EPILOG = """examples:
  otel-ebpf-receiver block 203.0.113.7                        drop everything from one address
  otel-ebpf-receiver block 198.51.100.0/24 --ttl 10m --reason "scanner"
  otel-ebpf-receiver block 2001:db8:bad::/48 --ttl 1d
  otel-ebpf-receiver unblock 198.51.100.0/24
  otel-ebpf-receiver allow 192.0.2.10                         always pass, even inside a blocked prefix
  otel-ebpf-receiver blocklist                                entries with hits, reason and expiry
  otel-ebpf-receiver blocklist import /etc/bad-ips.txt --ttl 1d   one address or CIDR per line, # comments

The lists are pinned BPF maps: these commands work whether or not the agent runs, and the agent enforces them
on the interfaces in probe_settings.xdp.interfaces. TTLs: 30s, 10m, 2h, 1d, 1h30m.
"""


def _common(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    # Under `blocklist list|import` the defaults are suppressed, or they would overwrite a --pin-dir given
    # before the sub-command (argparse applies a sub-parser's defaults last).
    parser.add_argument("--pin-dir", default=argparse.SUPPRESS if nested else DEFAULT_PIN_DIR,
                        help=f"where the list maps are pinned (default {DEFAULT_PIN_DIR}; as probe_settings.xdp.pin_dir)")
    parser.add_argument("--state-dir", default=argparse.SUPPRESS if nested else DEFAULT_STATE_DIR,
                        help=f"where reasons and expiry times are kept (default {DEFAULT_STATE_DIR})")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Adds block, unblock, allow, disallow and blocklist [list|import FILE] to the main command."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("block", help="drop all traffic from an address or CIDR prefix (XDP)",
                              epilog=CLI_EPILOG, formatter_class=fmt)
    p.add_argument("cidr", metavar="CIDR", help="address or prefix, IPv4 or IPv6")
    p.add_argument("--ttl", help="remove the entry after this long, e.g. 10m, 2h, 1d (default: never)")
    p.add_argument("--reason", help="free text, shown by `blocklist` and in the log event")
    _common(p)
    p.set_defaults(handler=_cmd_block)

    p = subparsers.add_parser("unblock", help="remove an address or prefix from the blocklist", epilog=CLI_EPILOG,
                              formatter_class=fmt)
    p.add_argument("cidr", metavar="CIDR")
    _common(p)
    p.set_defaults(handler=_cmd_unblock)

    p = subparsers.add_parser("allow", help="always pass an address or prefix, even when blocklisted",
                              epilog=CLI_EPILOG, formatter_class=fmt)
    p.add_argument("cidr", metavar="CIDR")
    p.add_argument("--ttl", help="remove the entry after this long (default: never)")
    p.add_argument("--reason")
    _common(p)
    p.set_defaults(handler=_cmd_allow)

    p = subparsers.add_parser("disallow", help="remove an address or prefix from the allowlist", epilog=CLI_EPILOG,
                              formatter_class=fmt)
    p.add_argument("cidr", metavar="CIDR")
    _common(p)
    p.set_defaults(handler=_cmd_disallow)

    p = subparsers.add_parser("blocklist", help="show the block- and allowlist, or import a list of bad addresses",
                              epilog=CLI_EPILOG, formatter_class=fmt)
    _common(p)
    p.set_defaults(handler=_cmd_list, json=False)
    sub = p.add_subparsers(dest="blocklist_command", metavar="{list,import}")
    lp = sub.add_parser("list", help="entries with hits, reason and expiry (the default)")
    lp.add_argument("--json", action="store_true", help="one JSON object per entry, for scripts")
    _common(lp, nested=True)
    lp.set_defaults(handler=_cmd_list)
    ip_ = sub.add_parser("import", help="block every address or CIDR of a file ('-' = stdin)",
                         description="One address or CIDR per line; '#' starts a comment; blank lines are fine. "
                                     "Lines already blocked are skipped. Exit status 1 if a line is invalid.")
    ip_.add_argument("file", metavar="FILE")
    ip_.add_argument("--ttl", help="TTL for the imported entries (default: never)")
    ip_.add_argument("--reason", help="reason for the imported entries (default: 'imported from FILE')")
    _common(ip_, nested=True)
    ip_.set_defaults(handler=_cmd_import)


def _open(args: argparse.Namespace, reconcile: bool = False) -> Blocklist:
    if os.geteuid() != 0:
        raise BlocklistError("the blocklist is a set of pinned BPF maps: run this as root (sudo)")
    return Blocklist(args.pin_dir, args.state_dir, reconcile=reconcile)


def _ttl(args: argparse.Namespace) -> float | None:
    return parse_duration(args.ttl) if getattr(args, "ttl", None) else None


def _describe(entry: Entry) -> str:
    extra = []
    if entry.expires_at is not None:
        extra.append(f"expires in {format_duration(entry.expires_at - time.time())}")
    if entry.reason:
        extra.append(f"reason: {entry.reason}")
    return entry.cidr + (f" ({', '.join(extra)})" if extra else "")


def _cmd_block(args: argparse.Namespace) -> int:
    ttl = _ttl(args)
    with _open(args) as bl:
        entry = bl.block(args.cidr, ttl=ttl, reason=args.reason)
        covered = bl.lookup(entry.cidr, ALLOW)
    print(f"blocked {_describe(entry)}")
    if covered is not None:
        print(f"note: {entry.cidr} is also allowlisted, and the allowlist wins (disallow {entry.cidr} to enforce)")
    return 0


def _cmd_unblock(args: argparse.Namespace) -> int:
    with _open(args) as bl:
        removed = bl.unblock(args.cidr)
    net = parse_cidr(args.cidr)
    print(f"unblocked {net}" if removed else f"{net} was not blocked")
    return 0 if removed else 1


def _cmd_allow(args: argparse.Namespace) -> int:
    ttl = _ttl(args)
    with _open(args) as bl:
        entry = bl.allow(args.cidr, reason=args.reason, ttl=ttl)
    print(f"allowed {_describe(entry)}")
    return 0


def _cmd_disallow(args: argparse.Namespace) -> int:
    with _open(args) as bl:
        removed = bl.disallow(args.cidr)
    net = parse_cidr(args.cidr)
    print(f"removed {net} from the allowlist" if removed else f"{net} was not allowlisted")
    return 0 if removed else 1


def _cmd_list(args: argparse.Namespace) -> int:
    with _open(args, reconcile=True) as bl:
        bl.expire()
        entries = bl.list(BLOCK) + bl.list(ALLOW)
    if args.json:
        for e in entries:
            print(json.dumps(e.__dict__, sort_keys=True))
        return 0
    if not entries:
        print("the blocklist is empty (add entries with `otel-ebpf-receiver block CIDR`)")
        return 0
    now = time.time()
    rows = [("CIDR", "LIST", "HITS", "LAST HIT", "EXPIRES", "REASON")]
    for e in entries:
        rows.append((e.cidr, e.list, str(e.hits),
                     f"{format_duration(now - e.last_hit)} ago" if e.last_hit else "-",
                     f"in {format_duration(e.expires_at - now)}" if e.expires_at else "never",
                     e.reason or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.rjust(w) if i == 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip())
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    ttl = _ttl(args)
    with _open(args) as bl:
        added, skipped = bl.import_file(args.file, ttl=ttl, reason=args.reason)
    invalid = [s for s in skipped if s[2] != "already blocked" and not s[2].startswith("duplicate of line")]
    print(f"imported {len(added)} entries from {args.file}; skipped {len(skipped)}")
    for lineno, text, why in skipped:
        print(f"  line {lineno}: {text}: {why}")
    return 1 if invalid else 0
