"""The never-block list of mitigation: addresses that must never be blocked automatically, whatever the traffic
claims to come from — loopback, this host's addresses, default gateways, DNS resolvers, the Collector, operator
CIDRs and the XDP allowlist."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Iterable, Sequence
from urllib.parse import urlparse

from .settings import MitigationSettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
