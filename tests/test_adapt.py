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


def storm_host(lab: WindowTable) -> WindowTable:
    """Benign time of a host that runs something like the lab's I/O storm as routine (a nightly backup, say):
    normal windows, then the storm's windows twice (so that the host's "normal" outweighs the lab's label)."""
    storm = np.flatnonzero(lab.labels == "io_storm")
    idx = np.concatenate([np.flatnonzero(lab.labels == NORMAL_STATE)[:200], storm, storm])
    return WindowTable(lab.names, lab.timestamps[idx] + 86400.0, np.full(len(idx), NORMAL_STATE, dtype=object),
                       lab.values[idx].copy())


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
    assert result.weakened == {}, result.incidents  # this host's failing calls overlap no lab incident


def test_adapting_to_a_host_whose_normal_looks_like_an_incident_says_so(lab, tmp_path) -> None:
    """A host whose benign time includes windows like the lab's I/O storm (a backup job, say): after adapting,
    the model calls those normal, and the result names io_storm as weakened, with its recall before and after."""
    bundled = load_model(BUNDLED_MODEL_DIR / "core.onnx", None, bundled=True)
    result = adapt.adapt(bundled, lab, storm_host(lab), tmp_path / "adapted.onnx", say=lambda line: None)
    assert set(result.weakened) == {"io_storm"}, result.incidents
    before, after, total = result.weakened["io_storm"]
    assert after < before <= total


def test_the_network_model_keeps_declaring_its_flood_states(lab, tmp_path) -> None:
    bundled = load_model(BUNDLED_MODEL_DIR / "network.onnx", None, bundled=True)
    host = half(failing_host(lab), 0)
    result = adapt.adapt(bundled, lab, host, tmp_path / "adapted.onnx", say=lambda line: None)
    assert result.model.attack_states == {"syn_flood", "udp_flood", "random_source_flood"}
    # attack recall does not drop (the shipped recording's udp_flood ends 7 windows early, called normal by both)
    assert all(after >= before for before, after, _ in (result.incidents[s] for s in result.model.attack_states)), \
        result.incidents


def lab_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_export.lab", "adapt", *args], capture_output=True,
                          text=True, timeout=120)


def test_the_command_adapts_from_recorded_windows(lab, tmp_path) -> None:
    """A host recorded with the three core probes only: the command adapts core.onnx (the model the agent would
    serve with them) and warns about the incident it now separates worse."""
    recorded = tmp_path / "host.csv"
    host = storm_host(lab)
    core = [n for n in host.names if n.split(".", 1)[0] in rebuild.CORE_PROBES]
    columns = [host.names.index(n) for n in core]
    write_windows(recorded, core, ((t, NORMAL_STATE, dict(zip(core, row[columns])))
                                   for t, row in zip(host.timestamps, host.values)))
    out = tmp_path / "models" / "adapted.onnx"
    done = lab_cli("--host-windows", str(recorded), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "training core.onnx's recipe" in done.stdout, done.stdout
    assert "of 270 host windows not normal; the adapted model 0 (in-sample)" in done.stdout, done.stdout
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
