"""Mitigation rails, each on its own: modes, hard allowlist (also against forged sources), caps, TTL escalation.
The blocklist is the real pinned-map one (a private pin dir per test); sources are given directly."""

from __future__ import annotations

import json
import os
import random
import subprocess
import uuid
from types import SimpleNamespace

import pytest

from otel_ebpf_receiver.assembly import build_mitigator
from otel_ebpf_receiver.config import Config
from otel_ebpf_receiver.errors import AgentError
from otel_ebpf_receiver.mitigation import HardAllowlist, MitigationSettings, Mitigator
from otel_ebpf_receiver.probes.xdp import SourceRate
from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist
from otel_ebpf_receiver.probes.xdp.pins import remove_pins

pytestmark = [pytest.mark.bpf]


@pytest.fixture
def blocklist(tmp_path):
    pin_dir = f"/sys/fs/bpf/oer-test-{uuid.uuid4().hex[:8]}"
    bl = Blocklist(pin_dir, str(tmp_path / "state"))
    try:
        yield bl
    finally:
        bl.close()
        remove_pins(pin_dir)


def flood(address: str, pps: float = 20_000, share: float = 0.9) -> SourceRate:
    return SourceRate(address, pps, pps * 60, 1.0, 60.0, share)


def make(blocklist, mode="enforce", clock=None, allowlist=None, state_file=None, **kw):
    settings = MitigationSettings(mode=mode, **kw)
    events: list[tuple[str, dict]] = []
    allow = allowlist or HardAllowlist.build(settings)
    m = Mitigator(settings, blocklist, allow, emit=lambda n, a: events.append((n, a)),
                  clock=clock or (lambda: 1000.0), state_file=state_file)
    return m, events


def test_off_mode_does_nothing(blocklist):
    m, events = make(blocklist, mode="off")
    assert m.step("network_flood", [flood("10.9.0.1")]) == []
    assert blocklist.lookup("10.9.0.1") is None and not events


def test_dry_run_says_what_it_would_block(blocklist):
    m, events = make(blocklist, mode="dry-run")
    actions = m.step("network_flood", [flood("10.9.0.1")])
    assert [a.kind for a in actions] == ["would_block"]
    assert blocklist.lookup("10.9.0.1") is None
    assert events[0][0] == "mitigation.would_block" and events[0][1]["source.address"] == "10.9.0.1"


def test_enforce_blocks_only_offenders_and_only_under_attack(blocklist):
    m, events = make(blocklist)
    sources = [flood("10.9.0.1"), SourceRate("10.9.0.2", 50, 5000, 0.0, 100, 0.01)]
    assert m.step("normal", sources) == []  # no attack, no action
    actions = m.step("network_flood", sources)
    assert [(a.kind, a.address) for a in actions] == [("block", "10.9.0.1")]
    entry = blocklist.lookup("10.9.0.1")
    assert entry is not None and entry.reason.startswith("auto:")
    assert blocklist.lookup("10.9.0.2") is None
    assert events[0][0] == "mitigation.block"


