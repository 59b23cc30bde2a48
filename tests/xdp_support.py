"""Fixtures and helpers for the XDP tests: a namespace lab, a test-only pin dir, a loaded probe, a UDP sink."""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections import Counter
from typing import Iterator

import pytest

from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist
from otel_ebpf_receiver.probes.xdp.pins import remove_pins
from model_export.lab.netns import Lab
from otel_ebpf_receiver.probes.xdp import XdpProbe

_pins = itertools.count()
SINK_PORT = 9999


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(clients=3) as lab:
        yield lab


@pytest.fixture
def pin_dir() -> Iterator[str]:
    """A pin dir of our own, so that tests never touch a real agent's blocklist; removed afterwards."""
    path = f"/sys/fs/bpf/oer-test-{os.getpid()}-{next(_pins)}"
    remove_pins(path)
    yield path
    remove_pins(path)


@pytest.fixture
def settings(lab: Lab, pin_dir: str, tmp_path) -> dict:
    return {"interfaces": ["eth0"], "netns": lab.victim.netns, "pin_dir": pin_dir, "state_dir": str(tmp_path / "state")}


@pytest.fixture
def probe(settings: dict) -> Iterator[XdpProbe]:
    p = XdpProbe(settings)
    p.load()
    p.read(1.0)  # baseline: later reads report only what the test sent
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def blocklist(settings: dict) -> Iterator[Blocklist]:
    """The lists as a CLI verb sees them: a second, independent handle on the same pins."""
    with Blocklist(settings["pin_dir"], settings["state_dir"]) as bl:
        yield bl


class UdpSink:
    """A UDP socket in the victim's namespace that counts datagrams per source address."""

    def __init__(self, lab: Lab, family: int = socket.AF_INET, port: int = SINK_PORT) -> None:
        self.sock = lab.socket("victim", family, socket.SOCK_DGRAM)
        self.sock.bind((lab.victim.ipv4 if family == socket.AF_INET else lab.victim.ipv6, port))
        self.sock.setblocking(False)
        self.port = port

    def drain(self, settle: float = 0.2) -> Counter:
        time.sleep(settle)
        got: Counter = Counter()
        while True:
            try:
                _, addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                return got
            got[addr[0]] += 1

    def close(self) -> None:
        self.sock.close()


def send_udp(lab: Lab, host: str, count: int, *, v6: bool = False, port: int = SINK_PORT, size: int = 32) -> None:
    family = socket.AF_INET6 if v6 else socket.AF_INET
    dest = lab.victim.ipv6 if v6 else lab.victim.ipv4
    with lab.socket(host, family, socket.SOCK_DGRAM) as s:
        for _ in range(count):
            s.sendto(b"x" * size, (dest, port))


def counter_where(reading, name: str, attrs_subset: dict) -> float:
    return sum(v for n, v, attrs in reading.counters
               if n == name and all(attrs.get(k) == w for k, w in attrs_subset.items()))


def gauge(reading, name: str, attrs_subset: dict | None = None) -> list[float]:
    return [v for n, v, attrs in reading.gauges
            if n == name and all(attrs.get(k) == w for k, w in (attrs_subset or {}).items())]
