"""`otel-ebpf-receiver doctor`: is this host ready? Each check with its fix."""

from __future__ import annotations

import argparse
import os
import platform
import socket
from pathlib import Path
from urllib.parse import urlparse


def _check(results: list[tuple[bool, bool, str, str]], ok: bool, fatal: bool, what: str, fix: str = "") -> bool:
    results.append((ok, fatal, what, fix))
    return ok


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..assembly import check_privileges
    from ..errors import PrivilegeError
    from ..probes import REGISTRY
    from ..probes.base import tracefs_root
    from ..telemetry import otlp_endpoint, otlp_protocol

    results: list[tuple[bool, bool, str, str]] = []
    try:
        check_privileges()
        _check(results, True, True, "privileges: can load eBPF programs")
    except PrivilegeError as exc:
        _check(results, False, True, f"privileges: {exc}", "run as root: sudo otel-ebpf-receiver doctor")
    _check(results, tracefs_root() is not None, True, "tracefs mounted",
           "mount -t tracefs tracefs /sys/kernel/tracing (or run deploy/host-setup.sh)")
    _check(results, os.path.ismount("/sys/fs/bpf"), True, "bpffs mounted at /sys/fs/bpf (pinned blocklist maps)",
           "mount -t bpf bpf /sys/fs/bpf")
    _check(results, os.path.ismount("/sys/kernel/debug"), False, "debugfs mounted (optional)",
           "mount -t debugfs debugfs /sys/kernel/debug")
    kdir = Path("/lib/modules") / platform.release()
    headers = any((kdir / d / "include/linux/kconfig.h").exists() for d in ("build", "source"))
    _check(results, headers, True, f"kernel headers under {kdir}",
           "apt-get install linux-headers-amd64 and link it there (deploy/host-setup.sh does both)")
    try:
        import bcc  # noqa: F401

        _check(results, True, True, "python module bcc importable")
        bcc_ok = True
    except Exception as exc:  # ImportError, or OSError when libbcc.so is missing
        _check(results, False, True, f"python module bcc not importable ({exc})",
               "apt-get install python3-bpfcc libbpfcc (bcc is not on PyPI), then re-create the venv: make setup")
        bcc_ok = False
    _check(results, Path("/sys/kernel/btf/vmlinux").exists(), False, "kernel BTF (/sys/kernel/btf/vmlinux)",
           "not required by bcc; CO-RE tools would need CONFIG_DEBUG_INFO_BTF")
    if bcc_ok:
        from bcc import BPF

        from ..probes import syscall_hub

        _check(results, bool(BPF.support_raw_tracepoint()), False, "raw tracepoints", "")
        hub_problem = syscall_hub.unavailable_reason()
        hub_probes = ", ".join(name for name, cls in REGISTRY.items() if cls.syscall_hub)
        _check(results, hub_problem is None, False,
               f"syscall hooks: {hub_probes} share one raw sys_exit program (syscall hub)" if hub_problem is None
               else f"syscall hooks: classic per-syscall tracepoints for {hub_probes} ({hub_problem})",
               "every system call then pays the kernel's perf syscall handlers, in both directions, once per probe")
        if hub_problem is None:
            typed = syscall_hub.btf_type_id() is not None
            _check(results, typed, False,
                   "syscall hub program: BTF-typed (tp_btf), registers read with plain loads" if typed
                   else "syscall hub program: untyped raw tracepoint (kernel BTF does not declare btf_trace_sys_exit)",
                   "each system call then also pays one bpf_probe_read_kernel call (README, Syscall overhead)")
    available = 0
    for name, cls in REGISTRY.items():
        reason = cls.unavailable_reason()
        available += reason is None
        _check(results, reason is None, False, f"probe {name}" + (f": {reason}" if reason else ": hooks present"),
               "this probe will be skipped; the others still run")
    _check(results, available > 0, True, f"{available} of {len(REGISTRY)} probes can run",
           "see the lines above")
    _check_bpf_stats(results, args.config)
    endpoint = otlp_endpoint("metrics")
    reachable = _tcp_reachable(endpoint)
    _check(results, reachable, False, f"OTLP endpoint {endpoint} ({otlp_protocol('metrics')}) "
           + ("reachable" if reachable else "not reachable"),
           "start a Collector there or set OTEL_EXPORTER_OTLP_ENDPOINT; the agent keeps running and retries")

    failed_fatal = False
    for ok, fatal, what, fix in results:
        mark = "ok  " if ok else ("FAIL" if fatal else "warn")
        print(f"[{mark}] {what}" + ("" if ok or not fix else f"\n       fix: {fix}"))
        failed_fatal |= fatal and not ok
    print("\nthe agent can run here" if not failed_fatal else "\nthe agent can NOT run here: fix the FAIL lines above")
    return 1 if failed_fatal else 0


def _check_bpf_stats(results: list[tuple[bool, bool, str, str]], config_path: str | None) -> None:
    """Whether the kernel counts BPF program run time now, who keeps it on, and what the agent's setting says.
    Informational: stats on costs a clock read per program run (README, "Probe cost"), off costs nothing."""
    from .. import config
    from ..errors import ConfigError
    from ..probe_cost import stats_holders, sysctl_enabled

    try:
        cfg = config.load({"config": config_path})
        if os.environ.get(config.ENV_BPF_STATS):
            where = config.ENV_BPF_STATS
        elif cfg.source != "defaults" and "bpf_stats" in config.load_file(cfg.source):
            where = cfg.source
        else:
            where = "default"
    except ConfigError as exc:
        _check(results, False, False, f"BPF statistics: configuration not readable: {exc}")
        return
    sysctl = sysctl_enabled()
    holders = stats_holders()
    on = bool(sysctl) or bool(holders)
    why = []
    if sysctl is not None:
        why.append(f"sysctl kernel.bpf_stats_enabled={int(sysctl)}")
    why += [f"held on by {comm} (pid {pid})" for pid, comm in holders]
    _check(results, True, False, f"BPF statistics (per-program run time) {'on' if on else 'off'}: "
           f"{'; '.join(why) or 'sysctl unreadable'}; agent setting bpf_stats: {cfg.bpf_stats} ({where})")


def _tcp_reachable(endpoint: str, timeout: float = 1.0) -> bool:
    url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    port = url.port or (443 if url.scheme == "https" else 4317)
    try:
        with socket.create_connection((url.hostname or "localhost", port), timeout=timeout):
            return True
    except OSError:
        return False




def register(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser("doctor", help="check this host and say what to fix")
    doctor.add_argument("--config", "-c", help="YAML configuration file whose settings to show (bpf_stats)")
    doctor.set_defaults(handler=cmd_doctor)
