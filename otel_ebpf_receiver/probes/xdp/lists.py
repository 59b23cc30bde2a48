"""What a list entry is, as users see it and as bpf/xdp.bpf.c keys it: addresses and prefixes, their map and key
encoding (struct addr4, addr16, lpm4_key, lpm6_key; list_entry values), the layouts every pinned list map must
have, and the "present" flags that let the pass path skip a map that never held an entry.

The layout changed once: single addresses used to live in one ``block_hosts`` hash keyed by 16 bytes (IPv4 as
``::ffff:a.b.c.d``); they now live in ``block_hosts4`` (4-byte keys: the hash of an IPv4 lookup covers 4 bytes,
as xdp-filter's does) and ``block_hosts6``. pins.py moves a pin set of the previous layout over (LEGACY_HOSTS)."""

from __future__ import annotations

import ipaddress
import re
import struct
import time
from dataclasses import dataclass
from typing import Union

from ...errors import AgentError
from ...kernel import bpfsys

DEFAULT_PIN_DIR = "/sys/fs/bpf/otel-ebpf-receiver"
DEFAULT_STATE_DIR = "/var/lib/otel-ebpf-receiver"
DEFAULT_BLOCKLIST_ENTRIES = 100_000  # per map: single addresses, IPv4 prefixes, IPv6 prefixes
DEFAULT_ALLOWLIST_ENTRIES = 10_000   # per family

BLOCK = "block"
ALLOW = "allow"

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class BlocklistError(AgentError):
    """A user-facing error: ``str(exc)`` is one line saying what is wrong and what to do."""


class ListFull(BlocklistError):
    """The map for this entry has no room left."""


class ProtectedAddressCovered(BlocklistError):
    """The entry would cover loopback, this host, a gateway, a DNS resolver or the Collector (needs ``force``)."""


# Layouts shared with bpf/xdp.bpf.c: struct addr4, addr16, lpm4_key, lpm6_key, list_entry. Kept here by hand because
# the CLI packs them without bcc; the agent compares them with the program's types when it loads (probe.py).
HOST4_KEY = struct.Struct("=4s")
HOST6_KEY = struct.Struct("=16s")
KEY4 = struct.Struct("=I4s")
KEY6 = struct.Struct("=I16s")
VALUE = struct.Struct("=QQQ")  # hits, last_hit_ns, expires_ns (CLOCK_MONOTONIC, 0 = never)
# The C field each item packs, in order.
FIELD_NAMES = {HOST4_KEY: ("addr",), HOST6_KEY: ("w",), KEY4: ("prefixlen", "addr"), KEY6: ("prefixlen", "addr"),
               VALUE: ("hits", "last_hit_ns", "expires_ns")}


def field_offsets(layout: struct.Struct) -> dict[str, tuple[int, int]]:
    """C field name -> (offset, size) of each item of a packed layout (``=`` formats: no padding)."""
    items = re.findall(r"\d*[a-zA-Z]", layout.format.lstrip("=<>!@"))
    out, offset = {}, 0
    for name, item in zip(FIELD_NAMES[layout], items, strict=True):
        size = struct.calcsize("=" + item)
        out[name] = (offset, size)
        offset += size
    return out
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


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
        return MapLayout(self.map_type, self.key.size, VALUE.size, max_entries, bpfsys.BPF_F_NO_PREALLOC)


LIST_MAPS = (
    ListMap("block_hosts4", BLOCK, bpfsys.MAP_TYPE_HASH, HOST4_KEY),
    ListMap("block_hosts6", BLOCK, bpfsys.MAP_TYPE_HASH, HOST6_KEY),
    ListMap("block_v4", BLOCK, bpfsys.MAP_TYPE_LPM_TRIE, KEY4),
    ListMap("block_v6", BLOCK, bpfsys.MAP_TYPE_LPM_TRIE, KEY6),
    ListMap("allow_v4", ALLOW, bpfsys.MAP_TYPE_LPM_TRIE, KEY4),
    ListMap("allow_v6", ALLOW, bpfsys.MAP_TYPE_LPM_TRIE, KEY6),
)

# "Present" flags (the C file's PRESENT_*): one u32 per blocklist map in the pinned array ``list_present``, set to 1
# before the first entry goes into that map and never cleared. The program skips a map whose flag is 0, so the
# pass path of a host with no prefix (or no single address) listed pays no lookup for it. Only ever set: a stale
# "present" costs one lookup, while a cleared flag racing with an insert could let a blocked source through. One
# element per flag, each written whole with 1, so two writers can never undo each other's flag.
PRESENT_MAP = "list_present"
PRESENT_INDEX = {"block_hosts4": 0, "block_hosts6": 1, "block_v4": 2, "block_v6": 3}
PRESENT_LAYOUT = MapLayout(bpfsys.MAP_TYPE_ARRAY, 4, 4, len(PRESENT_INDEX), 0)
PRESENT_VALUE = struct.Struct("=I")

# The previous layout's single-address map (16-byte keys, IPv4 as ::ffff:a.b.c.d), migrated by pins.py.
LEGACY_HOSTS = "block_hosts"
LEGACY_HOSTS_LAYOUT = MapLayout(bpfsys.MAP_TYPE_HASH, 16, VALUE.size, None, bpfsys.BPF_F_NO_PREALLOC)

MAP_NAMES = tuple(m.name for m in LIST_MAPS) + (PRESENT_MAP, LEGACY_HOSTS)



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
    if "%" in raw:
        # A zone ID names a link, not a source: "fe80::1%eth0" and "fe80::1" are the same key in the maps.
        addr, _, rest = raw.partition("%")
        zone, _, plen = rest.partition("/")
        bare = addr + (f"/{plen}" if plen else "")
        raise BlocklistError(f"{raw!r}: a zone ID (%{zone}) is not part of a source address; "
                             f"write {bare} (it applies on every watched interface)")
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


def map_for(kind: str, net: Network) -> str:
    if kind == BLOCK and net.prefixlen == net.max_prefixlen:
        return f"block_hosts{net.version}"
    return f"{kind}_v{net.version}"


def encode(map_name: str, net: Network) -> bytes:
    if map_name.startswith("block_hosts"):
        return net.network_address.packed
    if net.version == 4:
        return KEY4.pack(net.prefixlen, net.network_address.packed)
    return KEY6.pack(net.prefixlen, net.network_address.packed)


def decode(map_name: str, raw: bytes) -> Network:
    if map_name == "block_hosts4":
        return ipaddress.IPv4Network(raw[:4])
    if map_name in ("block_hosts6", LEGACY_HOSTS):
        addr = raw[:16]
        if addr[:12] == _V4_MAPPED:  # the previous layout's IPv4 keys
            return ipaddress.IPv4Network(addr[12:16])
        return ipaddress.IPv6Network(addr)
    if map_name.endswith("_v4"):
        plen, addr = KEY4.unpack(raw)
        return ipaddress.IPv4Network((ipaddress.IPv4Address(addr), plen))
    plen, addr = KEY6.unpack(raw)
    return ipaddress.IPv6Network((ipaddress.IPv6Address(addr), plen))


# ---- time -------------------------------------------------------------------------------------------------

def wall_to_mono_ns(wall: float) -> int:
    """The kernel compares against CLOCK_MONOTONIC_COARSE (bpf_ktime_get_coarse_ns: CLOCK_MONOTONIC to the last
    tick, a few ms behind); wall-clock expiries are converted at write time."""
    return max(1, time.monotonic_ns() + int((wall - time.time()) * 1e9))


def mono_ns_to_wall(ns: int) -> float:
    return time.time() - (time.monotonic_ns() - ns) / 1e9


