"""The first onnxruntime session and test run of a new graph, in a child process with a time and a memory limit.

Why a child: creating a session already executes parts of the graph (constant folding), and a small file can
describe a graph that needs gigabytes or minutes. The static checks (``checks.py``) allow only operators without
loops or data-dependent shapes, so a graph's cost is fixed by its structure and the input shape; this module
measures that cost once, out of the agent's process, before the agent builds its own session of the same file:

* a fresh interpreter (``python -I``: no environment, no site of the user), started with the file on stdin;
* address space limited to what its imports took plus :data:`SANDBOX_MEMORY_BYTES`, CPU time and wall time to
  :data:`SANDBOX_SECONDS`, no core file; the agent waits at most :data:`SANDBOX_SECONDS` and kills it after;
* it creates a session with the agent's own options and runs the zero vector three times; one run must take at
  most :data:`MAX_RUN_SECONDS` (the fastest of the three, so a busy machine does not refuse a good model).

A fresh interpreter, not ``fork()``: the agent has exporter threads, and a forked child could inherit a lock one
of them held. A structure already proven (same operators, shapes and integer tensors; float weights may differ,
they never change a shape) is not run again: re-validating a file (SIGHUP, ``touch`` to roll back) stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .contract import (INPUT_NAME, MAX_RUN_SECONDS, SANDBOX_MEMORY_BYTES, SANDBOX_SECONDS, ModelError,
                       printable)

_PACKAGE_PARENT = Path(__file__).resolve().parents[2]
_BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv[1]); "
              "from otel_ebpf_receiver.model.sandbox import child_main; child_main(int(sys.argv[2]))")
_HINT = "the graph is too costly to run or crashes onnxruntime; re-export it with `otel-ebpf-model export`"
_MIB = SANDBOX_MEMORY_BYTES // (1024 * 1024)
_PROVEN_MAX = 256

_proven: dict[bytes, float] = {}   # structure key -> fastest run (s), oldest first


def session_options() -> Any:
    """One thread, no spinning, sequential: scoring one small vector per second must not take a core. The agent
    and the child use the same options, so the child measures what the agent will run."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only; our own validation says what is wrong
    return opts


def structure_key(model: Any, n_features: int) -> bytes:
    """What determines a run's cost: the graph without its float weights, the opsets, the input width."""
    from onnx import TensorProto

    graph = type(model.graph)()
    graph.CopyFrom(model.graph)
    for t in graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.ClearField("raw_data")
            t.ClearField("float_data")
    digest = hashlib.sha256(graph.SerializeToString())
    for opset in model.opset_import:
        digest.update(f"{opset.domain}:{opset.version};".encode())
    digest.update(f"ir{model.ir_version};n{n_features}".encode())
    return digest.digest()


def prove_bounded(path: Path, data: bytes, model: Any, n_features: int) -> float:
    """Run the file's graph in the child; return its fastest run in seconds or raise :class:`ModelError`."""
    key = structure_key(model, n_features)
    if key in _proven:
        return _proven[key]
    seconds = _run_child(path, data, n_features)
    _proven[key] = seconds
    while len(_proven) > _PROVEN_MAX:
        del _proven[next(iter(_proven))]
    return seconds


def _run_child(path: Path, data: bytes, n_features: int) -> float:
    command = [sys.executable, "-I", "-c", _BOOTSTRAP, str(_PACKAGE_PARENT), str(n_features)]
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(command, input=data, capture_output=True, timeout=SANDBOX_SECONDS, env=env,
                              cwd="/")
    except subprocess.TimeoutExpired:
        raise ModelError(path, f"its test run did not finish within {SANDBOX_SECONDS:g} s (the limit)",
                         _HINT) from None
    except OSError as exc:
        raise ModelError(path, f"cannot start the test-run process {sys.executable} ({exc.strerror or exc})",
                         "check the agent's Python installation; the file is refused until then") from None
    report = _last_json_line(done.stdout)
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name if -done.returncode in signal.valid_signals() else "?"
        raise ModelError(path, f"its test run was killed by {name} (limits: {SANDBOX_SECONDS:g} s CPU, "
                               f"{_MIB} MiB)", _HINT)
    if report is None or done.returncode != 0:
        raise ModelError(path, f"its test run failed (exit status {done.returncode})", _HINT)
    if "problem" in report:
        raise ModelError(path, f"onnxruntime cannot run it ({report['problem']})", _HINT)
    seconds = float(report["run_seconds"])
    if not seconds <= MAX_RUN_SECONDS:
        raise ModelError(path, f"one inference takes {seconds * 1000:.0f} ms (limit {MAX_RUN_SECONDS * 1000:.0f} "
                               "ms per window)", _HINT)
    return seconds


def _last_json_line(stdout: bytes) -> dict[str, Any] | None:
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


# -- in the child -----------------------------------------------------------------------------------------------

def _address_space() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def child_main(n_features: int) -> None:
    import resource

    import numpy as np
    import onnxruntime as ort

    data = sys.stdin.buffer.read()
    # Limits after the imports, so they bound what the graph adds, not what onnxruntime itself maps.
    memory = _address_space() + SANDBOX_MEMORY_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = math.ceil(SANDBOX_SECONDS)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    try:
        session = ort.InferenceSession(data, sess_options=session_options(), providers=["CPUExecutionProvider"])
        x = np.zeros((1, n_features), dtype=np.float32)
        fastest = math.inf
        for _ in range(3):
            started = time.perf_counter()
            session.run(None, {INPUT_NAME: x})
            fastest = min(fastest, time.perf_counter() - started)
        report: dict[str, Any] = {"run_seconds": fastest}
    except MemoryError:
        report = {"problem": f"needs more than {_MIB} MiB"}
    except Exception as exc:  # onnxruntime's own errors, bad_alloc included
        report = {"problem": printable(f"{type(exc).__name__}: {exc}", 200)}
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
