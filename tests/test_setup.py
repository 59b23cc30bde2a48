"""What `make run` / `make setup` leave on a host: only the agent's packages and Python dependencies, launchers on
PATH that exec this checkout's venv, no service enabled that nobody asked for, and a second run that does nothing.
Root for the make and systemctl checks (the suite runs as root); the rest are static reads."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOST_SETUP = REPO / "deploy" / "host-setup.sh"
INSTALL_LAUNCHERS = REPO / "deploy" / "install-launchers.sh"
TRAINING_LIBRARIES = {"sklearn": "scikit-learn", "skl2onnx": "skl2onnx", "tqdm": "tqdm", "matplotlib": "matplotlib"}
LAB_TOOLS = {"hping3", "iperf3", "stress-ng", "fio", "prometheus", "nginx-light", "netsniff-ng", "xdp-tools"}
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def bash_array(name: str) -> set[str]:
    body = re.search(rf"^{name}=\((.*?)\)", HOST_SETUP.read_text(), re.M | re.S).group(1)
    return set(body.split())


def test_host_setup_parses_and_splits_agent_from_lab():
    out = subprocess.run(["bash", "-n", str(HOST_SETUP)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    agent, lab = bash_array("AGENT_PACKAGES"), bash_array("LAB_PACKAGES")
    assert {"python3-bpfcc", "libbpfcc", "bpftool", "python3-venv"} <= agent
    assert not agent & LAB_TOOLS, f"the agent set-up installs lab tools: {agent & LAB_TOOLS}"
    assert LAB_TOOLS <= lab


def test_training_libraries_are_the_train_extra_and_the_runtime_never_imports_them():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dist = lambda req: re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower()  # noqa: E731
    runtime = {dist(r) for r in project["dependencies"]}
    train = {dist(r) for r in project["optional-dependencies"]["train"]}
    assert not runtime & set(TRAINING_LIBRARIES.values()), runtime
    assert set(TRAINING_LIBRARIES.values()) <= train
    for path in (REPO / "otel_ebpf_receiver").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            used = {n.split(".")[0] for n in names} & TRAINING_LIBRARIES.keys()
            assert not used, f"{path.relative_to(REPO)} imports {used}: the agent installs without [train]"
    # And at run time: the CLI and everything `run` assembles load without touching them.
    code = ("import sys, otel_ebpf_receiver.cli, otel_ebpf_receiver.assembly, otel_ebpf_receiver.state.classifier; "
            f"print(sorted(set(sys.modules) & {set(TRAINING_LIBRARIES)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_launchers_are_idempotent_and_leave_foreign_files_alone(tmp_path):
    def install(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(INSTALL_LAUNCHERS), *extra, str(REPO), str(tmp_path)],
                              capture_output=True, text=True, timeout=60)

    (tmp_path / "otel-ebpf-lab").write_text("#!/bin/sh\necho someone else's\n")
    first = install()
    assert first.returncode == 0, first.stderr
    assert "otel-ebpf-lab exists and is not ours" in first.stdout
    second = install().stdout.splitlines()
    assert len(second) == 1 and "is not ours" in second[0], f"a second run changed files: {second}"
    version = subprocess.run([str(tmp_path / "otel-ebpf-receiver"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("otel-ebpf-receiver "), version.stderr
    install("--remove")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["otel-ebpf-lab"], "removed a file that is not ours"


def test_launchers_on_path():
    """`make setup` (which `make test` runs) put the launchers on PATH, so README commands work as pasted."""
    found = shutil.which("otel-ebpf-receiver")
    if found is None and not IN_CI:
        pytest.skip("no otel-ebpf-receiver on PATH: run `make setup`")
    assert found and "# otel-ebpf-receiver launcher" in Path(found).read_text(), \
        f"{found}: not the launcher `make setup` writes; run `make setup`"


def test_second_make_setup_installs_nothing(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("make setup needs root")
    runs = [subprocess.run(["make", "--no-print-directory", "setup", f"BINDIR={tmp_path}"], cwd=REPO,
                           capture_output=True, text=True, timeout=900) for _ in range(2)]
    for out in runs:
        assert out.returncode == 0, out.stdout + out.stderr
    assert runs[1].stdout.strip() == "" and runs[1].stderr.strip() == "", \
        f"a second `make setup` did something:\n{runs[1].stdout}{runs[1].stderr}"


@pytest.mark.skipif(not shutil.which("systemctl"), reason="no systemctl on this host")
def test_lab_services_are_not_enabled_at_boot():
    """prometheus and nginx are installed for the tests (which start their own); host-setup --lab disables them."""
    for unit in ("prometheus.service", "nginx.service"):
        state = subprocess.run(["systemctl", "is-enabled", unit], capture_output=True, text=True).stdout.strip()
        assert state != "enabled", f"{unit} is enabled at boot; deploy/host-setup.sh --lab should have disabled it"
