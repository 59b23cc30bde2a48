"""The lab's connection and link incidents (issue 13, item 2), each beside a benign look-alike:

* ``connection_refused``: a service on client2 whose upstream on the victim is gone keeps reconnecting, about
  :data:`CONNECT_RATE` times a second; every attempt is answered by a reset.
* ``short_connections`` (benign): the same client at the same rate against an upstream that is there: a connection
  per request, accepted, answered and closed. Busy, healthy churn.
* ``link_degraded``: the lab's switch shaped far below what the clients ask (``tc`` token bucket on every port,
  small queue): answers and requests are dropped on the way and sent again, requests take seconds. ``paced_transfer`` and
  ``heavy_transfer`` are its look-alikes (a full link, healthy).

Every process is bounded in count and time, like every lab load; the shaping is removed when the load ends.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Iterator

from .testbed import Testbed
from .traffic import Drive

CONNECT_RATE = 200.0         # connection attempts per second
UPSTREAM_PORT = 7070         # the short connections' upstream on the victim
CLOSED_PORT = 7071           # nothing listens there
LINK_RATE = "128kbit"        # per switch port: a third of what a client's answers need at 10 requests/s
LINK_BURST = "1600"          # bytes the bucket holds: one full frame at once, no more
LINK_QUEUE = "1600"          # bytes waiting: one full frame; a burst of an answer beyond it is dropped

# A client that opens a connection, reads until the server closes it, and closes; paced; bounded by count and time.
CONNECT_CLIENT = r"""
import socket, sys, time
host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + seconds
next_at = time.monotonic()
for _ in range(int(rate * seconds) + 1):
    if time.monotonic() >= deadline:
        break
    time.sleep(max(0.0, next_at - time.monotonic()))
    next_at = max(next_at + 1.0 / rate, time.monotonic() - 1.0)
    sock = socket.socket()
    sock.settimeout(1.0)
    try:
        sock.connect((host, port))
        while sock.recv(4096):
            pass
    except OSError:
        pass
    finally:
        sock.close()
"""

# An upstream that answers each connection with one line and closes it.
ACCEPT_SERVER = r"""
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=128)
while True:
    conn, _ = server.accept()
    with conn:
        conn.sendall(b"ok\n")
"""


def _reconnecting_client(bed: Testbed, port: int, seconds: float) -> subprocess.Popen:
    return bed.spawn("client2", [sys.executable, "-c", CONNECT_CLIENT, bed.victim.ipv4, str(port),
                                 str(CONNECT_RATE), str(seconds)], seconds + 1)


@contextlib.contextmanager
def connection_refused(bed: Testbed, seconds: float) -> Iterator[Drive]:
    """client2 reconnecting to a port nothing listens on: a reset for every attempt."""
    client = _reconnecting_client(bed, CLOSED_PORT, seconds)
    try:
        yield Drive()
    finally:
        bed.stop(client)


@contextlib.contextmanager
def short_connections(bed: Testbed, seconds: float) -> Iterator[Drive]:
    """client2 opening a connection per request to an upstream that answers: the same rate, healthy."""
    server = bed.spawn("victim", [sys.executable, "-c", ACCEPT_SERVER, bed.victim.ipv4, str(UPSTREAM_PORT)],
                       seconds + 10)
    client = None
    try:
        if not bed.wait_for_port(UPSTREAM_PORT, host="client2"):
            raise RuntimeError("the short connections' upstream did not start in the victim namespace")
        client = _reconnecting_client(bed, UPSTREAM_PORT, seconds)
        yield Drive()
    finally:
        if client is not None:
            bed.stop(client)
        bed.stop(server)


@contextlib.contextmanager
def link_degraded(bed: Testbed, seconds: float) -> Iterator[Drive]:
    """Every port of the lab's switch shaped to :data:`LINK_RATE` with a small queue, while the clients keep asking:
    the victim's answers and its clients' requests are dropped on the way (not in the sender's own queue, which TCP
    would just wait for), so both ends send again and requests take seconds."""
    ports = [bed.lab.switch_port(i) for i in range(len(bed.lab.hosts))]
    try:
        for port in ports:
            shaping = ["tc", "qdisc", "replace", "dev", port, "root", "tbf", "rate", LINK_RATE, "burst", LINK_BURST,
                       "limit", LINK_QUEUE]
            done = bed.lab.switch(*shaping, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"could not shape the lab's link ({' '.join(shaping)}): "
                                   f"{(done.stderr or '').strip() or 'tc failed'}; the kernel needs sch_tbf")
        yield Drive()
    finally:
        for port in ports:
            bed.lab.switch("tc", "qdisc", "del", "dev", port, "root", check=False)