def test_hard_allowlist_is_never_blocked_even_when_forged(blocklist, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    m, events = make(blocklist, allow=("192.0.2.0/24",))
    own = HardAllowlist.build(MitigationSettings())
    host_addr = next(str(n.network_address) for n in own.networks if own.why[str(n)] == "this host's address"
                     and n.version == 4 and not n.network_address.is_loopback)
    forged = [flood("127.0.0.1"), flood("192.0.2.7"), flood(host_addr), flood("::1"), flood("::ffff:127.0.0.2")]
    actions = m.step("network_flood", forged)
    assert {a.kind for a in actions} == {"skipped"}
    assert all("allowlisted" in a.reason for a in actions)
    assert not blocklist.list()
    # the same forged flood next window is not reported again (one event per source and reason)
    m.step("network_flood", forged)
    assert len(events) == len(forged)


def test_xdp_allowlist_entries_protect_too_and_are_followed(blocklist):
    blocklist.allow("10.20.0.0/16", reason="partner")
    allow = HardAllowlist.build(MitigationSettings(), extra=lambda: [(c, "XDP allowlist") for c in blocklist.cidrs("allow")])
    assert allow.covers("10.20.3.4") == "XDP allowlist"
    blocklist.allow("10.21.0.0/16", reason="added while the agent runs")
    assert allow.covers("10.21.0.1") is None
    assert allow.refresh() and allow.covers("10.21.0.1") == "XDP allowlist"
    allow.close()


def test_rate_cap_and_total_cap(blocklist):
    now = [1000.0]
    m, _ = make(blocklist, clock=lambda: now[0], max_blocks_per_minute=2, max_auto_blocks=3)
    sources = [flood(f"10.9.1.{i}", pps=20_000 - i, share=0.25) for i in range(1, 5)]
    actions = m.step("network_flood", sources)
    assert [a.kind for a in actions] == ["block", "block", "skipped", "skipped"]
    assert "rate cap" in actions[2].reason
    now[0] += 61  # a minute later the rate cap allows two more, but the total cap stops at three
    actions = m.step("network_flood", sources)
    assert [a.kind for a in actions] == ["block", "skipped"]
    assert "total cap" in actions[1].reason
    assert len(blocklist.list()) == 3


def test_ttl_escalates_for_repeat_offenders(blocklist):
    now = [1000.0]
    m, _ = make(blocklist, clock=lambda: now[0], ttl=60, max_ttl=200)
    ttls = []
    for _ in range(4):
        actions = m.step("network_flood", [flood("10.9.2.1")])
        ttls.append(actions[0].ttl)
        blocklist.unblock("10.9.2.1")  # as if it expired
        now[0] += 120
    assert ttls == [60, 120, 200, 200]


def test_a_bulk_transfer_source_is_not_blocked_even_in_an_attack_state(blocklist):
    """Full-size packets are a transfer, not a packet flood: a model that mistakes a large transfer for a UDP flood
    still cannot get its source blocked. The rail can be lifted (0)."""
    transfer = SourceRate("10.9.0.3", 100_000, 100_000 * 1448, 0.0, 1448.0, 0.95)
    m, events = make(blocklist)
    actions = m.step("udp_flood", [transfer, flood("10.9.0.1")])
    assert [(a.kind, a.address) for a in actions] == [("skipped", "10.9.0.3"), ("block", "10.9.0.1")]
    assert "bulk transfer" in actions[0].reason and blocklist.lookup("10.9.0.3") is None
    lifted, _ = make(blocklist, max_bytes_per_packet=0)
    assert [a.kind for a in lifted.step("udp_flood", [transfer])] == ["block"]


def test_a_full_blocklist_skips_the_source_and_the_agent_lives_on(tmp_path):
    pin_dir = f"/sys/fs/bpf/oer-test-{uuid.uuid4().hex[:8]}"
    small = Blocklist(pin_dir, str(tmp_path / "state"), blocklist_entries=2)
    try:
        small.block("198.51.100.1")
        small.block("198.51.100.2")
        m, events = make(small)
        actions = m.step("network_flood", [flood("10.9.3.1")])  # raised ListFull out of step before
        assert [(a.kind, a.address) for a in actions] == [("skipped", "10.9.3.1")]
        assert actions[0].reason.startswith("list full (block_hosts4 is full (2 entries)")
        assert [(n, a["mitigation.reason"].split(" (")[0]) for n, a in events] == [("mitigation.skipped", "list full")]
        reading = m.read(1.0)
        assert ("otel_ebpf_receiver.mitigation.actions", 1,
                {"mitigation.action": "skipped", "mitigation.reason": "list full"}) in reading.counters
        small.unblock("198.51.100.2")  # room again: the next window blocks
        assert [a.kind for a in m.step("network_flood", [flood("10.9.3.1")])] == ["block"]
    finally:
        small.close()
        remove_pins(pin_dir)


def test_dry_run_applies_the_caps_enforce_would(blocklist):
    now = [1000.0]
    m, events = make(blocklist, mode="dry-run", clock=lambda: now[0], max_blocks_per_minute=2, max_auto_blocks=3)
    sources = [flood(f"10.9.1.{i}", pps=20_000 - i, share=0.25) for i in range(1, 5)]
    actions = m.step("network_flood", sources)
    assert [a.kind for a in actions] == ["would_block", "would_block", "skipped", "skipped"]
    assert "rate cap" in actions[2].reason
    now[0] += 61
    actions = m.step("network_flood", sources)  # the first two "are blocked": not again; then the total cap
    assert [(a.kind, a.address) for a in actions] == [("would_block", "10.9.1.3"), ("skipped", "10.9.1.4")]
    assert "total cap" in actions[1].reason
    assert blocklist.list() == []
    assert not m.state_file  # dry-run remembers nothing on disk: would-be offences must not escalate real blocks


def test_state_stays_bounded_under_a_random_source_flood(blocklist):
    """Every window brings new offenders (forged, random): offences, expiries and reported skips are pruned."""
    now = [1000.0]
    m, _ = make(blocklist, mode="dry-run", clock=lambda: now[0], ttl=10, max_ttl=20)
    rnd = random.Random(7)
    for _ in range(3000):
        sources = [flood(f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}", share=0.2)
                   for _ in range(5)]
        m.step("random_source_flood", sources)
        now[0] += 1.0
    # At most 10 blocks a minute, each remembered for ttl + max_ttl; skips for ten quiet minutes.
    assert len(m.offences) <= 10 * 2 and len(m.expiries) <= 10
    assert len(m._skipped_reported) <= 5 * 601
    assert len(m.recent_blocks) <= 10


def test_escalation_and_the_rate_cap_survive_a_restart(blocklist, tmp_path):
    now = [1000.0]
    state_file = tmp_path / "state" / "mitigation.json"
    m, _ = make(blocklist, clock=lambda: now[0], ttl=60, max_ttl=1000, max_blocks_per_minute=2,
                state_file=state_file)
    assert [a.ttl for a in m.step("network_flood", [flood("10.9.4.1")])] == [60]
    assert [a.ttl for a in m.step("network_flood", [flood("10.9.4.2")])] == [60]
    saved = json.loads(state_file.read_text())
    assert saved["offences"]["10.9.4.1"] == [1, 1060.0] and oct(os.stat(state_file).st_mode & 0o777) == "0o600"
    blocklist.unblock("10.9.4.1")

    now[0] += 10  # the agent restarts (a pod replaced) ten seconds later
    restarted, _ = make(blocklist, clock=lambda: now[0], ttl=60, max_ttl=1000, max_blocks_per_minute=2,
                        state_file=state_file)
    actions = restarted.step("network_flood", [flood("10.9.4.1")])
    assert [(a.kind, a.reason.split(" (")[0]) for a in actions] == [("skipped", "rate cap")]
    now[0] += 61
    assert [a.ttl for a in restarted.step("network_flood", [flood("10.9.4.1")])] == [120]  # escalated, not 60

    state_file.write_text("{not json")
    damaged, _ = make(blocklist, clock=lambda: now[0], state_file=state_file)  # starts afresh, no exception
    assert damaged.offences == {}


@pytest.fixture
def host_ns():
    """A network namespace with an address, a default gateway and a resolver set-up of its own."""
    name = f"oer-prot-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "add", "d0", "type", "veth", "peer", "name", "d1"], ["link", "set", "d1", "up"],
                    ["link", "set", "d0", "up"],
                    ["addr", "add", "10.77.0.2/24", "dev", "d0"], ["route", "add", "default", "via", "10.77.0.1"],
                    ["-6", "addr", "add", "fd77::2/64", "dev", "d0", "nodad"],
                    ["-6", "route", "add", "default", "via", "fd77::1"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def stub_resolver(tmp_path, upstream: str):
    """/etc/resolv.conf pointing at systemd-resolved's stub, and its file of upstream servers."""
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.53\noptions edns0\n")
    (tmp_path / "upstream.conf").write_text(upstream)
    return str(tmp_path / "resolv.conf"), str(tmp_path / "upstream.conf")


@pytest.mark.netns
def test_a_forged_flood_claiming_gateway_dns_and_host_blocks_none_of_them(blocklist, host_ns, tmp_path):
    resolv, upstream = stub_resolver(tmp_path, "nameserver 10.77.0.53\nnameserver fd77::53\n")
    settings = MitigationSettings(mode="enforce")
    allow = HardAllowlist.build(settings, netns=[None, host_ns], resolv_conf=resolv, upstream_conf=upstream)
    try:
        assert allow.error is None
        m, events = make(blocklist, allowlist=allow)
        claimed = {"10.77.0.1": "default gateway", "fd77::1": "default gateway", "10.77.0.2": "this host's address",
                   "fd77::2": "this host's address", "10.77.0.53": "DNS resolver", "fd77::53": "DNS resolver",
                   "127.0.0.53": "DNS resolver"}  # the stub itself
        actions = m.step("syn_flood", [flood(a, share=0.3) for a in claimed] + [flood("10.9.9.9", share=0.3)])
        assert {a.address: a.reason for a in actions if a.kind == "skipped"} == {
            a: f"allowlisted ({why})" for a, why in claimed.items()}
        assert [e.cidr for e in blocklist.list()] == ["10.9.9.9/32"]  # 0 protected addresses blocked
    finally:
        allow.close()


@pytest.mark.netns
def test_the_never_block_list_follows_address_route_and_resolver_changes(blocklist, host_ns, tmp_path):
    resolv, upstream = stub_resolver(tmp_path, "nameserver 10.77.0.53\n")
    allow = HardAllowlist.build(MitigationSettings(mode="enforce"), netns=[None, host_ns], resolv_conf=resolv,
                                upstream_conf=upstream)
    try:
        m, _ = make(blocklist, allowlist=allow)
        assert allow.covers("10.77.0.9") is None and allow.covers("10.77.0.54") is None
        subprocess.run(["ip", "-n", host_ns, "addr", "add", "10.77.0.9/24", "dev", "d0"], check=True)
        subprocess.run(["ip", "-n", host_ns, "route", "replace", "default", "via", "10.77.0.254"], check=True)
        with open(upstream, "a") as fh:
            fh.write("nameserver 10.77.0.54\n")
        actions = m.step("syn_flood", [flood(a, share=0.3) for a in ("10.77.0.9", "10.77.0.254", "10.77.0.54")])
        assert {a.address: a.reason for a in actions} == {
            "10.77.0.9": "allowlisted (this host's address)", "10.77.0.254": "allowlisted (default gateway)",
            "10.77.0.54": "allowlisted (DNS resolver)"}
        assert blocklist.list() == []
    finally:
        allow.close()


def test_enforce_refuses_to_start_when_the_host_addresses_cannot_be_read(blocklist, tmp_path, monkeypatch):
    empty = tmp_path / "no-ip-here"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # `ip` cannot be run
    xdp = SimpleNamespace(name="xdp", blocklist=blocklist, netns="",
                          settings={"top_sources": 10, "state_dir": str(tmp_path / "state")})
    telemetry = SimpleNamespace(emit_event=lambda name, attrs: None)
    said: list[str] = []
    with pytest.raises(AgentError) as info:
        build_mitigator(Config(mitigation={"mode": "enforce"}), [xdp], telemetry, None, said.append)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("mitigation enforce refused: cannot list this host's addresses: `ip -j addr show` "
                              "failed (No such file or directory)")
    m = build_mitigator(Config(mitigation={"mode": "dry-run"}), [xdp], telemetry, None, said.append)
    assert m is not None and any("would_block events may name this host's own addresses" in line for line in said)
    m.close()


@pytest.mark.netns
def test_ip_runs_again_only_when_netlink_announces_an_address_or_default_route_change(host_ns, monkeypatch):
    """`ip` processes would show in the agent's own exec and file-open metrics, which the state model reads: quiet
    windows, the periodic recheck and a route to a single network never run it."""
    from otel_ebpf_receiver.probes.xdp import protected

    runs: list[tuple] = []
    real = protected.ip_json
    monkeypatch.setattr(protected, "ip_json", lambda *a, **k: runs.append(a) or real(*a, **k))
    clock = [0.0]
    watched = protected.ProtectedAddresses([host_ns], recheck_every=60, clock=lambda: clock[0])
    try:
        runs.clear()
        for _ in range(3):
            clock[0] += 61  # the recheck is due every time: resolvers and the Collector only
            assert not watched.refresh()
        subprocess.run(["ip", "-n", host_ns, "route", "add", "10.78.0.0/24", "via", "10.77.0.1"], check=True)
        assert not watched.refresh() and runs == []
        subprocess.run(["ip", "-n", host_ns, "addr", "add", "10.77.0.10/24", "dev", "d0"], check=True)
        assert watched.refresh() and len(runs) == 3  # addresses, IPv4 and IPv6 default routes
        assert ("10.77.0.10", "this host's address") in [(str(n.network_address), w) for n, w in watched.entries]
    finally:
        watched.close()
