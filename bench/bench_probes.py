"""What each probe costs the *other* processes on the host, versus bcc's syscount, same run, interleaved.

Three pinned C loops are timed under each condition: getppid() (the bare syscall path), a 1-byte read() from
/dev/zero (a syscall the per-syscall tracepoint probes also watch) and a pipe ping-pong between two processes on
one CPU (a wakeup and a context switch per hand-over: where sched runs). Conditions: nothing attached, an empty
raw sys_exit program (the floor every syscall counter pays), bcc's syscount-bpfcc, the agent with each probe
alone, the agent with every probe, and the agent with bpf_stats on (what measuring probe CPU time costs). Each
condition starts the real agent CLI, waits until its probes are attached, measures, then stops it (SIGTERM);
conditions alternate order round by round and each figure is the median over rounds of the increase over
"nothing attached" measured in the same round.

Then nginx (1 worker, static file, loopback, private config and port, pinned to the first CPU) under `wrk -t1
-c32 -d10s` (pinned to the last), in rounds of
three conditions, order rotated: without the agent, with empty programs on the hooks the agent runs on a web
server's hot path (sys_exit, sched_switch, sched_wakeup, sched_wakeup_new: the floor any agent hooking there pays),
and with the agent (every probe): the medians of the rounds' requests/s ratios to "without". `--nginx-only` skips
the loops.

And what the agent holds in memory after start: RSS, /proc/PID/smaps_rollup, the top mappings by file.

    .venv/bin/python bench/bench_probes.py                       # 3 rounds, 3 nginx pairs (~10 min)
    .venv/bin/python bench/bench_probes.py --rounds 5 --pairs 5
    .venv/bin/python bench/bench_probes.py --probes syscalls,sched --pairs 0

Refuses to run while other BPF programs sit on the syscall path, and re-measures a condition during which one
appeared (other agents and tracers on a shared machine would make "nothing attached" a lie). On a machine where
another agent runs for an hour, `--despite-foreign-programs` measures anyway and says so above every figure:
every condition then pays for the foreign programs too, the kernel already takes the slow syscall path in the
baseline, and the added costs come out understated (only programs that appear *during* the run are re-measured).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_syscalls import foreign_syscall_programs  # noqa: E402  (the same refusal as bench_syscalls.py)
from nginx_load import process_cpu_seconds, running_nginx, wrk_requests_per_second  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "bench"
AGENT = [str(REPO / ".venv" / "bin" / "otel-ebpf-receiver"), "run", "--exporter", "none", "--live", "off"]
# name, C file, iterations per measurement, what one unit is
WORKLOADS = (("getppid", "getppid_loop.c", 1_000_000, "call"),
             ("read 1 B", "read_loop.c", 1_000_000, "call"),
             ("ctx switch", "pipe_pingpong.c", 100_000, "switch"))
NOTHING, SYSCOUNT = "nothing attached", "bcc syscount-bpfcc"
SYSCALL_PROBES = ("syscalls", "file_open", "http")  # the syscall hub's parts (probes/syscall_hub.py)
# The floor: any program on sys_exit sends every syscall down the kernel's slow exit path.
EMPTY_SYS_EXIT = """
import signal, sys, time
from bcc import BPF
b = BPF(text="RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }")
signal.signal(signal.SIGTERM, lambda *a: (b.cleanup(), sys.exit(0)))
print("attached", flush=True)
while True:
    time.sleep(3600)
"""
# The floor under nginx: empty programs on every hook the default agent runs on a web server's hot path (each
# system call's exit, each wakeup and context switch). What the kernel charges for calling programs there at all.
EMPTY_HOT_HOOKS = """
import signal, sys, time
from bcc import BPF
b = BPF(text=\"\"\"
RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }
RAW_TRACEPOINT_PROBE(sched_switch) { return 0; }
RAW_TRACEPOINT_PROBE(sched_wakeup) { return 0; }
RAW_TRACEPOINT_PROBE(sched_wakeup_new) { return 0; }
\"\"\")
signal.signal(signal.SIGTERM, lambda *a: (b.cleanup(), sys.exit(0)))
print("attached", flush=True)
while True:
    time.sleep(3600)
