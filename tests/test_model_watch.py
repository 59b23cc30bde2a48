"""State debouncing (no flapping on one noisy window) and model hot swap from a directory (two polls, half-written
files, bad files rejected while the old model keeps serving, reload on demand)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from model_export import train as tr
from model_export.synthetic import make_windows
from otel_ebpf_receiver.model import ModelError, StateModel
from otel_ebpf_receiver.model.watch import ModelWatcher
from otel_ebpf_receiver.state.debounce import StateDebouncer, Transition

NAMES = ("syscalls.rate_log1p", "file_open.rate_log1p", "exec.exec_rate_log1p", "xdp.packets_rate_log1p")


# -- debouncer --------------------------------------------------------------------------------------------------------

def feed(deb: StateDebouncer, raw: list[str]) -> list[str]:
    return [deb.update(s).state for s in raw]


def test_single_noisy_window_does_not_flap() -> None:
    deb = StateDebouncer(enter_windows=2, exit_windows=3)
    raw = ["normal"] * 3 + ["network_flood"] + ["normal"] * 3 + ["exec_storm"] + ["normal"] * 2
    reported = feed(deb, raw)
    assert reported[:2] == ["unknown", "normal"]  # nothing confirmed yet, then normal after 2 windows
    assert set(reported[1:]) == {"normal"}


def test_alternating_noise_never_confirms() -> None:
    deb = StateDebouncer(2, 3)
    feed(deb, ["normal", "normal"])
    assert set(feed(deb, ["flood", "normal", "io", "normal", "flood", "io"] * 3)) == {"normal"}


def test_enter_after_n_windows_with_transition() -> None:
    deb = StateDebouncer(enter_windows=2, exit_windows=3)
    feed(deb, ["normal", "normal"])
    first = deb.update("network_flood")
    assert first.state == "normal" and first.transition is None
    assert first.pending == "network_flood" and first.pending_windows == 1
    second = deb.update("network_flood")
    assert second.state == "network_flood"
    assert second.transition == Transition("normal", "network_flood", 2)
    assert deb.update("network_flood").transition is None  # only on the window it changes


def test_exit_is_stickier_than_enter() -> None:
    deb = StateDebouncer(enter_windows=2, exit_windows=3)
    feed(deb, ["normal", "normal", "exec_storm", "exec_storm"])
    assert deb.state == "exec_storm"
    results = [deb.update("normal") for _ in range(3)]
    assert [r.state for r in results] == ["exec_storm", "exec_storm", "normal"]
    assert results[-1].transition == Transition("exec_storm", "normal", 3)
    # an interruption restarts the count
    feed(deb, ["io_degraded", "io_degraded"])
    assert feed(deb, ["normal", "normal", "io_degraded", "normal", "normal"]) == ["io_degraded"] * 5
    assert deb.update("normal").state == "normal"


def test_startup_and_parameters() -> None:
    deb = StateDebouncer(enter_windows=1, exit_windows=1)
    assert deb.update("normal").transition == Transition("unknown", "normal", 1)
    assert feed(deb, ["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError):
        StateDebouncer(enter_windows=0)
    deb = StateDebouncer(3, 3, initial="normal")
    assert feed(deb, ["flood", "flood", "flood"]) == ["normal", "normal", "flood"]


# -- watcher ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two valid model versions and one trained on other feature names, built once."""
    src = tmp_path_factory.mktemp("models")
    trained = tr.fit(make_windows(NAMES, ("normal", "network_flood", "exec_storm"), per_state=60, seed=3),
                     tr.TrainConfig(seed=3))
    tr.export(trained, src / "v1.onnx", version="v1")
    tr.export(trained, src / "v2.onnx", version="v2")
    other = ("syscalls.rate_log1p", "file_open.rate_log1p", "exec.exec_rate_log1p", "tcp.retransmits_log1p")
    tr.export(tr.fit(make_windows(other, ("normal", "x"), per_state=40), tr.TrainConfig()),
              src / "other.onnx", version="other")
    return {p.stem: p for p in src.iterdir()}


class Recorder:
    def __init__(self) -> None:
        self.swaps: list[tuple[str | None, str]] = []
        self.rejects: list[tuple[str, ModelError]] = []

    def on_swap(self, old: StateModel | None, new: StateModel) -> None:
        self.swaps.append((old.version if old else None, new.version))

    def on_reject(self, path: Path, err: ModelError) -> None:
        self.rejects.append((path.name, err))


def make_watcher(directory: Path, rec: Recorder, features=NAMES) -> ModelWatcher:  # type: ignore[no-untyped-def]
    return ModelWatcher(directory, list(features), rec.on_swap, rec.on_reject)


def deploy(src: Path, dst: Path) -> None:
    time.sleep(0.02)  # a distinct ctime even on coarse filesystem clocks
    shutil.copyfile(src, dst)


