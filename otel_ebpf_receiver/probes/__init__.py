"""The probe registry: name -> class. Order here is the order of features in the model's vector."""

from __future__ import annotations

from .base import Probe
from .block_io import BlockIoProbe
from .exec import ExecProbe
from .file_open import FileOpenProbe
from .http import HttpProbe
from .memory import MemoryProbe
from .sched import SchedProbe
from .syscalls import SyscallsProbe
from .tcp import TcpProbe
from .xdp import XdpProbe

_ALL: tuple[type[Probe], ...] = (SyscallsProbe, FileOpenProbe, ExecProbe, TcpProbe, XdpProbe, BlockIoProbe,
                                 SchedProbe, HttpProbe, MemoryProbe)


def _build_registry(classes: tuple[type[Probe], ...]) -> dict[str, type[Probe]]:
    registry: dict[str, type[Probe]] = {}
    metric_owner: dict[str, str] = {}
    for cls in classes:
        if cls.name in registry:
            raise ValueError(f"duplicate probe name {cls.name!r}")
        for metric in cls.metrics:
            if metric.name in metric_owner:
                raise ValueError(f"metric {metric.name!r} declared by both {metric_owner[metric.name]} and {cls.name}")
            metric_owner[metric.name] = cls.name
        registry[cls.name] = cls
    return registry


REGISTRY: dict[str, type[Probe]] = _build_registry(_ALL)
DEFAULT_PROBES: tuple[str, ...] = tuple(REGISTRY)
