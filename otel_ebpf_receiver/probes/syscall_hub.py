"""The syscall hub: every syscall-based probe (``syscall_hub = True``: syscalls, file_open, http) is one part of a
single raw ``sys_exit`` program, so a system call pays one program run however many of them are enabled.

Why: enabling any classic ``syscalls:*`` tracepoint hooks the kernel's perf syscall handlers onto every system
call of every process, in both directions, and one program per probe makes each call pay once per probe. Here the
loader composes one bcc module from the enabled probes' sources (``SYSCALL_HUB`` defined): each part keeps its
maps and defines ``<probe>_on_syscall_exit(call)``, a switch on the syscall number that returns at once for the
numbers it does not watch; ``bpf/syscall_hub.bpf.c`` reads the registers once and calls the parts in order. On
x86_64 the saved registers at sys_exit still hold the first arguments and the syscall number (see
bpf/syscall_hub.bpf.h), so no ``sys_enter`` program is needed at all. Syscall numbers come from the kernel's
``asm/unistd.h`` (``__NR_*``), not from Python.

How it attaches, cheapest first. Where the kernel's BTF declares the tracepoint (``btf_trace_sys_exit``) the
program is loaded BTF-typed ("tp_btf": BPF_PROG_TYPE_TRACING, attach type BPF_TRACE_RAW_TP) and reads the
registers with plain loads the verifier checks against the kernel's own ``struct pt_regs``; bcc compiles it but
has no attach path for that type, so this module loads bcc's relocated instructions itself (kernel/bpfsys.py) and
holds the link. Otherwise, or when that load is refused, bcc attaches it as an untyped raw tracepoint that copies
the registers with ``bpf_probe_read_kernel`` — one helper call per system call, which cost more than all the
counting (README, Probe cost).

Where the hub cannot run (another arch, no raw tracepoints) or a probe asks for ``force_tracepoint``, that probe
loads alone on its classic tracepoints, as before; `doctor` and the start-up log say which mode each probe uses.

Each probe still reads its own maps from the shared BPF object: map names are unique across the parts, except
common.bpf.h's per-probe ``stats`` array, which the composer renames ``<probe>_stats`` (:func:`private_name`).
"""

from __future__ import annotations

import ctypes
import logging
import platform
import re
from typing import Any, Sequence

from ..kernel import bpfsys, btf
from .contract import constant_checks, constant_mismatch
from .loader import BPF_SOURCE_DIR, Hook, captured_stderr, first_error_line, hook_exists, program_text

Probe = Any  # a probes.base.Probe with syscall_hub = True (not imported: base imports this module)

HUB_SOURCE = BPF_SOURCE_DIR / "syscall_hub.bpf.c"
SYS_EXIT = Hook("raw_syscalls:sys_exit")
# Names common.bpf.h gives every part (outside its include guard): one copy per probe, renamed per probe.
PRIVATE_NAMES = ("stats", "bump_stat")
MODE = "raw_tracepoint"
BTF_FUNCTION = "syscall_hub_sys_exit"  # bpf/syscall_hub.bpf.c under SYSCALL_HUB_BTF


def unavailable_reason() -> str | None:
    """None when the hub can run on this host; otherwise one line saying why the classic tracepoints are used."""
    machine = platform.machine()
    if machine != "x86_64":
        return f"the syscall hub reads x86_64 saved registers at sys_exit; this host is {machine}"
    try:
        from bcc import BPF
    except Exception as exc:  # ImportError, or OSError when libbcc.so is missing
        return f"bcc is not importable ({exc})"
    if not BPF.support_raw_tracepoint():
        return "this kernel has no raw tracepoints (Linux >= 4.17)"
    if not hook_exists(SYS_EXIT):
        return f"tracepoint {SYS_EXIT.tracepoint} not found"
    return None


def btf_type_id() -> int | None:
    """The BTF id a typed sys_exit program is loaded against, or None when this kernel's BTF does not declare it."""
    facts = btf.read_facts((), (SYS_EXIT.tracepoint.split(":", 1)[1],))
    return facts.tracepoint_type_ids.get("sys_exit") if facts else None


def private_name(probe_name: str, name: str) -> str:
    return f"{probe_name}_{name}"


def part_text(probe: Probe) -> str:
    """A probe's program as one part of the hub: its own constants check and its own copy of the private names."""
    text = program_text(probe.source_path())
    for name in PRIVATE_NAMES:
        text = re.sub(rf"\b{name}\b", private_name(probe.name, name), text)
    return (f"#undef CHECK_PYTHON_CONSTANTS\n#define CHECK_PYTHON_CONSTANTS {constant_checks(probe.c_constants)}\n"
            f"{text}\n")


def hub_text(probes: Sequence[Probe]) -> str:
    return "".join(part_text(p) for p in probes) + program_text(HUB_SOURCE)


def hub_cflags(probes: Sequence[Probe]) -> list[str]:
    """The parts' -D settings merged (one program: a name set twice must agree), and the handlers in order."""
    from ..errors import ProbeError

    defines: dict[str, tuple[str, str]] = {}
    for probe in probes:
        for flag in probe.cflags():
            name = flag[2:].split("=", 1)[0]
            if name in defines and defines[name][0] != flag:
                raise ProbeError(f"syscall hub: {probe.name} sets {flag} but {defines[name][1]} sets "
                                 f"{defines[name][0]}; they cannot share one program")
            defines[name] = (flag, probe.name)
    handlers = "".join(f"{p.name}_on_syscall_exit(&call);" for p in probes)
    return [f"-I{BPF_SOURCE_DIR}", "-DSYSCALL_HUB", f"-DSYSCALL_HUB_HANDLERS={handlers}",
            *(flag for flag, _ in defines.values())]


