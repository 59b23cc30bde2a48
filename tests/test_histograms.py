"""Kernel log2 histograms into OpenTelemetry: one SDK call per window carries every bucket count, and the exported
HistogramDataPoint holds exactly the kernel's counts and sum — through the in-memory reader and through OTLP."""

from __future__ import annotations

import math
import time

import pytest
from opentelemetry.sdk.metrics import Histogram
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader

from otel_ebpf_receiver.kernel import log2hist
from otel_ebpf_receiver.probes.base import HISTOGRAM, Metric
from otel_ebpf_receiver.telemetry import STATE_ATTRIBUTE, MetricSink, Telemetry

from .helpers import data_points
from .otlp_receiver import OtlpReceiver, attributes

LATENCY = Metric("test.latency", HISTOGRAM, "s", "A kernel latency histogram.", ("disk.io.direction",))
SIZES = Metric("test.sizes", HISTOGRAM, "By", "A kernel size histogram.")
IDLE = {STATE_ATTRIBUTE: "idle", "system.state.model": "m1"}
BUSY = {STATE_ATTRIBUTE: "busy", "system.state.model": "m1"}


def sink_with(reader) -> tuple[Telemetry, MetricSink]:
    telemetry = Telemetry("none", metric_readers=[reader])
    return telemetry, MetricSink(telemetry.meter, [LATENCY, SIZES])


def points(reader, name: str) -> list:
    return [p for n, p in data_points(reader) if n == name]


def us(slot: int) -> float:
    return log2hist.upper_bound(slot, "s")


def test_bounds_are_the_kernel_slots_in_the_metric_unit():
    bounds = log2hist.boundaries("s")
    assert len(bounds) == log2hist.LATENCY_SLOTS - 1  # + the overflow bucket = one OTel bucket per kernel slot
    assert bounds[0] == pytest.approx(1e-6) and bounds[10] == pytest.approx(1024e-6)
    assert log2hist.upper_bound(log2hist.LATENCY_SLOTS - 1, "s") == math.inf
    assert log2hist.boundaries("By")[:4] == (1.0, 2.0, 4.0, 8.0)


@pytest.mark.parametrize("counts, q, expected", [
    ([0, 0, 0, 0, 0], 0.99, 0.0),               # empty window
    ([0, 10, 0, 0, 0], 0.5, 1.0),               # slot 1 holds 0..1 us: the median sits in the middle of [0, 2)
    ([0, 0, 0, 100, 0], 0.5, 6.0),              # slot 3 is [4, 8): half-way
    ([0, 0, 90, 10, 0], 0.99, 7.6),             # p99 is 9/10 through slot 3
    ([0, 0, 0, 0, 0, 5], 1.0, 16.0),            # last slot is the overflow: its lower edge
])
def test_quantile_interpolates_inside_a_log2_slot(counts, q, expected):
    assert log2hist.quantile(counts, q) == pytest.approx(expected)


def test_bucket_counts_sum_and_count_are_exact():
    reader = InMemoryMetricReader()
    telemetry, sink = sink_with(reader)
    sink.record_histogram("test.latency", {us(3): 5, us(10): 7, math.inf: 1}, {"disk.io.direction": "read"}, IDLE,
                          total=0.123)
    [point] = points(reader, "test.latency")
    assert point.explicit_bounds == pytest.approx(log2hist.boundaries("s"))
    expected = [0] * log2hist.LATENCY_SLOTS
    expected[3], expected[10], expected[-1] = 5, 7, 1
    assert list(point.bucket_counts) == expected  # bucket i is kernel slot i
    assert point.count == 13
    assert point.sum == pytest.approx(0.123)
    assert point.min == pytest.approx(us(2))  # lower edge of the lowest non-empty bucket
    assert point.max >= log2hist.boundaries("s")[-1]
    assert dict(point.attributes) == {"disk.io.direction": "read", **IDLE}
    telemetry.shutdown()


