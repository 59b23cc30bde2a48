"""The blocklist's own rails, without traffic: prefixes that would cut this host off need force (block, import,
and the restore after a reboot), TTLs are bounded, a feed is streamed in batches with bounded lines, and the CLI
says all of it in one line."""

from __future__ import annotations

import ipaddress
import json
import os
import uuid

import pytest

from otel_ebpf_receiver.cli import main
from otel_ebpf_receiver.probes.xdp import blocklist as blocklist_module
from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist
from otel_ebpf_receiver.probes.xdp.feed import IMPORT_BATCH_LINES, MAX_LINE_BYTES
from otel_ebpf_receiver.probes.xdp.lists import BlocklistError, ProtectedAddressCovered
from otel_ebpf_receiver.probes.xdp.pins import remove_pins

pytestmark = [pytest.mark.bpf]


@pytest.fixture
def dirs(tmp_path):
    pin_dir = f"/sys/fs/bpf/oer-test-{uuid.uuid4().hex[:8]}"
    try:
        yield pin_dir, str(tmp_path / "state")
    finally:
        remove_pins(pin_dir)


@pytest.fixture
def bl(dirs):
    with Blocklist(*dirs) as handle:
        yield handle


def own_address(bl: Blocklist) -> ipaddress.IPv4Address:
    """An IPv4 address of this host (not loopback): what a careless prefix would cover."""
    found = [net.network_address for net, why in bl.protected_addresses().entries
             if why == "this host's address" and net.version == 4 and not net.is_loopback]
    assert found, "this test needs a host with an IPv4 address besides loopback"
    return found[0]


def cli(*args: str, dirs: tuple[str, str], capsys) -> tuple[int, str, str]:
    code = main([*args, "--pin-dir", dirs[0], "--state-dir", dirs[1]])
    out, err = capsys.readouterr()
    return code, out, err


def test_two_halves_of_the_internet_need_force(bl):
    for half in ("0.0.0.0/1", "128.0.0.0/1"):
        with pytest.raises(ProtectedAddressCovered) as info:
            bl.block(half)
        assert str(info.value).startswith(f"refusing to block {half}: it covers ")
        assert str(info.value).endswith("; pass --force if that is what you want")
    own = own_address(bl)
    supernet = ipaddress.ip_network(f"{own}/16", strict=False)
    with pytest.raises(ProtectedAddressCovered, match=f"it covers {own} \\(this host's address\\)"):
        bl.block(str(supernet))
    with pytest.raises(ProtectedAddressCovered, match="loopback"):
        bl.block("::1")
    assert bl.list() == []
    entry = bl.block(str(supernet), force=True)
    assert entry.cidr == str(supernet) and bl.sidecar.rows["block"][str(supernet)]["forced"] is True
    with pytest.raises(BlocklistError, match="refusing to block every IPv4 source"):
        bl.block("0.0.0.0/0", force=True)  # never, even forced
    bl.block("198.51.100.0/24")  # covers nothing of ours: no force needed, not marked
    assert "forced" not in bl.sidecar.rows["block"]["198.51.100.0/24"]


