"""Command line: `otel-ebpf-receiver run | probes | doctor | ...`."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from . import __version__
from .errors import AgentError

PROG = "otel-ebpf-receiver"
log = logging.getLogger("otel_ebpf_receiver")

RUN_EPILOG = """examples:
  otel-ebpf-receiver run                                  every probe this kernel supports, OTLP/gRPC to localhost:4317
  otel-ebpf-receiver run --probes syscalls,exec --interval 500ms
  otel-ebpf-receiver run --exporter console --live off    print metrics instead of sending them
  OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf otel-ebpf-receiver run
  otel-ebpf-receiver run --config /etc/otel-ebpf-receiver/config.yaml
  otel-ebpf-receiver run --interfaces eth0 --mitigation dry-run   XDP on eth0; say what would be blocked

configuration precedence: flags > OTEL_EBPF_RECEIVER_* variables > config file > defaults.
where data go: the standard OTEL_EXPORTER_OTLP_* variables; OTEL_METRIC_EXPORT_INTERVAL (ms, default 10000);
OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME add to or override the resource.
"""

MAIN_EPILOG = """examples:
  sudo otel-ebpf-receiver doctor           is this host ready? what is missing and how to fix it
  sudo otel-ebpf-receiver probes           which probes this kernel can run, their metrics and features
  sudo otel-ebpf-receiver run              start the agent (see `run --help`)
"""


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(format=f"{PROG}: %(message)s", level=getattr(logging, level.upper()), stream=sys.stderr,
                        force=True)


def _say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


# -- run ------------------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from . import agent, config

    if args.ebpf:
        from .probes import REGISTRY

        for name in args.probes.split(",") if args.probes else REGISTRY:
            print(f"// ---- bpf/{name}.bpf.c\n{REGISTRY[name].source_path().read_text()}")
        return 0
    flags = {"config": args.config, "interval": args.interval, "probes": args.probes, "exporter": args.exporter,
             "model_dir": args.model_dir, "live": args.live, "log_level": args.log_level,
             "mitigation": args.mitigation}
    cfg = config.load(flags)
    if args.interfaces:  # shorthand for probe_settings.xdp.interfaces
        interfaces = [i for i in args.interfaces.split(",") if i]
        config.check_probe_settings("xdp", {"interfaces": interfaces}, "--interfaces")
        cfg.probe_settings.setdefault("xdp", {})["interfaces"] = interfaces
    _setup_logging(cfg.log_level)
    agent.run(cfg, say=_say)
    return 0


# -- probes ---------------------------------------------------------------------------------------------------
def cmd_probes(args: argparse.Namespace) -> int:
    from .probes import REGISTRY

    for name, cls in REGISTRY.items():
        reason = cls.unavailable_reason()
        status = "available" if reason is None else f"NOT AVAILABLE: {reason}"
        print(f"{name}: {cls.summary}\n  status: {status}")
        print(f"  hooks: {', '.join(h.tracepoint for h in cls.hooks) or 'network interfaces (XDP)'}")
        print("  metrics:")
        for m in cls.metrics:
            attrs = f" [{', '.join(m.attributes)}]" if m.attributes else ""
            print(f"    {m.name} ({m.kind}, {m.unit}){attrs}: {m.description}")
        if cls.features:
            print("  features:")
            for f in cls.features:
                print(f"    {f.name}: {f.description}")
        print()
    return 0


# -- doctor ---------------------------------------------------------------------------------------------------
def _check(results: list[tuple[bool, bool, str, str]], ok: bool, fatal: bool, what: str, fix: str = "") -> bool:
    results.append((ok, fatal, what, fix))
    return ok


def cmd_doctor(args: argparse.Namespace) -> int:
    from .agent import check_privileges
    from .errors import PrivilegeError
    from .probes import REGISTRY
    from .probes.base import tracefs_root
    from .telemetry import otlp_endpoint, otlp_protocol

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

        _check(results, bool(BPF.support_raw_tracepoint()), False, "raw tracepoints (cheaper syscalls probe)",
               "the syscalls probe falls back to the classic tracepoint")
    available = 0
    for name, cls in REGISTRY.items():
        reason = cls.unavailable_reason()
        available += reason is None
        _check(results, reason is None, False, f"probe {name}" + (f": {reason}" if reason else ": hooks present"),
               "this probe will be skipped; the others still run")
    _check(results, available > 0, True, f"{available} of {len(REGISTRY)} probes can run",
           "see the lines above")
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


def _tcp_reachable(endpoint: str, timeout: float = 1.0) -> bool:
    url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    port = url.port or (443 if url.scheme == "https" else 4317)
    try:
        with socket.create_connection((url.hostname or "localhost", port), timeout=timeout):
            return True
    except OSError:
        return False


# -- parser ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="eBPF → OpenTelemetry, with the host's system state.",
                                     epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="start the agent", epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", "-c", help="YAML configuration file")
    run.add_argument("--interval", "-i", help="window length, e.g. 1s (default), 500ms")
    run.add_argument("--probes", "-p", help="comma-separated probes (default: all available), e.g. syscalls,exec")
    run.add_argument("--exporter", "-e", choices=["otlp", "console", "none"], help="where metrics go (default otlp)")
    run.add_argument("--model-dir", help="directory watched for .onnx state models (default /var/lib/otel-ebpf-receiver/models; "
                          "the bundled model serves until it holds a valid one)")
    run.add_argument("--live", choices=["auto", "on", "off"], help="terminal live view (default auto: on in a tty)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--interfaces", metavar="IFACE[,IFACE]", help="watch these interfaces with XDP, e.g. eth0")
    run.add_argument("--mitigation", choices=["off", "dry-run", "enforce"],
                     help="block offending sources at XDP while under attack (default off)")
    run.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)  # print the C programs and exit
    run.set_defaults(handler=cmd_run)

    probes = sub.add_parser("probes", help="list probes, their metrics and whether this kernel can run them")
    probes.set_defaults(handler=cmd_probes)

    doctor = sub.add_parser("doctor", help="check this host and say what to fix")
    doctor.set_defaults(handler=cmd_doctor)

    for register in _extensions():
        register(sub)
    return parser


def _extensions() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Verbs that live with their feature (blocklist, models, lab)."""
    registrars = []
    for module, attr in (("otel_ebpf_receiver.blocklist", "register_cli"), ("model_export.lab", "register_cli")):
        try:
            mod = __import__(module, fromlist=[attr])
        except ImportError:
            continue
        if hasattr(mod, attr):
            registrars.append(getattr(mod, attr))
    return registrars


def main(argv: list[str] | None = None) -> int:
    # gRPC's C core logs connection churn (GOAWAY...) to stderr by itself; export health is reported by us, once.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except AgentError as exc:
        _say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
