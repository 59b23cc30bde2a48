"""What `otel-ebpf-lab adapt` buys on a real host, measured on windows the adaptation never saw.

    .venv/bin/python bench/bench_adapt.py --adapt A.csv --benign B.csv --incidents C.csv

A.csv: this host's benign time, recorded for the adaptation (`otel-ebpf-lab record-host --label normal`);
B.csv: more benign time recorded afterwards, never trained on; C.csv: incidents recorded on this host with the
project's workloads, each under its state's label (`record-host --label exec_storm --workload exec_storm`, ...),
never trained on either. The bundled model the agent would serve with the recorded probes is adapted with A
(adapt.adapt, exactly what the command does) and both models score B and C window by window through the agent's
loader; B also through the agent's debounce (2 windows to leave normal, 3 to come back), as state changes per hour.
Prints one markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_export.lab import adapt, rebuild  # noqa: E402
from model_export.lab.adapt import states  # noqa: E402
from model_export.lab.holdout import debounced_alarms, rows  # noqa: E402
from model_export.windows import read_many, read_windows  # noqa: E402
from otel_ebpf_receiver.features import feature_names  # noqa: E402
from otel_ebpf_receiver.model import NORMAL_STATE  # noqa: E402
from otel_ebpf_receiver.model.watch import best_bundled_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapt", required=True, nargs="+", metavar="A.csv")
    parser.add_argument("--benign", required=True, nargs="+", metavar="B.csv")
    parser.add_argument("--incidents", required=True, nargs="+", metavar="C.csv")
    parser.add_argument("--lab-windows", default=str(rebuild.SHIPPED_WINDOWS))
    args = parser.parse_args()
    host, benign, incidents = read_many(args.adapt), read_many(args.benign), read_many(args.incidents)
    bundled = best_bundled_model(feature_names(list(dict.fromkeys(n.split(".", 1)[0] for n in host.names))),
                                 lambda line: None)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        result = adapt.adapt(bundled, read_windows(args.lab_windows), host, Path(tmp) / "adapted.onnx",
                             say=lambda line: None)
    adapted = result.model
    hours = len(benign) / 3600.0
    runs = np.zeros(len(benign), dtype=int)  # one recording: debounced as one run
    print(f"bundled {bundled.path.name} ({bundled.version}) vs adapted ({adapted.version}); adapted with "
          f"{len(host)} host windows; scored on {len(benign)} benign and {len(incidents)} incident windows never "
          f"trained on\n")
    print("| windows never trained on | windows | bundled: not normal | adapted: not normal |")
    print("|---|---:|---:|---:|")
    before, after = states(bundled, benign), states(adapted, benign)
    print(f"| benign (B), per window | {len(benign)} | {int((before != NORMAL_STATE).sum())} "
          f"| {int((after != NORMAL_STATE).sum())} |")
    print(f"| benign (B), state changes after debounce, per hour | {len(benign)} "
          f"| {debounced_alarms(before, runs) / hours:.0f} | {debounced_alarms(after, runs) / hours:.0f} |")
    for label in sorted(set(incidents.labels) - {"", NORMAL_STATE}):
        part = rows(incidents, incidents.labels == label)
        b, a = states(bundled, part), states(adapted, part)
        named = "" if label in bundled.cluster_states else " (a state this model does not know)"
        print(f"| {label}{named}: not normal / named | {len(part)} | {int((b != NORMAL_STATE).sum())} / "
              f"{int((b == label).sum())} | {int((a != NORMAL_STATE).sum())} / {int((a == label).sum())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
