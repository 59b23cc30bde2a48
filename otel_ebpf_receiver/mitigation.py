"""Closed-loop mitigation: from the state verdict to XDP blocklist entries, with safety rails.

The per-source verdict is a documented rule on top of the system state rather than a second model: while the
host is in an attack state — the *debounced* state, two consecutive windows: a single window of the model saying
"flood" during a heavy-but-benign transfer once blocked the transfer's source in the lab, and two windows still
put the first drop about 2 s after a flood starts — a source is *offending* when it sends at least ``min_share``
of all packets at ``min_packet_rate`` or more, in packets averaging at most ``max_bytes_per_packet`` (a source
sending full-size packets is a bulk transfer — a backup, a large download — and the floods that exhaust a host
are packet floods: a model that once mistook a transfer for a UDP flood cannot get its source blocked; a
large-packet volumetric flood is left to the operator, or to a setting of 0, which lifts this rail). Early
warnings never block: they fire on a trend, and heavy-but-benign traffic (a backup, a large transfer) is a trend
too. A rule is auditable — an operator can say exactly why an address was blocked — and the state model already
did the hard part, deciding that the host is under attack. Sources are ranked by packet rate (then SYN share).

Modes: ``off`` (default, nothing evaluated), ``dry-run`` (events say what would be blocked), ``enforce``.
Rails, each enforced before any map write: a hard allowlist (loopback, this host's addresses, default gateways,
DNS resolvers, the Collector endpoint, operator CIDRs, and the XDP allowlist) that is never blocked even when
flood packets forge those sources; at most ``max_blocks_per_minute`` new blocks in any 60 s and at most
``max_auto_blocks`` automatic entries at once; a TTL that doubles for each repeat offence up to ``max_ttl``.
Every action is an OTel log event and a span event on the open incident.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlparse

from .probes.base import COUNTER, GAUGE, Metric, Reading

log = logging.getLogger("otel_ebpf_receiver")

MODES = ("off", "dry-run", "enforce")
AUTO_REASON_PREFIX = "auto:"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class MitigationSettings:
    mode: str = "off"
    attack_states: tuple[str, ...] = ("network_flood", "syn_flood", "udp_flood", "random_source_flood")
    min_share: float = 0.2
    min_packet_rate: float = 500.0
    max_bytes_per_packet: float = 1000.0  # larger average packets: a transfer, not a packet flood (0: no limit)
    ttl: float = 300.0
    max_ttl: float = 86400.0
    max_blocks_per_minute: int = 10
    max_auto_blocks: int = 100
    allow: tuple[str, ...] = ()           # operator CIDRs that are never blocked
    protect_dns: bool = True
    protect_gateway: bool = True

    KEYS = ("mode", "attack_states", "min_share", "min_packet_rate", "max_bytes_per_packet", "ttl", "max_ttl",
            "max_blocks_per_minute", "max_auto_blocks", "allow", "protect_dns", "protect_gateway")


# -- the hard allowlist ----------------------------------------------------------------------------------------
def _ip_json(*args: str, netns: str | None = None) -> list[dict]:
    cmd = (["ip", "-n", netns] if netns else ["ip"]) + ["-j", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
        return json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def host_addresses(netns: str | None = None) -> list[str]:
    return [a["local"] for link in _ip_json("addr", "show", netns=netns) for a in link.get("addr_info", [])
            if "local" in a]


def default_gateways(netns: str | None = None) -> list[str]:
    routes = _ip_json("route", "show", "default", netns=netns) + _ip_json("-6", "route", "show", "default",
                                                                         netns=netns)
    return [r["gateway"] for r in routes if "gateway" in r]


def dns_resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        with open(path) as fh:
            return [line.split()[1] for line in fh if line.startswith("nameserver") and len(line.split()) > 1]
    except OSError:
        return []


def collector_addresses() -> list[str]:
    out = []
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"):
        endpoint = os.environ.get(var)
        if not endpoint:
            continue
        host = urlparse(endpoint if "://" in endpoint else f"//{endpoint}").hostname
        if not host:
            continue
        try:
            out.extend(info[4][0] for info in socket.getaddrinfo(host, None))
        except OSError:
            continue
    return out


def _network(text: str) -> Network:
    return ipaddress.ip_network(text.split("%", 1)[0], strict=False)


@dataclass
class HardAllowlist:
    """Addresses that must never be blocked, whatever the traffic claims to come from."""

    networks: list[Network] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)

    def add(self, text: str, why: str) -> None:
        try:
            net = _network(text)
        except ValueError:
            return
        self.networks.append(net)
        self.why.setdefault(str(net), why)

    def covers(self, address: str) -> str | None:
        """The reason ``address`` is protected, or None."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        for net in self.networks:
            if ip.version == net.version and ip in net:
                return self.why.get(str(net), "allowlisted")
        if ip.version == 6 and ip.ipv4_mapped is not None:
            return self.covers(str(ip.ipv4_mapped))
        return None

    @classmethod
    def build(cls, settings: MitigationSettings, netns: Sequence[str | None] = (None,),
              extra: Iterable[tuple[str, str]] = ()) -> "HardAllowlist":
        allow = cls()
        for text in ("127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128"):
            allow.add(text, "loopback/unspecified")
        for ns in netns:
            for addr in host_addresses(ns):
                allow.add(addr, "this host's address")
            if settings.protect_gateway:
                for gw in default_gateways(ns):
                    allow.add(gw, "default gateway")
        if settings.protect_dns:
            for ns_addr in dns_resolvers():
                allow.add(ns_addr, "DNS resolver")
        for addr in collector_addresses():
            allow.add(addr, "OpenTelemetry Collector endpoint")
        for cidr in settings.allow:
            allow.add(cidr, "operator allowlist")
        for cidr, why in extra:
            allow.add(cidr, why)
        return allow


