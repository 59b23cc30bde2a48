"""What the agent loses when the Collector is away is counted and said once; stopping never waits on it; each
metric keeps a bounded number of series; the standard OTEL_*_EXPORTER / OTEL_SDK_DISABLED switches are honoured.

Unit tests drive Telemetry with OTLP pointed at a loopback port where nothing listens (connection refused at
once, the gRPC exporter retries until OTEL_EXPORTER_OTLP_TIMEOUT); the stop test runs the real agent CLI."""

from __future__ import annotations

import logging
import signal
import time

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_ebpf_receiver.config import Config
from otel_ebpf_receiver.probes.base import COUNTER, GAUGE, HISTOGRAM, Metric
from otel_ebpf_receiver.telemetry import FLUSH_DEADLINE_SECONDS, MetricSink, Telemetry

from .helpers import data_points, metric_sum
from .otlp_receiver import free_port
from .xdp_support import lab, pin_dir, settings  # noqa: F401, F811 (fixtures)

OVERFLOW = "otel.metric.overflow"


@pytest.fixture
def dead_collector(monkeypatch):
    """OTLP/gRPC to a loopback port where nothing listens; exports fail within 1 s; batches leave every 100 ms."""
    for name in ("OTEL_SDK_DISABLED", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # metrics out of the way: only at shutdown


def wait_for(condition, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.mark.bpf
def test_log_records_lost_to_a_dead_collector_are_counted_said_once_and_exported(dead_collector, caplog):
    from otel_ebpf_receiver.assembly import build_agent

    reader = InMemoryMetricReader()
    agent = build_agent(Config(probes=["exec"], live="off"), classify=False, metric_readers=[reader], say=print)
    telemetry = agent.telemetry
    try:
        with caplog.at_level(logging.WARNING, logger="otel_ebpf_receiver"):
            for number in range(5):
                telemetry.emit_event("test.event", {"n": number})
                time.sleep(0.3)  # separate batches: one failed export each
            assert wait_for(lambda: telemetry.export_health().get(("export_failed", "logs"), 0) == 5), \
                telemetry.export_health()
        agent.step(1.0)
        assert metric_sum(reader, "otel_ebpf_receiver.export.dropped",
                          {"signal": "logs", "reason": "export_failed", "event.name": "test.event"}) == 5
        assert metric_sum(reader, "otel_ebpf_receiver.export.failures", {"signal": "logs"}) >= 1
        failed = [r.getMessage() for r in caplog.records if "log export to" in r.getMessage()]
        assert len(failed) == 1 and "failed" in failed[0] and "otel_ebpf_receiver.export.dropped" in failed[0], failed
    finally:
        agent.close()


def test_full_queue_drops_are_counted_and_every_record_is_accounted_for(dead_collector, monkeypatch):
    monkeypatch.setenv("OTEL_BLRP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", "2")
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "60000")  # the queue only drains when a batch is due
    telemetry = Telemetry(None)
    emitted = 40
    for number in range(emitted):
        telemetry.emit_event("test.event", {"n": number})
    delivery = next(d for d in telemetry.deliveries if d.signal == "logs")
    assert delivery.dropped["queue_full"] > 0
    lost = telemetry.shutdown(deadline_seconds=1.5)
    # Nothing was delivered (nothing listens), so every record emitted is dropped, under one reason or another.
    assert delivery.exported == 0
    assert delivery.dropped_total == emitted, dict(delivery.dropped)
    assert lost == {"logs": emitted}
    # ... and every one under its event name, whatever the reason: an SRE can tell which events were lost.
    by_name = {name: 0 for _, name in delivery.dropped_events}
    for (_, name), count in delivery.dropped_events.items():
        by_name[name] += count
    assert by_name == {"test.event": emitted}, dict(delivery.dropped_events)
    assert delivery.dropped_events[("queue_full", "test.event")] == delivery.dropped["queue_full"]


def test_spans_lost_to_a_dead_collector_are_counted(dead_collector):
    telemetry = Telemetry(None)
    try:
        for number in range(3):
            with telemetry.tracer.start_as_current_span("test.incident", attributes={"n": number}):
                pass
            time.sleep(0.3)
        assert wait_for(lambda: telemetry.export_health().get(("export_failed", "spans"), 0) == 3), \
            telemetry.export_health()
    finally:
        telemetry.shutdown(deadline_seconds=1)


def test_shutdown_keeps_its_deadline_and_counts_what_is_left(dead_collector, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")  # each export would retry for 30 s
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "60000")
    telemetry = Telemetry(None)
    for number in range(3):
        telemetry.emit_event("test.event", {"n": number})
    started = time.monotonic()
    lost = telemetry.shutdown()
    took = time.monotonic() - started
    assert took < FLUSH_DEADLINE_SECONDS + 1, f"shutdown took {took:.1f} s"
    assert lost == {"logs": 3}
    delivery = telemetry.deliveries[0]
    assert delivery.dropped["shutdown"] == 3


# -- OTEL_SDK_DISABLED and OTEL_<SIGNAL>_EXPORTER -------------------------------------------------------------------

@pytest.mark.parametrize("env, metrics, logs, traces", [
    ({}, ["otlp"], ["logs"], ["spans"]),
    ({"OTEL_SDK_DISABLED": "true"}, [], [], []),
    ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_METRICS_EXPORTER": "console"}, [], [], []),
    ({"OTEL_SDK_DISABLED": "false"}, ["otlp"], ["logs"], ["spans"]),
    ({"OTEL_METRICS_EXPORTER": "none"}, [], ["logs"], ["spans"]),
    ({"OTEL_METRICS_EXPORTER": "console", "OTEL_LOGS_EXPORTER": "none", "OTEL_TRACES_EXPORTER": "none"},
     ["console"], [], []),
    ({"OTEL_METRICS_EXPORTER": "otlp,console", "OTEL_TRACES_EXPORTER": "none"}, ["otlp", "console"], ["logs"], []),
])
def test_standard_exporter_switches(dead_collector, monkeypatch, env, metrics, logs, traces):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    telemetry = Telemetry(None)
    try:
        assert [("console" if r.target == "console" else "otlp") for r in telemetry.reporting] == metrics
        assert [d.signal for d in telemetry.deliveries if d.signal == "logs"] == logs
        assert [d.signal for d in telemetry.deliveries if d.signal == "spans"] == traces
    finally:
        telemetry.shutdown(deadline_seconds=0.5)


def test_the_agents_own_exporter_setting_wins_over_the_standard_variables(dead_collector, monkeypatch):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    telemetry = Telemetry("none")
    assert telemetry.reporting == [] and telemetry.deliveries == []
    telemetry.shutdown(deadline_seconds=0.5)


# -- cardinality --------------------------------------------------------------------------------------------------

CAP = 50
STATE = {"system.state": "normal"}


def flood_sink(windows: int = 3, sets_per_window: int = 400):
    """A sink capped at CAP series per metric, fed windows of forged sources (every one new)."""
    reader = InMemoryMetricReader()
    telemetry = Telemetry("none", metric_readers=[reader], cardinality_limit=CAP)
    sink = MetricSink(telemetry.meter, [
        Metric("test.packets", COUNTER, "{packet}", "d", ("source.address",)),
        Metric("test.latency", HISTOGRAM, "s", "d", ("source.address",)),
        Metric("test.top_source.rate", GAUGE, "{packet}/s", "d", ("source.address",))], cardinality_limit=CAP)
    source = iter(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(10**7))
    per_window = []
    for _ in range(windows):
        addresses = [next(source) for _ in range(sets_per_window)]
        for address in addresses:
            sink.add("test.packets", 2, {"source.address": address}, STATE)
            sink.record_histogram("test.latency", {0.001: 1}, {"source.address": address}, STATE)
        sink.set_gauges({"test.top_source.rate": [(1.0, {"source.address": a}) for a in addresses]}, STATE)
        per_window.append(list(data_points(reader)))
    return per_window


def test_a_flood_of_forged_sources_keeps_every_metric_within_the_cap():
    for window, points in enumerate(flood_sink()):
        for name in ("test.packets", "test.latency", "test.top_source.rate"):
            mine = [p for n, p in points if n == name]
            assert len(mine) <= CAP + 1, f"window {window}: {name} has {len(mine)} series"
            assert any(p.attributes.get(OVERFLOW) is True for p in mine), f"window {window}: {name}: no overflow"
        # Nothing is lost to the cap: the counter's total stays exact, the overflow series holds the rest.
        assert sum(p.value for n, p in points if n == "test.packets") == 2 * 400 * (window + 1)


def test_a_windows_adds_in_one_call_total_as_single_adds_and_remember_only_capped_series():
    reader = InMemoryMetricReader()
    telemetry = Telemetry("none", metric_readers=[reader], cardinality_limit=CAP)
    sink = MetricSink(telemetry.meter, [Metric("test.calls", COUNTER, "{call}", "d", ("name", "error.type"))],
                      cardinality_limit=CAP)
    other_state = {"system.state": "overloaded"}
    for window in range(3):
        sink.add_all("test.calls", [(5, {"name": "read"}), (0, {"name": "idle"}), (-1, {"name": "bad"}),
                                    (2, {"name": "close", "error.type": "EBADF"})], STATE)
        # the same series with its attributes in another order: one series, not two
        sink.add("test.calls", 1, {"error.type": "EBADF", "name": "close"}, STATE)
        sink.add_all("test.calls", [(7, {"name": "read"})], other_state)
    points = {(p.attributes.get("name"), p.attributes.get("error.type"), p.attributes["system.state"]): p.value
              for n, p in data_points(reader) if n == "test.calls"}
    assert points == {("read", None, "normal"): 15, ("close", "EBADF", "normal"): 9, ("read", None, "overloaded"): 21}
    # a flood past the cap goes to the overflow series and is not remembered per attribute set
    sink.add_all("test.calls", [(1, {"name": f"n{i}"}) for i in range(1000)], STATE)
    assert len(sink._entries) <= CAP + 2
    total = sum(p.value for n, p in data_points(reader) if n == "test.calls")
    assert total == 15 + 9 + 21 + 1000


def test_the_cap_is_a_setting_with_the_specs_default(tmp_path):
    assert Config().max_series_per_metric == 2000
    path = tmp_path / "c.yaml"
    path.write_text("max_series_per_metric: 500\n")
    from otel_ebpf_receiver import config

    assert config.load({"config": str(path)}, environ={}).max_series_per_metric == 500
    assert config.load({}, environ={"OTEL_EBPF_RECEIVER_MAX_SERIES_PER_METRIC": "300"}).max_series_per_metric == 300


# -- stopping with the Collector away -----------------------------------------------------------------------------

@pytest.mark.bpf
def test_stop_with_an_unreachable_collector_detaches_at_once_and_returns_within_the_deadline():
    from .test_agent_process import agent_stderr, all_program_ids, start_agent, wait_for_programs

    # The exporters' default timeout (10 s per export): before, the stop waited on it several times over.
    proc = start_agent(f"http://127.0.0.1:{free_port()}", extra_env={"OTEL_EXPORTER_OTLP_TIMEOUT": "10"})
    try:
        ids = wait_for_programs(proc)
        assert ids
        time.sleep(1.5)  # at least one window and one failed export
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        detached_after = None
        while proc.poll() is None and time.monotonic() - sent < 30:
            if detached_after is None and not ids & all_program_ids():
                detached_after = time.monotonic() - sent
            time.sleep(0.05)
        stopped_after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err = agent_stderr(proc)
    assert proc.returncode == 0, err
    assert not ids & all_program_ids(), "programs still loaded after the agent stopped"
    # The deadline is a contract (README), not a performance figure: 3 s of flush plus the reads and detaching.
    assert stopped_after < FLUSH_DEADLINE_SECONDS + 4, f"stop took {stopped_after:.1f} s:\n{err}"
    if detached_after is not None:  # seen while the process was still flushing
        assert detached_after < stopped_after
    assert "Traceback" not in err, err


@pytest.mark.bpf
@pytest.mark.netns
def test_a_forged_source_flood_through_the_real_xdp_probe_stays_within_the_cap(lab, settings):
    """hping3 --rand-source into the lab's victim (no default route: its answers die in the lab), bounded to
    5 windows of 1500 packets; with the cap at 20 series per metric, no metric of the agent ever holds more than
    21 series, and the top-source gauge (forged addresses, ten new ones a window) overflows instead of growing."""
    from otel_ebpf_receiver.assembly import build_agent
    from otel_ebpf_receiver.probes.xdp import XdpProbe

    cap = 20
    reader = InMemoryMetricReader()
    agent = build_agent(Config(probes=["xdp"], exporter="none", live="off", max_series_per_metric=cap),
                        probes=[XdpProbe(settings)], classify=False, metric_readers=[reader], say=print)
    try:
        agent.step(1.0)  # baseline
        overflowed = False
        for window in range(5):
            lab.run("client0", "timeout", "20", "hping3", "-q", "--udp", "--rand-source", "-p", "7", "-i", "u100",
                    "-c", "1500", lab.victim.ipv4, check=False, timeout=30)
            agent.step(1.0)
            series: dict[str, int] = {}
            for name, point in data_points(reader):
                series[name] = series.get(name, 0) + 1
                if name == "otel_ebpf_receiver.xdp.top_source.packet_rate" and point.attributes.get(OVERFLOW):
                    overflowed = True
            assert max(series.values()) <= cap + 1, f"window {window}: {series}"
        assert overflowed, "50 forged top sources never reached the overflow series"
    finally:
        agent.close()
    assert lab.xdp_programs() == []
