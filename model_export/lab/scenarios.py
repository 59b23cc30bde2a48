"""The scenario lab: hosts in network namespaces, the agent's probes watching, scenarios driven one after another —
to record labelled windows for training, and to measure how the running agent detects and mitigates.

    sudo otel-ebpf-receiver lab list
    sudo otel-ebpf-receiver lab record -o build/lab/windows.csv          # then: otel-ebpf-model train ...
    sudo otel-ebpf-receiver lab report --markdown build/lab/report.md    # the detection report (make detection-report)

The hosts (``netlab.Lab``, one virtual switch, nothing routed beyond it; the victim has no default route, so
answers to forged sources die inside the lab)::

    victim   10.200.0.1    JSON API :8080 (Python; healthy or degraded), iperf3 server :5201 while a transfer runs
    client0  10.200.0.10   benign API client (and the address a forged flood claims)
    client1  10.200.0.11   the attacker (hping3, trafgen)
    client2  10.200.0.12   benign API client, iperf3 client

The agent's XDP probe watches the victim's ``eth0`` (setting ``netns``: attached from here, counted there); every
other probe watches the whole host, the lab's own processes included. Host workloads (exec storm, disk I/O, ...)
come from :mod:`model_export.scenarios`.

Every load is bounded twice: a count (``hping3 -c``, ``trafgen --num``, ``iperf3 -n``, requests per client) and a
time (each process runs under ``timeout``), and every process is killed when its scenario ends. Traffic only
flows between the lab's namespaces. Floods run at ``hping3 -i u1`` (about 20-30k packets/s on a 2-core VM): a
flood by any standard, and ``-c`` is honoured (``--flood`` ignores it).

Why this module lives in ``model_export`` and not in the agent package: it drives workloads and records training
windows (with :class:`~model_export.record.Recorder`, like ``otel-ebpf-model record``) and evaluates models — the
toolkit's job. The dependency stays one way (the toolkit imports the agent, never the reverse); the agent's CLI
offers ``lab`` only because it finds this module's :func:`register_cli`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

from otel_ebpf_receiver.netlab import Host, Lab

EPILOG = """\
examples:
  sudo otel-ebpf-receiver lab list
  sudo otel-ebpf-receiver lab record -o rec/lab.csv                                   # the training plan
  sudo otel-ebpf-receiver lab record -o rec/syn.csv --scenarios normal:60,syn_flood:40
  otel-ebpf-model train rec/lab.csv -o build/model --clusters 16 --onnx my.onnx
  sudo otel-ebpf-receiver lab report                                                  # every scenario, ~15 min
  sudo otel-ebpf-receiver lab report --scenarios syn_flood,heavy_transfer --model my.onnx --verbose

