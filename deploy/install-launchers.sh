#!/usr/bin/env bash
# Puts the project's commands on PATH: BINDIR/otel-ebpf-receiver, otel-ebpf-model and otel-ebpf-lab, each a
# two-line script that execs the entry point in this checkout's .venv (so `sudo otel-ebpf-receiver doctor` works
# as the README writes it; sudo's secure_path includes /usr/local/bin). Idempotent: a launcher already right is
# left alone, one pointing at another checkout is rewritten, a file that is not ours is never touched.
#   deploy/install-launchers.sh REPO [BINDIR]            install (BINDIR default /usr/local/bin)
#   deploy/install-launchers.sh --remove REPO [BINDIR]   remove ours (what `make uninstall-launchers` runs)
set -euo pipefail

say() { echo "launchers: $*"; }
MARKER="# otel-ebpf-receiver launcher"
COMMANDS=(otel-ebpf-receiver otel-ebpf-model otel-ebpf-lab)

remove=false
[ "${1:-}" = "--remove" ] && { remove=true; shift; }
repo=$(cd "${1:?usage: install-launchers.sh [--remove] REPO [BINDIR]}" && pwd)
bindir=${2:-/usr/local/bin}

for cmd in "${COMMANDS[@]}"; do
    target=$bindir/$cmd
    if [ -e "$target" ] && ! grep -qF "$MARKER" "$target"; then
        say "$target exists and is not ours: left alone (remove it, then run this again)"
        continue
    fi
    if $remove; then
        [ -e "$target" ] && rm -f "$target" && say "removed $target"
        continue
    fi
    [ -x "$repo/.venv/bin/$cmd" ] || { echo "launchers: $repo/.venv/bin/$cmd missing: run make setup" >&2; exit 1; }
    entry=$(printf %q "$repo/.venv/bin/$cmd")
    wanted=$(printf '#!/bin/sh\n%s (make setup; remove: make uninstall-launchers)\n%s\nexec %s "$@"\n' "$MARKER" \
             "[ -x $entry ] || { echo \"$cmd: $entry is missing: run make setup in $repo\" >&2; exit 127; }" "$entry")
    if [ "$(cat "$target" 2>/dev/null)" != "$wanted" ]; then
        mkdir -p "$bindir"
        printf '%s\n' "$wanted" > "$target.tmp.$$"
        chmod 0755 "$target.tmp.$$"
        mv -f "$target.tmp.$$" "$target"
        say "$target -> $repo/.venv/bin/$cmd"
    fi
done
