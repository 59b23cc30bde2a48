"""Glue between the agent and the state model runtime (model.py): loading, hot swap, debounce, events."""

from __future__ import annotations

from typing import Any, Callable

from .config import Config


def build_classifier(config: Config, probe_names: list[str], telemetry: Any, say: Callable[[str], None]) -> Any:
    from .agent import NoModel

    say("no state model runtime yet: system.state is 'unknown'")
    return NoModel()
