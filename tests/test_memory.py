"""What the agent gives back after loading (otel_ebpf_receiver/memory.py), measured from /proc/self/smaps in the
process that loaded the probes: compiling makes libLLVM and libclang resident, the release step drops those pages
and bcc's kernel symbol cache, and whatever comes after still works — a later compile (the pages fault back), the
probe loaded before, a model swap (the first use of onnx's checker in the agent). As root, with real probes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from otel_ebpf_receiver import memory

from .conftest import REPO
from .helpers import exec_n_times, make_agent, metric_sum

pytestmark = pytest.mark.bpf

COMPILER = ("libLLVM", "libclang")
MIB = 1024


def test_release_drops_the_compiler_pages_and_a_later_compile_still_counts():
    from bcc import BPF

    from otel_ebpf_receiver.assembly import load_probes
    from otel_ebpf_receiver.probes.exec import ExecProbe

    # syscalls asks bcc whether raw tracepoints exist, which fills bcc's kernel symbol cache.
    loaded = load_probes(["syscalls", "exec"], {}, say=print)
    try:
        assert {p.name for p in loaded} == {"syscalls", "exec"}
        before = memory.droppable_resident(COMPILER)
        assert before > 20 * MIB, f"compiling left only {before} KiB of compiler code resident: nothing to measure"
        assert -1 in BPF._sym_caches

        released = memory.release_after_load()

        after = memory.droppable_resident(COMPILER)
        assert after < before / 10, (before, after)
        assert released is not None and released.libraries_kib >= (before - after) * 9 // 10, released
        assert -1 not in BPF._sym_caches  # the kallsyms copy is freed ...
        assert BPF.support_raw_tracepoint()  # ... and built again on demand

        # A compile after the pages were dropped faults them back and gives a working probe.
        agent = make_agent(ExecProbe())
        try:
            name = exec_n_times(20)
            agent.step(1.0)
            assert metric_sum(agent.reader, "otel_ebpf_receiver.exec", {"process.executable.name": name}) == 20
        finally:
            agent.close()
        # The probes loaded before the release still read their maps.
        for probe in loaded:
            assert probe.read(1.0) is not None
    finally:
        for probe in loaded:
            probe.close()


def test_without_madv_pageout_the_pages_are_still_dropped(monkeypatch, caplog):
    """A kernel before 5.4 answers MADV_PAGEOUT with EINVAL (so does this one for an advice it does not know):
    the release says so in one debug line and unmaps the pages with MADV_DONTNEED alone."""
    from otel_ebpf_receiver.assembly import load_probes

    loaded = load_probes(["exec"], {}, say=print)
    try:
        before = memory.droppable_resident(COMPILER)
        assert before > 20 * MIB
        monkeypatch.setattr(memory, "MADV_PAGEOUT", 0x7FFF)  # no kernel has this advice: EINVAL
        with caplog.at_level("DEBUG", logger="otel_ebpf_receiver"):
            assert memory.drop_library_pages(COMPILER) == "dontneed"
        assert memory.droppable_resident(COMPILER) < before / 10
        assert [r.message for r in caplog.records if "MADV_PAGEOUT" in r.message] != []
    finally:
        for probe in loaded:
            probe.close()


# A fresh interpreter: the agent exactly as `run` builds it (every probe this kernel has, the classifier, the
# bundled model), with nothing imported before by other tests.
_BUILT_AGENT = r"""
import json, os, shutil, sys, tempfile
from pathlib import Path
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from otel_ebpf_receiver import memory

from otel_ebpf_receiver.assembly import build_agent, load_probes
from otel_ebpf_receiver.config import Config

models = tempfile.mkdtemp()
os.chmod(models, 0o755)
reader = InMemoryMetricReader()
agent = build_agent(Config(exporter="none", live="off", model_dir=models), metric_readers=[reader],
                    say=lambda line: None)
out = {}
try:
    import bcc
    out["probes"] = [p.name for p in agent.probes]
    out["compiler_kib_after_build"] = memory.droppable_resident(("libLLVM", "libclang"))
    out["loading_kib_after_build"] = memory.droppable_resident()
    out["kernel_symbol_cache"] = -1 in bcc.BPF._sym_caches
    out["onnx_before_swap"] = "onnx" in sys.modules  # bundled models load without it
    agent.step(1.0)
    agent.step(1.0)
    out["state_points"] = sum(1 for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
                              for m in sm.metrics if m.name == "otel_ebpf_receiver.system_state.anomaly_score")
    bundled = Path(sys.modules["otel_ebpf_receiver"].__file__).parent / "model" / "bundled" / "default.onnx"
    shutil.copy(bundled, Path(models) / "swapped.onnx")
    new = agent.classifier.watcher.force_reload()
    out["swapped"] = new is not None and agent.classifier.watcher.model is new
    agent.step(1.0)
    extra = load_probes(["exec"], {}, say=lambda line: None)
    out["compiler_kib_after_another_compile"] = memory.droppable_resident(("libLLVM", "libclang"))
    for probe in extra:
        probe.close()
    out["training_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in
                                     ("sklearn", "skl2onnx", "matplotlib", "scipy", "pandas", "model_export"))
finally:
    agent.close()
    shutil.rmtree(models)
print(json.dumps(out))
"""


def test_the_built_agent_holds_no_compiler_pages_nor_training_libraries():
    result = subprocess.run([sys.executable, "-c", _BUILT_AGENT], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "syscalls" in out["probes"] and len(out["probes"]) >= 5, out
    assert out["compiler_kib_after_build"] <= 2 * MIB, out
    assert out["loading_kib_after_build"] <= 2 * MIB, out
    assert out["compiler_kib_after_another_compile"] > 20 * MIB, out  # the same measure sees a compile's pages
    assert out["kernel_symbol_cache"] is False, out
    assert out["onnx_before_swap"] is False, out
    assert out["state_points"] >= 1, out  # the model scored windows after the release
    assert out["swapped"] is True, out  # a model swap (onnx checks, sandbox run) works after the release
    assert out["training_modules"] == [], out
