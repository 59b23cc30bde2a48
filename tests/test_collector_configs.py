"""The Collector distribution (collector-config/builder-config.yaml), its configs, Prometheus rules, the Grafana
dashboard and the deployment files — checked with the real tools (the built otelcol-ebpf, promtool,
systemd-analyze) and end to end with real processes on loopback: a simulated agent sends OTLP through
otelcol-ebpf (local.yaml, gateway.yaml) into Debian's Prometheus (scrape and remote write), Jaeger v2 and the
file exporter.

Not optional: if the Collector or Jaeger cannot be built, these tests fail (they never skip). Cold, the builds take
about 2 (Collector) and 5-6 (Jaeger) minutes on 2 cores; with Go's caches warm, seconds. They do not import
otel_ebpf_receiver: the "agent" here is the OpenTelemetry SDK driven by hand, with the agent's metric names.

Longer than usual because every shipped file outside the agent is checked here with the tool that consumes it, in
the order an operator deploys them; each check is a few lines over shared fixtures (the built Collector, a
simulated agent).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from . import backends
from .backends import COLLECTOR_CONFIG_DIR, OTELCOL_BIN, PROMTOOL_BIN, REPO

pytestmark = pytest.mark.timeout(1500)

DEPLOY = REPO / "deploy"
DASHBOARD = COLLECTOR_CONFIG_DIR / "grafana-dashboard.json"

# The agent's instruments (OpenTelemetry name, kind, unit) and the Prometheus names the Collector's prometheus
# exporter turns them into: every metric the dashboard and the alert rules use (tests/test_dashboard.py checks the
# agent exports each of them under that name). This table pins the translation rules they rely on: dots ->
# underscores; curly-brace units ({call}) dropped; counters get _total; `By` -> _bytes, `s` -> _seconds;
# histograms are _bucket/_sum/_count series after the unit; `1` on a gauge becomes _ratio (so the anomaly score
# must not use unit `1`); `X/s` becomes _per_second.
AGENT_METRICS = [
    ("otel_ebpf_receiver.syscalls", "counter", "{call}", "otel_ebpf_receiver_syscalls_total"),
    ("otel_ebpf_receiver.syscalls.failed", "counter", "{call}", "otel_ebpf_receiver_syscalls_failed_total"),
    ("otel_ebpf_receiver.syscalls.top_process.rate", "gauge", "{call}/s",
     "otel_ebpf_receiver_syscalls_top_process_rate_per_second"),
    ("otel_ebpf_receiver.file_opens", "counter", "{open}", "otel_ebpf_receiver_file_opens_total"),
    ("otel_ebpf_receiver.file_open_failures", "counter", "{open}", "otel_ebpf_receiver_file_open_failures_total"),
    ("otel_ebpf_receiver.file_opens.top_path.rate", "gauge", "{open}/s",
     "otel_ebpf_receiver_file_opens_top_path_rate_per_second"),
    ("otel_ebpf_receiver.exec", "counter", "{exec}", "otel_ebpf_receiver_exec_total"),
    ("system.process.created", "counter", "{process}", "system_process_created_total"),
    ("otel_ebpf_receiver.threads.created", "counter", "{thread}", "otel_ebpf_receiver_threads_created_total"),
    ("otel_ebpf_receiver.process.exits", "counter", "{process}", "otel_ebpf_receiver_process_exits_total"),
    ("otel_ebpf_receiver.tcp.connections.opened", "counter", "{connection}",
     "otel_ebpf_receiver_tcp_connections_opened_total"),
    ("otel_ebpf_receiver.tcp.connections.closed", "counter", "{connection}",
     "otel_ebpf_receiver_tcp_connections_closed_total"),
    ("otel_ebpf_receiver.tcp.connections.failed", "counter", "{connection}",
     "otel_ebpf_receiver_tcp_connections_failed_total"),
    ("otel_ebpf_receiver.tcp.congestion_events", "counter", "{event}",
     "otel_ebpf_receiver_tcp_congestion_events_total"),
    ("otel_ebpf_receiver.tcp.state_transitions", "counter", "{transition}",
     "otel_ebpf_receiver_tcp_state_transitions_total"),
    ("otel_ebpf_receiver.tcp.retransmits", "counter", "{segment}", "otel_ebpf_receiver_tcp_retransmits_total"),
    ("otel_ebpf_receiver.tcp.resets", "counter", "{segment}", "otel_ebpf_receiver_tcp_resets_total"),
    ("otel_ebpf_receiver.http.requests", "counter", "{request}", "otel_ebpf_receiver_http_requests_total"),
    ("otel_ebpf_receiver.http.responses", "counter", "{response}", "otel_ebpf_receiver_http_responses_total"),
    ("otel_ebpf_receiver.http.request.duration", "histogram", "s",
     "otel_ebpf_receiver_http_request_duration_seconds_bucket"),
    ("system.disk.operations", "counter", "{operation}", "system_disk_operations_total"),
    ("system.disk.io", "counter", "By", "system_disk_io_bytes_total"),
    ("system.disk.operation_time", "counter", "s", "system_disk_operation_time_seconds_total"),
    ("otel_ebpf_receiver.disk.request.duration", "histogram", "s",
     "otel_ebpf_receiver_disk_request_duration_seconds_bucket"),
    ("otel_ebpf_receiver.disk.inflight", "gauge", "{request}", "otel_ebpf_receiver_disk_inflight"),
    ("otel_ebpf_receiver.sched.context_switches", "counter", "{switch}",
     "otel_ebpf_receiver_sched_context_switches_total"),
    ("otel_ebpf_receiver.sched.runqueue.latency", "histogram", "s",
     "otel_ebpf_receiver_sched_runqueue_latency_seconds_bucket"),
    # Unit `1` on a gauge: _ratio.
    ("otel_ebpf_receiver.sched.top_thread.runqueue.wait", "gauge", "1",
     "otel_ebpf_receiver_sched_top_thread_runqueue_wait_ratio"),
    ("otel_ebpf_receiver.memory.reclaim.stall_time", "counter", "s",
     "otel_ebpf_receiver_memory_reclaim_stall_time_seconds_total"),
    ("otel_ebpf_receiver.memory.reclaim.stall.duration", "histogram", "s",
     "otel_ebpf_receiver_memory_reclaim_stall_duration_seconds_bucket"),
    ("otel_ebpf_receiver.memory.oom_kills", "counter", "{process}", "otel_ebpf_receiver_memory_oom_kills_total"),
    ("otel_ebpf_receiver.memory.kswapd.wakeups", "counter", "{wakeup}",
     "otel_ebpf_receiver_memory_kswapd_wakeups_total"),
    ("system.network.packet.count", "counter", "{packet}", "system_network_packet_count_total"),
    ("system.network.io", "counter", "By", "system_network_io_bytes_total"),
    ("otel_ebpf_receiver.xdp.packets", "counter", "{packet}", "otel_ebpf_receiver_xdp_packets_total"),
    ("otel_ebpf_receiver.xdp.tcp_flags", "counter", "{packet}", "otel_ebpf_receiver_xdp_tcp_flags_total"),
    ("otel_ebpf_receiver.xdp.verdicts", "counter", "{packet}", "otel_ebpf_receiver_xdp_verdicts_total"),
    ("otel_ebpf_receiver.xdp.dropped_packets", "counter", "{packet}", "otel_ebpf_receiver_xdp_dropped_packets_total"),
    ("otel_ebpf_receiver.xdp.malformed_packets", "counter", "{packet}",
     "otel_ebpf_receiver_xdp_malformed_packets_total"),
    ("otel_ebpf_receiver.xdp.packet.size", "histogram", "By", "otel_ebpf_receiver_xdp_packet_size_bytes_bucket"),
    ("otel_ebpf_receiver.xdp.sources", "gauge", "{source}", "otel_ebpf_receiver_xdp_sources"),
    ("otel_ebpf_receiver.xdp.top_source.packet_rate", "gauge", "{packet}/s",
     "otel_ebpf_receiver_xdp_top_source_packet_rate_per_second"),
    ("otel_ebpf_receiver.xdp.blocklist_entries", "gauge", "{entry}", "otel_ebpf_receiver_xdp_blocklist_entries"),
    ("otel_ebpf_receiver.xdp.allowlist_entries", "gauge", "{entry}", "otel_ebpf_receiver_xdp_allowlist_entries"),
    ("otel_ebpf_receiver.mitigation.auto_blocks", "gauge", "{entry}", "otel_ebpf_receiver_mitigation_auto_blocks"),
    ("otel_ebpf_receiver.mitigation.actions", "counter", "{action}", "otel_ebpf_receiver_mitigation_actions_total"),
    ("otel_ebpf_receiver.system_state", "gauge", "{state}", "otel_ebpf_receiver_system_state"),
    ("otel_ebpf_receiver.system_state.anomaly_score", "gauge", "{score}",
     "otel_ebpf_receiver_system_state_anomaly_score"),
    ("otel_ebpf_receiver.system_state.transitions", "counter", "{transition}",
     "otel_ebpf_receiver_system_state_transitions_total"),
    ("otel_ebpf_receiver.system_state.warnings", "counter", "{warning}",
     "otel_ebpf_receiver_system_state_warnings_total"),
    ("otel_ebpf_receiver.early_warning.cusum", "gauge", "{score}", "otel_ebpf_receiver_early_warning_cusum"),
    ("otel_ebpf_receiver.probe.attached", "gauge", "{probe}", "otel_ebpf_receiver_probe_attached"),
    ("otel_ebpf_receiver.map.update_failures", "counter", "{update}", "otel_ebpf_receiver_map_update_failures_total"),
    ("otel_ebpf_receiver.map.evictions", "counter", "{entry}", "otel_ebpf_receiver_map_evictions_total"),
    ("otel_ebpf_receiver.probe.read_errors", "counter", "{error}", "otel_ebpf_receiver_probe_read_errors_total"),
    ("otel_ebpf_receiver.export.failures", "counter", "{export}", "otel_ebpf_receiver_export_failures_total"),
]
KNOWN_METRICS = {prom for *_, prom in AGENT_METRICS}
# A histogram's other two series, which queries may use too.
KNOWN_METRICS |= {prom[:-len("_bucket")] + suffix for _, kind, _, prom in AGENT_METRICS if kind == "histogram"
                  for suffix in ("_sum", "_count")}

# Per-instrument data-point attributes the simulated agent records (system.state is added to every point).
_ATTRS = {
    "otel_ebpf_receiver.syscalls": {"otel_ebpf_receiver.syscall.name": "read"},
    "otel_ebpf_receiver.memory.reclaim.stall_time": {"otel_ebpf_receiver.memory.reclaim.kind": "cgroup"},
    "otel_ebpf_receiver.syscalls.failed": {"otel_ebpf_receiver.syscall.name": "openat", "error.type": "ENOENT"},
    "otel_ebpf_receiver.file_opens": {"process.executable.name": "cat"},
    "otel_ebpf_receiver.exec": {"process.executable.name": "sh"},
    "otel_ebpf_receiver.system_state.transitions": {"system.state.from": "normal", "system.state.to": "network_flood"},
    "otel_ebpf_receiver.export.failures": {"signal": "metrics"},
    "otel_ebpf_receiver.probe.attached": {"otel_ebpf_receiver.probe.name": "syscalls"},
    "otel_ebpf_receiver.syscalls.top_process.rate": {"process.executable.name": "nginx"},
    "otel_ebpf_receiver.http.request.duration": {"http.request.method": "GET", "process.executable.name": "nginx"},
    "system.disk.io": {"system.device": "vda", "disk.io.direction": "read"},
    "system.network.packet.count": {"system.device": "eth0", "network.io.direction": "receive"},
}
HOST = "testhost"
MACHINE_ID = "0123456789abcdef0123456789abcdef"
STATE = "normal"


# --- building --------------------------------------------------------------------------------------------------

# The build fixtures `otelcol` and `jaeger_bin` are in conftest.py (test_end_to_end.py uses them too).

def run(argv: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, **kw)


def test_manifest_pins_one_release():
    manifest = yaml.safe_load((COLLECTOR_CONFIG_DIR / "builder-config.yaml").read_text())
    assert manifest["dist"]["name"] == "otelcol-ebpf"
    assert manifest["dist"]["output_path"] == "./build/otelcol"
    gomods = [c["gomod"] for kind in ("receivers", "processors", "exporters", "extensions")
              for c in manifest.get(kind, [])]
    versions = {g.split()[1] for g in gomods}
    assert len(versions) == 1, f"all components must be at one Collector release, found {sorted(versions)}"


def test_make_collector_is_cached(otelcol):
    """A second `make collector` has nothing to do, standalone from the root and with -f from elsewhere."""
    assert otelcol == OTELCOL_BIN and OTELCOL_BIN.stat().st_size > 0
    assert run(["make", "-q", "-f", "collector-config/collector.mk", "collector"], cwd=REPO).returncode == 0
    elsewhere = run(["make", "-q", "-f", REPO / "collector-config/collector.mk", "collector"], cwd="/")
    assert elsewhere.returncode == 0, elsewhere.stdout + elsewhere.stderr


def test_distribution_has_the_components(otelcol):
    out = run([otelcol, "components"])
    assert out.returncode == 0, out.stderr
    components = yaml.safe_load(out.stdout)
    names = {kind: {c["name"] for c in components.get(kind) or []}
             for kind in ("receivers", "processors", "exporters", "extensions")}
    assert names["receivers"] == {"otlp"}
    assert {"batch", "memory_limiter"} <= names["processors"]
    assert {"prometheus", "prometheus_remote_write", "otlp_grpc", "otlp_http", "file", "debug"} <= names["exporters"]
    assert {"file_storage", "health_check"} <= names["extensions"]


@pytest.mark.parametrize("config", ["local.yaml", "gateway.yaml"])
def test_collector_config_validates(otelcol, config):
    out = run([otelcol, "validate", f"--config={COLLECTOR_CONFIG_DIR / config}"])
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_config_uses_the_batch_processor(otelcol):
    """Batching lives in the exporters' sending queues (sending_queue::batch), where upstream is moving it: every
    OTLP exporter batches there, and no pipeline uses the batch processor."""
    for config in ("local.yaml", "gateway.yaml", "otelcol-contrib.yaml"):
        out = run([otelcol, "print-config", f"--config={COLLECTOR_CONFIG_DIR / config}"])
        assert out.returncode == 0, out.stderr
        cfg = yaml.safe_load(out.stdout)
        assert not any(p.split("/")[0] == "batch" for p in cfg.get("processors") or {}), config
        for name, exporter in cfg["exporters"].items():
            if name.split("/")[0] in ("otlp_grpc", "otlp_http"):
                assert exporter["sending_queue"]["batch"]["flush_timeout"], f"{config}: {name} does not batch"


# The components the otelcol-contrib snippet may use: modules of the stock otelcol-contrib distribution
# (opentelemetry-collector-releases, distributions/otelcol-contrib/manifest.yaml), as our manifest names them.
STOCK_CONTRIB_MODULES = {
    "go.opentelemetry.io/collector/receiver/otlpreceiver",
    "go.opentelemetry.io/collector/processor/memorylimiterprocessor",
    "github.com/open-telemetry/opentelemetry-collector-contrib/exporter/prometheusexporter",
}
# A stock otelcol-contrib config as the .deb ships it (the parts our build has): the snippet is merged over it.
STOCK_LIKE_CONFIG = """
extensions: {health_check: {}}
receivers:
  otlp:
    protocols: {grpc: {endpoint: 0.0.0.0:4317}, http: {endpoint: 0.0.0.0:4318}}
