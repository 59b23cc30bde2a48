"""The list layout of the pass path: a 4-byte IPv4 host map, "present" flags that let the program skip a map that
never held an entry (only ever set), and the migration of a pin set made by the previous version (one 16-byte
``block_hosts`` hash), with the previous version's own code and its program left attached by a SIGKILL."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from otel_ebpf_receiver.kernel import bpfsys
from otel_ebpf_receiver.probes.xdp import XdpProbe
from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist
from otel_ebpf_receiver.probes.xdp.lists import VALUE, BlocklistError, encode, parse_cidr

from .xdp_support import UdpSink, blocklist, lab, pin_dir, probe, send_udp, settings  # noqa: F401

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

REPO = Path(__file__).resolve().parent.parent
PREVIOUS_LAYOUT = "179e7a3"  # the last commit whose lists keep single addresses in one 16-byte block_hosts hash
NO_FLAGS = {"block_hosts4": False, "block_hosts6": False, "block_v4": False, "block_v6": False}


def test_a_v4_host_blocks_and_unlisted_sources_pass_with_no_prefix_listed(probe, lab, blocklist):
    c0, c1 = lab.hosts["client0"].ipv4, lab.hosts["client1"].ipv4
    assert blocklist.present() == NO_FLAGS  # an empty list: the program looks nothing up
    sink = UdpSink(lab)
    try:
        send_udp(lab, "client0", 4)
        assert sink.drain() == {c0: 4}
        blocklist.block(c0)
        assert blocklist.present() == {**NO_FLAGS, "block_hosts4": True}  # the IPv4 trie stays skipped
        send_udp(lab, "client0", 7)
        send_udp(lab, "client1", 5)
        assert sink.drain() == {c1: 5}
        assert blocklist.lookup(c0).hits == 7
    finally:
        sink.close()


def test_the_first_prefix_turns_the_trie_on_and_the_flag_stays_set(probe, lab, blocklist):
    c0, c2 = lab.hosts["client0"].ipv4, lab.hosts["client2"].ipv4
    sink = UdpSink(lab)
    try:
        blocklist.block(lab.hosts["client1"].ipv4)  # a host entry first: only its map is looked up
        send_udp(lab, "client2", 3)
        assert sink.drain() == {c2: 3}
        blocklist.block("10.200.0.12/30")  # client2 (.12) and nobody else in the lab
        assert blocklist.present() == {**NO_FLAGS, "block_hosts4": True, "block_v4": True}
        send_udp(lab, "client0", 4)
        send_udp(lab, "client2", 6)
        assert sink.drain() == {c0: 4}
        assert blocklist.lookup("10.200.0.12/30").hits == 6
        # Unblocking leaves the flag set (a stale "present" costs one lookup; a cleared one could race an insert).
        assert blocklist.unblock("10.200.0.12/30")
        assert blocklist.present()["block_v4"]
        send_udp(lab, "client2", 2)
        assert sink.drain() == {c2: 2}
    finally:
        sink.close()


def test_an_entry_put_in_a_map_behind_our_back_gets_its_flag_at_the_next_open(settings, lab, pin_dir):
    """bpftool can insert into a pinned map without setting the flag; whoever opens the lists next sets it."""
    with Blocklist(pin_dir, settings["state_dir"]) as bl:
        assert bl.present() == NO_FLAGS
    fd = bpfsys.obj_get(f"{pin_dir}/block_v4")
    try:
        bpfsys.map_update(fd, encode("block_v4", parse_cidr("203.0.113.0/24")), VALUE.pack(0, 0, 0))
    finally:
        bpfsys.close(fd)
    with Blocklist(pin_dir, settings["state_dir"], reconcile=False) as bl:
        assert bl.present() == {**NO_FLAGS, "block_v4": True}
        assert bl.lookup("203.0.113.0/24") is not None


OLD_AGENT = """
import json, sys, time
from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist
from otel_ebpf_receiver.probes.xdp import XdpProbe
settings, entries = json.loads(sys.argv[1]), json.loads(sys.argv[2])
with Blocklist(settings["pin_dir"], settings["state_dir"]) as bl:
    for cidr, ttl, reason in entries:
        bl.block(cidr, ttl=ttl, reason=reason)
