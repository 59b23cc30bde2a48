"""Per-window cost of the agent's whole user-space path: read every probe's maps, build the feature window,
run the state model, record everything into the OpenTelemetry SDK — measured on live probes.

    .venv/bin/python bench/bench_window.py [--windows 200]

Windows are stepped back to back (no sleeping) while the host does its ordinary work, so the maps hold a
realistic number of keys; the table gives the median and p99 of Agent.step() and its parts.
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
    per_probe: dict[str, list[float]] = {p.name: [] for p in probes}
    infer: list[float] = []
    record: list[float] = []
    whole: list[float] = []
    try:
        agent.step(1.0)
        for _ in range(args.windows):
            time.sleep(args.gap)
            readings = {}
            for probe in probes:  # the parts, measured separately (each read consumes its own delta)
                t0 = time.perf_counter()
                readings[probe.name] = probe.read(1.0)
                per_probe[probe.name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            agent.export(readings, agent.verdict, 1.0)  # into the SDK (in memory; recorded once more, a bench)
            record.append(time.perf_counter() - t0)
            window = FeatureWindow(time.time(), agent.last_window.values)
            model = classifier.watcher.model
            if model is not None:
                t0 = time.perf_counter()
                model.predict(window.values)
                infer.append(time.perf_counter() - t0)
            time.sleep(args.gap)
            t0 = time.perf_counter()
            agent.step(1.0)
            whole.append(time.perf_counter() - t0)
    finally:
        agent.close()
    print(f"\nPer-window cost, {args.windows} windows, probes: {', '.join(p.name for p in probes)}\n")
    print("| part | median µs | p99 µs |")
    print("|---|---:|---:|")
    for name, values in per_probe.items():
        print(f"| read maps: {name} | {statistics.median(values) * 1e6:.0f} | {pct(values, 0.99) * 1e6:.0f} |")
    if infer:
        print(f"| state model inference (onnxruntime) | {statistics.median(infer) * 1e6:.0f} | "
              f"{pct(infer, 0.99) * 1e6:.0f} |")
    print(f"| record into the SDK (counters, gauges, histograms, self-metrics) | {statistics.median(record) * 1e6:.0f} | "
          f"{pct(record, 0.99) * 1e6:.0f} |")
    print(f"| **whole window** (read + features + infer + record) | **{statistics.median(whole) * 1e6:.0f}** | "
          f"{pct(whole, 0.99) * 1e6:.0f} |")
    share = statistics.median(whole) / config.interval * 100
    print(f"\nAt a {config.interval:g} s interval that is {share:.3f} % of one core.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
