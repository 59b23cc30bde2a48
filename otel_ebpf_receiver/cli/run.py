"""`otel-ebpf-receiver run`: the agent."""

from __future__ import annotations

import argparse
import faulthandler
import signal

from .. import assembly, config, otel_env
from ..durations import parse_duration
from . import check
from .common import say, setup_logging

RUN_EPILOG = """examples (as root, or prefix sudo):
  otel-ebpf-receiver run                                  every probe this kernel supports, OTLP/gRPC to localhost:4317
  otel-ebpf-receiver run --probes syscalls,exec --interval 500ms
  otel-ebpf-receiver run --duration 30s                   run for 30 seconds, then stop as on Ctrl-C
  otel-ebpf-receiver run --exporter console --live off    print metrics instead of sending them
  otel-ebpf-receiver run --config /etc/otel-ebpf-receiver/config.yaml --check   validate, say what would run, exit
  otel-ebpf-receiver run --interfaces eth0 --mitigation dry-run   XDP on eth0; say what would be blocked
  sudo env OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf \\
      otel-ebpf-receiver run                              variables after `sudo env` survive; sudo drops the others

configuration precedence: flags > OTEL_EBPF_RECEIVER_* variables > config file > defaults.
where data go: the standard OTEL_EXPORTER_OTLP_* variables; OTEL_METRIC_EXPORT_INTERVAL (ms, default 10000);
OTEL_{METRICS,LOGS,TRACES}_EXPORTER (otlp, console, none, or e.g. otlp,console) when --exporter is not given;
OTEL_SDK_DISABLED=true exports nothing. Stopping (Ctrl-C, SIGTERM, --duration) reads the last window, detaches
every program, then flushes for at most 3 s.
OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME add to or override the resource. sudo resets the environment:
pass variables with `sudo env VAR=value ...` or `sudo --preserve-env=VAR,...`, not `VAR=value sudo ...`.
"""


def cmd_run(args: argparse.Namespace) -> int:
    if args.ebpf:
        from ..probes import REGISTRY

        from ..probes.syscall_hub import HUB_SOURCE

        names = args.probes.split(",") if args.probes else list(REGISTRY)
        for name in names:
            print(f"// ---- bpf/{name}.bpf.c\n{REGISTRY[name].source_path().read_text()}")
        if any(REGISTRY[name].syscall_hub for name in names if name in REGISTRY):
            print(f"// ---- bpf/{HUB_SOURCE.name}: the one sys_exit program the syscall probes above share\n"
                  f"{HUB_SOURCE.read_text()}")
        return 0
    flags = {"config": args.config, "interval": args.interval, "probes": args.probes, "exporter": args.exporter,
             "model_dir": args.model_dir, "live": args.live, "log_level": args.log_level,
             "mitigation": args.mitigation, "health_addr": args.health_addr}
    cfg = config.load(flags)
    duration = parse_duration(args.duration, "--duration") if args.duration is not None else None
    otel_env.check()  # before the privilege check: a bad OTEL_* value is said even when not run as root
    if args.interfaces:  # shorthand for probe_settings.xdp.interfaces
        interfaces = [i for i in args.interfaces.split(",") if i]
        config.check_probe_settings("xdp", {"interfaces": interfaces}, "--interfaces")
        cfg.probe_settings.setdefault("xdp", {})["interfaces"] = interfaces
    if args.check:
        return check.cmd_check(cfg)
    setup_logging(cfg.log_level)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: what a stuck export or read is waiting on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    assembly.run(cfg, say=say, duration=duration)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="start the agent", epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", "-c", help="YAML configuration file")
    run.add_argument("--interval", "-i", help="window length, e.g. 1s (default), 500ms")
    run.add_argument("--probes", "-p", help="comma-separated probes (default: all available), e.g. syscalls,exec")
    run.add_argument("--exporter", "-e", choices=["otlp", "console", "none"],
                     help="where metrics, events and incidents go (default: OTEL_{METRICS,LOGS,TRACES}_EXPORTER per "
                          "signal, else otlp)")
    run.add_argument("--model-dir", help="directory watched for .onnx state models (default /var/lib/otel-ebpf-receiver/models; "
                          "the bundled model serves until it holds a valid one)")
    run.add_argument("--live", choices=["auto", "on", "off"], help="terminal live view (default auto: on in a tty)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--interfaces", metavar="IFACE[,IFACE]", help="watch these interfaces with XDP, e.g. eth0")
    run.add_argument("--mitigation", choices=["off", "dry-run", "enforce"],
                     help="block offending sources at XDP while under attack (default off)")
    run.add_argument("--check", action="store_true",
                     help="validate the configuration, say in one line what would run, and exit (0 = it would start)")
    run.add_argument("--health-addr", metavar="HOST:PORT",
                     help="serve /healthz and /readyz here, e.g. 127.0.0.1:13134 (default: off)")
    run.add_argument("--duration", "-d", help="stop after this long, e.g. 30s, 10m (default: until Ctrl-C)")
    run.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)  # print the C programs and exit
    run.set_defaults(handler=cmd_run)
