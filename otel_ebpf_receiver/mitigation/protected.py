"""The never-block list of mitigation: addresses that must never be blocked automatically, whatever the traffic
claims to come from — loopback and the unspecified address, this host's addresses, default gateways, DNS resolvers
(behind a local stub: its upstream servers too), the Collector, operator CIDRs and the XDP allowlist.

It follows the host: :meth:`HardAllowlist.refresh`, called by the mitigator every window, re-reads the host's
part only when netlink announced an address or route change, a resolv.conf changed, or a minute passed (see
probes/xdp/protected.py), and the XDP allowlist only when its sidecar changed — a few syscalls on a quiet window.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, Iterable, Sequence

from ..probes.xdp.protected import RESOLV_CONF, RESOLVED_UPSTREAM_CONF, ProtectedAddresses, to_network
from .settings import MitigationSettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
UNSPECIFIED = (("0.0.0.0/32", "loopback/unspecified"), ("::/128", "loopback/unspecified"))


class HardAllowlist:
    """Addresses that must never be blocked. ``networks`` and ``why`` (str(network) -> reason) are the current
    list; ``error`` says why this host's addresses could not be read (enforce mode refuses to start then)."""

    def __init__(self, fixed: Iterable[tuple[str, str]] = (), host: ProtectedAddresses | None = None,
                 extra: Callable[[], Iterable[tuple[str, str]]] | None = None) -> None:
        self.fixed = list(fixed)
        self.host = host
        self.extra = extra
        self.networks: list[Network] = []
        self.why: dict[str, str] = {}
        self._extra_seen: tuple[tuple[str, str], ...] = ()
        self._rebuild()

    @property
    def error(self) -> str | None:
        return self.host.error if self.host is not None else None

    def add(self, text: str, why: str) -> None:
        net = to_network(text)
        if net is None:
            return
        if str(net) not in self.why:
            self.networks.append(net)
            self.why[str(net)] = why

    def _rebuild(self) -> None:
        self.networks, self.why = [], {}
        for text, why in self.fixed:
            self.add(text, why)
        if self.host is not None:
            for net, why in self.host.entries:
                self.add(str(net), why)
        self._extra_seen = tuple(self.extra()) if self.extra is not None else ()
        for text, why in self._extra_seen:
            self.add(text, why)

    def refresh(self) -> bool:
        """Follow address, route, resolver and XDP-allowlist changes; True when the list changed."""
        changed = self.host.refresh() if self.host is not None else False
        if not changed and self.extra is not None:
            changed = tuple(self.extra()) != self._extra_seen
        if changed:
            self._rebuild()
        return changed

    def covers(self, address: str) -> str | None:
        """The reason ``address`` is protected, or None."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        for net in self.networks:
            if ip.version == net.version and ip in net:
                return self.why.get(str(net), "allowlisted")
        if ip.version == 6 and ip.ipv4_mapped is not None:
            return self.covers(str(ip.ipv4_mapped))
        return None

    def close(self) -> None:
        if self.host is not None:
            self.host.close()

    @classmethod
    def build(cls, settings: MitigationSettings, netns: Sequence[str | None] = (None,),
              extra: Callable[[], Iterable[tuple[str, str]]] | None = None, *, resolv_conf: str = RESOLV_CONF,
              upstream_conf: str = RESOLVED_UPSTREAM_CONF, watch: bool = True) -> "HardAllowlist":
        """The list for these settings; this host's part is read in each of ``netns`` (None: ours). Never
        raises: check ``error`` (enforce mode must not start without this host's addresses)."""
        host = ProtectedAddresses(netns, protect_gateway=settings.protect_gateway, protect_dns=settings.protect_dns,
                                  resolv_conf=resolv_conf, upstream_conf=upstream_conf, watch=watch)
        fixed = list(UNSPECIFIED) + [(cidr, "operator allowlist") for cidr in settings.allow]
        return cls(fixed, host, extra)
