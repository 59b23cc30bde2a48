# Two commands do everything on a fresh Debian 12 host, as root:
#   make run    install what is missing, then start the agent with the bundled default model
#   make test   install what is missing, then run the whole suite
# Every set-up step leaves a stamp (in build/) keyed on its inputs, so a second run is fast.

SHELL      := /bin/bash
PYTHON     ?= /usr/bin/python3
VENV       := .venv
VPY        := $(VENV)/bin/python
BUILD      := build
STAMPS     := $(BUILD)/stamps
PYTEST_ARGS ?=
RUN_ARGS   ?=

.PHONY: run test setup host venv bench model lab detection-report clean help

include collector-config/collector.mk

help:
	@echo "make run    - set up the host (idempotent) and start the agent"
	@echo "make test   - set up the host (idempotent) and run the whole test-suite"
	@echo "make bench  - run the benchmarks in bench/ and print their tables"
	@echo "make model  - record scenarios and rebuild the bundled models"
	@echo "make lab    - record labelled windows from every lab scenario"
	@echo "make detection-report - measure detection and mitigation quality"

setup: host venv

# Host packages, kernel headers and mounts. Re-checked every time (cheap: dpkg-query and mountpoint).
host:
	@bash deploy/host-setup.sh

# A virtual environment on Debian's python3, so Debian's bcc (pure Python over libbcc.so) can be linked in.
$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/venv: pyproject.toml | $(VPY)
	@mkdir -p $(STAMPS)
	@site=$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  ln -sfn /usr/lib/python3/dist-packages/bcc $$site/bcc
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	@$(VPY) -c 'import bcc, onnxruntime, opentelemetry.sdk' && touch $@

venv: host $(STAMPS)/venv

run: setup
	$(VPY) -m otel_ebpf_receiver run $(RUN_ARGS)

test: setup collector
	CI=$${CI:-} $(VPY) -m pytest -ra $(PYTEST_ARGS)

# Rebuild the bundled models from scenarios driven on this host (~12 minutes).
model: setup
	$(VPY) -m model_export.default_model

# The scenario lab: record labelled windows from every scenario (namespace hosts, bounded floods and loads).
lab: setup
	@mkdir -p build/lab
	$(VPY) -m model_export.lab record -o build/lab/windows.csv

# Run every scenario against the agent (enforce mode) and print detection quality: precision/recall/F1 per window,
# false alarms per hour, time to warning / state flip / first XDP drop, ramp level at the warning.
detection-report: setup
	@mkdir -p build/lab
	$(VPY) -m model_export.lab report --markdown build/lab/detection-report.md

bench: setup
	$(VPY) bench/run_all.py

clean:
	rm -rf $(BUILD) $(VENV)
