"""Threat feeds as ``blocklist import`` reads them: one address or prefix per line, read one bounded line at a
time (a feed can be large, or a pipe; a broken one can have a line of any length), and what an import did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

IMPORT_BATCH_LINES = 1000   # the sidecar lock is held per batch, so the agent's expiry never waits for a whole feed
MAX_LINE_BYTES = 1024       # an address or prefix and a comment; anything longer is not a feed line
MAX_REPORTED_SKIPS = 1000   # skipped lines described one by one; beyond that only counted


@dataclass
class ImportResult:
    """What an import did. Unpacks as ``added, skipped`` (the shape callers such as bench/bench_xdp.py use)."""

    added: list[str] = field(default_factory=list)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (line, text, why), the first ones
    skipped_count: int = 0
    invalid_count: int = 0  # skipped for a reason other than "already blocked" or a duplicate line

    def skip(self, lineno: int, text: str, why: str, *, invalid: bool = True) -> None:
        self.skipped_count += 1
        self.invalid_count += invalid
        if len(self.skipped) < MAX_REPORTED_SKIPS:
            self.skipped.append((lineno, text, why))

    def __iter__(self) -> Iterator[Any]:
        return iter((self.added, self.skipped))


def feed_lines(stream: BinaryIO) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, None) per line of ``stream``, or (line number, shown text, why unusable) for a line
    longer than MAX_LINE_BYTES or not UTF-8 — reading one bounded line at a time, never the whole file."""
    lineno = 0
    while True:
        raw = stream.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while True:  # the rest of the overlong line, in bounded pieces
                rest = stream.readline(65536)
                if not rest or rest.endswith(b"\n"):
                    break
            yield lineno, raw[:40].decode("utf-8", "replace") + "...", f"line longer than {MAX_LINE_BYTES} bytes"
            continue
        try:
            yield lineno, raw.decode("utf-8"), None
        except UnicodeDecodeError:
            yield lineno, raw[:40].decode("utf-8", "replace"), "not UTF-8 text"
