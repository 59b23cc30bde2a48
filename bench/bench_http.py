#!/usr/bin/env python3
"""What the http probe's kernel part costs per nginx request, for several program trees, in one run.

    git archive <commit> bpf otel_ebpf_receiver | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    sudo .venv/bin/python bench/bench_http.py --tree before=/tmp/before --tree after=. --rounds 7

nginx (1 worker, 1 KiB static file, loopback, private config and port, as in bench_probes.py) under
`wrk -t1 -c32 -d<seconds>s`. Each condition is a small process that imports one tree's http probe and loads its
syscall hub part (probes/syscall_hub.py's part_text) behind a raw sys_exit program of its own: it returns at once
for every process but the nginx worker, reads the registers as the hub does, then calls `http_on_syscall_exit`
between two bpf_ktime_get_ns() and adds up the time in a per-CPU array. "clock only" is the same program without
the call: the floor (the two clock reads). So the figure is the part's own time per request, over nginx's system
calls only, whatever the rest of a shared machine does (it still shares caches and CPUs: say so when it was busy).
Conditions run in a shuffled order each round; each figure is the median over rounds, with the range.

--agent-pairs N then measures what bench_probes.py's nginx part measures, for each tree in the same run: nginx's
requests/s without an agent and with each tree's whole default agent (`python -m otel_ebpf_receiver run
--exporter none --live off`, every probe, that tree first on PYTHONPATH), in pairs whose order alternates; the
median of each tree's ratios to "without" in the same pair.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probes import stop  # noqa: E402
from nginx_load import running_nginx  # noqa: E402  (the same nginx as the agent-wide bench)

# The condition's program around the tree's part; the loader below answers each line on stdin with the time spent
# in the part and the number of calls so far (nginx worker only, summed over CPUs).
WRAPPER = """
#include <linux/stddef.h>
BPF_PERCPU_ARRAY(bench_time, u64, 2);
RAW_TRACEPOINT_PROBE(sys_exit) {
    if ((bpf_get_current_pid_tgid() >> 32) != WORKER)
        return 0;
    struct syscall_exit call = {};
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    if (bpf_probe_read_kernel(&call, offsetof(struct syscall_exit, ret), &regs->dx) != 0 || call.nr < 0)
        return 0;
    call.ret = (s64)ctx->args[1];
    u64 start = bpf_ktime_get_ns();
#ifdef WITH_HTTP
    http_on_syscall_exit(&call);
#endif
    u64 took = bpf_ktime_get_ns() - start;
    u32 index = 0;
    u64 *total = bench_time.lookup(&index);
    if (total)
        *total += took;
    index = 1;
    u64 *calls = bench_time.lookup(&index);
    if (calls)
        *calls += 1;
    return 0;
}
"""
LOADER = """
import sys
from bcc import BPF
from otel_ebpf_receiver.probes.http import HttpProbe
from otel_ebpf_receiver.probes import syscall_hub
worker, with_http, wrapper = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
probe = HttpProbe({})
cflags = syscall_hub.hub_cflags([probe]) + [f"-DWORKER={worker}"] + (["-DWITH_HTTP"] if with_http else [])
b = BPF(text=syscall_hub.part_text(probe) + wrapper, cflags=cflags)
table = b["bench_time"]
print("attached", flush=True)
for _ in sys.stdin:
    print(sum(table.getvalue(table.Key(0))), sum(table.getvalue(table.Key(1))), flush=True)
