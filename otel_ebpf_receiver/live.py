"""The compact live view shown when the agent runs in a terminal: state, per-probe rates, busiest things."""

from __future__ import annotations

import os
import time
from typing import Any, TextIO

CLEAR = "\x1b[H\x1b[2J"
TOP_ROWS = 3  # busiest things shown per probe


def live_enabled(mode: str, stream: TextIO) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    return stream.isatty() and os.environ.get("TERM", "dumb") != "dumb"


class LiveView:
    """Renders each window (a window listener of the agent)."""

    def __init__(self, stream: TextIO, agent: Any) -> None:
        self.stream = stream
        self.agent = agent

    def lines(self, result: Any) -> list[str]:
        v = result.verdict
        lines = [
            f"otel-ebpf-receiver  {time.strftime('%H:%M:%S')}  window {result.number}  "
            f"({result.cost_seconds * 1000:.1f} ms)",
            f"state: {v.state}  score {v.score:.2f}  model {v.model_version}"
            + (f"  (this window: {v.raw_state})" if v.raw_state != v.state else ""),
            "",
        ]
        for probe in self.agent.probes:
            reading = result.readings.get(probe.name)
            if reading is None:
                lines.append(f"  {probe.name:<10} {'(read failed)':>12}  [{probe.mode}]")
                continue
            rate = f"{reading.rate:>12,.0f} {reading.rate_unit:<14}" if reading.rate is not None else " " * 27
            lines.append(f"  {probe.name:<10} {rate} [{probe.mode}]")
            for item in reading.top[:TOP_ROWS]:
                lines.append(f"      {item.label[:48]:<48} {item.value:>12,.1f} {item.unit}")
        if self.agent.telemetry.reporting:
            lines.append("")
        for reporting in self.agent.telemetry.reporting:  # one per metric exporter
            status = "FAILING" if reporting.failing else "ok"
            lines.append(f"export: {reporting.target}: {status} ({reporting.failures} failures)")
        return lines

    def render(self, result: Any) -> None:
        self.stream.write(CLEAR + "\n".join(self.lines(result)) + "\n")
        self.stream.flush()
