"""Golden tests of the key decoders (how a map key becomes metric attributes), table-driven and unprivileged; and,
with root, of the C <-> Python contract refusing a probe whose layout or constants disagree, with one line."""

from __future__ import annotations

import platform

import pytest

from otel_ebpf_receiver.probes import block_io, http, syscalls, tcp
from otel_ebpf_receiver.probes.xdp import probe as xdp


# ---- syscalls -----------------------------------------------------------------------------------------------

@pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers are per arch; the golden table is x86_64")
@pytest.mark.parametrize("nr,name", [(0, "read"), (1, "write"), (2, "open"), (59, "execve"), (257, "openat"),
                                     (100000, "syscall_100000")])
def test_syscall_names(nr, name):
    assert syscalls.syscall_name(nr, syscalls._syscall_names()) == name


@pytest.mark.parametrize("err,error_type", [(1, "EPERM"), (2, "ENOENT"), (11, "EAGAIN"), (13, "EACCES"),
                                            (110, "ETIMEDOUT"), (4000, "4000")])
def test_errno_to_error_type(err, error_type):
    assert syscalls.error_type(err) == error_type


# ---- tcp ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("state,name", [(1, "established"), (2, "syn_sent"), (3, "syn_recv"), (6, "time_wait"),
                                        (7, "close"), (10, "listen"), (12, "new_syn_recv"), (0, None), (13, None)])
def test_tcp_state_names(state, name):
    assert tcp.state_name(state) == name


@pytest.mark.parametrize("fam,network_type", [(0, "ipv4"), (1, "ipv6")])
def test_tcp_family_index(fam, network_type):
    assert tcp.NETWORK_TYPES[fam] == network_type


@pytest.mark.parametrize("constant,value", [("TCP_STATES", 16), ("IDX_STATE(1, 0)", 16), ("IDX_OPENED_CLIENT", 32),
                                            ("IDX_OPENED_SERVER", 34), ("IDX_CLOSED", 36), ("IDX_RETRANSMITS", 38),
                                            ("IDX_RST_SENT", 40), ("IDX_RST_RECEIVED", 42), ("IDX_CONNECT_FAILED", 44),
                                            ("IDX_CA_RECOVERY", 46), ("IDX_CA_LOSS", 48), ("COUNTERS", 50)])
def test_tcp_constants_checked_against_the_c_file(constant, value):
    assert tcp.TcpProbe.c_constants[constant] == value


# ---- xdp ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slot,network_type,transport", [
    (0, "other", "other"), (4, "ipv4", "other"), (5, "ipv4", "tcp"), (6, "ipv4", "udp"), (7, "ipv4", "icmp"),
    (9, "ipv6", "tcp"), (11, "ipv6", "icmp"),
])
def test_xdp_protocol_slots(slot, network_type, transport):
    assert xdp.protocol_attributes(slot) == {"network.type": network_type, "network.transport": transport}


@pytest.mark.parametrize("table,index,name", [
    (xdp.TCP_FLAGS, 0, "syn"), (xdp.TCP_FLAGS, 1, "syn_ack"), (xdp.TCP_FLAGS, 2, "rst"), (xdp.TCP_FLAGS, 3, "fin"),
    (xdp.VERDICTS, 0, "pass"), (xdp.VERDICTS, 1, "drop"), (xdp.VERDICTS, 2, "allow"),
])
def test_xdp_flag_and_verdict_indexes(table, index, name):
    assert table[index] == name


@pytest.mark.parametrize("constant,value", [
    ("FAM_OTHER", 0), ("FAM_IPV4", 1), ("FAM_IPV6", 2), ("L4_OTHER", 0), ("L4_TCP", 1), ("L4_UDP", 2), ("L4_ICMP", 3),
    ("FLAG_SYN", 0), ("FLAG_SYNACK", 1), ("FLAG_RST", 2), ("FLAG_FIN", 3),
    ("VERDICT_PASS", 0), ("VERDICT_DROP", 1), ("VERDICT_ALLOW", 2), ("PROTO_SLOTS", 12), ("SIZE_SLOTS", 17),
])
def test_xdp_constants_checked_against_the_c_file(constant, value):
    assert xdp.C_CONSTANTS[constant] == value


@pytest.mark.parametrize("raw_hex,address", [
    ("00000000000000000000ffffc0000207", "192.0.2.7"),
    ("20010db8000000000000000000000001", "2001:db8::1"),
    ("00000000000000000000000000000001", "::1"),
])
def test_xdp_source_addresses(raw_hex, address):
    assert xdp.source_address(bytes.fromhex(raw_hex)) == address


