"""What the debounce buys: state changes per hour with and without it, replaying recorded windows through a model.

    .venv/bin/python bench/bench_debounce.py [--windows FILE.csv] [--model otel_ebpf_receiver/model/bundled/default.onnx]

Replays the recording (in time order, as the agent would see it) through the model; counts raw state changes
(what the model says each window) and reported changes after StateDebouncer, per true label, and the delay the
debounce adds to entering an incident.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model_export.windows import read_windows  # noqa: E402
from otel_ebpf_receiver.model import load_model  # noqa: E402
from otel_ebpf_receiver.state.debounce import StateDebouncer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", default=str(REPO / "model_export/lab/data/training-windows.csv.gz"),
                        help="a recording (default: the one the bundled models were trained on)")
    parser.add_argument("--model", default=str(REPO / "otel_ebpf_receiver/model/bundled/default.onnx"))
    args = parser.parse_args()
    if not Path(args.windows).exists():
        print(f"no recording at {args.windows}: run `make model` first", file=sys.stderr)
        return 1
    model = load_model(args.model)
    table = read_windows(args.windows)
    names = list(table.names)
    order = sorted(range(len(table.labels)), key=lambda i: table.timestamps[i])
    debouncer = StateDebouncer()
    raw_changes: Counter[str] = Counter()
    reported_changes: Counter[str] = Counter()
    windows: Counter[str] = Counter()
    prev_raw = prev_reported = None
    for i in order:
        label = table.labels[i]
        values = dict(zip(names, (float(v) for v in table.values[i])))
        raw = model.predict(values).state
        reported = debouncer.update(raw).state
        windows[label] += 1
        if prev_raw is not None and raw != prev_raw:
            raw_changes[label] += 1
        if prev_reported is not None and reported != prev_reported:
            reported_changes[label] += 1
        prev_raw, prev_reported = raw, reported
    print(f"\nState changes with and without debounce (enter 2 windows, leave 3), model {model.version}, "
          f"{sum(windows.values())} recorded 1 s windows\n")
    print("| recorded label | windows | raw changes/hour | debounced changes/hour |")
    print("|---|---:|---:|---:|")
    for label in sorted(windows):
        hours = windows[label] / 3600
        print(f"| {label} | {windows[label]} | {raw_changes[label] / hours:.0f} | {reported_changes[label] / hours:.0f} |")
    print("\nThe debounce delays entering a state by one window (2 consecutive windows needed) and leaving by two.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
