"""The detection report: every scenario of a plan run against the agent in the lab, scored, and summed up against
the project's targets.

    sudo otel-ebpf-lab report [--scenarios NAME[:SECONDS],...] [--markdown FILE] [--json FILE]   (make detection-report)

How each scenario is run and scored is :mod:`model_export.lab.detection`; this module runs the plan (after a
warm-up on the benign background), sums the results up (:func:`summarize`) and writes them as a markdown table
(:func:`markdown`) or as JSON, every window included (:func:`as_json`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

from .detection import AgentRig, ScenarioResult, score_scenario
from .scenarios import FLOOD_KIND, HOST_KIND, RAMP_KIND, SCENARIOS
from .testbed import Testbed, http_load, say_default


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


def as_json(results: Sequence[ScenarioResult]) -> dict[str, Any]:
    """The summary and every scenario's windows and events, for a closer look (``report --json``)."""
    rows = [{"scenario": r.name, "kind": r.kind, "confusion": r.confusion(), "prf": r.prf(),
             "prf_raw": r.prf(raw=True), "first_warning_s": r.first_warning, "first_flip_s": r.first_flip,
             "first_drop_s": r.first_drop, "blocks": r.blocks, "skipped": r.skipped, "http": r.http,
             "http_after_block": r.http_after_block, "false_alarms": r.false_alarms(),
             "windows": [vars(w) for w in r.windows], "attack_start": r.attack_start,
             "attack_end": r.attack_end, "ramp_steps": r.drive.steps} for r in results]
    return {"summary": summarize(results), "scenarios": rows}
