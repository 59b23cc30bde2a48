#!/usr/bin/env bash
# Prepares a Debian 12 host for otel-ebpf-receiver. Idempotent: every step checks before it acts,
# so a second run only prints what it had to do (nothing, usually).
#   deploy/host-setup.sh            the agent: bcc, bpftool, iproute2, python3-venv, kernel headers, mounts
#   deploy/host-setup.sh --lab      also the test-suite's and the scenario lab's tools (load generators, nginx,
#                                   Prometheus); their system services are left disabled (the tests start their own)
#   deploy/host-setup.sh --mounts   only the mounts (used by the systemd unit on each start)
set -euo pipefail

say() { echo "host-setup: $*"; }

[ "$(id -u)" -eq 0 ] || { echo "host-setup: must run as root (loading eBPF programs needs CAP_BPF/CAP_SYS_ADMIN); try: sudo make run" >&2; exit 1; }

mode=${1:-agent}
case "$mode" in
    agent|--lab|--mounts) ;;
    *) echo "host-setup: unknown option $mode; use --lab (test and lab tools too) or --mounts" >&2; exit 2 ;;
esac

mount_if_missing() {  # fstype mountpoint
    if ! mountpoint -q "$2"; then
        mkdir -p "$2"
        mount -t "$1" "$1" "$2"
        say "mounted $1 at $2"
    fi
}

mount_if_missing tracefs /sys/kernel/tracing
mount_if_missing debugfs /sys/kernel/debug
mount_if_missing bpf /sys/fs/bpf
[ "$mode" = "--mounts" ] && exit 0

# What the agent needs. bcc comes from Debian, not PyPI; the agent runs `ip` (XDP mode, protected addresses);
# bpftool is how an operator inspects the pinned blocklist maps.
AGENT_PACKAGES=(python3-bpfcc libbpfcc bpftool iproute2 python3-venv)
# What only the test-suite, the benchmarks and the scenario lab use: load generators, bcc's tools (syscount is the
# benchmark's baseline), xdp-filter, a web server and Prometheus (the tests run their own instances on free ports),
# wrk (bench_probes.py's nginx throughput).
LAB_PACKAGES=(bpfcc-tools python3-dev hping3 xdp-tools netsniff-ng iperf3 stress-ng fio prometheus curl nginx-light wrk
              chromium)  # headless, for tests/test_stack.py (Prometheus' and Jaeger's pages as a browser shows them)
# System services those packages ship and Debian enables on install. Nobody asked for them to run at boot.
LAB_SERVICES=(prometheus nginx)

packages=("${AGENT_PACKAGES[@]}")
[ "$mode" = "--lab" ] && packages+=("${LAB_PACKAGES[@]}")

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    # Debian starts a package's service on install (prometheus, nginx) unless policy-rc.d says no: the tests
    # start their own instances on free ports, so keep the system ones off for the duration of the install.
    policy=/usr/sbin/policy-rc.d
    [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; trap 'rm -f "$policy"' EXIT; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# policy-rc.d keeps the services from starting, not from being enabled at boot: disable them (and stop any
# that a package upgrade started). Works without a running systemd too (systemctl then only edits the links).
if [ "$mode" = "--lab" ] && command -v systemctl >/dev/null; then
    for unit in "${LAB_SERVICES[@]}"; do
        if [ "$(systemctl is-enabled "$unit.service" 2>/dev/null)" = "enabled" ]; then
            systemctl disable --now "$unit.service" >/dev/null 2>&1 || systemctl disable "$unit.service" >/dev/null 2>&1
            say "disabled $unit.service (installed for the tests, which start their own; systemctl enable it if wanted)"
        fi
    done
fi

# bcc compiles programs against kernel headers. Kernels without a headers package (cloud and VM kernels)
# get Debian's generic headers; tracepoint layouts come from tracefs, so the version does not need to match.
KDIR=/lib/modules/$(uname -r)
if [ ! -e "$KDIR/build/include/linux/kconfig.h" ] && [ ! -e "$KDIR/source/include/linux/kconfig.h" ]; then
    if ! ls -d /usr/src/linux-headers-*-amd64 >/dev/null 2>&1; then
        say "no kernel headers for $(uname -r): installing Debian's linux-headers-amd64"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-headers-amd64 >/dev/null
    fi
    arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
    common_dir=${arch_dir%-amd64}-common
    mkdir -p "$KDIR"
    ln -sfn "$arch_dir" "$KDIR/build"
    ln -sfn "$common_dir" "$KDIR/source"
    say "no headers for kernel $(uname -r): linked $KDIR/build -> $arch_dir, $KDIR/source -> $common_dir" \
        "(undo: rm $KDIR/build $KDIR/source)"
fi