processors: {batch: {}}
exporters: {debug: {}}
service:
  extensions: [health_check]
  pipelines:
    metrics: {receivers: [otlp], processors: [batch], exporters: [debug]}
    traces: {receivers: [otlp], processors: [batch], exporters: [debug]}
"""


def test_otelcol_contrib_snippet_validates_alone_and_merged(otelcol, tmp_path):
    """collector-config/otelcol-contrib.yaml uses only stock otelcol-contrib components, validates on its own, and
    merged over a user's config as a second --config it adds a pipeline without replacing anything of theirs."""
    snippet = COLLECTOR_CONFIG_DIR / "otelcol-contrib.yaml"
    manifest = yaml.safe_load((COLLECTOR_CONFIG_DIR / "builder-config.yaml").read_text())
    components = yaml.safe_load(run([otelcol, "components"]).stdout)
    module_of = {(kind, c["name"]): c["module"].split()[0] for kind in ("receivers", "processors", "exporters")
                 for c in components.get(kind) or []}
    ours = {g["gomod"].split()[0] for kind in ("receivers", "processors", "exporters") for g in manifest[kind]}
    cfg = yaml.safe_load(snippet.read_text())
    for kind in ("receivers", "processors", "exporters"):
        for name in cfg[kind]:
            module = module_of[(kind, name.split("/")[0])]
            assert module in STOCK_CONTRIB_MODULES and module in ours, f"{kind} {name}: {module} is not stock contrib"
    out = run([otelcol, "validate", f"--config={snippet}"])
    assert out.returncode == 0, out.stdout + out.stderr

    user = tmp_path / "config.yaml"
    user.write_text(STOCK_LIKE_CONFIG)
    out = run([otelcol, "validate", f"--config={user}", f"--config={snippet}"])
    assert out.returncode == 0, out.stdout + out.stderr
    merged = yaml.safe_load(run([otelcol, "print-config", f"--config={user}", f"--config={snippet}"]).stdout)
    assert set(merged["service"]["pipelines"]) == {"metrics", "traces", "metrics/ebpf"}
    assert merged["service"]["pipelines"]["metrics"]["exporters"] == ["debug"], "the user's pipeline was replaced"
    assert merged["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317", "the user's endpoint lost"
    assert merged["exporters"]["prometheus/ebpf"]["endpoint"] == "127.0.0.1:8889"
    local = yaml.safe_load((COLLECTOR_CONFIG_DIR / "local.yaml").read_text())["exporters"]["prometheus"]
    for key in ("resource_constant_labels", "translation_strategy"):  # same Prometheus names as local.yaml
        assert cfg["exporters"]["prometheus/ebpf"][key] == local[key], key


def test_local_config_defaults_are_loopback(otelcol):
    """With no environment, local.yaml listens on 127.0.0.1 only and queues under /var/lib/otelcol-ebpf."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTELCOL_")}
    out = run([otelcol, "print-config", f"--config={COLLECTOR_CONFIG_DIR / 'local.yaml'}"], env=env)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    protocols = cfg["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "127.0.0.1:4317"
    assert protocols["http"]["endpoint"] == "127.0.0.1:4318"
    assert cfg["exporters"]["prometheus"]["endpoint"] == "127.0.0.1:8889"
    assert cfg["exporters"]["otlp_grpc/traces"]["endpoint"] == "127.0.0.1:14317"
    assert cfg["exporters"]["otlp_grpc/logs"]["endpoint"] == "127.0.0.1:14317"
    assert cfg["extensions"]["file_storage"]["directory"] == "/var/lib/otelcol-ebpf/queue"
    for name in ("otlp_grpc/traces", "otlp_grpc/logs"):
        assert cfg["exporters"][name]["sending_queue"]["storage"] == "file_storage"


# --- Prometheus: config, rules, rule unit tests -----------------------------------------------------------------

def test_promtool_check_config():
    out = run([PROMTOOL_BIN, "check", "config", COLLECTOR_CONFIG_DIR / "prometheus.yml"])
    assert out.returncode == 0, out.stdout + out.stderr
    cfg = yaml.safe_load((COLLECTOR_CONFIG_DIR / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "otelcol-ebpf")
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8889"]
    assert cfg["global"]["scrape_interval"] in ("1s", "2s")
    assert cfg["rule_files"] == ["alert-rules.yml"]


def test_promtool_check_rules():
    out = run([PROMTOOL_BIN, "check", "rules", COLLECTOR_CONFIG_DIR / "alert-rules.yml"])
    assert out.returncode == 0, out.stdout + out.stderr
    rules = yaml.safe_load((COLLECTOR_CONFIG_DIR / "alert-rules.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert "otel_ebpf_receiver_system_state_anomaly_score" in alerts["HostInAnomalousState"]
    assert alerts.keys() >= {"HostInAnomalousState", "HostStateUnknown", "XDPBlocklistGrowing",
                             "AgentExportFailures", "CollectorExportFailures"}


def test_alert_rules_unit_tests():
    """promtool's own rule tests: each alert fires on its case, and a stale state does not alert."""
    out = run([PROMTOOL_BIN, "test", "rules", COLLECTOR_CONFIG_DIR / "alert-rules.test.yml"])
    assert out.returncode == 0, out.stdout + out.stderr


# --- Grafana dashboard -------------------------------------------------------------------------------------------

def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def concrete(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, so Prometheus can run it."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "15s")
            .replace("$host", ".*"))


def test_dashboard_is_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    types = {p["type"] for p in panels}
    assert {"state-timeline", "timeseries"} <= types
    for p in panels:
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys()
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
            assert p["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "host"} <= variables


def metric_names(expr: str) -> set[str]:
    """Our metric names in a PromQL expression (label names in selectors and by/on clauses are not metrics)."""
    bare = re.sub(r"\{[^}]*\}", "", expr)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    return set(re.findall(r"\b((?:otel_ebpf_receiver|system)_[a-z0-9_]+)\b", bare))


def test_dashboard_queries_use_known_metrics():
    used = set()
    for title, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{title!r}: {expr} names none of our metrics"
        assert names <= KNOWN_METRICS, f"{title!r}: unknown metric(s) {names - KNOWN_METRICS}"
        used |= names
    for needed in ("otel_ebpf_receiver_syscalls_total", "otel_ebpf_receiver_file_opens_total",
                   "otel_ebpf_receiver_exec_total", "otel_ebpf_receiver_system_state_anomaly_score",
                   "otel_ebpf_receiver_xdp_dropped_packets_total"):
        assert needed in used


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every dashboard query (as recording rules)."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": concrete(expr)} for i, (_, expr) in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = run([PROMTOOL_BIN, "check", "rules", path])
    assert out.returncode == 0, out.stdout + out.stderr


# --- deployment files ------------------------------------------------------------------------------------------

def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_every_deploy_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(COLLECTOR_CONFIG_DIR.glob("*.y*ml"))
    assert len(files) >= 6
    for f in files:
        docs = load_docs(f)
        assert docs, f"{f} is empty"
        if f.parent.name == "kubernetes":
            for d in docs:
                assert {"apiVersion", "kind", "metadata"} <= d.keys(), f"{f}: {d.get('kind')}"


def test_daemonset_runs_on_every_node_with_ebpf_access():
    docs = {d["kind"]: d for d in load_docs(DEPLOY / "kubernetes" / "daemonset.yaml")}
    spec = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostNetwork"] and spec["hostPID"]
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in spec["tolerations"]
    agent = spec["containers"][0]
    caps = set(agent["securityContext"]["capabilities"]["add"])
    assert {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"} <= caps
    assert agent["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert agent["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug", "/sys/fs/bpf", "/lib/modules", "/usr/src",
                 "/etc/otel-ebpf-receiver/models"):
        assert path in mounts, path
    assert "subPath" not in mounts["/etc/otel-ebpf-receiver/models"], "subPath mounts never see ConfigMap updates"
    init_mounts = {m["mountPath"]: m for m in spec["initContainers"][0]["volumeMounts"]}
    assert init_mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    assert spec["initContainers"][0]["securityContext"]["privileged"] is True
    assert agent["args"] == ["run", "--config", "/etc/otel-ebpf-receiver/config.yaml"]
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert docs["ConfigMap"] is not None and "configMap" in models

    # The node's machine id (host.id, service.instance.id) and state directory (blocklist sidecar) from the node.
    volumes = {v["name"]: v for v in spec["volumes"]}
    host_path = {mounts[path]["name"]: path for path in ("/etc/machine-id", "/var/lib/otel-ebpf-receiver")}
    for name, path in host_path.items():
        assert volumes[name]["hostPath"]["path"] == path, name
    assert volumes[mounts["/etc/machine-id"]["name"]]["hostPath"]["type"] == "File"
    assert mounts["/etc/machine-id"].get("readOnly") is True
    assert not mounts["/var/lib/otel-ebpf-receiver"].get("readOnly"), "the blocklist sidecar is written there"

    # Probes on the agent's health endpoint, at the address its configuration gives (loopback, hostNetwork).
    configs = [d for d in load_docs(DEPLOY / "kubernetes" / "daemonset.yaml") if d["kind"] == "ConfigMap"]
    agent_config = yaml.safe_load(next(c for c in configs if "config.yaml" in c.get("data", {}))["data"]["config.yaml"])
    host, port = agent_config["health_addr"].rsplit(":", 1)
    assert host == "127.0.0.1"
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = agent[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == (host, int(port), path), probe

    # The agent points at the gateway Service that gateway-collector.yaml defines.
    env = {e["name"]: e.get("value") for e in agent["env"]}
    gw = {d["kind"]: d for d in load_docs(DEPLOY / "kubernetes" / "gateway-collector.yaml")}
    svc = gw["Service"]
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "otlp-grpc")
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
        f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{grpc_port}")


def test_daemonset_agent_config_loads(tmp_path):
    """The agent accepts the DaemonSet's config.yaml (every key, health_addr included), in a separate interpreter:
    this file drives the agent's tools, never imports them."""
    docs = load_docs(DEPLOY / "kubernetes" / "daemonset.yaml")
    agent_config = next(d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {}))
    path = tmp_path / "config.yaml"
    path.write_text(agent_config["data"]["config.yaml"])
    code = f"from otel_ebpf_receiver import config; print(config.load({{'config': {str(path)!r}}}, {{}}).health_addr)"
    out = run([REPO / ".venv" / "bin" / "python", "-c", code], cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "127.0.0.1:13134", out.stdout + out.stderr


def test_gateway_configmap_is_gateway_yaml():
    gw = {d["kind"]: d for d in load_docs(DEPLOY / "kubernetes" / "gateway-collector.yaml")}
    assert gw["ConfigMap"]["data"]["gateway.yaml"] == (COLLECTOR_CONFIG_DIR / "gateway.yaml").read_text(), \
        "gateway-collector.yaml has an outdated copy of gateway.yaml: run deploy/kubernetes/embed-gateway-config.py"
    container = gw["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    release = yaml.safe_load((COLLECTOR_CONFIG_DIR / "builder-config.yaml").read_text())["receivers"][0]["gomod"]
    assert container["image"].endswith(":" + release.split()[1].lstrip("v")), "gateway image not at the pinned release"


def test_systemd_units_verify(tmp_path, otelcol):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    units = []
    for name in ("otel-ebpf-receiver.service", "otelcol-ebpf.service"):
        text = (DEPLOY / name).read_text()
        assert "/opt/otel-ebpf-receiver" in text
        unit = tmp_path / name
        unit.write_text(text.replace("/opt/otel-ebpf-receiver", str(REPO)))
        units.append(unit)
    agent_unit = (DEPLOY / "otel-ebpf-receiver.service").read_text()
    assert "ExecStartPre=/opt/otel-ebpf-receiver/deploy/host-setup.sh --mounts" in agent_unit
    assert "run --config /etc/otel-ebpf-receiver/config.yaml" in agent_unit
    assert re.search(r"^Restart=on-failure$", agent_unit, re.M) and re.search(r"^KillSignal=SIGTERM$", agent_unit, re.M)
    if not (REPO / ".venv" / "bin" / "otel-ebpf-receiver").exists():
        pytest.skip("the venv has no otel-ebpf-receiver entry point yet (make setup)")
    out = run(["systemd-analyze", "verify", *units])
    assert out.returncode == 0 and "Unknown" not in out.stderr, out.stdout + out.stderr


# --- end to end ------------------------------------------------------------------------------------------------

class SimulatedAgent:
    """The OpenTelemetry SDK, set up like the agent (resource, instruments, system.state on every point),
    exporting OTLP/gRPC to `endpoint` only when flushed."""

    def __init__(self, endpoint: str, host: str = HOST):
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.metrics import Observation
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        # service.instance.id set (here to the machine id): the prometheus exporter makes it the `instance`
        # label and emits target_info only for resources that have one. Left unset, the Python SDK picks a
        # random UUID per process, so every agent restart would start new series.
        resource = Resource({"service.name": "otel-ebpf-receiver", "service.version": "0.1.0", "host.name": host,
                             "host.id": MACHINE_ID, "service.instance.id": MACHINE_ID, "os.type": "linux"})
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint, insecure=True),
                                               export_interval_millis=3_600_000)
        self.meters = MeterProvider(resource=resource, metric_readers=[reader])
        self.logs = LoggerProvider(resource=resource)
        self.logs.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=endpoint, insecure=True)))
        self.traces = TracerProvider(resource=resource)
        self.traces.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))

        meter = self.meters.get_meter("otel_ebpf_receiver", "0.1.0")
        self.round = 0
        self.stopped = False
        self.counters = {}
        self.histograms = {}
        for name, kind, unit, _ in AGENT_METRICS:
            attrs = {**_ATTRS.get(name, {}), "system.state": STATE, "system.state.model": "default"}
            if kind == "counter":
                self.counters[name] = (meter.create_counter(name, unit=unit), attrs)
            elif kind == "histogram":
                self.histograms[name] = (meter.create_histogram(name, unit=unit), attrs)
            else:
                meter.create_observable_gauge(
                    name, [lambda _opts, a=attrs: [Observation(0.25 + self.round, a)]], unit=unit)

    def record_round(self) -> None:
        """One export window: every counter grows, every gauge changes; then export."""
        self.round += 1
        for counter, attrs in self.counters.values():
            counter.add(10 * self.round, attrs)
        for histogram, attrs in self.histograms.values():
            histogram.record(0.003 * self.round, attrs)
        assert self.meters.force_flush(10_000)

    def state_change_and_incident(self) -> None:
        """What the agent emits when the model changes its mind: a log record and an incident span."""
        from opentelemetry._logs import SeverityNumber

        logger = self.logs.get_logger("otel_ebpf_receiver")
        logger.emit(event_name="system.state.change", severity_number=SeverityNumber.WARN, severity_text="WARN",
                    body="system.state normal -> network_flood",
                    attributes={"system.state": "network_flood", "system.state.previous": "normal"})
        tracer = self.traces.get_tracer("otel_ebpf_receiver")
        with tracer.start_as_current_span("system.state.incident", attributes={"system.state": "network_flood"}) as s:
            s.add_event("system.state.transition", {"from": "normal", "to": "network_flood"})
            s.add_event("mitigation.block", {"source.address": "192.0.2.7"})
        assert self.logs.force_flush(10_000) and self.traces.force_flush(10_000)

    def shutdown(self) -> None:
        """Idempotent; call it while the Collector still runs (the SDK exports once more on shutdown)."""
        if not self.stopped:
            self.stopped = True
            for provider in (self.meters, self.logs, self.traces):
                provider.shutdown()


