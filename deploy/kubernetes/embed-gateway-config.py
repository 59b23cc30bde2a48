#!/usr/bin/env python3
"""Copy collector-config/gateway.yaml into the otelcol-gateway ConfigMap of gateway-collector.yaml, verbatim.
Run it after editing gateway.yaml; tests/test_collector_configs.py fails while the two differ.

    python3 deploy/kubernetes/embed-gateway-config.py
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "collector-config" / "gateway.yaml"
TARGET = REPO / "deploy" / "kubernetes" / "gateway-collector.yaml"
KEY = "  gateway.yaml: |\n"      # the ConfigMap's data key; its block ends at the next document
END = "---\napiVersion: apps/v1"

text = TARGET.read_text()
start = text.index(KEY) + len(KEY)
end = text.index(END, start)
block = "".join("    " + line if line.strip() else "\n" for line in SOURCE.read_text().splitlines(keepends=True))
TARGET.write_text(text[:start] + block + text[end:])
print(f"embedded {SOURCE.relative_to(REPO)} into {TARGET.relative_to(REPO)}")
