"""Mitigation rails, each on its own: modes, hard allowlist (also against forged sources), caps, TTL escalation.
The blocklist is the real pinned-map one (a private pin dir per test); sources are given directly."""

from __future__ import annotations

import uuid

import pytest

from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist
from otel_ebpf_receiver.mitigation import HardAllowlist, MitigationSettings, Mitigator
from otel_ebpf_receiver.probes.xdp import SourceRate

pytestmark = [pytest.mark.bpf]


@pytest.fixture
def blocklist(tmp_path):
    pin_dir = f"/sys/fs/bpf/oer-test-{uuid.uuid4().hex[:8]}"
    bl = Blocklist(pin_dir, str(tmp_path / "state"))
    try:
        yield bl
    finally:
        bl.close()
        from otel_ebpf_receiver.probes.xdp.pins import remove_pins

        remove_pins(pin_dir)


def flood(address: str, pps: float = 20_000, share: float = 0.9) -> SourceRate:
    return SourceRate(address, pps, pps * 60, 1.0, 60.0, share)


def make(blocklist, mode="enforce", clock=None, **kw):
    settings = MitigationSettings(mode=mode, **kw)
    events: list[tuple[str, dict]] = []
    allow = HardAllowlist.build(settings)
    m = Mitigator(settings, blocklist, allow, emit=lambda n, a: events.append((n, a)),
                  clock=clock or (lambda: 1000.0))
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


def test_xdp_allowlist_entries_protect_too(blocklist):
    blocklist.allow("10.20.0.0/16", reason="partner")
    allow = HardAllowlist.build(MitigationSettings(), extra=[(e.cidr, "XDP allowlist") for e in blocklist.list("allow")])
    assert allow.covers("10.20.3.4") == "XDP allowlist"


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
