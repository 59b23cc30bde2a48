"""otel-ebpf-lab: the scenario lab — hosts in network namespaces, the agent's probes watching, scenarios driven one
after another — to record labelled windows for training, and to measure how the running agent detects and
mitigates.

The lab's wing of the project: it drives workloads, records training windows and scores models, so it imports
training (``model_export``) and the runtime (``otel_ebpf_receiver``), and neither of them imports it.

    test bed     testbed.py    namespaces (netns.py), the victim's JSON API, benign HTTP clients
    loads        traffic.py    floods, transfers, the slow ramp, the API failing
                 workloads.py  host workloads: exec and file-open storms, CPU, disk, a database volume
    scenarios    scenarios.py  the scenario table, the training plan, recording a plan
    recording    record.py     the Recorder (the agent without a model, windows under a label)
    scoring      detection.py  the agent under test (AgentRig), one scenario scored
                 report.py     the detection report
    models       rebuild.py    the bundled models (make model)
                 holdout.py    leave-one-family-out evaluation of a recording, with the two-means baseline
                 adapt.py      the bundled model's recipe again, with this host's benign time as normal
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from otel_ebpf_receiver.errors import AgentError, ConfigError

from .scenarios import REPORT_PLAN, SCENARIOS, TRAINING_PLAN, parse_plan
from .testbed import say_default
from .workloads import WORKLOADS

EPILOG = """\
examples:
  sudo otel-ebpf-lab list
  sudo otel-ebpf-lab record -o rec/lab.csv                                   # the training plan, in the lab
  sudo otel-ebpf-lab record -o rec/syn.csv --scenarios normal:60,syn_flood:40
  sudo otel-ebpf-lab record-host --label normal --duration 10m -o rec/normal.csv   # this host, as it is
  sudo otel-ebpf-lab record-host --label exec_storm --duration 60s -o rec/exec.csv --workload exec_storm
  otel-ebpf-model train rec/lab.csv -o build/model --clusters 16 --onnx my.onnx
  sudo otel-ebpf-lab report                                                  # every scenario, ~15 min
  sudo otel-ebpf-lab report --scenarios syn_flood,heavy_transfer --model my.onnx --verbose
  sudo otel-ebpf-lab rebuild                                                 # the bundled models (make model)
  otel-ebpf-lab holdout --windows build/model/windows.csv                    # held-out families, offline
  sudo otel-ebpf-lab adapt --duration 10m -o /var/lib/otel-ebpf-receiver/models/adapted.onnx   # this host's normal

Two ways to record, both one row per window in the agent's feature schema (the CSV otel-ebpf-model train reads):
  record       drives scenarios in the lab (namespace hosts, floods, host incidents), each under its own label,
               and writes a new file;
  record-host  records this host as it is under one --label you choose (optionally while one of the project's
               bounded --workload runs), and appends to the file.
"""

EPILOG_RECORD = """\
examples:
  sudo otel-ebpf-lab record -o rec/lab.csv                                   # the training plan (otel-ebpf-lab list)
  sudo otel-ebpf-lab record -o rec/syn.csv --scenarios normal:60,syn_flood:40

