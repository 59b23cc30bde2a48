"""The addresses a blocklist entry must not cover without ``--force``: loopback, this host's addresses, its default
gateways, its DNS resolvers and the OpenTelemetry Collector — blocking any of them cuts the host off (two /1
prefixes lock it out) or blinds the agent. The CLI checks ``block`` and ``import`` against them, the start-up
restore from the sidecar too, and mitigation builds its never-block list on them (mitigation/protected.py).

Kept current cheaply: the addresses are read once (``ip -j addr`` / ``ip -j route``, resolv.conf, the Collector's
name) and read again only when something changed — a netlink socket per network namespace, subscribed to address
and route changes, says when ``ip`` must run again; resolv.conf files are compared by stat; and every
``recheck_every`` seconds the Collector's name is resolved again (nothing announces that). ``ip`` never runs on a
timer: its processes would show in the agent's own exec and file-open metrics, which the state model reads.

A host whose addresses cannot be listed (``ip`` missing or failing) is not silently treated as having none:
:attr:`ProtectedAddresses.error` says why, the CLI then refuses prefixes without ``--force`` and enforce-mode
mitigation refuses to start.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import struct
import subprocess
import time
from typing import Callable, Sequence
from urllib.parse import urlparse

from ...kernel.netns import NetnsError, in_netns
from .lists import Network

RESOLV_CONF = "/etc/resolv.conf"
# systemd-resolved's list of upstream servers; /etc/resolv.conf then names only its local stub (127.0.0.53).
RESOLVED_UPSTREAM_CONF = "/run/systemd/resolve/resolv.conf"
LOOPBACK = (("127.0.0.0/8", "loopback"), ("::1/128", "loopback"))
COLLECTOR_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
# linux/rtnetlink.h: multicast groups (addresses and routes, both families) and the message types they bring.
RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x10, 0x40, 0x100, 0x400
WATCHED_GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE = 20, 21, 24, 25
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid; a struct rtmsg follows: family, dst_len, ...


def announces_change(buffer: bytes) -> bool:
    """Whether netlink messages change what is protected: any address, and default routes only (dst_len 0) — a
    node that adds a route per container would otherwise run `ip` for each."""
    offset = 0
    while offset + NLMSGHDR.size <= len(buffer):
        length, kind = NLMSGHDR.unpack_from(buffer, offset)[:2]
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            return True
        if kind in (RTM_NEWROUTE, RTM_DELROUTE) and offset + NLMSGHDR.size + 2 <= len(buffer) \
                and buffer[offset + NLMSGHDR.size + 1] == 0:
            return True
        if length < NLMSGHDR.size:
            break
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return False


class AddressListError(Exception):
    """This host's addresses could not be read; ``str()`` is one line."""


def ip_json(*args: str, netns: str | None = None) -> list[dict]:
    """``ip -j ARGS`` in network namespace ``netns`` (name or path; None: ours). Raises AddressListError."""
    cmd = ["ip", "-j", *args]
    where = f" in network namespace {netns}" if netns else ""
    try:
        with in_netns(netns):  # the child inherits this thread's namespace
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError, NetnsError) as exc:
        raise AddressListError(f"cannot list this host's addresses: `{' '.join(cmd)}`{where} failed "
                               f"({getattr(exc, 'strerror', None) or exc})") from None
    if res.returncode != 0:
        detail = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[0]
        raise AddressListError(f"cannot list this host's addresses: `{' '.join(cmd)}`{where} failed ({detail})")
    try:
        data = json.loads(res.stdout or "[]")
    except ValueError:
        raise AddressListError(f"cannot list this host's addresses: `{' '.join(cmd)}`{where} printed no JSON "
                               f"(iproute2 too old?)") from None
    return data if isinstance(data, list) else []


def host_addresses(netns: str | None = None) -> list[str]:
    return [a["local"] for link in ip_json("addr", "show", netns=netns) for a in link.get("addr_info", [])
            if "local" in a]


def default_gateways(netns: str | None = None) -> list[str]:
    routes = ip_json("route", "show", "default", netns=netns) + ip_json("-6", "route", "show", "default",
                                                                       netns=netns)
    return [r["gateway"] for r in routes if "gateway" in r]


def nameservers(path: str) -> list[str]:
    try:
        with open(path) as fh:
            return [line.split()[1] for line in fh if line.startswith("nameserver") and len(line.split()) > 1]
    except (OSError, UnicodeDecodeError):
        return []


def dns_resolvers(resolv_conf: str = RESOLV_CONF, upstream_conf: str = RESOLVED_UPSTREAM_CONF) -> list[str]:
    """The resolvers of resolv.conf, and — when it points at a local stub (systemd-resolved's 127.0.0.53) — the
    upstream servers the stub forwards to, which are the ones flood packets can claim to come from."""
    servers = nameservers(resolv_conf)
    if any(_is_loopback(s) for s in servers):
        servers += nameservers(upstream_conf)
    return servers


def collector_addresses() -> list[str]:
    out = []
    for var in COLLECTOR_ENDPOINT_VARS:
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


def _is_loopback(text: str) -> bool:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def to_network(text: str) -> Network | None:
    """An address or prefix as ``ip`` and resolv.conf print them (zone IDs dropped), or None."""
    try:
        return ipaddress.ip_network(text.split("%", 1)[0], strict=False)
    except ValueError:
        return None


