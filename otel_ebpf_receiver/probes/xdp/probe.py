"""xdp: received traffic by protocol, TCP flags, frame sizes and sources, and a pinned source blocklist.

The C side is bpf/xdp.bpf.c (read its header for the per-packet path). This side attaches it to the configured
interfaces — native (driver) mode first, generic (skb) mode when the driver has no XDP — and each interval:

* bumps the epoch in ``xdp_config`` (per-source windows; list TTLs run on the kernel's clock, see the C file),
* reads the per-interface totals (per-CPU) and the per-source table (one batch read into numpy; what the windows
  mean, and how they are sampled under floods, is in sources.py),
* sets the per-source sampling shift of the next window from this window's packet rate,
* expires blocklist entries whose TTL passed, and reports how many entries each list holds.

Attachments and pins. The program is attached through netlink, so it stays attached if the agent dies without
closing (kill -9, OOM): the blocklist keeps dropping while the agent is down — for a blocklist, failing closed is
the point. The next agent finds our program on the interface and replaces it in place, adopting the pinned lists.
A clean :meth:`close` detaches the program; the list maps stay pinned (``otel-ebpf-receiver blocklist`` keeps
working, and the next start enforces them again). A foreign XDP program on an interface is never replaced.

The interfaces may live in another network namespace (setting ``netns``, e.g. the scenario lab's victim): the
loading thread enters it only to resolve names and attach or detach; programs and maps are not per-namespace.
A read costs ~20 ms of CPU with a full 65,536-entry per-source table, ~1 ms when it is nearly empty.

Longer than usual because the probe owns both halves of its life — attaching through netlink in native or generic
mode, adopting or refusing what is already on an interface, in another namespace — and the per-window read of three
maps; the lists and the per-source windows live in the sibling modules.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from typing import Any, Mapping

import numpy as np

from ...kernel import bpfsys
from ...kernel.maps import MapSnapshot
from ...kernel.netns import NetnsError, in_netns
from ..base import (COUNTER, GAUGE, HISTOGRAM, CounterDeltas, Feature, Metric, Probe, Reading, TopItem, damped_share,
                    log1p_rate, ratio)
from .sources import (SourceRate, SourceWindows, sample_mask, sample_shift, size_counts,  # noqa: F401 (re-exported)
                      source_address)
from ..contract import U32, U64, MapContract, check_struct_offsets, dtype, value_type
from .blocklist import Blocklist
from .lists import (ALLOW, BLOCK, DEFAULT_ALLOWLIST_ENTRIES, DEFAULT_BLOCKLIST_ENTRIES, DEFAULT_PIN_DIR,
                    DEFAULT_STATE_DIR, LIST_MAPS, PRESENT_INDEX, PRESENT_LAYOUT, PRESENT_MAP, VALUE, BlocklistError,
                    field_offsets)
from .pins import bpffs_mounted, check_pin_dir

PROGRAM = "otel_ebpf_xdp"  # the C function; also the kernel's program name, used to recognise our orphans

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2

# Index -> attribute value of the C file's FAM_*, L4_*, FLAG_* and VERDICT_* constants (compared with it at load).
FAMILIES = ("other", "ipv4", "ipv6")      # FAM_*
TRANSPORTS = ("other", "tcp", "udp", "icmp")  # L4_*; "icmp" is ICMPv6 for IPv6
TCP_FLAGS = ("syn", "syn_ack", "rst", "fin")  # FLAG_*
VERDICTS = ("pass", "drop", "allow")  # VERDICT_*
# A window with one stray SYN read as a SYN share of 1.0, a SYN flood's. With 20 clean segments a second assumed, it
# reads 0.05; a flood (10^4-10^5 segments a second) or 200 refused connects a second move by under 10 %.
SYN_SHARE_PRIOR_SEGMENTS = 20
PROTO_SLOTS = len(FAMILIES) * len(TRANSPORTS)  # packets and bytes per family x transport: slot = fam * 4 + l4
SIZE_SLOTS = 17
SIZE16_SLOTS = 128  # struct totals' size16[i] (lengths [16 i, 16 i + 16)) belongs to log2 slot floor(log2(16 i)) + 1
_SIZE16_TO_LOG2 = np.array([0] + [(16 * i).bit_length() for i in range(1, SIZE16_SLOTS)])
# Attributes with no semantic-convention equivalent, in our namespace.
TCP_FLAG = "otel_ebpf_receiver.tcp.flag"
XDP_VERDICT = "otel_ebpf_receiver.xdp.verdict"

# struct config (epoch, sample_shift, sample_mask), in the 1-entry array this side creates and the program reads as a
# direct map value (the C file says why); its size and the mask's offset are in C_CONSTANTS.
CONFIG = struct.Struct("=IIQ")

C_CONSTANTS = {
    **{f"FAM_{name.upper()}": i for i, name in enumerate(FAMILIES)},
    **{f"L4_{name.upper()}": i for i, name in enumerate(TRANSPORTS)},
    **{f"FLAG_{name.replace('_', '').upper()}": i for i, name in enumerate(TCP_FLAGS)},
    **{f"VERDICT_{name.upper()}": i for i, name in enumerate(VERDICTS)},
    "PROTO_SLOTS": PROTO_SLOTS, "SIZE_SLOTS": SIZE_SLOTS, "SIZE16_SLOTS": SIZE16_SLOTS,
    **{f"PRESENT_{name.removeprefix('block_').upper()}": i for name, i in PRESENT_INDEX.items()},
    "PRESENT_SLOTS": len(PRESENT_INDEX),
    "XDP_CONFIG_SIZE": CONFIG.size, "XDP_CONFIG_MASK_AT": 8,  # struct config as CONFIG packs it
}
# struct totals (per interface slot and CPU), struct src_stats and struct config, as Python reads them: the layouts
# themselves come from bcc's types (see load()).
MAPS = {
    "xdp_totals": MapContract(value={
        "packets": f"({PROTO_SLOTS},)<u8", "bytes": f"({PROTO_SLOTS},)<u8", "tcp_flags": f"({len(TCP_FLAGS)},)<u8",
        "size_log2": f"({SIZE_SLOTS},)<u8", "verdicts": f"({len(VERDICTS)},)<u8", "malformed": U64,
        "src_inserts": U64, "src_update_failures": U64, "src_sampled": U64, "size16": f"({SIZE16_SLOTS},)<u8"}),
    "per_source": MapContract(key="(16,)u1",  # struct addr16, read as bytes
                              value={"win": (2, {"packets": U64, "bytes": U64, "syns": U64, "epoch": U32})}),
}


def protocol_attributes(slot: int) -> dict[str, str]:
    """A packets/bytes slot of struct totals (fam * 4 + l4) -> network.type and network.transport."""
    return {"network.type": FAMILIES[slot // len(TRANSPORTS)], "network.transport": TRANSPORTS[slot % len(TRANSPORTS)]}


class XdpProbe(Probe):
    name = "xdp"
    summary = "received packets by protocol, TCP flags, sizes, top sources; pinned source blocklist (XDP)"
    hooks = ()
    metrics = (
        Metric("system.network.io", COUNTER, "By", "Bytes received on the watched interfaces (seen by XDP).",
               ("network.interface.name", "network.io.direction")),
        # The semantic convention names the interface system.device on this one metric (network.interface.name on
        # system.network.io): both are set as it says, so each matches what other sources of the same metric send.
        Metric("system.network.packet.count", COUNTER, "{packet}", "Packets received on the watched interfaces.",
               ("system.device", "network.io.direction")),
        Metric("otel_ebpf_receiver.xdp.packets", COUNTER, "{packet}",
               "Received packets by network family and transport protocol (icmp is ICMPv6 for ipv6).",
               ("network.interface.name", "network.type", "network.transport")),
        Metric("otel_ebpf_receiver.xdp.io", COUNTER, "By", "Received bytes by network family and transport protocol.",
               ("network.interface.name", "network.type", "network.transport")),
        Metric("otel_ebpf_receiver.xdp.tcp_flags", COUNTER, "{packet}",
               "Received TCP segments with SYN (no ACK), SYN-ACK, RST or FIN set.", ("network.interface.name", TCP_FLAG)),
        Metric("otel_ebpf_receiver.xdp.verdicts", COUNTER, "{packet}",
               "What the program did: pass (no list matched), drop (blocklisted), allow (blocklisted but allowlisted).",
               ("network.interface.name", XDP_VERDICT)),
        Metric("otel_ebpf_receiver.xdp.dropped_packets", COUNTER, "{packet}", "Packets dropped by the blocklist.",
               ("network.interface.name",)),
        Metric("otel_ebpf_receiver.xdp.malformed_packets", COUNTER, "{packet}",
               "Truncated or malformed frames (passed untouched to the kernel's stack).", ("network.interface.name",)),
        Metric("otel_ebpf_receiver.xdp.packet.size", HISTOGRAM, "By",
               "Received frame sizes (log2 buckets; count and sum exact, bucket shares sampled under floods).",
               ("network.interface.name",)),
        Metric("otel_ebpf_receiver.xdp.blocklist_entries", GAUGE, "{entry}", "Blocklist entries (addresses and prefixes).",
               ("network.type",)),
        Metric("otel_ebpf_receiver.xdp.allowlist_entries", GAUGE, "{entry}", "Allowlist entries.", ("network.type",)),
        Metric("otel_ebpf_receiver.xdp.sources", GAUGE, "{source}",
               "Distinct source addresses with passed traffic this interval (estimate under floods larger than the table)."),
        Metric("otel_ebpf_receiver.xdp.top_source.packet_rate", GAUGE, "{packet}/s",
               "Packet rate of the busiest sources this interval (top N only, bounded cardinality).", ("source.address",)),
    )
    features = (
        Feature("xdp.packets_rate_log1p", "log1p(received packets per second)"),
        Feature("xdp.bytes_rate_log1p", "log1p(received bytes per second)"),
        # UDP apart: a flood of small datagrams moves few bytes, and a host that answers no UDP sees almost none.
        Feature("xdp.udp_rate_log1p", "log1p(received UDP datagrams per second)"),
        Feature("xdp.syn_ratio",
                f"SYN (without ACK) / (received TCP segments + {SYN_SHARE_PRIOR_SEGMENTS} a second): damped when quiet"),
        Feature("xdp.syn_synack_imbalance", "log1p(SYN/s) - log1p(SYN-ACK/s) received: >0 more attempts than answers"),
        Feature("xdp.distinct_sources_log1p", "log1p(distinct source addresses per second)"),
        Feature("xdp.top_source_share", "share of passed packets sent by the busiest source"),
        Feature("xdp.drop_rate_log1p", "log1p(packets dropped by the blocklist per second)"),
    )

    defaults = {
        "interfaces": [],            # names, e.g. ["eth0"]; required
        "mode": "auto",              # auto | native | generic
        "netns": "",                 # the interfaces live in this network namespace (ip netns name or path)
        "per_source": True,          # per-source table; off: no top sources, no distinct count
        "per_source_exact_below": 50000,  # packets/s: above, per-source updates are sampled (sources.py); 0: never
        "per_source_entries": 65536,
        "blocklist_entries": DEFAULT_BLOCKLIST_ENTRIES,
        "allowlist_entries": DEFAULT_ALLOWLIST_ENTRIES,
        "top_sources": 10,
        "pin_dir": DEFAULT_PIN_DIR,
        "state_dir": DEFAULT_STATE_DIR,
    }
    maps = MAPS
    c_constants = C_CONSTANTS

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(settings)
        self.interfaces: list[str] = list(dict.fromkeys(self.settings["interfaces"]))
        self.netns: str = self.settings["netns"]
        self.blocklist: Blocklist | None = None
        self._attached: list[tuple[str, int, int]] = []  # (interface, flags, program id)
        self._ifindex: dict[str, int] = {}
        self._epoch = 1
        self._shift = 0  # per-source sampling shift of the current epoch (sources.py)
        self._ncpu = 1
        self._config_fd: int | None = None  # the xdp_config array (struct config), created before compiling
        self._snapshot: MapSnapshot | None = None
        self._deltas = CounterDeltas()
        self._passed: dict[tuple[str, int], float] = {}  # per slot: the pass verdict count, derived (_totals)
        self._evictions_total = 0
        self._window: SourceWindows | None = None  # the last closed window's sources
        self._totals_dtype: np.dtype | None = None  # struct totals, from bcc's type for xdp_totals
        self._window_dtype: np.dtype | None = None  # struct src_window, from bcc's type for per_source
        self.expired_at_start: list[str] = []

    # -- availability and settings ----------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not bpffs_mounted():
            return "bpffs is not mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf, or run deploy/host-setup.sh)"
        return None

    @classmethod
    def validate_settings(cls, settings: Mapping[str, Any], where: str) -> None:
        super().validate_settings(settings, where)
        from ...errors import ConfigError

        if settings.get("mode", "auto") not in ("auto", "native", "generic"):
            raise ConfigError(f"probe_settings.xdp.mode (from {where}) must be auto, native or generic")
        if not all(isinstance(i, str) and i for i in settings.get("interfaces", [])):
            raise ConfigError(f"probe_settings.xdp.interfaces (from {where}) must be a list of interface names")
        try:
            check_pin_dir(settings.get("pin_dir", DEFAULT_PIN_DIR))
        except BlocklistError as exc:
            raise ConfigError(f"probe_settings.xdp.{exc} (from {where})") from None

    def cflags(self) -> list[str]:
        slots = len(self.interfaces)
        expr = "".join(f"(i) == {self._ifindex[name]} ? {n} : " for n, name in enumerate(self.interfaces)) + str(slots)
        flags = [
            f"-DPER_SOURCE_ENTRIES={self.settings['per_source_entries']}",
            f"-DBLOCKLIST_ENTRIES={self.settings['blocklist_entries']}",
            f"-DALLOWLIST_ENTRIES={self.settings['allowlist_entries']}",
            f'-DPIN_DIR="{check_pin_dir(self.settings["pin_dir"])}"',
            f"-DIFACE_SLOTS={slots + 1}",
            f"-DIFACE_SLOT(i)=({expr})",
        ]
        if self._config_fd is not None:
            flags.append(f"-DXDP_CONFIG_FD={self._config_fd}")
        if not self.settings["per_source"]:
            flags.append("-DNO_PER_SOURCE")
        return flags

    # -- loading ----------------------------------------------------------------------------------------------
    def load(self) -> None:
        from bcc import BPF
        from bcc.utils import get_possible_cpus

        from ...errors import ProbeError

        if not self.interfaces:
            raise ProbeError("probe xdp disabled: no interface to watch; set probe_settings.xdp.interfaces, e.g. [eth0]")
        try:
            with in_netns(self.netns):
                for name in self.interfaces:
                    try:
                        self._ifindex[name] = socket.if_nametoindex(name)
                    except OSError:
                        where = f" in network namespace {self.netns}" if self.netns else ""
                        raise ProbeError(f"probe xdp disabled: interface {name} not found{where}") from None
        except NetnsError as exc:
            raise ProbeError(f"probe xdp disabled: {exc}") from None
        # The lists first: creates or adopts the pinned maps, refusing a layout that does not match ours, and
        # removes entries that expired while no agent ran — all before bcc sees the pins.
        try:
            self.blocklist = Blocklist(self.settings["pin_dir"], self.settings["state_dir"],
                                       blocklist_entries=self.settings["blocklist_entries"],
                                       allowlist_entries=self.settings["allowlist_entries"],
                                       on_event=self._event, protected_netns=[None, self.netns or None],
                                       watch_protected=True, replaces_program=True)
            self.expired_at_start = self.blocklist.expired_on_open + self.blocklist.expire()
            migrated = self.blocklist.migrated
            if migrated is not None:  # a pin set of the previous layout, moved over (pins.migrate_legacy_hosts)
                self._event("otel_ebpf_receiver.blocklist.migrate",
                            {"blocklist.moved": sum(migrated.moved.values()),
                             "blocklist.old_programs": len(migrated.old_programs)})
        except BlocklistError as exc:
            self.close()
            raise ProbeError(f"probe xdp disabled: {exc}") from None
        self._ncpu = len(get_possible_cpus())
        try:
            try:
                self._config_fd = bpfsys.map_create(bpfsys.MAP_TYPE_ARRAY, 4, CONFIG.size, 1, name="xdp_config")
            except bpfsys.BpfError as exc:
                raise ProbeError(f"probe xdp disabled: cannot create its config map: {exc.strerror}") from None
            super().load()
            self._write_config()
            fn = self.bpf.load_func(PROGRAM, BPF.XDP)
            for name in self.interfaces:
                self._attach(name, fn)
        except BaseException:
            self.close()
            raise
        modes = sorted({("native" if flags == XDP_FLAGS_DRV_MODE else "generic") for _, flags, _ in self._attached})
        self.mode = f"xdp {'+'.join(modes)}"
        self._totals_dtype = dtype(value_type(self.bpf["xdp_totals"]))
        if self.settings["per_source"]:
            self._snapshot = MapSnapshot(self.bpf["per_source"])
            self._window_dtype = dtype(self.bpf["per_source"].Leaf).fields["win"][0].base

    def contract_maps(self) -> Mapping[str, MapContract]:
        return self.maps if self.settings["per_source"] else {k: v for k, v in self.maps.items() if k != "per_source"}

    def check_maps(self) -> None:
        """Also the pinned list maps: their layouts are packed by hand in lists.py (the CLI has no bcc)."""
        super().check_maps()
        for spec in LIST_MAPS:
            table = self.bpf[spec.name]
            check_struct_offsets(f"map {spec.name} key", table.Key, field_offsets(spec.key), spec.key.size)
            check_struct_offsets(f"map {spec.name} value", table.Leaf, field_offsets(VALUE), VALUE.size)
        info = bpfsys.map_info(self.bpf[PRESENT_MAP].map_fd)
        if (info.type, info.key_size, info.value_size, info.max_entries) != (
                PRESENT_LAYOUT.map_type, PRESENT_LAYOUT.key_size, PRESENT_LAYOUT.value_size,
                PRESENT_LAYOUT.max_entries):
            from ..contract import LayoutError

            raise LayoutError(f"map {PRESENT_MAP} is {info.type_name} key {info.key_size} B value {info.value_size} B "
                              f"max_entries {info.max_entries} in C, Python expects [{PRESENT_LAYOUT.describe()}]")

    def _event(self, name: str, attributes: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(name, attributes)

    def _attached_program(self, ifname: str) -> tuple[int, int, str] | None:
        """(program id, IFLA_XDP_ATTACHED mode, program name) of the XDP program on the interface, if any."""
        with in_netns(self.netns):  # the child inherits this thread's namespace
            res = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", ifname], capture_output=True, text=True)
        for link in json.loads(res.stdout or "[]"):
            xdp = link.get("xdp") or {}
            prog = xdp.get("prog")
            if prog:
                return int(prog["id"]), int(xdp.get("mode", 0)), str(prog.get("name", ""))
            for att in xdp.get("attached", []):  # several programs (multi-mode): report the first
                if "prog" in att:
                    return int(att["prog"]["id"]), int(att.get("mode", 0)), str(att["prog"].get("name", ""))
        return None

    def _attach(self, ifname: str, fn: Any) -> None:
        from bcc import BPF

        from ...errors import ProbeError

        wanted = self.settings["mode"]
        order = {"native": [XDP_FLAGS_DRV_MODE], "generic": [XDP_FLAGS_SKB_MODE],
                 "auto": [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE]}[wanted]
        current = self._attached_program(ifname)
        if current is not None:
            prog_id, mode, prog_name = current
            if prog_name != PROGRAM[:15]:
                raise ProbeError(f"probe xdp disabled: {ifname} already runs XDP program {prog_name or '?'} "
                                 f"(id {prog_id}); detach it first (ip link set dev {ifname} xdp off)")
            # Our own program, left attached by an agent that did not close (killed): replace it in place, in the
            # mode it runs in, so that the blocklist is never off for a moment.
            same = XDP_FLAGS_DRV_MODE if mode == 1 else XDP_FLAGS_SKB_MODE
            if same in order:
                order = [same] + [f for f in order if f != same]
            else:  # the settings ask for the other mode: the kernel allows one at a time, so detach it first
                with in_netns(self.netns):
                    BPF.remove_xdp(ifname, same)
        errors = []
        for flags in order:
            try:
                with in_netns(self.netns):
                    BPF.attach_xdp(ifname, fn, flags)
            except Exception as exc:  # bcc raises a bare Exception with the errno text
                errors.append(f"{'native' if flags == XDP_FLAGS_DRV_MODE else 'generic'}: {exc}")
                continue
            now = self._attached_program(ifname)
            self._attached.append((ifname, flags, now[0] if now else 0))
            return
        raise ProbeError(f"probe xdp disabled: cannot attach to {ifname} ({'; '.join(errors)})")

    def close(self) -> None:
        """Detach from every interface (only if the program there is still ours), unload, close the lists.
        The list maps stay pinned: the blocklist outlives the agent and is enforced again at the next start."""
        from bcc import BPF

        for ifname, flags, prog_id in self._attached:
            try:
                current = self._attached_program(ifname)
                if current is not None and current[0] == prog_id:
                    with in_netns(self.netns):
                        BPF.remove_xdp(ifname, flags)
            except Exception:  # interface or namespace gone: nothing left to detach
                pass
        self._attached.clear()
        self._snapshot = None
        super().close()
        if self._config_fd is not None:  # after the program: it holds its own reference until unloaded
            bpfsys.close(self._config_fd)
            self._config_fd = None
        if self.blocklist is not None:
            self.blocklist.close()
            self.blocklist = None

    def attached_program_ids(self) -> list[int]:
        return [pid for _, _, pid in self._attached]

    # -- each window -------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        bpfsys.map_update(self._config_fd, struct.pack("=I", 0),
                          CONFIG.pack(self._epoch, self._shift, sample_mask(self._shift)))

    def _totals(self) -> list[dict[str, np.ndarray]]:
        """Per interface slot: struct totals field -> its values summed over CPUs (a 1-element array for a
        scalar field)."""
        table = self.bpf["xdp_totals"]
        totals = self._totals_dtype
        size = totals.itemsize * self._ncpu  # the kernel writes one struct per possible CPU
        out = []
        for slot in range(len(self.interfaces) + 1):
            raw = bpfsys.map_lookup(table.map_fd, struct.pack("=I", slot), size)
            values = np.frombuffer(raw, dtype=totals) if raw is not None else np.zeros(self._ncpu, dtype=totals)
            f = {name: np.atleast_1d(values[name].sum(axis=0)).astype(np.float64) for name in totals.names}
            f["size_log2"] += np.bincount(_SIZE16_TO_LOG2, weights=f["size16"], minlength=SIZE_SLOTS)
            # The program counts no pass verdict (one add less per packet): every packet not dropped or allowed
            # passed. Kept monotone: a packet counted but not yet given its verdict when we read is one pass now
            # and a drop at the next read, and a cumulative counter must not go back.
            passed = float(f["packets"].sum() - f["verdicts"][1] - f["verdicts"][2])
            key = ("passed", slot)
            self._passed[key] = max(self._passed.get(key, 0.0), passed)
            f["verdicts"][0] = self._passed[key]
            out.append(f)
        return out

    def read(self, seconds: float) -> Reading:
        reading = Reading()
        closed_epoch, closed_shift = self._epoch, self._shift
        self._epoch += 1
        self._write_config()  # from now on the kernel writes the other slot: ours is complete and stable

        totals = self._totals()
        names = self.interfaces + ["other"]
        sums = {k: 0.0 for k in ("packets", "bytes", "syn", "synack", "drop", "tcp", "udp")}
        inserts = failures = 0.0
        for slot, ifname in enumerate(names):
            f = totals[slot]
            if slot == len(self.interfaces) and not any(v.any() for v in f.values()):
                continue
            iface = {"network.interface.name": ifname}
            pk = self._delta(("packets", slot), f["packets"].sum())
            by = self._delta(("bytes", slot), f["bytes"].sum())
            reading.counters.append(("system.network.packet.count", pk,
                                     {"system.device": ifname, "network.io.direction": "receive"}))
            reading.counters.append(("system.network.io", by, {**iface, "network.io.direction": "receive"}))
            sums["packets"] += pk
            sums["bytes"] += by
            for i in range(PROTO_SLOTS):
                if f["packets"][i] == 0:
                    continue
                attrs = {**iface, **protocol_attributes(i)}
                d = self._delta(("proto", slot, i), f["packets"][i])
                reading.counters.append(("otel_ebpf_receiver.xdp.packets", d, attrs))
                reading.counters.append(("otel_ebpf_receiver.xdp.io", self._delta(("proto_bytes", slot, i), f["bytes"][i]),
                                         attrs))
                transport = TRANSPORTS[i % len(TRANSPORTS)]
                if transport in ("tcp", "udp"):
                    sums[transport] += d
            for i, flag in enumerate(TCP_FLAGS):
                d = self._delta(("flag", slot, i), f["tcp_flags"][i])
                reading.counters.append(("otel_ebpf_receiver.xdp.tcp_flags", d, {**iface, TCP_FLAG: flag}))
                if flag == "syn":
                    sums["syn"] += d
                elif flag == "syn_ack":
                    sums["synack"] += d
            for i, verdict in enumerate(VERDICTS):
                d = self._delta(("verdict", slot, i), f["verdicts"][i])
                reading.counters.append(("otel_ebpf_receiver.xdp.verdicts", d, {**iface, XDP_VERDICT: verdict}))
                if verdict == "drop":
                    sums["drop"] += d
                    reading.counters.append(("otel_ebpf_receiver.xdp.dropped_packets", d, iface))
            reading.counters.append(("otel_ebpf_receiver.xdp.malformed_packets",
                                     self._delta(("malformed", slot), f["malformed"][0]), iface))
            sizes = size_counts([self._delta(("size", slot, i), f["size_log2"][i]) for i in range(SIZE_SLOTS)],
                                int(pk), by)  # sampled with the per-source decision (sources.py)
            buckets = {float(2 ** i): int(n) for i, n in enumerate(sizes) if n}
            if buckets:
                reading.histograms.append(("otel_ebpf_receiver.xdp.packet.size", buckets, by, iface))
            inserts += f["src_inserts"][0]
            failures += f["src_update_failures"][0]

        distinct, top_share = self._read_sources(closed_epoch, closed_shift, seconds, reading, inserts)
        if self.settings["per_source"] and seconds > 0:
            passed = sums["packets"] - sums["drop"]  # only passed packets update the per-source table
            self._shift = sample_shift(passed / seconds, float(self.settings["per_source_exact_below"]))
            if self._shift != closed_shift:
                self._write_config()
        reading.map_update_failures = int(self._delta(("src_failures",), failures))

        if self.blocklist is not None:
            self.blocklist.expire()
            counts = self.blocklist.counts()
            for kind, metric in ((BLOCK, "otel_ebpf_receiver.xdp.blocklist_entries"),
                                 (ALLOW, "otel_ebpf_receiver.xdp.allowlist_entries")):
                for family in (4, 6):
                    reading.gauges.append((metric, float(counts[(kind, family)]), {"network.type": f"ipv{family}"}))

        reading.counters = [c for c in reading.counters if c[1]]
        reading.features = {
            "xdp.packets_rate_log1p": log1p_rate(sums["packets"], seconds),
            "xdp.bytes_rate_log1p": log1p_rate(sums["bytes"], seconds),
            "xdp.udp_rate_log1p": log1p_rate(sums["udp"], seconds),
            "xdp.syn_ratio": damped_share(sums["syn"], sums["tcp"], seconds, SYN_SHARE_PRIOR_SEGMENTS),
            "xdp.syn_synack_imbalance": log1p_rate(sums["syn"], seconds) - log1p_rate(sums["synack"], seconds),
            "xdp.distinct_sources_log1p": log1p_rate(distinct, seconds),
            "xdp.top_source_share": top_share,
            "xdp.drop_rate_log1p": log1p_rate(sums["drop"], seconds),
        }
        if seconds > 0:
            reading.rate, reading.rate_unit = sums["packets"] / seconds, "packets/s"
            reading.top = [TopItem("dropped by the blocklist", sums["drop"] / seconds, "packets/s")]
        return reading

    def _delta(self, key: Any, cumulative: float) -> float:
        return self._deltas.delta(key, float(cumulative))

    def _read_sources(self, epoch: int, shift: int, seconds: float, reading: Reading,
                      inserts_total: float) -> tuple[float, float]:
        """Per-source windows of the epoch that just closed → top-N gauges, distinct count, top share."""
        if self._snapshot is None:
            self._window = None
            return 0.0, 0.0
        n = self._snapshot.read()
        keys = np.frombuffer(self._snapshot.keys, dtype=np.uint8, count=n * 16).reshape(n, 16)
        wins = np.frombuffer(self._snapshot.values, dtype=self._window_dtype, count=n * 2).reshape(n, 2)[:, epoch & 1]
        live = (wins["epoch"] == (epoch & 0xFFFFFFFF)) & (wins["packets"] > 0)
        self._window = SourceWindows(keys[live].copy(), wins[live].copy(), seconds, shift)
        # Evictions: every key ever inserted is either still in the table or was evicted (we never delete).
        evictions_total = max(0.0, inserts_total - n)
        reading.map_evictions = int(max(0.0, evictions_total - self._evictions_total))
        inserted_now = self._delta(("src_inserts",), inserts_total)
        self._evictions_total = max(self._evictions_total, evictions_total)
        # A flood of new sources larger than the table evicts sources of this same window: every insertion is a
        # source new to the table, so the insert count bounds the distinct count from below.
        distinct = max(self._window.distinct(), inserted_now)
        reading.gauges.append(("otel_ebpf_receiver.xdp.sources", distinct, {}))
        for src in self.top_sources(self.settings["top_sources"]):
            reading.gauges.append(("otel_ebpf_receiver.xdp.top_source.packet_rate", src.packets_per_s,
                                   {"source.address": src.address}))
        return distinct, self._window.top_share()

    def top_sources(self, n: int = 10) -> list[SourceRate]:
        """The n busiest sources of the last window (for a per-source verdict), busiest first."""
        return self._window.top(n) if self._window is not None else []

    def source_window(self, address: str) -> SourceRate | None:
        """One source's numbers in the last window (None when it sent nothing that passed)."""
        return self._window.find(address) if self._window is not None else None

    @property
    def per_source_shift(self) -> int:
        """The per-source sampling shift in effect (0: every packet counted exactly; sources.py)."""
        return self._shift

    def set_sample_shift(self, shift: int) -> None:
        """Force the shift until the next read (bench and tests; the agent sets it from the packet rate)."""
        self._shift = shift
        self._write_config()
