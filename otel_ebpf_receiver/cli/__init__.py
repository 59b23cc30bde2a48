"""Command line: `otel-ebpf-receiver run | probes | doctor | block | unblock | allow | disallow | blocklist`.

Each verb lives in its own module with a ``register(subparsers)`` that adds it; this module assembles them."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import AgentError
from . import blocklist, doctor, probes, run, snapshot
from .common import PROG, say, setup_logging

MAIN_EPILOG = """examples:
  sudo otel-ebpf-receiver doctor           is this host ready? what is missing and how to fix it
  sudo otel-ebpf-receiver probes           which probes this kernel can run, their metrics and features
  sudo otel-ebpf-receiver run              start the agent (see `run --help`)
  sudo otel-ebpf-receiver blocklist        the XDP block- and allowlist (see `block --help`)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="eBPF → OpenTelemetry, with the host's system state.",
                                     epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in (run, probes, doctor, blocklist, snapshot):
        verb.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # gRPC's C core logs connection churn (GOAWAY...) to stderr by itself; export health is reported by us, once.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except AgentError as exc:
        say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
