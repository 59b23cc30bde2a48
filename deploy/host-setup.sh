#!/usr/bin/env bash
# Prepares a Debian 12 host for otel-ebpf-receiver. Idempotent: every step checks before it acts,
# so a second run only prints what is already in place.
#   deploy/host-setup.sh            packages, kernel headers, tracefs/debugfs/bpffs
#   deploy/host-setup.sh --mounts   only the mounts (used by the systemd unit on each start)
set -euo pipefail

say() { echo "host-setup: $*"; }

[ "$(id -u)" -eq 0 ] || { echo "host-setup: must run as root (loading eBPF programs needs CAP_BPF/CAP_SYS_ADMIN); try: sudo make run" >&2; exit 1; }

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
[ "${1:-}" = "--mounts" ] && exit 0

# Packages the agent and its test-suite use. bcc comes from Debian, not PyPI.
PACKAGES=(python3-bpfcc libbpfcc bpfcc-tools bpftool python3-venv python3-dev iproute2
          hping3 xdp-tools netsniff-ng iperf3 stress-ng fio prometheus curl nginx-light)
missing=()
for p in "${PACKAGES[@]}"; do
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
    say "linked $arch_dir as $KDIR/build (kernel $(uname -r) ships no headers)"
fi
