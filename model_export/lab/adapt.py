"""`otel-ebpf-lab adapt`: refine the bundled model's ``normal`` with this host's own benign time (issue 13, item 6).

    sudo otel-ebpf-lab adapt --duration 10m -o /var/lib/otel-ebpf-receiver/models/adapted.onnx

1. Which model: the bundled model the agent would serve with these probes (``--probes``, default every probe this
   kernel runs; model.watch.best_bundled_model picks it, as the agent does).
2. Records this host for ``--duration`` under the label ``normal``, with the agent's own probes and feature
   schema (``record-host``); ``--host-windows FILE.csv`` trains on windows recorded before instead (several
   ``record-host --label normal`` runs over a day are better than one sitting).
3. Trains that model again exactly as ``make model`` did (model_export.lab.rebuild: its recipe, cluster count,
   feature columns and left-out states) on the lab recording it was trained on — shipped beside it,
   :data:`rebuild.SHIPPED_WINDOWS` — plus the host's windows as ``normal``. The incidents the lab taught stay;
   what this host does when it is healthy becomes normal.
4. Exports it with the same attack states (the flood states, when the model has them) and writes ``--output``
   atomically: dropped into the model directory, the running agent swaps it in within two windows.

It says, before writing, how many of the host's windows the bundled model did not call ``normal`` and how many the
adapted one does not — the second on the windows it was trained on, so it is labelled in-sample; and the lab's
incident windows called "not normal" by each (in-sample for both). The held-out measure — a benign recording the
adaptation never saw, and attack recall — is in the README ("Adapt to the host").

The host must be healthy while it records: whatever it does becomes ``normal``. An incident recorded as normal is
an incident the adapted model will not report.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from otel_ebpf_receiver.model import NORMAL_STATE
from otel_ebpf_receiver.model.contract import UNKNOWN_STATE
from otel_ebpf_receiver.model.runtime import StateModel

from .. import train as tr
from ..windows import WindowTable, read_windows
from . import rebuild
from .holdout import rows, score

HOST_LABEL = NORMAL_STATE
HOST_CLUSTERS = 4   # on top of the bundled recipe's: room for the host's own modes of normal


@dataclass(frozen=True)
class Adapted:
    model: StateModel
    host_not_normal_before: int
    host_not_normal_after: int      # in-sample: the host windows are training data of this model
    host_windows: int
    # per lab incident state the model is trained on: (windows not normal before, after, windows) — in-sample
    incidents: dict[str, tuple[int, int, int]]

    @property
    def weakened(self) -> dict[str, tuple[int, int, int]]:
        """Incident states the adapted model calls normal more often than the bundled one did: this host's
        normal overlaps them (or widened a feature they stand out in)."""
        return {state: counts for state, counts in self.incidents.items() if counts[1] < counts[0]}


def states(model: StateModel, table: WindowTable) -> np.ndarray:
    """Per window: the state the agent's classify path gives it (``unknown`` by score included)."""
    idx = [table.names.index(n) for n in model.feature_names]
    return score(model, table.values[:, idx])


def not_normal(model: StateModel, table: WindowTable) -> np.ndarray:
    return states(model, table) != NORMAL_STATE


