"""otel-ebpf-model: train the system-state model on recorded windows, export it to ONNX, inspect a model.

Label, cluster, classify: record windows while a known scenario runs (label = scenario), cluster them, name
each cluster by the majority label of its windows; at run time a window gets the state of its nearest cluster,
or "unknown" when it is further from it than the training windows were.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

EPILOG_MAIN = """\
examples:
  # label, cluster, classify — then ship one self-describing ONNX file
  otel-ebpf-model train normal.csv flood.csv exec.csv -o build/model
  otel-ebpf-model export build/model -o models/state.onnx
  otel-ebpf-model info models/state.onnx

  # the same in one step, with a Gaussian mixture and 6 clusters
  otel-ebpf-model train recordings/*.csv -o build/model --algorithm gmm --clusters 6 --onnx models/state.onnx

  # no host to record on? try the toolchain on synthetic windows
  otel-ebpf-model synthetic -o /tmp/demo.csv && otel-ebpf-model train /tmp/demo.csv -o /tmp/m --onnx /tmp/m.onnx

The CSV format (written by `otel-ebpf-lab record` and `record-host`): timestamp,label,<feature>,... one row
per window.
"""

EPILOG_TRAIN = """\
examples:
  otel-ebpf-model train normal.csv flood.csv -o build/model
  otel-ebpf-model train rec/*.csv -o build/model --clusters 8 --percentile 99.5 --unknown-above 2
  otel-ebpf-model train rec/*.csv -o build/model --features syscalls.rate_log1p,exec.exec_rate_log1p
  otel-ebpf-model train rec/*.csv -o build/model --algorithm birch --birch-threshold 0.3 --onnx state.onnx

Writes DIR/pipeline.joblib (scikit-learn pipeline + facts, a pickle: only load your own), DIR/metadata.json,
DIR/report.txt and DIR/clusters.png (PCA scatter by label and by predicted state).
Each cluster's state is the majority label of its windows; its distance threshold is the --percentile of
its windows' distances to the centre; at run time score = distance / threshold and score > --unknown-above
reports "unknown".
"""

EPILOG_EXPORT = """\
examples:
  otel-ebpf-model export build/model -o models/state.onnx
  otel-ebpf-model export build/model -o /var/lib/otel-ebpf-receiver/models/state-v7.onnx --version v7

Refuses to write the file unless onnxruntime and scikit-learn agree on the training windows (identical
labels; distances and deviations within |onnx - sklearn| <= 1e-4 + 1e-4*|sklearn|). The file appears
atomically, so it can be written straight into the agent's watched model directory.
"""

EPILOG_INFO = """\
examples:
  otel-ebpf-model info models/state.onnx
  otel-ebpf-model info models/state.onnx --json | jq .clusters
  otel-ebpf-model info models/state.onnx --check-schema   # can this build's probes feed it?
"""


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet  # bars go to stderr, and only when it is a terminal


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import inspection
    from . import train as tr
    from .windows import read_many

    names = [n.strip() for n in args.features.split(",") if n.strip()] if args.features else None
    config = tr.TrainConfig(
        algorithm=args.algorithm, clusters=args.clusters, percentile=args.percentile,
        unknown_above=args.unknown_above, min_threshold=args.min_threshold, seed=args.seed,
        birch_threshold=args.birch_threshold, gmm_covariance=args.gmm_covariance, bounds_margin=args.bounds_margin,
    )
    show = _progress(args)
    steps = ["read", "fit", "plot", "save"] + (["export"] if args.onnx else [])
    with tqdm(total=len(steps), desc="train", unit="step", disable=None if show else True,
              leave=False) as bar:
        bar.set_postfix_str("read")
        table = read_many(args.files, names, progress=show)
        bar.update()
        bar.set_postfix_str(f"fit {args.algorithm} on {len(table)} windows")
        trained = tr.fit(table, config)
        bar.update()
        bar.set_postfix_str("plot")
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        try:
            png: Path | str = inspection.plot(trained, out / tr.PLOT_FILE)
        except ImportError as exc:  # matplotlib is a dev extra: train without the picture rather than fail
            png = f"no {tr.PLOT_FILE} ({exc.name or 'matplotlib'} is not installed)"
        bar.update()
        bar.set_postfix_str("save")
        tr.save(trained, out)
        text = inspection.report(trained)
        (out / tr.REPORT_FILE).write_text(text + "\n")
        bar.update()
        exported = None
        if args.onnx:
            bar.set_postfix_str("export")
            exported = tr.export(trained, args.onnx, version=args.version, progress=show,
                                 attack_states=_attack_states(args))
            bar.update()
    print(text)
    print(f"\nwrote {out / tr.BUNDLE_FILE}, {out / tr.METADATA_FILE}, {out / tr.REPORT_FILE}, {png}")
    if exported:
        _print_exported(exported)
    else:
        print(f"next: otel-ebpf-model export {out} -o MODEL.onnx")
    return 0


def _attack_states(args: argparse.Namespace) -> list[str]:
    return [s.strip() for s in (args.attack_states or "").split(",") if s.strip()]


def _print_exported(exported) -> None:  # type: ignore[no-untyped-def]
    m = exported.model
    print(f"wrote {exported.path} ({m.size} bytes, version {m.version}); parity: {exported.parity.summary()}")


def cmd_export(args: argparse.Namespace) -> int:
    from . import train as tr

    trained = tr.load(args.directory)
    exported = tr.export(trained, args.output, version=args.version, progress=_progress(args),
                         attack_states=_attack_states(args))
    _print_exported(exported)
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from .upgrade import upgrade

    model = upgrade(args.model, args.output)
    print(f"wrote {model.path} ({model.size} bytes, version {model.version}): label, distances and deviation "
          f"as in {args.model}, plus normal_deviation (explanations from the nearest normal cluster)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from otel_ebpf_receiver.model import UNKNOWN_STATE, load_model

    model = load_model(args.model, None)
    info = model.describe()
    owner = _feature_owner()
    sizes = model.training.get("cluster_sizes", [])
    for row in info["clusters"]:
        row["training_windows"] = sizes[row["cluster"]] if row["cluster"] < len(sizes) else None
    if args.json:
        info["metadata"] = model.metadata
        print(json.dumps(info, indent=2))
    else:
        t = model.training
        sil = t.get("silhouette")
        print(f"model      {model.path} ({model.size} bytes, sha256 {model.digest[:16]}…)")
        print(f"version    {model.version}")
        print(f"algorithm  {model.algorithm}, distance {model.distance_kind}"
              f"{' (in training standard deviations)' if model.distance_kind == 'euclidean' else ''}")
        print(f"unknown    when score > {model.unknown_above:g}; score = distance / p{model.percentile:g} of "
              f"the cluster's training distances")
        print(f"trained    {t.get('created', '?')}: {t.get('rows', '?')} windows "
              f"({t.get('labelled_rows', '?')} labelled) from {len(t.get('files', []))} file(s); "
              f"purity {t.get('purity', '?')}, silhouette {sil if sil is not None else 'n/a'}")
        print(f"states     {', '.join(model.states)}")
        if model.attack_states:
            print(f"attacks    {', '.join(sorted(model.attack_states))} (mitigation may block for these states when "
                  f"the configuration lists them too)")
        else:
            print("attacks    none declared: this model never drives mitigation (export with --attack-states)")
        print("explains   " + ("a non-normal window by its distance to the nearest normal cluster"
                               if model.explains_from_normal else
                               "every window by its deviation from its own cluster's centre (older file: "
                               "`otel-ebpf-model upgrade` adds the distance to normal)"))
        print(f"\nfeatures ({len(model.feature_names)}, in input order)")
        for i, name in enumerate(model.feature_names):
            probe = owner(name)
            print(f"  {i:2d}  {name:40s} {'probe ' + probe if probe else ''}")
        print("\ncluster  state                 threshold  training windows")
        for row in info["clusters"]:
            n = row["training_windows"]
            print(f"{row['cluster']:7d}  {row['state']:20s}  {row['distance_threshold']:9.4f}  "
                  f"{'' if n is None else n}")
        if t.get("label_counts"):
            print("\nlabels     " + ", ".join(f"{k} {v}" for k, v in t["label_counts"].items()))
        if UNKNOWN_STATE in model.cluster_states:
            print("note       a cluster without labelled windows always reports 'unknown'")
    if args.check_schema:
        try:
            from otel_ebpf_receiver.features import feature_names

            names = feature_names()
        except Exception as exc:
            print(f"otel-ebpf-model: error: cannot read this build's probe registry ({exc})", file=sys.stderr)
            return 1
        load_model(args.model, names)  # raises ModelError naming the missing feature and its probe
        print("schema     every feature is produced by this build's probes", file=sys.stderr)
    return 0


def _feature_owner():  # type: ignore[no-untyped-def]
    try:
        from otel_ebpf_receiver.features import owning_probe

        return lambda name: owning_probe(name)
    except Exception:
        return lambda name: None


def cmd_synthetic(args: argparse.Namespace) -> int:
    from .synthetic import DEMO_FEATURES, DEMO_STATES, make_windows
    from .windows import LabelledWindow, write_windows

    states = args.states.split(",") if args.states else list(DEMO_STATES)
    table = make_windows(DEMO_FEATURES, states, per_state=args.per_state, seed=args.seed)
    rows = (LabelledWindow(ts, lab, dict(zip(table.names, vals)))
            for ts, lab, vals in zip(table.timestamps, table.labels, table.values))
    n = write_windows(args.output, table.names, rows)
    print(f"wrote {n} windows of {len(states)} states to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="otel-ebpf-model", description=__doc__, epilog=EPILOG_MAIN,
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="cluster labelled windows and name the clusters", epilog=EPILOG_TRAIN,
                       formatter_class=fmt)
    p.add_argument("files", nargs="+", metavar="FILES", help="recorded windows (CSV)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="training directory to write")
    p.add_argument("--algorithm", choices=("kmeans", "gmm", "birch"), default="kmeans",
                   help="clustering algorithm (default: kmeans)")
    p.add_argument("--clusters", type=int, metavar="K", help="number of clusters (default: one per label)")
    p.add_argument("--features", metavar="A,B,...", help="train on these feature columns only, in this order")
    p.add_argument("--percentile", type=float, default=99.0,
                   help="training-distance percentile a cluster's threshold is set at (default: 99)")
    p.add_argument("--unknown-above", type=float, default=1.5, metavar="SCORE",
                   help="score (distance / threshold) above which a window is 'unknown' (default: 1.5)")
    p.add_argument("--min-threshold", type=float, default=0.25, metavar="D",
                   help="floor of a cluster's distance threshold, in the model's distance unit (default: 0.25)")
    p.add_argument("--bounds-margin", type=float, metavar="M",
                   help="also write benign bounds per feature (the normal windows' range widened by M times its "
                        "width): a window nearest a normal cluster with a feature beyond its bound is 'unknown' "
                        "(default: no bounds)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--birch-threshold", type=float, default=0.5, help="birch subcluster radius (default: 0.5)")
    p.add_argument("--gmm-covariance", choices=("full", "tied", "diag", "spherical"), default="full",
                   help="gmm covariance type (default: full)")
    p.add_argument("--onnx", metavar="MODEL.onnx", help="also export the model (same as `export DIR -o`)")
    p.add_argument("--version", help="model_version to stamp with --onnx (default: algorithm-time-hash)")
    p.add_argument("--attack-states", metavar="A,B",
                   help="with --onnx: states this model declares as attacks; only those can drive mitigation "
                        "(default: none)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a trained directory as a self-describing ONNX model",
                       epilog=EPILOG_EXPORT, formatter_class=fmt)
    p.add_argument("directory", metavar="DIR", help="directory written by `train`")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.onnx")
    p.add_argument("--version", help="model_version to stamp (default: algorithm-time-hash)")
    p.add_argument("--attack-states", metavar="A,B",
                   help="states this model declares as attacks; only those can drive mitigation (default: none)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("upgrade", help="add the explanation output (normal_deviation) to an older kmeans model",
                       formatter_class=fmt,
                       epilog="example:\n  otel-ebpf-model upgrade old.onnx -o state.onnx\n\nNo retraining: the "
                              "centres the file holds give the new output; refuses unless every other output "
                              "stays bit-identical.\n")
    p.add_argument("model", metavar="OLD.onnx")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.onnx")
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("info", help="validate a model and show its metadata", epilog=EPILOG_INFO,
                       formatter_class=fmt)
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--check-schema", action="store_true",
                   help="also check every feature against this build's probe registry")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("synthetic", help="write synthetic labelled windows (to try the toolchain)",
                       formatter_class=fmt,
                       epilog="example:\n  otel-ebpf-model synthetic -o /tmp/demo.csv --per-state 500\n")
    p.add_argument("-o", "--output", required=True, metavar="OUT.csv")
    p.add_argument("--per-state", type=int, default=300)
    p.add_argument("--states", metavar="A,B,...", help="state labels (default: normal and three incidents)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synthetic)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from otel_ebpf_receiver.errors import AgentError
    from otel_ebpf_receiver.model import ModelError

    from .train import TrainError
    from .windows import WindowsFormatError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelError, TrainError, WindowsFormatError, OSError, AgentError) as exc:
        print(f"otel-ebpf-model: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in TRAINING_LIBRARIES:
            raise
        print(f"otel-ebpf-model: error: {missing_training_library(exc.name)}", file=sys.stderr)
        return 1


# The [train] extra (pyproject.toml): an agent-only install (`make run`) does not have them.
TRAINING_LIBRARIES = ("sklearn", "skl2onnx", "matplotlib", "tqdm")


def missing_training_library(name: str) -> str:
    return (f"the training library {name.split('.')[0]} is not installed (the agent's install leaves training out); "
            "install it with: make setup-train (or pip install '.[train]')")


if __name__ == "__main__":
    sys.exit(main())
