"""The real agent end to end: `otel-ebpf-receiver run` as a subprocess with real probes, sending OTLP/gRPC to the
built otelcol-ebpf (collector-config/local.yaml), scraped every second by Debian's Prometheus, with traces going
on to Jaeger v2 — all on free loopback ports, nothing mocked. What is asserted is what a user would look at:
Prometheus' query API, the Collector's JSON files, Jaeger's query API, and the agent's stderr.

* An exec storm (model_export.lab.workloads.exec_storm) flips `system.state` from normal to exec_storm and back: both
  states are labels in Prometheus, the change is a `system.state.change` log event, the episode one
  `system.state.incident` span with `system.state.transition` events (in the file exporter and in Jaeger).
  The storm runs once for the module (fixture `incident`); each test checks one place the incident shows up.
* A Collector outage of 20 s (stopped, then restarted on the same ports with the same file_storage queue): the
  agent keeps running, says once that export fails and once that it recovered, and the exec counts in
  Prometheus afterwards equal what was executed — no reset, no double count.

The state model is a clustering model trained on this kind of machine. If it does not flip (or does not return)
within the windows allowed below, the tests fail and name the states the agent went through: that is a finding
about the model, not noise to tolerate.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from model_export.lab import workloads

from . import backends
from .backends import LOOPBACK, REPO, jaeger_tags

# Building the Collector and Jaeger is part of these tests (conftest.py fixtures; cached, seconds when warm).
pytestmark = [pytest.mark.bpf, pytest.mark.timeout(1500)]

PROBES = "syscalls,file_open,exec"
SERVICE = "otel-ebpf-receiver"
HOST = socket.gethostname()  # the agent's default host.name (no OTEL_RESOURCE_ATTRIBUTES is passed on)
WINDOW = 1.0                 # seconds: the agent's default interval
SLACK = 5.0                  # seconds on top of every "N windows" wait: the machine is shared and noisy
SETTLE_WINDOWS = 30          # from start-up (state unknown) to a confirmed `normal`
FLIP_WINDOWS = 15            # from the first storm window to the reported state `exec_storm`
STORM_SECONDS = 10           # how long the storm lasts at least (longer if the flip came late)
RETURN_WINDOWS = 20          # from the end of the storm back to `normal`
OUTAGE_SECONDS = 20
TRANSITION = re.compile(r"^otel-ebpf-receiver: state (\S+) → (\S+) \(score", re.M)
EXPORT_FAILED = re.compile(r"metric export to .* failed")
EXPORT_RECOVERED = re.compile(r"metric export to .* recovered")


# --- the agent as a process ------------------------------------------------------------------------------------

@dataclass
class AgentProcess:
    """`python -m otel_ebpf_receiver run` with its stderr in a file (never a pipe that could fill up)."""

    popen: subprocess.Popen
    stderr_path: Path
    started: float = field(default_factory=time.monotonic)
    seen_at: list[float] = field(default_factory=list)  # when each transition was first seen (by a poll)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def transitions(self) -> list[tuple[str, str]]:
        """Every reported (debounced) state change so far, from the agent's `state A → B (score ...)` lines."""
        found = TRANSITION.findall(self.stderr())
        now = time.monotonic()
        self.seen_at.extend(now for _ in found[len(self.seen_at):])
        return found

    def since_start(self, moment: float) -> str:
        return f"+{moment - self.started:.1f} s"

    def timeline(self) -> str:
        """`unknown → normal (+3.2 s) → exec_storm (+14.0 s) → ...`: seconds since the agent was started, as
        seen by the test's polls (0.2 s apart while it waits for a state)."""
        changes = self.transitions()
        return " → ".join(["unknown"] + [f"{to} ({self.since_start(at)})" for (_, to), at in zip(changes, self.seen_at)])

    def states(self) -> list[str]:
        """The states the agent reported, in order, starting with `unknown` (before the first window)."""
        return ["unknown"] + [to for _, to in self.transitions()]

    @property
    def state(self) -> str:
        return self.states()[-1]

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"the agent exited with {self.popen.returncode}:\n{self.stderr()[-4000:]}")

    def wait_for_state(self, state: str, timeout: float) -> bool:
        """True as soon as the reported state is `state`; False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self.state == state:
                return True
            time.sleep(0.2)
        return self.state == state

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the agent flushes its telemetry and detaches), SIGKILL if it hangs; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


@contextlib.contextmanager
def run_agent(collector: backends.Collector, workdir: Path, timeout: float = 90) -> Iterator[AgentProcess]:
    """The agent exporting OTLP/gRPC to `collector` every second, the bundled model serving (an empty model
    directory); yields once it says it attached its probes; always stopped."""
    model_dir = workdir / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    # Only our OTEL_* settings: whatever the developer's shell exports must not change where data go or the resource.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.otlp_grpc_endpoint,
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        # The SDK's batch processors wait 5 s by default; 1 s brings incidents and events to the Collector sooner.
        "OTEL_BSP_SCHEDULE_DELAY": "1000",
        "OTEL_BLRP_SCHEDULE_DELAY": "1000",
    })
    stderr_path = workdir / "agent.stderr"
    with open(stderr_path, "w") as err:
        popen = subprocess.Popen([sys.executable, "-m", "otel_ebpf_receiver", "run", "--live", "off",
                                  "--probes", PROBES, "--model-dir", str(model_dir)],
                                 cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    agent = AgentProcess(popen, stderr_path)
    try:
        backends.wait_until(lambda: agent.check_alive() or "attached " in agent.stderr(), timeout,
                            "the agent's 'attached' line")
        yield agent
    finally:
        agent.stop()


# --- one exec-storm incident, shared by the tests that look for it ------------------------------------------------

@dataclass
class Incident:
    collector: backends.Collector
    prometheus: backends.Prometheus
    jaeger: backends.Jaeger
    agent: AgentProcess
    settled: bool = False
    flipped: bool = False
    returned: bool = False
    storm: tuple[float, float] | None = None  # monotonic start and end of the exec storm
    state_at_storm_end: str = ""

    def story(self) -> str:
        """What happened, for assertion messages: the states the agent reported, and when."""
        storm = (f"storm from {self.agent.since_start(self.storm[0])} to {self.agent.since_start(self.storm[1])} "
                 f"(state at its end: {self.state_at_storm_end})" if self.storm else "no storm")
        return (f"states reported by the agent: {self.agent.timeline()}; {storm}; settled to normal: {self.settled}, "
                f"flipped to exec_storm within {FLIP_WINDOWS} windows: {self.flipped}, back to normal within "
                f"{RETURN_WINDOWS} windows: {self.returned}")

    def require(self, *, flipped: bool = True, returned: bool = False) -> None:
        """Fail (never skip) with the story when the agent did not go through the states this test looks for."""
        if not self.settled:
            pytest.fail(f"the agent never reported `normal` before the storm. {self.story()}")
        if flipped and not self.flipped:
            pytest.fail(f"the exec storm did not flip system.state to exec_storm. {self.story()}")
        if returned and not self.returned:
            pytest.fail(f"system.state did not return to normal after the storm. {self.story()}")


@pytest.fixture(scope="module")
def incident(otelcol, jaeger_bin, tmp_path_factory) -> Iterator[Incident]:
    """Jaeger, the Collector (traces → Jaeger), Prometheus (1 s scrape) and the agent; the agent settles to
    normal, an exec storm runs for ~10 s, then the host calms down. Everything keeps running while the tests
    read the results, and is stopped afterwards. Never asserts itself: the tests do, with the story."""
    work = tmp_path_factory.mktemp("incident")
    with backends.start_jaeger(work / "jaeger") as jaeger, \
         backends.start_collector(work / "otelcol", env={
             "OTELCOL_TRACES_ENDPOINT": jaeger.otlp_grpc_address,
             # Jaeger refuses logs; they wait in the disk queue for a log backend that is not there (and are in
             # logs.jsonl, which is what the tests read).
             "OTELCOL_LOGS_ENDPOINT": f"{LOOPBACK}:{backends.free_port()}"}) as col, \
         backends.start_prometheus(work / "prometheus", scrape={"otelcol-ebpf": [col.prometheus_address]},
                                   scrape_interval="1s") as prom, \
         run_agent(col, work) as agent:
        run = Incident(col, prom, jaeger, agent)
        run.settled = agent.wait_for_state("normal", SETTLE_WINDOWS * WINDOW + SLACK)
        if run.settled:
            started = time.monotonic()
            with workloads.exec_storm(max_seconds=FLIP_WINDOWS * WINDOW + STORM_SECONDS + SLACK):
                run.flipped = agent.wait_for_state("exec_storm", FLIP_WINDOWS * WINDOW + SLACK)
                flip_at = time.monotonic()
                # At least STORM_SECONDS of storm, and a few windows in exec_storm after a late flip.
                until = max(started + STORM_SECONDS, flip_at + 3 * WINDOW) if run.flipped else flip_at
                while time.monotonic() < until:
                    agent.check_alive()
                    agent.transitions()  # note when a change is seen
                    time.sleep(0.2)
                run.state_at_storm_end = agent.state
            run.storm = (started, time.monotonic())
            if run.flipped:
                run.returned = agent.wait_for_state("normal", RETURN_WINDOWS * WINDOW + SLACK)
        print(run.story())  # in the captured output of the first test (pytest -rA shows it)
        yield run


def test_state_labels_in_prometheus(incident):
    """Our metrics in Prometheus carry system_state (both normal and exec_storm) and the resource labels; the
    transitions counter and the anomaly score gauge are there too, with system_state_model (only the state
    metrics carry the model: on every probe series it would duplicate them all at each model swap)."""
    incident.require()
    prom = incident.prometheus
    for state in ("normal", "exec_storm"):
        series = prom.wait_for_series(
            f'otel_ebpf_receiver_syscalls_total{{system_state="{state}",host_name="{HOST}"}}')
        labels = series[0]["metric"]
        assert labels["service_name"] == SERVICE, labels
        assert "system_state_model" not in labels, labels
    # The storm's own execs (/bin/true) were counted while the host was in exec_storm.
    storm_execs = prom.wait_for_series(
        f'otel_ebpf_receiver_exec_total{{process_executable_name="true",system_state="exec_storm",host_name="{HOST}"}}')
    assert float(storm_execs[0]["value"][1]) > 0

    def transitions(from_state: str, to_state: str) -> str:
        return (f'otel_ebpf_receiver_system_state_transitions_total{{system_state_from="{from_state}",'
                f'system_state_to="{to_state}",host_name="{HOST}"}}')

    prom.wait_for_series(transitions("normal", "exec_storm"))
    scores = prom.wait_for_series(f'otel_ebpf_receiver_system_state_anomaly_score{{host_name="{HOST}"}}')
    assert all(s["metric"].get("system_state") for s in scores), scores
    assert all(s["metric"].get("system_state_model") not in (None, "", "none") for s in scores), scores
    incident.require(returned=True)
    prom.wait_for_series(transitions("exec_storm", "normal"))


def test_state_change_events_in_the_file_exporter(incident):
    """`system.state.change` log events with from/to, into exec_storm and back, from this host's agent."""
    incident.require(returned=True)
    col = incident.collector

    def changes() -> list[tuple[str, str]]:
        return [(r["attrs"].get("system.state.from"), r["attrs"].get("system.state.to"))
                for r in col.records("logs") if r.get("eventName") == "system.state.change"]

    backends.wait_until(lambda: {("normal", "exec_storm"), ("exec_storm", "normal")} <= set(changes()), 30,
                        lambda: f"system.state.change events normal→exec_storm→normal in {col.file_dir}/logs.jsonl "
                                f"(seen: {changes()}; {incident.story()})")
    seen = changes()
    assert seen.index(("normal", "exec_storm")) < seen.index(("exec_storm", "normal")), seen
    events = [r for r in col.records("logs") if r.get("eventName") == "system.state.change"]
    to_storm = next(r for r in events if r["attrs"].get("system.state.to") == "exec_storm")
    assert to_storm["resource"]["host.name"] == HOST
    assert to_storm["resource"]["service.name"] == SERVICE
    assert to_storm["attrs"]["system.state.model"] not in ("", "none")
    assert to_storm["attrs"]["system.state.top_feature.1"], to_storm["attrs"]


