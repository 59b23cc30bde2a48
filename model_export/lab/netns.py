"""Network namespaces as hosts: a victim and N clients on one virtual switch, for tests and the scenario lab.

Design (why it looks like this):

* **The victim is a namespace, not the root namespace.** Floods with forged sources (``hping3 --rand-source``)
  make the victim answer random addresses; the root namespace has a default route, so those answers would leave
  the machine. Here no namespace has a default route: answers to forged sources die with "network unreachable"
  inside the lab, and traffic only ever flows between namespaces the lab created.
* **The agent stays in the root namespace.** BPF maps and programs are not tied to a network namespace, only the
  attachment is; :func:`in_netns` lets the calling thread enter the victim's namespace just long enough to resolve
  the interface and attach (or detach) XDP, then come back. ``XdpProbe`` takes a ``netns`` setting for that.
* **One switch, one watched interface.** Every host has ``eth0`` plugged into a bridge that lives in its own
  switch namespace, like servers on a LAN; the XDP program on the victim's ``eth0`` sees everything sent to it.
  veth supports native (driver-mode) XDP, so the program runs as it would on a NIC driver.
* **Exact counts.** The bridge does not filter (br_netfilter off in the switch namespace); neighbour entries are static (no ARP/NDP), IPv6 addresses skip duplicate address detection
  and interfaces get no link-local address (no router solicitations or MLD reports): a test that sends N packets
  from a client sees exactly N packets from that client's address.
* **Always cleaned up.** Deleting a namespace destroys its veth ends (and any XDP program attached to them);
  :class:`Lab` is a context manager and also removes what it created if set-up fails half way. Names carry the
  pid and a counter so parallel test runs never clash.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Sequence

from otel_ebpf_receiver.kernel.netns import in_netns

_counter = itertools.count()


class LabError(RuntimeError):
    pass


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res


def _sysctl(netns: str, key: str, value: str) -> None:
    with in_netns(netns):
        with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
            fh.write(value)


@dataclass
class Host:
    """One namespace host: logical name (``victim``, ``client0``...), namespace name, interface and addresses."""

    name: str
    netns: str
    ifname: str
    mac: str
    ipv4: str
    ipv6: str

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return ip(*args, netns=self.netns, check=check)


class Lab:
    """A victim and ``clients`` client hosts on one bridge; IPv4 ``<subnet4>.0/24`` and IPv6 ``<subnet6>/64``.

    >>> with Lab(clients=2) as lab:                                          # doctest: +SKIP
    ...     lab.run("client0", "hping3", "--udp", "-c", "10", lab.victim.ipv4)

    The victim is ``.1``/``::1``, client i is ``.(10+i)``/``::(10+i)``. Nothing is routed beyond the subnet.
    """

    def __init__(self, clients: int = 2, *, prefix: str | None = None, subnet4: str = "10.200.0",
                 subnet6: str = "fd00:200::") -> None:
        if not 1 <= clients <= 200:
            raise LabError("clients must be between 1 and 200")
        self.prefix = prefix or f"oer{os.getpid()}-{next(_counter)}"
        self.switch_ns = f"{self.prefix}-sw"
        self.subnet4 = subnet4
        self.subnet6 = subnet6
        self.hosts: dict[str, Host] = {}
        names = ["victim"] + [f"client{i}" for i in range(clients)]
        for i, name in enumerate(names):
            octet = 1 if name == "victim" else 10 + i - 1
            self.hosts[name] = Host(name, f"{self.prefix}-{name}", "eth0", f"02:00:00:00:{i // 256:02x}:{i % 256 + 1:02x}",
                                    f"{subnet4}.{octet}", str(ipaddress.IPv6Address(f"{subnet6}{octet:x}")))
        self._created: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        self._add_netns(self.switch_ns)
        # A switch forwards frames, it does not judge them: without this, br_netfilter validates IP headers (and
        # checksums) on the bridge and silently drops the malformed frames that tests send on purpose.
        for table in ("iptables", "ip6tables", "arptables"):
            try:
                _sysctl(self.switch_ns, f"net.bridge.bridge-nf-call-{table}", "0")
            except FileNotFoundError:
                pass  # no br_netfilter in this kernel: nothing to turn off
        # The switch has no business speaking IPv6 itself (router solicitations, MLD from its ports' link-locals).
        _sysctl(self.switch_ns, "net.ipv6.conf.all.disable_ipv6", "1")
        _sysctl(self.switch_ns, "net.ipv6.conf.default.disable_ipv6", "1")
        ip("link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0",
           "mcast_snooping", "0", netns=self.switch_ns)
        ip("link", "set", "br0", "up", netns=self.switch_ns)
        for port, host in enumerate(self.hosts.values()):
            self._add_netns(host.netns)
            _sysctl(host.netns, "net.ipv6.conf.default.accept_ra", "0")
            _sysctl(host.netns, "net.ipv6.conf.default.router_solicitations", "0")
            peer = self.switch_port(port)
            ip("link", "add", peer, "type", "veth", "peer", "name", host.ifname, "netns", host.netns,
               netns=self.switch_ns)
            ip("link", "set", peer, "master", "br0", "up", netns=self.switch_ns)
            host.ip("link", "set", "lo", "up")
            host.ip("link", "set", host.ifname, "address", host.mac, "addrgenmode", "none")
            host.ip("addr", "add", f"{host.ipv4}/24", "dev", host.ifname)
            host.ip("addr", "add", f"{host.ipv6}/64", "dev", host.ifname, "nodad")
            host.ip("link", "set", host.ifname, "up")
        for host in self.hosts.values():
            for other in self.hosts.values():
                if other is not host:
                    for addr in (other.ipv4, other.ipv6):
                        host.ip("neigh", "replace", addr, "lladdr", other.mac, "dev", host.ifname, "nud", "permanent")

    @staticmethod
    def switch_port(index: int) -> str:
        """The switch's port towards the index-th host (the victim is 0, client i is i + 1)."""
        return f"p{index}"

    def switch(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command in the switch's namespace (e.g. ``tc`` on its ports)."""
        return subprocess.run(["ip", "netns", "exec", self.switch_ns, *argv], timeout=30, check=check,
                              capture_output=True, text=True)

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._created.append(name)

    def close(self) -> None:
        """Delete every namespace this lab made (their veths, and XDP programs attached to them, go too)."""
        for name in reversed(self._created):
            ip("netns", "del", name, check=False)
        self._created.clear()

    # -- using it ---------------------------------------------------------------------------------------------------
    @property
    def victim(self) -> Host:
        return self.hosts["victim"]

    @property
    def clients(self) -> list[Host]:
        return [h for n, h in self.hosts.items() if n != "victim"]

    def host(self, name: str | Host) -> Host:
        return name if isinstance(name, Host) else self.hosts[name]

    def inside(self, host: str | Host):
        """Context manager: this thread runs inside the host's namespace."""
        return in_netns(self.host(host).netns)

    def socket(self, host: str | Host, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:
        """A socket that lives in the host's namespace (usable from the root namespace afterwards)."""
        with self.inside(host):
            return socket.socket(family, type, proto)

    def run(self, host: str | Host, *argv: str, timeout: float = 60, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.host(host).netns, *argv], timeout=timeout, check=check,
                              capture_output=True, text=True, **kwargs)

    def popen(self, host: str | Host, *argv: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.host(host).netns, *argv], **kwargs)

    def xdp_programs(self, host: str | Host = "victim") -> list[int]:
        """Ids of XDP programs attached to the host's interface (empty when none)."""
        import json

        out = self.host(host).ip("-j", "-d", "link", "show", "dev", self.host(host).ifname).stdout
        ids = []
        for link in json.loads(out or "[]"):
            xdp = link.get("xdp") or {}
            if "prog" in xdp:
                ids.append(int(xdp["prog"]["id"]))
            for att in xdp.get("attached", []):
                if "prog" in att and int(att["prog"]["id"]) not in ids:
                    ids.append(int(att["prog"]["id"]))
        return ids