class SyscallHub:
    """One loaded raw sys_exit program shared by ``probes``; detached when the last of them closes."""

    def __init__(self, probes: Sequence[Probe]) -> None:
        self.probes = list(probes)
        self.bpf = None
        self._open: set[str] = set()
        self.typed = False  # loaded BTF-typed (our own program and link fds) rather than attached by bcc
        self.untyped_reason = ""  # why not, when not: shown in the mode
        self._prog_fd = self._link_fd = -1

    @property
    def name(self) -> str:
        """How its cost is reported: the probes sharing it, e.g. ``syscalls+file_open+http``."""
        return "+".join(p.name for p in self.probes)

    @property
    def mode(self) -> str:
        others = ", ".join(p.name for p in self.probes)
        kind = f"{MODE}, BTF-typed" if self.typed else MODE
        return f"{kind} (one sys_exit program: {others})" if len(self.probes) > 1 else kind

    def load(self) -> None:
        """Compile and attach the one program, then hand it to each part (map contract checked per probe). A part
        that breaks its contract refuses the whole hub: the caller loads the probes alone instead."""
        type_id = btf_type_id()
        if type_id is None:
            self.untyped_reason = "this kernel's BTF does not declare btf_trace_sys_exit"
        else:
            try:
                self._compile(["-DSYSCALL_HUB_BTF"])
                self._attach_typed(type_id)
                self.typed = True
            except bpfsys.BpfError as exc:  # an older kernel or verifier: the untyped program still works
                self.untyped_reason = f"the kernel refused the BTF-typed program ({exc})"
                self._cleanup()
        if not self.typed:
            logging.getLogger("otel_ebpf_receiver").info("syscall hub: untyped raw tracepoint: %s",
                                                         self.untyped_reason)
            self._compile([])
        try:
            for probe in self.probes:
                probe.join_hub(self)
                self._open.add(probe.name)
        except BaseException:
            for probe in self.probes:
                probe.hub, probe.bpf = None, None
            self._cleanup()
            raise

    def _compile(self, extra_cflags: list[str]) -> None:
        from bcc import BPF

        from ..errors import ProbeError

        names = ", ".join(p.name for p in self.probes)
        text, cflags = hub_text(self.probes), hub_cflags(self.probes) + extra_cflags
        with captured_stderr() as compiler_output:
            try:
                self.bpf = BPF(text=text, cflags=cflags)
            except Exception as exc:
                compiler_output.seek(0)
                detail = first_error_line(compiler_output.read()) or str(exc)
                mismatch = constant_mismatch(detail)
                raise ProbeError(f"syscall hub ({names}) could not load: {mismatch or detail}") from None

    def _attach_typed(self, type_id: int) -> None:
        """Load bcc's compiled, map-relocated instructions as a BTF-typed raw tracepoint program and attach it."""
        from bcc.libbcc import lib

        name = BTF_FUNCTION.encode()
        start, size = lib.bpf_function_start(self.bpf.module, name), lib.bpf_function_size(self.bpf.module, name)
        if not start or not size:
            raise bpfsys.BpfError(0, f"bcc did not compile {BTF_FUNCTION}")
        license = (lib.bpf_module_license(self.bpf.module) or b"GPL").decode()
        self._prog_fd = bpfsys.prog_load(bpfsys.PROG_TYPE_TRACING, ctypes.string_at(start, size), license,
                                         BTF_FUNCTION, bpfsys.ATTACH_TRACE_RAW_TP, type_id)
        self._link_fd = bpfsys.raw_tracepoint_open(self._prog_fd)

    def program_fds(self) -> dict[str, int]:
        if self.bpf is None:
            return {}
        if self.typed:
            return {BTF_FUNCTION: self._prog_fd}
        return {str(name.decode() if isinstance(name, bytes) else name): fn.fd for name, fn in self.bpf.funcs.items()}

    def release(self, probe: Probe) -> None:
        self._open.discard(probe.name)
        if not self._open:
            self._cleanup()

    def _cleanup(self) -> None:
        # The link first: closing it detaches the program before its maps go.
        for fd in (self._link_fd, self._prog_fd):
            if fd >= 0:
                bpfsys.close(fd)
        self._prog_fd = self._link_fd = -1
        self.typed = False
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def load_shared(probes: Sequence[Probe], say) -> list[Probe]:
    """Load the hub-capable ``probes`` that did not ask for their classic tracepoints into one hub; returns the
    probes left to load alone (all of them when the hub cannot run here or fails to load, said in one line)."""
    from ..errors import ProbeError

    shared = [p for p in probes if not p.settings.get("force_tracepoint")]
    if not shared:
        return list(probes)
    reason = unavailable_reason()
    if reason:
        say(f"syscall probes use classic tracepoints: {reason}")
        return list(probes)
    try:
        SyscallHub(shared).load()
    except ProbeError as exc:
        say(f"{exc}; loading the syscall probes on their classic tracepoints instead")
        return list(probes)
    return [p for p in probes if p not in shared]


__all__ = ["SyscallHub", "hub_cflags", "hub_text", "load_shared", "private_name", "unavailable_reason"]