def exec_storm_incident(span_state: str, events: list[tuple[str, dict]]) -> bool:
    """An incident span for the storm: named by exec_storm, and holding the transition into it and out of it."""
    transitions = [(a.get("system.state.from"), a.get("system.state.to"))
                   for name, a in events if name == "system.state.transition"]
    return span_state == "exec_storm" and ("normal", "exec_storm") in transitions \
        and ("exec_storm", "normal") in transitions


def test_incident_span_in_the_file_exporter(incident):
    """One `system.state.incident` span from leaving normal to returning, with `system.state.transition` events."""
    incident.require(returned=True)
    col = incident.collector

    def spans() -> list[dict]:
        return [s for s in col.records("traces") if s["name"] == "system.state.incident"]

    def storm_spans() -> list[dict]:
        return [s for s in spans() if exec_storm_incident(
            s["attrs"].get("system.state"), [(e["name"], backends.attributes(e.get("attributes")))
                                             for e in s.get("events", [])])]

    def seen() -> str:
        return "; ".join(f"{s['attrs'].get('system.state')} {[e['name'] for e in s.get('events', [])]}"
                         for s in spans()) or "none"

    found = backends.wait_until(storm_spans, 30, lambda: f"the exec_storm incident span in {col.file_dir}/traces.jsonl "
                                f"(incident spans seen: {seen()}; {incident.story()})")
    span = found[0]
    assert span["resource"]["host.name"] == HOST and span["resource"]["service.name"] == SERVICE
    transitions = [backends.attributes(e.get("attributes")) for e in span["events"]
                   if e["name"] == "system.state.transition"]
    assert (transitions[0]["system.state.from"], transitions[0]["system.state.to"]) == ("normal", "exec_storm")
    assert (transitions[-1]["system.state.from"], transitions[-1]["system.state.to"]) == ("exec_storm", "normal")
    assert int(span["endTimeUnixNano"]) > int(span["startTimeUnixNano"])


