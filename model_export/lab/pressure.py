"""Memory and CPU workloads of the lab (issue 13, item 2): an incident of each resource beside a benign look-alike
that is busy in the same way but healthy, so that detection is scored on precision too.

* ``memory_pressure``: a service whose working set outgrew its memory limit. It re-reads a file four times the
  size of its cgroup's limit, so the kernel reclaims the cgroup's page cache on its behalf over and over (reclaim
  stalls, each read of a page from disk again). Nothing is killed.
* ``cache_reads`` (benign): the same reader without a limit. After the first pass the file is in the page cache:
  as many reads, far more bytes per second, no reclaim.
* ``batch_cpu`` (benign): one CPU-bound batch job at the lowest priority (``nice 19``) on a host with more than one
  CPU: busy, but every other task still gets a CPU at once. ``cpu_saturated`` is every CPU wanted twice over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .processes import DEFAULT_MAX_SECONDS, children, python_loop

PRESSURE_LIMIT_MIB = 64     # the service's memory limit
WORKING_SET_MIB = 256       # what it reads over and over: 4x the limit
SCRATCH_DIR = "/var/tmp"    # disk-backed, so a page reclaimed is a page read from disk again


class MemoryCgroup:
    """A memory-limited cgroup (v2 ``memory.max`` where the unified hierarchy has the memory controller, else v1
    ``memory.limit_in_bytes``), swap off inside it so that pressure cannot be relieved by swapping."""

    def __init__(self, limit: int, name: str) -> None:
        v2 = Path("/sys/fs/cgroup")
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            self.path, files = v2 / name, {"memory.max": limit, "memory.swap.max": 0}
        elif Path("/sys/fs/cgroup/memory").is_dir():
            self.path = Path("/sys/fs/cgroup/memory") / name
            files = {"memory.limit_in_bytes": limit, "memory.memsw.limit_in_bytes": limit}
        else:
            raise RuntimeError("no memory cgroup controller (cgroup v2 memory or v1 memory) to limit a process with")
        self.path.mkdir()
        for file, value in files.items():
            if (self.path / file).exists():
                (self.path / file).write_text(str(value))

    @staticmethod
    def available() -> bool:
        controllers = Path("/sys/fs/cgroup/cgroup.controllers")
        return Path("/sys/fs/cgroup/memory").is_dir() or (
            controllers.exists() and "memory" in controllers.read_text(errors="replace").split())

    def prologue(self) -> str:
        """Python that moves the process running it into the group (the first thing a child does)."""
        return f"open({str(self.path / 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()))\n"

    def run(self, code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run Python code as a process of the group, to completion."""
        return subprocess.run([sys.executable, "-c", self.prologue() + code, *args], capture_output=True, text=True,
                              timeout=timeout)

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # a killed process is still leaving
                time.sleep(0.1)
        self.path.rmdir()


@contextlib.contextmanager
def working_set(mib: int = WORKING_SET_MIB) -> Iterator[str]:
    """A scratch file of ``mib`` MiB on disk, out of the page cache to start with."""
    with tempfile.NamedTemporaryFile(dir=SCRATCH_DIR, prefix="oer-working-set-") as big:
        chunk = os.urandom(1 << 20)
        for _ in range(mib):
            big.write(chunk)
        big.flush()
        os.fsync(big.fileno())
        os.posix_fadvise(big.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        yield big.name


def _reread(path: str) -> str:
    """The body of a loop that reads ``path`` from start to end, 1 MiB at a time."""
    return (f"with open({path!r}, 'rb', buffering=0) as f:\n"
            "    while f.read(1 << 20):\n"
            "        pass")


@contextlib.contextmanager
def memory_pressure(max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[None]:
    """A reader whose working set is 4x its cgroup's memory limit: reclaim stalls for as long as it runs."""
    group = MemoryCgroup(PRESSURE_LIMIT_MIB << 20, f"oer-lab-memory-{os.getpid()}")
    try:
        with working_set() as path:
            with children([python_loop(_reread(path), max_seconds, prologue=group.prologue())]):
                yield
    finally:
        group.remove()


@contextlib.contextmanager
def cache_reads(max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[None]:
    """The same reader without a limit: its file stays in the page cache after the first pass."""
    with working_set() as path, children([python_loop(_reread(path), max_seconds)]):
        yield


@contextlib.contextmanager
def batch_cpu(max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[None]:
    """One CPU-bound job at nice 19: one CPU busy, never in another task's way."""
    if shutil.which("stress-ng"):
        argv = ["stress-ng", "--cpu", "1", "--timeout", f"{int(max_seconds)}s", "--quiet"]
    else:
        argv = python_loop("x = sum(i * i for i in range(10000))", max_seconds)
    with children([["nice", "-n", "19", *argv]]):
        yield
