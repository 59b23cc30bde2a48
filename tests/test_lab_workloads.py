"""The lab's telemetry_stack workload (model_export.lab.workloads): the benign "normal" a model must have seen on
any host that runs this product — the agent exporting every second to the project's Collector, Prometheus scraping
the Collector. It is training data (`make model`), so it has to be what it says: the agent's own metrics arrive in
the Collector and in Prometheus, and nothing of it is left behind (processes, BPF programs) when it ends."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from model_export.lab import workloads

from .helpers import wait_for

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]


def bpf_programs() -> dict[int, list[str]]:
    """Each loaded program's id with the processes that hold it open ("comm pid", from bpftool's pids field)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {prog["id"]: [f"{p['comm']} {p['pid']}" for p in prog.get("pids", [])] for prog in json.loads(out or "[]")}


def bpf_program_ids() -> set[int]:
    return set(bpf_programs())


def prometheus_value(base: str, query: str) -> float | None:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            result = json.load(response)["data"]["result"]
    except OSError:
        return None
    return float(result[0]["value"][1]) if result else None


def test_telemetry_stack_exports_the_agents_metrics_and_leaves_nothing(otelcol):
    before = bpf_program_ids()
    with workloads.telemetry_stack(max_seconds=120) as stack:
        metrics = stack.export_dir / "metrics.jsonl"
        assert wait_for(lambda: metrics.exists() and "otel_ebpf_receiver.syscalls" in metrics.read_text(), 60), \
            f"no agent metrics in {metrics}"
        # Prometheus scrapes the Collector's exporter each second: the agent's syscall counter arrives there too.
        assert wait_for(lambda: (prometheus_value(stack.prometheus_url, "sum(otel_ebpf_receiver_syscalls_total)")
                                 or 0) > 0, 30), "Prometheus never scraped the agent's syscall counter"
        during = bpf_program_ids() - before
        assert during, "the workload's agent attached no BPF program"
        pids = stack.pids
    # `pids` are the `timeout` wrappers: the agent under one may still be closing its programs when its wrapper is
    # gone (a CI run saw all four still loaded at that instant), so both must clear within the deadline
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (any(alive(pid) for pid in pids) or bpf_program_ids() & during):
        time.sleep(0.2)
    assert not [pid for pid in pids if alive(pid)], "processes of the workload still run"
    left = {prog_id: holders for prog_id, holders in bpf_programs().items() if prog_id in during}
    assert not left, f"the agent's BPF programs are still loaded 20 s after the workload ended: {left}"


def read_chars(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as io_stats:
            return next(int(line.split()[1]) for line in io_stats if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return 0


def alive(pid: int) -> bool:
    """Running, not a zombie: a killed child whose parent died with it waits for init to reap it, and an init
    that never reaps (some containers) keeps it listed."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def tar_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "tar"], capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split() if alive(int(pid))}


def test_backup_reads_files_while_on_and_stops_on_exit() -> None:
    """The `backup` look-alike (benign, never trained on: what `otel-ebpf-lab adapt` is measured with) runs tar
    over thousands of files while on, and none of its processes outlive it."""
    before = tar_pids()
    with workloads.backup(max_seconds=60):
        ours = wait_for(lambda: tar_pids() - before, 10)
        assert ours, "no tar process started"
        # it reads: tar's read bytes (rchar) pass 10 MB within seconds
        assert wait_for(lambda: sum(read_chars(pid) for pid in tar_pids() - before) > 10 << 20, 20), \
            "tar read less than 10 MB in 20 s"
    # SIGKILL lands when a read in progress returns: a moment, not more
    assert wait_for(lambda: not (tar_pids() & ours), 10), "tar still runs 10 s after the workload ended"
