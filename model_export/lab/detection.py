"""Scoring the running agent in the scenario lab: the agent under test (:class:`AgentRig`), and one scenario run
against it and scored window by window (:func:`score_scenario`, :class:`ScenarioResult`). The report over many
scenarios is :mod:`model_export.lab.report`.

The agent is assembled as ``otel-ebpf-receiver run`` assembles it (:func:`otel_ebpf_receiver.assembly.build_agent`:
every probe, XDP on the lab victim's eth0, the bundled model that fits, early warning, mitigation) and runs in its
own thread in this process. Each scenario goes pre (benign background) -> load -> post (benign); every window's
reported and raw state, every warning, mitigation action and blocklist hit is kept, then scored:

* precision, recall and F1 per window: positive = the reported state is an attack state (floods, ramp) or the
  scenario's own state (host incidents); the first 2 s of a load and the first 3 s after it are not scored (the
  documented debounce decides there, and time-to-flip reports that latency); "F1 raw" scores the model's own
  per-window state over every window;
* seconds from the start of the load to the first early warning, the first reported attack state and the first
  XDP drop (blocklist hits polled every 50 ms), and for the ramp the share of its final rate sent at that moment;
* false alarms (the reported state leaving ``normal`` while the truth is benign) and early warnings per hour of
  benign time; addresses blocked that are allowlisted, or that are not the attacker.

Between scenarios the rig removes what mitigation blocked and re-arms the early warning (its baselines kept), so
that each scenario is measured on its own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_ebpf_receiver.agent import WindowResult
from otel_ebpf_receiver.assembly import build_agent
from otel_ebpf_receiver.config import Config
from otel_ebpf_receiver.mitigation import MitigationSettings, Mitigator
from otel_ebpf_receiver.probes.base import Probe
from otel_ebpf_receiver.state.classifier import StateClassifier

from .scenarios import BENIGN_KIND, Scenario
from .testbed import Testbed, http_load, say_default
from .traffic import Drive

# What the XDP probe counts as dropped by the blocklist, per window: the rig's drops per second.
DROPPED_PACKETS = "otel_ebpf_receiver.xdp.dropped_packets"

# ---- scoring a running agent -------------------------------------------------------------------------------------

@dataclass
class WindowRecord:
    end: float              # wall clock at the end of the window
    seconds: float
    state: str              # reported (debounced)
    raw_state: str          # the model's, this window
    score: float
    packets_per_s: float
    dropped_per_s: float
    values: dict[str, float] = field(default_factory=dict, repr=False)  # the window's features


class AgentRig:
    """The agent as ``otel-ebpf-receiver run`` assembles it — every probe (XDP on the victim's eth0), the bundled
    model that fits them (or ``model``), early warning, mitigation — stepping in its own thread, with every window,
    warning, mitigation action and blocklist hit kept for scoring. Telemetry goes to in-memory exporters."""

    def __init__(self, bed: Testbed, *, mode: str = "enforce", ttl: float = 60.0, allow: Sequence[str] = (),
                 probes: Sequence[str] = (), model: str | None = None, interval: float = 1.0,
                 say: Callable[[str], None] = say_default) -> None:
        self.bed = bed
        model_dir = Path(tempfile.mkdtemp(prefix="models-", dir=bed.tmp))  # empty: the bundled model serves
        if model:
            shutil.copy(model, model_dir / Path(model).name)
        self.config = Config(interval=interval, probes=list(probes), exporter="none", model_dir=str(model_dir),
                             live="off", probe_settings={"xdp": bed.xdp_settings},
                             mitigation={"mode": mode, "ttl": float(ttl), "allow": tuple(allow)})
        self.metrics = InMemoryMetricReader()
        self.logs = InMemoryLogRecordExporter()
        self.spans = InMemorySpanExporter()
        self.lines: list[str] = []

        def note(line: str) -> None:
            self.lines.append(line)
            say(line)

        self.agent = build_agent(self.config, say=note, live=False, metric_readers=[self.metrics],
                                 log_exporter=self.logs, span_exporter=self.spans)
        self.telemetry = self.agent.telemetry
        self.probes: list[Probe] = self.agent.probes
        self.classifier: StateClassifier = self.agent.classifier  # type: ignore[assignment]  # classify=True
        self.mitigator: Mitigator | None = next((a for a in self.agent.actors if isinstance(a, Mitigator)), None)
        self.windows: list[WindowRecord] = []
        self.warnings: list[tuple[float, Any]] = []
        self.actions: list[tuple[float, str, dict[str, Any]]] = []
        self.hits: list[tuple[float, int]] = []   # (time, blocklist hits summed) whenever the sum grew
        self._last_end: float | None = None
        self.agent.window_listeners.append(self._on_window)
        self.classifier.warning_listeners.append(lambda w: self.warnings.append((time.time(), w)))
        if self.mitigator is not None:
            emit = self.mitigator.emit

            def tee(name: str, attrs: dict[str, Any]) -> None:
                self.actions.append((time.time(), name, dict(attrs)))
                emit(name, attrs)

            self.mitigator.emit = tee
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def model_version(self) -> str:
        return self.classifier.version

    @property
    def xdp(self) -> Probe | None:
        """The XDP probe, if it attached."""
        return next((p for p in self.probes if p.name == "xdp"), None)

    def _on_window(self, result: WindowResult) -> None:
        window, verdict = result.window, result.verdict
        end = window.timestamp
        seconds = end - self._last_end if self._last_end is not None else self.config.interval
        self._last_end = end
        xdp = result.readings.get("xdp")
        packets = dropped = 0.0
        if xdp is not None and result.seconds > 0:
            packets = xdp.rate or 0.0
            dropped = sum(value for name, value, _ in xdp.counters if name == DROPPED_PACKETS) / result.seconds
        self.windows.append(WindowRecord(end, seconds, verdict.state, verdict.raw_state, float(verdict.score),
                                         float(packets), float(dropped), dict(window.values)))

    def _poll_hits(self) -> None:
        """Blocklist hits, every 50 ms: the first XDP drop to within a few tens of ms, not to within a window."""
        last = 0
        while not self._stop.wait(0.05):
            try:
                total = sum(e.hits for e in self.bed.blocklist.list())
            except Exception:
                continue
            if total > last:
                self.hits.append((time.time(), total))
            last = total

    def start(self) -> "AgentRig":
        for target, name in ((self.agent.run, "agent"), (self._poll_hits, "hits")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def wait_windows(self, n: int, timeout: float | None = None) -> list[WindowRecord]:
        """Block until ``n`` more windows were scored; returns them."""
        start = len(self.windows)
        deadline = time.monotonic() + (timeout if timeout is not None else n * self.config.interval * 3 + 5)
        while len(self.windows) < start + n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.windows[start:start + n]

    def rearm(self) -> None:
        """Between scenarios: no auto blocks left, early-warning evidence forgotten (baselines kept)."""
        self.bed.clear_auto_blocks()
        self.classifier.early_warning.rearm()

    def events(self, name: str) -> list[Any]:
        """OTel log records (events) emitted so far with this event name."""
        return [r.log_record for r in self.logs.get_finished_logs() if r.log_record.event_name == name]

    def close(self) -> None:
        self._stop.set()
        self.agent.stop_event.set()
        for thread in self._threads:
            thread.join(timeout=15)
        self.agent.close()


@dataclass
class ScenarioResult:
    name: str
    kind: str
    expect: tuple[str, ...]
    seconds: float
    attack_start: float
    attack_end: float
    windows: list[WindowRecord]
    warnings: list[float]
    blocks: list[tuple[float, str]]
    skipped: list[tuple[float, str, str]]
    would_block: list[tuple[float, str]]
    hits: list[float]
    drive: Drive
    http: tuple[int, int] = (0, 0)                # benign HTTP (ok, sent) during the load
    http_after_block: tuple[int, int] = (0, 0)    # ... from 1 s after the first block
    allowlisted_blocked: list[str] = field(default_factory=list)
    benign_blocked: list[str] = field(default_factory=list)   # blocked, but not the attacker (or a benign scenario)
    enter_grace: float = 2.0
    exit_grace: float = 3.0

    # -- per window -----------------------------------------------------------------------------------------------
    def truth(self, w: WindowRecord) -> bool | None:
        """True = the load ran in this window (by its midpoint), False = benign, None = grace (not scored): the
        first windows of the load and the first after it, where the documented debounce (2 windows to enter an
        incident, 3 to leave it) decides, not the model. Time-to-flip reports that latency instead."""
        mid = w.end - w.seconds / 2
        if self.attack_start <= mid <= self.attack_end:
            if not self.expect:
                return False
            return None if mid < self.attack_start + self.enter_grace else True
        if self.expect and self.attack_end < mid <= self.attack_end + self.exit_grace:
            return None
        return False

    def confusion(self, raw: bool = False) -> tuple[int, int, int, int]:
        tp = fp = fn = tn = 0
        for w in self.windows:
            truth = self.truth(w)
            if raw:  # the model alone, window by window, no grace
                mid = w.end - w.seconds / 2
                truth = bool(self.expect) and self.attack_start <= mid <= self.attack_end
            if truth is None:
                continue
            predicted = (w.raw_state if raw else w.state) in self.expect
            tp += truth and predicted
            fp += (not truth) and predicted
            fn += truth and not predicted
            tn += (not truth) and not predicted
        return tp, fp, fn, tn

    def prf(self, raw: bool = False) -> tuple[float, float, float]:
        tp, fp, fn, _ = self.confusion(raw)
        precision = tp / (tp + fp) if tp + fp else (1.0 if not fn else 0.0)
        recall = tp / (tp + fn) if tp + fn else math.nan
        f1 = 2 * precision * recall / (precision + recall) if precision + recall and not math.isnan(recall) else (
            math.nan if math.isnan(recall) else 0.0)
        return precision, recall, f1

    # -- times ----------------------------------------------------------------------------------------------------
    def after_start(self, times: Sequence[float]) -> float | None:
        later = [t - self.attack_start for t in times if t >= self.attack_start]
        return min(later) if later else None

    @property
    def first_warning(self) -> float | None:
        return self.after_start(self.warnings)

    @property
    def first_flip(self) -> float | None:
        return self.after_start([w.end for w in self.windows if self.expect and w.state in self.expect])

    @property
    def first_drop(self) -> float | None:
        return self.after_start(self.hits)

    def level(self, delay: float | None) -> float | None:
        return None if delay is None else self.drive.level_at(self.attack_start + delay)

    # -- benign time ------------------------------------------------------------------------------------------------
    def benign_windows(self) -> list[WindowRecord]:
        return [w for w in self.windows if self.truth(w) is False]

    def false_alarms(self) -> int:
        """Entries into a non-normal reported state while the truth was benign (each opens an incident)."""
        count = 0
        previous = None
        for w in self.windows:
            if previous is not None and previous == "normal" and w.state != "normal" and self.truth(w) is False:
                count += 1
            previous = w.state
        return count

    def benign_warnings(self) -> int:
        count = 0
        for t in self.warnings:
            probe = WindowRecord(t, 0.0, "", "", 0.0, 0.0, 0.0)
            if self.truth(probe) is False:
                count += 1
        return count


def score_scenario(rig: AgentRig, scenario: Scenario, seconds: float, *, pre: float = 15.0, post: float = 15.0,
                   say: Callable[[str], None] = say_default) -> ScenarioResult:
    """Run one scenario against the running agent: ``pre`` s benign, the load for ``seconds``, ``post`` s benign."""
    bed = rig.bed
    rig.rearm()
    first_window = len(rig.windows)
    n_warnings, n_actions = len(rig.warnings), len(rig.actions)
    background = http_load(bed, pre + seconds + post + 5) if scenario.background else contextlib.nullcontext()
    with background as load:
        time.sleep(pre)
        with scenario.drive(bed, seconds) as drive:
            start = drive.started
            time.sleep(max(0.0, start + seconds - time.time()))
        end = time.time()
        time.sleep(post)
    rig.wait_windows(1)
    actions = rig.actions[n_actions:]
    attack_states = (rig.mitigator.settings.attack_states if rig.mitigator is not None
                     else MitigationSettings().attack_states)
    result = ScenarioResult(
        scenario.name, scenario.kind, scenario.expect(attack_states), seconds, start, end,
        list(rig.windows[first_window:]), [t for t, _ in rig.warnings[n_warnings:]],
        [(t, a["source.address"]) for t, n, a in actions if n == "mitigation.block"],
        [(t, a["source.address"], a["mitigation.reason"]) for t, n, a in actions if n == "mitigation.skipped"],
        [(t, a["source.address"]) for t, n, a in actions if n == "mitigation.would_block"],
        [t for t, _ in rig.hits if t >= start], drive)
    if load is not None:
        result.http = load.success(start, end)
        if result.blocks:
            result.http_after_block = load.success(result.blocks[0][0] + 1.0, end)
    result.benign_blocked = sorted({a for _, a in result.blocks
                                    if scenario.kind == BENIGN_KIND or a != bed.attacker.ipv4})
    if rig.mitigator is not None:
        allow = rig.mitigator.allowlist
        for entry in bed.blocklist.list():
            net = ipaddress.ip_network(entry.cidr)
            if any(net.version == a.version and net.overlaps(a) for a in allow.networks):
                result.allowlisted_blocked.append(entry.cidr)
    return result
