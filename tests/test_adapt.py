"""`otel-ebpf-lab adapt` (model_export/lab/adapt.py): the bundled model's recipe trained again on the shipped lab
recording plus a host's benign windows as `normal`.

The host here is the lab's own benign windows with one thing changed — every syscall fails 70 % of the time, a
host whose daemons poll for things that are not there — which the bundled core model does not call normal. Half of
those windows adapt the model, the other half are held out: the adapted model must call the held-out half normal,
keep naming the lab's incidents it still separates, and say which ones it now separates worse (this shift
widens the error-ratio feature that tells a disk I/O storm apart). The real host, measured, is in the README
("Adapt to the host")."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys

import numpy as np
import pytest

from model_export.lab import adapt, rebuild
from model_export.windows import WindowTable, read_windows, write_windows
from otel_ebpf_receiver.model import NORMAL_STATE, load_model
from otel_ebpf_receiver.model.watch import BUNDLED_MODEL_DIR


@pytest.fixture(scope="module")
def lab() -> WindowTable:
    return read_windows(rebuild.SHIPPED_WINDOWS)


def failing_host(lab: WindowTable) -> WindowTable:
    idx = np.flatnonzero(lab.labels == NORMAL_STATE)
    values = lab.values[idx].copy()
    values[:, lab.names.index("syscalls.error_ratio")] = 0.7
    return WindowTable(lab.names, lab.timestamps[idx] + 86400.0, lab.labels[idx].copy(), values)


def half(table: WindowTable, start: int) -> WindowTable:
    return WindowTable(table.names, table.timestamps[start::2], table.labels[start::2], table.values[start::2])


def test_the_shipped_recording_is_what_the_bundled_models_were_trained_on(lab) -> None:
    """Each bundled model's training facts name the file it was trained on by content (sha256): the shipped
    recording, decompressed, is that file."""
    shipped = hashlib.sha256(gzip.decompress(rebuild.SHIPPED_WINDOWS.read_bytes())).hexdigest()
    for spec in rebuild.MODELS:
        model = load_model(BUNDLED_MODEL_DIR / spec.filename, None, bundled=True)
        files = model.training["files"]
        assert [f["sha256"] for f in files] == [shipped] and files[0]["rows"] == len(lab), (spec.filename, files)


def test_adapting_makes_the_hosts_benign_time_normal_and_says_what_it_weakened(lab, tmp_path) -> None:
    bundled = load_model(BUNDLED_MODEL_DIR / "core.onnx", None, bundled=True)
    host = failing_host(lab)
    train, held_out = half(host, 0), half(host, 1)
    assert adapt.not_normal(bundled, held_out).mean() > 0.5   # the bundled model flags this host

    result = adapt.adapt(bundled, lab, train, tmp_path / "adapted.onnx", say=lambda line: None)

    assert (tmp_path / "adapted.onnx").is_file() and not list(tmp_path.glob(".*"))  # written whole, no scratch left
    model = result.model
    assert model.feature_names == bundled.feature_names and model.version != bundled.version
    assert result.host_not_normal_before > 0.5 * result.host_windows and result.host_not_normal_after == 0
    assert adapt.not_normal(model, held_out).sum() == 0         # held out: never trained on
    assert set(result.incidents) == {"exec_storm", "file_open_storm", "io_storm"}
    for state in ("exec_storm", "file_open_storm"):
        before, after, total = result.incidents[state]
        assert before == after == total, (state, result.incidents[state])
    assert "io_storm" in result.weakened and set(result.weakened) == {"io_storm"}


def test_the_network_model_keeps_declaring_its_flood_states(lab, tmp_path) -> None:
    bundled = load_model(BUNDLED_MODEL_DIR / "network.onnx", None, bundled=True)
    host = half(failing_host(lab), 0)
    result = adapt.adapt(bundled, lab, host, tmp_path / "adapted.onnx", say=lambda line: None)
    assert result.model.attack_states == {"syn_flood", "udp_flood", "random_source_flood"}
    assert all(after == total for _, after, total in (result.incidents[s] for s in result.model.attack_states))


def lab_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_export.lab", "adapt", *args], capture_output=True,
                          text=True, timeout=120)


def test_the_command_adapts_from_recorded_windows(lab, tmp_path) -> None:
    """A host recorded with the three core probes only: the command adapts core.onnx (the model the agent would
    serve with them) and warns about the incident it now separates worse."""
    recorded = tmp_path / "host.csv"
    host = half(failing_host(lab), 0)
    core = [n for n in host.names if n.split(".", 1)[0] in rebuild.CORE_PROBES]
    columns = [host.names.index(n) for n in core]
    write_windows(recorded, core, ((t, NORMAL_STATE, dict(zip(core, row[columns])))
                                   for t, row in zip(host.timestamps, host.values)))
    out = tmp_path / "models" / "adapted.onnx"
    done = lab_cli("--host-windows", str(recorded), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "training core.onnx's recipe" in done.stdout, done.stdout
    assert "the adapted model 0 (in-sample)" in done.stdout, done.stdout
    assert "warning: io_storm is called normal more often now" in done.stdout, done.stdout
    assert load_model(out, core).feature_names == tuple(core)


@pytest.mark.parametrize("args, says", [
    (["--lab-windows", "/nonexistent.csv", "--host-windows", "/dev/null"], "no lab recording at /nonexistent.csv"),
    (["--host-windows", "/nonexistent.csv"], "/nonexistent.csv"),
])
def test_bad_input_is_one_line(args, says, tmp_path) -> None:
    done = lab_cli(*args, "-o", str(tmp_path / "a.onnx"))
    assert done.returncode != 0
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, \
        done.stderr
