"""Shared fixtures and the CI rule: with CI=true a skipped BPF or namespace test is a failure, because CI runs as
root on a machine that can run them all — a skip there would hide a broken probe."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _needs_root_marks(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(m) for m in ("bpf", "netns"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    for item in items:
        if _needs_root_marks(item):
            item.add_marker(pytest.mark.skip(reason="needs root (eBPF / network namespaces)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    # An xfail is a known, documented defect that ran for real (pytest reports it as "skipped"): not a skip.
    if IN_CI and report.skipped and _needs_root_marks(item) and not hasattr(report, "wasxfail"):
        # A skip in CI means a probe or a namespace test did not really run: make it count as a failure.
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped a BPF/namespace test with CI=true: {reason}"


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


# --- built backends (shared by test_collector_configs.py and test_end_to_end.py) ---------------------------------

@pytest.fixture(scope="session")
def otelcol() -> Path:
    """The built Collector (build/otelcol/otelcol-ebpf). Building is part of the test: a failure here fails every
    test that needs it (never a skip). Cold about 2 minutes on 2 cores; a no-op when the binary is up to date."""
    from . import backends

    return backends.build_collector(timeout=1200)


@pytest.fixture(scope="session")
def jaeger_bin() -> Path:
    """Jaeger v2 (build/jaeger/jaeger), built from the Go module proxy (about 5-6 minutes cold, seconds when Go's
    caches are warm). A build failure fails the tests that need it."""
    from . import backends

    return backends.build_jaeger(timeout=1200)


@pytest.fixture
def bed():
    """A scenario-lab test bed (namespaces, the victim's API, a private pin dir), gone after the test."""
    from model_export.lab.testbed import Testbed

    with Testbed(say=lambda line: None) as bed:
        yield bed
