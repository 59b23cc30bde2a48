"""Every metric and attribute name the agent declares is either the OpenTelemetry semantic convention's current
name (checked against the installed opentelemetry-semantic-conventions, deprecated names refused) or lives in our
own namespace: `otel_ebpf_receiver.*`, plus `system.state*`, the product's signature attributes."""

from __future__ import annotations

import ast
from pathlib import Path

import opentelemetry.semconv as semconv
import pytest

from otel_ebpf_receiver.mitigation.mitigator import Mitigator
from otel_ebpf_receiver.probes import REGISTRY
from otel_ebpf_receiver.state.classifier import StateClassifier
from otel_ebpf_receiver.telemetry import SELF_METRICS

OURS = ("otel_ebpf_receiver.",)
# mitigation/ has its own owner, who renames these (issue 15); any other exception fails the test.
PENDING_RENAMES = {"mitigation.action", "mitigation.reason"}


def semconv_names(kind: str) -> tuple[set[str], set[str]]:
    """(current, deprecated) names of the package's ``attributes`` or ``metrics`` modules: each constant is a
    string followed by its docstring, which starts with "Deprecated" for a deprecated one."""
    current, deprecated = set(), set()
    root = Path(semconv.__file__).parent
    for path in [*root.glob(f"{kind}/*.py"), *root.glob(f"_incubating/{kind}/*.py")]:
        body = ast.parse(path.read_text()).body
        for node, after in zip(body, body[1:] + [None]):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                continue
            doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
            # The incubating modules repeat stable names as "Deprecated in favor of stable ...": still current.
            retired = str(doc).strip().startswith("Deprecated") and "in favor of stable" not in str(doc)
            (deprecated if retired else current).add(node.value.value)
    return current - deprecated, deprecated


ATTRIBUTES, DEPRECATED_ATTRIBUTES = semconv_names("attributes")
METRICS, DEPRECATED_METRICS = semconv_names("metrics")
DECLARED = [(owner, m) for owner, metrics in [*((n, c.metrics) for n, c in REGISTRY.items()),
                                                ("classifier", StateClassifier.metrics),
                                                ("mitigation", Mitigator.metrics)]
            for m in metrics]


def test_the_semantic_conventions_were_read():
    assert {"process.executable.name", "network.io.direction", "system.device"} <= ATTRIBUTES
    assert "system.network.packet.count" in METRICS and "system.network.packets" in DEPRECATED_METRICS


@pytest.mark.parametrize("owner,metric", DECLARED, ids=lambda x: getattr(x, "name", x))
def test_names_are_current_semantic_conventions_or_ours(owner, metric):
    if not metric.name.startswith(OURS):
        assert metric.name in METRICS, f"{owner}: {metric.name} is not a current semantic-convention metric"
    for attribute in metric.attributes:
        if attribute.startswith(OURS) or attribute.split(".")[:2] == ["system", "state"] or attribute in PENDING_RENAMES:
            continue
        assert attribute in ATTRIBUTES, f"{owner}: {metric.name}{{{attribute}}} is neither a current " \
                                        f"semantic-convention attribute nor in the otel_ebpf_receiver namespace"


def test_self_metrics_probe_attributes_are_ours():
    for metric in SELF_METRICS:
        assert not {"probe.name", "probe.mode"} & set(metric.attributes), metric.name


def test_the_kernel_process_name_is_the_executable_name():
    """The kernel's comm (/proc/<pid>/comm, task->comm) is what the convention calls process.executable.name;
    process.command is argv[0], which the agent never reads."""
    for owner, metric in DECLARED:
        assert "process.command" not in metric.attributes, f"{owner}: {metric.name}"
    assert any("process.executable.name" in m.attributes for _, m in DECLARED)
