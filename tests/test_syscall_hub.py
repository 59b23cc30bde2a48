"""The syscall hub: with syscalls, file_open and http all enabled, the kernel shows ONE program of ours on
raw_syscalls:sys_exit and no classic syscalls:* tracepoint attachment (the kernel's own view, bpftool perf list,
which asks it with BPF_TASK_FD_QUERY), and every count stays exact with the three probes sharing that program.
The classic fallback is checked through the same view, so the attachment assertions can fail."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time

import pytest

from otel_ebpf_receiver.assembly import load_probes
from otel_ebpf_receiver.kernel import bpfsys
from otel_ebpf_receiver.kernel.maps import percpu_array_u64
from otel_ebpf_receiver.probes.file_open import FileOpenProbe
from otel_ebpf_receiver.probes.http import HttpProbe
from otel_ebpf_receiver.probes.syscalls import ERROR_SHARE_PRIOR_CALLS, SyscallsProbe
from otel_ebpf_receiver.probes import syscall_hub

from .helpers import PYTHON, RENAME_SELF, open_file_n_times, syscall_loop, unique_name
from .test_http_probe import CLIENT, PLAN, SERVER, start, stop, tracked_connections

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

GETPPID = {"otel_ebpf_receiver.syscall.name": "getppid"}


def our_attachments(probes=None) -> list[dict]:
    """This process's tracing attachments as the kernel reports them (pid, fd, prog_id, fd_type, tracepoint); with
    ``probes``, only those of their programs (the module's fixture keeps its own loaded meanwhile)."""
    out = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, text=True, timeout=30, check=True)
    ours = [a for a in json.loads(out.stdout) if a["pid"] == os.getpid()]
    if probes is None:
        return ours
    ids = {bpfsys.prog_info(fd).id for p in probes for fd in p.program_fds().values()}
    return [a for a in ours if a["prog_id"] in ids]


def classic_syscall_tracepoints(attachments: list[dict]) -> list[str]:
    return [a["tracepoint"] for a in attachments if a["fd_type"] == "tracepoint"
            and a["tracepoint"].startswith(("sys_enter_", "sys_exit_"))]


def load_three(http_settings: dict | None = None, force: bool = False):
    settings = {"force_tracepoint": force}
    # every path counted (path_sample_shift 0): these tests check the hub's counts exactly at any rate; the
    # sampling of busy paths has its own test (test_probes_bpf.py)
    return load_probes([SyscallsProbe(settings), FileOpenProbe({**settings, "path_sample_shift": 0}),
                        HttpProbe({**settings, **(http_settings or {})})], {}, print)


@pytest.fixture(scope="module")
def three():
    if syscall_hub.unavailable_reason():
        pytest.skip(f"the syscall hub cannot run here: {syscall_hub.unavailable_reason()}")
    probes = load_three()
    try:
        yield {p.name: p for p in probes}
    finally:
        for p in probes:
            p.close()


def test_one_raw_sys_exit_program_and_no_classic_syscall_tracepoint(three):
    assert list(three) == ["syscalls", "file_open", "http"]
    attachments = our_attachments(three.values())
    on_sys_exit = [a for a in attachments if a["fd_type"] == "raw_tracepoint" and a["tracepoint"] == "sys_exit"]
    assert len(on_sys_exit) == 1, attachments
    assert not [a for a in attachments if a["fd_type"] == "raw_tracepoint" and a["tracepoint"] == "sys_enter"]
    assert classic_syscall_tracepoints(attachments) == []
    # The three probes read one program; its cost is reported once, under the three names.
    programs = {bpfsys.prog_info(fd).id for p in three.values() for fd in p.program_fds().values()}
    assert programs == {on_sys_exit[0]["prog_id"]}
    assert {p.cost_name() for p in three.values()} == {"syscalls+file_open+http"}
    assert all(p.mode.startswith("raw_tracepoint") for p in three.values())


def test_the_classic_fallback_is_what_the_hub_replaces():
    probes = load_three(force=True)
    try:
        attachments = our_attachments(probes)
        assert [p.mode for p in probes][0] == "tracepoint"
        classic = classic_syscall_tracepoints(attachments)
        assert {"sys_enter_openat", "sys_exit_openat", "sys_enter_read", "sys_exit_read", "sys_enter_close"} <= set(classic)
        assert not [a for a in attachments if a["fd_type"] == "raw_tracepoint"]
    finally:
        ids = {a["prog_id"] for a in our_attachments(probes)}
        for p in probes:
            p.close()
    assert ids and not ids & {a["prog_id"] for a in our_attachments()}