b.cleanup()
"""


def wrk(port: int, seconds: int) -> tuple[float, int]:
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds}s", f"http://127.0.0.1:{port}/index.html"],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    rate, total = re.search(r"Requests/sec:\s*([\d.]+)", out), re.search(r"(\d+) requests in", out)
    if not rate or not total or "Non-2xx" in out:
        raise RuntimeError(f"wrk: unexpected output: {out[-300:]}")
    return float(rate[1]), int(total[1])


def measure(tree: str, with_http: bool, worker: int, port: int, seconds: int) -> tuple[float, float, float]:
    """(ns in the part per request, nginx syscalls per request, requests/s) for one condition."""
    proc = subprocess.Popen([sys.executable, "-c", LOADER, str(worker), "1" if with_http else "0", WRAPPER],
                            cwd=tree, env={**os.environ, "PYTHONPATH": tree}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)

    def totals() -> tuple[int, int]:
        proc.stdin.write("read\n")
        proc.stdin.flush()
        ns, calls = proc.stdout.readline().split()
        return int(ns), int(calls)

    try:
        if proc.stdout.readline().strip() != "attached":
            raise RuntimeError(f"{tree}: the program did not load")
        ns_before, calls_before = totals()
        rate, requests = wrk(port, seconds)
        ns_after, calls_after = totals()
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return (ns_after - ns_before) / requests, (calls_after - calls_before) / requests, rate


def agent_run(tree: str, port: int, seconds: int) -> float:
    """requests/s with ``tree``'s default agent running: started in ``tree`` (so that `-m` imports that tree's
    package), waited for until attached, stopped with SIGTERM."""
    argv = [sys.executable, "-m", "otel_ebpf_receiver", "run", "--exporter", "none", "--live", "off"]
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(argv, cwd=tree, env={**os.environ, "PYTHONPATH": tree}, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                log.seek(0)
                said = log.read()
                if "attached " in said:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent of {tree}: not ready: {said[-400:]}")
                time.sleep(0.1)
            time.sleep(0.5)  # the first window's reads are over
            return wrk(port, seconds)[0]
        finally:
            stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="a tree holding otel_ebpf_receiver/ and bpf/ (default: this checkout, as 'this')")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5, help="wrk run per condition")
    parser.add_argument("--agent-pairs", type=int, default=0,
                        help="then nginx requests/s without / with each tree's whole default agent, N pairs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_http: must run as root (loads BPF programs)", file=sys.stderr)
        return 1
    trees = [tuple(t.split("=", 1)) for t in args.tree] or [("this", str(REPO))]
    if any(len(t) != 2 or not (Path(t[1]) / "otel_ebpf_receiver").is_dir() for t in trees):
        parser.error("--tree NAME=PATH: PATH must hold otel_ebpf_receiver/")
    trees = [(name, str(Path(path).resolve())) for name, path in trees]
    conditions = [("clock only (floor)", trees[0][1], False)] + [(name, path, True) for name, path in trees]
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in conditions}
    pairs: list[dict[str, float]] = []
    load_before = os.getloadavg()[0]
    with running_nginx(cpu=None) as (nginx, port):
        workers = subprocess.run(["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True).stdout.split()
        if len(workers) != 1:
            raise RuntimeError(f"expected one nginx worker, found {workers}")
        worker = int(workers[0])
        wrk(port, 2)  # warm-up
        for rnd in range(args.rounds):
            for name, path, with_http in random.sample(conditions, len(conditions)):
                results[name].append(measure(path, with_http, worker, port, args.seconds))
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{name} {results[name][-1][0]:.0f} ns/request" for name, _, _ in conditions), file=sys.stderr)
        for pair in range(args.agent_pairs):
            order = [("without", None)] + trees
            sample = {}
            for name, path in order if pair % 2 == 0 else reversed(order):
                sample[name] = wrk(port, args.seconds)[0] if path is None else agent_run(path, port, args.seconds)
            pairs.append(sample)
            print(f"agent pair {pair + 1}/{args.agent_pairs}: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                                            sample.items()), file=sys.stderr)
    load_after = os.getloadavg()[0]
    print(f"\nhttp part per nginx request (wrk -t1 -c32 -d{args.seconds}s, 1 worker, 1 KiB file), median of "
          f"{args.rounds} shuffled rounds (range); load average {load_before:.1f} before, {load_after:.1f} after\n")
    print("| condition | ns per request | over the floor | nginx syscalls per request | requests/s |")
    print("|---|---:|---:|---:|---:|")
    floor = statistics.median(r[0] for r in results[conditions[0][0]])
    for name, _, _ in conditions:
        per_request = [r[0] for r in results[name]]
        median = statistics.median(per_request)
        print(f"| {name} | {median:.0f} ({min(per_request):.0f}–{max(per_request):.0f}) | "
              f"{median - floor:+.0f} | {statistics.median(r[1] for r in results[name]):.2f} | "
              f"{statistics.median(r[2] for r in results[name]):.0f} |")
    if pairs:
        print(f"\nnginx requests/s with each tree's whole default agent over without one, {len(pairs)} alternated "
              f"pairs (wrk -t1 -c32 -d{args.seconds}s):\n")
        print("| tree | ratios | median |")
        print("|---|---|---:|")
        for name, _ in trees:
            ratios = [p[name] / p["without"] for p in pairs]
            print(f"| {name} | {', '.join(f'{r:.3f}' for r in ratios)} | {statistics.median(ratios):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
