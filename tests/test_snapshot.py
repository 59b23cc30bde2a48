"""`otel-ebpf-receiver snapshot --json` with the real CLI as root: N windows with the agent `run` builds, one JSON
document on stdout (the agent's lines go to stderr)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from otel_ebpf_receiver.features import feature_names

pytestmark = [pytest.mark.bpf]
PROBES = ["syscalls", "file_open", "exec", "tcp", "sched"]


def snapshot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otel_ebpf_receiver", "snapshot", *args],
                          capture_output=True, text=True, timeout=120)


def test_snapshot_json_has_every_window_with_state_features_and_probe_rates():
    out = snapshot("--json", "--windows", "2", "--interval", "300ms", "--probes", ",".join(PROBES))
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout)
    agent = document["agent"]
    assert [p["name"] for p in agent["probes"]] == PROBES and agent["interval_seconds"] == 0.3
    assert agent["model_version"] != "none"  # the bundled model that fits these probes serves
    assert [w["number"] for w in document["windows"]] == [1, 2]
    for window in document["windows"]:
        assert 0.2 < window["seconds"] < 1.0
        assert set(window["features"]) == set(feature_names(PROBES))
        assert window["model_version"] == agent["model_version"]
        assert window["state"] and window["raw_state"] and window["score"] >= 0
        assert all(set(f) == {"feature", "deviation"} and f["feature"] in window["features"]
                   for f in window["top_features"])
        assert window["top_features_from"] in ("nearest_normal", "assigned_cluster")
        assert set(window["probes"]) == set(PROBES)
        for name, probe in window["probes"].items():
            assert probe["rate"] is not None and probe["rate"] >= 0 and probe["rate_unit"].endswith("/s"), name
            assert all(set(item) == {"label", "value", "unit"} for item in probe["top"]), name
    assert document["windows"][-1]["probes"]["syscalls"]["rate"] > 0  # this very process makes system calls
    assert "probe" not in out.stdout.split("{", 1)[0]  # nothing but JSON on stdout


def test_snapshot_text_and_a_bad_window_count():
    out = snapshot("--windows", "1", "--interval", "200ms", "--probes", "syscalls")
    assert out.returncode == 0, out.stderr
    assert "window 1" in out.stdout and "calls/s" in out.stdout
    bad = snapshot("--windows", "0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("--windows must be at least 1")