def test_a_hub_closes_when_its_last_probe_closes():
    probes = load_probes(["syscalls", "file_open"], {}, print)
    try:
        (attached,) = our_attachments(probes)
        probes[0].close()
        assert our_attachments(probes[1:]) == [attached]  # file_open still reads it
        reading = probes[1].read(1.0)
        assert reading.features["file_open.rate_log1p"] >= 0
    finally:
        for p in probes:
            p.close()
    assert attached["prog_id"] not in {a["prog_id"] for a in our_attachments()}


def path_count(probe: FileOpenProbe, path: str) -> int:
    for key, value in probe.bpf["path_counts"].items():
        if key.path.decode("utf-8", "replace") == path:
            return int(value.value)
    return 0


def test_openat_of_a_unique_path_and_getppid_are_counted_exactly(three):
    syscalls, file_open = three["syscalls"], three["file_open"]
    with tempfile.TemporaryDirectory(prefix="otel-ebpf-hub-") as tmp:
        path = os.path.join(tmp, unique_name("p"))
        with open(path, "w") as fh:
            fh.write("x")
        before = path_count(file_open, path)
        syscalls.read(1.0)
        open_file_n_times(unique_name("ho"), path, 1234)
        assert path_count(file_open, path) - before == 1234
    comm = unique_name("hg")
    syscall_loop(comm, 20_000)
    reading = syscalls.read(1.0)
    getppid = sum(v for n, v, a in reading.counters if n == "otel_ebpf_receiver.syscalls" and a == GETPPID)
    assert 20_000 <= getppid <= 20_000 + 200  # other processes rarely call getppid
    failed = sum(v for n, v, a in reading.counters if n == "otel_ebpf_receiver.syscalls.failed"
                 and a["otel_ebpf_receiver.syscall.name"] == "close" and a["error.type"] == "EBADF")
    assert 20_000 <= failed <= 20_000 + 200
    # 20,000 failed closes among ~40,000 calls: the share, with the prior's clean calls a second assumed
    calls = sum(v for n, v, a in reading.counters if n == "otel_ebpf_receiver.syscalls")
    errors = sum(v for n, v, a in reading.counters if n == "otel_ebpf_receiver.syscalls.failed")
    assert reading.features["syscalls.error_ratio"] == pytest.approx(errors / (calls + ERROR_SHARE_PRIOR_CALLS))
    assert 0.3 < reading.features["syscalls.error_ratio"] < 0.5


def test_http_requests_are_counted_exactly_by_method_and_status_with_all_three_probes():
    if syscall_hub.unavailable_reason():
        pytest.skip(f"the syscall hub cannot run here: {syscall_hub.unavailable_reason()}")
    server_comm = unique_name("hh")
    probes = load_three({"comms": server_comm})
    try:
        assert len(our_attachments(probes)) == 1 and probes[2].mode.startswith("raw_tracepoint")
        http = probes[2]
        http.read(1.0)
        server, port = start(SERVER, server_comm)
        try:
            subprocess.run([PYTHON, "-c", CLIENT, unique_name("hc"), str(port), json.dumps(PLAN)], check=True,
                           timeout=60, capture_output=True)
            reading = http.read(1.0)  # while the server runs: it is named from /proc
            # Every connection was accepted by the server's main thread and closed by a handler thread after
            # the client left: each close, seen at sys_exit, forgot its connection.
            deadline = time.monotonic() + 10
            while tracked_connections(http)[:2] != (0, 0) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert tracked_connections(http) == (0, 0, 0)
        finally:
            stop(server)
    finally:
        for p in probes:
            p.close()
    requests: dict[str, float] = {}
    responses: dict[int, float] = {}
    for name, value, attrs in reading.counters:
        assert attrs["process.executable.name"] == server_comm and attrs["server.port"] == port
        if name == "otel_ebpf_receiver.http.requests":
            requests[attrs["http.request.method"]] = requests.get(attrs["http.request.method"], 0) + value
        elif name == "otel_ebpf_receiver.http.responses":
            status = attrs["http.response.status_code"]
            responses[status] = responses.get(status, 0) + value
    assert requests == {"GET": 27, "PUT": 9, "POST": 9, "DELETE": 3}
    assert responses == {200: 24, 404: 7, 201: 9, 500: 5, 204: 3}
    assert sum(sum(buckets.values()) for n, buckets, _, _ in reading.histograms) == 48


