#!/usr/bin/env python3
"""Added ns per context switch of the sched probe, for several program trees or settings, in one run.

    git archive <commit> bpf otel_ebpf_receiver | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    sudo .venv/bin/python bench/bench_sched.py --tree before=/tmp/before --rounds 7
    sudo .venv/bin/python bench/bench_sched.py --variant exact=latency_sample_shift=0 --variant no-top=top_threads=0
    sudo .venv/bin/python bench/bench_sched.py --sampling-error 60     # what sampling the latency costs the model

A pipe ping-pong between two processes pinned to one CPU (bench/pipe_pingpong.c): every hand-over is a wakeup and a
context switch, where sched_wakeup and sched_switch run. Conditions: nothing attached, and the sched probe of each
tree (default: this checkout) with each settings variant, loaded by a small process that imports that tree's
SchedProbe, attaches it and reads its maps once a second (as the agent does; on another CPU than the loop). Each
round runs every condition in a shuffled order; each figure is the median over rounds of (condition - nothing
attached in the same round), with the range. bench/bench_probes.py has the same loop against syscount; this one
isolates sched so that two versions of it can be told apart on a busy machine.

--sampling-error SECONDS attaches this checkout's probe twice, timing every wakeup and timing 1 in 2^k (the
default), reads both every second on whatever the host is doing, and compares the windows: switch counts, the
model's feature (log1p of the p99 run-queue latency in µs), the histogram's count and sum, the top threads.

Foreign programs on sched_switch/sched_wakeup (another agent) or BPF statistics left on make every condition
slower alike; the report names them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_probes import build, programs_on_path, stats_left_on, stop, time_workload  # noqa: E402

SWITCHES = 100_000
LOADER = """
import json, signal, sys, time
sys.path.insert(0, sys.argv[1])
from otel_ebpf_receiver.kernel import bpfsys
from otel_ebpf_receiver.probes.sched import SchedProbe
stats_fd = bpfsys.enable_stats() if sys.argv[3] == "own-cost" else None
probe = SchedProbe(json.loads(sys.argv[2]))
probe.load()
def stop(*_):
    for name, fd in probe.program_fds().items():  # each program's own run time and run count
        info = bpfsys.prog_info(fd)
        print("cost", name, info.run_time_ns or 0, info.run_cnt or 0, flush=True)
    probe.close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("attached", getattr(probe, "mode", ""), flush=True)
while True:
    time.sleep(1)
    probe.read(1.0)
