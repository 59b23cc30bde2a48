"""What a probe is: a BPF program in ``bpf/<name>.bpf.c`` plus a Python class that says what it needs from the
kernel, which metrics it produces and which features it contributes to the state model.

Kernel maps stay cumulative (never cleared: clearing races with the kernel and loses updates); each interval a
probe reads them and turns the change since the last read into a :class:`Reading`. The agent then records the
reading into OpenTelemetry with the current ``system.state`` attached, so the probe never touches the SDK.
"""

from __future__ import annotations

import logging
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Hashable, Iterable, Mapping

from .contract import LayoutError, MapContract, check_map, constant_checks, constant_mismatch
from .loader import (BPF_SOURCE_DIR, TRACEFS_CANDIDATES, Hook, captured_stderr, first_error_line, hook_exists,  # noqa: F401
                     program_text, tracefs_root, tracepoint_fields, tracepoint_has_field)


COUNTER = "counter"          # monotonic; recorded as deltas so each system.state series sums to the total
GAUGE = "gauge"              # last value of the window
HISTOGRAM = "histogram"      # kernel log2 buckets (see Reading.histograms)


@dataclass(frozen=True)
class Metric:
    """One OpenTelemetry instrument a probe produces."""

    name: str
    kind: str
    unit: str
    description: str
    attributes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Feature:
    """One named input of the state model. Values are already scaled (log1p of a rate, a ratio in [0, 1]...),
    so that the same host under the same load gives the same number whatever its interval or size."""

    name: str
    description: str


@dataclass(frozen=True)
class TopItem:
    """One of a probe's busiest things this window, as the live view shows it: what, how much, in which unit."""

    label: str
    value: float
    unit: str = "/s"


@dataclass
class Reading:
    """What one probe saw in one window.

    counters: (metric name, increase since last window, attributes)
    gauges: (metric name, value, attributes)
    histograms: (metric name, {upper bound: count increase}, sum increase, attributes) with bounds in the metric's unit
    features: feature name -> scaled value for the state model
    """

    counters: list[tuple[str, float, Mapping[str, Any]]] = field(default_factory=list)
    gauges: list[tuple[str, float, Mapping[str, Any]]] = field(default_factory=list)
    histograms: list[tuple[str, Mapping[float, int], float, Mapping[str, Any]]] = field(default_factory=list)
    features: dict[str, float] = field(default_factory=dict)
    # Per-probe map health, cumulative since load; the agent reports the increases as self-metrics.
    map_update_failures: int = 0
    map_evictions: int = 0
    # For people watching (the live view, the lab, `snapshot`): the probe's headline rate in ``rate_unit`` and its
    # busiest things, each with its own unit.
    rate: float | None = None
    rate_unit: str = "events/s"
    top: list[TopItem] = field(default_factory=list)


class CounterDeltas:
    """Turns cumulative kernel counters into per-window increases.

    A key that shrank was evicted from an LRU map and re-created: its whole current value is new.
    """

    def __init__(self) -> None:
        self._last: dict[Hashable, int] = {}

    def delta(self, key: Hashable, cumulative: int) -> int:
        previous = self._last.get(key, 0)
        self._last[key] = cumulative
        return cumulative - previous if cumulative >= previous else cumulative

    def forget_missing(self, present: Iterable[Hashable]) -> None:
        """Drop keys the kernel no longer has, so the table stays as bounded as the map."""
        keep = set(present)
        for key in [k for k in self._last if k not in keep]:
            del self._last[key]


def log1p_rate(count: float, seconds: float) -> float:
    return math.log1p(max(count, 0.0) / seconds) if seconds > 0 else 0.0


def ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def damped_share(part: float, whole: float, seconds: float, prior_per_second: float) -> float:
    """part / (whole + prior_per_second x seconds): a share that a handful of events cannot push to 1.

    A plain share is as loud at one event as at a million: one stray SYN is a SYN share of 1.0, and an idle host's
    few hundred calls a second, most of them polls that time out, are an error share of 0.6. Both sat beyond what
    benign training saw and read as incidents. With the prior's events assumed present and clean, a quiet window's
    share stays small, while a busy window (a flood's 50,000 segments, a storm's 10^5 calls) moves by under 1 %."""
    return part / (whole + prior_per_second * seconds) if whole > 0 and seconds > 0 else 0.0


