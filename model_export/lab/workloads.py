"""Host workloads the project drives itself to record labelled windows (for the bundled models and the lab).

Each is a context manager that starts a bounded load and stops it on exit; every loop also stops
by itself after ``max_seconds`` so a crashed driver never leaves load behind. Traffic stays on loopback or
between namespaces the lab created.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .pressure import batch_cpu, cache_reads, memory_pressure
from .processes import DEFAULT_MAX_SECONDS, children, python_loop


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def local_http_server(directory: str) -> Iterator[str]:
    handler = lambda *a, **k: _QuietHandler(*a, directory=directory, **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def normal(max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[None]:
    """A mixed, moderate workload: web requests to a local server, file writes and reads, small builds."""
    with tempfile.TemporaryDirectory(prefix="oer-normal-") as tmp:
        Path(tmp, "index.html").write_text("<html>" + "x" * 4096 + "</html>")
        Path(tmp, "hello.c").write_text("#include <stdio.h>\nint main(void){puts(\"hi\");return 0;}\n")
        stop = threading.Event()
        deadline = time.monotonic() + max_seconds

        def web(url: str) -> None:
            while not stop.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(url + "/index.html", timeout=2).read()
                stop.wait(0.05)

        def files() -> None:
            data = os.urandom(256 * 1024)
            i = 0
            while not stop.is_set() and time.monotonic() < deadline:
                path = Path(tmp, f"data-{i % 8}.bin")
                path.write_bytes(data)
                path.read_bytes()
                i += 1
                stop.wait(0.2)

        def builds() -> None:
            gcc = shutil.which("gcc") or shutil.which("cc")
            while not stop.is_set() and time.monotonic() < deadline:
                if gcc:
                    subprocess.run([gcc, "-O1", "-o", f"{tmp}/hello", f"{tmp}/hello.c"], check=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    subprocess.run([f"{tmp}/hello"], check=False, stdout=subprocess.DEVNULL)
                stop.wait(2.0)

        with local_http_server(tmp) as url:
            threads = [threading.Thread(target=web, args=(url,), daemon=True),
                       threading.Thread(target=files, daemon=True), threading.Thread(target=builds, daemon=True)]
            for t in threads:
                t.start()
            try:
                yield
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=5)


_BCC_PROGRAM = """#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include <net/sock.h>
BPF_HASH(counts, u32, u64);
int probe(struct pt_regs *ctx) { u32 pid = bpf_get_current_pid_tgid(); counts.increment(pid); return 0; }
"""


@contextlib.contextmanager
def dev_work(max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[None]:
    """A developer's host building and testing this project: bcc compiling BPF programs (clang reading hundreds
    of kernel headers; compiled, never loaded or attached), C builds, Python byte-compiling, a few short-lived
    tools — bursty, but normal. One driver process, paced (one round, then a pause)."""
    with tempfile.TemporaryDirectory(prefix="oer-dev-") as tmp:
        Path(tmp, "hello.c").write_text("#include <stdio.h>\nint main(void){puts(\"hi\");return 0;}\n")
        gcc = shutil.which("gcc") or shutil.which("cc") or "true"
        body = (
            "import glob, py_compile, subprocess\n"
            "try:\n"
            "    from bcc import BPF\n"
            f"    BPF(text={_BCC_PROGRAM!r}).cleanup()\n"
            "except Exception:\n"
            "    pass\n"
            f"subprocess.run([{gcc!r}, '-O2', '-o', {tmp!r} + '/hello', {tmp!r} + '/hello.c'], check=False)\n"
            f"subprocess.run([{tmp!r} + '/hello'], check=False, stdout=subprocess.DEVNULL)\n"
            "for i, src in enumerate(sorted(glob.glob(os.path.dirname(os.__file__) + '/[a-h]*.py'))[:40]):\n"
            f"    py_compile.compile(src, cfile={tmp!r} + f'/m{{i}}.pyc')\n"
            "subprocess.run(['git', '--version'], check=False, stdout=subprocess.DEVNULL)\n"
            "time.sleep(1.0)"
        )
        with children([python_loop(body, max_seconds)]):
            yield


@contextlib.contextmanager
def exec_storm(max_seconds: float = DEFAULT_MAX_SECONDS, workers: int = 1) -> Iterator[None]:
    """Processes started as fast as one shell loop can: the talk's execve example gone wrong."""
    loop = f"end=$(( $(date +%s) + {int(max_seconds)} )); while [ $(date +%s) -lt $end ]; do " \
           + "for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done; done"
    with children([["/bin/sh", "-c", loop] for _ in range(workers)]):
        yield


