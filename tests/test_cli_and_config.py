"""Bad input gets one clear line and a non-zero exit, never a traceback; configuration precedence."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from otel_ebpf_receiver import config
from otel_ebpf_receiver.errors import ConfigError

from .helpers import REPO


def cli(*args: str, env: dict | None = None, user: str | None = None, timeout: float = 60):
    cmd = [sys.executable, "-m", "otel_ebpf_receiver", *args]
    if user:
        # numeric ids: Debian's nobody has no group of the same name
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--inh-caps=-all", *cmd]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_EBPF_RECEIVER_")}
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *needles: str, code: int | None = None) -> None:
    assert result.returncode != 0
    if code is not None:
        assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("otel-ebpf-receiver: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("content, needles", [
    ("intervall: 1s\n", ["unknown configuration key 'intervall'", "known keys: interval"]),
    ("interval: fast\n", ["'fast' is not a duration"]),
    ("interval: 0s\n", ["must be greater than zero"]),
    ("probes: [syscalls, nope]\n", ["unknown probe 'nope'", "known probes: syscalls"]),
    ("exporter: kafka\n", ["exporter 'kafka'", "otlp, console, none"]),
    ("probe_settings:\n  syscalls:\n    top_processes: -3\n", ["top_processes", "non-negative integer"]),
    ("probe_settings:\n  syscalls:\n    colour: red\n", ["unknown setting 'colour'"]),
    ("interval: [1\n", ["not valid YAML at line"]),
    ("- just\n- a list\n", ["must contain a mapping"]),
    ("interval: 50ms\n", ["shorter than 100ms"]),
    ("mitigation:\n  attack_states: [syn_flood, unknown]\n", ["cannot include 'unknown'", "novelty"]),
    ("max_series_per_metric: 3\n", ["max_series_per_metric", "at least 10"]),
    ("max_series_per_metric: lots\n", ["max_series_per_metric", "whole number"]),
])
def test_bad_config_file_is_one_line(tmp_path, content, needles):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    assert_one_line_error(cli("run", "--config", str(path)), *needles, code=2)


def test_missing_config_file_is_one_line(tmp_path):
    assert_one_line_error(cli("run", "--config", str(tmp_path / "absent.yaml")), "cannot read config file", code=2)


def test_bad_environment_value_is_one_line():
    assert_one_line_error(cli("run", env={"OTEL_EBPF_RECEIVER_INTERVAL": "-1s"}), "OTEL_EBPF_RECEIVER_INTERVAL", code=2)
    assert_one_line_error(cli("run", env={"OTEL_EBPF_RECEIVER_PROBS": "exec"}),
                          "unknown environment variable OTEL_EBPF_RECEIVER_PROBS", code=2)


@pytest.mark.parametrize("env, needles", [
    ({"OTEL_METRIC_EXPORT_INTERVAL": "abc"}, ["OTEL_METRIC_EXPORT_INTERVAL='abc'", "milliseconds"]),
    ({"OTEL_METRIC_EXPORT_INTERVAL": "10"}, ["OTEL_METRIC_EXPORT_INTERVAL='10'", "at least 100"]),
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, ["OTEL_EXPORTER_OTLP_TIMEOUT='soon'", "seconds"]),
    ({"OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "-1"}, ["OTEL_EXPORTER_OTLP_LOGS_TIMEOUT='-1'"]),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "api-key"}, ["OTEL_EXPORTER_OTLP_HEADERS", "'api-key' is not key=value"]),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector 4317"}, ["OTEL_EXPORTER_OTLP_ENDPOINT='collector 4317'", "URL"]),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
     ["not an http:// or https:// URL", "http://collector:4318"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:99999"}, ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "port"]),
    ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json"}, ["OTEL_EXPORTER_OTLP_METRICS_PROTOCOL='http/json'"]),
    ({"OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"}, ["OTEL_EXPORTER_OTLP_COMPRESSION='brotli'", "gzip"]),
    ({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"}, ["OTEL_EXPORTER_OTLP_CERTIFICATE", "cannot be read"]),
    ({"OTEL_SDK_DISABLED": "yes"}, ["OTEL_SDK_DISABLED='yes'", "true or false"]),
    ({"OTEL_METRICS_EXPORTER": "prometheus"}, ["OTEL_METRICS_EXPORTER='prometheus'", "otlp, console, none"]),
    ({"OTEL_LOGS_EXPORTER": "none,otlp"}, ["OTEL_LOGS_EXPORTER", "none cannot be combined"]),
    ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, ["OTEL_BSP_MAX_QUEUE_SIZE='0'", "positive whole number"]),
    ({"OTEL_BLRP_SCHEDULE_DELAY": "1s"}, ["OTEL_BLRP_SCHEDULE_DELAY='1s'"]),
    ({"OTEL_EBPF_RECEIVER_MAX_SERIES_PER_METRIC": "many"}, ["OTEL_EBPF_RECEIVER_MAX_SERIES_PER_METRIC"]),
])
def test_bad_standard_otel_variable_is_one_line(env, needles):
    """Checked before the privilege check, so the line is the same for root and for anyone else."""
    assert_one_line_error(cli("run", "--probes", "exec", env=env), *needles, code=2)


def test_bad_duration_flag_is_one_line():
    assert_one_line_error(cli("run", "--duration", "forever"), "--duration", "'forever' is not a duration", code=2)


@pytest.mark.bpf
def test_run_for_a_duration_stops_by_itself():
    result = cli("run", "--duration", "2s", "--probes", "exec", "--exporter", "none", "--live", "off", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "stopped: 1 probe(s) detached" in result.stderr and "Traceback" not in result.stderr


def test_yaml_off_is_mitigation_mode_off(tmp_path):
    """YAML 1.1 reads a bare `off` as false; `mode: off` means off, not an error."""
    path = tmp_path / "c.yaml"
    path.write_text("mitigation:\n  mode: off\n")
    assert config.load({"config": str(path)}, environ={}).mitigation["mode"] == "off"


def test_bad_otlp_protocol_is_one_line():
    result = cli("run", "--probes", "exec", env={"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})
    assert_one_line_error(result, "OTEL_EXPORTER_OTLP_PROTOCOL='carrier-pigeon'", "grpc or http/protobuf")


def test_bad_flag_value_is_argparse_usage():
    result = cli("run", "--exporter", "kafka")
    assert result.returncode == 2 and "invalid choice: 'kafka'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.bpf
def test_non_root_run_is_one_line():
    assert_one_line_error(cli("run", user="65534"), "must run as root", code=77)


@pytest.mark.bpf
def test_doctor_fails_for_non_root_and_passes_for_root():
    result = cli("doctor", user="65534")
    assert result.returncode == 1 and "[FAIL] privileges" in result.stdout and "can NOT run" in result.stdout
    result = cli("doctor")
    assert result.returncode == 0, result.stdout
    assert "[ok  ] probe syscalls" in result.stdout and "the agent can run here" in result.stdout
    # What doctor says of the syscall hub's program is what loading it gives on this kernel.
    from otel_ebpf_receiver.probes import syscall_hub
    typed = syscall_hub.unavailable_reason() is None and syscall_hub.btf_type_id() is not None
    assert ("[ok  ] syscall hub program: BTF-typed" in result.stdout) == typed, result.stdout


def test_probes_lists_metrics_features_and_availability():
    out = cli("probes").stdout
    for needle in ("syscalls:", "file_open:", "exec:", "system.process.created (counter, {process})",
                   "syscalls.error_ratio", "status: "):
        assert needle in out


def test_hidden_ebpf_flag_prints_the_programs():
    out = cli("run", "--ebpf", "--probes", "exec").stdout
    assert "TRACEPOINT_PROBE(sched, sched_process_exec)" in out


# -- configuration precedence (unit) --------------------------------------------------------------------------
def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("interval: 3s\nprobes: [exec]\nexporter: console\nlive: off\n")
    env = {"OTEL_EBPF_RECEIVER_CONFIG": str(path), "OTEL_EBPF_RECEIVER_INTERVAL": "2s",
           "OTEL_EBPF_RECEIVER_PROBES": "syscalls,exec"}
    cfg = config.load({"interval": "500ms"}, environ=env)
    assert cfg.interval == 0.5          # flag
    assert cfg.probes == ["syscalls", "exec"]  # env
    assert cfg.exporter == "console"    # file
    assert cfg.live == "off"            # file (YAML false and "off" both mean off)
    assert cfg.model_dir is None        # default
    assert config.load({}, environ={}).interval == 1.0


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("1s", 1), ("10m", 600), ("2h", 7200), ("1d", 86400),
                                           ("1.5s", 1.5), (2, 2.0)])
def test_parse_duration(text, seconds):
    assert config.parse_duration(text, "x") == seconds


def test_parse_duration_rejects_garbage():
    with pytest.raises(ConfigError, match="not a duration"):
        config.parse_duration("soon", "ttl")
