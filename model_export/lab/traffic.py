"""The lab's network loads, each a context manager that starts a bounded load and stops it on exit, yielding a
:class:`Drive`: floods from the attacker (hping3), large transfers (iperf3), a slow ramp (trafgen) and the
victim's API failing.

Every load is bounded twice: a count (``hping3 -c``, ``trafgen --num``, ``iperf3 -n``) and a time (each process
runs under ``timeout``), and every process is killed when its load ends. Traffic only flows between the lab's
namespaces. Floods run at ``hping3 -i u1`` (20-80k packets/s on a 2-core VM): a flood by any standard, and
``-c`` is honoured (``--flood`` ignores it).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import ContextManager, Iterator, Sequence

from .testbed import ATTACKER, HTTP_PORT, Testbed

UDP_PORT = 9999
IPERF_PORT = 5201
# Count bound of a flood: seconds x this. Above what hping3 -i u1 reaches here (20-30k/s on a busy 2-core VM, 60-80k/s
# on a quiet one), so that the time bound ends a flood: at 60,000 a quiet-machine UDP flood ran out of packets 7 s
# before its recorded label ended (2026-12-01), and those windows were labelled a flood that was not there.
FLOOD_MAX_PPS = 200_000
RAMP_FINAL_PPS = 25_000        # where the slow ramp ends: the rate of the floods above
RAMP_STEPS = 20
TRANSFER_MAX_BYTES_PER_S = 4_000_000_000  # iperf3 -n bound: above what a veth pair carries here with XDP on


@dataclass
class Drive:
    """What a running workload tells the lab: when it started and, for a ramp, its steps."""

    started: float = field(default_factory=time.time)            # wall clock, like window timestamps
    steps: list[tuple[float, float]] = field(default_factory=list)  # ramp: (start time, packets/s)
    final_rate: float = 0.0

    def level_at(self, t: float) -> float | None:
        """Share of the ramp's final rate being sent at time ``t`` (None before the first step or if no ramp)."""
        level = None
        for start, rate in self.steps:
            if start <= t:
                level = rate / self.final_rate if self.final_rate else None
        return level


@contextlib.contextmanager
def _hping(bed: Testbed, seconds: float, args: Sequence[str], host: str = ATTACKER) -> Iterator[Drive]:
    # -i u1 rather than --flood: hping3 ignores -c in flood mode, and every flood here is bounded in count too.
    count = int(seconds * FLOOD_MAX_PPS)
    drive = Drive()
    proc = bed.spawn(host, ["hping3", "-q", "-i", "u1", "-c", str(count), *args, bed.victim.ipv4], seconds + 1)
    try:
        yield drive
    finally:
        bed.stop(proc)


def syn_flood(bed: Testbed, seconds: float) -> ContextManager[Drive]:
    """TCP SYNs from one client to the victim's HTTP port."""
    return _hping(bed, seconds, ["-S", "-p", str(HTTP_PORT)])


def udp_flood(bed: Testbed, seconds: float) -> ContextManager[Drive]:
    """Small UDP datagrams from one client to a closed port."""
    return _hping(bed, seconds, ["--udp", "-p", str(UDP_PORT), "-d", "32"])


def random_source_flood(bed: Testbed, seconds: float) -> ContextManager[Drive]:
    """SYNs with a random forged IPv4 source each: no single source to block."""
    return _hping(bed, seconds, ["-S", "--rand-source", "-p", str(HTTP_PORT)])


def random_source_udp_flood(bed: Testbed, seconds: float) -> ContextManager[Drive]:
    """Small UDP datagrams with a random forged IPv4 source each: the same state as the SYN variant (many
    sources, no single one to block), by another protocol."""
    return _hping(bed, seconds, ["--udp", "--rand-source", "-p", str(UDP_PORT), "-d", "32"])