@contextlib.contextmanager
def file_open_storm(max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[None]:
    """One process opening the same file in a tight loop ("how many times is this file opened")."""
    with tempfile.NamedTemporaryFile(prefix="oer-hot-") as hot:
        body = f"for _ in range(1000):\n    os.close(os.open({hot.name!r}, os.O_RDONLY))"
        with children([python_loop(body, max_seconds)]):
            yield


@contextlib.contextmanager
def cpu_saturated(max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[None]:
    """Every CPU busy twice over: user-space spinning, almost no system calls."""
    workers = 2 * (os.cpu_count() or 1)
    if shutil.which("stress-ng"):
        argv = [["stress-ng", "--cpu", str(workers), "--timeout", f"{int(max_seconds)}s", "--quiet"]]
    else:
        argv = [python_loop("x = sum(i * i for i in range(10000))", max_seconds) for _ in range(workers)]
    with children(argv):
        yield


@contextlib.contextmanager
def disk_io_storm(max_seconds: float = DEFAULT_MAX_SECONDS, directory: str | None = None) -> Iterator[None]:
    """Direct-I/O random reads and writes on a scratch file (fio when available)."""
    with tempfile.TemporaryDirectory(prefix="oer-io-", dir=directory or "/var/tmp") as tmp:
        if shutil.which("fio"):
            # --thread: fio's job processes would call setsid() and outlive the kill below (until --runtime).
            argv = [["fio", "--name=storm", f"--directory={tmp}", "--size=256M", "--rw=randrw", "--bs=4k",
                     "--direct=1", "--ioengine=psync", "--numjobs=2", "--thread", f"--runtime={int(max_seconds)}",
                     "--time_based", "--output=/dev/null"]]
        else:
            argv = [["dd", "if=/dev/zero", f"of={tmp}/f", "bs=1M", "count=2048", "oflag=direct"]]
        with children(argv):
            yield


# ---- a database volume whose storage gets slow (io_degraded) ------------------------------------------------------

DB_READ_IOPS = 250          # the healthy reader's paced rate: 4 KiB random reads per second
DB_DEGRADED_IOPS = 25       # what the throttled backing store still serves
DB_VOLUME_MIB = 64


def _whole_disk(dev: int) -> str:
    """``MAJ:MIN`` of the disk holding ``dev`` (the parent of a partition): block throttling is per disk."""
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sysfs.exists():
        raise RuntimeError(f"device {os.major(dev)}:{os.minor(dev)} is not a block device (a tmpfs or overlay?); "
                           "put the database volume's backing file on a disk-backed filesystem")
    if (sysfs / "partition").exists():
        return (sysfs.resolve().parent / "dev").read_text().strip()
    return f"{os.major(dev)}:{os.minor(dev)}"


class BlockThrottle:
    """A block-I/O cgroup whose reads from one disk can be capped: cgroup v2 ``io.max`` where the io controller is
    available, else cgroup v1 ``blkio.throttle.read_iops_device``."""

    def __init__(self, disk: str, name: str) -> None:
        self.disk = disk
        v2_root = Path("/sys/fs/cgroup")
        controllers = v2_root / "cgroup.controllers"
        if controllers.exists() and "io" in controllers.read_text().split():
            subtree = v2_root / "cgroup.subtree_control"
            if "io" not in subtree.read_text().split():
                subtree.write_text("+io")
            self.path, self.v2 = v2_root / name, True
        elif Path("/sys/fs/cgroup/blkio/blkio.throttle.read_iops_device").exists():
            self.path, self.v2 = Path("/sys/fs/cgroup/blkio") / name, False
        else:
            raise RuntimeError("no block-I/O cgroup controller (cgroup v2 io or v1 blkio) to throttle a reader with")
        self.path.mkdir(exist_ok=True)

    def join(self) -> None:
        """Move the calling process into the group (a child calls this before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def limit_reads(self, iops: int | None) -> None:
        """Cap reads from the disk at ``iops`` per second; None lifts the cap."""
        if self.v2:
            (self.path / "io.max").write_text(f"{self.disk} riops={iops if iops else 'max'}")
        else:
            (self.path / "blkio.throttle.read_iops_device").write_text(f"{self.disk} {iops or 0}")

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.limit_reads(None)
        for _ in range(50):  # rmdir fails while the killed reader is still being reaped
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


@dataclass
class DatabaseVolume:
    """What ``database_reads`` yields: the volume's loop device and a handle on its storage's speed."""

    device: str
    throttle: BlockThrottle

    @contextlib.contextmanager
    def slowed(self, iops: int = DB_DEGRADED_IOPS) -> Iterator[None]:
        """The storage capped to ``iops`` reads/s while inside; full speed again after."""
        self.throttle.limit_reads(iops)
        try:
            yield
        finally:
            self.throttle.limit_reads(None)


# A database's steady reads: 4 KiB O_DIRECT reads at random offsets, paced (rate/s), bounded by time.
_DB_READER = """
import mmap, os, random, sys, time
device, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
blocks = os.lseek(fd, 0, os.SEEK_END) // 4096
buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
deadline = time.monotonic() + seconds
next_at = time.monotonic()
while time.monotonic() < deadline:
    os.preadv(fd, [buf], random.randrange(blocks) * 4096)
    next_at = max(next_at + 1.0 / rate, time.monotonic() - 1.0)
    time.sleep(max(0.0, next_at - time.monotonic()))
"""


@contextlib.contextmanager
def database_reads(max_seconds: float = DEFAULT_MAX_SECONDS, degraded: bool = False,
                   directory: str = "/var/tmp") -> Iterator[DatabaseVolume]:
    """The talk's performance case: a database reading its volume at a steady rate ("you expect a minimum level of
    database reads"). The volume is a loop device over a file, in direct-I/O mode, so each of its reads is a read
    of the disk below; the reader runs in a block-I/O cgroup, so capping that cgroup's reads from the disk (what
    an overcommitted or failing store does to a tenant) makes the volume itself slow: fewer reads, each waiting
    tens of milliseconds at the loop device — what the block_io probe sees. ``degraded`` starts capped."""
    with tempfile.TemporaryDirectory(prefix="oer-db-", dir=directory) as tmp:
        backing = Path(tmp, "volume.img")
        with backing.open("wb") as f:  # written, not fallocated: unwritten extents read as zeros with no disk I/O
            chunk = os.urandom(1 << 20)
            for _ in range(DB_VOLUME_MIB):
                f.write(chunk)
            os.fsync(f.fileno())
        throttle = BlockThrottle(_whole_disk(backing.stat().st_dev), f"oer-db-{os.getpid()}-{Path(tmp).name[-6:]}")
        device = None
        try:
            device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(backing)], check=True,
                                    capture_output=True, text=True).stdout.strip()
            volume = DatabaseVolume(device, throttle)
            if degraded:
                throttle.limit_reads(DB_DEGRADED_IOPS)
            argv = [sys.executable, "-c", _DB_READER, device, str(DB_READ_IOPS), str(max_seconds)]
            with children([argv], preexec_fn=throttle.join):
                yield volume
        finally:
            if device:
                subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
            throttle.remove()


@contextlib.contextmanager
def io_degraded(max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[DatabaseVolume]:
    """The database's storage slowed to a tenth of what it reads: io_degraded."""
    with database_reads(max_seconds, degraded=True) as volume:
        yield volume


@contextlib.contextmanager
def backup(max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[None]:
    """A nightly backup, benign and busy: tar reading /usr/lib and /usr/share (tens of thousands of files opened,
    read and closed) into a pipe, over and over, niced. Not in the training plan: a look-alike of the file-open and
    disk I/O storms that the bundled models never saw — what `otel-ebpf-lab adapt` is for."""
    loop = (f"end=$(( $(date +%s) + {int(max_seconds)} )); while [ $(date +%s) -lt $end ]; do "
            "tar -cf - /usr/lib /usr/share 2>/dev/null | cat > /dev/null; done")
    with children([["timeout", "-s", "KILL", str(int(max_seconds)), "nice", "-n", "10", "/bin/sh", "-c", loop]]):
        yield


@contextlib.contextmanager
def idle(max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[None]:
    """Nothing driven: whatever the host does by itself."""
    yield


REPO = Path(__file__).resolve().parents[2]
COLLECTOR_BIN = REPO / "build" / "otelcol" / "otelcol-ebpf"   # `make collector`
COLLECTOR_CONFIG = REPO / "collector-config" / "local.yaml"
PROMETHEUS_BIN = "/usr/bin/prometheus"                          # Debian's (host-setup.sh --lab)
TELEMETRY_AGENT_PROBES = "syscalls,file_open,exec"


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class TelemetryStack:
    export_dir: Path        # the Collector's file exporter: metrics.jsonl, logs.jsonl, traces.jsonl
    prometheus_url: str     # Prometheus' own HTTP API
    pids: tuple[int, ...]   # the Collector, Prometheus and the agent


@contextlib.contextmanager
def telemetry_stack(max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[TelemetryStack]:
    """The host's own observability at rest — what every host running this product also runs: the agent exporting
    OTLP every second to the project's Collector (file and Prometheus exporters, a persistent queue towards a trace
    backend that is not there), and Prometheus scraping the Collector every second. Normal, and not quiet: a few
    hundred system calls a second that rarely fail and start no threads, which a model that never saw it confuses
    with a disk I/O storm (the agent's own end-to-end tests did, on a host left alone after an exec storm)."""
    missing = [what for what, there in ((f"the Collector ({COLLECTOR_BIN}; make collector)", COLLECTOR_BIN.exists()),
                                        (f"Prometheus ({PROMETHEUS_BIN}; make setup-lab)", shutil.which(PROMETHEUS_BIN)))
               if not there]
    if missing:
        raise RuntimeError(f"telemetry_stack needs {' and '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="oer-telemetry-") as tmp:
        ports = {name: _free_port() for name in ("grpc", "http", "prometheus", "health", "telemetry", "traces",
                                                 "web")}
        collector_env = {**os.environ,
                         "OTELCOL_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{ports['grpc']}",
                         "OTELCOL_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{ports['http']}",
                         "OTELCOL_PROMETHEUS_ENDPOINT": f"127.0.0.1:{ports['prometheus']}",
                         "OTELCOL_HEALTH_ENDPOINT": f"127.0.0.1:{ports['health']}",
                         "OTELCOL_TELEMETRY_HOST": "127.0.0.1", "OTELCOL_TELEMETRY_PORT": str(ports["telemetry"]),
                         "OTELCOL_FILE_DIR": f"{tmp}/export", "OTELCOL_STORAGE_DIR": f"{tmp}/queue",
                         "OTELCOL_TRACES_ENDPOINT": f"127.0.0.1:{ports['traces']}",
                         "OTELCOL_LOGS_ENDPOINT": f"127.0.0.1:{ports['traces']}"}
        Path(tmp, "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
            f"scrape_configs: [{{job_name: otelcol, static_configs: [{{targets: ['127.0.0.1:{ports['prometheus']}']}}]}}]\n")
        agent_env = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
                     "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{ports['grpc']}",
                     "OTEL_METRIC_EXPORT_INTERVAL": "1000", "OTEL_BSP_SCHEDULE_DELAY": "1000",
                     "OTEL_BLRP_SCHEDULE_DELAY": "1000"}
        os.makedirs(f"{tmp}/models")
        seconds = str(int(max_seconds))
        with children([["timeout", "-s", "KILL", seconds, str(COLLECTOR_BIN), f"--config={COLLECTOR_CONFIG}"]],
                       env=collector_env) as collector, \
             children([["timeout", "-s", "KILL", seconds, PROMETHEUS_BIN, f"--config.file={tmp}/prometheus.yml",
                         f"--storage.tsdb.path={tmp}/tsdb", f"--web.listen-address=127.0.0.1:{ports['web']}",
                         "--log.level=warn"]]) as prometheus, \
             children([["timeout", "-s", "TERM", seconds, sys.executable, "-m", "otel_ebpf_receiver", "run",
                         "--live", "off", "--probes", TELEMETRY_AGENT_PROBES, "--model-dir", f"{tmp}/models"]],
                       graceful=True, env=agent_env, cwd=REPO) as agent:
            yield TelemetryStack(Path(tmp, "export"), f"http://127.0.0.1:{ports['web']}",
                                 tuple(p.pid for p in collector + prometheus + agent))


# By name, for `otel-ebpf-lab record-host --workload` and the lab's host scenarios.
WORKLOADS: dict[str, Callable[..., contextlib.AbstractContextManager]] = {
    "idle": idle,
    "normal": normal,
    "dev_work": dev_work,
    "exec_storm": exec_storm,
    "file_open_storm": file_open_storm,
    "cpu_saturated": cpu_saturated,
    "disk_io_storm": disk_io_storm,
    "db_reads": database_reads,
    "io_degraded": io_degraded,
    "telemetry_stack": telemetry_stack,
    "backup": backup,
    "memory_pressure": memory_pressure,
    "cache_reads": cache_reads,
    "batch_cpu": batch_cpu,
}
