"""The blocklist, end to end: a blocked host's traffic is dropped at XDP before any socket sees it, the others
are untouched; prefixes, IPv6, the allowlist, TTLs, feed imports, layout checks, and surviving a killed agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from otel_ebpf_receiver.kernel import bpfsys
from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist
from otel_ebpf_receiver.probes.xdp.lists import BlocklistError
from otel_ebpf_receiver.errors import ProbeError
from otel_ebpf_receiver.probes.xdp import XdpProbe

from .xdp_support import UdpSink, blocklist, counter_where, lab, pin_dir, probe, send_udp, settings  # noqa: F401

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

DROP = {"otel_ebpf_receiver.xdp.verdict": "drop"}
PASS = {"otel_ebpf_receiver.xdp.verdict": "pass"}
ALLOW = {"otel_ebpf_receiver.xdp.verdict": "allow"}


def test_block_drops_one_host_and_leaves_the_others(probe, lab, blocklist):
    c0, c1 = lab.hosts["client0"].ipv4, lab.hosts["client1"].ipv4
    sink = UdpSink(lab)
    try:
        blocklist.block(c0, reason="test")  # a second handle, as the CLI would: the running program sees it
        send_udp(lab, "client0", 20)
        send_udp(lab, "client1", 20)
        assert sink.drain() == {c1: 20}
        reading = probe.read(1.0)
        assert blocklist.lookup(c0).hits == 20
        assert blocklist.lookup(c0).last_hit is not None
        assert counter_where(reading, "otel_ebpf_receiver.xdp.verdicts", DROP) == 20
        assert counter_where(reading, "otel_ebpf_receiver.xdp.dropped_packets", {}) == 20
        assert counter_where(reading, "otel_ebpf_receiver.xdp.verdicts", PASS) == 20
        assert reading.features["xdp.drop_rate_log1p"] > 0
        assert probe.source_window(c0) is None  # dropped traffic counts on the list entry, not as a source

        assert blocklist.unblock(c0)
        send_udp(lab, "client0", 5)
        assert sink.drain() == {c0: 5}
    finally:
        sink.close()


def test_prefixes_and_ipv6(probe, lab, blocklist):
    import socket

    hosts = lab.hosts
    sink4, sink6 = UdpSink(lab), UdpSink(lab, socket.AF_INET6)
    try:
        # client2 is .12 and ::c: these prefixes cover it and nobody else in the lab.
        blocklist.block("10.200.0.12/30")
        blocklist.block("fd00:200::c/126")
        for host in ("client0", "client2"):
            send_udp(lab, host, 10)
            send_udp(lab, host, 10, v6=True)
        assert sink4.drain() == {hosts["client0"].ipv4: 10}
        assert sink6.drain() == {hosts["client0"].ipv6: 10}
        assert blocklist.lookup("10.200.0.12/30").hits == 10
        assert blocklist.lookup("fd00:200::c/126").hits == 10

        # A single IPv6 address goes to the host table; a host inside a blocked prefix counts on the host entry.
        blocklist.block(hosts["client0"].ipv6)
        blocklist.block(hosts["client2"].ipv6)
        send_udp(lab, "client0", 4, v6=True)
        send_udp(lab, "client2", 4, v6=True)
        assert sink6.drain() == {}
        assert blocklist.lookup(hosts["client0"].ipv6).hits == 4
        assert blocklist.lookup(hosts["client2"].ipv6).hits == 4
        assert blocklist.lookup("fd00:200::c/126").hits == 10
        reading = probe.read(1.0)
        assert counter_where(reading, "otel_ebpf_receiver.xdp.dropped_packets", {}) == 28
    finally:
        sink4.close()
        sink6.close()


def test_allowlist_beats_blocklist(probe, lab, blocklist):
    c0, c1 = lab.hosts["client0"].ipv4, lab.hosts["client1"].ipv4
    sink = UdpSink(lab)
    try:
        blocklist.block("10.200.0.0/24")
        blocklist.allow(c1)
        send_udp(lab, "client0", 6)
        send_udp(lab, "client1", 6)
        assert sink.drain() == {c1: 6}
        reading = probe.read(1.0)
        assert counter_where(reading, "otel_ebpf_receiver.xdp.verdicts", ALLOW) == 6
        assert counter_where(reading, "otel_ebpf_receiver.xdp.verdicts", DROP) == 6
        assert blocklist.lookup(c1, "allow").hits == 6
        assert blocklist.lookup("10.200.0.0/24").hits == 6  # only what it dropped
        assert probe.source_window(c1).packets_per_s == 6

        blocklist.disallow(c1)
        send_udp(lab, "client1", 2)
        assert sink.drain() == {}
    finally:
        sink.close()


def test_ttl_expires_in_the_kernel_and_in_the_list(probe, lab, settings):
    events = []
    probe.on_event = lambda name, attrs: events.append((name, attrs))
    c0 = lab.hosts["client0"].ipv4
    sink = UdpSink(lab)
    try:
        with Blocklist(settings["pin_dir"], settings["state_dir"]) as cli:
            cli.block(c0, ttl=1.0, reason="short")
        probe.read(1.0)  # the agent notices the CLI's change and logs it
        assert ("otel_ebpf_receiver.blocklist.block",
                {"blocklist.cidr": f"{c0}/32", "blocklist.list": "block", "blocklist.origin": "external",
                 "blocklist.reason": "short"}) in events
        send_udp(lab, "client0", 3)
        assert sink.drain() == {}
        time.sleep(1.2)
        # The kernel stops matching on its own clock, before the agent's next window removes the entry.
        send_udp(lab, "client0", 2)
        assert sink.drain() == {c0: 2}
        assert probe.blocklist.lookup(c0).hits == 3
        probe.read(1.0)  # the agent's expiry pass removes it and logs it
        assert probe.blocklist.lookup(c0) is None
        assert any(n == "otel_ebpf_receiver.blocklist.expire" and a["blocklist.cidr"] == f"{c0}/32"
                   and a["blocklist.hits"] == 3 for n, a in events)
        send_udp(lab, "client0", 3)
        assert sink.drain() == {c0: 3}
    finally:
        sink.close()


def test_entries_that_expired_while_no_agent_ran_are_removed_at_start(settings, lab):
    with Blocklist(settings["pin_dir"], settings["state_dir"]) as cli:
        cli.block("203.0.113.0/24", ttl=0.5)
        cli.block("198.51.100.7")
    time.sleep(0.7)
    p = XdpProbe(settings)
    p.load()
    try:
        assert p.expired_at_start == ["203.0.113.0/24"]
        assert [e.cidr for e in p.blocklist.list()] == ["198.51.100.7/32"]
    finally:
        p.close()


def test_block_before_the_first_agent_run(settings, lab):
    c0 = lab.hosts["client0"].ipv4
    with Blocklist(settings["pin_dir"], settings["state_dir"]) as cli:  # creates and pins the maps
        cli.block(c0)
    p = XdpProbe(settings)
    p.load()
    sink = UdpSink(lab)
    try:
        send_udp(lab, "client0", 5)
        send_udp(lab, "client1", 5)
        assert sink.drain() == {lab.hosts["client1"].ipv4: 5}
        assert p.blocklist.lookup(c0).hits == 5
    finally:
        sink.close()
        p.close()


def test_import_file_with_good_bad_and_commented_lines(probe, lab, blocklist, tmp_path):
    feed = tmp_path / "bad-ips.txt"
    feed.write_text("# an organisation's list of malicious addresses\n"
                    f"{lab.hosts['client0'].ipv4}\n"
                    "\n"
                    "   203.0.113.0/24   # scanners\n"
                    "not-an-address\n"
                    "2001:db8::/32\n"
                    "10.1.2.3/8\n"
                    f"{lab.hosts['client0'].ipv4}\n"
                    "198.51.100.1/33\n")
    added, skipped = blocklist.import_file(str(feed), ttl=3600)
    assert added == [f"{lab.hosts['client0'].ipv4}/32", "203.0.113.0/24", "2001:db8::/32"]
    assert [(line, why.split(";")[0]) for line, _, why in skipped] == [
        (5, "'not-an-address' is not an IP address or CIDR prefix"),
        (7, "'10.1.2.3/8' has host bits set"),
        (8, "duplicate of line 2"),
        (9, "'198.51.100.1/33': prefix length must be 0-32 for IPv4"),
    ]
    entry = blocklist.lookup("203.0.113.0/24")
    assert entry.reason == "imported from bad-ips.txt" and entry.expires_at == pytest.approx(time.time() + 3600, abs=5)
    # Importing again adds nothing and says why.
    added, skipped = blocklist.import_file(str(feed))
    assert added == [] and ("already blocked" in [why for _, _, why in skipped])

    sink = UdpSink(lab)
    try:
        send_udp(lab, "client0", 4)
        assert sink.drain() == {}
    finally:
        sink.close()
    reading = probe.read(1.0)
    assert ("otel_ebpf_receiver.xdp.blocklist_entries", 2.0, {"network.type": "ipv4"}) in reading.gauges
    assert ("otel_ebpf_receiver.xdp.blocklist_entries", 1.0, {"network.type": "ipv6"}) in reading.gauges


def test_a_pinned_map_with_the_wrong_layout_is_refused(settings, lab, pin_dir):
    os.makedirs(pin_dir, mode=0o700)
    fd = bpfsys.map_create(bpfsys.MAP_TYPE_LPM_TRIE, 8, 16, 1000, bpfsys.BPF_F_NO_PREALLOC, "block_v4")
    bpfsys.obj_pin(fd, f"{pin_dir}/block_v4")
    bpfsys.close(fd)
    with pytest.raises(ProbeError) as info:
        XdpProbe(settings).load()
    message = str(info.value)
    assert "\n" not in message
    assert f"pinned map {pin_dir}/block_v4 has layout [lpm_trie key 8 B value 16 B max_entries 1000" in message
    assert "expected [lpm_trie key 8 B value 24 B max_entries 100000 flags 0x1]" in message
    assert lab.xdp_programs() == []
    # The CLI refuses it too (it adopts any size, but not another value layout).
    with pytest.raises(BlocklistError, match="value 16 B"):
        Blocklist(settings["pin_dir"], settings["state_dir"])


def test_other_sizes_are_refused_by_the_agent_but_adopted_by_the_cli(settings, lab):
    with Blocklist(settings["pin_dir"], settings["state_dir"], blocklist_entries=5000) as cli:
        cli.block("203.0.113.1")
    with pytest.raises(ProbeError, match="max_entries 5000 .*expected .*max_entries 100000"):
        XdpProbe(settings).load()
    with Blocklist(settings["pin_dir"], settings["state_dir"]) as cli:
        assert [e.cidr for e in cli.list()] == ["203.0.113.1/32"]
    p = XdpProbe({**settings, "blocklist_entries": 5000})
    p.load()
    p.close()


AGENT = """
import json, sys, time
from otel_ebpf_receiver.probes.xdp import XdpProbe
p = XdpProbe(json.loads(sys.argv[1]))
p.load()
print(json.dumps(p.attached_program_ids()), flush=True)
while True:
    p.read(1.0)
    time.sleep(0.2)