p = XdpProbe(settings)
p.load()
print(json.dumps(p.attached_program_ids()), flush=True)
while True:
    p.read(1.0)
    time.sleep(0.2)
"""


def previous_version(tmp_path: Path) -> Path:
    """The previous version's package and C files, from git (the code that made the old pin sets)."""
    res = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS_LAYOUT, "otel_ebpf_receiver", "bpf"],
                         capture_output=True)
    assert res.returncode == 0, f"git archive {PREVIOUS_LAYOUT}: {res.stderr.decode().strip()}"
    tree = tmp_path / "previous"
    with tarfile.open(fileobj=io.BytesIO(res.stdout)) as tar:
        tar.extractall(tree)  # our own repository's history
    return tree


def raw_value(path: str, key: bytes) -> tuple[int, int, int]:
    fd = bpfsys.obj_get(path)
    try:
        raw = bpfsys.map_lookup(fd, key, VALUE.size)
    finally:
        bpfsys.close(fd)
    assert raw is not None, (path, key.hex())
    return VALUE.unpack(raw)


def test_an_old_layout_pin_set_is_migrated_with_entries_ttls_and_hits(settings, lab, tmp_path):
    """The previous version blocks a v4 host, a v6 host (TTL 1 h) and a prefix, drops traffic, and is SIGKILLed
    (its program stays attached, reading the old map). The CLI refuses to touch that pin set with one line; the
    new agent moves it over — values as they were, reasons from the sidecar — and replaces the old program."""
    old_tree = previous_version(tmp_path)
    c0, c1 = lab.hosts["client0"].ipv4, lab.hosts["client1"].ipv4
    v6 = lab.hosts["client2"].ipv6
    entries = [[c0, None, "old v4 host"], [v6, 3600, "old v6 host"], ["203.0.113.0/24", 3600, "old prefix"]]
    agent = subprocess.Popen([sys.executable, "-c", OLD_AGENT, json.dumps(settings), json.dumps(entries)],
                             stdout=subprocess.PIPE, text=True, cwd=old_tree,
                             env={**os.environ, "PYTHONPATH": str(old_tree)})
    sink = UdpSink(lab)
    probe = None
    try:
        old_ids = json.loads(agent.stdout.readline())
        assert lab.xdp_programs() == old_ids
        pin = settings["pin_dir"]
        assert sorted(os.listdir(pin)) == ["allow_v4", "allow_v6", "block_hosts", "block_v4", "block_v6"]
        send_udp(lab, "client0", 10)
        send_udp(lab, "client2", 3, v6=True)
        send_udp(lab, "client1", 2)
        assert sink.drain() == {c1: 2}
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        assert lab.xdp_programs() == old_ids  # still attached, still reading the old map
        mapped = b"\0" * 10 + b"\xff\xff"
        before_v4 = raw_value(f"{pin}/block_hosts", mapped + parse_cidr(c0).network_address.packed)
        before_v6 = raw_value(f"{pin}/block_hosts", parse_cidr(v6).network_address.packed)
        before_prefix = raw_value(f"{pin}/block_v4", encode("block_v4", parse_cidr("203.0.113.0/24")))
        assert before_v4[0] == 10 and before_v6[0] == 3 and before_v6[2] > time.monotonic_ns()

        # A CLI verb must not migrate under a program that only reads the old map: new entries would be lost on it.
        with pytest.raises(BlocklistError) as info:
            Blocklist(pin, settings["state_dir"])
        assert "\n" not in str(info.value) and "previous version" in str(info.value)
        assert "start the agent" in str(info.value)
        assert os.path.exists(f"{pin}/block_hosts")

        probe = XdpProbe(settings)
        probe.load()
        assert probe.blocklist.migrated is not None
        assert probe.blocklist.migrated.moved == {"block_hosts4": 1, "block_hosts6": 1}
        assert probe.blocklist.migrated.old_programs == old_ids
        assert lab.xdp_programs() == probe.attached_program_ids() != old_ids
        assert sorted(os.listdir(pin)) == ["allow_v4", "allow_v6", "block_hosts4", "block_hosts6", "block_v4",
                                           "block_v6", "list_present"]
        # Values as they were: hits, last hit and the expiry on the kernel's clock.
        assert raw_value(f"{pin}/block_hosts4", parse_cidr(c0).network_address.packed) == before_v4
        assert raw_value(f"{pin}/block_hosts6", parse_cidr(v6).network_address.packed) == before_v6
        assert raw_value(f"{pin}/block_v4", encode("block_v4", parse_cidr("203.0.113.0/24"))) == before_prefix
        assert probe.blocklist.present() == {"block_hosts4": True, "block_hosts6": True, "block_v4": True,
                                             "block_v6": False}
        listed = {e.cidr: e for e in probe.blocklist.list()}
        assert sorted(listed) == [f"{c0}/32", "203.0.113.0/24", f"{v6}/128"]
        assert (listed[f"{c0}/32"].reason, listed[f"{c0}/32"].hits, listed[f"{c0}/32"].expires_at) == \
            ("old v4 host", 10, None)
        assert listed[f"{v6}/128"].reason == "old v6 host"
        assert listed[f"{v6}/128"].expires_at == pytest.approx(time.time() + 3600, abs=30)
        assert probe.expired_at_start == []

        # The new program enforces the migrated lists and counts on the same entries.
        send_udp(lab, "client0", 5)
        send_udp(lab, "client2", 2, v6=True)
        send_udp(lab, "client1", 1)
        assert sink.drain() == {c1: 1}
        assert probe.blocklist.lookup(c0).hits == 15
        assert probe.blocklist.lookup(v6).hits == 5
        # And the CLI works again.
        with Blocklist(pin, settings["state_dir"]) as cli:
            assert cli.migrated is None and cli.lookup(c0).reason == "old v4 host"
    finally:
        sink.close()
        if probe is not None:
            probe.close()
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        if lab.xdp_programs():  # the old program, when the test stopped before the new agent replaced it
            lab.victim.ip("link", "set", "dev", "eth0", "xdp", "off", check=False)


