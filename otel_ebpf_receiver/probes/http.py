"""http: HTTP/1.x requests and responses of server processes on this host — requests per method, responses per
status code, request latency — from syscall tracepoints, API-aware without kprobes or uprobes.

The kernel side tracks only connections a process accepted, each in a phase (new, idle, request pending), and
reads only where an answer can be: the first 8 bytes of a recv while no request is pending, the first 12 of a send
while one is. It matches request lines and status lines in the kernel: counters leave the kernel, payload bytes
never do. Ports are resolved here, from the listening socket each connection was accepted on (/proc/<pid>/fd and
/proc/<pid>/net/tcp{,6}), cached per process.

Out of reach by design: HTTPS (the bytes on the socket are TLS records; seeing the plaintext needs uprobes on the
TLS library), HTTP/2 and HTTP/3, io_uring servers, sendfile-only responses, connections accepted before the agent
started (counted from their next connection on), and the client side of connections (a client on the same host
is not counted twice).
"""

from __future__ import annotations

import ctypes as ct
import math
import os
import operator
import time

from ..kernel import log2hist
from ..kernel.maps import MapSnapshot, per_cpu_rows, percpu_array_u64, u64_words
from .base import (COUNTER, HISTOGRAM, CounterDeltas, Feature, Hook, Metric, Probe, Reading, TopItem, hook_exists,
                   log1p_rate, ratio)
from .contract import COMMON_STATS, STAT_NEW_KEYS, STAT_PROBE, STAT_UPDATE_FAILED, U32, U64, MapContract, dtype, value_type