# -- the engine ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    kind: str          # block | would_block | skipped
    address: str
    reason: str
    ttl: float = 0.0
    packets_per_s: float = 0.0
    share: float = 0.0


class Mitigator:
    name = "mitigation"
    metrics = (
        Metric("otel_ebpf_receiver.mitigation.actions", COUNTER, "{action}",
               "Mitigation decisions: block, would_block (dry-run) or skipped (rail), per reason.",
               ("mitigation.action", "mitigation.reason")),
        Metric("otel_ebpf_receiver.mitigation.auto_blocks", GAUGE, "{entry}",
               "Blocklist entries added automatically and not yet expired."),
    )

    def __init__(self, settings: MitigationSettings, blocklist: Any, allowlist: HardAllowlist,
                 emit: Callable[[str, dict[str, Any]], None] | None = None,
                 span_event: Callable[[str, dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if settings.mode not in MODES:
            raise ValueError(f"mitigation mode {settings.mode!r}: use one of {', '.join(MODES)}")
        self.settings = settings
        self.blocklist = blocklist
        self.allowlist = allowlist
        self.emit = emit or (lambda name, attrs: None)
        self.span_event = span_event or (lambda name, attrs: None)
        self.clock = clock
        self.recent_blocks: deque[float] = deque()
        self.offences: dict[str, int] = {}
        self.expiries: dict[str, float] = {}
        self._pending = Reading()
        self._skipped_reported: set[tuple[str, str]] = set()

    # The rule ---------------------------------------------------------------------------------------------
    def under_attack(self, state: str) -> bool:
        return state in self.settings.attack_states

    def offenders(self, sources: Sequence[Any]) -> list[Any]:
        s = self.settings
        chosen = [src for src in sources if src.share >= s.min_share and src.packets_per_s >= s.min_packet_rate]
        return sorted(chosen, key=lambda src: (src.packets_per_s, src.syn_share), reverse=True)

    def auto_entries(self) -> int:
        if self.blocklist is None:
            return 0
        return sum(1 for e in self.blocklist.list() if (e.reason or "").startswith(AUTO_REASON_PREFIX))

    def ttl_for(self, address: str) -> float:
        """Base TTL doubled for each earlier offence of this source, capped at max_ttl."""
        repeats = self.offences.get(address, 0)
        return min(self.settings.ttl * (2 ** repeats), self.settings.max_ttl)

    # Each window ------------------------------------------------------------------------------------------
    def step(self, state: str, sources: Sequence[Any]) -> list[Action]:
        now = self.clock()
        if self.settings.mode == "off" or not self.under_attack(state):
            # No map walk on quiet windows: our own record of what we added, minus what expired.
            live = sum(1 for expiry in self.expiries.values() if expiry > now)
            self._pending.gauges.append(("otel_ebpf_receiver.mitigation.auto_blocks", live, {}))
            return []
        while self.recent_blocks and now - self.recent_blocks[0] > 60:
            self.recent_blocks.popleft()
        actions: list[Action] = []
        auto = self.auto_entries()
        for src in self.offenders(sources):
            protected = self.allowlist.covers(src.address)
            if protected:
                actions.append(Action("skipped", src.address, f"allowlisted ({protected})", 0, src.packets_per_s,
                                      src.share))
                continue
            if 0 < self.settings.max_bytes_per_packet < src.bytes_per_packet:
                actions.append(Action("skipped", src.address, f"bulk transfer ({src.bytes_per_packet:.0f} "
                                      "bytes/packet > max_bytes_per_packet)", 0, src.packets_per_s, src.share))
                continue
            if self.blocklist is not None and self.blocklist.lookup(src.address) is not None:
                continue  # already blocked (by us or by an operator)
            if len(self.recent_blocks) >= self.settings.max_blocks_per_minute:
                actions.append(Action("skipped", src.address, "rate cap (max_blocks_per_minute)", 0,
                                      src.packets_per_s, src.share))
                continue
            if auto >= self.settings.max_auto_blocks:
                actions.append(Action("skipped", src.address, "total cap (max_auto_blocks)", 0, src.packets_per_s,
                                      src.share))
                continue
            ttl = self.ttl_for(src.address)
            reason = (f"{AUTO_REASON_PREFIX} state={state} {src.packets_per_s:.0f} pkt/s "
                      f"share={src.share:.2f} syn={src.syn_share:.2f}")
            if self.settings.mode == "enforce":
                self.blocklist.block(src.address, ttl=ttl, reason=reason)
                self.offences[src.address] = self.offences.get(src.address, 0) + 1
                self.expiries[src.address] = now + ttl
                self.recent_blocks.append(now)
                auto += 1
                actions.append(Action("block", src.address, reason, ttl, src.packets_per_s, src.share))
            else:
                actions.append(Action("would_block", src.address, reason, ttl, src.packets_per_s, src.share))
        for action in actions:
            self._report(action, state)
        self._pending.gauges.append(("otel_ebpf_receiver.mitigation.auto_blocks", auto, {}))
        return actions

    def _report(self, action: Action, state: str) -> None:
        kind = action.reason.split(" (")[0] if action.kind == "skipped" else "rule"
        self._pending.counters.append(("otel_ebpf_receiver.mitigation.actions", 1,
                                       {"mitigation.action": action.kind, "mitigation.reason": kind}))
        attrs = {"mitigation.action": action.kind, "source.address": action.address,
                 "mitigation.reason": action.reason, "mitigation.ttl_s": action.ttl,
                 "mitigation.packets_per_s": action.packets_per_s, "mitigation.share": action.share,
                 "mitigation.mode": self.settings.mode, "system.state": state}
        key = (action.address, action.reason)
        if action.kind == "skipped" and key in self._skipped_reported:
            return  # a forged allowlisted source floods every window: say it once
        self._skipped_reported.add(key)
        name = {"block": "mitigation.block", "would_block": "mitigation.would_block"}.get(action.kind,
                                                                                        "mitigation.skipped")
        self.emit(name, attrs)
        self.span_event(name, attrs)
        log.warning("mitigation %s %s: %s", action.kind, action.address, action.reason)

    def read(self, seconds: float) -> Reading:
        reading, self._pending = self._pending, Reading()
        return reading