def test_incident_trace_in_jaeger(incident):
    """The same incident through the Collector's persistent-queue OTLP exporter into Jaeger v2's query API."""
    incident.require(returned=True)

    def match(span: dict) -> bool:
        events = [(next((f["value"] for f in log["fields"] if f["key"] == "event"), ""), jaeger_tags(log["fields"]))
                  for log in span.get("logs", [])]
        return exec_storm_incident(jaeger_tags(span.get("tags")).get("system.state"), events)

    span = incident.jaeger.wait_for_span(SERVICE, "system.state.incident", timeout=60, match=match)
    tags = jaeger_tags(span["tags"])
    assert tags["host.name"] == HOST
    assert tags["system.state.model"] not in ("", "none")
    assert span["process"]["serviceName"] == SERVICE
    assert jaeger_tags(span["process"].get("tags")).get("host.name") == HOST


# --- a Collector outage -----------------------------------------------------------------------------------------

def exec_binary(binary: Path, n: int) -> None:
    for _ in range(n):
        subprocess.run([str(binary)], check=True)


def test_collector_outage_keeps_the_agent_running_and_counts_exact(otelcol, tmp_path):
    """The Collector is stopped for 20 s and restarted (same ports, same file_storage directory). The agent keeps
    running, says once that export fails and once that it recovered, and Prometheus ends up with exactly the
    execs made before and during the outage: no reset, no double count."""
    name = ("e2e" + uuid.uuid4().hex)[:15]  # comm holds 15 characters: unique to this run, nothing else execs it
    binary = tmp_path / "bin" / name
    binary.parent.mkdir()
    shutil.copy("/bin/true", binary)
    total = (f'sum without (system_state, system_state_model) '
             f'(otel_ebpf_receiver_exec_total{{process_executable_name="{name}",host_name="{HOST}"}})')
    before, during = 20, 30

    with backends.start_collector(tmp_path / "otelcol") as col, \
         backends.start_prometheus(tmp_path / "prometheus", scrape={"otelcol-ebpf": [col.prometheus_address]},
                                   scrape_interval="1s") as prom, \
         run_agent(col, tmp_path) as agent:
        exec_binary(binary, before)
        backends.wait_until(lambda: prom.value(total) == before, 30,
                            lambda: f"{before} execs of {name} in Prometheus before the outage (now {prom.value(total)})")

        col.stop()
        stopped = time.monotonic()
        exec_binary(binary, during)
        backends.wait_until(lambda: agent.check_alive() or EXPORT_FAILED.search(agent.stderr()), OUTAGE_SECONDS,
                            lambda: f"the agent saying that export fails:\n{agent.stderr()[-2000:]}")
        while time.monotonic() - stopped < OUTAGE_SECONDS:
            agent.check_alive()
            time.sleep(0.5)
        agent.check_alive()

        col.start()  # same ports, same queue directory
        backends.wait_until(lambda: agent.check_alive() or EXPORT_RECOVERED.search(agent.stderr()), 90,
                            lambda: f"the agent saying that export recovered:\n{agent.stderr()[-2000:]}")
        backends.wait_until(lambda: prom.value(total) == before + during, 60,
                            lambda: f"{before + during} execs of {name} in Prometheus after the outage "
                                    f"(now {prom.value(total)})")
        # A few more exports and scrapes: the total stays (a double count would grow it, a reset shrink it), and
        # it never was above or, once there, below the number of execs at any scrape of the run.
        time.sleep(5 * WINDOW)
        assert prom.value(total) == before + during
        assert prom.value(f"max_over_time(({total})[10m:1s])") == before + during
        resets = prom.query(f'resets(otel_ebpf_receiver_exec_total{{process_executable_name="{name}"}}[10m]) > 0')
        assert not resets, f"Prometheus saw a counter reset: {resets}"
        failures = prom.wait_for_series(f'otel_ebpf_receiver_export_failures_total{{host_name="{HOST}"}}')
        assert sum(float(s["value"][1]) for s in failures) >= 1
        agent.check_alive()
        code = agent.stop()
        err = agent.stderr()

    assert code == 0, err
    assert "Traceback" not in err, err
    assert len(EXPORT_FAILED.findall(err)) == 1, f"export failure not said exactly once:\n{err}"
    assert len(EXPORT_RECOVERED.findall(err)) == 1, f"recovery not said exactly once:\n{err}"
    assert all(line.startswith("otel-ebpf-receiver: ") for line in err.splitlines()), err
