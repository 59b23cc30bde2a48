"""What every verb shares: the program name, one-line output and logging set-up."""

from __future__ import annotations

import logging
import sys

PROG = "otel-ebpf-receiver"


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(format=f"{PROG}: %(message)s", level=getattr(logging, level.upper()), stream=sys.stderr,
                        force=True)


def say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)
