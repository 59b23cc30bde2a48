"""The detection report: the agent under test in the scenario lab, scored window by window.

    sudo .venv/bin/python -m model_export.lab report [--scenarios NAME[:SECONDS],...] [--markdown FILE] [--json FILE]

The agent is assembled as ``otel-ebpf-receiver run`` assembles it (every probe, XDP on the lab victim's eth0, the
bundled model that fits, early warning, mitigation in enforce mode with client0 allowlisted) and runs in its own
thread in this process. Each scenario goes pre (benign background) -> load -> post (benign); every window's
reported and raw state, every warning, mitigation action and blocklist hit is kept, then scored:

* precision, recall and F1 per window: positive = the reported state is an attack state (floods, ramp) or the
  scenario's own state (host incidents); the first 2 s of a load and the first 3 s after it are not scored (the
  documented debounce decides there, and time-to-flip reports that latency); "F1 raw" scores the model's own
  per-window state over every window;
* seconds from the start of the load to the first early warning, the first reported attack state and the first
  XDP drop (blocklist hits polled every 50 ms), and for the ramp the share of its final rate sent at that moment;
* false alarms (the reported state leaving ``normal`` while the truth is benign) and early warnings per hour of
  benign time; addresses blocked that are allowlisted, or that are not the attacker.

Between scenarios the lab removes what mitigation blocked and re-arms the early warning (its baselines kept), so
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

from .lab import (BENIGN_KIND, FLOOD_KIND, HOST_KIND, RAMP_KIND, SCENARIOS, Drive, Scenario, Testbed, http_load,
                  say_default)


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
        from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from otel_ebpf_receiver.agent import Agent, build_mitigator, check_privileges, load_probes
        from otel_ebpf_receiver.config import Config
        from otel_ebpf_receiver.state import build_classifier
        from otel_ebpf_receiver.telemetry import Telemetry

        check_privileges()
        self.bed = bed
        model_dir = Path(tempfile.mkdtemp(prefix="models-", dir=bed.tmp))  # empty: the bundled model serves
        if model:
            shutil.copy(model, model_dir / Path(model).name)
        self.config = Config(interval=interval, exporter="none", model_dir=str(model_dir), live="off",
                             probe_settings={"xdp": bed.xdp_settings},
                             mitigation={"mode": mode, "ttl": float(ttl), "allow": tuple(allow)})
        self.metrics = InMemoryMetricReader()
        self.logs = InMemoryLogRecordExporter()
        self.spans = InMemorySpanExporter()
        self.telemetry = Telemetry("none", metric_readers=[self.metrics], log_exporter=self.logs,
                                   span_exporter=self.spans)
        self.lines: list[str] = []

        def note(line: str) -> None:
            self.lines.append(line)
            say(line)

        self.probes = load_probes(list(probes), self.config.probe_settings, note, on_event=self.telemetry.emit_event)
        try:
            self.classifier = build_classifier(self.config, [p.name for p in self.probes], self.telemetry, note)
            self.mitigator = build_mitigator(self.config, self.probes, self.telemetry, self.classifier, note)
        except BaseException:
            for probe in self.probes:
                probe.close()
            raise
        self.agent = Agent(self.config, self.telemetry, self.probes, classifier=self.classifier,
                           mitigator=self.mitigator)
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
    def xdp(self) -> Any:
        return self.agent.xdp

    def _on_window(self, window: Any, verdict: Any) -> None:
        end = window.timestamp
        seconds = end - self._last_end if self._last_end is not None else self.config.interval
        self._last_end = end
        rates = getattr(self.agent.xdp, "last_rates", {}) if self.agent.xdp is not None else {}
        self.windows.append(WindowRecord(end, seconds, verdict.state, getattr(verdict, "raw_state", verdict.state),
                                         float(verdict.score), float(rates.get("packets", 0.0)),
                                         float(rates.get("dropped", 0.0)), dict(window.values)))

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
    from otel_ebpf_receiver.mitigation import MitigationSettings

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


# ---- the report ----------------------------------------------------------------------------------------------------

TARGETS = {
    "macro_f1": 0.95,             # over the flood and host-incident scenarios
    "ramp_warning_level": 0.30,   # warning before the ramp reaches 30 % of its final rate
    "first_drop_s": 3.0,          # first XDP drop after a single-source flood starts (enforce)
}


def _fmt(value: float | None, spec: str = ".2f", none: str = "—") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def summarize(results: Sequence[ScenarioResult]) -> dict[str, Any]:
    scored = [r for r in results if r.kind in (FLOOD_KIND, HOST_KIND)]
    f1s = [r.prf()[2] for r in scored]
    f1s = [f for f in f1s if not math.isnan(f)]
    benign_s = sum(w.seconds for r in results for w in r.benign_windows())
    hours = benign_s / 3600 if benign_s else math.nan
    alarms = sum(r.false_alarms() for r in results)
    warnings = sum(r.benign_warnings() for r in results)
    heavy = [r for r in results if r.name in ("heavy_transfer", "paced_transfer")]
    ramps = [r for r in results if r.kind == RAMP_KIND]
    drops = [r.first_drop for r in results if r.kind == FLOOD_KIND and r.expect and r.name != "forged_source_flood"
             and SCENARIOS[r.name].single_source]
    return {
        "macro_f1": sum(f1s) / len(f1s) if f1s else math.nan,
        "macro_f1_raw": (lambda v: sum(v) / len(v) if v else math.nan)(
            [f for f in (r.prf(raw=True)[2] for r in scored) if not math.isnan(f)]),
        "benign_hours": hours,
        "false_alarms": alarms,
        "false_alarms_per_hour": alarms / hours if hours else math.nan,
        "benign_warnings": warnings,
        "warnings_per_hour": warnings / hours if hours else math.nan,
        "heavy_transfer_flips": sum(r.false_alarms() + sum(1 for w in r.windows if w.state != "normal"
                                                           and r.truth(w) is False) for r in heavy) if heavy else None,
        "ramp_warning_level": ramps[0].level(ramps[0].first_warning) if ramps else None,
        "ramp_flip_level": ramps[0].level(ramps[0].first_flip) if ramps else None,
        "max_first_drop_s": max((d for d in drops if d is not None), default=None) if drops else None,
        "floods_without_drop": sum(1 for d in drops if d is None),
        "allowlisted_blocked": sorted({c for r in results for c in r.allowlisted_blocked}),
        "benign_blocked": sorted({f"{a} ({r.name})" for r in results for a in r.benign_blocked}),
    }


def markdown(results: Sequence[ScenarioResult], summary: dict[str, Any], *, model: str, seconds_note: str) -> str:
    lines = [
        f"Detection report — model `{model}`, {seconds_note}",
        "",
        "| scenario | kind | windows (load/benign) | precision | recall | F1 | F1 raw | warning after | "
        "state flip after | first XDP drop after | blocked | skipped (allowlisted) | HTTP ok during load | "
        "false alarms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tp, fp, fn, tn = r.confusion()
        p, rec, f1 = r.prf()
        raw_f1 = r.prf(raw=True)[2]
        positives = tp + fn
        warn, flip, drop = r.first_warning, r.first_flip, r.first_drop
        if r.kind == RAMP_KIND:
            warn_s = "—" if warn is None else f"{warn:.1f} s ({_fmt(r.level(warn), '.0%')} of final rate)"
            flip_s = f"{_fmt(flip, '.1f')} s ({_fmt(r.level(flip), '.0%')})" if flip is not None else "—"
        else:
            warn_s = f"{warn:.1f} s" if warn is not None else "—"
            flip_s = f"{flip:.1f} s" if flip is not None else "—"
        drop_s = f"{drop:.2f} s" if drop is not None else "—"
        ok, sent = r.http
        http = f"{ok}/{sent}" if sent else "—"
        if r.http_after_block[1]:
            http += f" ({r.http_after_block[0]}/{r.http_after_block[1]} after block)"
        scored = r.kind in (FLOOD_KIND, HOST_KIND)
        lines.append(
            f"| {r.name} | {r.kind} | {positives}/{fp + tn} | {_fmt(p) if scored else '—'} | "
            f"{_fmt(rec) if scored else '—'} | {_fmt(f1) if scored else '—'} | "
            f"{_fmt(raw_f1) if scored else '—'} | "
            f"{warn_s} | {flip_s} | {drop_s} | {', '.join(sorted({a for _, a in r.blocks})) or '—'} | "
            f"{len(r.skipped)} | {http} | {r.false_alarms()} |")
    s = summary
    check = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    lines += [
        "",
        f"* macro F1 (flood and host-incident scenarios, reported state, grace windows excluded): "
        f"**{_fmt(s['macro_f1'], '.3f')}** — target ≥ {TARGETS['macro_f1']}: "
        f"{check(s['macro_f1'] >= TARGETS['macro_f1'])}; model alone, every window: {_fmt(s['macro_f1_raw'], '.3f')}",
        f"* benign time {_fmt(s['benign_hours'] * 60, '.1f')} min: {s['false_alarms']} false alarm(s) = "
        f"**{_fmt(s['false_alarms_per_hour'], '.1f')}/h**; early warnings on benign time: {s['benign_warnings']} = "
        f"{_fmt(s['warnings_per_hour'], '.1f')}/h",
        f"* heavy-but-benign transfers: {s['heavy_transfer_flips']} non-normal window(s)/flip(s) — target 0: "
        f"{check(s['heavy_transfer_flips'] == 0) if s['heavy_transfer_flips'] is not None else 'not run'}",
        f"* slow ramp: warning at **{_fmt(s['ramp_warning_level'], '.0%')}** of the final rate — target < 30 %: "
        + (check(s['ramp_warning_level'] < TARGETS['ramp_warning_level'])
           if s['ramp_warning_level'] is not None else "not run / no warning")
        + f"; state flip at {_fmt(s['ramp_flip_level'], '.0%')}",
        f"* first XDP drop after a single-source flood starts: max **{_fmt(s['max_first_drop_s'], '.2f')} s** — "
        f"target ≤ {TARGETS['first_drop_s']} s: "
        + (check(s['max_first_drop_s'] is not None and s['max_first_drop_s'] <= TARGETS['first_drop_s']
                 and not s['floods_without_drop']) if s['max_first_drop_s'] is not None else "not run")
        + (f" ({s['floods_without_drop']} flood(s) never dropped)" if s['floods_without_drop'] else ""),
        f"* allowlisted addresses blocked: **{len(s['allowlisted_blocked'])}** "
        f"{', '.join(s['allowlisted_blocked'])} — target 0: {check(not s['allowlisted_blocked'])}",
        f"* benign sources blocked (anything but the attacker, or during a benign scenario): "
        f"**{len(s['benign_blocked'])}** {', '.join(s['benign_blocked'])}",
        "",
        "Windows are 1 s. A window is \"load\" when its midpoint lies inside the load; the first 2 s of a load and the "
        "first 3 s after it are not scored for the reported state (the documented debounce: 2 windows to enter an "
        "incident, 3 to leave it — the flip time shows that latency); \"F1 raw\" scores the model's per-window state "
        "over every window. Positive = the reported state is an attack state (floods, ramp) or the scenario's own "
        "state (host incidents). False alarm = the reported state left `normal` during benign time. "
        "random_source_flood has no single source to block (per-source rule), forged_source_flood claims an "
        "allowlisted address: neither should ever be dropped.",
    ]
    return "\n".join(lines)


def report(plan: Sequence[tuple[str, float]], *, pre: float = 15.0, post: float = 15.0, model: str | None = None,
           verbose: bool = False, say: Callable[[str], None] = say_default) -> tuple[list[ScenarioResult], str]:
    with Testbed(say=say) as bed:
        allow = (bed.benign[0].ipv4,)  # client0: what forged_source_flood claims to be
        rig = AgentRig(bed, mode="enforce", ttl=120.0, allow=allow, model=model, say=say)
        try:
            rig.start()
            say(f"agent: probes {', '.join(p.name for p in rig.probes)}; model {rig.model_version}; "
                f"mitigation enforce, allowlist incl. {allow[0]}")
            with http_load(bed, 40):  # model and early-warning baselines warm up on the benign background
                settle = rig.wait_windows(30)
            say(f"warm-up: {len(settle)} windows, state {settle[-1].state if settle else '?'}")
            results = []
            for name, seconds in plan:
                scenario = SCENARIOS[name]
                say(f"{name}: {pre:.0f} s benign, {seconds:.0f} s {scenario.summary}, {post:.0f} s benign")
                result = score_scenario(rig, scenario, seconds, pre=pre, post=post, say=say)
                results.append(result)
                p, r, f1 = result.prf()
                say(f"  F1 {_fmt(f1)} (P {_fmt(p)} R {_fmt(r)}); warning {_fmt(result.first_warning, '.1f')} s, "
                    f"flip {_fmt(result.first_flip, '.1f')} s, drop {_fmt(result.first_drop, '.2f')} s; "
                    f"false alarms {result.false_alarms()}")
                if verbose:
                    for w in result.windows:
                        mark = {True: "LOAD", False: "    ", None: "grace"}[result.truth(w)]
                        say(f"    {w.end - result.attack_start:7.1f} {mark:5s} {w.state:20s} {w.raw_state:20s} "
                            f"score {w.score:6.2f} pkt/s {w.packets_per_s:9.0f} drop/s {w.dropped_per_s:9.0f}")
            version = rig.model_version
        finally:
            rig.close()
    note = f"pre {pre:.0f} s / post {post:.0f} s benign around each load, measured {time.strftime('%Y-%m-%d %H:%M')}"
    return results, markdown(results, summarize(results), model=version, seconds_note=note)
