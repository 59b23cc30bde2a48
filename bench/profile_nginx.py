"""Where the agent's kernel time goes on a web server: each BPF program's run time per nginx request.

nginx as bench_probes.py loads it (1 worker, 1 KiB static file, loopback, pinned to the first CPU) under
`wrk -t1 -c32` (pinned to the last). With the kernel's BPF statistics on (`kernel.bpf_stats_enabled`, restored
afterwards), each condition's programs are snapshotted (run time, run count: `bpftool prog show`) before and after a
wrk run, and divided by the requests wrk completed. Conditions alternate order round by round; each figure is the
median over rounds. The statistics add two clock reads to every program run, so every row carries that overhead:
the "floor" condition (empty programs on the agent's hot hooks: sys_exit, sched_switch, sched_wakeup,
sched_wakeup_new) measures it, and "over the floor" is what the programs' own work costs per request.

Requests/s are printed but not compared (bench_probes.py does that, alternated against no agent): this bench says
*which program* costs, which the throughput ratio cannot resolve on a noisy machine.

    sudo .venv/bin/python bench/profile_nginx.py                          # 3 rounds: floor, every probe, each hub part
    sudo .venv/bin/python bench/profile_nginx.py --rounds 5 --seconds 8
    sudo .venv/bin/python bench/profile_nginx.py --config file_open.paths_exact=exact.yaml   # one more condition
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probes import AGENT, EMPTY_HOT_HOOKS, Condition, stats_left_on  # noqa: E402
from nginx_load import running_nginx, wrk_requests_per_second  # noqa: E402

FLOOR = "floor (empty programs on the hot hooks)"
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def programs() -> dict[int, tuple[str, int, int]]:
    """id -> (name, run_time_ns, run_cnt) of every loaded program."""
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return {p["id"]: (p.get("name", "?"), p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in json.loads(out)}


def conditions(extra: list[str]) -> dict[str, Condition]:
    conds = {FLOOR: Condition(FLOOR, [sys.executable, "-c", EMPTY_HOT_HOOKS], "attached"),
             "agent: every probe (default)": Condition("every probe", AGENT, "attached ")}
    for probe in ("syscalls", "file_open", "http", "sched"):
        conds[f"agent: {probe} only"] = Condition(probe, AGENT + ["--probes", probe], "attached ")
    for spec in extra:  # NAME=CONFIG.yaml
        name, _, config = spec.partition("=")
        conds[f"agent: {name}"] = Condition(name, AGENT + ["--config", config], "attached ")
    return conds


def profile(cond: Condition, port: int, seconds: int) -> tuple[float, dict[str, tuple[float, float]]]:
    """requests/s, and per program name: (ns per request, runs per request) during one wrk run."""
    with cond:
        before = programs()
        rps = wrk_requests_per_second(port, seconds)
        after = programs()
    requests = rps * seconds
    per_program: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    for pid, (name, run_ns, runs) in after.items():
        if pid in before and runs > before[pid][2]:
            ns, count = per_program[name]
            per_program[name] = (ns + (run_ns - before[pid][1]) / requests, count + (runs - before[pid][2]) / requests)
    return rps, dict(per_program)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6, help="wrk run per condition and round")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=FILE.yaml",
                        help="one more condition: the agent with this configuration file")
    args = parser.parse_args()
    if (left := stats_left_on()):
        print(f"profile_nginx: BPF statistics are already on ({left}); turn them off first", file=sys.stderr)
        return 2
    conds = conditions(args.config)
    samples: dict[str, list[tuple[float, dict[str, tuple[float, float]]]]] = defaultdict(list)
    started = datetime.now(timezone.utc)
    STATS.write_text("1\n")
    try:
        with running_nginx(cpu=0) as (_, port):
            wrk_requests_per_second(port, 2)  # warm-up
            for rnd in range(args.rounds):
                names = list(conds)
                names = names[rnd % len(names):] + names[:rnd % len(names)]
                for name in (names if rnd % 2 == 0 else names[::-1]):
                    samples[name].append(profile(conds[name], port, args.seconds))
                    total = sum(ns for ns, _ in samples[name][-1][1].values())
                    print(f"round {rnd + 1}/{args.rounds}: {name}: {total:.0f} ns/request", file=sys.stderr)
    finally:
        STATS.write_text("0\n")
    report(samples, args, started)
    return 0


def hook(program: str) -> str:
    """The hook a program runs on, by its name (the floor's empty programs and the agent's share these)."""
    for name in ("sched_wakeup_new", "sched_wakeup", "sched_switch"):
        if name in program:
            return name
    return "sys_exit" if "sys_exit" in program or program.startswith("syscall_hub") else program


def over_floor(progs: dict[str, tuple[float, float]], floor: dict[str, float]) -> float:
    """ns per request beyond what the floor's empty programs cost on the same hooks (their run overhead and
    the statistics' clock reads): the programs' own work."""
    hooks = {hook(name) for name in progs}
    return sum(ns for ns, _ in progs.values()) - sum(floor.get(h, 0.0) for h in hooks)


def report(samples, args, started: datetime) -> None:
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"nginx per-request BPF time, {started:%Y-%m-%d %H:%M} UTC, {args.rounds} rounds of {args.seconds} s, "
          f"conditions alternated; load average {load} after\n")
    floor_by_hook: dict[str, float] = defaultdict(float)
    for name in {n for _, progs in samples[FLOOR] for n in progs}:
        floor_by_hook[hook(name)] += statistics.median(p.get(name, (0, 0))[0] for _, p in samples[FLOOR])
    print("| condition | requests/s (median) | BPF ns per request (median) | over the floor on its hooks | rounds |")
    print("|---|---:|---:|---:|---|")
    for name, runs in samples.items():
        total = statistics.median(sum(ns for ns, _ in progs.values()) for _, progs in runs)
        own = statistics.median(over_floor(progs, floor_by_hook) for _, progs in runs)
        rounds = ", ".join(f"{sum(ns for ns, _ in progs.values()):.0f}" for _, progs in runs)
        print(f"| {name} | {statistics.median(r for r, _ in runs):.0f} | {total:.0f} | {own:+.0f} | {rounds} |")
    print("\nPer program, every probe (median over rounds; ns and runs per request):\n")
    print("| program | ns per request | runs per request | ns per run |")
    print("|---|---:|---:|---:|")
    runs = samples["agent: every probe (default)"]
    names = sorted({n for _, progs in runs for n in progs},
                   key=lambda n: -statistics.median(p.get(n, (0, 0))[0] for _, p in runs))
    for name in names:
        ns = statistics.median(p.get(name, (0, 0))[0] for _, p in runs)
        count = statistics.median(p.get(name, (0, 0))[1] for _, p in runs)
        if ns >= 0.5:
            print(f"| {name} | {ns:.0f} | {count:.2f} | {ns / count if count else 0:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