"""


class Loaded:
    """The sched probe of one tree with one settings variant, attached while inside ``with``."""

    def __init__(self, name: str, tree: Path, settings: dict, cpu: int, own_cost: bool) -> None:
        self.name, self.tree, self.settings, self.cpu, self.own_cost = name, tree, settings, cpu, own_cost
        self.proc: subprocess.Popen | None = None
        self.mode = ""
        self.costs: dict[str, list[float]] = {}  # program -> ns per run, one per round (own-cost mode)

    def __enter__(self) -> "Loaded":
        self.log = tempfile.TemporaryFile(mode="w+")
        # The loader runs off the loop's CPU, like an agent that is not pinned would mostly be.
        others = sorted(set(os.sched_getaffinity(0)) - {self.cpu}) or [self.cpu]
        self.proc = subprocess.Popen(["taskset", "-c", ",".join(map(str, others)), sys.executable, "-c", LOADER,
                                      str(self.tree), json.dumps(self.settings),
                                      "own-cost" if self.own_cost else "-"],
                                     cwd=self.tree, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while True:
            self.log.seek(0)
            text = self.log.read()
            if "attached" in text:
                self.mode = text.split("attached", 1)[1].split("\n", 1)[0].strip()
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise SystemExit(f"{self.name}: did not attach: {text.strip().splitlines()[-1:]}")
            time.sleep(0.1)
        time.sleep(0.3)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            stop(self.proc)
            self.log.seek(0)
            for line in self.log.read().splitlines():
                if line.startswith("cost "):
                    _, program, run_time, runs = line.split()
                    if int(runs):
                        self.costs.setdefault(program, []).append(int(run_time) / int(runs))


class Nothing:
    name, mode = "nothing attached", ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def parse_settings(text: str) -> dict:
    settings = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        settings[key.strip()] = int(value)
    return settings


def sampling_error(seconds: int) -> int:
    """Exact and sampled probe side by side, one window a second: how far the sampled windows are off."""
    import numpy as np

    from otel_ebpf_receiver.probes.sched import SchedProbe

    exact, sampled = SchedProbe({"latency_sample_shift": 0}), SchedProbe()
    loaded = []
    try:
        for probe in (exact, sampled):
            probe.load()
            loaded.append(probe)
        for probe in loaded:
            probe.read(1.0)
        rows = []
        last = time.monotonic()
        for _ in range(seconds):
            time.sleep(1.0)
            now = time.monotonic()
            window = [(probe.read(now - last), probe.last_p99_us) for probe in loaded]
            last = now
            (e, e_p99), (s, s_p99) = window
            count = [sum(sum(b.values()) for n, b, _, _ in r.histograms) for r in (e, s)]
            total = [sum(sm for _, _, sm, _ in r.histograms) for r in (e, s)]
            switches = [sum(v for _, v, _ in r.counters) for r in (e, s)]
            top = [{item.label for item in r.top} for r in (e, s)]
            rows.append((switches[0], abs(switches[1] - switches[0]) / max(switches[0], 1),
                         abs(np.log1p(s_p99) - np.log1p(e_p99)), abs(count[1] - count[0]) / max(count[0], 1),
                         abs(total[1] - total[0]) / max(total[0], 1e-9), len(top[0] & top[1]) / max(len(top[0]), 1)))
    finally:
        for probe in loaded:
            probe.close()
    arr = np.array(rows)
    print(f"\n### sched latency sampling ({sampled.mode}) against timing every wakeup, same windows: "
          f"{len(rows)} one-second windows, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, kernel "
          f"{os.uname().release}, load average {os.getloadavg()[0]:.1f} (a shared machine's own traffic)\n")
    print(f"context switches per window: median {np.median(arr[:, 0]):.0f}, range {arr[:, 0].min():.0f}–"
          f"{arr[:, 0].max():.0f}\n")
    print("| difference, sampled vs exact | median | 90th percentile | max |")
    print("|---|---:|---:|---:|")
    for col, label in ((1, "switch count (relative; both exact, read a moment apart)"),
                       (2, "feature log1p(p99 µs) (absolute)"), (3, "histogram count (relative)"),
                       (4, "latency sum (relative)")):
        values = arr[:, col]
        print(f"| {label} | {np.median(values):.3f} | {np.percentile(values, 90):.3f} | {values.max():.3f} |")
    print(f"| top threads in both top-N lists (share of the exact list) | {np.median(arr[:, 5]):.2f} | "
          f"{np.percentile(arr[:, 5], 10):.2f} (10th pct) | {arr[:, 5].min():.2f} (min) |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=[],
                        help="NAME=DIR: another checkout's sched probe (repeatable; this checkout is 'this')")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=key=value[,key=value]: this checkout's probe with these probe settings "
                             "(repeatable)")
    parser.add_argument("--rounds", type=int, default=7, help="shuffled rounds, median reported (at least 3)")
    parser.add_argument("--sampling-error", type=int, metavar="SECONDS",
                        help="instead: compare sampled with exact latency windows for SECONDS one-second windows")
    parser.add_argument("--own-cost", action="store_true",
                        help="also turn BPF statistics on in each loader and report each program's own ns per run "
                             "(less noisy than the loop on a busy machine; misses what the hook costs around it)")
    parser.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1, help="CPU the ping-pong runs on")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    if os.geteuid() != 0:
        print("bench_sched: must run as root (loads BPF programs)", file=sys.stderr)
        return 1
    if args.sampling_error:
        return sampling_error(args.sampling_error)
    conditions: list = [Nothing(), Loaded("this", REPO, {}, args.cpu, args.own_cost)]
    for item in args.tree:
        name, _, path = item.partition("=")
        if not (Path(path) / "bpf" / "sched.bpf.c").is_file():
            parser.error(f"--tree {item}: no bpf/sched.bpf.c under {path}")
        conditions.append(Loaded(name, Path(path).resolve(), {}, args.cpu, args.own_cost))
    for item in args.variant:
        name, _, settings = item.partition("=")
        try:
            conditions.append(Loaded(name, REPO, parse_settings(settings), args.cpu, args.own_cost))
        except ValueError:
            parser.error(f"--variant {item}: settings are key=integer[,key=integer]")
    binary = build("pipe_pingpong.c")
    foreign = [line for line in programs_on_path().values() if re.search(r"sched_switch|sched_wakeup", line)]
    stats = stats_left_on()
    if args.own_cost:
        stats = "--own-cost: each loader turns them on while it is attached" + (f"; before the run: {stats}"
                                                                                 if stats else "")
    load_before = os.getloadavg()[0]
    samples: dict[str, list[float]] = {c.name: [] for c in conditions}
    modes: dict[str, str] = {}
    for rnd in range(args.rounds):
        order = list(conditions)
        random.Random(rnd).shuffle(order)
        for cond in order:
            with cond:
                modes[cond.name] = cond.mode
                samples[cond.name].append(time_workload(binary, SWITCHES, args.cpu))
        print(f"round {rnd + 1}/{args.rounds} (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    load_after = os.getloadavg()[0]

    print(f"\n### sched probe, added ns per context switch, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, kernel "
          f"{os.uname().release}, {os.cpu_count()} CPUs; pipe ping-pong ({SWITCHES:,} round trips) pinned to CPU "
          f"{args.cpu}, best of 3 runs, median of {args.rounds} shuffled rounds; load average {load_before:.1f} "
          f"before, {load_after:.1f} after")
    if max(load_before, load_after) > 1.0:
        print("MEASURED ON A BUSY MACHINE (other agents): absolute ns are inflated; compare the rows")
    if foreign:
        print(f"{len(foreign)} foreign programs on sched_switch/sched_wakeup during the run (every condition pays "
              f"for them), e.g. {foreign[0]}")
    if stats:
        print(f"BPF statistics on ({stats}): every program, ours included, pays a clock read per run")
    base = samples["nothing attached"]
    print("\n| condition | settings | attached as | added ns/switch (median) | range over rounds |")
    print("|---|---|---|---:|---:|")
    print(f"| nothing attached (absolute) | | | {statistics.median(base):.0f} | {min(base):.0f}–{max(base):.0f} |")
    for cond in conditions[1:]:
        added = [s - b for s, b in zip(samples[cond.name], base)]
        settings = ", ".join(f"{k}={v}" for k, v in cond.settings.items()) or "defaults"
        print(f"| {cond.name} ({cond.tree}) | {settings} | {modes.get(cond.name) or 'tracepoint'} | "
              f"{statistics.median(added):+.0f} | {min(added):+.0f} to {max(added):+.0f} |")
    if args.own_cost:
        print("\nEach program's own run time (kernel run_time_ns / run_cnt over the whole time it was attached, all "
              "CPUs, whatever ran), median over rounds:\n")
        print("| condition | program | ns per run (median) | range over rounds |")
        print("|---|---|---:|---:|")
        for cond in conditions[1:]:
            for program, values in sorted(cond.costs.items()):
                print(f"| {cond.name} | {program} | {statistics.median(values):.0f} | "
                      f"{min(values):.0f}–{max(values):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
