# Builds the project's OpenTelemetry Collector, build/otelcol/otelcol-ebpf, from collector-config/builder-config.yaml
# with the official builder (go.opentelemetry.io/collector/cmd/builder) at the manifest's release.
#
#   make collector                              from the top Makefile (which includes this file)
#   make -f collector-config/collector.mk collector     standalone, from the repository root
#   make jaeger                                 Jaeger v2 (a trace backend for tests and development)
#
# The binary is rebuilt only when the manifest is newer than it, so a second `make collector` is a no-op.
# Cold builds are slow (the Collector's module graph is large); Go's module cache (~/go/pkg/mod) and build
# cache (~/.cache/go-build) live outside the work tree, so a fresh clone on the same machine rebuilds fast.
# Needs Go >= 1.26 (on PATH or in /usr/local/go; Debian 12's golang is too old). Network: the Go module proxy.
#
# Variables are prefixed OTELCOL_ so they do not clash with the including Makefile.

# The repository root, found from this file's own location, so it works included or standalone. Run from the
# root (the usual case) every path below is plain repo-relative (build/otelcol/otelcol-ebpf); run with
# -f from elsewhere they get the root's path as prefix.
OTELCOL_ROOT     := $(patsubst %/,%,$(dir $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))))
OTELCOL_R        := $(if $(filter .,$(OTELCOL_ROOT)),,$(OTELCOL_ROOT)/)
OTELCOL_MANIFEST := $(OTELCOL_R)collector-config/builder-config.yaml
OTELCOL_BIN      := $(OTELCOL_R)build/otelcol/otelcol-ebpf
# The builder version is the manifest's core version (one source of truth): the otlpreceiver line.
OTELCOL_VERSION  := $(shell sed -n 's|^ *- gomod: go.opentelemetry.io/collector/receiver/otlpreceiver \(v[0-9][^ ]*\).*|\1|p' $(OTELCOL_MANIFEST))
# The builder lands in a directory named by its version, so changing the pin installs the matching builder.
OTELCOL_GOBIN    := $(OTELCOL_R)build/gobin/builder-$(OTELCOL_VERSION)
OTELCOL_BUILDER  := $(OTELCOL_GOBIN)/builder
# Go from PATH, else where the official tarball installs it (non-login shells may lack /usr/local/go/bin).
OTELCOL_GO       ?= $(or $(shell command -v go 2>/dev/null),$(wildcard /usr/local/go/bin/go),go)
# The builder runs `go` itself: put the same one first on its PATH. No VCS stamping (a CI checkout may not be a
# git work tree, and the stamp would change the binary on every commit).
OTELCOL_ENV      := $(if $(findstring /,$(OTELCOL_GO)),PATH="$(dir $(OTELCOL_GO)):$$PATH") GOFLAGS="$$GOFLAGS -buildvcs=false"

.PHONY: collector collector-clean jaeger

collector: $(OTELCOL_BIN)

$(OTELCOL_BUILDER):
	@test -n "$(OTELCOL_VERSION)" || { echo "collector.mk: no otlpreceiver version in $(OTELCOL_MANIFEST)" >&2; exit 1; }
	@mkdir -p $(OTELCOL_GOBIN)
	$(OTELCOL_ENV) GOBIN=$(abspath $(OTELCOL_GOBIN)) $(OTELCOL_GO) install go.opentelemetry.io/collector/cmd/builder@$(OTELCOL_VERSION)

# Order-only on the builder: its path carries the version, and a re-installed builder alone is no reason to
# relink. CGO_ENABLED=0 gives a static binary that runs on any glibc (and in a distroless image).
# The builder writes main.go/go.mod next to the binary; go build only replaces the binary on success, so a
# failed build leaves the old (older-than-manifest) binary and the next `make collector` tries again.
$(OTELCOL_BIN): $(OTELCOL_MANIFEST) | $(OTELCOL_BUILDER)
	cd $(OTELCOL_ROOT) && $(OTELCOL_ENV) CGO_ENABLED=0 $(abspath $(OTELCOL_BUILDER)) --config=collector-config/builder-config.yaml
	@touch $@

collector-clean:
	rm -rf $(OTELCOL_R)build/otelcol

# Jaeger v2 (`cmd/jaeger` of the github.com/jaegertracing/jaeger module; the module's v1.x tags carry the v2
# binary) as build/jaeger/jaeger, run with collector-config/jaeger.yaml (in-memory store, query API on 16686).
# `go install ...@version` refuses it because its go.mod has a replace directive, so it is built inside a
# throw-away module that repeats that replace. Cold: about 5-6 minutes on 2 cores; then cached like the above.
OTELCOL_JAEGER_VERSION := v1.76.0
OTELCOL_JAEGER_DIR     := $(OTELCOL_R)build/jaeger
OTELCOL_JAEGER_BIN     := $(OTELCOL_JAEGER_DIR)/$(OTELCOL_JAEGER_VERSION)/jaeger

jaeger: $(OTELCOL_JAEGER_BIN)
	@ln -sfn $(OTELCOL_JAEGER_VERSION)/jaeger $(OTELCOL_JAEGER_DIR)/jaeger

$(OTELCOL_JAEGER_BIN):
	rm -rf $(OTELCOL_JAEGER_DIR)/src && mkdir -p $(OTELCOL_JAEGER_DIR)/src
	cd $(OTELCOL_JAEGER_DIR)/src && $(OTELCOL_ENV) $(OTELCOL_GO) mod init otel-ebpf-receiver/jaeger-build
	cd $(OTELCOL_JAEGER_DIR)/src && $(OTELCOL_ENV) $(OTELCOL_GO) mod edit \
	    -replace github.com/Shopify/sarama=github.com/Shopify/sarama@v1.33.0
	cd $(OTELCOL_JAEGER_DIR)/src && $(OTELCOL_ENV) $(OTELCOL_GO) get github.com/jaegertracing/jaeger/cmd/jaeger@$(OTELCOL_JAEGER_VERSION)
	cd $(OTELCOL_JAEGER_DIR)/src && $(OTELCOL_ENV) CGO_ENABLED=0 $(OTELCOL_GO) build -trimpath -ldflags="-s -w" \
	    -o $(abspath $@) github.com/jaegertracing/jaeger/cmd/jaeger
