"""How the lab's host workloads run their processes: bounded children in their own process groups, killed with
their group when the workload ends (a child's own children included)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import Iterator

DEFAULT_MAX_SECONDS = 600


def python_loop(body: str, max_seconds: float, prologue: str = "") -> list[str]:
    """argv of a child that runs ``prologue`` once (e.g. joining a cgroup), then ``body`` repeatedly until
    max_seconds passed."""
    code = (prologue + "import os, sys, time\n"
            f"deadline = time.monotonic() + {max_seconds}\n"
            "while time.monotonic() < deadline:\n"
            + "".join(f"    {line}\n" for line in body.splitlines()))
    return [sys.executable, "-c", code]


@contextlib.contextmanager
def children(argvs: list[list[str]], graceful: bool = False, **kwargs) -> Iterator[list[subprocess.Popen]]:
    """Run each argv in its own process group; kill the groups on exit. ``graceful``: SIGTERM first and up to 15 s
    to exit (the agent detaches its probes and flushes its telemetry on SIGTERM), then SIGKILL."""
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              **kwargs) for argv in argvs]
    try:
        yield procs
    finally:
        for proc in procs:
            if graceful:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
