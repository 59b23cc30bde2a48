"""How a probe's C reaches bcc, shared by a probe loaded alone (base.Probe.load) and the syscall hub
(syscall_hub.py): hook points and whether this kernel has them, the program text with bpf/*.bpf.h spliced in, and
the compiler's output kept for one-line errors."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BPF_SOURCE_DIR = Path(__file__).resolve().parent.parent / "bpf"


@dataclass(frozen=True)
class Hook:
    """A kernel hook point, named as in tracefs: ``category:event``."""

    tracepoint: str

    @property
    def category(self) -> str:
        return self.tracepoint.split(":", 1)[0]

    @property
    def event(self) -> str:
        return self.tracepoint.split(":", 1)[1]


def tracefs_root() -> Path | None:
    for candidate in TRACEFS_CANDIDATES:
        if os.path.isdir(os.path.join(candidate, "events")):
            return Path(candidate)
    return None


def hook_exists(hook: Hook) -> bool:
    root = tracefs_root()
    return root is not None and (root / "events" / hook.category / hook.event / "format").exists()


def tracepoint_fields(hook: Hook) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) from the tracepoint's format file ({} when it is missing).
    Tracepoint layouts change between kernels (sched_process_exit gained group_dead in 6.x): read, don't assume."""
    root = tracefs_root()
    fields: dict[str, tuple[int, int]] = {}
    if root is None:
        return fields
    try:
        text = (root / "events" / hook.category / hook.event / "format").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        parts = dict(p.strip().split(":", 1) for p in line.split(";") if ":" in p)
        decl = parts.get("field", "").strip()
        name = decl.split()[-1].split("[", 1)[0] if decl else ""
        try:
            fields[name] = (int(parts["offset"]), int(parts["size"]))
        except (KeyError, ValueError):
            continue
    return fields


def tracepoint_has_field(hook: Hook, field_name: str) -> bool:
    return field_name in tracepoint_fields(hook)


_SHARED_INCLUDE = re.compile(r'^#include "(?P<name>[\w.-]+\.bpf\.h)"[^\n]*$', re.M)


def program_text(path: Path) -> str:
    """A program as bcc must see it: with bpf/*.bpf.h spliced in where it is included.

    bcc rewrites map calls (``stats.lookup(&i)``) into BPF helper calls only in the main file: in an included file
    it leaves them alone and the program fails to load, inside a macro it refuses them. The shared helpers
    (bpf/common.bpf.h) do call maps, so the loader includes them itself, textually and once, keeping file names
    and line numbers for the compiler's messages."""
    seen: set[str] = set()

    def splice(match: re.Match) -> str:
        name = match["name"]
        if name in seen:
            return ""
        seen.add(name)
        line = text.count("\n", 0, match.start()) + 2
        return f'#line 1 "bpf/{name}"\n{(BPF_SOURCE_DIR / name).read_text()}\n#line {line} "bpf/{path.name}"'

    text = path.read_text()
    return f'#line 1 "bpf/{path.name}"\n' + _SHARED_INCLUDE.sub(splice, text)


@contextlib.contextmanager
def captured_stderr():
    """libbcc and clang write straight to fd 2; keep that out of the user's terminal and keep it for errors."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)


def first_error_line(text: str) -> str:
    for line in text.splitlines():
        low = line.lower()
        # bcc first tries the in-kernel headers module and says so even when the headers on disk then work.
        if ("error" in low or "fatal" in low) and "kheaders" not in low:
            return line.strip()
    return ""