"""
NGINX_CONDITIONS = ("without", "floor", "with")
# Names of programs on the paths the loops exercise: syscalls (bench_syscalls.py's rule) and context switches.
PATH_PROGRAM = re.compile(r"sys_exit|sys_enter|raw_syscalls|syscalls__|sched_switch|sched_wakeup")


def build(source: str) -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    src = Path(__file__).with_name(source)
    binary = BUILD / src.stem
    if not binary.exists() or binary.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(src)], check=True)
    return binary


def time_workload(binary: Path, count: int, cpu: int) -> float:
    # Best of three back-to-back runs: the least disturbed measurement of the same condition.
    return min(float(subprocess.run([str(binary), str(count), str(cpu)], check=True, capture_output=True,
                                    text=True, timeout=120).stdout) for _ in range(3))


def programs_on_path() -> dict[int, str]:
    out = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True, timeout=10).stdout
    return {int(line.split(":", 1)[0]): line.strip() for line in out.splitlines()
            if line[:1].isdigit() and PATH_PROGRAM.search(line)}


def owned_programs(pid: int) -> set[int]:
    """Ids of the programs a process holds fds of (its own, as opposed to another tracer's)."""
    ids: set[int] = set()
    for fdinfo in Path(f"/proc/{pid}/fdinfo").glob("*"):
        try:
            match = re.search(r"^prog_id:\s*(\d+)", fdinfo.read_text(), re.M)
        except OSError:
            continue
        if match:
            ids.add(int(match[1]))
    return ids


def stats_left_on() -> str:
    """BPF statistics on (sysctl or someone's fd) add a clock read to every program: the conditions would lie."""
    try:
        if Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "1":
            return "sysctl kernel.bpf_stats_enabled=1"
    except OSError:
        pass
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == "anon_inode:bpf-stats":
                return f"pid {fd.parent.parent.name} holds a BPF_ENABLE_STATS fd"
        except OSError:
            continue
    return ""


class Condition:
    """A process that attaches something (or nothing), started and ready on enter, stopped with SIGTERM on exit."""

    def __init__(self, name: str, argv: list[str] | None, ready: str = "", env: dict[str, str] | None = None):
        self.name, self.argv, self.ready, self.env = name, argv, ready, env
        self.proc: subprocess.Popen | None = None

    @property
    def is_agent(self) -> bool:
        return bool(self.argv) and self.argv[0] == AGENT[0]

    def __enter__(self) -> "Condition":
        if self.argv:
            self.log = tempfile.TemporaryFile(mode="w+")
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                         env={**os.environ, **(self.env or {})})
            deadline = time.monotonic() + 120
            while True:
                self.log.seek(0)
                text = self.log.read()
                if self.ready in text:
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"{self.name}: not ready: {text[-400:]}")
                time.sleep(0.1)
            time.sleep(0.5)  # the first window's reads are over before we time anything
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM (a background job ignores SIGINT), up to 30 s to detach and exit, then SIGKILL."""
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def conditions(probe_names: list[str]) -> list[Condition]:
    stats_on = {"OTEL_EBPF_RECEIVER_BPF_STATS": "on"}
    return [Condition(NOTHING, None),
            Condition("empty raw sys_exit program (the floor)", [sys.executable, "-c", EMPTY_SYS_EXIT], "attached"),
            Condition(SYSCOUNT, ["syscount-bpfcc", "-i", "3600"], "Tracing syscalls"),
            *[Condition(f"agent: {name} only", AGENT + ["--probes", name], "attached ") for name in probe_names],
            # The syscall-based probes together: one shared raw sys_exit program (the syscall hub) where it runs.
            *([Condition(f"agent: {','.join(hub)} (syscall hub)", AGENT + ["--probes", ",".join(hub)], "attached ")]
              if len(hub := [n for n in probe_names if n in SYSCALL_PROBES]) > 1 else []),
            Condition("agent: every probe (default)", AGENT, "attached "),
            Condition("agent: syscalls only, bpf_stats on", AGENT + ["--probes", "syscalls"], "attached ", stats_on),
            Condition("agent: every probe, bpf_stats on", AGENT, "attached ", stats_on)]


def measure(cond: Condition, binaries: dict[str, Path], cpu: int, rss: dict[str, list[float]],
            known: set[int]) -> dict[str, float]:
    """One sample per workload; re-measured (up to 3 times) when a foreign program (not in ``known``, the ones
    accepted at start) joined the path meanwhile."""
    for attempt in range(3):
        with cond:
            if cond.is_agent:
                rss[cond.name].append(vm_rss_mb(cond.proc.pid))
            sample = {name: time_workload(binaries[name], count, cpu) for name, _, count, _ in WORKLOADS}
            ours = owned_programs(cond.proc.pid) if cond.proc else set()
            foreign = {pid: line for pid, line in programs_on_path().items() if pid not in ours | known}
        if not foreign:
            return sample
        print(f"  {cond.name}: another program joined the path ({next(iter(foreign.values()))}); waiting to "
              f"re-measure", file=sys.stderr)
        wait_until_clear(300, known)
    raise SystemExit("gave up: other BPF programs keep attaching to the syscall path; run when the host is quiet")


def wait_until_clear(seconds: float, known: set[int]) -> None:
    deadline = time.monotonic() + seconds
    while set(programs_on_path()) - known and time.monotonic() < deadline:
        time.sleep(5)


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory_report(pid: int) -> str:
    """smaps_rollup, then /proc/PID/smaps grouped by what is mapped (file, [heap], anonymous), top 10 by RSS."""
    rollup = [line for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
              if line.split(":")[0] in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Dirty",
                                        "Anonymous", "Swap")]
    by_file: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    current = "[anonymous]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            current = fields[5] if len(fields) > 5 else "[anonymous]"
        elif fields and fields[0] in ("Rss:", "Pss:", "Anonymous:"):
            by_file[current][("Rss:", "Pss:", "Anonymous:").index(fields[0])] += int(fields[1])
    top = sorted(by_file.items(), key=lambda item: -item[1][0])[:10]
    site = str(next((REPO / ".venv" / "lib").glob("python3*/site-packages"), "/nonexistent")) + "/"
    lines = ["smaps_rollup: " + ", ".join(" ".join(line.split()) for line in rollup), "",
             "| mapping | RSS MB | PSS MB | anonymous MB |", "|---|---:|---:|---:|"]
    lines += [f"| {path.replace(site, 'site-packages/')} | {rss / 1024:.1f} | {pss / 1024:.1f} | {anon / 1024:.1f} |"
              for path, (rss, pss, anon) in top]
    return "\n".join(lines)


# -- nginx under wrk ----------------------------------------------------------------------------------------------


def nginx_pairs(pairs: int, seconds: int) -> list[dict[str, float]]:
    """Requests/s per round: without the agent, with the empty programs on its hot hooks (the floor), with the
    agent (every probe); the order rotates round by round."""
    results = []
    argv = {"without": (None, ""), "floor": ([sys.executable, "-c", EMPTY_HOT_HOOKS], "attached"),
            "with": (AGENT, "attached ")}
    with running_nginx(cpu=0) as (nginx, port):
        wrk_requests_per_second(port, 2)  # warm-up
        for pair in range(pairs):
            sample: dict[str, float] = {}
            order = NGINX_CONDITIONS[pair % 3:] + NGINX_CONDITIONS[:pair % 3]
            for name in (order if pair % 2 == 0 else tuple(reversed(order))):
                with Condition(f"nginx: {name}", *argv[name]):
                    cpu_before = process_cpu_seconds(nginx.pid)
                    sample[name] = wrk_requests_per_second(port, seconds)
                    cpu = process_cpu_seconds(nginx.pid) - cpu_before
                    sample[f"{name} cpu"] = cpu * 1e6 / (sample[name] * seconds)  # µs per request
            results.append(sample)
            print(f"nginx round {pair + 1}/{pairs}: " + " / ".join(f"{k} {v:.0f}" if "cpu" not in k
                                                                   else f"{k} {v:.2f} µs"
                                                                   for k, v in sample.items()) + " req/s",
                  file=sys.stderr)
    return results


def main() -> int:
    from otel_ebpf_receiver.probes import REGISTRY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3)")
    parser.add_argument("--pairs", type=int, default=3,
                        help="nginx rounds of without / floor / with the agent (0: skip nginx)")
    parser.add_argument("--nginx-only", action="store_true", help="skip the loops and the memory report")
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1)
    parser.add_argument("--probes", help="comma-separated probes to measure alone (default: every available one "
                                         "but xdp, which needs an interface and is off the syscall path)")
    parser.add_argument("--despite-foreign-programs", action="store_true",
                        help="measure although other programs sit on the path (labelled; figures understated)")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (a median of fewer is not one)")
    if os.geteuid() != 0:
        print("bench_probes: must run as root (loads BPF programs)", file=sys.stderr)
        return 1
    foreign = foreign_syscall_programs()
    known = set(programs_on_path()) if args.despite_foreign_programs else set()
    if foreign and not args.despite_foreign_programs:
        print(f"refusing to measure: {len(foreign)} BPF programs are already attached to syscall tracepoints "
              f"(stop other agents/tracers first), e.g. {foreign[0].strip()}", file=sys.stderr)
        return 1
    left_on = stats_left_on()
    if left_on:
        print(f"refusing to measure: BPF statistics are on ({left_on}): every program would run slower",
              file=sys.stderr)
        return 1
    names = args.probes.split(",") if args.probes else [n for n, cls in REGISTRY.items()
                                                        if n != "xdp" and cls.unavailable_reason() is None]
    binaries = {name: build(source) for name, source, _, _ in WORKLOADS}
    conds = [] if args.nginx_only else conditions(names)
    load_before = os.getloadavg()
    samples: dict[str, list[dict[str, float]]] = {c.name: [] for c in conds}
    rss: dict[str, list[float]] = defaultdict(list)
    memory = ""
    for rnd in range(0 if args.nginx_only else args.rounds):
        for cond in conds if rnd % 2 == 0 else list(reversed(conds)):
            samples[cond.name].append(measure(cond, binaries, args.cpu, rss, known))
        print(f"round {rnd + 1}/{args.rounds} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    if not args.nginx_only:
        with Condition("agent: every probe", AGENT, "attached ") as agent:
            time.sleep(3)  # a few windows in: what it holds while running, not while starting
            memory = memory_report(agent.proc.pid)
    pairs = nginx_pairs(args.pairs, args.wrk_seconds) if args.pairs else []
    load_after = os.getloadavg()
    print_report(args, samples, rss, memory, pairs, load_before, load_after, known)
    return 0


def added(samples: dict[str, list[dict[str, float]]], name: str, workload: str) -> float:
    """Median over rounds of (condition - nothing attached), each difference within one round."""
    return statistics.median(s[workload] - base[workload] for s, base in zip(samples[name], samples[NOTHING]))


def print_report(args, samples, rss, memory, pairs, load_before, load_after, known) -> None:
    loaded = max(load_before[0], load_after[0]) > 1.0
    print(f"\nProbe cost, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, kernel {platform.release()}, "
          f"{os.cpu_count()} CPUs; loops pinned to CPU {args.cpu}, best of 3 runs, median of {args.rounds} "
          f"interleaved rounds; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
          + (" — MEASURED UNDER LOAD (shared machine): absolute ns are inflated, ratios are the figure"
             if loaded else ""))
    if known:
        print(f"WITH {len(known)} FOREIGN BPF PROGRAMS ON THE SYSCALL/SCHED PATH THROUGHOUT (another agent; "
              f"--despite-foreign-programs): every condition, the baseline included, pays for them; the added "
              f"costs below are understated")
    if samples:
        print("\n| condition | getppid ns | vs syscount | read 1 B ns | vs syscount | ctx switch ns | vs syscount "
              "| agent RSS MB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        base = {w: statistics.median(s[w] for s in samples[NOTHING]) for w, _, _, _ in WORKLOADS}
        print(f"| {NOTHING} (absolute) | {base['getppid']:.0f} | - | {base['read 1 B']:.0f} | - | "
              f"{base['ctx switch']:.0f} | - | - |")
        reference = {w: added(samples, SYSCOUNT, w) for w, _, _, _ in WORKLOADS}
        for name in samples:
            if name == NOTHING:
                continue
            cells = []
            for workload, _, _, _ in WORKLOADS:
                extra = added(samples, name, workload)
                ratio = f"{extra / reference[workload]:.2f}x" if reference[workload] > 0 else "-"
                cells += [f"{extra:+.0f}", ratio]
            memory_mb = f"{statistics.median(rss[name]):.0f}" if rss.get(name) else "-"
            print(f"| {name} | {' | '.join(cells)} | {memory_mb} |")
        for plain, stats in (("agent: syscalls only", "agent: syscalls only, bpf_stats on"),
                             ("agent: every probe (default)", "agent: every probe, bpf_stats on")):
            if plain in samples:  # --probes without syscalls measures no plain "syscalls only"
                diffs = [on["getppid"] - off["getppid"] for on, off in zip(samples[stats], samples[plain])]
                print(f"\n{stats}: {statistics.median(diffs):+.1f} ns per getppid over the same agent with it off "
                      f"(median of the rounds' differences: {', '.join(f'{d:+.1f}' for d in diffs)})")
        print("\n(+ns: added per call / per context switch over nothing attached in the same round; "
              "vs syscount: that increase divided by syscount's)")
    if pairs:
        print(f"\nnginx (1 worker, 1 KiB static file, loopback, on the first CPU) under wrk -t1 -c32 "
              f"-d{args.wrk_seconds}s (on the last CPU), "
              f"{len(pairs)} rounds, conditions rotated; the floor is empty programs on the agent's hot hooks "
              f"(sys_exit, sched_switch, sched_wakeup, sched_wakeup_new):\n")
        print("| round | without req/s | floor req/s | with agent (every probe) req/s | floor ratio | agent ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        for i, s in enumerate(pairs, 1):
            print(f"| {i} | {s['without']:.0f} | {s['floor']:.0f} | {s['with']:.0f} | "
                  f"{s['floor'] / s['without']:.3f} | {s['with'] / s['without']:.3f} |")
        floor = statistics.median(s["floor"] / s["without"] for s in pairs)
        agent = statistics.median(s["with"] / s["without"] for s in pairs)
        print(f"| median | | | | {floor:.3f} ({(floor - 1) * 100:+.1f} %) | {agent:.3f} ({(agent - 1) * 100:+.1f} %) |")
        print("\nnginx worker CPU time per request (user + system, from /proc):\n")
        print("| round | without µs | floor µs | with agent µs | floor added | agent added |")
        print("|---|---:|---:|---:|---:|---:|")
        for i, s in enumerate(pairs, 1):
            print(f"| {i} | {s['without cpu']:.2f} | {s['floor cpu']:.2f} | {s['with cpu']:.2f} | "
                  f"{(s['floor cpu'] / s['without cpu'] - 1) * 100:+.1f} % | "
                  f"{(s['with cpu'] / s['without cpu'] - 1) * 100:+.1f} % |")
        floor_cpu = statistics.median(s["floor cpu"] / s["without cpu"] for s in pairs)
        agent_cpu = statistics.median(s["with cpu"] / s["without cpu"] for s in pairs)
        print(f"| median | | | | {(floor_cpu - 1) * 100:+.1f} % | {(agent_cpu - 1) * 100:+.1f} % |")
    if memory:
        print(f"\nAgent (every probe) memory, a few seconds after start:\n\n{memory}")


if __name__ == "__main__":
    sys.exit(main())