@pytest.fixture
def agent_factory():
    agents = []

    def make(endpoint: str) -> SimulatedAgent:
        agents.append(SimulatedAgent(endpoint))
        return agents[-1]
    yield make
    for agent in agents:
        agent.shutdown()


def assert_state_log_and_incident_span(collector: backends.Collector, min_spans: int = 1) -> None:
    logs = collector.wait_for_records("logs", lambda r: r.get("eventName") == "system.state.change")
    assert logs[0]["resource"]["host.name"] == HOST
    assert logs[0]["attrs"]["system.state"] == "network_flood"
    def incident_spans() -> list[dict]:
        spans = [r for r in collector.records("traces") if r["name"] == "system.state.incident"]
        return spans if len(spans) >= min_spans else []
    spans = backends.wait_until(incident_spans, 30, f"{min_spans} incident span(s) in {collector.file_dir}")
    assert spans[0]["resource"]["host.name"] == HOST
    assert [e["name"] for e in spans[0]["events"]] == ["system.state.transition", "mitigation.block"]


def test_local_pipeline_end_to_end(otelcol, tmp_path, agent_factory):
    """Simulated agent -> otelcol-ebpf (local.yaml) -> Prometheus (scraping, with our rules) and JSON files."""
    with backends.start_collector(tmp_path / "otelcol") as col, \
         backends.start_prometheus(tmp_path / "prometheus", scrape={
             "otelcol-ebpf": [col.prometheus_address], "otelcol-ebpf-self": [col.telemetry_address]}) as prom:
        agent = agent_factory(col.otlp_grpc_endpoint)
        agent.record_round()
        agent.state_change_and_incident()

        # The series, with the data-point attribute and the resource attributes as labels.
        series = prom.wait_for_series(f'otel_ebpf_receiver_syscalls_total{{system_state="{STATE}",host_name="{HOST}"}}')
        labels = series[0]["metric"]
        assert labels["otel_ebpf_receiver_syscall_name"] == "read" and labels["service_name"] == "otel-ebpf-receiver"
        # honor_labels: the exporter's job (= service.name) and instance (= service.instance.id) are kept.
        assert labels["job"] == "otel-ebpf-receiver" and labels["instance"] == MACHINE_ID
        assert labels["otel_scope_name"] == "otel_ebpf_receiver"
        assert "os_type" not in labels, "only the chosen resource attributes become labels"
        assert prom.query(f'target_info{{host_name="{HOST}",os_type="linux"}}'), "the whole resource is in target_info"

        # Every agent metric arrives under the Prometheus name the dashboard and alerts use.
        names = set(prom.api("label/__name__/values"))
        assert KNOWN_METRICS <= names, f"missing: {KNOWN_METRICS - names}"

        # A second window, so rate() has two samples: then every dashboard query returns data.
        first = float(series[0]["value"][1])
        agent.record_round()
        backends.wait_until(lambda: prom.query(f'otel_ebpf_receiver_syscalls_total{{host_name="{HOST}"}} > {first}'),
                            30, "the second window in Prometheus")
        time.sleep(2.5)  # one more scrape, so the 1m windows hold both values
        for title, expr in dashboard_exprs():
            assert prom.query(concrete(expr)), f"dashboard panel {title!r} shows nothing: {concrete(expr)}"

        # Prometheus loaded our alert rules, and the Collector's own metrics are scraped.
        groups = {g["name"] for g in prom.rules()}
        assert {"otel-ebpf-receiver.state", "otel-ebpf-receiver.pipeline"} <= groups

        # Logs and spans: in the file exporter, and queued on disk for the trace backend that is down.
        assert_state_log_and_incident_span(col)
        assert (col.storage_dir / "exporter_otlp_grpc_traces_traces").exists()
        metrics = col.records("metrics")
        assert any(m["name"] == "otel_ebpf_receiver.syscalls" for m in metrics)
        agent.shutdown()


