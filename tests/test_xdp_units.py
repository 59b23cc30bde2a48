"""Unprivileged, table-driven tests of the blocklist's parsing and encoding, and (with root) of the C/Python
layout contract that the pinned maps depend on."""

from __future__ import annotations

import ctypes as ct
import ipaddress

import pytest

from otel_ebpf_receiver.durations import DurationError, format_duration, parse_duration
from otel_ebpf_receiver.probes.xdp import lists, pins, sidecar
from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist
from otel_ebpf_receiver.probes.xdp.lists import BlocklistError, parse_cidr


@pytest.mark.parametrize("text,expected", [
    ("192.0.2.7", "192.0.2.7/32"),
    (" 198.51.100.0/24 ", "198.51.100.0/24"),
    ("2001:db8::1", "2001:db8::1/128"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("::ffff:192.0.2.0/120", "192.0.2.0/24"),      # IPv4-mapped: stored as what matches on the wire
    ("::ffff:192.0.2.7", "192.0.2.7/32"),
])
def test_parse_cidr(text, expected):
    assert str(parse_cidr(text)) == expected


@pytest.mark.parametrize("text,message", [
    ("", "empty address"),
    ("bogus", "'bogus' is not an IP address or CIDR prefix"),
    ("10.1.2.3/8", "'10.1.2.3/8' has host bits set; did you mean 10.0.0.0/8?"),
    ("10.0.0.0/33", "'10.0.0.0/33': prefix length must be 0-32 for IPv4"),
    ("2001:db8::/129", "'2001:db8::/129': prefix length must be 0-128 for IPv6"),
    ("1.2.3/24", "'1.2.3/24' is not an IP address or CIDR prefix"),
    # A zone names a link, not a source: fe80::1%eth0 and fe80::1 would be one map key but two sidecar rows.
    ("fe80::1%eth0", "'fe80::1%eth0': a zone ID (%eth0) is not part of a source address; write fe80::1 "
                     "(it applies on every watched interface)"),
    ("fe80::%2/64", "'fe80::%2/64': a zone ID (%2) is not part of a source address; write fe80::/64 "
                    "(it applies on every watched interface)"),
])
def test_bad_addresses_are_one_clear_line(text, message):
    with pytest.raises(BlocklistError) as info:
        parse_cidr(text)
    assert str(info.value) == message


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400),
                                          ("90", 90), ("1.5h", 5400), ("1w", 604800)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m10", "0s", "-3m", "1h 30m"])
def test_bad_durations(text):
    with pytest.raises(DurationError, match="bad duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds,text", [(5, "5s"), (600, "10m"), (5400, "1h30m"), (90061, "1d1h")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("kind,cidr,map_name,key_hex", [
    ("block", "192.0.2.7/32", "block_hosts4", "c0000207"),
    ("block", "2001:db8::1/128", "block_hosts6", "20010db8000000000000000000000001"),
    ("block", "192.0.2.0/24", "block_v4", "18000000c0000200"),
    ("block", "2001:db8::/32", "block_v6", "2000000020010db8000000000000000000000000"),
    ("allow", "192.0.2.7/32", "allow_v4", "20000000c0000207"),  # the allowlist is tries only
])
def test_keys_are_encoded_as_the_program_reads_them(kind, cidr, map_name, key_hex):
    net = ipaddress.ip_network(cidr)
    assert lists.map_for(kind, net) == map_name
    key = lists.encode(map_name, net)
    assert key.hex() == key_hex
    assert lists.decode(map_name, key) == net


def test_sidecar_per_pin_dir():
    assert str(sidecar.sidecar_path("/sys/fs/bpf/otel-ebpf-receiver", "/var/lib/x")) == "/var/lib/x/blocklist.json"
    assert str(sidecar.sidecar_path("/sys/fs/bpf/test-1", "/var/lib/x")) == "/var/lib/x/blocklist-sys-fs-bpf-test-1.json"


@pytest.mark.parametrize("pin_dir", ["relative", "/sys/fs/bpf/a b", '/sys/fs/bpf/"x', "/sys/fs/bpf/../etc"])
def test_pin_dir_must_be_safe_in_a_c_string(pin_dir):
    with pytest.raises(BlocklistError):
        pins.check_pin_dir(pin_dir)


@pytest.mark.bpf
def test_c_layouts_match_python(tmp_path):
    """bcc's view of every map's key and value must match the sizes Python packs and reads — now the contract the
    probe checks at load (probes/contract.py), run here against a freshly compiled program."""
    from otel_ebpf_receiver.kernel import bpfsys
    from otel_ebpf_receiver.probes import contract
    from otel_ebpf_receiver.probes.base import program_text
    from otel_ebpf_receiver.probes.xdp import probe as xdp

    pin = f"/sys/fs/bpf/oer-units-{id(tmp_path)}"
    pins.remove_pins(pin)
    try:
        with Blocklist(pin, str(tmp_path)):
            pass
        from bcc import BPF

        config_fd = bpfsys.map_create(bpfsys.MAP_TYPE_ARRAY, 4, xdp.CONFIG.size, 1)  # as the probe does
        cflags = [f"-I{xdp.XdpProbe.source_path().parent}", f'-DPIN_DIR="{pin}"', f"-DXDP_CONFIG_FD={config_fd}",
                  f"-DCHECK_PYTHON_CONSTANTS={contract.constant_checks(xdp.C_CONSTANTS)}"]
        try:
            b = BPF(text=program_text(xdp.XdpProbe.source_path()), cflags=cflags)
        finally:
            bpfsys.close(config_fd)
        try:
            for spec in lists.LIST_MAPS:
                t = b[spec.name]
                assert (ct.sizeof(t.Key), ct.sizeof(t.Leaf)) == (spec.key.size, lists.VALUE.size), spec.name
                contract.check_struct_offsets(f"map {spec.name} key", t.Key, lists.field_offsets(spec.key),
                                              spec.key.size)
                contract.check_struct_offsets(f"map {spec.name} value", t.Leaf, lists.field_offsets(lists.VALUE),
                                              lists.VALUE.size)
            for name, map_contract in xdp.MAPS.items():
                contract.check_map(name, b[name], map_contract)
            assert ct.sizeof(b["per_source"].Key) == 16
            window = contract.dtype(b["per_source"].Leaf).fields["win"][0]
            assert window.shape == (2,) and ct.sizeof(b["per_source"].Leaf) == 2 * window.base.itemsize
            totals = contract.dtype(contract.value_type(b["xdp_totals"]))  # per CPU
            assert ct.sizeof(b["xdp_totals"].sLeaf) == totals.itemsize
            assert totals.fields["packets"][0].shape == (xdp.PROTO_SLOTS,)
        finally:
            b.cleanup()
    finally:
        pins.remove_pins(pin)
