"""The agent through a long Collector outage: resident memory sampled throughout, counts checked afterwards.

    sudo .venv/bin/python bench/bench_outage.py [--minutes 60] [--workdir /tmp/bench-outage]

The real agent (`otel-ebpf-receiver run`, probes syscalls,file_open,exec, bundled model) exports OTLP/gRPC every
second to the built Collector (build/otelcol/otelcol-ebpf, collector-config/local.yaml). After 60 s of events the
Collector is stopped for --minutes, then restarted on the same ports with the same queue directory. All along: 10
execs a second of a uniquely named binary, and a bad model file rewritten every 3 s (one
`system.state.model.rejected` log record each). Prints the RSS samples per minute and a table: memory at the start
and end of the outage, execs made and execs the Collector has afterwards (must be equal), rejection events emitted,
delivered, and counted as dropped (delivered + dropped must equal emitted). The driver is tests/outage.py, which
tests/test_long_outage.py runs for 5 minutes in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import backends  # noqa: E402
from tests.outage import run_outage  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60, help="how long the Collector is down (default 60)")
    parser.add_argument("--workdir", help="where the Collector and agent keep their files (default: a temp dir)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_outage: run as root (the agent loads eBPF programs)", file=sys.stderr)
        return 1
    backends.build_collector()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-outage-"))
    print(f"workdir {workdir}; Collector down for {args.minutes:g} min", flush=True)
    run = run_outage(workdir, args.minutes * 60, warmup_seconds=60, say=lambda line: print(line, flush=True))
    print("\nRSS (MiB) per minute:")
    last_minute = -1
    for seconds, phase, kib in run.samples:
        if int(seconds // 60) != last_minute:
            last_minute = int(seconds // 60)
            print(f"  {seconds / 60:6.1f} min  {phase:<7} {kib / 1024:7.1f}")
    print()
    print(run.table())
    exact = run.execs_seen_after == run.execs_before + run.execs_during
    accounted = run.rejections_delivered + run.dropped_logs == run.rejections_emitted
    print(f"\nexec count exact after recovery: {exact}; every log record delivered or counted as dropped: {accounted}")
    print(f"agent exit code {run.exit_code}")
    return 0 if exact and accounted and run.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