# A process named like the watched server: it accepts one connection (tracked), then reads request lines and
# writes status lines through a pipe, thousands of times, on descriptors that were never accepted; then closes
# the connection.
UNTRACKED = ("import os, socket, sys\n" + RENAME_SELF +
             "listener = socket.create_server(('127.0.0.1', 0))\n"
             "client = socket.create_connection(listener.getsockname())\n"
             "conn, _ = listener.accept()\n"
             "r, w = os.pipe()\n"
             "for _ in range(int(sys.argv[2])):\n"
             "    os.write(w, b'GET / HTTP/1.1\\r\\n')\n"
             "    os.read(r, 64)\n"
             "    os.write(w, b'HTTP/1.1 200 OK\\r\\n')\n"
             "    os.read(r, 64)\n"
             "print(len(os.listdir('/proc/self/fd')), flush=True)\n"
             "conn.close()\n"
             "client.close()\n")


def test_reads_and_writes_on_untracked_descriptors_leave_the_http_maps_untouched():
    if syscall_hub.unavailable_reason():
        pytest.skip(f"the syscall hub cannot run here: {syscall_hub.unavailable_reason()}")
    comm = unique_name("hu")
    probes = load_three({"comms": comm})
    try:
        http = probes[2]
        assert http.hub is not None

        def state():
            stats = percpu_array_u64(http.table("stats"))
            held, overflow, overflow_counts = tracked_connections(http)
            return (held + overflow, len(http.bpf["requests"]), len(http.bpf["responses"]),
                    [int(s) for s in stats], overflow_counts)

        before = state()
        subprocess.run([PYTHON, "-c", UNTRACKED, comm, "5000"], check=True, timeout=60, capture_output=True)
        after = state()
    finally:
        for p in probes:
            p.close()
    conns, requests, responses, stats, servers = after
    # No connection went to the overflow hash: the slots' overflow counts stay 0.
    assert servers == before[4] == 0
    assert (conns, requests, responses) == (0, 0, 0)  # the accepted one was forgotten at close
    tracked = HttpProbe.c_constants["STAT_PROBE"]
    assert stats[tracked] - before[3][tracked] == 1  # exactly one connection was tracked: the accepted one
    assert [a - b for a, b in zip(stats, before[3])] == [0, 0, 1] + [0] * (len(stats) - 3)


def getppid_count(probe: SyscallsProbe, calls: int) -> float:
    probe.read(1.0)
    syscall_loop(unique_name("hg"), calls)
    reading = probe.read(1.0)
    return sum(v for n, v, a in reading.counters if n == "otel_ebpf_receiver.syscalls" and a == GETPPID)


def test_where_btf_declares_sys_exit_the_hub_is_typed_and_reads_registers_without_a_helper(three):
    if syscall_hub.btf_type_id() is None:
        pytest.skip("this kernel's BTF does not declare btf_trace_sys_exit")
    hub = three["syscalls"].hub
    assert hub.typed and all("BTF-typed" in p.mode for p in three.values())
    (fd,) = hub.program_fds().values()
    info = bpfsys.prog_info(fd)
    assert info.type == bpfsys.PROG_TYPE_TRACING
    # The helper the untyped program calls on every system call is not in the typed one.
    assert helper_calls(info.id, "bpf_probe_read_kernel") == 0


def helper_calls(prog_id: int, helper: str) -> int:
    """How often the program as the kernel holds it calls ``helper`` (bpftool's translated dump)."""
    out = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(prog_id)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return sum(f"call {helper}" in line for line in out.splitlines())


@pytest.mark.parametrize("type_id", [None, 1], ids=["btf-lacks-the-tracepoint", "kernel-refuses-the-typed-load"])
def test_the_untyped_program_takes_over_and_counts_exactly(monkeypatch, type_id):
    if syscall_hub.unavailable_reason():
        pytest.skip(f"the syscall hub cannot run here: {syscall_hub.unavailable_reason()}")
    # Type 1 is some other kernel type (not the tracepoint's typedef): the verifier refuses the load.
    monkeypatch.setattr(syscall_hub, "btf_type_id", lambda: type_id)
    before = our_attachments()
    probes = load_three()
    try:
        hub = probes[0].hub
        assert hub is not None and not hub.typed and "BTF-typed" not in probes[0].mode
        assert ("does not declare" if type_id is None else "refused") in hub.untyped_reason
        attachments = our_attachments(probes)
        assert [(a["fd_type"], a["tracepoint"]) for a in attachments] == [("raw_tracepoint", "sys_exit")]
        assert helper_calls(attachments[0]["prog_id"], "bpf_probe_read_kernel") == 1
        assert 20_000 <= getppid_count(probes[0], 20_000) <= 20_000 + 200
    finally:
        for p in probes:
            p.close()
    # Nothing of the refused typed attempt is left attached.
    assert our_attachments() == before
