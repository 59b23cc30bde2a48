"""The scenario table: what the lab can drive, under which training label, for how long — and recording a plan
of scenarios into labelled windows.

    sudo otel-ebpf-lab list
    sudo otel-ebpf-lab record -o build/lab/windows.csv          # the training plan; then: otel-ebpf-model train ...

A scenario is a drive (a context manager yielding a :class:`~model_export.lab.traffic.Drive`) with a label and a
kind: benign (normal work, recorded as ``normal``), host (an incident of the host: the workloads of
:mod:`model_export.lab.workloads`, or the victim's API failing), flood (from the attacker), ramp (a slow one, not
training data: the detection report measures how early it is seen). :data:`TRAINING_PLAN` is what ``record`` and
``make model`` drive; :data:`REPORT_PLAN` is what ``report`` scores.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

from . import workloads
from .connections import connection_refused, link_degraded, short_connections
from .record import Recorder
from .testbed import Testbed, http_load, say_default
from .traffic import (RAMP_FINAL_PPS, RAMP_STEPS, Drive, api_degraded, forged_source_flood, heavy_transfer,
                      paced_transfer, ramp, random_source_flood, random_source_udp_flood, syn_flood, udp_flood)


def _host(name: str) -> Callable[[Testbed, float], ContextManager[Drive]]:
    """A host workload from model_export.lab.workloads (they bound themselves by max_seconds)."""

    @contextlib.contextmanager
    def drive(bed: Testbed, seconds: float) -> Iterator[Drive]:
        with workloads.WORKLOADS[name](max_seconds=seconds + 5):
            yield Drive()

    drive.__doc__ = f"model_export.lab.workloads.{name}"
    return drive


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
    Scenario("telemetry_stack", "normal", BENIGN_KIND,
             "the agent exporting every second to the Collector, Prometheus scraping it; no lab traffic",
             _host("telemetry_stack"), 40, background=False),
    Scenario("db_reads", "normal", BENIGN_KIND,
             "HTTP clients, plus a database reading its volume (loop device, direct I/O) at a steady 250/s",
             _host("db_reads"), 40),
    Scenario("io_degraded", "io_degraded", HOST_KIND,
             "the same database with its storage capped to 25 reads/s (block cgroup): fewer, slow reads",
             _host("io_degraded"), 30),
    Scenario("random_source_udp_flood", "random_source_flood", FLOOD_KIND,
             "hping3 --udp --rand-source from client1: the same state by another protocol", random_source_udp_flood,
             30),
    # Issue 13, item 2: an incident per resource beside a benign look-alike (busy the same way, healthy).
    Scenario("memory_pressure", "memory_pressure", HOST_KIND,
             "a reader re-reading 4x its cgroup's memory limit: page cache reclaimed on its behalf, over and over",
             _host("memory_pressure"), 30),
    Scenario("cache_reads", "normal", BENIGN_KIND, "the same reader without a limit: page cache hits, no reclaim",
             _host("cache_reads"), 30),
    Scenario("batch_cpu", "normal", BENIGN_KIND, "one CPU-bound batch job at nice 19 (cpu_saturated's look-alike)",
             _host("batch_cpu"), 30),
    Scenario("connection_refused", "connection_refused", HOST_KIND,
             "client2 reconnecting 200/s to a victim port nothing listens on: a reset per attempt",
             connection_refused, 30),
    Scenario("short_connections", "normal", BENIGN_KIND,
             "client2 opening 200 connections/s to an upstream that answers and closes (healthy churn)",
             short_connections, 30),
    Scenario("link_degraded", "link_degraded", HOST_KIND,
             "the lab switch's ports shaped to 128 kbit/s, small queues (tc tbf), while the clients keep asking",
             link_degraded, 30, quiet_half=False),
    Scenario("api_degraded", "api_degraded", HOST_KIND,
             "the victim's API answers every other request 503, all of them 250 ms late", api_degraded, 30,
             quiet_half=False),
)}

# What `otel-ebpf-lab record` drives by default, and `make model` (model_export.lab.rebuild) records:
# (scenario, seconds).
# Normal is most of it and several kinds of it (idle, the host's own telemetry stack, mixed, developer work, a heavy
# transfer), recorded at the start and again at the end, so that "normal" is not one narrow cluster a busy-but-healthy
# host falls outside of.
TRAINING_PLAN: tuple[tuple[str, float], ...] = (
    ("idle", 45), ("telemetry_stack", 40), ("normal", 75), ("dev_work", 60), ("heavy_transfer", 40),
    ("paced_transfer", 30), ("db_reads", 40),
    ("exec_storm", 35), ("file_open_storm", 35), ("cpu_saturated", 35), ("disk_io_storm", 35), ("io_degraded", 40),
    ("api_degraded", 40),
    ("memory_pressure", 35), ("connection_refused", 35), ("link_degraded", 40),
    ("syn_flood", 40), ("udp_flood", 40), ("random_source_flood", 35), ("random_source_udp_flood", 30),
    ("cache_reads", 35), ("batch_cpu", 35), ("short_connections", 35),
    ("normal", 45), ("idle", 30), ("dev_work", 30), ("telemetry_stack", 30),
)

REPORT_PLAN: tuple[str, ...] = (
    "normal", "idle", "telemetry_stack", "dev_work", "heavy_transfer", "paced_transfer", "syn_flood", "udp_flood",
    "random_source_flood", "random_source_udp_flood", "forged_source_flood", "ramp", "exec_storm", "file_open_storm",
    "cpu_saturated", "batch_cpu", "disk_io_storm", "db_reads", "io_degraded", "memory_pressure", "cache_reads",
    "connection_refused", "short_connections", "link_degraded", "api_degraded",
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

def record_plan(plan: Sequence[tuple[str, float]], output: str, *, mitigated_half: bool = True,
                settle_windows: int = 3, drain_seconds: float = 4.0, say: Callable[[str], None] = say_default) -> int:
    """Drive ``plan`` in a fresh lab with every probe attached and write the labelled windows to ``output``
    (CSV, the Recorder's format). Returns the number of windows written."""
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


def record_scenario(recorder: Recorder, bed: Testbed, scenario: Scenario, seconds: float, *,
                    mitigated_half: bool = True, settle_windows: int = 3) -> None:
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