def decode_comm(raw: Any) -> str:
    """bcc gives char[16] as bytes (c_char arrays) ending at the first NUL."""
    value = raw.value if hasattr(raw, "value") else bytes(raw)
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


class Probe:
    """Base class. Subclasses set the class attributes and implement :meth:`read`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    hooks: ClassVar[tuple[Hook, ...]]
    metrics: ClassVar[tuple[Metric, ...]]
    features: ClassVar[tuple[Feature, ...]] = ()
    # Settings a user may give under probe_settings.<name>, with their defaults (the type is checked).
    defaults: ClassVar[dict[str, Any]] = {}
    # The C <-> Python contract (contract.py), checked at load: per map, the key and value fields Python reads;
    # the C constants (enum values, array indexes) Python relies on, with Python's values.
    maps: ClassVar[Mapping[str, MapContract]] = {}
    c_constants: ClassVar[Mapping[str, int]] = {}
    # A part of the syscall hub (probes/syscall_hub.py): its .bpf.c defines <name>_on_syscall_exit under
    # SYSCALL_HUB and its classic tracepoints otherwise; its settings have force_tracepoint.
    syscall_hub: ClassVar[bool] = False

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings = {**self.defaults, **dict(settings or {})}
        self.bpf: Any = None
        self.hub: Any = None  # the SyscallHub whose program this probe shares, when it does
        self._renamed: dict[str, str] = {}  # map name in the .bpf.c -> its name in the hub's program
        self.mode = ""  # how it attached, e.g. "raw_tracepoint" — shown by `probes` and the live view
        # Set by the assembly: on_event(name, attributes) turns probe events (blocklist changes) into OTel logs.
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None

    @classmethod
    def validate_settings(cls, settings: Mapping[str, Any], where: str) -> None:
        from ..errors import ConfigError

        for key, value in settings.items():
            if key not in cls.defaults:
                known = ", ".join(cls.defaults) or "none"
                raise ConfigError(f"probe_settings.{cls.name}: unknown setting {key!r} (from {where}); known: {known}")
            expected = type(cls.defaults[key])
            if expected is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"probe_settings.{cls.name}.{key} (from {where}) must be a non-negative integer, got {value!r}")
            if expected is not int and not isinstance(value, expected):
                raise ConfigError(f"probe_settings.{cls.name}.{key} (from {where}) must be a {expected.__name__}, got {value!r}")

    # -- what the kernel must offer -------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this kernel has every hook; otherwise one line saying what is missing."""
        if tracefs_root() is None:
            return "tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing, or run deploy/host-setup.sh)"
        missing = [h.tracepoint for h in cls.hooks if not hook_exists(h)]
        if missing:
            return f"tracepoint {', '.join(missing)} not found on kernel {platform.release()}"
        return None

    @classmethod
    def source_path(cls) -> Path:
        return BPF_SOURCE_DIR / f"{cls.name}.bpf.c"

    # -- loading ------------------------------------------------------------------------------------------
    def cflags(self) -> list[str]:
        """-D settings passed to the C program (map sizes, feature switches)."""
        return []

    def all_cflags(self) -> list[str]:
        """What the loader passes to bcc: the include path of bpf/common.bpf.h, the constants check, cflags()."""
        return [f"-I{BPF_SOURCE_DIR}", f"-DCHECK_PYTHON_CONSTANTS={constant_checks(self.c_constants)}",
                *self.cflags()]

    def load(self) -> None:
        """Compile, check the contract, attach. bcc attaches TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE functions by
        itself, as it compiles: a probe that breaks its contract is detached again before anything is read."""
        from bcc import BPF  # imported late: `probes` and `doctor` must work where bcc is broken

        from ..errors import ProbeError

        if self.syscall_hub and not self.settings.get("force_tracepoint"):
            from . import syscall_hub

            if syscall_hub.unavailable_reason() is None:
                try:
                    syscall_hub.SyscallHub([self]).load()
                    return
                except ProbeError as exc:  # the classic tracepoints may still work: say why they are used
                    logging.getLogger("otel_ebpf_receiver").warning("%s; trying classic tracepoints", exc)
        where = f"bpf/{self.name}.bpf.c"
        if self.c_constants and "CHECK_PYTHON_CONSTANTS" not in self.source_path().read_text():
            raise ProbeError(f"probe {self.name} disabled: {where} does not end with CHECK_PYTHON_CONSTANTS, so "
                             f"the constants Python reads cannot be checked")
        with captured_stderr() as compiler_output:
            try:
                self.bpf = BPF(text=program_text(self.source_path()), cflags=self.all_cflags())
            except Exception as exc:
                compiler_output.seek(0)  # fd 2 wrote through the shared offset: read from the start
                detail = first_error_line(compiler_output.read()) or str(exc)
                mismatch = constant_mismatch(detail)
                if mismatch:
                    raise ProbeError(f"probe {self.name} disabled: {where} and Python disagree: {mismatch}") from None
                raise ProbeError(f"probe {self.name} disabled: could not load {where}: {detail}") from None
        try:
            self.check_maps()
        except LayoutError as exc:
            self.close()
            raise ProbeError(f"probe {self.name} disabled: {where} and Python disagree: {exc}") from None
        if not self.mode:
            self.mode = "tracepoint"
        self.on_loaded()

    def join_hub(self, hub: Any) -> None:
        """Read this probe's maps from the syscall hub's program (probes/syscall_hub.py) instead of its own."""
        from ..errors import ProbeError

        from .syscall_hub import PRIVATE_NAMES, private_name

        self.hub, self.bpf = hub, hub.bpf
        # once, not per table() call: every window asks for "stats", and an import statement run after the
        # interval's pause cost tens of µs
        self._renamed = {name: private_name(self.name, name) for name in PRIVATE_NAMES}
        try:
            self.check_maps()
        except LayoutError as exc:
            raise ProbeError(f"probe {self.name} disabled: bpf/{self.name}.bpf.c and Python disagree: {exc}") from None
        self.mode = hub.mode
        self.on_loaded()

    def on_loaded(self) -> None:
        """Once the program is loaded, alone or as a part of the syscall hub: map snapshots, settings maps."""

    def table(self, name: str) -> Any:
        """A map of this probe's program by its name in the probe's .bpf.c (the hub renames the private ones)."""
        return self.bpf[self._renamed.get(name, name)]

    def contract_maps(self) -> Mapping[str, MapContract]:
        """The maps of ``maps`` this program has with these settings (some are compiled in by a setting)."""
        return self.maps

    def check_maps(self) -> None:
        """Each map Python reads against bcc's types and the kernel's sizes (raises contract.LayoutError)."""
        for map_name, contract in self.contract_maps().items():
            check_map(map_name, self.table(map_name), contract)

    def program_fds(self) -> dict[str, int]:
        """Function name -> fd of every program this probe loaded (what probe_cost.py reads run times from).
        bcc keeps a function in ``funcs`` once it loaded it: the ones it attached by itself and the ones a probe
        loaded to attach (the XDP program). Empty when the probe is not loaded."""
        if self.hub is not None:
            return self.hub.program_fds()
        if self.bpf is None:
            return {}
        return {str(name.decode() if isinstance(name, bytes) else name): fn.fd for name, fn in self.bpf.funcs.items()}

    def cost_name(self) -> str:
        """Whose programs program_fds() are: this probe's name, or the syscall hub's (``syscalls+file_open``):
        the probes sharing one program share its cost, which cannot be split between them."""
        return self.hub.name if self.hub is not None else self.name

    def close(self) -> None:
        """Detach every program and close the maps (a hub's program when the last probe sharing it closes)."""
        if self.hub is not None:
            self.hub.release(self)
            self.hub, self.bpf, self._renamed = None, None, {}
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    # -- each window ---------------------------------------------------------------------------------------
    def read(self, seconds: float) -> Reading:
        raise NotImplementedError
