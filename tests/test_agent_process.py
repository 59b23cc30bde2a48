"""The agent as users run it: a real process, real probes, OTLP over a real connection (gRPC and HTTP), outages,
clean shutdown leaving nothing attached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from .helpers import REPO, exec_n_times
from .otlp_receiver import OtlpReceiver, attributes, free_port

pytestmark = [pytest.mark.bpf]


def start_agent(endpoint: str, protocol: str = "grpc", extra_env: dict | None = None, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
           "OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
           "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test", **(extra_env or {})}
    # stderr goes to a file so the test can wait for the "attached" line without a reader thread.
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "otel_ebpf_receiver", "run", "--live", "off", *args],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    proc.stderr_file = err
    return proc


def agent_stderr(proc: subprocess.Popen) -> str:
    proc.stderr_file.seek(0)
    return proc.stderr_file.read()


def stop_agent(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, str, str]:
    proc.send_signal(sig)
    proc.wait(timeout=30)
    return proc.returncode, "", agent_stderr(proc)


def our_program_ids(pid: int) -> set[int]:
    """Programs held by process ``pid``, from its fdinfo (Debian's bpftool is built without pid lookup)."""
    ids = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except FileNotFoundError:
        return ids
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                ids.update(int(line.split()[1]) for line in fh if line.startswith("prog_id:"))
        except OSError:
            continue
    return ids


def all_program_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], check=True, capture_output=True, text=True).stdout
    return {p["id"] for p in json.loads(out)}


def wait_for_programs(proc: subprocess.Popen, timeout: float = 60) -> set[int]:
    """Wait for the agent's "attached ..." line (every probe loaded); return the programs it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "attached " in agent_stderr(proc):
            return our_program_ids(proc.pid)
        if proc.poll() is not None:
            raise AssertionError(f"agent exited early: {agent_stderr(proc)}")
        time.sleep(0.2)
    raise AssertionError("agent did not attach its programs in time")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_metrics_arrive_over_otlp_with_state_and_resource(protocol):
    with OtlpReceiver(protocol) as receiver:
        proc = start_agent(receiver.endpoint, protocol)
        try:
            wait_for_programs(proc)
            name = exec_n_times(20)
            assert receiver.wait_for(lambda r: any(
                n == "otel_ebpf_receiver.exec" and attributes(p).get("process.executable.name") == name and p.as_int == 20
                for _, n, p in r.points())), "exec count did not arrive"
        finally:
            code, _, err = stop_agent(proc)
        assert code == 0, err
        points = list(receiver.points())
        resource = points[0][0]
        assert resource["service.name"] == "otel-ebpf-receiver"
        assert resource["deployment.environment.name"] == "test"  # OTEL_RESOURCE_ATTRIBUTES honoured
        assert resource["os.type"] == "linux" and resource["host.name"]
        assert all("system.state" in attributes(p) for _, _, p in points)
        # the model version rides on the state metrics only (agent.Agent.export says why)
        assert all("system.state.model" in attributes(p) for _, n, p in points if n.startswith(
            "otel_ebpf_receiver.system_state."))
        names = {n for _, n, _ in points}
        assert {"otel_ebpf_receiver.syscalls", "otel_ebpf_receiver.file_opens", "system.process.created",
                "otel_ebpf_receiver.probe.attached"} <= names


def test_unreachable_collector_is_said_once_and_counters_survive_the_outage():
    port = free_port()
    receiver = OtlpReceiver("grpc", port=port)
    proc = start_agent(receiver.endpoint)  # nothing listens yet
    try:
        wait_for_programs(proc)
        name = exec_n_times(30)
        time.sleep(3)  # several failed exports
        receiver.start()
        assert receiver.wait_for(lambda r: any(
            n == "otel_ebpf_receiver.exec" and attributes(p).get("process.executable.name") == name and p.as_int == 30
            for _, n, p in r.points())), "counts made during the outage were lost"
        assert receiver.wait_for(lambda r: any(n == "otel_ebpf_receiver.export.failures" and p.as_int >= 1
                                                for _, n, p in r.points()))
        receiver.stop()  # second outage: the counter must carry on, not reset
        exec_n_times(10)
        time.sleep(2)
        receiver.start()
        assert receiver.wait_for(lambda r: any(
            n == "otel_ebpf_receiver.exec" and attributes(p).get("process.executable.name") == name and p.as_int == 30
            for _, n, p in list(r.points())[-200:]))
    finally:
        code, out, err = stop_agent(proc)
        receiver.stop()
    assert code == 0
    assert "Traceback" not in err, err
    # (a state-change event dropped meanwhile adds its own "log export ... failed" line: counted separately)
    failed_lines = [line for line in err.splitlines() if "metric export to" in line and "failed" in line]
    assert len(failed_lines) == 2, err  # once per outage, not once per retry
    assert all(line.startswith("otel-ebpf-receiver: ") for line in err.splitlines()), err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_detaches_every_program(sig):
    proc = start_agent("http://127.0.0.1:9", extra_env={"OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    ids = wait_for_programs(proc)
    code, _, err = stop_agent(proc, sig)
    assert code == 0, err
    assert "detached" in err
    assert not ids & all_program_ids(), "programs still loaded after the agent stopped"


def test_sigkill_leaves_no_tracing_program_behind():
    """Tracing programs live only as long as the process's file descriptors: even SIGKILL detaches them."""
    proc = start_agent("http://127.0.0.1:9")
    ids = wait_for_programs(proc)
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while ids & all_program_ids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ids & all_program_ids()
