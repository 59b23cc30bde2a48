"""The compact live view shown when the agent runs in a terminal: state, per-probe rates, busiest processes."""

from __future__ import annotations

import os
import time
from typing import Any, TextIO

CLEAR = "\x1b[H\x1b[2J"


def live_enabled(mode: str, stream: TextIO) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    return stream.isatty() and os.environ.get("TERM", "dumb") != "dumb"


class LiveView:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def render(self, agent: Any) -> None:
        v = agent.verdict
        lines = [
            f"otel-ebpf-receiver  {time.strftime('%H:%M:%S')}  window {agent.windows}  "
            f"({agent.last_window_seconds * 1000:.1f} ms)",
            f"state: {v.state}  score {v.score:.2f}  model {v.model_version}",
            "",
        ]
        for probe in agent.probes:
            rate = getattr(probe, "last_rate", None)
            rate_text = f"{rate:>12,.0f}/s" if rate is not None else " " * 14
            lines.append(f"  {probe.name:<10} {rate_text}  [{probe.mode}]")
            for item in getattr(probe, "last_top", [])[:3]:
                if len(item) == 3:  # (command, pid, rate)
                    lines.append(f"      {item[0]:<16} pid {item[1]:<8} {item[2]:>10,.0f}/s")
                else:  # (label, rate)
                    lines.append(f"      {str(item[0])[:48]:<48} {item[1]:>8,.0f}/s")
        reporting = agent.telemetry.reporting
        if reporting is not None:
            status = "FAILING" if reporting.failing else "ok"
            lines.append(f"\nexport: {reporting.target}: {status} ({reporting.failures} failures)")
        self.stream.write(CLEAR + "\n".join(lines) + "\n")
        self.stream.flush()