def test_initial_load_picks_newest(models: dict[str, Path], tmp_path: Path) -> None:
    deploy(models["v1"], tmp_path / "a.onnx")
    deploy(models["v2"], tmp_path / "b.onnx")
    rec = Recorder()
    watcher = make_watcher(tmp_path, rec)
    assert watcher.model is None
    assert watcher.load_initial().version == "v2"
    assert rec.swaps == [(None, "v2")] and rec.rejects == []
    # the older file was superseded, not pending: polling never swaps back to it
    for _ in range(3):
        assert watcher.poll() is None
    assert watcher.model.version == "v2"


def test_new_file_swapped_within_two_polls(models: dict[str, Path], tmp_path: Path) -> None:
    deploy(models["v1"], tmp_path / "state-v1.onnx")
    rec = Recorder()
    watcher = make_watcher(tmp_path, rec)
    watcher.load_initial()
    assert watcher.poll() is None
    deploy(models["v2"], tmp_path / "state-v2.onnx")
    first = watcher.poll()
    second = watcher.poll()
    assert first is None or first.version == "v2"
    assert watcher.model.version == "v2" and (first or second) is watcher.model
    assert rec.swaps == [(None, "v1"), ("v1", "v2")] and rec.rejects == []


def test_an_empty_directory_is_only_stated_until_a_file_arrives(models: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    watcher = make_watcher(tmp_path, rec)
    os.utime(tmp_path, ns=(time.time_ns() - 5_000_000_000,) * 2)  # empty for a while
    scans = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: scans.append(path) or real_scandir(path))
    for _ in range(3):
        assert watcher.poll() is None
    assert len(scans) == 1  # the first poll scanned; nothing can appear without moving the directory's mtime
    deploy(models["v1"], tmp_path / "new.onnx")
    first, second = watcher.poll(), watcher.poll()
    assert (first or second) is watcher.model and watcher.model.version == "v1" and len(scans) == 3


