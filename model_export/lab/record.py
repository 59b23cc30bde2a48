"""`record`: run the probes (no export) and write labelled feature windows, the rows `train` learns from.

The same probes, the same Agent.step and the same feature schema as `otel-ebpf-receiver run`, so what is
recorded is exactly what the model will be shown in production.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from otel_ebpf_receiver.agent import Agent, check_privileges, load_probes
from otel_ebpf_receiver.config import Config
from otel_ebpf_receiver.features import feature_names
from otel_ebpf_receiver.telemetry import Telemetry

from .windows import WindowWriter


class Recorder:
    """Probes loaded once; windows recorded under whatever label is current (the lab switches labels as it
    drives scenarios). ``label=None`` pauses writing (e.g. while a scenario ramps up or winds down)."""

    def __init__(self, probes: Sequence[str] = (), interval: float = 1.0, settings: dict | None = None,
                 say: Callable[[str], None] = print) -> None:
        check_privileges()
        self.probes = load_probes(list(probes), settings or {}, say)
        self.names = feature_names([p.name for p in self.probes])
        self.agent = Agent(Config(interval=interval), Telemetry("none"), self.probes)
        self.label: str | None = None
        self.windows: list[tuple[float, str, dict[str, float]]] = []
        self.agent.window_listeners.append(self._on_window)
        self._thread: threading.Thread | None = None

    def _on_window(self, window: Any, verdict: Any) -> None:
        if self.label is not None:
            self.windows.append((window.timestamp, self.label, dict(window.values)))

    def start(self) -> "Recorder":
        self._thread = threading.Thread(target=self.agent.run, name="recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.agent.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.agent.close()

    @contextmanager
    def labelled(self, label: str | None, settle_windows: int = 2) -> Iterator[None]:
        """Record under ``label`` for the duration of the block, skipping the first windows (ramp-up)."""
        self.label = None
        time.sleep(settle_windows * self.agent.config.interval)
        self.label = label
        try:
            yield
        finally:
            self.label = None

    def save(self, path: str, append: bool = False) -> int:
        with WindowWriter(path, self.names, append=append) as writer:
            for timestamp, label, values in self.windows:
                writer.write(timestamp, label, values)
        return len(self.windows)


def record(label: str, duration: float, output: str, probes: Sequence[str] = (), interval: float = 1.0,
           progress: bool = True, say: Callable[[str], None] = print) -> int:
    """Record ``duration`` seconds of windows labelled ``label`` into ``output`` (appending). Returns rows."""
    from tqdm import tqdm

    recorder = Recorder(probes, interval, say=say)
    total = max(1, int(duration / interval))
    recorder.label = label
    recorder.start()
    try:
        with tqdm(total=total, desc=f"recording {label}", unit="window", disable=not progress) as bar:
            while len(recorder.windows) < total:
                before = len(recorder.windows)
                time.sleep(interval / 4)
                bar.update(len(recorder.windows) - before)
    finally:
        recorder.stop()
    return recorder.save(output, append=True)