def forged_source_flood(bed: Testbed, seconds: float) -> ContextManager[Drive]:
    """SYNs from the attacker claiming to come from a benign client (client0): blocking that address would cut
    the benign client off, so it must be protected (the lab's report allowlists it)."""
    return _hping(bed, seconds, ["-S", "-a", bed.benign[0].ipv4, "-p", str(HTTP_PORT)])


@contextlib.contextmanager
def heavy_transfer(bed: Testbed, seconds: float, bitrate: str | None = None) -> Iterator[Drive]:
    """A large TCP transfer client2 -> victim (iperf3), at full speed or paced to ``bitrate`` (iperf3 -b):
    heavy, one source, and benign."""
    # Not one-off (-1): the readiness probe below is a connection too.
    server = bed.spawn("victim", ["iperf3", "-s", "-B", bed.victim.ipv4, "-p", str(IPERF_PORT)], seconds + 10)
    client = None
    try:
        if not bed.wait_for_port(IPERF_PORT, host="client2"):
            raise RuntimeError("iperf3 server did not start in the victim namespace")
        drive = Drive()
        client = bed.spawn("client2", ["iperf3", "-c", bed.victim.ipv4, "-p", str(IPERF_PORT),
                                       "-n", str(int(seconds * TRANSFER_MAX_BYTES_PER_S)),
                                       *(["-b", bitrate] if bitrate else [])], seconds)
        yield drive
    finally:
        if client is not None:
            bed.stop(client)
        bed.stop(server)


def paced_transfer(bed: Testbed, seconds: float) -> ContextManager[Drive]:
    """The same transfer paced to 1.5 Gbit/s: heavy, without the retransmits of a full-speed one (a model that only
    ever saw heavy traffic *with* retransmits took heavy traffic without them for a flood)."""
    return heavy_transfer(bed, seconds, bitrate="1500M")


@contextlib.contextmanager
def api_degraded(bed: Testbed, seconds: float) -> Iterator[Drive]:
    """The victim's API starts failing: half its answers 503, all of them slow, while the clients keep asking."""
    bed.set_api_mode("degraded")
    try:
        yield Drive()
    finally:
        bed.set_api_mode("ok")


TRAFGEN_UDP = "{{ eth(da={vmac}, sa={amac}), ipv4(saddr={aip}, daddr={vip}, ttl=64), udp(sp=drnd(), dp={port}), " \
              "fill(0x41, 18) }}\n"


@contextlib.contextmanager
def ramp(bed: Testbed, seconds: float, final_pps: float = RAMP_FINAL_PPS, steps: int = RAMP_STEPS) -> Iterator[Drive]:
    """A slow linear ramp of small UDP datagrams from one client: ``steps`` equal steps from final/steps up to
    ``final_pps`` over ``seconds``. trafgen paces exactly (hping3 -i cannot); each step is its own process,
    bounded by --num and timeout, one sender process (-P 1), told not to touch socket-memory sysctls or IRQ
    affinity (the long options: trafgen 0.6.8 rejects its own -A/-Q)."""
    cfg = bed.tmp / "ramp.cfg"
    a, v = bed.attacker, bed.victim
    cfg.write_text(TRAFGEN_UDP.format(vmac=v.mac, amac=a.mac, aip=a.ipv4, vip=v.ipv4, port=UDP_PORT))
    drive = Drive(final_rate=float(final_pps))
    step_s = seconds / steps
    done = threading.Event()

    def run() -> None:
        for i in range(1, steps + 1):
            if done.is_set():
                return
            rate = final_pps * i / steps
            drive.steps.append((time.time(), rate))
            proc = bed.spawn(ATTACKER, ["trafgen", "--dev", a.ifname, "--conf", str(cfg), "--rate", f"{int(rate)}pps",
                                        "--num", str(int(rate * step_s)), "--no-sock-mem", "--notouch-irq", "-P", "1"],
                             step_s + 1)
            done.wait(step_s)
            bed.stop(proc)

    thread = threading.Thread(target=run, name="ramp", daemon=True)
    thread.start()
    try:
        yield drive
    finally:
        done.set()
        thread.join(timeout=10)

