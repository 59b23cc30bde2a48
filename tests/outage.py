"""A long Collector outage under continuous events, shared by tests/test_long_outage.py (5 minutes, in CI) and
bench/bench_outage.py (1 hour): the real agent CLI exporting OTLP/gRPC to the built Collector, which is stopped
for ``outage_seconds`` and restarted on the same ports with the same queue directory.

Events while it is down, all with known numbers:
* execs of a binary with a name unique to the run, at a steady rate (a counter: must arrive exact afterwards);
* a model file that is not a model, rewritten in the watched model directory every few seconds: each rewrite is
  one `system.state.model.rejected` log record (and one increment of the model_rejections counter), so log
  records are emitted all along and those that cannot be delivered must show up in `export.dropped`.
The agent's resident memory is sampled throughout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import backends
from .backends import REPO

PROBES = "syscalls,file_open,exec"
EXEC_PERIOD = 0.1            # seconds between execs (10 a second)
BAD_MODEL_PERIOD = 3.0       # seconds between rewrites of the bad model file (two polls must see it unchanged)
SAMPLE_PERIOD = 5.0          # seconds between RSS samples
RECOVERY_TIMEOUT = 180       # seconds from the Collector's restart until the counts must be there


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scraped_sum(page: str, metric: str, **labels: str) -> float:
    """Sum of the samples of ``metric`` on a Prometheus text page whose labels include ``labels``."""
    total = 0.0
    for line in page.splitlines():
        if not line.startswith(metric + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@dataclass
class OutageRun:
    """What happened: counts made, what arrived, memory samples ((seconds since start, phase, RSS KiB))."""

    outage_seconds: float
    execs_before: int = 0
    execs_during: int = 0
    execs_seen_after: float = -1
    reconnect_seconds: float = -1        # from the Collector's restart to the agent saying metric export recovered
    recovery_seconds: float = -1         # from the Collector's restart to the exact exec count in it
    rejections_emitted: float = -1       # the model_rejections counter, as delivered after the outage
    rejections_delivered: int = -1       # `system.state.model.rejected` records in the Collector's logs.jsonl
    dropped_logs: float = -1             # export.dropped{signal=logs, event.name=<rejected>}, as delivered after
    failures: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[float, str, int]] = field(default_factory=list)
    stderr: str = ""
    exit_code: int | None = None

    def rss(self, phase: str) -> list[int]:
        return [kib for _, p, kib in self.samples if p == phase]

    @property
    def growth_kib(self) -> int:
        """Resident memory at the end of the outage minus at its start."""
        during = self.rss("outage")
        return during[-1] - during[0]

    def table(self) -> str:
        during = self.rss("outage")
        rows = [("outage", f"{self.outage_seconds / 60:g} min"),
                ("RSS at outage start", f"{during[0] / 1024:.1f} MiB"),
                ("RSS at outage end", f"{during[-1] / 1024:.1f} MiB"),
                ("RSS max during outage", f"{max(during) / 1024:.1f} MiB"),
                ("growth over the outage", f"{self.growth_kib / 1024:+.1f} MiB"),
                ("growth over its second half", f"{(during[-1] - during[len(during) // 2]) / 1024:+.1f} MiB"),
                ("execs before / during", f"{self.execs_before} / {self.execs_during}"),
                ("execs in the Collector after", f"{self.execs_seen_after:.0f}"),
                ("from restart to first metric export", f"{self.reconnect_seconds:.1f} s"),
                ("from restart to exact count", f"{self.recovery_seconds:.0f} s"),
                ("rejection events emitted", f"{self.rejections_emitted:.0f}"),
                ("  delivered / counted as dropped", f"{self.rejections_delivered} / {self.dropped_logs:.0f}"),
                ("export failures (metrics, logs)",
                 f"{self.failures.get('metrics', 0):.0f}, {self.failures.get('logs', 0):.0f}")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class Workload:
    """Execs of one uniquely named binary and rewrites of a bad model file, each in its own thread, counted."""

    def __init__(self, workdir: Path, model_dir: Path) -> None:
        self.name = ("lo" + uuid.uuid4().hex)[:15]  # comm holds 15 characters
        self.binary = workdir / "bin" / self.name
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy("/bin/true", self.binary)
        self.bad_model = model_dir / "not-a-model.onnx"
        self.execs = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._exec_loop, daemon=True),
                         threading.Thread(target=self._model_loop, daemon=True)]

    def _exec_loop(self) -> None:
        while not self._stop.wait(EXEC_PERIOD):
            subprocess.run([str(self.binary)], check=True)
            self.execs += 1

    def _model_loop(self) -> None:
        rewrite = 0
        while not self._stop.wait(BAD_MODEL_PERIOD):
            rewrite += 1
            # A new size each time: the watcher sees a new signature and rejects it once more.
            self.bad_model.write_bytes(b"not an onnx model " + b"x" * (rewrite % 97) + str(rewrite).encode())

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def run_outage(workdir: Path, outage_seconds: float, warmup_seconds: float = 20, say=print) -> OutageRun:
    """Collector up (``warmup_seconds`` of events), down ``outage_seconds`` (events go on), up again; waits until
    the exec count arrived, then stops the agent. Raises AssertionError if the agent dies or a wait times out."""
    result = OutageRun(outage_seconds)
    model_dir = workdir / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    workload = Workload(workdir, model_dir)
    # Ports outside the ephemeral range: nothing else on the machine can take them while the Collector is down.
    ports = {name: backends.port_kept_for_restarts()
             for name in ("otlp_grpc", "otlp_http", "prometheus", "health", "telemetry")}
    with backends.start_collector(workdir / "otelcol", ports=ports) as col:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": col.otlp_grpc_endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "1000",
                    "OTEL_BLRP_SCHEDULE_DELAY": "1000", "OTEL_BSP_SCHEDULE_DELAY": "1000"})
        stderr_path = workdir / "agent.stderr"
        with open(stderr_path, "w") as err:
            agent = subprocess.Popen([sys.executable, "-m", "otel_ebpf_receiver", "run", "--live", "off",
                                      "--probes", PROBES, "--model-dir", str(model_dir)], cwd=REPO, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        started = time.monotonic()

        def alive() -> None:
            if agent.poll() is not None:
                raise AssertionError(f"the agent exited with {agent.returncode}:\n{stderr_path.read_text()[-3000:]}")

        def sample(phase: str) -> None:
            alive()
            result.samples.append((time.monotonic() - started, phase, rss_kib(agent.pid)))

        def hold(phase: str, seconds: float) -> None:
            ends = time.monotonic() + seconds
            while time.monotonic() < ends:
                sample(phase)
                time.sleep(min(SAMPLE_PERIOD, max(0.0, ends - time.monotonic())))
            sample(phase)

        try:
            backends.wait_until(lambda: alive() or "attached " in stderr_path.read_text(), 90, "the agent attaching")
            workload.start()
            hold("before", warmup_seconds)
            result.execs_before = workload.execs
            say(f"collector down for {outage_seconds:.0f} s")
            col.stop()
            hold("outage", outage_seconds)
            col.start()
            restarted = time.monotonic()
            say("collector up again")
            # The agent says "metric export ... recovered" after its first export that reaches the Collector.
            ends = restarted + RECOVERY_TIMEOUT
            while result.reconnect_seconds < 0 and time.monotonic() < ends:
                if EXPORT_RECOVERED_METRICS.search(stderr_path.read_text(errors="replace")):
                    result.reconnect_seconds = time.monotonic() - restarted
                else:
                    alive()
                    time.sleep(0.25)
            hold("after", 10)
            workload.stop()
            result.execs_during = workload.execs - result.execs_before
            total = workload.execs

            def delivered() -> bool:
                alive()
                result.execs_seen_after = scraped_sum(col.scrape(), "otel_ebpf_receiver_exec_total",
                                                      process_executable_name=workload.name)
                return result.execs_seen_after == total
            try:
                # gRPC reconnects with its own backoff (up to 2 minutes after a long outage): wait longer than that.
                backends.wait_until(delivered, RECOVERY_TIMEOUT, "the exec count")
                result.recovery_seconds = time.monotonic() - restarted
            except AssertionError:  # the caller sees it in the counts; the rest is still measured
                agent.send_signal(signal.SIGUSR1)  # every thread's stack into the agent's stderr (cli/run.py)
                time.sleep(2)
            time.sleep(8)  # the rejection counter and the drop counter of the last rewrites: a few more exports
            page = col.scrape()
            result.rejections_emitted = scraped_sum(page, "otel_ebpf_receiver_system_state_model_rejections_total")
            result.dropped_logs = scraped_sum(page, "otel_ebpf_receiver_export_dropped_total", signal="logs",
                                              event_name="system.state.model.rejected")
            for kind in ("metrics", "logs", "spans"):
                result.failures[kind] = scraped_sum(page, "otel_ebpf_receiver_export_failures_total", signal=kind)
            result.rejections_delivered = sum(1 for r in col.records("logs")
                                              if r.get("eventName") == "system.state.model.rejected")
        finally:
            workload.stop()
            if agent.poll() is None:
                agent.terminate()
                try:
                    agent.wait(30)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait(10)
            result.exit_code = agent.returncode
            result.stderr = stderr_path.read_text(errors="replace")
    return result


EXPORT_FAILED = re.compile(r"^otel-ebpf-receiver: (metric|log|span) export to .* failed", re.M)
EXPORT_RECOVERED = re.compile(r"^otel-ebpf-receiver: (metric|log|span) export to .* recovered", re.M)
EXPORT_RECOVERED_METRICS = re.compile(r"^otel-ebpf-receiver: metric export to .* recovered", re.M)