OLD_CLI = """
import json, sys
from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist
pin_dir, state_dir, entries = json.loads(sys.argv[1])
with Blocklist(pin_dir, state_dir) as bl:
    for cidr, ttl, reason in entries:
        bl.block(cidr, ttl=ttl, reason=reason)
"""


def test_with_no_program_attached_the_cli_migrates_an_old_pin_set(pin_dir, tmp_path):
    """The previous version's `block` made the pins and no program uses them (the agent was stopped cleanly): the
    next CLI verb moves them over, says so in one line, and lists every entry with its reason and TTL."""
    old_tree = previous_version(tmp_path)
    state = str(tmp_path / "state")
    entries = [["192.0.2.7", None, "v4 host"], ["2001:db8::7", 600, "v6 host"], ["198.51.100.0/24", None, "prefix"]]
    res = subprocess.run([sys.executable, "-c", OLD_CLI, json.dumps([pin_dir, state, entries])], cwd=old_tree,
                         env={**os.environ, "PYTHONPATH": str(old_tree)}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert os.path.exists(f"{pin_dir}/block_hosts") and not os.path.exists(f"{pin_dir}/block_hosts4")
    out = subprocess.run([sys.executable, "-m", "otel_ebpf_receiver", "blocklist", "list", "--json", "--pin-dir",
                          pin_dir, "--state-dir", state], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"otel-ebpf-receiver: moved 2 single addresses in {pin_dir} to this version's list layout (hits and TTLs "
        f"kept)"]
    listed = {row["cidr"]: row for row in map(json.loads, out.stdout.splitlines())}
    assert {c: r["reason"] for c, r in listed.items()} == {
        "192.0.2.7/32": "v4 host", "2001:db8::7/128": "v6 host", "198.51.100.0/24": "prefix"}
    assert listed["2001:db8::7/128"]["expires_at"] == pytest.approx(time.time() + 600, abs=30)
    assert not os.path.exists(f"{pin_dir}/block_hosts")
    with Blocklist(pin_dir, state) as bl:
        assert bl.migrated is None
        assert bl.present() == {"block_hosts4": True, "block_hosts6": True, "block_v4": True, "block_v6": False}