# ---- block_io -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dev,major,minor", [(8 << 20 | 0, 8, 0), (8 << 20 | 16, 8, 16), (259 << 20 | 1, 259, 1),
                                             (7 << 20 | 1048575, 7, 1048575)])
def test_block_dev_numbers(dev, major, minor):
    assert block_io.split_dev(dev) == (major, minor)


def test_block_unknown_device_is_major_minor():
    assert block_io.device_name(4095 << 20 | 12345, {}) == "4095:12345"


@pytest.mark.parametrize("direction,name", [(0, "read"), (1, "write")])
def test_block_directions(direction, name):
    assert block_io.DIRECTIONS[direction] == name
    assert block_io.BlockIoProbe.c_constants[f"DIR_{name.upper()}"] == direction


# ---- http ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,name", [(0, "_OTHER"), (1, "GET"), (2, "POST"), (3, "PUT"), (4, "DELETE"),
                                         (5, "HEAD"), (6, "PATCH"), (7, "OPTIONS"), (8, "CONNECT"), (9, "TRACE"),
                                         (10, "_OTHER"), (65535, "_OTHER")])
def test_http_methods(method, name):
    assert http.method_name(method) == name
    if 0 < method < len(http.METHODS):
        assert http.HttpProbe.c_constants[f"M_{name}"] == method


@pytest.mark.parametrize("status,klass", [(100, "1xx"), (200, "2xx"), (204, "2xx"), (301, "3xx"), (404, "4xx"),
                                          (503, "5xx"), (599, "5xx")])
def test_http_status_classes(status, klass):
    assert http.status_class(status) == klass


# ---- the contract refuses a probe that breaks it, with one line (root) ---------------------------------------

def _refusal(probe) -> str:
    from otel_ebpf_receiver.errors import ProbeError

    with pytest.raises(ProbeError) as info:
        probe.load()
    assert probe.bpf is None  # detached and unloaded: nothing half-attached stays behind
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.bpf
def test_a_wrong_value_field_is_refused_at_load():
    from otel_ebpf_receiver.probes.contract import MapContract
    from otel_ebpf_receiver.probes.file_open import FileOpenProbe

    class Wrong(FileOpenProbe):
        maps = {**FileOpenProbe.maps, "comm_counts": MapContract(value={"opens": "<u4", "failed": "<u8"})}

    assert _refusal(Wrong()) == ("probe file_open disabled: bpf/file_open.bpf.c and Python disagree: map comm_counts "
                                 "value field opens is <u8 (8 B) at offset 0 in C, Python reads <u4 (4 B)")


@pytest.mark.bpf
def test_a_missing_field_is_refused_at_load():
    from otel_ebpf_receiver.probes.block_io import BlockIoProbe
    from otel_ebpf_receiver.probes.contract import MapContract

    class Wrong(BlockIoProbe):
        maps = {**BlockIoProbe.maps, "start": MapContract(key={"device": "<u4"})}

    assert _refusal(Wrong()) == ("probe block_io disabled: bpf/block_io.bpf.c and Python disagree: map start key has "
                                 "no field device in C (it has dev, pad, sector)")


@pytest.mark.bpf
def test_a_wrong_array_length_is_refused_at_load():
    from otel_ebpf_receiver.probes.contract import MapContract
    from otel_ebpf_receiver.probes.sched import SchedProbe

    class Wrong(SchedProbe):
        maps = {**SchedProbe.maps, "cpu_stats": MapContract(value={"slots": "(27,)<u8"})}

    assert _refusal(Wrong()) == ("probe sched disabled: bpf/sched.bpf.c and Python disagree: map cpu_stats value field "
                                 "slots is <u8[28] (224 B) at offset 32 in C, Python reads <u8[27] (216 B)")


@pytest.mark.bpf
def test_a_wrong_constant_is_refused_at_load():
    from otel_ebpf_receiver.probes.tcp import TcpProbe

    class Wrong(TcpProbe):
        c_constants = {**TcpProbe.c_constants, "IDX_CLOSED": 37}

    assert _refusal(Wrong()) == ("probe tcp disabled: bpf/tcp.bpf.c and Python disagree: constant IDX_CLOSED is 36 in C, "
                                 "37 in Python")


@pytest.mark.bpf
def test_the_contract_holds_for_every_tracepoint_probe():
    """Every probe but xdp (which needs an interface: tests/test_xdp_units.py checks its maps) loads, passing its
    own contract, and reads once."""
    from otel_ebpf_receiver.probes import REGISTRY

    for name, cls in REGISTRY.items():
        if name == "xdp" or cls.unavailable_reason():
            continue
        probe = cls()
        try:
            probe.load()
            probe.read(1.0)
        finally:
            probe.close()