"""


def test_killed_agent_keeps_dropping_and_a_restart_adopts_the_pins(settings, lab, blocklist):
    """SIGKILL and restart: 0 blocks lost, and 0 stuck past their TTL while no agent ran."""
    c0, c1, c2 = lab.hosts["client0"].ipv4, lab.hosts["client1"].ipv4, lab.hosts["client2"].ipv4
    blocklist.block(c0, reason="before the agent")
    agent = subprocess.Popen([sys.executable, "-c", AGENT, json.dumps(settings)], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sink = UdpSink(lab)
    try:
        first_ids = json.loads(agent.stdout.readline())
        assert lab.xdp_programs() == first_ids
        send_udp(lab, "client0", 10)
        assert sink.drain() == {}
        assert blocklist.lookup(c0).hits == 10

        blocklist.block(c2, ttl=2.0, reason="short, expires while the agent is dead")
        blocked_at = time.monotonic()
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        # Attached through netlink, the program outlives its loader: the blocklist is still enforced.
        assert lab.xdp_programs() == first_ids
        send_udp(lab, "client0", 10)
        send_udp(lab, "client1", 3)
        send_udp(lab, "client2", 4)
        assert sink.drain() == {c1: 3}
        assert blocklist.lookup(c0).hits == 20
        # No agent runs, yet the short TTL runs out: the kernel's clock, not the agent's, decides.
        time.sleep(max(0.0, blocked_at + 2.2 - time.monotonic()))
        send_udp(lab, "client2", 5)
        send_udp(lab, "client0", 10)
        assert sink.drain() == {c2: 5}
        assert blocklist.lookup(c2).hits == 4  # the map entry stays until an agent (or `blocklist`) removes it

        restarted = XdpProbe(settings)
        restarted.load()  # finds its own orphan on eth0 and replaces it in place, adopting the pinned lists
        try:
            assert lab.xdp_programs() == restarted.attached_program_ids() != first_ids
            assert restarted.blocklist.lookup(c0).reason == "before the agent"
            assert restarted.expired_at_start == [f"{c2}/32"] and restarted.blocklist.lookup(c2) is None
            send_udp(lab, "client0", 5)
            assert sink.drain() == {}
            assert restarted.blocklist.lookup(c0).hits == 35  # the hit counter survived both
        finally:
            restarted.close()
        assert lab.xdp_programs() == []
    finally:
        sink.close()
        if agent.poll() is None:
            agent.kill()