def test_half_written_file_not_loaded_until_stable(models: dict[str, Path], tmp_path: Path) -> None:
    deploy(models["v1"], tmp_path / "v1.onnx")
    rec = Recorder()
    watcher = make_watcher(tmp_path, rec)
    watcher.load_initial()
    data = models["v2"].read_bytes()
    target = tmp_path / "v2.onnx"
    with open(target, "wb") as fh:  # a slow, non-atomic copy: one chunk per poll
        for chunk in (data[:100], data[100:len(data) // 2], data[len(data) // 2:]):
            fh.write(chunk)
            fh.flush()
            assert watcher.poll() is None, "validated a file that was still growing"
            assert watcher.model.version == "v1"
    assert rec.rejects == []
    assert watcher.poll().version == "v2"  # unchanged since the last poll: stable, valid, swapped
    assert rec.rejects == [] and rec.swaps[-1] == ("v1", "v2")


def test_bad_file_rejected_old_model_keeps_serving(models: dict[str, Path], tmp_path: Path) -> None:
    deploy(models["v1"], tmp_path / "good.onnx")
    rec = Recorder()
    watcher = make_watcher(tmp_path, rec)
    watcher.load_initial()
    (tmp_path / "broken.onnx").write_bytes(models["v2"].read_bytes()[:-40])  # truncated
    deploy(models["other"], tmp_path / "other-features.onnx")
    for _ in range(4):
        assert watcher.poll() is None
    assert watcher.model.version == "v1"
    assert sorted(name for name, _ in rec.rejects) == ["broken.onnx", "other-features.onnx"]  # once each
    errors = {name: str(err) for name, err in rec.rejects}
    assert "tcp.retransmits_log1p" in errors["other-features.onnx"]
    assert all("\n" not in e for e in errors.values())
    # serving still works
    assert watcher.model.predict({n: 1.0 for n in NAMES}).model_version == "v1"
    # fixing the bad file in place changes its signature: it is tried again and swapped in
    deploy(models["v2"], tmp_path / "broken.onnx")
    watcher.poll()
    watcher.poll()
    assert watcher.model.version == "v2"


def test_touch_rolls_back_and_ignored_names(models: dict[str, Path], tmp_path: Path) -> None:
    deploy(models["v1"], tmp_path / "v1.onnx")
    deploy(models["v2"], tmp_path / "v2.onnx")
    rec = Recorder()
    watcher = make_watcher(tmp_path, rec)
    assert watcher.load_initial().version == "v2"
    time.sleep(0.02)
    os.utime(tmp_path / "v1.onnx")  # `touch v1.onnx`: deploy it again
    (tmp_path / ".hidden.onnx").write_bytes(b"junk")
    (tmp_path / "v3.onnx.tmp").write_bytes(b"junk")
    watcher.poll()
    watcher.poll()
    assert watcher.model.version == "v1" and rec.rejects == []


def test_force_reload_and_request_reload(models: dict[str, Path], tmp_path: Path) -> None:
    rec = Recorder()
    watcher = make_watcher(tmp_path / "models", rec)  # does not exist yet: no model, no error
    assert watcher.load_initial() is None and watcher.poll() is None
    (tmp_path / "models").mkdir()
    deploy(models["v1"], tmp_path / "models" / "m.onnx")
    assert watcher.force_reload().version == "v1"  # no waiting for stability
    first = watcher.model
    watcher.request_reload()  # what a SIGHUP handler does
    assert watcher.poll() is not first and watcher.model.version == "v1"  # re-read from disk
    assert rec.swaps == [(None, "v1"), ("v1", "v1")]


def test_starts_with_a_given_model(models: dict[str, Path], tmp_path: Path) -> None:
    from otel_ebpf_receiver.model import load_model

    bundled = load_model(models["v1"], NAMES)
    rec = Recorder()
    watcher = ModelWatcher(tmp_path, NAMES, rec.on_swap, rec.on_reject, model=bundled)
    assert watcher.load_initial() is None and watcher.model is bundled
    deploy(models["v2"], tmp_path / "v2.onnx")
    watcher.poll()
    watcher.poll()
    assert rec.swaps == [("v1", "v2")]


# -- the directory is an input like any other (issue 14) -------------------------------------------------------

def test_symlink_is_rejected_once_and_never_followed(models: dict[str, Path], tmp_path: Path) -> None:
    """Convention change: symlinks used to be followed (repointing current.onnx deployed a model); now a link is
    refused with one line and the files it points to stay unread. Deploy by copying or renaming."""
    (tmp_path / "models").mkdir()
    deploy(models["v1"], tmp_path / "models" / "v1.onnx")
    rec = Recorder()
    watcher = make_watcher(tmp_path / "models", rec)
    watcher.load_initial()
    (tmp_path / "models" / "current.onnx").symlink_to(models["v2"])
    for _ in range(3):
        watcher.poll()
    assert watcher.model.version == "v1"
    assert [(name, "symbolic link" in str(err)) for name, err in rec.rejects] == [("current.onnx", True)]


def test_hostile_files_never_escape_the_watcher(models: dict[str, Path], tmp_path: Path) -> None:
    """Each of these used to raise something else than ModelError (RecursionError, OverflowError) or could block:
    at start-up the agent exited with a traceback, under systemd in a loop."""
    from tests import model_mutations as mm

    deploy(models["v1"], tmp_path / "good.onnx")
    good = models["v2"].read_bytes()
    time.sleep(0.02)
    hostile = {
        "deep.onnx": mm.with_metadata(good, "training", mm.deep(100_000)),
        "huge-int.onnx": mm.with_metadata(good, "distance_thresholds", f"[{mm.HUGE_INT}, 1, 1]"),
        "loop.onnx": mm.with_operator(good, "Loop"),
        "ansi.onnx": mm.with_metadata(good, "model_version", "v2\x1b[2J"),
    }
    for name, data in hostile.items():
        (tmp_path / name).write_bytes(data)
    os.mkfifo(tmp_path / "fifo.onnx")
    (tmp_path / "shared.onnx").write_bytes(good)
    (tmp_path / "shared.onnx").chmod(0o666)  # anyone could rewrite it: refused, chmod go-w
    rec = Recorder()
    watcher = make_watcher(tmp_path, rec)
    assert watcher.load_initial().version == "v1"
    for _ in range(3):
        watcher.poll()
    assert watcher.model.version == "v1"
    assert sorted(name for name, _ in rec.rejects) == sorted([*hostile, "fifo.onnx", "shared.onnx"])
    assert "chmod go-w" in dict(rec.rejects)["shared.onnx"].hint
    assert all(str(err).isprintable() for _, err in rec.rejects)


def test_unexpected_error_is_a_rejection(models: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from otel_ebpf_receiver.model import watch

    deploy(models["v1"], tmp_path / "v1.onnx")
    monkeypatch.setattr(watch, "load_model", lambda *a, **k: (_ for _ in ()).throw(MemoryError("boom")))
    rec = Recorder()
    watcher = make_watcher(tmp_path, rec)
    assert watcher.load_initial() is None
    assert [(name, "unexpected MemoryError" in str(err)) for name, err in rec.rejects] == [("v1.onnx", True)]


def test_group_writable_directory_is_refused_until_fixed(models: dict[str, Path], tmp_path: Path) -> None:
    directory = tmp_path / "models"
    directory.mkdir()
    deploy(models["v1"], directory / "v1.onnx")
    directory.chmod(0o775)
    rec = Recorder()
    watcher = make_watcher(directory, rec)
    assert watcher.load_initial() is None
    watcher.poll()
    assert [(name, "chmod go-w" in str(err)) for name, err in rec.rejects] == [("models", True)]  # once
    directory.chmod(0o755)
    assert watcher.force_reload().version == "v1"