# ---- packets with known numbers ----------------------------------------------------------------------------------

def send_udp(sock_host: socket.socket, dest: tuple, count: int, payload: bytes = b"x" * 32) -> None:
    for _ in range(count):
        sock_host.sendto(payload, dest)


def icmp_echo(ident: int, seq: int, payload: bytes = b"otel-ebpf-receiver", v6: bool = False) -> bytes:
    """An ICMP (or ICMPv6, checksum left to the kernel) echo request."""
    import struct

    kind = 128 if v6 else 8
    header = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    if v6:
        return header + payload
    data = header + payload
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return struct.pack("!BBHHH", kind, 0, ~total & 0xFFFF, ident, seq) + payload


def ping(lab: Lab, host: str | Host, dest: str, count: int) -> None:
    """Send ``count`` echo requests from ``host`` to ``dest`` (IPv4 or IPv6) through a raw socket."""
    v6 = ":" in dest
    sock = lab.socket(host, socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                      socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    with sock:
        for seq in range(count):
            sock.sendto(icmp_echo(os.getpid() & 0xFFFF, seq, v6=v6), (dest, 0))


def raw_frames(lab: Lab, host: str | Host, frames: Sequence[bytes]) -> None:
    """Send Ethernet frames as they are (truncated or malformed on purpose) out of the host's interface."""
    h = lab.host(host)
    sock = lab.socket(h, socket.AF_PACKET, socket.SOCK_RAW, 0)
    with sock:
        sock.bind((h.ifname, 0))
        for frame in frames:
            sock.send(frame)