def adapt(bundled: StateModel, lab: WindowTable, host: WindowTable, output: Path,
          say: Callable[[str], None] = print) -> Adapted:
    """Train ``bundled``'s recipe on ``lab`` + ``host`` (labelled normal); export to ``output``; compare."""
    spec = rebuild.model_spec(bundled.path.name)
    names = list(bundled.feature_names)
    missing = [n for n in names if n not in host.names]
    if missing:
        raise tr.TrainError(f"the host windows lack {', '.join(missing)}: record them with the probes the model "
                            f"uses (otel-ebpf-model info {bundled.path})")
    lab_part = rebuild.select(lab, names, rebuild.left_out(spec, names))
    host_part = rebuild.select(host, names, set())
    host_part.labels[:] = HOST_LABEL
    table = WindowTable(tuple(names), np.concatenate([lab_part.timestamps, host_part.timestamps]),
                        np.concatenate([lab_part.labels, host_part.labels]),
                        np.concatenate([lab_part.values, host_part.values]),
                        sources=lab_part.sources + host_part.sources)
    # The served model's own cluster count (its file says), not the recipe's current one: a rebuild may since have
    # changed the recipe, and the shipped recording is the one the served model was trained on.
    clusters = len(bundled.cluster_states)
    say(f"training {bundled.path.name}'s recipe on {len(lab_part)} lab windows + {len(host_part)} host windows "
        f"({len(names)} features, {clusters} + {HOST_CLUSTERS} clusters)")
    trained = rebuild.fit(table, rebuild.recipe(clusters + HOST_CLUSTERS, bundled.unknown_above), say=say)
    attacks = [s for s in dict.fromkeys(trained.cluster_states) if s in rebuild.flood_states()]
    # written like every export: atomically, after the runtime's own loader accepted it
    adapted = tr.export(trained, output, attack_states=attacks).model
    incidents = {}
    for state in sorted(set(bundled.cluster_states) - {NORMAL_STATE, UNKNOWN_STATE}):  # what it can name
        part = rows(lab_part, lab_part.labels == state)
        incidents[state] = (int(not_normal(bundled, part).sum()), int(not_normal(adapted, part).sum()), len(part))
    return Adapted(adapted, int(not_normal(bundled, host_part).sum()), int(not_normal(adapted, host_part).sum()),
                   len(host_part), incidents)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, metavar="MODEL.onnx",
                        help="where the adapted model goes, e.g. /var/lib/otel-ebpf-receiver/models/adapted.onnx")
    parser.add_argument("--duration", "-d", default="10m", help="how long to record this host (default 10m)")
    parser.add_argument("--probes", help="comma-separated probes (default: every probe this kernel can run)")
    parser.add_argument("--host-windows", metavar="FILE.csv", action="append", default=[],
                        help="train on windows recorded before (record-host --label normal) instead of recording")
    parser.add_argument("--lab-windows", metavar="FILE.csv", default=str(rebuild.SHIPPED_WINDOWS),
                        help="the lab recording the bundled models were trained on (default: the shipped one)")
    parser.add_argument("--keep", metavar="FILE.csv", help="also keep the host recording here (appends)")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except tr.TrainError as exc:  # one line from the CLI (cli._one_line_errors), as every lab error
        raise ValueError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    from otel_ebpf_receiver.durations import parse_duration
    from otel_ebpf_receiver.features import feature_names
    from otel_ebpf_receiver.model.watch import best_bundled_model

    from ..windows import read_many

    output = Path(args.output)
    lab_windows = Path(args.lab_windows)
    if not lab_windows.is_file():
        raise tr.TrainError(f"no lab recording at {lab_windows}: pass --lab-windows (make model leaves one in "
                            f"{rebuild.BUILD / 'windows.csv'})")
    probes = [p for p in (args.probes or "").split(",") if p]
    if args.host_windows:
        host = read_many(args.host_windows)
    else:
        from otel_ebpf_receiver.assembly import check_privileges

        from .record import record
        from .testbed import say_default

        check_privileges()
        duration = parse_duration(args.duration, "--duration")
        keep = Path(args.keep) if args.keep else None
        with tempfile.TemporaryDirectory(prefix="oer-adapt-") as tmp:
            path = keep or Path(tmp) / "host.csv"
            print(f"adapt: recording this host for {args.duration} as {HOST_LABEL!r} — it must be healthy meanwhile")
            record(HOST_LABEL, duration, str(path), probes, say=say_default)
            host = read_windows(path)
    # the model the agent would serve with the probes that produced these windows
    recorded_probes = list(dict.fromkeys(n.split(".", 1)[0] for n in host.names))
    bundled = best_bundled_model(feature_names(recorded_probes), lambda line: None)
    if bundled is None:
        raise tr.TrainError("no bundled model fits these probes")
    result = adapt(bundled, read_windows(lab_windows), host, output, say=lambda line: print(f"adapt: {line}"))
    print(f"adapt: {bundled.path.name} ({bundled.version}) called {result.host_not_normal_before} of "
          f"{result.host_windows} host windows not normal; the adapted model {result.host_not_normal_after} "
          f"(in-sample)")
    print("adapt: lab incident windows called not normal, before → after (both in-sample): " + ", ".join(
        f"{state} {before} → {after} of {total}" for state, (before, after, total) in result.incidents.items()))
    for state, (before, after, total) in result.weakened.items():
        print(f"adapt: warning: {state} is called normal more often now ({before} → {after} of {total} lab windows "
              f"not normal): this host's recording overlaps it — record a longer, quieter benign period, or keep "
              f"the bundled model")
    print(f"adapt: wrote {output} ({result.model.version}); in the agent's model directory it serves within two "
          f"windows")
    return 0
