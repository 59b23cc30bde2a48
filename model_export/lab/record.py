"""Recording: run the probes (no export, no model) and write labelled feature windows, the rows `train` learns from.

The agent comes from :func:`otel_ebpf_receiver.assembly.build_agent` like `otel-ebpf-receiver run`'s: the same
probes, the same Agent.step and the same feature schema, so what is recorded is exactly what the model will be
shown in production. :func:`record` is ``otel-ebpf-lab record-host`` (one label, this host as it is); the lab's
scenario plans record through :class:`Recorder` too (:func:`model_export.lab.scenarios.record_plan`).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from otel_ebpf_receiver.agent import WindowResult
from otel_ebpf_receiver.assembly import build_agent
from otel_ebpf_receiver.config import Config
from otel_ebpf_receiver.features import feature_names

from ..windows import WindowWriter


class Recorder:
    """Probes loaded once; windows recorded under whatever label is current (the lab switches labels as it
    drives scenarios). ``label=None`` pauses writing (e.g. while a scenario ramps up or winds down)."""

    def __init__(self, probes: Sequence[str] = (), interval: float = 1.0, settings: dict | None = None,
                 say: Callable[[str], None] = print) -> None:
        config = Config(interval=interval, probes=list(probes), exporter="none", probe_settings=settings or {})
        self.agent = build_agent(config, say=say, classify=False, live=False)
        self.probes = self.agent.probes
        try:
            self.names = feature_names([p.name for p in self.probes])
        except BaseException:
            self.agent.close()
            raise
        self.label: str | None = None
        self.windows: list[tuple[float, str, dict[str, float]]] = []
        self.agent.window_listeners.append(self._on_window)
        self._thread: threading.Thread | None = None

    def _on_window(self, result: WindowResult) -> None:
        if self.label is not None:
            self.windows.append((result.window.timestamp, self.label, dict(result.window.values)))

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
