"""The source blocklist and allowlist that bpf/xdp.bpf.c enforces, managed with or without a running agent.

Where things live, and why:

* **The lists are pinned maps** under the pin dir (default ``/sys/fs/bpf/otel-ebpf-receiver``, mode 0700):
  ``block_hosts4``/``block_hosts6`` (hashes of single addresses, 4- and 16-byte keys), ``block_v4``/``block_v6``
  (LPM tries of CIDR prefixes) and ``allow_v4``/``allow_v6`` (LPM tries), all per family so that an IPv4 lookup
  hashes or compares 4 bytes, not 16. Single addresses go to the hash because bad-IP feeds are mostly single
  addresses and a hash lookup is 2-4x cheaper than a trie walk over 10,000 entries (numbers in
  bench/bench_xdp.py); users never see the split — ``block 192.0.2.7`` and ``block 192.0.2.0/24`` are the same
  verb, and a host inside a blocked prefix matches (and counts) as the longer prefix, as in one trie. A prefix
  written as IPv4-mapped IPv6 (``::ffff:192.0.2.0/120``) is stored as what matches on the wire (``192.0.2.0/24``).
  A pinned array of "present" flags (``list_present``, lists.py) tells the program which blocklist maps ever
  held an entry; each flag is set before the first insert and never cleared, so the pass path skips a map that
  was always empty (no prefix listed: no trie walk) and can never skip one that holds an entry. Whoever opens
  the lists also sets the flag of any map found non-empty without it (entries put there with bpftool).
* **The previous layout** (one ``block_hosts`` hash with 16-byte keys) is migrated by whoever opens the lists
  first — entries, hit counts, last hits and kernel-clock expiries copied as they are, the sidecar unchanged
  (it is keyed by prefix) — then the old pin is removed (pins.migrate_legacy_hosts). A CLI verb refuses with one
  line while a previous version's program still enforces the old map (start the agent: it migrates and replaces
  that program in place).
* **Pinning** means the lists and their hit counters survive an agent restart, and that ``block`` works before
  any agent ever ran: whoever needs the maps first creates them with the layout below, and everyone checks that
  layout (type, key size, value size, flags and — for the agent — max entries) before use, refusing a foreign
  or stale pin with one line instead of misreading it.
* **Each entry's value is what the kernel needs**: hits, last hit and the expiry, in ``CLOCK_MONOTONIC`` ns.
  The program reads the kernel's coarse monotonic clock when, and only when, a packet matched an entry (a
  blocked source, the rare path for normal traffic: the pass path reads no clock), so an entry stops matching
  when its TTL passes whether or not an agent runs. :meth:`Blocklist.expire` — called by the agent each interval
  and at start-up, and by ``blocklist`` — then removes it from the map and the sidecar and logs the event.
* **Nothing locks the host out by accident**: an entry that covers loopback, this host's addresses, its default
  gateways, DNS resolvers or the Collector (probes/xdp/protected.py) is refused unless ``force`` is given — by
  ``block``, ``import`` and the restore after a reboot alike (a forced entry is marked so in the sidecar and
  restored as it was forced); blocking every source (``/0``) is refused even with ``force``.
* **What the kernel does not need** — reason, added-at, and the expiry as wall-clock time — is a JSON sidecar
  in a root-only state dir (``/var/lib/otel-ebpf-receiver/blocklist.json``), written atomically under a lock.
  bpffs does not survive a reboot, the sidecar does: when this module has to create the maps afresh it
  re-inserts the sidecar's entries that have not expired, so a reboot keeps the list (hit counts restart).

The pieces: ``lists`` (addresses, keys, layouts), ``pins`` (the pinned maps), ``sidecar`` (the JSON file),
``protected`` (what a block must not cover), ``feed`` (import files) and this module's :class:`Blocklist`, which
keeps them in step. Longer than usual because every path that changes the maps and the sidecar together — block,
import, expire, the restore after a reboot, reconcile — takes the same lock in the same order, and is easier to
check for that when read in one class. The CLI verbs are in ``otel_ebpf_receiver/cli/blocklist.py``.

Every change can be reported through ``on_event(name, attributes)``; the agent wires that to OpenTelemetry
logs. Changes made by another process (the CLI while the agent runs) are noticed through the sidecar and
reported by the agent with ``blocklist.origin = external``.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

from ...durations import MAX_SECONDS
from ...kernel import bpfsys
from .lists import (ALLOW, BLOCK, DEFAULT_ALLOWLIST_ENTRIES, DEFAULT_BLOCKLIST_ENTRIES, DEFAULT_PIN_DIR,
                    DEFAULT_STATE_DIR, LIST_MAPS, PRESENT_INDEX, PRESENT_MAP, VALUE, BlocklistError, Entry, ListFull,
                    Network, ProtectedAddressCovered, decode, encode, map_for, mono_ns_to_wall, parse_cidr,
                    wall_to_mono_ns)
from .pins import (Migration, bpffs_mounted, check_pin_dir, has_entries, mark_present, migrate_legacy_hosts,
                   open_pinned_map, open_present, present_flags)
from .feed import IMPORT_BATCH_LINES, ImportResult, feed_lines
from .protected import ProtectedAddresses
from .sidecar import Sidecar

EventSink = Callable[[str, dict[str, Any]], None]

class Blocklist:
    """The pinned lists plus their sidecar. Usable by the agent and by one-shot CLI commands alike.

    ``blocklist_entries`` (per map) and ``allowlist_entries`` (per family): None adopts whatever the pinned maps
    have (and uses the defaults when creating them), which is what CLI verbs want. The agent passes its settings
    so that a map of another size is refused rather than silently used.

    ``reconcile`` walks every map once to bring the sidecar in step (entries added with bpftool, entries the
    kernel already treats as expired); the agent does it at start, one-shot CLI changes skip it.

    ``protected_netns``: the network namespaces whose addresses and gateways a block must not cover (None is
    ours; the agent adds the one its interfaces live in); read on first need. ``watch_protected`` keeps them
    current for a long-lived user (the agent); a CLI verb reads them once.

    ``replaces_program``: the caller attaches its own program right after opening (the agent), so a pin set of
    the previous layout is migrated even while a previous version's program still uses it (see pins.py).
    """

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, state_dir: str = DEFAULT_STATE_DIR, *,
                 blocklist_entries: int | None = None, allowlist_entries: int | None = None,
                 create: bool = True, reconcile: bool = True, on_event: EventSink | None = None,
                 protected_netns: Sequence[str | None] = (None,), watch_protected: bool = False,
                 replaces_program: bool = False) -> None:
        self.pin_dir = check_pin_dir(pin_dir)
        self.state_dir = Path(state_dir)
        self.sidecar = Sidecar(self.pin_dir, state_dir)
        self.on_event = on_event
        self.protected_netns = list(protected_netns)
        self.watch_protected = watch_protected
        self._protected: ProtectedAddresses | None = None
        self._fds: dict[str, int] = {}
        self._counts: tuple[Any, dict[tuple[str, int], int]] | None = None
        self.created = False
        self.expired_on_open: list[str] = []  # entries whose TTL passed while nobody had the lists open
        self.refused_on_restore: list[tuple[str, str]] = []  # (cidr, why) sidecar rows not put back
        self.migrated: Migration | None = None  # what was moved over from the previous layout, if anything
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
            with self.sidecar.locked():
                self.migrated = migrate_legacy_hosts(self.pin_dir, sizes[BLOCK], old_program_ok=replaces_program)
                for spec in LIST_MAPS:
                    fd, created = open_pinned_map(
                        os.path.join(self.pin_dir, spec.name), spec.layout(sizes[spec.kind]),
                        create_entries=(sizes[spec.kind] or defaults[spec.kind]) if create else None, name=spec.name)
                    self._fds[spec.name] = fd
                    self.created |= created
                self._fds[PRESENT_MAP], _ = open_present(self.pin_dir, create=create)
                self._flag_nonempty_maps()
                self._load_meta()
                if self.created:
                    self._restore_from_sidecar()
                if reconcile or self.created or self.migrated is not None:
                    self._reconcile()
        except BaseException:
            self.close()
            raise

    # -- lifecycle --------------------------------------------------------------------------------------------
    def close(self) -> None:
        for fd in self._fds.values():
            bpfsys.close(fd)
        self._fds.clear()
        if self._protected is not None:
            self._protected.close()
            self._protected = None

    def __enter__(self) -> "Blocklist":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map_fd(self, name: str) -> int:
        return self._fds[name]

    # -- changes ----------------------------------------------------------------------------------------------
    def block(self, cidr: str, ttl: float | None = None, reason: str | None = None, *, force: bool = False) -> Entry:
        """Block a source address or prefix; an existing entry gets the new TTL and reason and keeps its hits.
        A prefix that covers a protected address (loopback, this host, a gateway, DNS, the Collector) raises
        ProtectedAddressCovered unless ``force``."""
        net = parse_cidr(cidr)
        forced = self._guard(net, force)
        with self.sidecar.locked():
            self._load_meta()
            entry = self._add(BLOCK, net, ttl, reason, forced=forced)
            self.sidecar.save()
        return entry

    def unblock(self, cidr: str) -> bool:
        """True when the prefix was blocked."""
        net = parse_cidr(cidr)
        with self.sidecar.locked():
            self._load_meta()
            removed = self._remove(BLOCK, net, "unblock")
            self.sidecar.save()
        return removed

    def allow(self, cidr: str, reason: str | None = None, ttl: float | None = None) -> Entry:
        """Allowlisted sources always pass, even when a blocklist entry covers them."""
        net = parse_cidr(cidr)
        with self.sidecar.locked():
            self._load_meta()
            entry = self._add(ALLOW, net, ttl, reason)
            self.sidecar.save()
        return entry

    def disallow(self, cidr: str) -> bool:
        net = parse_cidr(cidr)
        with self.sidecar.locked():
            self._load_meta()
            removed = self._remove(ALLOW, net, "disallow")
            self.sidecar.save()
        return removed

    def import_file(self, path: str, ttl: float | None = None, reason: str | None = None, *,
                    force: bool = False) -> ImportResult:
        """Block every address or prefix of a file: one per line, ``#`` starts a comment, blank lines are fine,
        ``-`` reads stdin. Entries already blocked are skipped, not refreshed, so re-importing a feed is idempotent
        and keeps their TTLs. Lines covering a protected address are skipped unless ``force``.

        The file is streamed in batches of IMPORT_BATCH_LINES, the lock taken per batch: a running agent expires
        entries between batches instead of waiting for a whole feed. Lines are bounded (MAX_LINE_BYTES)."""
        try:
            stream: BinaryIO = sys.stdin.buffer if path == "-" else open(path, "rb")
        except OSError as exc:
            raise BlocklistError(f"cannot read {path}: {exc.strerror}") from None
        result = ImportResult()
        seen: dict[str, int] = {}
        why = reason or f"imported from {os.path.basename(path) if path != '-' else 'stdin'}"
        lines = feed_lines(stream)
        try:
            full = False
            while not full:
                try:
                    batch = list(itertools.islice(lines, IMPORT_BATCH_LINES))  # read outside the lock
                except OSError as exc:
                    raise BlocklistError(f"cannot read {path}: {exc.strerror}") from None
                if not batch:
                    break
                with self.sidecar.locked():
                    self._load_meta()
                    added_before = len(result.added)
                    try:
                        full = self._import_batch(batch, ttl, why, force, seen, result)
                    finally:
                        if len(result.added) > added_before:
                            self.sidecar.save()
        finally:
            if path != "-":
                stream.close()
        self._emit("otel_ebpf_receiver.blocklist.import", {
            "blocklist.file": str(path), "blocklist.added": len(result.added),
            "blocklist.skipped": result.skipped_count})
        return result

    def _import_batch(self, batch: list[tuple[int, str, str | None]], ttl: float | None, reason: str, force: bool,
                      seen: dict[str, int], result: ImportResult) -> bool:
        """One batch under the lock; True when the list filled up (the import stops there)."""
        for lineno, line, unusable in batch:
            if unusable:
                result.skip(lineno, line, unusable)
                continue
            item = line.split("#", 1)[0].strip()
            if not item:
                continue
            try:
                net = parse_cidr(item)
                cidr = str(net)
                if cidr in seen:
                    result.skip(lineno, item, f"duplicate of line {seen[cidr]}", invalid=False)
                    continue
                seen[cidr] = lineno
                if self._lookup(BLOCK, net) is not None:
                    result.skip(lineno, item, "already blocked", invalid=False)
                    continue
                forced = self._guard(net, force)
                self._add(BLOCK, net, ttl, reason, emit=False, forced=forced)
                result.added.append(cidr)
            except ListFull as exc:
                result.skip(lineno, item, str(exc))
                return True
            except BlocklistError as exc:
                result.skip(lineno, item, str(exc))
        return False

    def expire(self, now: float | None = None) -> list[str]:
        """Remove entries whose TTL has passed (the kernel already ignores them); returns their prefixes.
        Cheap when nothing is due: the sidecar is re-read only when another process changed it."""
        now = time.time() if now is None else now
        with self.sidecar.locked():
            self._load_meta(report_external=True)
            due = [(kind, cidr) for kind in (BLOCK, ALLOW) for cidr, m in self.sidecar.rows[kind].items()
                   if m.get("expires_at") is not None and m["expires_at"] <= now]
            for kind, cidr in due:
                self._remove(kind, parse_cidr(cidr), "expire")
            if due:
                self.sidecar.save()
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
                value = bpfsys.map_lookup(fd, raw, VALUE.size)
                if value is not None:
                    out.append(self._entry(kind, decode(spec.name, raw), VALUE.unpack(value)))
        out.sort(key=lambda e: (ipaddress.ip_network(e.cidr).version, ipaddress.ip_network(e.cidr)))
        return out

    def lookup(self, cidr: str, kind: str = BLOCK) -> Entry | None:
        """The entry for exactly this prefix (not the longest match), or None."""
        net = parse_cidr(cidr)
        value = self._lookup(kind, net)
        if value is None:
            return None
        self._refresh_if_changed()
        if str(net) not in self.sidecar.rows[kind]:
            # Another process (the agent, a CLI call) writes the map entry first and the sidecar right after,
            # under the lock: taking the lock waits for its sidecar, so the entry comes with its reason and TTL.
            with self.sidecar.locked():
                self._load_meta(report_external=True)
        return self._entry(kind, net, value)

    def cidrs(self, kind: str = BLOCK) -> list[str]:
        """The prefixes of a list, from the sidecar kept in step with the maps (no map walk)."""
        self._refresh_if_changed()
        return list(self.sidecar.rows[kind])

    def count_with_reason(self, prefix: str, kind: str = BLOCK) -> int:
        """Entries whose reason starts with ``prefix`` (mitigation counts its own, "auto:"), without a map walk."""
        self._refresh_if_changed()
        return sum(1 for meta in self.sidecar.rows[kind].values() if (meta.get("reason") or "").startswith(prefix))

    def protected_addresses(self) -> ProtectedAddresses:
        """What a block must not cover, read on first need (and kept current when ``watch_protected``)."""
        if self._protected is None:
            self._protected = ProtectedAddresses(self.protected_netns, watch=self.watch_protected)
        else:
            self._protected.refresh()
        return self._protected

    def counts(self) -> dict[tuple[str, int], int]:
        """Entries per (list, IP version), from the sidecar kept in step with the maps (no map walk, so cheap
        enough for every interval)."""
        self._refresh_if_changed()
        if self._counts is not None and self._counts[0] == self.sidecar.stamp:
            return dict(self._counts[1])
        out = {(kind, family): 0 for kind in (BLOCK, ALLOW) for family in (4, 6)}
        for kind in (BLOCK, ALLOW):
            for cidr in self.sidecar.rows[kind]:
                out[(kind, 6 if ":" in cidr else 4)] += 1
        self._counts = (self.sidecar.stamp, out)
        return dict(out)

    # -- internals ----------------------------------------------------------------------------------------------
    def _entry(self, kind: str, net: Network, value: tuple[int, int, int]) -> Entry:
        hits, last_hit_ns, expires_ns = value
        meta = self.sidecar.rows[kind].get(str(net), {})
        expires_at = meta.get("expires_at")
        if expires_at is None and expires_ns:
            expires_at = mono_ns_to_wall(expires_ns)
        return Entry(str(net), kind, hits, mono_ns_to_wall(last_hit_ns) if last_hit_ns else None,
                     meta.get("reason"), meta.get("added_at"), expires_at)

    def _lookup(self, kind: str, net: Network) -> tuple[int, int, int] | None:
        name = map_for(kind, net)
        value = bpfsys.map_lookup(self._fds[name], encode(name, net), VALUE.size)
        return VALUE.unpack(value) if value is not None else None

    def _guard(self, net: Network, force: bool, *, check_reads: bool = True) -> bool:
        """Refuse a block that would cut this host off; True when only ``force`` let it through (the sidecar
        marks such an entry, so that a restore puts it back as it was forced). With ``check_reads`` a host whose
        addresses cannot be read refuses too (nothing can be checked); the restore passes False and checks
        against what could be read."""
        if net.prefixlen == 0:
            raise BlocklistError(f"refusing to block every IPv{net.version} source ({net}); block narrower prefixes")
        protected = self.protected_addresses()
        covered = protected.covering(net)
        if covered is not None:
            if not force:
                address, why = covered
                raise ProtectedAddressCovered(f"refusing to block {net}: it covers {address} ({why}); "
                                              f"pass --force if that is what you want")
            return True
        if protected.error and check_reads and not force:
            raise BlocklistError(f"{protected.error}; without them {net} cannot be checked: pass --force to "
                                 f"block it anyway")
        return bool(protected.error and force)

    def _add(self, kind: str, net: Network, ttl: float | None, reason: str | None, *, emit: bool = True,
             forced: bool = False) -> Entry:
        if kind == BLOCK and net.prefixlen == 0:
            raise BlocklistError(f"refusing to block every IPv{net.version} source ({net}); block narrower prefixes")
        if ttl is not None and not (math.isfinite(ttl) and 0 < ttl <= MAX_SECONDS):
            raise BlocklistError(f"ttl {ttl!r}: must be more than zero and at most ten years")
        now = time.time()
        expires_at = now + ttl if ttl is not None else None
        name = map_for(kind, net)
        fd = self._fds[name]
        key = encode(name, net)
        old = self._lookup(kind, net)
        hits, last_hit_ns = (old[0], old[1]) if old else (0, 0)
        # Hits are carried over; a packet counted between our read and this write is lost (rare, harmless).
        value = VALUE.pack(hits, last_hit_ns, wall_to_mono_ns(expires_at) if expires_at else 0)
        try:
            mark_present(self._fds[PRESENT_MAP], name)  # before the entry: the program must never skip its map
            bpfsys.map_update(fd, key, value)
        except bpfsys.BpfError as exc:
            if exc.errno in (errno.ENOSPC, errno.E2BIG, errno.ENOMEM):
                size = bpfsys.map_info(fd).max_entries
                raise ListFull(f"{name} is full ({size} entries); raise probe_settings.xdp.{kind}list_entries "
                                f"and remove the pin to resize it") from None
            raise BlocklistError(f"cannot update {name}: {exc.strerror}") from None
        cidr = str(net)
        previous = self.sidecar.rows[kind].get(cidr, {})
        meta = {"reason": reason if reason is not None else previous.get("reason"),
                "added_at": previous.get("added_at") or now, "expires_at": expires_at}
        if forced:
            meta["forced"] = True
        self.sidecar.rows[kind][cidr] = meta
        if emit:
            attrs: dict[str, Any] = {"blocklist.cidr": cidr, "blocklist.list": kind}
            if meta["reason"]:
                attrs["blocklist.reason"] = meta["reason"]
            if ttl is not None:
                attrs["blocklist.ttl_s"] = float(ttl)
            self._emit(f"otel_ebpf_receiver.blocklist.{kind}", attrs)
        return Entry(cidr, kind, hits, mono_ns_to_wall(last_hit_ns) if last_hit_ns else None,
                     meta["reason"], meta["added_at"], expires_at)

    def _remove(self, kind: str, net: Network, event: str) -> bool:
        cidr = str(net)
        name = map_for(kind, net)
        value = self._lookup(kind, net)
        removed = bpfsys.map_delete(self._fds[name], encode(name, net))
        meta = self.sidecar.rows[kind].pop(cidr, None)
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
        """Maps were just created (first run, or bpffs emptied by a reboot): put back what has not expired, with
        the checks ``block`` makes — a sidecar edited by hand, or a host whose addresses changed across the reboot,
        must not lock the host out. Rows marked ``forced`` were a deliberate choice and go back as they were
        (``/0`` never does). Refused rows are reported, and dropped from the sidecar by _reconcile."""
        now = time.time()
        for kind in (BLOCK, ALLOW):
            for cidr, meta in list(self.sidecar.rows[kind].items()):
                expires_at = meta.get("expires_at")
                if expires_at is not None and expires_at <= now:
                    continue  # _reconcile drops the row
                try:
                    net = parse_cidr(cidr)
                    if kind == BLOCK:
                        self._guard(net, bool(meta.get("forced")), check_reads=False)
                    if self._lookup(kind, net) is None:
                        name = map_for(kind, net)
                        mark_present(self._fds[PRESENT_MAP], name)
                        bpfsys.map_update(self._fds[name], encode(name, net),
                                          VALUE.pack(0, 0, wall_to_mono_ns(expires_at) if expires_at else 0))
                except (BlocklistError, bpfsys.BpfError, TypeError, ValueError, OverflowError) as exc:
                    why = str(exc) if isinstance(exc, BlocklistError) else f"unusable row ({exc})"
                    self.refused_on_restore.append((cidr, why))
                    self._emit("otel_ebpf_receiver.blocklist.restore_refused",
                               {"blocklist.cidr": cidr, "blocklist.list": kind, "blocklist.reason": why})

    def present(self) -> dict[str, bool]:
        """The "present" flag of each blocklist map (set once it held an entry; never cleared)."""
        return present_flags(self._fds[PRESENT_MAP])

    def _flag_nonempty_maps(self) -> None:
        """Set the flag of any blocklist map that holds an entry without it (put there with bpftool, or by a
        pin set whose flags were lost): one GET_NEXT_KEY per unflagged map."""
        flags = self.present()
        for spec in LIST_MAPS:
            if spec.name in PRESENT_INDEX and not flags[spec.name] and has_entries(self._fds[spec.name],
                                                                                     spec.key.size):
                mark_present(self._fds[PRESENT_MAP], spec.name)

    def _reconcile(self) -> None:
        """Make the sidecar describe exactly the maps: drop rows whose key is gone, add rows (no reason) for keys
        someone put there with bpftool, and remove entries the kernel already treats as expired."""
        now_mono = time.monotonic_ns()
        changed = False
        present: dict[str, set[str]] = {BLOCK: set(), ALLOW: set()}
        for spec in LIST_MAPS:
            fd = self._fds[spec.name]
            for raw in bpfsys.map_keys(fd, spec.key.size):
                net = decode(spec.name, raw)
                value = bpfsys.map_lookup(fd, raw, VALUE.size)
                if value is not None:
                    expires_ns = VALUE.unpack(value)[2]
                    if expires_ns and expires_ns <= now_mono:
                        self._remove(spec.kind, net, "expire")
                        self.expired_on_open.append(str(net))
                        changed = True
                        continue
                present[spec.kind].add(str(net))
                if str(net) not in self.sidecar.rows[spec.kind]:
                    self.sidecar.rows[spec.kind][str(net)] = {"reason": None, "added_at": None, "expires_at": None}
                    changed = True
        for kind in (BLOCK, ALLOW):
            for cidr in [c for c in self.sidecar.rows[kind] if c not in present[kind]]:
                del self.sidecar.rows[kind][cidr]
                changed = True
        if changed or self.sidecar.file_stamp() is None:
            self.sidecar.save()

    # -- the sidecar ------------------------------------------------------------------------------------------
    def _load_meta(self, report_external: bool = False) -> None:
        """Bring the sidecar rows up to date; with ``report_external``, report what another process changed."""
        for kind, cidr, row in self.sidecar.load():
            if not report_external:
                continue
            attrs = {"blocklist.cidr": cidr, "blocklist.list": kind, "blocklist.origin": "external"}
            if row is None:
                self._emit(f"otel_ebpf_receiver.blocklist.{'unblock' if kind == BLOCK else 'disallow'}", attrs)
                continue
            if row.get("reason"):
                attrs["blocklist.reason"] = row["reason"]
            self._emit(f"otel_ebpf_receiver.blocklist.{kind}", attrs)

    def _refresh_if_changed(self) -> None:
        if self.sidecar.changed:
            with self.sidecar.locked():
                self._load_meta(report_external=True)