class _Watch:
    """Says whether anything that decides the protected addresses may have changed since the last call."""

    def __init__(self, netns: Sequence[str | None], files: Sequence[str], recheck_every: float,
                 clock: Callable[[], float]) -> None:
        self.files = tuple(files)
        self.recheck_every = recheck_every
        self.clock = clock
        self.sockets: list[socket.socket] = []
        self.blind = False
        for ns in netns:
            try:
                with in_netns(ns):  # a netlink socket belongs to the namespace it was created in
                    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                         | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
                sock.bind((0, WATCHED_GROUPS))
                self.sockets.append(sock)
            except (OSError, NetnsError):
                self.blind = True  # no notifications from this namespace: `ip` runs at each recheck instead
        self.stamps = self._file_stamps()
        self.last_full = clock()

    def _file_stamps(self) -> tuple:
        out = []
        for path in self.files:
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_ino, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def poll(self) -> tuple[bool, bool]:
        """(an address, route or resolver file changed, recheck_every passed) since the last poll."""
        changed = False
        for sock in self.sockets:
            while True:  # drain: the messages only say "something changed", we re-read everything anyway
                try:
                    data = sock.recv(65536)
                    if not data:
                        break
                    changed = changed or announces_change(data)
                except BlockingIOError:
                    break
                except OSError as exc:  # ENOBUFS: more changes than the socket buffer held
                    changed = changed or exc.errno == errno.ENOBUFS
                    break
        stamps = self._file_stamps()
        if stamps != self.stamps:
            self.stamps = stamps
            changed = True
        due = self.clock() - self.last_full >= self.recheck_every
        if due:
            self.last_full = self.clock()
        return changed, due

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


class ProtectedAddresses:
    """Loopback, this host's addresses (in each of ``netns``: None is ours), default gateways, DNS resolvers and the
    Collector, as (network, why) pairs, re-read when they may have changed. ``error`` is set while they could not
    be read completely; the pairs then hold what could be read (never less than the last complete read)."""

    def __init__(self, netns: Sequence[str | None] = (None,), *, protect_gateway: bool = True,
                 protect_dns: bool = True, resolv_conf: str = RESOLV_CONF,
                 upstream_conf: str = RESOLVED_UPSTREAM_CONF, recheck_every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, watch: bool = True) -> None:
        self.netns = list(dict.fromkeys(netns))
        self.protect_gateway = protect_gateway
        self.protect_dns = protect_dns
        self.resolv_conf = resolv_conf
        self.upstream_conf = upstream_conf
        self.entries: list[tuple[Network, str]] = []
        self.error: str | None = None
        self.generation = 0  # bumped whenever the entries change
        # A one-shot user (a CLI verb) reads once; a long-lived one (the agent) watches for changes.
        self._watch = _Watch(self.netns, (resolv_conf, upstream_conf), recheck_every, clock) if watch else None
        self._from_ip: list[tuple[str, str]] = []
        self._read(run_ip=True)

    def _read(self, run_ip: bool) -> None:
        """Everything again; ``run_ip`` False keeps the last ``ip`` answers (addresses and routes unchanged)."""
        errors: list[str] = []
        if run_ip:
            from_ip: list[tuple[str, str]] = []
            for ns in self.netns:
                try:
                    from_ip += [(a, "this host's address") for a in host_addresses(ns) if not _is_loopback(a)]
                    if self.protect_gateway:
                        from_ip += [(g, "default gateway") for g in default_gateways(ns)]
                except AddressListError as exc:
                    errors.append(str(exc))
            self._from_ip = from_ip
        elif self.error:
            errors.append(self.error)
        found = list(self._from_ip)  # loopback last: a refusal names the most telling address first
        if self.protect_dns:
            found += [(s, "DNS resolver") for s in dns_resolvers(self.resolv_conf, self.upstream_conf)]
        found += [(a, "OpenTelemetry Collector endpoint") for a in collector_addresses()]
        found += list(LOOPBACK)
        entries: dict[Network, str] = {}
        for text, why in found:
            net = to_network(text)
            if net is not None:
                entries.setdefault(net, why)
        if errors:
            # A failure never shrinks the list: keep what an earlier read found, retry at the next check.
            for net, why in self.entries:
                entries.setdefault(net, why)
        fresh = list(entries.items())
        self.error = errors[0] if errors else None
        if fresh != self.entries:
            self.entries = fresh
            self.generation += 1

    def refresh(self) -> bool:
        """Re-read what may have changed; True when the entries changed. ``ip`` runs again only on a netlink
        notification — or, when ``ip`` failed or a namespace cannot notify, at most every ``recheck_every``."""
        if self._watch is None:
            return False
        changed, due = self._watch.poll()
        if not (changed or due):
            return False
        before = self.generation
        self._read(run_ip=changed or (due and (self.error is not None or self._watch.blind)))
        return self.generation != before

    def covering(self, net: Network) -> tuple[str, str] | None:
        """(address or prefix, why) of what ``net`` would cover, or None."""
        for protected, why in self.entries:
            if protected.version == net.version and protected.overlaps(net):
                if not net.supernet_of(protected):
                    return str(net.network_address), why  # net lies inside a protected prefix (127.0.0.0/8)
                single = protected.prefixlen == protected.max_prefixlen
                return str(protected.network_address) if single else str(protected), why
        return None

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
