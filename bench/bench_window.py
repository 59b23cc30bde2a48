"""Per-window cost of the agent's whole user-space path: read every probe's maps, build the feature window,
run the state model, record everything into the OpenTelemetry SDK — measured on live probes.

    .venv/bin/python bench/bench_window.py [--windows 200]

Windows are stepped with a short gap while the host does its ordinary work, so the maps hold a realistic number of
keys; the table gives the median and p99 of Agent.step() and its parts in wall-clock time, and the median of the
CPU time this thread spent on them (time.thread_time): on a busy host the wall clock also counts the time the
scheduler gave other processes, the CPU time does not. Pin it (`taskset -c 0`) as the README does.

The last row steps the agent once more right after each measured window: the same code with warm caches and
almost nothing new in the maps. The difference to the whole window is mostly what it costs to bring code and data
back into the caches after the pause, which this machine kind charges whatever the agent does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402

from otel_ebpf_receiver.assembly import build_agent  # noqa: E402
from otel_ebpf_receiver.config import Config  # noqa: E402
from otel_ebpf_receiver.features import FeatureWindow  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between windows (maps fill meanwhile)")
    args = parser.parse_args()
    config = Config(exporter="none", live="off")
    agent = build_agent(config, metric_readers=[InMemoryMetricReader()],
                        say=lambda line: print(line, file=sys.stderr))
    probes, classifier = agent.probes, agent.classifier
    per_probe: dict[str, list[tuple[float, float]]] = {p.name: [] for p in probes}
    infer: list[tuple[float, float]] = []
    record: list[tuple[float, float]] = []
    whole: list[tuple[float, float]] = []
    again: list[tuple[float, float]] = []
    wall, cpu = time.perf_counter, time.thread_time

    def timed(into: list, work):
        w0, c0 = wall(), cpu()
        result = work()
        into.append((wall() - w0, cpu() - c0))
        return result

    try:
        agent.step(1.0)
        for _ in range(args.windows):
            time.sleep(args.gap)
            readings = {}
            for probe in probes:  # the parts, measured separately (each read consumes its own delta)
                readings[probe.name] = timed(per_probe[probe.name], lambda: probe.read(1.0))
            # into the SDK (in memory; recorded once more, a bench)
            timed(record, lambda: agent.export(readings, agent.verdict, 1.0))
            window = FeatureWindow(time.time(), agent.last_window.values)
            model = classifier.watcher.model
            if model is not None:
                timed(infer, lambda: model.predict(window.values))
            time.sleep(args.gap)
            timed(whole, lambda: agent.step(1.0))
            # the same step again at once: caches warm, and nearly nothing new in the maps (a floor, not a window)
            timed(again, lambda: agent.step(1.0))
    finally:
        agent.close()
    print(f"\nPer-window cost, {args.windows} windows, probes: {', '.join(p.name for p in probes)}\n")
    print("| part | median µs | p99 µs | median CPU µs |")
    print("|---|---:|---:|---:|")

    def row(label: str, values: list[tuple[float, float]], bold: bool = False) -> None:
        walls, cpus = [v[0] for v in values], [v[1] for v in values]
        b = "**" if bold else ""
        print(f"| {b}{label}{b} | {b}{statistics.median(walls) * 1e6:.0f}{b} | {pct(walls, 0.99) * 1e6:.0f} | "
              f"{statistics.median(cpus) * 1e6:.0f} |")

    for name, values in per_probe.items():
        row(f"read maps: {name}", values)
    if infer:
        row("state model inference (onnxruntime)", infer)
    row("record into the SDK (counters, gauges, histograms, self-metrics)", record)
    row("whole window (read + features + infer + record)", whole, bold=True)
    row("the same step again right after (warm caches, maps nearly empty: a floor)", again)
    print(f"\nLoad average at the end: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    share = statistics.median(v[0] for v in whole) / config.interval * 100
    print(f"\nAt a {config.interval:g} s interval that is {share:.3f} % of one core.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
