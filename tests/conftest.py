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
    if IN_CI and report.skipped and _needs_root_marks(item):
        # A skip in CI means a probe or a namespace test did not really run: make it count as a failure.
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped a BPF/namespace test with CI=true: {reason}"


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