def test_gateway_pipeline_end_to_end(otelcol, tmp_path, agent_factory):
    """Simulated agent -> gateway (gateway.yaml) -> Prometheus by remote write, and OTLP to two trace backends
    and a log backend (here a second otelcol-ebpf with local.yaml, whose file exporter shows what arrived)."""
    rules_only = backends.render_prometheus_config({})
    with backends.start_collector(tmp_path / "backend") as backend, \
         backends.start_prometheus(tmp_path / "prometheus", config=rules_only, remote_write_receiver=True) as prom, \
         backends.start_collector(tmp_path / "gateway", config=COLLECTOR_CONFIG_DIR / "gateway.yaml", env={
             "OTELCOL_REMOTE_WRITE_URL": f"{prom.url}/api/v1/write",
             "OTELCOL_TEMPO_ENDPOINT": f"127.0.0.1:{backend.otlp_grpc_port}",
             "OTELCOL_JAEGER_ENDPOINT": f"127.0.0.1:{backend.otlp_grpc_port}",
             "OTELCOL_LOGS_ENDPOINT": backend.otlp_http_endpoint}) as gateway:
        agent = agent_factory(gateway.otlp_grpc_endpoint)
        agent.record_round()
        agent.state_change_and_incident()

        series = prom.wait_for_series(f'otel_ebpf_receiver_syscalls_total{{system_state="{STATE}",host_name="{HOST}"}}')
        labels = series[0]["metric"]
        assert labels["service_name"] == "otel-ebpf-receiver" and labels["otel_ebpf_receiver_syscall_name"] == "read"
        assert labels["job"] == "otel-ebpf-receiver" and labels["instance"] == MACHINE_ID
        assert labels["otel_scope_name"] == "otel_ebpf_receiver"
        assert "os_type" not in labels
        names = set(prom.api("label/__name__/values"))
        assert KNOWN_METRICS <= names, f"remote write names differ from the scrape path: {KNOWN_METRICS - names}"
        # Tempo and Jaeger each got the incident (both point at the same backend here).
        assert_state_log_and_incident_span(backend, min_spans=2)
        agent.shutdown()


def test_jaeger_config_validates(jaeger_bin):
    out = run([jaeger_bin, "validate", f"--config={COLLECTOR_CONFIG_DIR / 'jaeger.yaml'}"])
    assert out.returncode == 0, out.stdout + out.stderr


def test_incident_span_reaches_jaeger(otelcol, jaeger_bin, tmp_path, agent_factory):
    """Simulated agent -> otelcol-ebpf (local.yaml, persistent queue) -> Jaeger v2, read back by its query API."""
    with backends.start_jaeger(tmp_path / "jaeger") as jaeger, \
         backends.start_collector(tmp_path / "otelcol",
                                  env={"OTELCOL_TRACES_ENDPOINT": jaeger.otlp_grpc_address}) as col:
        agent = agent_factory(col.otlp_grpc_endpoint)
        agent.state_change_and_incident()
        span = jaeger.wait_for_span("otel-ebpf-receiver", "system.state.incident")
        events = [next(f["value"] for f in log["fields"] if f["key"] == "event") for log in span["logs"]]
        assert events == ["system.state.transition", "mitigation.block"]
        tags = {t["key"]: t["value"] for t in span["tags"]}
        assert tags["system.state"] == "network_flood"
        agent.shutdown()