One row per 1 s window (the agent's feature schema), labelled with the scenario's state. Incidents and floods skip
their first windows (ramp-up) and the seconds after them (drain); benign scenarios are written from their first
window to two after they stopped (starting and stopping are normal too). Single-source floods are blocked at XDP
half way through, so "under attack but mitigated" windows are training data too. Host incidents run half on a
quiet lab and half with the API clients (api_degraded: with them throughout — no clients, no incident).
(`otel-ebpf-lab rebuild` trains with feature weighting, which `otel-ebpf-model train` does not offer.)
"""

EPILOG_RECORD_HOST = """\
examples:
  sudo otel-ebpf-lab record-host --label normal --duration 10m -o rec/normal.csv
  sudo otel-ebpf-lab record-host --label io_degraded --duration 2m -o rec/io.csv --probes syscalls,block_io
  sudo otel-ebpf-lab record-host --label exec_storm --duration 60s -o rec/exec.csv --workload exec_storm

Runs the same probes and feature schema as the agent (no export) and appends one row per window. Label what
the host is doing while it records; --workload drives one of the project's own bounded workloads meanwhile.
"""

EPILOG_REPORT = """\
examples:
  sudo otel-ebpf-lab report                                                  # every scenario, ~15 min
  sudo otel-ebpf-lab report --scenarios syn_flood,heavy_transfer --model my.onnx --verbose

The agent as `otel-ebpf-receiver run` assembles it (every probe, the bundled model that fits, mitigation in
enforce mode) runs in this process while each scenario goes pre (benign) -> load -> post (benign); prints
precision, recall and F1 per window, time to the first warning, state flip and XDP drop, and false alarms per
hour (model_export/lab/detection.py, report.py).
"""


def cmd_list(args: argparse.Namespace) -> int:
    width = max(len(name) for name in SCENARIOS)
    print(f"{'scenario':{width}s} {'label':20s} {'kind':7s} {'s':>4s}  what")
    for s in SCENARIOS.values():
        print(f"{s.name:{width}s} {s.label or '(not training)':20s} {s.kind:7s} {s.seconds:4.0f}  {s.summary}")
    plan = ",".join(f"{n}:{s:.0f}" for n, s in TRAINING_PLAN)
    print(f"\ntraining plan (record, make model): {plan}")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from otel_ebpf_receiver.assembly import check_privileges

    from .scenarios import record_plan

    check_privileges()
    plan = parse_plan(args.scenarios, args.seconds) if args.scenarios else list(TRAINING_PLAN)
    rows = record_plan(plan, args.output, mitigated_half=not args.no_mitigated_half)
    print(f"recorded {rows} windows into {args.output}; next: otel-ebpf-model train {args.output} -o DIR")
    return 0


def cmd_record_host(args: argparse.Namespace) -> int:
    from otel_ebpf_receiver.durations import parse_duration

    from ..windows import check_label
    from .record import record

    label = check_label(args.label)
    duration = parse_duration(args.duration, "--duration")
    interval = parse_duration(args.interval, "--interval")
    probes = [p for p in (args.probes or "").split(",") if p]
    workload = WORKLOADS[args.workload](max_seconds=duration + 30) if args.workload else contextlib.nullcontext()
    with workload:
        rows = record(label, duration, args.output, probes, interval, progress=not args.quiet, say=say_default)
    print(f"recorded {rows} windows labelled {label!r} into {args.output}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from otel_ebpf_receiver.assembly import check_privileges

    from .report import as_json, report

    check_privileges()
    plan = parse_plan(args.scenarios, args.seconds) if args.scenarios else [
        (n, args.seconds or SCENARIOS[n].seconds) for n in REPORT_PLAN]
    results, text = report(plan, pre=args.pre, post=args.post, model=args.model, verbose=args.verbose)
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(results), indent=1, default=str) + "\n")
    return 0


def _one_line_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A bad scenario name or a lab that cannot be built is one line from the CLI, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ValueError as exc:
            raise ConfigError(f"lab: {exc}") from None
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            raise AgentError(f"lab: {exc}") from None

    return run


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="otel-ebpf-lab", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="{list,record,record-host,report,rebuild,holdout,adapt}",
                                required=True)

    p = sub.add_parser("list", help="the scenarios, their labels and the training plan")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("record", help="drive lab scenarios and write labelled windows (CSV for otel-ebpf-model train)",
                       epilog=EPILOG_RECORD, formatter_class=fmt)
    p.add_argument("-o", "--output", required=True, metavar="FILE.csv")
    p.add_argument("--scenarios", metavar="NAME[:SECONDS],...", help="default: the training plan (otel-ebpf-lab list)")
    p.add_argument("--seconds", type=float, help="seconds per scenario when NAME has none (default: its own)")
    p.add_argument("--no-mitigated-half", action="store_true",
                   help="do not block single-source floods half way (no 'mitigated flood' windows)")
    p.set_defaults(handler=_one_line_errors(cmd_record))

    p = sub.add_parser("record-host", help="record this host's windows under one label (appends to the CSV)",
                       epilog=EPILOG_RECORD_HOST, formatter_class=fmt)
    p.add_argument("--label", "-l", required=True, help="what the host is doing (becomes a state name)")
    p.add_argument("--duration", "-d", required=True, help="how long, e.g. 90s, 10m")
    p.add_argument("-o", "--output", required=True, metavar="FILE.csv", help="CSV to append windows to")
    p.add_argument("--probes", help="comma-separated probes (default: every probe this kernel can run)")
    p.add_argument("--interval", default="1s", help="window length (default 1s, as the agent)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), help="drive this bounded workload while recording")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_one_line_errors(cmd_record_host))

    p = sub.add_parser("report", help="run scenarios against the agent (enforce mode) and print the detection report",
                       epilog=EPILOG_REPORT, formatter_class=fmt)
    p.add_argument("--scenarios", metavar="NAME[:SECONDS],...", help="default: " + ",".join(REPORT_PLAN))
    p.add_argument("--seconds", type=float, help="length of each load (default: the scenario's own)")
    p.add_argument("--pre", type=float, default=15.0, help="benign seconds before each load (default 15)")
    p.add_argument("--post", type=float, default=15.0, help="benign seconds after each load (default 15)")
    p.add_argument("--model", metavar="MODEL.onnx", help="score this model instead of the bundled one")
    p.add_argument("--markdown", metavar="FILE.md", help="also write the table here")
    p.add_argument("--json", metavar="FILE.json", help="every window and event, for a closer look")
    p.add_argument("-v", "--verbose", action="store_true", help="print every window of every scenario")
    p.set_defaults(handler=_one_line_errors(cmd_report))

    from . import rebuild

    p = sub.add_parser("rebuild", help="record the training plan and rebuild the bundled models (make model)",
                       description=rebuild.__doc__, formatter_class=fmt)
    rebuild.add_arguments(p)
    p.set_defaults(handler=_one_line_errors(rebuild.rebuild))

    from . import holdout

    p = sub.add_parser("holdout", help="leave-one-family-out evaluation of a recording (offline, no root)",
                       description=holdout.__doc__, formatter_class=fmt)
    holdout.add_arguments(p)
    p.set_defaults(handler=_one_line_errors(holdout.run))

    from . import adapt

    p = sub.add_parser("adapt", help="refine the bundled model's normal with this host's benign time (drop-in model)",
                       description=adapt.__doc__, formatter_class=fmt)
    adapt.add_arguments(p)
    p.set_defaults(handler=_one_line_errors(adapt.run))
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """``otel-ebpf-lab`` and ``python -m model_export.lab`` (what the Makefile's model, lab and detection-report
    targets run)."""
    args = build_parser().parse_args(argv)
    # SIGTERM (kill, timeout, a CI runner) unwinds like Ctrl-C: the lab's namespaces, pins, cgroups, servers and
    # link shaping are undone by the context managers that made them, which Python's default SIGTERM skips.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.handler(args)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        from ..cli import TRAINING_LIBRARIES, missing_training_library

        if exc.name is None or exc.name.split(".")[0] not in TRAINING_LIBRARIES:
            raise
        print(f"error: {missing_training_library(exc.name)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