record: one row per 1 s window (the agent's feature schema), labelled with the scenario's state. Incidents and
floods skip their first windows (ramp-up) and the seconds after them (drain); benign scenarios are written from
their first window to two after they stopped (starting and stopping are normal too). Single-source floods are
blocked at XDP half way through, so "under attack but mitigated" windows are training data too. Host incidents
run half on a quiet lab and half with the API clients (api_degraded: with them throughout — no clients, no
incident). (`make model` trains with feature weighting, which `otel-ebpf-model train` does not offer:
model_export/default_model.py.)
report: the agent as `run` assembles it (every probe, the bundled model that fits, mitigation in enforce mode)
runs in this process while each scenario goes pre (benign) -> load -> post (benign); prints precision, recall
and F1 per window, time to the first warning, state flip and XDP drop, and false alarms per hour
(model_export/detection.py).
"""

HTTP_PORT = 8080
UDP_PORT = 9999
IPERF_PORT = 5201
HTTP_RATE = 10.0               # requests/s per benign client
FLOOD_MAX_PPS = 60_000         # count bound of a flood: seconds x this (hping3 -i u1 sends 20-30k/s here)
RAMP_FINAL_PPS = 25_000        # where the slow ramp ends: the rate of the floods above
RAMP_STEPS = 20
TRANSFER_MAX_BYTES_PER_S = 4_000_000_000  # iperf3 -n bound: above what a veth pair carries here with XDP on
SERVER_MAX_SECONDS = 4 * 3600  # backstop for the lab's servers (killed at close anyway)

ATTACKER = "client1"
BENIGN = ("client0", "client2")

say_default: Callable[[str], None] = lambda line: print(f"lab: {line}", file=sys.stderr, flush=True)  # noqa: E731


# ---- the test bed ---------------------------------------------------------------------------------------------------

class Testbed:
    """The lab's hosts and servers. A context manager: everything it started or created is gone on exit (processes
    first — a process survives the deletion of its namespace — then namespaces, then the test pin dir)."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, *, pin_dir: str | None = None, state_dir: str | None = None,
                 say: Callable[[str], None] = say_default) -> None:
        self.lab = Lab(clients=3)
        self.say = say
        self.tmp = Path(tempfile.mkdtemp(prefix="oer-lab-"))
        # Our own pin dir unless told otherwise: the lab never touches a real agent's blocklist.
        self.pin_dir = pin_dir or f"/sys/fs/bpf/oer-lab-{os.getpid()}-{self.tmp.name[-6:]}"
        self.state_dir = state_dir or str(self.tmp / "state")
        self._own_pins = pin_dir is None
        self._procs: list[subprocess.Popen] = []
        self._blocklist: Any = None
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Testbed":
        from otel_ebpf_receiver.blocklist import remove_pins

        try:
            self.lab.create()
            if self._own_pins:
                remove_pins(self.pin_dir)
            www = self.tmp / "www"
            www.mkdir()
            (www / "index.html").write_text("<html><body>" + "lab " * 1000 + "</body></html>\n")
            self.set_api_mode("ok")
            self.spawn("victim", [sys.executable, "-c", API_SERVER, self.victim.ipv4, str(HTTP_PORT), str(www),
                                  str(self.api_mode_file)], SERVER_MAX_SECONDS)
            if not self.wait_for_port(HTTP_PORT):
                raise RuntimeError(f"the lab's HTTP server did not come up on {self.victim.ipv4}:{HTTP_PORT}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            procs, self._procs = self._procs, []
        for proc in procs:
            stop(proc)
        if self._blocklist is not None:
            self._blocklist.close()
            self._blocklist = None
        self.lab.close()
        if self._own_pins:
            from otel_ebpf_receiver.blocklist import remove_pins

            remove_pins(self.pin_dir)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the victim's API -------------------------------------------------------------------------------------------
    @property
    def api_mode_file(self) -> Path:
        return self.tmp / "api-mode"

    def set_api_mode(self, mode: str) -> None:
        """``ok`` or ``degraded`` (the server answers half its requests 503, every one slowly); read per request."""
        if mode not in API_MODES:
            raise ValueError(f"API mode must be one of {', '.join(API_MODES)}, not {mode!r}")
        tmp = self.api_mode_file.with_suffix(".new")
        tmp.write_text(mode)
        tmp.replace(self.api_mode_file)

    # -- hosts and settings -------------------------------------------------------------------------------------------
    @property
    def victim(self) -> Host:
        return self.lab.victim

    @property
    def attacker(self) -> Host:
        return self.lab.hosts[ATTACKER]

    @property
    def benign(self) -> list[Host]:
        return [self.lab.hosts[name] for name in BENIGN]

    @property
    def xdp_settings(self) -> dict[str, Any]:
        """probe_settings.xdp for the agent: the victim's eth0, attached from the root namespace, our pin dir."""
        return {"interfaces": [self.victim.ifname], "netns": self.victim.netns, "pin_dir": self.pin_dir,
                "state_dir": self.state_dir}

    @property
    def blocklist(self) -> Any:
        """A handle on the agent's pinned lists, independent of the agent's own (as the CLI would open it)."""
        if self._blocklist is None:
            from otel_ebpf_receiver.blocklist import Blocklist

            self._blocklist = Blocklist(self.pin_dir, self.state_dir)
        return self._blocklist

    # -- processes ----------------------------------------------------------------------------------------------------
    def spawn(self, host: str | Host, argv: Sequence[str], seconds: float, **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` in the host's namespace under ``timeout`` (the time bound), in its own session."""
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        cmd = ["ip", "netns", "exec", self.lab.host(host).netns, "timeout", "-k", "2", f"{max(1, math.ceil(seconds))}",
               *argv]
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        stop(proc)
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)

    def wait_for_port(self, port: int, host: str = "client0", timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lab.inside(host):
                sock = socket.socket()
            try:
                sock.settimeout(0.5)
                sock.connect((self.victim.ipv4, port))
                return True
            except OSError:
                time.sleep(0.1)
            finally:
                sock.close()
        return False

    def clear_auto_blocks(self) -> int:
        """Remove what mitigation added (``auto:`` entries), so that scenarios start from the same lists."""
        from otel_ebpf_receiver.mitigation import AUTO_REASON_PREFIX

        removed = 0
        for entry in self.blocklist.list():
            if (entry.reason or "").startswith(AUTO_REASON_PREFIX) and self.blocklist.unblock(entry.cidr):
                removed += 1
        return removed


def stop(proc: subprocess.Popen) -> None:
    """TERM the process group, KILL it if it is still there after 2 s."""
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


# ---- workloads --------------------------------------------------------------------------------------------------

@dataclass
class Drive:
    """What a running workload tells the lab: when it started and, for a ramp, its steps."""

    started: float = field(default_factory=time.time)            # wall clock, like window timestamps
    steps: list[tuple[float, float]] = field(default_factory=list)  # ramp: (start time, packets/s)
    final_rate: float = 0.0

    def level_at(self, t: float) -> float | None:
        """Share of the ramp's final rate being sent at time ``t`` (None before the first step or if no ramp)."""
        level = None
        for start, rate in self.steps:
            if start <= t:
                level = rate / self.final_rate if self.final_rate else None
        return level


# The victim's service: a small JSON API on Python's http.server — GET /index.html, POST and PUT /api/items — whose
# behaviour the lab switches through a mode file: "ok", or "degraded" (an overloaded backend: every answer 250 ms
# late, every other one 503). Nothing is logged; the process is bounded by the lab's timeout.
API_MODES = ("ok", "degraded")
API_SERVER = r"""
import http.server, itertools, json, sys, time
bind, port, www, mode_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
counter = itertools.count()
page = open(www + "/index.html", "rb").read()

def mode():
    try:
        with open(mode_file) as f:
            return f.read().strip()
    except OSError:
        return "ok"

class Api(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body, ctype="application/json"):
        if mode() == "degraded":
            time.sleep(0.25)
            if next(counter) % 2 == 0:
                status, body, ctype = 503, b'{"error": "backend unavailable"}', "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            self.answer(200, page, "text/html")
        else:
            self.answer(404, b'{"error": "not found"}')

    def body(self):
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self):
        self.answer(201, json.dumps({"created": len(self.body())}).encode())

    def do_PUT(self):
        self.answer(200, json.dumps({"updated": len(self.body())}).encode())

http.server.ThreadingHTTPServer((bind, port), Api).serve_forever()
"""

# A benign client: paced requests in an API's mix (GET 70 %, POST 20 %, PUT 10 %), one line per request
# ("<unix time> <1|0> <seconds>": 1 for a 2xx answer). Bounded by count and time.
HTTP_CLIENT = r"""
import http.client, sys, time
host, port = sys.argv[1], int(sys.argv[2])
rate, seconds, limit = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
METHODS = ("GET", "GET", "POST", "GET", "PUT", "GET", "GET", "POST", "GET", "GET")
deadline = time.monotonic() + seconds
next_at = time.monotonic()
for i in range(limit):
    now = time.monotonic()
    if now >= deadline:
        break
    time.sleep(max(0.0, next_at - now))
    next_at = max(next_at + 1.0 / rate, time.monotonic() - 1.0)
    started, ok = time.time(), 0
    try:
        conn = http.client.HTTPConnection(host, port, timeout=2.0)
        method = METHODS[i % len(METHODS)]
        if method == "GET":
            conn.request("GET", "/index.html")
        else:
            conn.request(method, "/api/items", body=b'{"name": "lab", "qty": 1}',
                         headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        ok = int(200 <= resp.status < 300 and len(resp.read()) > 0)
        conn.close()
    except Exception:
        pass
    print(f"{started:.3f} {ok} {time.time() - started:.4f}", flush=True)
"""


class HttpLoad:
    """Benign HTTP clients in their namespaces against the victim's server; every request's outcome is kept."""

    def __init__(self, bed: Testbed, seconds: float, hosts: Sequence[Host] | None = None,
                 rate: float = HTTP_RATE) -> None:
        self.bed = bed
        self.requests: list[tuple[float, bool, float]] = []
        self._lock = threading.Lock()
        self._procs = []
        self._readers = []
        limit = int(seconds * rate) + 1
        for host in hosts or bed.benign:
            proc = bed.spawn(host, [sys.executable, "-c", HTTP_CLIENT, bed.victim.ipv4, str(HTTP_PORT), str(rate),
                                    str(seconds), str(limit)], seconds + 5, stdout=subprocess.PIPE, text=True)
            reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
            reader.start()
            self._procs.append(proc)
            self._readers.append(reader)

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            parts = line.split()
            if len(parts) == 3:
                with self._lock:
                    self.requests.append((float(parts[0]), parts[1] == "1", float(parts[2])))

    def stop(self) -> None:
        for proc in self._procs:
            self.bed.stop(proc)
        for reader in self._readers:
            reader.join(timeout=5)

    def success(self, since: float = 0.0, until: float = math.inf) -> tuple[int, int]:
        """(succeeded, sent) among requests started in [since, until)."""
        with self._lock:
            chosen = [ok for t, ok, _ in self.requests if since <= t < until]
        return sum(chosen), len(chosen)


@contextlib.contextmanager
def http_load(bed: Testbed, seconds: float, hosts: Sequence[Host] | None = None,
              rate: float = HTTP_RATE) -> Iterator[HttpLoad]:
    load = HttpLoad(bed, seconds, hosts, rate)
    try:
        yield load
    finally:
        load.stop()


@contextlib.contextmanager
def _hping(bed: Testbed, seconds: float, args: Sequence[str], host: str = ATTACKER) -> Iterator[Drive]:
    # -i u1 rather than --flood: hping3 ignores -c in flood mode, and every flood here is bounded in count too.
    count = int(seconds * FLOOD_MAX_PPS)
    drive = Drive()
    proc = bed.spawn(host, ["hping3", "-q", "-i", "u1", "-c", str(count), *args, bed.victim.ipv4], seconds + 1)
    try:
        yield drive
    finally:
        bed.stop(proc)


def syn_flood(bed: Testbed, seconds: float) -> ContextManager[Drive]:
    """TCP SYNs from one client to the victim's HTTP port."""
    return _hping(bed, seconds, ["-S", "-p", str(HTTP_PORT)])


def udp_flood(bed: Testbed, seconds: float) -> ContextManager[Drive]:
    """Small UDP datagrams from one client to a closed port."""
    return _hping(bed, seconds, ["--udp", "-p", str(UDP_PORT), "-d", "32"])


def random_source_flood(bed: Testbed, seconds: float) -> ContextManager[Drive]:
    """SYNs with a random forged IPv4 source each: no single source to block."""
    return _hping(bed, seconds, ["-S", "--rand-source", "-p", str(HTTP_PORT)])


def forged_source_flood(bed: Testbed, seconds: float) -> ContextManager[Drive]:
    """SYNs from the attacker claiming to come from a benign client (client0): blocking that address would cut
    the benign client off, so it must be protected (the lab's report allowlists it)."""
    return _hping(bed, seconds, ["-S", "-a", bed.benign[0].ipv4, "-p", str(HTTP_PORT)])


@contextlib.contextmanager
def heavy_transfer(bed: Testbed, seconds: float, bitrate: str | None = None) -> Iterator[Drive]:
    """A large TCP transfer client2 -> victim (iperf3), at full speed or paced to ``bitrate`` (iperf3 -b):
    heavy, one source, and benign."""
    # Not one-off (-1): the readiness probe below is a connection too.
    server = bed.spawn("victim", ["iperf3", "-s", "-B", bed.victim.ipv4, "-p", str(IPERF_PORT)], seconds + 10)
    client = None
    try:
        if not bed.wait_for_port(IPERF_PORT, host="client2"):
            raise RuntimeError("iperf3 server did not start in the victim namespace")
        drive = Drive()
        client = bed.spawn("client2", ["iperf3", "-c", bed.victim.ipv4, "-p", str(IPERF_PORT),
                                       "-n", str(int(seconds * TRANSFER_MAX_BYTES_PER_S)),
                                       *(["-b", bitrate] if bitrate else [])], seconds)
        yield drive
    finally:
        if client is not None:
            bed.stop(client)
        bed.stop(server)


def paced_transfer(bed: Testbed, seconds: float) -> ContextManager[Drive]:
    """The same transfer paced to 1.5 Gbit/s: heavy, without the retransmits of a full-speed one (a model that only
    ever saw heavy traffic *with* retransmits took heavy traffic without them for a flood)."""
    return heavy_transfer(bed, seconds, bitrate="1500M")


@contextlib.contextmanager
def api_degraded(bed: Testbed, seconds: float) -> Iterator[Drive]:
    """The victim's API starts failing: half its answers 503, all of them slow, while the clients keep asking."""
    bed.set_api_mode("degraded")
    try:
        yield Drive()
    finally:
        bed.set_api_mode("ok")


TRAFGEN_UDP = "{{ eth(da={vmac}, sa={amac}), ipv4(saddr={aip}, daddr={vip}, ttl=64), udp(sp=drnd(), dp={port}), " \
              "fill(0x41, 18) }}\n"


@contextlib.contextmanager
def ramp(bed: Testbed, seconds: float, final_pps: float = RAMP_FINAL_PPS, steps: int = RAMP_STEPS) -> Iterator[Drive]:
    """A slow linear ramp of small UDP datagrams from one client: ``steps`` equal steps from final/steps up to
    ``final_pps`` over ``seconds``. trafgen paces exactly (hping3 -i cannot); each step is its own process,
    bounded by --num and timeout, one sender process (-P 1), told not to touch socket-memory sysctls or IRQ
    affinity (the long options: trafgen 0.6.8 rejects its own -A/-Q)."""
    cfg = bed.tmp / "ramp.cfg"
    a, v = bed.attacker, bed.victim
    cfg.write_text(TRAFGEN_UDP.format(vmac=v.mac, amac=a.mac, aip=a.ipv4, vip=v.ipv4, port=UDP_PORT))
    drive = Drive(final_rate=float(final_pps))
    step_s = seconds / steps
    done = threading.Event()

    def run() -> None:
        for i in range(1, steps + 1):
            if done.is_set():
                return
            rate = final_pps * i / steps
            drive.steps.append((time.time(), rate))
            proc = bed.spawn(ATTACKER, ["trafgen", "--dev", a.ifname, "--conf", str(cfg), "--rate", f"{int(rate)}pps",
                                        "--num", str(int(rate * step_s)), "--no-sock-mem", "--notouch-irq", "-P", "1"],
                             step_s + 1)
            done.wait(step_s)
            bed.stop(proc)

    thread = threading.Thread(target=run, name="ramp", daemon=True)
    thread.start()
    try:
        yield drive
    finally:
        done.set()
        thread.join(timeout=10)


def _host(name: str) -> Callable[[Testbed, float], ContextManager[Drive]]:
    """A host workload from model_export.scenarios (they bound themselves by max_seconds)."""

    @contextlib.contextmanager
    def drive(bed: Testbed, seconds: float) -> Iterator[Drive]:
        from . import scenarios

        with scenarios.SCENARIOS[name](max_seconds=seconds + 5):
            yield Drive()

    drive.__doc__ = f"model_export.scenarios.{name}"
    return drive


# ---- the scenarios -------------------------------------------------------------------------------------------------

BENIGN_KIND, HOST_KIND, FLOOD_KIND, RAMP_KIND = "benign", "host", "flood", "ramp"


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str | None           # training label; None: not training data
    kind: str                   # benign | host | flood | ramp
    summary: str
    drive: Callable[[Testbed, float], ContextManager[Drive]]
    seconds: float = 30.0       # default length of the load
    background: bool = True     # the benign HTTP clients keep going meanwhile
    single_source: bool = False  # one attacker address: per-source mitigation can act
    quiet_half: bool = True     # host incident: recorded half on a quiet lab, half with the clients

    def expect(self, attack_states: Sequence[str]) -> tuple[str, ...]:
        """The reported states that count as detecting this scenario (none for benign ones)."""
        if self.kind in (FLOOD_KIND, RAMP_KIND):
            return tuple(attack_states)
        if self.kind == HOST_KIND:
            return (self.label,) if self.label else ()
        return ()


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("idle", "normal", BENIGN_KIND, "nothing driven, no lab traffic", _host("idle"), 60, background=False),
    Scenario("normal", "normal", BENIGN_KIND, "HTTP clients -> victim, plus host web/file/build work",
             _host("normal"), 90),
    Scenario("dev_work", "normal", BENIGN_KIND, "HTTP clients, plus bcc compiles, C builds, byte-compiling",
             _host("dev_work"), 60),
    Scenario("heavy_transfer", "normal", BENIGN_KIND, "iperf3 client2 -> victim at full speed (must not flag)",
             heavy_transfer, 45),
    Scenario("paced_transfer", "normal", BENIGN_KIND, "iperf3 client2 -> victim paced to 1.5 Gbit/s",
             paced_transfer, 30),
    Scenario("syn_flood", "syn_flood", FLOOD_KIND, "hping3 -S from client1 to :8080", syn_flood, 30,
             single_source=True),
    Scenario("udp_flood", "udp_flood", FLOOD_KIND, "hping3 --udp from client1", udp_flood, 30, single_source=True),
    Scenario("random_source_flood", "random_source_flood", FLOOD_KIND, "hping3 -S --rand-source from client1",
             random_source_flood, 30),
    Scenario("forged_source_flood", "syn_flood", FLOOD_KIND,
             "hping3 -S from client1 forging client0's address (allowlisted in the report)", forged_source_flood, 30,
             single_source=True),
    Scenario("ramp", None, RAMP_KIND, f"trafgen UDP, 0 -> {RAMP_FINAL_PPS} pkt/s linearly in {RAMP_STEPS} steps",
             ramp, 60, single_source=True),
    Scenario("exec_storm", "exec_storm", HOST_KIND, "processes started in a tight shell loop", _host("exec_storm"), 30),
    Scenario("file_open_storm", "file_open_storm", HOST_KIND, "one process opening one file in a loop",
             _host("file_open_storm"), 30),
    Scenario("cpu_saturated", "cpu_saturated", HOST_KIND, "stress-ng --cpu, 2 workers per CPU",
             _host("cpu_saturated"), 30),
    Scenario("disk_io_storm", "io_storm", HOST_KIND, "fio direct random read/write", _host("disk_io_storm"), 30),
    Scenario("db_reads", "normal", BENIGN_KIND,
             "HTTP clients, plus a database reading its volume (loop device, direct I/O) at a steady 250/s",
             _host("db_reads"), 40),
    Scenario("io_degraded", "io_degraded", HOST_KIND,
             "the same database with its storage capped to 25 reads/s (block cgroup): fewer, slow reads",
             _host("io_degraded"), 30),
    Scenario("api_degraded", "api_degraded", HOST_KIND,
             "the victim's API answers every other request 503, all of them 250 ms late", api_degraded, 30,
             quiet_half=False),
)}

# What `lab record` drives by default, and `make model` (model_export.default_model) records: (scenario, seconds).
# Normal is most of it and several kinds of it (idle, mixed, developer work, a heavy transfer), recorded at the
# start and again at the end, so that "normal" is not one narrow cluster a busy-but-healthy host falls outside of.
TRAINING_PLAN: tuple[tuple[str, float], ...] = (
    ("idle", 45), ("normal", 75), ("dev_work", 60), ("heavy_transfer", 40), ("paced_transfer", 30), ("db_reads", 40),
    ("exec_storm", 35), ("file_open_storm", 35), ("cpu_saturated", 35), ("disk_io_storm", 35), ("io_degraded", 40),
    ("api_degraded", 40),
    ("syn_flood", 40), ("udp_flood", 40), ("random_source_flood", 35),
    ("normal", 45), ("idle", 30), ("dev_work", 30),
)

REPORT_PLAN: tuple[str, ...] = (
    "normal", "idle", "dev_work", "heavy_transfer", "paced_transfer", "syn_flood", "udp_flood", "random_source_flood",
    "forged_source_flood", "ramp", "exec_storm", "file_open_storm", "cpu_saturated", "disk_io_storm", "db_reads",
    "io_degraded", "api_degraded",
)


def parse_plan(text: str, default_seconds: float | None = None) -> list[tuple[str, float]]:
    """``name[:seconds],...`` -> [(name, seconds)]; unknown names are refused with the list of known ones."""
    plan = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, secs = item.partition(":")
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        seconds = float(secs) if secs else (default_seconds or SCENARIOS[name].seconds)
        if seconds <= 0:
            raise ValueError(f"scenario {name}: seconds must be > 0")
        plan.append((name, seconds))
    return plan


# ---- recording --------------------------------------------------------------------------------------------------

def record(plan: Sequence[tuple[str, float]], output: str, *, mitigated_half: bool = True, settle_windows: int = 3,
           drain_seconds: float = 4.0, say: Callable[[str], None] = say_default) -> int:
    """Drive ``plan`` in a fresh lab with every probe attached and write the labelled windows to ``output``
    (CSV, the Recorder's format). Returns the number of windows written."""
    from .record import Recorder

    with Testbed(say=say) as bed:
        recorder = Recorder(settings={"xdp": bed.xdp_settings}, say=say)
        say(f"recording with probes {', '.join(p.name for p in recorder.probes)} "
            f"({len(recorder.names)} features); XDP on {bed.victim.netns}/{bed.victim.ifname}")
        recorder.start()
        try:
            for name, seconds in plan:
                scenario = SCENARIOS[name]
                if scenario.label is None:
                    say(f"{name}: not training data (the detection report uses it); skipped")
                    continue
                before = len(recorder.windows)
                record_scenario(recorder, bed, scenario, seconds, mitigated_half=mitigated_half,
                                settle_windows=settle_windows)
                say(f"{name}: {len(recorder.windows) - before} windows labelled {scenario.label}")
                with recorder.labelled(None, settle_windows=0):
                    time.sleep(drain_seconds)  # the load drains before the next label
        finally:
            recorder.stop()
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        return recorder.save(output)


def record_scenario(recorder: Any, bed: Testbed, scenario: Scenario, seconds: float, *, mitigated_half: bool = True,
                    settle_windows: int = 3) -> None:
    """Windows of one scenario under its label. A single-source flood is blocked (at XDP, by a lab-side handle on
    the lists) for its second half: the model must know "flood, being dropped" as the same state. A benign
    scenario is recorded from its first window to two windows after it stopped: starting and ending (a transfer's
    last, partial second) are normal too, and a model that never saw them may call them anything. A host incident
    runs half on a quiet lab and half with the web clients."""
    background = http_load(bed, seconds + settle_windows + 5) if scenario.background else contextlib.nullcontext()
    if scenario.kind == BENIGN_KIND:
        with recorder.labelled(scenario.label, settle_windows=0):
            with background, scenario.drive(bed, seconds + 1):
                time.sleep(seconds)
            time.sleep(2 * recorder.agent.config.interval)
        return
    if scenario.kind == HOST_KIND:
        # An exec storm is the same state on an idle host and on a busy server (recorded with the clients only,
        # default.onnx called a storm without them unknown); an API incident is one only while clients ask.
        with scenario.drive(bed, seconds + settle_windows + 1), recorder.labelled(scenario.label, settle_windows):
            quiet = seconds / 2 if scenario.quiet_half else 0.0
            time.sleep(quiet)
            with http_load(bed, seconds - quiet + 2) if scenario.background else contextlib.nullcontext():
                time.sleep(seconds - quiet)
        return
    with background:
        with scenario.drive(bed, seconds + settle_windows + 1), recorder.labelled(scenario.label, settle_windows):
            if mitigated_half and scenario.kind == FLOOD_KIND and scenario.single_source:
                time.sleep(seconds / 2)
                bed.blocklist.block(bed.attacker.ipv4, ttl=seconds, reason="lab: recording a mitigated flood")
                time.sleep(seconds / 2)
                bed.blocklist.unblock(bed.attacker.ipv4)
            else:
                time.sleep(seconds)


# ---- command line -----------------------------------------------------------------------------------------------

def _cmd_list(args: argparse.Namespace) -> int:
    print(f"{'scenario':22s} {'label':20s} {'kind':7s} {'s':>4s}  what")
    for s in SCENARIOS.values():
        print(f"{s.name:22s} {s.label or '(not training)':20s} {s.kind:7s} {s.seconds:4.0f}  {s.summary}")
    plan = ",".join(f"{n}:{s:.0f}" for n, s in TRAINING_PLAN)
    print(f"\ntraining plan (lab record, make model): {plan}")
    return 0


def _cmd_record(args: argparse.Namespace) -> int:
    from otel_ebpf_receiver.agent import check_privileges

    check_privileges()
    plan = parse_plan(args.scenarios, args.seconds) if args.scenarios else list(TRAINING_PLAN)
    rows = record(plan, args.output, mitigated_half=not args.no_mitigated_half)
    print(f"recorded {rows} windows into {args.output}; next: otel-ebpf-model train {args.output} -o DIR")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from otel_ebpf_receiver.agent import check_privileges

    check_privileges()
    plan = parse_plan(args.scenarios, args.seconds) if args.scenarios else [
        (n, args.seconds or SCENARIOS[n].seconds) for n in REPORT_PLAN]
    from .detection import report, summarize

    results, text = report(plan, pre=args.pre, post=args.post, model=args.model, verbose=args.verbose)
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        rows = [{"scenario": r.name, "kind": r.kind, "confusion": r.confusion(), "prf": r.prf(),
                 "prf_raw": r.prf(raw=True), "first_warning_s": r.first_warning, "first_flip_s": r.first_flip,
                 "first_drop_s": r.first_drop, "blocks": r.blocks, "skipped": r.skipped, "http": r.http,
                 "http_after_block": r.http_after_block, "false_alarms": r.false_alarms(),
                 "windows": [vars(w) for w in r.windows], "attack_start": r.attack_start,
                 "attack_end": r.attack_end, "ramp_steps": r.drive.steps} for r in results]
        Path(args.json).write_text(json.dumps({"summary": summarize(results), "scenarios": rows}, indent=1,
                                              default=str) + "\n")
    return 0


def _one_line_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A bad scenario name or a lab that cannot be built is one line from the CLI, not a traceback."""
    from otel_ebpf_receiver.errors import AgentError, ConfigError

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ValueError as exc:
            raise ConfigError(f"lab: {exc}") from None
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            raise AgentError(f"lab: {exc}") from None

    return run


def _add_commands(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("list", help="the scenarios, their labels and the training plan")
    p.set_defaults(handler=_cmd_list)

    p = sub.add_parser("record", help="drive scenarios and write labelled windows (CSV for otel-ebpf-model train)",
                       epilog=EPILOG, formatter_class=fmt)
    p.add_argument("-o", "--output", required=True, metavar="FILE.csv")
    p.add_argument("--scenarios", metavar="NAME[:SECONDS],...", help="default: the training plan (lab list)")
    p.add_argument("--seconds", type=float, help="seconds per scenario when NAME has none (default: its own)")
    p.add_argument("--no-mitigated-half", action="store_true",
                   help="do not block single-source floods half way (no 'mitigated flood' windows)")
    p.set_defaults(handler=_one_line_errors(_cmd_record))

    p = sub.add_parser("report", help="run scenarios against the agent (enforce mode) and print the detection report",
                       epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--scenarios", metavar="NAME[:SECONDS],...", help="default: " + ",".join(REPORT_PLAN))
    p.add_argument("--seconds", type=float, help="length of each load (default: the scenario's own)")
    p.add_argument("--pre", type=float, default=15.0, help="benign seconds before each load (default 15)")
    p.add_argument("--post", type=float, default=15.0, help="benign seconds after each load (default 15)")
    p.add_argument("--model", metavar="MODEL.onnx", help="score this model instead of the bundled one")
    p.add_argument("--markdown", metavar="FILE.md", help="also write the table here")
    p.add_argument("--json", metavar="FILE.json", help="every window and event, for a closer look")
    p.add_argument("-v", "--verbose", action="store_true", help="print every window of every scenario")
    p.set_defaults(handler=_one_line_errors(_cmd_report))


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``lab {list,record,report}`` to the main command (``otel-ebpf-receiver lab ...``)."""
    p = subparsers.add_parser("lab", help="scenario lab: record labelled windows, or measure detection and mitigation",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])
    _add_commands(p.add_subparsers(dest="lab_command", metavar="{list,record,report}"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m model_export.lab {list,record,report}`` (what ``make detection-report`` runs)."""
    from otel_ebpf_receiver.errors import AgentError

    parser = argparse.ArgumentParser(prog="python -m model_export.lab", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_commands(parser.add_subparsers(dest="lab_command", metavar="{list,record,report}", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
