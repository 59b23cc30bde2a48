"""Hostile model files at the edges of the loader: graphs that would exhaust memory or time (refused in the child
process, within the limits), and the file itself — symlinks, FIFOs, owner, mode, names with control characters.
Built from a copy of a bundled model; the fuzzer (test_model_fuzz.py) covers the rest at random."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from otel_ebpf_receiver.model import ModelError, load_model

from . import model_mutations as mm


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "state.onnx"
    shutil.copyfile(mm.BUNDLED[0], path)
    return path


def reject(path: Path, *needles: str, **kwargs) -> ModelError:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelError) as info:
        load_model(path, **kwargs)
    text = str(info.value)
    assert "\n" not in text and text.isprintable() and str(path) in text
    for needle in needles:
        assert needle in text, text
    return info.value


def hostile(tmp_path: Path, data: bytes, name: str = "hostile.onnx") -> Path:
    out = tmp_path / name
    out.write_bytes(data)
    return out


# -- graphs that cost too much: refused in the child, the agent untouched -----------------------------------------

def test_memory_bomb_is_refused_in_the_child(model_path: Path, tmp_path: Path) -> None:
    """Allowlisted operators only: a 4 GiB constant folded at session creation. The child hits its address-space
    limit; the agent's own memory does not move."""
    import resource

    bad = hostile(tmp_path, mm.memory_bomb(model_path.read_bytes()))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reject(bad, "onnxruntime cannot run it")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024  # KiB


def test_slow_graph_is_killed_at_the_time_limit(model_path: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """100 input-dependent 1000x1000 matrix products per run: minutes on any machine. The limit is shortened to
    2 s here to keep the suite fast; the agent's is SANDBOX_SECONDS."""
    from otel_ebpf_receiver.model import sandbox

    monkeypatch.setattr(sandbox, "SANDBOX_SECONDS", 2.0)
    reject(hostile(tmp_path, mm.matmul_graph(model_path.read_bytes(), 100)), "did not finish", "2 s")


def test_one_inference_over_the_run_limit_is_refused(model_path: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from otel_ebpf_receiver.model import sandbox

    monkeypatch.setattr(sandbox, "MAX_RUN_SECONDS", 1e-9)
    monkeypatch.setattr(sandbox, "_proven", {})
    reject(model_path, "one inference takes", "per window")



# -- the file itself: links, FIFOs, owner, mode, name ----------------------------------------------------------

def test_symlink_is_refused_not_followed(model_path: Path, tmp_path: Path) -> None:
    link = tmp_path / "current.onnx"
    link.symlink_to(model_path)
    reject(link, "symbolic link", "copy the file")


def test_fifo_swapped_in_after_the_check_never_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO named like a model (swapped in after a check said 'regular file') is refused at once: the file is
    opened non-blocking and checked on its descriptor."""
    import threading

    fifo = tmp_path / "swapped.onnx"
    os.mkfifo(fifo)
    monkeypatch.setattr(Path, "is_file", lambda self: True)  # the check happened before the swap
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_model(fifo)
        except BaseException as exc:  # noqa: BLE001 - recorded and asserted below
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # release the blocked open() so the thread ends, then fail
        with open(fifo, "wb"):
            pass
        thread.join(5)
        pytest.fail("load_model blocked on a FIFO")
    assert isinstance(outcome[0], ModelError) and "not a regular file" in str(outcome[0])


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_owner_and_mode_are_checked(model_path: Path, tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.onnx"
    theirs.write_bytes(model_path.read_bytes())
    os.chown(theirs, 12345, 12345)
    assert load_model(theirs).version  # a file named on a command line is the user's choice
    reject(theirs, "uid 12345", "chown root", check_owner=True)
    shared = tmp_path / "shared.onnx"
    shared.write_bytes(model_path.read_bytes())
    shared.chmod(0o664)
    reject(shared, "writable by group or others", "chmod go-w", check_owner=True)
    shared.chmod(0o644)
    assert load_model(shared, check_owner=True).version == load_model(model_path).version


def test_control_characters_in_a_file_name_never_reach_the_message(model_path: Path, tmp_path: Path) -> None:
    odd = tmp_path / "evil\x1b[2J\nname.onnx"
    odd.write_bytes(model_path.read_bytes())
    with pytest.raises(ModelError) as info:
        load_model(odd)
    assert str(info.value).isprintable() and "control characters" in str(info.value)
