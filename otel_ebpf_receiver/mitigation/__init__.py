"""Closed-loop mitigation: the rule and its rails (``mitigator``), the never-block list (``protected``) and the
settings (``settings``)."""

from .mitigator import AUTO_REASON_PREFIX, Action, Mitigator
from .protected import HardAllowlist
from .settings import MODES, MitigationSettings

__all__ = ["AUTO_REASON_PREFIX", "Action", "HardAllowlist", "MODES", "MitigationSettings", "Mitigator"]
