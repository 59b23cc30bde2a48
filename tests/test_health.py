"""--health-addr: /healthz turns 503 when windows stop coming, /readyz says why it is not ready; the address is
checked at configuration time; and the real CLI (as root) serves both while it runs and stops serving at exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from otel_ebpf_receiver.config import ENV_HEALTH_ADDR, load
from otel_ebpf_receiver.errors import ConfigError
from otel_ebpf_receiver.health import STALE_INTERVALS, HealthServer, HealthState, parse_address

from .helpers import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_agent(model: str = "m-1", probes=("syscalls",)) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(interval=1.0), windows=0, window_listeners=[],
                           probes=[SimpleNamespace(name=n) for n in probes],
                           classifier=SimpleNamespace(version=model))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_healthz_follows_the_age_of_the_last_window():
    clock = Clock()
    state = HealthState(fake_agent(), clock)
    clock.now += 2.0  # no window yet, younger than three intervals: alive
    code, body = state.healthz()
    assert code == 200 and body["last_window_age_seconds"] is None and body["seconds_since_start"] == 2.0
    state.on_window(SimpleNamespace(number=1))
    clock.now += STALE_INTERVALS * 1.0
    assert state.healthz()[0] == 200
    clock.now += 0.5
    code, body = state.healthz()
    assert code == 503 and body == {"status": "stale", "last_window_age_seconds": 3.5, "max_age_seconds": 3.0,
                                    "windows": 0}
    state.on_window(SimpleNamespace(number=2))
    assert state.healthz()[0] == 200


def test_readyz_needs_probes_and_a_serving_model():
    assert HealthState(fake_agent()).readyz() == (200, {"status": "ready", "probes": ["syscalls"], "model": "m-1"})
    code, body = HealthState(fake_agent(model="none", probes=())).readyz()
    assert code == 503 and body["status"] == "not ready"
    assert body["reasons"][0] == "no probe is attached" and body["reasons"][1].startswith("no state model")


def test_server_answers_over_http_and_refuses_a_taken_port():
    state = HealthState(fake_agent(model="none"))
    server = HealthServer("127.0.0.1", free_port(), state)
    try:
        assert get(f"http://{server.address}/healthz")[0] == 200
        assert get(f"http://{server.address}/readyz")[0] == 503
        assert get(f"http://{server.address}/metrics")[0] == 404
        host, port = server.address.split(":")
        with pytest.raises(Exception) as taken:
            HealthServer(host, int(port), state)
        assert str(taken.value).startswith(f"cannot serve health checks on {server.address}")
    finally:
        server.close()


@pytest.mark.parametrize("value", ["13134", "localhost:", ":80", "host:http", "127.0.0.1:70000"])
def test_bad_addresses_are_one_line_errors(value):
    with pytest.raises(ConfigError, match="must be HOST:PORT"):
        load({"health_addr": value}, environ={})


def test_address_from_the_environment_and_ipv6():
    assert load({}, environ={ENV_HEALTH_ADDR: "127.0.0.1:13134"}).health_addr == "127.0.0.1:13134"
    assert load({}, environ={}).health_addr == ""
    assert parse_address("[::1]:13134", "test") == ("::1", 13134)


@pytest.mark.bpf
def test_run_serves_health_while_it_runs():
    """The real CLI: /readyz is 200 with the attached probes and the bundled model, /healthz 200 while windows
    come; after SIGTERM the agent exits cleanly and nothing listens any more."""
    if os.geteuid() != 0:
        pytest.skip("needs root to attach probes")
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "otel_ebpf_receiver", "run", "--health-addr", address,
                             "--exporter", "none", "--live", "off", "--interval", "200ms",
                             "--probes", "syscalls,file_open,exec", "--duration", "60s"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def answers():
            try:
                return get(f"http://{address}/readyz")
            except OSError:
                assert proc.poll() is None, proc.communicate()
                return None
        code, ready = wait_for(answers, 60)
        assert code == 200, ready
        assert ready["probes"] == ["syscalls", "file_open", "exec"] and ready["model"] != "none"
        def after_two_windows():
            code, body = get(f"http://{address}/healthz")
            return (code, body) if body["windows"] >= 2 else None
        code, health = wait_for(after_two_windows, 30)
        assert code == 200 and health["status"] == "ok" and health["last_window_age_seconds"] < 3 * 0.2
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    with pytest.raises(OSError):
        get(f"http://{address}/healthz")
