"""Small helpers shared by tests: workloads with known numbers, metric lookups in the SDK's in-memory reader."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def unique_name(prefix: str) -> str:
    """A process name that fits in comm (15 characters) and is unique to this run."""
    return (prefix + uuid.uuid4().hex)[:15]


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", code, *args], check=True, timeout=timeout, capture_output=True, text=True)


RENAME_SELF = "import ctypes; ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME\n"


def open_file_n_times(comm: str, path: str, n: int) -> None:
    """A child renames itself to ``comm`` and then opens ``path`` exactly n times (nothing else opens after)."""
    run_python("import os, sys\n" + RENAME_SELF +
               "p, n = sys.argv[2], int(sys.argv[3])\n"
               "for _ in range(n):\n    os.close(os.open(p, os.O_RDONLY))\n", comm, path, str(n))


def fail_open_n_times(comm: str, path: str, n: int) -> None:
    run_python("import os, sys\n" + RENAME_SELF +
               "p, n = sys.argv[2], int(sys.argv[3])\n"
               "for _ in range(n):\n"
               "    try:\n        os.open(p, os.O_RDONLY)\n    except FileNotFoundError:\n        pass\n",
               comm, path, str(n))


def exec_n_times(n: int) -> str:
    """Exec a copy of /bin/true under a unique name n times; returns that name."""
    name = unique_name("ex")
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, name)
        shutil.copy("/bin/true", binary)
        for _ in range(n):
            subprocess.run([binary], check=True)
    return name


def syscall_loop(comm: str, n: int) -> int:
    """A child calls getppid() n times and close(-1) (EBADF) n times; returns its pid."""
    out = run_python("import os, sys\n" + RENAME_SELF +
                     "n = int(sys.argv[2])\n"
                     "for _ in range(n):\n    os.getppid()\n"
                     "for _ in range(n):\n"
                     "    try:\n        os.close(-1)\n    except OSError:\n        pass\n"
                     "print(os.getpid())\n", comm, str(n))
    return int(out.stdout.strip())


def data_points(reader: Any) -> Iterator[tuple[str, Any]]:
    """Every (metric name, data point) the in-memory reader holds."""
    data = reader.get_metrics_data()
    if data is None:
        return
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    yield metric.name, point


def metric_sum(reader: Any, name: str, where: Mapping[str, Any] | None = None) -> float:
    """Sum of the values of ``name`` over every data point whose attributes include ``where``."""
    where = where or {}
    return sum(p.value for n, p in data_points(reader)
               if n == name and all(p.attributes.get(k) == v for k, v in where.items()))


def make_agent(probe: Any) -> Any:
    """Load one probe into an agent built as `run` builds it (no model: the state is "unknown") whose metrics land in
    an in-memory reader (``agent.reader``); the first step sets the baseline."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_ebpf_receiver.assembly import build_agent
    from otel_ebpf_receiver.config import Config

    assert probe.unavailable_reason() is None
    reader = InMemoryMetricReader()
    agent = build_agent(Config(probes=[probe.name], exporter="none", live="off"), probes=[probe], classify=False,
                        metric_readers=[reader], say=print)
    agent.reader = reader
    agent.step(1.0)  # baseline
    return agent


def wait_for(condition: Callable[[], Any], timeout: float, step: float = 0.1) -> Any:
    """Poll ``condition`` until it is truthy or ``timeout`` s passed; its last value either way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return condition()
