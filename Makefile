# Two commands do everything on a fresh Debian 12 host, as root:
#   make run    install what the agent needs (nothing else), then start it with the bundled default model
#   make test   install what the agent, the test-suite and the scenario lab need, then run the whole suite
# Every set-up step leaves a stamp (in build/) keyed on its inputs, so a second run is fast.

SHELL      := /bin/bash
COMMA      := ,
PYTHON     ?= /usr/bin/python3
VENV       := .venv
VPY        := $(VENV)/bin/python
BUILD      := build
STAMPS     := $(BUILD)/stamps
# Where `make setup` puts the otel-ebpf-receiver, otel-ebpf-model and otel-ebpf-lab launchers.
BINDIR     ?= /usr/local/bin
PYTEST_ARGS ?=
RUN_ARGS   ?=

.PHONY: run test setup setup-lab setup-train host host-lab venv venv-lab venv-train launchers uninstall-launchers \
        bench model lab detection-report clean help

include collector-config/collector.mk

help:
	@echo "make run    - set up the agent (idempotent) and start it"
	@echo "make test   - set up the agent, test and lab tools (idempotent) and run the whole test-suite"
	@echo "make setup  - set up the agent only: packages, headers, venv, launchers in $(BINDIR)"
	@echo "make setup-train - also the training libraries (otel-ebpf-model train/export)"
	@echo "make uninstall-launchers - remove the launchers from $(BINDIR)"
	@echo "make bench  - run the benchmarks in bench/ and print their tables"
	@echo "make model  - record scenarios and rebuild the bundled models"
	@echo "make lab    - record labelled windows from every lab scenario"
	@echo "make detection-report - measure detection and mitigation quality"

# --- set-up: the agent (make run), plus training (setup-train), plus test and lab tools (setup-lab, make test) ---

setup: host venv launchers
setup-train: host venv-train launchers
setup-lab: host-lab venv-lab launchers

# Host packages, kernel headers and mounts. Re-checked every time (cheap: dpkg-query and mountpoint).
host:
	@bash deploy/host-setup.sh
host-lab:
	@bash deploy/host-setup.sh --lab

# A virtual environment on Debian's python3, so Debian's bcc (pure Python over libbcc.so) can be linked in.
$(VPY):
	$(PYTHON) -m venv $(VENV)

# One stamp per extras set; each reinstalls only when pyproject.toml changes. A wider set implies the narrower
# ones, so `make test` followed by `make run` installs nothing more.
define venv_stamp
$(STAMPS)/venv$(1): pyproject.toml | $(VPY)
	@mkdir -p $(STAMPS)
	@site=$$$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  ln -sfn /usr/lib/python3/dist-packages/bcc $$$$site/bcc
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.$(2)'
	@$(VPY) -c 'import bcc, onnxruntime, opentelemetry.sdk$(3)' && touch $$@ $(4)
endef
TRAIN_IMPORTS := $(COMMA) sklearn$(COMMA) skl2onnx
$(eval $(call venv_stamp,,,,))
$(eval $(call venv_stamp,-train,[train],$(TRAIN_IMPORTS),$(STAMPS)/venv))
$(eval $(call venv_stamp,-lab,[dev$(COMMA)train],$(TRAIN_IMPORTS)$(COMMA) pytest,$(STAMPS)/venv $(STAMPS)/venv-train))

venv: host $(STAMPS)/venv
venv-train: host $(STAMPS)/venv-train
venv-lab: host-lab $(STAMPS)/venv-lab

# Launchers on PATH (README commands work as written, also under sudo). Idempotent; says what it changed.
launchers: $(STAMPS)/venv
	@bash deploy/install-launchers.sh $(CURDIR) $(BINDIR)
uninstall-launchers:
	@bash deploy/install-launchers.sh --remove $(CURDIR) $(BINDIR)

run: setup
	$(VPY) -m otel_ebpf_receiver run $(RUN_ARGS)

test: setup-lab collector
	CI=$${CI:-} $(VPY) -m pytest -ra $(PYTEST_ARGS)

# The lab, model rebuilds and benchmarks drive load generators and train models: they need the lab set-up
# (added here as a prerequisite, so their own rules below stay as they are).
model lab detection-report bench: setup-lab

# --- end of set-up ----------------------------------------------------------------------------------------------

# Rebuild the bundled models from scenarios driven on this host (~12 minutes): otel-ebpf-lab rebuild.
model: setup-lab collector
	$(VPY) -m model_export.lab rebuild

# The scenario lab: record labelled windows from every scenario (namespace hosts, bounded floods and loads).
lab: setup
	@mkdir -p build/lab
	$(VPY) -m model_export.lab record -o build/lab/windows.csv

# Run every scenario against the agent (enforce mode) and print detection quality: precision/recall/F1 per window,
# false alarms per hour, time to warning / state flip / first XDP drop, ramp level at the warning.
# Then, offline, the held-out evaluation (leave one incident family out of training, otel-ebpf-lab holdout) on the
# recording the bundled models were trained on (HOLDOUT_WINDOWS: shipped beside the training code, make model
# writes it), with benign time never trained on (HOLDOUT_BENIGN: 13.9 quiet minutes, look-alikes included, shipped).
HOLDOUT_WINDOWS ?= model_export/lab/data/training-windows.csv.gz
HOLDOUT_BENIGN ?= model_export/lab/data/eval-benign-20261202-0451.csv.gz
detection-report: setup
	@mkdir -p build/lab
	$(VPY) -m model_export.lab report --markdown build/lab/detection-report.md
	@if [ -f "$(HOLDOUT_WINDOWS)" ]; then \
		$(VPY) -m model_export.lab holdout --windows "$(HOLDOUT_WINDOWS)" \
			$(foreach f,$(HOLDOUT_BENIGN),--benign "$(f)") --markdown build/lab/holdout-report.md; \
	else echo "detection-report: no $(HOLDOUT_WINDOWS) (make model records it): held-out evaluation skipped"; fi

bench: setup
	$(VPY) bench/run_all.py

clean:
	rm -rf $(BUILD) $(VENV)

# The local observability stack in one command: the agent (every probe) → the Collector → Prometheus on :9090 and
# Jaeger on :16686, all on loopback, until Ctrl-C (or SIGTERM), which stops everything it started. Options go in
# STACK_ARGS, e.g. STACK_ARGS="--prometheus-port 19090 --duration 10m"; see `.venv/bin/python -m tests.stack -h`.
.PHONY: stack
stack: setup-lab collector jaeger
	$(VPY) -m tests.stack $(STACK_ARGS)