# enum method in bpf/http.bpf.c, by index (M_NONE is "_OTHER", the semantic convention's name for the rest).
METHODS = ("_OTHER", "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "CONNECT", "TRACE")
SLOTS = log2hist.LATENCY_SLOTS
# Syscalls hooked when the kernel has them (-D define -> syscall); read/write/accept4/close are required.
OPTIONAL_SYSCALLS = {"HAVE_ACCEPT": "accept", "HAVE_RECVFROM": "recvfrom", "HAVE_SENDTO": "sendto",
                     "HAVE_RECVMSG": "recvmsg", "HAVE_SENDMSG": "sendmsg", "HAVE_READV": "readv",
                     "HAVE_WRITEV": "writev"}
PORT_CACHE_SECONDS = 60.0
NEW_LOOKUPS_PER_WINDOW = 16  # /proc scans per interval at most: the cache fills over a few windows under churn
# The status class (2xx...) has no semantic-convention attribute: ours, in our namespace.
STATUS_CLASS = "otel_ebpf_receiver.http.response.status_class"


def method_name(method: int) -> str:
    """enum method -> http.request.method (an index this side does not know is _OTHER)."""
    return METHODS[method if method < len(METHODS) else 0]


def status_class(status: int) -> str:
    """Status code -> its class (2xx...), as the kernel side matches them (100-599)."""
    return f"{status // 100}xx"


def _syscall_pair(name: str) -> tuple[Hook, Hook]:
    return Hook(f"syscalls:sys_enter_{name}"), Hook(f"syscalls:sys_exit_{name}")


def process_command(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", "rb") as fh:
            return fh.read().strip().decode("utf-8", "replace")
    except OSError:
        return None


def listening_port(pid: int, fd: int) -> int | None:
    """Local TCP port of socket ``fd`` of process ``pid``, looked up in that process's network namespace."""
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if not link.startswith("socket:["):
        return None
    inode = link[len("socket:["):-1]
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as fh:
                next(fh, None)  # header
                for line in fh:
                    fields = line.split()
                    if len(fields) > 9 and fields[9] == inode:
                        return int(fields[1].rsplit(":", 1)[1], 16)
        except OSError:
            continue
    return None  # a unix socket, or closed meanwhile


class HttpProbe(Probe):
    name = "http"
    summary = "HTTP/1.x server requests per method, responses per status, latency (plain HTTP only)"
    hooks = (*_syscall_pair("accept4"), Hook("syscalls:sys_enter_close"), *_syscall_pair("read"),
             *_syscall_pair("write"))
    metrics = (
        Metric("otel_ebpf_receiver.http.requests", COUNTER, "{request}",
               "HTTP/1.x requests received by server processes, per method.",
               ("http.request.method", "process.executable.name", "server.port")),
        Metric("otel_ebpf_receiver.http.responses", COUNTER, "{response}",
               "HTTP/1.x responses sent by server processes, per status code and class (2xx...).",
               ("http.response.status_code", STATUS_CLASS, "process.executable.name",
                "server.port")),
        # Not http.server.request.duration: that one ends when the response is complete, ours at its first bytes.
        Metric("otel_ebpf_receiver.http.request.duration", HISTOGRAM, "s",
               "From the read that returned the request line to the write that started the response on the same "
               "connection (time to first response byte, log2 buckets).",
               ("http.request.method", STATUS_CLASS, "process.executable.name", "server.port")),
    )
    features = (
        Feature("http.request_rate_log1p", "log1p(HTTP requests received per second)"),
        Feature("http.server_error_share", "5xx / all responses"),
        Feature("http.client_error_share", "4xx / all responses"),
        Feature("http.get_share", "GET / all requests"),
        Feature("http.post_share", "POST / all requests"),
        Feature("http.put_share", "PUT / all requests"),
        Feature("http.latency_p99_log1p_ms", "log1p(99th percentile request latency in milliseconds, this interval)"),
    )
    # comms: comma-separated process names whose accepted connections are watched ("" = every process). Applied
    # in the kernel at accept time, so it also removes the per-connection cost of everything else.
    # force_tracepoint: the 16 classic syscall tracepoints even where the syscall hub works.
    # connection_slots: the direct-mapped connection table's size (0: max_connections rounded up to a power of
    # two; 32 bytes each): connections whose slot is taken go to a hash of max_connections entries, slower.
    defaults = {"comms": "", "max_connections": 16384, "connection_slots": 0, "max_keys": 4096,
                "force_tracepoint": False}
    maps = {"requests": MapContract(key={"tgid": U32, "listen_fd": U32, "method": U32}, value=U64),
            "responses": MapContract(key={"tgid": U32, "listen_fd": U32, "method": "<u2", "status": "<u2"},
                                     value={"count": U64, "sum_ns": U64, "slots": f"({SLOTS},)<u8"}),
            "stats": MapContract(value=U64)}
    c_constants = {**COMMON_STATS, "M_NONE": 0, **{f"M_{m}": i for i, m in enumerate(METHODS) if i},
                   "LATENCY_SLOTS": SLOTS, "STAT_CONNS_TRACKED": STAT_PROBE, "STAT_CONNS_NOT_HTTP": STAT_PROBE + 1,
                   "STAT_CONNS_OVERFLOW": STAT_PROBE + 2}
    syscall_hub = True

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.comms = [c.strip()[:15] for c in str(self.settings["comms"]).split(",") if c.strip()]
        self._requests = CounterDeltas()
        self._last_responses: dict[tuple[int, ...], list[int]] = {}
        self._owners: dict[tuple[int, int], tuple[float, str, int | None]] = {}

    @classmethod
    def optional_defines(cls) -> list[str]:
        return [d for d, name in OPTIONAL_SYSCALLS.items() if all(hook_exists(h) for h in _syscall_pair(name))]

    def cflags(self) -> list[str]:
        max_conns = int(self.settings["max_connections"])
        slots = int(self.settings["connection_slots"]) or max_conns
        # conn_slots (bpf/http.bpf.c) has a power of two slots, at least connection_slots.
        flags = [f"-DMAX_CONNS={max_conns}", f"-DCONN_SLOT_BITS={max(1, (slots - 1).bit_length())}",
                 f"-DMAX_KEYS={self.settings['max_keys']}",
                 f"-DLATENCY_SLOTS={SLOTS}"] + [f"-D{d}" for d in self.optional_defines()]
        if self.comms:
            flags.append("-DFILTER_COMMS")
        return flags

    def on_loaded(self) -> None:
        if self.comms:
            table = self.bpf["comm_filter"]
            for comm in self.comms:
                key = table.Key()
                key.comm = comm.encode()
                table[key] = ct.c_uint8(1)
        if self.hub is None:
            hooked = ["read", "write"] + [OPTIONAL_SYSCALLS[d] for d in self.optional_defines()]
            self.mode = "tracepoint (" + ", ".join(h for h in hooked if not h.startswith("accept")) + ")"
        self._request_snapshot = MapSnapshot(self.bpf["requests"])
        self._response_snapshot = MapSnapshot(self.bpf["responses"])
        # Read each window as plain Python ints (no numpy, see kernel/maps.py): keys through their ctypes fields,
        # values at the offsets of the layout bcc built (checked against the contract at load)
        responses = self.bpf["responses"]
        value_dt = dtype(value_type(responses))
        self._response_words = value_dt.itemsize // 8
        self._response_ncpu = ct.sizeof(responses.Leaf) // value_dt.itemsize
        self._response_fields = tuple(value_dt.fields[name][1] // 8 for name in ("count", "sum_ns", "slots"))

    # -- naming a (process, listening socket) ---------------------------------------------------------------------
    def _owner(self, tgid: int, listen_fd: int, budget: list[int]) -> tuple[str, int | None]:
        now = time.monotonic()
        cached = self._owners.get((tgid, listen_fd))
        if cached and (now - cached[0] < PORT_CACHE_SECONDS or budget[0] <= 0):
            return cached[1], cached[2]
        if budget[0] <= 0:
            return process_command(tgid) or "[exited]", None
        budget[0] -= 1
        comm = process_command(tgid)
        if comm is None:  # exited: keep the last name we knew
            return (cached[1], cached[2]) if cached else ("[exited]", None)
        port = listening_port(tgid, listen_fd)
        if len(self._owners) > 4096:
            self._owners.clear()
        self._owners[(tgid, listen_fd)] = (now, comm, port)
        return comm, port

    @staticmethod
    def _attrs(comm: str, port: int | None, **extra) -> dict:
        attrs = {**extra, "process.executable.name": comm}
        if port is not None:
            attrs["server.port"] = port
        return attrs

    # -- each window ---------------------------------------------------------------------------------------------
    def read(self, seconds: float) -> Reading:
        reading = Reading()
        budget = [NEW_LOOKUPS_PER_WINDOW]
        per_method = [0] * len(METHODS)

        stats = percpu_array_u64(self.table("stats"))
        # Both maps only hold keys this program inserted, each insert bumping STAT_NEW_KEYS: while it is 0 (no HTTP
        # since load: a host without a web server) they are empty and their walks (every bucket of two 4,096-entry
        # hashes) are skipped. An insert whose bump is not visible yet is read next window; the maps are cumulative.
        seen_http = stats[STAT_NEW_KEYS] > 0
        snap = self._request_snapshot
        n = snap.read() if seen_http else 0
        counts = snap.u64_values(n, ncpu=len(snap.values[0]) if n else 1)
        present = []
        requests: dict[tuple[str, int | None, int], int] = {}
        for key, cumulative in zip(snap.keys, counts):
            tgid, lfd, method = key.tgid, key.listen_fd, key.method
            present.append((tgid, lfd, method))
            delta = self._requests.delta((tgid, lfd, method), cumulative)
            if delta:
                comm, port = self._owner(tgid, lfd, budget)
                method = method if method < len(METHODS) else 0
                requests[(comm, port, method)] = requests.get((comm, port, method), 0) + delta
                per_method[method] += delta
        self._requests.forget_missing(present)
        for (comm, port, method), delta in requests.items():
            reading.counters.append(("otel_ebpf_receiver.http.requests", delta,
                                     self._attrs(comm, port, **{"http.request.method": method_name(method)})))

        responses, histograms, window_slots, entries = self._read_responses(budget) if seen_http \
            else ({}, {}, [0] * SLOTS, 0)
        per_class = [0] * 6
        for (comm, port, status), delta in responses.items():
            per_class[min(status // 100, 5)] += delta
            reading.counters.append(("otel_ebpf_receiver.http.responses", delta, self._attrs(
                comm, port, **{"http.response.status_code": status,
                                 STATUS_CLASS: status_class(status)})))
        for (comm, port, method, klass), (slots, sum_ns) in histograms.items():
            reading.histograms.append(("otel_ebpf_receiver.http.request.duration",
                                       log2hist.buckets_from_slots(slots, "s"), sum_ns / 1e9, self._attrs(
                                           comm, port, **{"http.request.method": method_name(method),
                                                          STATUS_CLASS: f"{klass}xx"})))

        reading.map_update_failures = int(stats[STAT_UPDATE_FAILED])
        reading.map_evictions = max(0, int(stats[STAT_NEW_KEYS]) - n - entries)

        total_requests = sum(per_method)
        total_responses = sum(per_class)
        reading.rate = total_requests / seconds if seconds > 0 else 0.0
        reading.rate_unit = "requests/s"
        if seconds > 0:
            reading.top = [TopItem(f"{klass}xx responses", count / seconds, "responses/s")
                           for klass, count in enumerate(per_class) if count]
        reading.features = {
            "http.request_rate_log1p": log1p_rate(total_requests, seconds),
            "http.server_error_share": ratio(per_class[5], total_responses),
            "http.client_error_share": ratio(per_class[4], total_responses),
            "http.get_share": ratio(per_method[METHODS.index("GET")], total_requests),
            "http.post_share": ratio(per_method[METHODS.index("POST")], total_requests),
            "http.put_share": ratio(per_method[METHODS.index("PUT")], total_requests),
            # quantile() answers in microseconds.
            "http.latency_p99_log1p_ms": math.log1p(log2hist.quantile(window_slots, 0.99) / 1000.0),
        }
        return reading

    def _read_responses(self, budget: list[int]):
        snap = self._response_snapshot
        n = snap.read()
        if not n:
            self._last_responses.clear()
            return {}, {}, [0] * SLOTS, 0
        words, (count_at, sum_at, slots_at) = self._response_words, self._response_fields
        rows = per_cpu_rows(u64_words(snap.values, n * self._response_ncpu * words), self._response_ncpu, words)
        responses: dict[tuple[str, int | None, int], int] = {}
        histograms: dict[tuple[str, int | None, int, int], tuple[list[int], int]] = {}
        window_slots = [0] * SLOTS
        current: dict[tuple[int, ...], list[int]] = {}
        for raw, row in zip(snap.keys, rows):
            tgid, lfd, method, status = raw.tgid, raw.listen_fd, raw.method, raw.status
            key = (tgid, lfd, method, status)
            cumulative = [row[count_at], row[sum_at]] + row[slots_at:slots_at + SLOTS]
            current[key] = cumulative
            previous = self._last_responses.get(key)
            delta = list(map(operator.sub, cumulative, previous)) \
                if previous is not None and all(map(operator.ge, cumulative, previous)) else cumulative
            count = delta[0]
            if not count:
                continue
            comm, port = self._owner(tgid, lfd, budget)
            method = method if method < len(METHODS) else 0
            responses[(comm, port, status)] = responses.get((comm, port, status), 0) + count
            slots = delta[2:]
            window_slots = list(map(operator.add, window_slots, slots))
            hkey = (comm, port, method, min(status // 100, 5))
            old_slots, old_sum = histograms.get(hkey, ([0] * SLOTS, 0))
            histograms[hkey] = (list(map(operator.add, old_slots, slots)), old_sum + delta[1])
        self._last_responses = current
        return responses, histograms, window_slots, n
