"""`otel-ebpf-receiver snapshot`: run a few windows with the agent exactly as `run` builds it (probes, bundled or
configured model, debounce), export nothing, and print what each window saw — for scripts and bug reports."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from typing import Any

from .. import __version__, assembly, config
from ..agent import Agent, WindowResult
from .common import say, setup_logging

DEFAULT_WINDOWS = 3

SNAPSHOT_EPILOG = """examples (as root, or prefix sudo):
  otel-ebpf-receiver snapshot --json                      3 windows of 1 s, one JSON document on stdout
  otel-ebpf-receiver snapshot --json --windows 10 --interval 500ms --probes syscalls,exec > snapshot.json
  otel-ebpf-receiver snapshot                             the same as text (what the live view shows)

The JSON document: {"agent": {...}, "windows": [{"number", "seconds", "state", "raw_state", "score",
"model_version", "top_features", "top_features_from", "features", "probes": {name: {"rate", "rate_unit",
"top"}}}, ...]}. top_features_from: nearest_normal (the features furthest from normal explain the window) or
assigned_cluster (what differs from the centre of its own cluster: a normal window, or any with an older model).
Nothing is exported; mitigation, if configured, only says what it would do (enforce runs as dry-run).
"""


def finite(value: float) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    value = float(value)
    return value if math.isfinite(value) else None


def window_document(result: WindowResult) -> dict[str, Any]:
    verdict = result.verdict
    return {
        "number": result.number,
        "seconds": round(result.seconds, 6),
        "cost_seconds": round(result.cost_seconds, 6),
        "state": verdict.state,
        "raw_state": verdict.raw_state,
        "score": finite(verdict.score),
        "model_version": verdict.model_version,
        "top_features": [{"feature": name, "deviation": finite(deviation)} for name, deviation in verdict.top_features],
        "top_features_from": verdict.explained_from,
        "features": {name: finite(value) for name, value in result.window.values.items()},
        "probes": {name: {"rate": finite(r.rate) if r.rate is not None else None, "rate_unit": r.rate_unit,
                          "top": [{"label": t.label, "value": finite(t.value), "unit": t.unit} for t in r.top]}
                   for name, r in result.readings.items()},
    }


def agent_document(agent: Agent) -> dict[str, Any]:
    return {"version": __version__, "host": platform.node(), "kernel": platform.release(),
            "interval_seconds": agent.config.interval, "model_version": agent.classifier.version,
            "probes": [{"name": p.name, "mode": p.mode} for p in agent.probes]}


def snapshot(cfg: config.Config, windows: int, emit: Any) -> dict[str, Any]:
    """Run ``windows`` windows with the agent `run` would build (no export, no live view) and return the document;
    ``emit(agent, result)`` is called after each window."""
    if cfg.mitigation.get("mode") == "enforce":  # a diagnostic command must never change the blocklist
        cfg.mitigation = {**cfg.mitigation, "mode": "dry-run"}
    cfg.exporter = "none"
    agent = assembly.build_agent(cfg, say=say, live=False)
    results: list[WindowResult] = []

    def collect(result: WindowResult) -> None:
        results.append(result)
        emit(agent, result)
        if len(results) >= windows:
            agent.stop_event.set()

    agent.window_listeners.append(collect)
    agent.install_signal_handlers()  # Ctrl-C / SIGTERM: stop early, still print what was seen
    try:
        agent.run()
        return {"agent": agent_document(agent), "windows": [window_document(r) for r in results]}
    finally:
        agent.close()


def cmd_snapshot(args: argparse.Namespace) -> int:
    cfg = config.load({"config": args.config, "interval": args.interval, "probes": args.probes,
                       "model_dir": args.model_dir, "log_level": args.log_level})
    if args.windows < 1:
        say("error: --windows must be at least 1")
        return 2
    setup_logging(cfg.log_level)
    text = not args.json

    def emit(agent: Agent, result: WindowResult) -> None:
        if text:
            from ..live import LiveView

            print("\n".join(LiveView(sys.stdout, agent).lines(result)) + "\n", flush=True)

    document = snapshot(cfg, args.windows, emit)
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    snap = sub.add_parser("snapshot", help="run a few windows and print what they saw (--json for scripts)",
                          epilog=SNAPSHOT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    snap.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    snap.add_argument("--windows", "-n", type=int, default=DEFAULT_WINDOWS,
                      help=f"how many windows (default {DEFAULT_WINDOWS})")
    snap.add_argument("--interval", "-i", help="window length, e.g. 1s (default), 500ms")
    snap.add_argument("--config", "-c", help="YAML configuration file (as for run)")
    snap.add_argument("--probes", "-p", help="comma-separated probes (default: all available)")
    snap.add_argument("--model-dir", help="directory of .onnx state models (as for run)")
    snap.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    snap.set_defaults(handler=cmd_snapshot)
