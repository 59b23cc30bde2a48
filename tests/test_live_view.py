"""The terminal live view, rendered from a known window: every probe row shows its rate in its own unit, the top
rows show theirs, a probe whose read failed says so, and the state line shows the model's raw answer when the
debounced state differs."""

from __future__ import annotations

import io
from types import SimpleNamespace

from otel_ebpf_receiver.agent import WindowResult
from otel_ebpf_receiver.features import FeatureWindow
from otel_ebpf_receiver.live import CLEAR, LiveView
from otel_ebpf_receiver.model.runtime import Verdict
from otel_ebpf_receiver.probes.base import Reading, TopItem


def probe(name: str, mode: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, mode=mode)


def test_live_view_renders_rates_and_top_rows_with_their_units():
    agent = SimpleNamespace(probes=[probe("syscalls", "raw_tracepoint"), probe("sched", "tracepoint"),
                                    probe("tcp", "tracepoint"), probe("http", "tracepoint (read, write)")],
                            telemetry=SimpleNamespace(reporting=[]))
    readings = {
        "syscalls": Reading(rate=12345.4, rate_unit="calls/s", top=[TopItem("nginx (pid 42)", 9000.0, "calls/s")]),
        "sched": Reading(rate=1500.0, rate_unit="switches/s",
                         top=[TopItem("stress (tid 7)", 75.0, "% of the window waiting"),
                              TopItem("a (tid 1)", 3.0, "% of the window waiting"),
                              TopItem("b (tid 2)", 2.0, "% of the window waiting"),
                              TopItem("c (tid 3)", 1.0, "% of the window waiting")]),
        "tcp": Reading(rate=3.0, rate_unit="connections/s", top=[TopItem("retransmitted", 0.5, "segments/s")]),
        # http: its read failed this window (absent from the readings)
    }
    verdict = Verdict(0, "normal", 0.42, 1.0, "m-1", [], "normal", "exec_storm")
    result = WindowResult(7, FeatureWindow(0.0, {}), verdict, readings, 1.0, cost_seconds=0.0123)
    stream = io.StringIO()
    LiveView(stream, agent).render(result)
    out = stream.getvalue()
    assert out.startswith(CLEAR)
    lines = out[len(CLEAR):].splitlines()
    assert "window 7" in lines[0] and "(12.3 ms)" in lines[0]
    assert lines[1] == "state: normal  score 0.42  model m-1  (this window: exec_storm)"
    rows = {line.split()[0]: line for line in lines[3:] if line.startswith("  ") and not line.startswith("      ")}
    assert rows["syscalls"].split()[1:4] == ["12,345", "calls/s", "[raw_tracepoint]"]
    assert rows["sched"].split()[1:3] == ["1,500", "switches/s"]
    assert rows["tcp"].split()[1:3] == ["3", "connections/s"]
    assert "(read failed)" in rows["http"]
    top = [line.strip() for line in lines if line.startswith("      ")]
    assert top[0].startswith("nginx (pid 42)") and top[0].endswith("9,000.0 calls/s")
    assert top[1].startswith("stress (tid 7)") and top[1].endswith("75.0 % of the window waiting")
    assert sum(1 for line in top if "(tid" in line) == 3  # the busiest three of sched's four
    assert top[-1].endswith("0.5 segments/s")


def test_live_view_says_when_export_fails():
    """One line per metric exporter (telemetry.reporting is a list)."""
    agent = SimpleNamespace(probes=[], telemetry=SimpleNamespace(
        reporting=[SimpleNamespace(target="127.0.0.1:4317 (grpc)", failing=True, failures=3)]))
    result = WindowResult(1, FeatureWindow(0.0, {}), Verdict.unknown(), {}, 1.0)
    lines = LiveView(io.StringIO(), agent).lines(result)
    assert lines[1] == "state: unknown  score 0.00  model none"
    assert lines[-1] == "export: 127.0.0.1:4317 (grpc): FAILING (3 failures)"
