"""`make model`: rebuild the bundled default model on this host, from scenarios the project drives itself.

    .venv/bin/python -m model_export.default_model [--seconds 40] [--out otel_ebpf_receiver/models/default.onnx]

Records each scenario with one recorder (so every window has the same feature columns), writes the CSVs to
build/model/, trains (scaler + KMeans, clusters named by majority label) and exports with the parity check.
Scenarios that need a capability this host lacks (e.g. the network flood needs the XDP probe) are skipped
with a line; the model then simply does not know that state.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from otel_ebpf_receiver.state import BUNDLED_MODEL_DIR

from . import scenarios
from .record import Recorder

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "model"

# (label, scenario driver name, share of the base duration)
PLAN = [
    ("normal", "idle", 1.0),  # an idle host is normal too, not "unknown"
    ("normal", "normal", 2.0),
    ("exec_storm", "exec_storm", 1.0),
    ("file_open_storm", "file_open_storm", 1.0),
    ("cpu_saturated", "cpu_saturated", 1.0),
    ("io_storm", "disk_io_storm", 1.0),
    ("normal", "normal", 1.0),
]


def network_plan():
    """The flood scenarios live with the network lab (namespaces + XDP); absent when that is not available."""
    try:
        from otel_ebpf_receiver.netlab import MODEL_SCENARIOS  # type: ignore[attr-defined]
    except Exception:
        return []
    return list(MODEL_SCENARIOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40, help="base recording time per scenario")
    parser.add_argument("--out", default=str(BUNDLED_MODEL_DIR / "default.onnx"))
    # More clusters than states: "normal" is several modes (idle, web, builds); each cluster is then named by
    # the majority label of its windows.
    parser.add_argument("--clusters", type=int, default=12)
    args = parser.parse_args(argv)
    BUILD.mkdir(parents=True, exist_ok=True)
    say = lambda line: print(f"make model: {line}", file=sys.stderr, flush=True)  # noqa: E731

    recorder = Recorder(say=say).start()
    try:
        plan = [(label, getattr(scenarios, driver), share) for label, driver, share in PLAN] + network_plan()
        for label, driver, share in plan:
            seconds = args.seconds * share
            say(f"scenario {label}: {seconds:.0f} s")
            before = len(recorder.windows)
            with driver(max_seconds=seconds + 30), recorder.labelled(label):
                time.sleep(seconds)
            say(f"  {len(recorder.windows) - before} windows")
            with recorder.labelled(None, settle_windows=0):
                time.sleep(3)  # let the workload drain before the next label
    finally:
        recorder.stop()
    csv_path = BUILD / "windows.csv"
    rows = recorder.save(str(csv_path))
    say(f"{rows} windows in {csv_path}")

    from .cli import main as model_cli

    train_args = ["train", str(csv_path), "-o", str(BUILD / "trained"), "--onnx", args.out, "-q"]
    if args.clusters:
        train_args += ["--clusters", str(args.clusters)]
    return model_cli(train_args)


if __name__ == "__main__":
    sys.exit(main())
