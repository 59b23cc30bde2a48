"""The Grafana dashboard and the alert rules against what the agent really exports: every query names metrics the
agent declares (probe registry, state classifier, mitigator, self-metrics), under the Prometheus names the
Collector's prometheus exporter gives them (collector-config/README.md; tests/test_collector_configs.py checks the
same rules with the real Collector and runs every query against Prometheus). Every probe has a panel, every
histogram a heatmap; the state timeline and annotations come from the state metrics; incidents link to traces.
No root, no network: the files and the declarations only."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from otel_ebpf_receiver.mitigation.mitigator import Mitigator
from otel_ebpf_receiver.probes import REGISTRY
from otel_ebpf_receiver.probes.base import COUNTER, GAUGE, HISTOGRAM, Metric
from otel_ebpf_receiver.state.classifier import StateClassifier
from otel_ebpf_receiver.telemetry import SELF_METRICS

from .backends import COLLECTOR_CONFIG_DIR
from .test_collector_configs import AGENT_METRICS

DASHBOARD = json.loads((COLLECTOR_CONFIG_DIR / "grafana-dashboard.json").read_text())
RULES = yaml.safe_load((COLLECTOR_CONFIG_DIR / "alert-rules.yml").read_text())
# Units the exporter spells out (the Collector's prometheus translator); a unit in braces is dropped.
UNIT_WORDS = {"By": "bytes", "s": "seconds", "ms": "milliseconds", "1": "ratio"}
PER_UNIT_WORDS = {"s": "second", "m": "minute", "h": "hour"}


def prometheus_base(metric: Metric) -> str:
    """The series name before _total/_bucket: dots to underscores, then the unit as a suffix
    (translation_strategy UnderscoreEscapingWithSuffixes)."""
    name = re.sub(r"[^a-zA-Z0-9_:]", "_", metric.name)
    main, _, per = metric.unit.partition("/")
    words = []
    main = re.sub(r"\{[^}]*\}", "", main)
    if main and not (main == "1" and metric.kind != GAUGE):  # `1` means "ratio" on gauges only
        words.append(UNIT_WORDS.get(main, main))
    per = re.sub(r"\{[^}]*\}", "", per)
    if per:
        words.append(f"per_{PER_UNIT_WORDS.get(per, per)}")
    for word in words:
        if not name.endswith(f"_{word}"):
            name += f"_{word}"
    return name


def prometheus_names(metric: Metric) -> set[str]:
    base = prometheus_base(metric)
    if metric.kind == COUNTER:
        return {f"{base}_total"}
    if metric.kind == HISTOGRAM:
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


def declared_metrics() -> list[Metric]:
    probes = [m for cls in REGISTRY.values() for m in cls.metrics]
    return probes + list(StateClassifier.metrics) + list(Mitigator.metrics) + list(SELF_METRICS)


EXPORTED = {name for metric in declared_metrics() for name in prometheus_names(metric)}


def metric_names(expr: str) -> set[str]:
    """Our metric names in a PromQL expression (label names in selectors and by/on clauses are not metrics)."""
    bare = re.sub(r"\{[^}]*\}", "", expr)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    return set(re.findall(r"\b((?:otel_ebpf_receiver|system)_[a-z0-9_]+)\b", bare))


def panels() -> list[dict]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def panel_metrics(panel: dict) -> set[str]:
    return {n for t in panel["targets"] for n in metric_names(t["expr"])}


def test_the_naming_rules_here_are_the_ones_the_collector_applies():
    """The conversion above agrees with the table tests/test_collector_configs.py checks against the real
    Collector, for every metric there."""
    kinds = {"counter": COUNTER, "gauge": GAUGE, "histogram": HISTOGRAM}
    for name, kind, unit, prometheus in AGENT_METRICS:
        assert prometheus in prometheus_names(Metric(name, kinds[kind], unit, "")), name


def test_the_collector_table_matches_the_agents_declarations():
    """Each metric the Collector test simulates is declared by the agent with that kind and unit."""
    declared = {m.name: m for m in declared_metrics()}
    for name, kind, unit, _ in AGENT_METRICS:
        assert name in declared, f"{name} is not exported by the agent"
        assert (declared[name].kind, declared[name].unit) == (kind, unit), name


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p["title"])
def test_every_panel_queries_metrics_the_agent_exports(panel):
    names = panel_metrics(panel)
    assert names, f"{panel['title']!r} names none of our metrics"
    assert names <= EXPORTED, f"{panel['title']!r}: not exported by the agent: {sorted(names - EXPORTED)}"


def test_every_dashboard_metric_is_in_the_collector_end_to_end_table():
    """test_collector_configs.py runs every panel against Prometheus fed by a simulated agent: it must simulate
    every metric the dashboard uses."""
    simulated = {prom for *_, prom in AGENT_METRICS}
    simulated |= {p[:-len("_bucket")] + s for p in simulated if p.endswith("_bucket") for s in ("_sum", "_count")}
    used = set().union(*(panel_metrics(p) for p in panels()))
    assert used <= simulated, sorted(used - simulated)


@pytest.mark.parametrize("probe", sorted(REGISTRY))
def test_every_probe_has_a_panel(probe):
    exported = {n for m in REGISTRY[probe].metrics for n in prometheus_names(m)}
    titles = [p["title"] for p in panels() if panel_metrics(p) & exported]
    assert titles, f"no panel shows a metric of probe {probe}"


@pytest.mark.parametrize("metric", [m for m in declared_metrics() if m.kind == HISTOGRAM], ids=lambda m: m.name)
def test_every_histogram_has_a_latency_heatmap(metric):
    bucket = f"{prometheus_base(metric)}_bucket"
    heatmaps = [p for p in panels() if p["type"] == "heatmap" and bucket in panel_metrics(p)]
    assert heatmaps, f"no heatmap of {bucket}"
    for panel in heatmaps:
        target = panel["targets"][0]
        assert target["format"] == "heatmap" and "by (le)" in target["expr"], panel["title"]
        assert panel["options"]["calculate"] is False  # the kernel's buckets, not Grafana's re-bucketing


def test_state_timeline_reads_the_state_gauge_and_links_to_incident_traces():
    timelines = [p for p in panels() if p["type"] == "state-timeline"]
    assert timelines and all(panel_metrics(p) == {"otel_ebpf_receiver_system_state"} for p in timelines)
    for panel in timelines:
        links = panel["fieldConfig"]["defaults"]["links"]
        assert any("system.state.incident" in link["url"] and "service=otel-ebpf-receiver" in link["url"]
                   for link in links), "no Jaeger search link to the incident spans"
        assert any("system.state.incident" in link["url"] and "traceql" in link["url"] for link in links), \
            "no Tempo (TraceQL) link to the incident spans"
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert {"datasource", "host", "jaeger_url", "tempo"} <= variables


def test_state_changes_are_annotated():
    queries = [a for a in DASHBOARD["annotations"]["list"] if "expr" in a]
    assert any(metric_names(a["expr"]) == {"otel_ebpf_receiver_system_state_transitions_total"}
               and "system_state_to" in a["titleFormat"] for a in queries)
    for annotation in queries:
        assert metric_names(annotation["expr"]) <= EXPORTED


def test_panels_do_not_overlap():
    taken: dict[tuple[int, int], str] = {}
    for panel in DASHBOARD["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def alert_exprs() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in RULES["groups"] for r in g["rules"]}


def test_alert_rules_use_metrics_the_agent_exports():
    for alert, expr in alert_exprs().items():
        assert metric_names(expr) <= EXPORTED, f"{alert}: {sorted(metric_names(expr) - EXPORTED)}"


def test_state_alerts_read_the_state_gauge_and_absence_an_always_present_series():
    alerts = alert_exprs()
    for name in ("HostInAnomalousState", "HostStateUnknown"):
        assert "otel_ebpf_receiver_system_state" in metric_names(alerts[name]), name
        assert "otel_ebpf_receiver_syscalls_total" not in alerts[name], f"{name} still infers the state from syscalls"
    always_present = {"otel_ebpf_receiver_system_state", "otel_ebpf_receiver_probe_attached"}
    assert metric_names(alerts["HostStoppedReporting"]) <= always_present