def test_cli_block_refuses_a_covering_prefix_in_one_line_and_force_overrides(dirs, capsys):
    code, out, err = cli("block", "0.0.0.0/1", dirs=dirs, capsys=capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("otel-ebpf-receiver: error: refusing to block 0.0.0.0/1: it covers ")
    code, out, err = cli("block", "0.0.0.0/1", "--force", dirs=dirs, capsys=capsys)
    assert code == 0 and out == "blocked 0.0.0.0/1\n"


@pytest.mark.parametrize("ttl,why", [("inf", "is not a duration"), ("1e12", "is not a duration"),
                                     ("315360001", "is longer than ten years"), ("0s", "must be greater than zero")])
def test_cli_ttl_out_of_range_is_one_line(dirs, capsys, ttl, why):
    code, out, err = cli("block", "198.51.100.7", "--ttl", ttl, dirs=dirs, capsys=capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"otel-ebpf-receiver: error: bad duration for --ttl: '{ttl}' {why}")


@pytest.mark.parametrize("ttl", [float("inf"), float("nan"), 1e12, -1.0])
def test_the_api_bounds_ttls_too(bl, ttl):
    with pytest.raises(BlocklistError, match="must be more than zero and at most ten years"):
        bl.block("198.51.100.7", ttl=ttl)  # inf used to overflow converting to kernel nanoseconds


def test_a_zone_id_never_makes_a_second_row_for_one_key(dirs, capsys):
    code, _, err = cli("block", "fe80::1%eth0", dirs=dirs, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "write fe80::1" in err
    assert cli("block", "fe80::1", "--force", dirs=dirs, capsys=capsys)[0] == 0  # link-local of ours: fe80::/64
    code, out, _ = cli("blocklist", "list", "--json", dirs=dirs, capsys=capsys)
    assert [json.loads(line)["cidr"] for line in out.splitlines()] == ["fe80::1/128"]


def test_import_streams_in_batches_and_bounds_lines(bl, tmp_path, monkeypatch):
    lines = [f"198.51.{i // 250}.{i % 250 + 1}" for i in range(2 * IMPORT_BATCH_LINES + 500)]
    lines[3] = "203.0.113." + "9" * (MAX_LINE_BYTES * 3)  # one absurd line in the middle of a feed
    lines[4] = "0.0.0.0/1   # would lock the host out"
    feed = tmp_path / "feed.txt"
    feed.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe not text\n")
    locks = []
    original = blocklist_module.Sidecar.locked

    def counting(self):
        locks.append(len(bl.sidecar.rows["block"]))
        return original(self)

    monkeypatch.setattr(blocklist_module.Sidecar, "locked", counting)
    result = bl.import_file(str(feed), ttl=3600)
    # The lock is taken once per batch (the agent's expiry runs in between), not once for the whole feed.
    assert len(locks) == 3 and locks[0] == 0 and locks[1] > 0
    assert len(result.added) == len(lines) - 2
    assert [(n, why.split(";")[0]) for n, _, why in result.skipped] == [
        (4, f"line longer than {MAX_LINE_BYTES} bytes"),
        (5, "refusing to block 0.0.0.0/1: it covers " + result.skipped[1][2].split("it covers ")[1].split(";")[0]),
        (len(lines) + 1, "not UTF-8 text")]
    assert result.invalid_count == 3
    added, skipped = result  # unpacks as before
    assert added is result.added and skipped is result.skipped
    assert len(bl.cidrs()) == len(lines) - 2


def test_import_with_force_takes_covering_prefixes(bl, tmp_path):
    feed = tmp_path / "feed.txt"
    feed.write_text("0.0.0.0/1\n198.51.100.0/24\n")
    assert bl.import_file(str(feed)).added == ["198.51.100.0/24"]
    assert bl.import_file(str(feed), force=True).added == ["0.0.0.0/1"]
    assert bl.sidecar.rows["block"]["0.0.0.0/1"]["forced"] is True


def test_restore_after_a_reboot_applies_the_same_checks(dirs):
    pin_dir, state_dir = dirs
    with Blocklist(pin_dir, state_dir) as bl:
        bl.block("198.51.100.0/24", reason="kept")
        own = own_address(bl)
        bl.block(f"{own}/32", force=True, reason="forced on purpose")
        rows = bl.sidecar.rows["block"]
        # What a hand-edited (or older) sidecar may hold: none of it may lock the host out after a reboot.
        for cidr in ("0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1", "fe80::1%eth0/128"):
            rows[cidr] = {"reason": "edited by hand", "added_at": 1.0, "expires_at": None}
        rows["192.0.2.300/32"] = {"reason": "garbage", "added_at": 1.0, "expires_at": None}
        bl.sidecar.save()
    remove_pins(pin_dir)  # bpffs is empty after a reboot; the sidecar in the state dir is not
    events = []
    with Blocklist(pin_dir, state_dir, on_event=lambda n, a: events.append((n, a))) as bl:
        assert bl.created
        assert sorted(e.cidr for e in bl.list()) == sorted(["198.51.100.0/24", f"{own}/32"])
        refused = dict(bl.refused_on_restore)
        assert sorted(refused) == sorted(["0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1", "fe80::1%eth0/128",
                                          "192.0.2.300/32"])
        assert refused["0.0.0.0/0"].startswith("refusing to block every IPv4 source")
        assert refused["0.0.0.0/1"].startswith("refusing to block 0.0.0.0/1: it covers")
        assert "zone ID" in refused["fe80::1%eth0/128"]
        assert sorted(bl.cidrs()) == sorted(["198.51.100.0/24", f"{own}/32"])  # refused rows left the sidecar
        assert sum(n == "otel_ebpf_receiver.blocklist.restore_refused" for n, _ in events) == 5


def test_a_host_whose_addresses_cannot_be_read_needs_force(dirs, tmp_path, monkeypatch):
    empty = tmp_path / "no-ip-here"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with Blocklist(*dirs) as bl:
        with pytest.raises(BlocklistError) as info:
            bl.block("198.51.100.0/24")
        assert str(info.value).startswith("cannot list this host's addresses: `ip -j addr show` failed")
        assert str(info.value).endswith("pass --force to block it anyway")
        bl.block("198.51.100.0/24", force=True)
        with pytest.raises(ProtectedAddressCovered, match="loopback"):
            bl.block("127.0.0.0/8", force=False)  # what needs no `ip` is still checked
    assert os.path.exists(dirs[1])