def test_two_windows_accumulate_and_states_stay_apart():
    reader = InMemoryMetricReader()
    telemetry, sink = sink_with(reader)
    attrs = {"disk.io.direction": "write"}
    sink.record_histogram("test.latency", {us(4): 100}, attrs, IDLE, total=1.0)
    first = points(reader, "test.latency")[0]
    sink.record_histogram("test.latency", {us(4): 50, us(6): 25}, attrs, IDLE, total=0.5)
    sink.record_histogram("test.latency", {us(8): 3}, attrs, BUSY, total=0.01)
    by_state = {p.attributes[STATE_ATTRIBUTE]: p for p in points(reader, "test.latency")}
    idle, busy = by_state["idle"], by_state["busy"]
    assert idle.bucket_counts[4] == 150 and idle.bucket_counts[6] == 25 and idle.count == 175
    assert idle.sum == pytest.approx(1.5)
    assert idle.start_time_unix_nano == first.start_time_unix_nano  # cumulative: same series, same start
    assert busy.count == 3 and busy.bucket_counts[8] == 3 and busy.sum == pytest.approx(0.01)
    assert busy.attributes["disk.io.direction"] == "write" and busy.attributes["system.state.model"] == "m1"
    telemetry.shutdown()


def test_delta_temporality_reports_each_window_alone():
    reader = InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    telemetry, sink = sink_with(reader)
    sink.record_histogram("test.latency", {us(5): 10}, {}, IDLE, total=0.2)
    assert points(reader, "test.latency")[0].count == 10
    sink.record_histogram("test.latency", {us(5): 4}, {}, IDLE, total=0.1)
    [second] = points(reader, "test.latency")
    assert second.count == 4 and second.sum == pytest.approx(0.1)
    telemetry.shutdown()


def test_size_histograms_and_missing_sum_fall_back_to_midpoints():
    reader = InMemoryMetricReader()
    telemetry, sink = sink_with(reader)
    sink.record_histogram("test.sizes", {64.0: 2, 1024.0: 1}, {}, IDLE)  # no total: estimated
    [point] = points(reader, "test.sizes")
    assert point.bucket_counts[6] == 2 and point.bucket_counts[10] == 1 and point.count == 3
    assert point.sum == pytest.approx(2 * 48 + 768)
    telemetry.shutdown()


def test_ordinary_record_calls_still_work_on_the_same_instrument():
    reader = InMemoryMetricReader()
    telemetry, sink = sink_with(reader)
    instrument, _ = sink._histograms["test.latency"]
    instrument.record(3e-6, IDLE)  # (2, 4] us
    sink.record_histogram("test.latency", {us(2): 1}, {}, IDLE, total=3e-6)
    [point] = points(reader, "test.latency")
    assert point.bucket_counts[2] == 2 and point.sum == pytest.approx(6e-6)
    telemetry.shutdown()


def test_a_window_of_a_million_events_costs_one_call():
    reader = InMemoryMetricReader()
    telemetry, sink = sink_with(reader)
    buckets = {us(s): 40_000 for s in range(1, 26)}
    started = time.perf_counter()
    for _ in range(200):
        sink.record_histogram("test.latency", buckets, {"disk.io.direction": "read"}, IDLE, total=1.0)
    per_window = (time.perf_counter() - started) / 200
    assert per_window < 0.001, f"{per_window * 1e6:.0f} us per histogram window"
    [point] = points(reader, "test.latency")
    assert point.count == 200 * 25 * 40_000
    telemetry.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_export_carries_the_exact_buckets(protocol, monkeypatch):
    with OtlpReceiver(protocol) as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
        telemetry = Telemetry("otlp")
        sink = MetricSink(telemetry.meter, [LATENCY])
        sink.record_histogram("test.latency", {us(3): 5, us(10): 7}, {"disk.io.direction": "read"}, IDLE, total=0.25)
        sink.record_histogram("test.latency", {us(3): 1}, {"disk.io.direction": "read"}, IDLE, total=0.01)
        telemetry.meter_provider.force_flush()
        telemetry.shutdown()
        found = [p for _, n, p in receiver.points() if n == "test.latency"]
        assert found, "no histogram arrived"
        point = found[-1]
        assert point.count == 13 and point.sum == pytest.approx(0.26)
        assert point.bucket_counts[3] == 6 and point.bucket_counts[10] == 7
        assert list(point.explicit_bounds) == pytest.approx(log2hist.boundaries("s"))
        assert attributes(point)[STATE_ATTRIBUTE] == "idle"
