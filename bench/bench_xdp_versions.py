#!/usr/bin/env python3
"""Per-packet cost of bpf/xdp.bpf.c against the same program from another checkout, in one run.

    git worktree add /tmp/before <commit>      # or any copy of an older tree
    sudo .venv/bin/python bench/bench_xdp_versions.py /tmp/before --rounds 21
    sudo .venv/bin/python bench/bench_xdp_versions.py /tmp/before --sample-shift 5   # per-source sampled, as at 1 Mpps

Why a second XDP bench: a change to the per-packet path (kernel-side TTLs read a clock on a list match) is a few ns
on a program of ~100 ns, well inside the drift between two runs of bench/bench_xdp.py on a busy machine. Here both
programs are compiled from their own source with the same settings, share the same pinned lists (10,000 addresses,
or 10,000 /24 prefixes, imported by this checkout), and run in a shuffled order in every round
(``bpftool prog run ... repeat N``, BPF_PROG_TEST_RUN: the program's own cost, no driver), so drift and noisy
neighbours hit both alike; the medians and their ratio are printed, with the median of the per-round ratios.
``--sample-shift k`` writes k (and, for a program that has it, the matching sample_mask) into each program's
xdp_config, as the agent does under a flood; without it the config stays zero: per-source exact. A program that
reads xdp_config as a direct map value (XDP_CONFIG_FD) gets an array of its own, made here as the probe makes it.
Nothing is attached; the pin dirs are private and removed at the end.

The other checkout must have bpf/xdp.bpf.c with the same map layouts (the lists are adopted through their pins).
"""

from __future__ import annotations

import argparse
import ctypes as ct
import ipaddress
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_xdp import N_ADDRESSES, prog_id_of_fd, prog_run, random_addresses, udp_frame  # noqa: E402
from otel_ebpf_receiver.probes import contract  # noqa: E402
from otel_ebpf_receiver.probes.base import program_text  # noqa: E402
from otel_ebpf_receiver.probes.xdp import probe as xdp  # noqa: E402
from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist  # noqa: E402
from otel_ebpf_receiver.kernel import bpfsys  # noqa: E402
from otel_ebpf_receiver.probes.xdp.pins import remove_pins  # noqa: E402
from otel_ebpf_receiver.probes.xdp.sources import MAX_SAMPLE_SHIFT, sample_mask  # noqa: E402

PASS, DROP = 2, 1  # XDP_PASS, XDP_DROP


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="the other checkout (a directory with bpf/xdp.bpf.c)")
    parser.add_argument("--rounds", type=int, default=21, help="shuffled rounds, median reported (default 21)")
    parser.add_argument("--repeat", type=int, default=1_000_000, help="runs per bpftool prog run (default 1e6)")
    parser.add_argument("--sample-shift", type=int, default=0, choices=range(MAX_SAMPLE_SHIFT + 1), metavar="K",
                        help="per-source sampling shift written into both programs' xdp_config (default 0: exact)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("bpftool"):
        print("bench_xdp_versions: run as root, with bpftool (deploy/host-setup.sh installs it)", file=sys.stderr)
        return 1
    sources = {"before": Path(args.before) / "bpf" / "xdp.bpf.c", "after": REPO / "bpf" / "xdp.bpf.c"}
    if not sources["before"].is_file():
        print(f"bench_xdp_versions: no bpf/xdp.bpf.c under {args.before}", file=sys.stderr)
        return 1
    from bcc import BPF

    work = Path(tempfile.mkdtemp(prefix="bench-xdp-versions-"))
    addresses = random_addresses(N_ADDRESSES)
    prefixes = list(dict.fromkeys(str(ipaddress.ip_network(a + "/24", strict=False))
                                  for a in random_addresses(N_ADDRESSES, seed=2)))
    rnd = random.Random(3)
    frames = {"pass": udp_frame("192.0.2.77"), "drop": udp_frame(rnd.choice(addresses)),
              "drop_prefix": udp_frame(str(ipaddress.ip_network(rnd.choice(prefixes)).network_address + 77))}
    paths = {}
    for name, frame in frames.items():
        paths[name] = work / f"{name}.bin"
        paths[name].write_bytes(frame)
    lists = {"10,000 addresses": addresses, "10,000 /24 prefixes": prefixes}
    programs: dict[tuple[str, str], int] = {}
    loaded, pins, config_fds = [], [], []
    try:
        for n, (label, entries) in enumerate(lists.items()):
            pin = f"/sys/fs/bpf/oer-bench-versions-{os.getpid()}-{n}"
            remove_pins(pin)
            pins.append(pin)
            (work / f"list{n}.txt").write_text("\n".join(entries) + "\n")
            with Blocklist(pin, str(work / f"state{n}")) as bl:
                bl.import_file(str(work / f"list{n}.txt"))
            for version, src in sources.items():
                text = src.read_text()
                known = {k: v for k, v in xdp.C_CONSTANTS.items() if k in text}
                cflags = [f"-I{src.parent}", f'-DPIN_DIR="{pin}"', "-DIFACE_SLOTS=2", "-DIFACE_SLOT(i)=(0)",
                          # an older file may lack constants added since: check the ones it has
                          f"-DCHECK_PYTHON_CONSTANTS={contract.constant_checks(known)}"]
                config_fd = None
                if "XDP_CONFIG_FD" in text:  # struct config in an array of our own, read as a direct value
                    config_fd = bpfsys.map_create(bpfsys.MAP_TYPE_ARRAY, 4, xdp.CONFIG.size, 1, name="xdp_config")
                    config_fds.append(config_fd)
                    cflags.append(f"-DXDP_CONFIG_FD={config_fd}")
                b = BPF(text=program_text(src), cflags=cflags)
                loaded.append(b)
                if args.sample_shift and config_fd is not None:
                    bpfsys.map_update(config_fd, struct.pack("=I", 0),
                                      xdp.CONFIG.pack(1, args.sample_shift, sample_mask(args.sample_shift)))
                elif args.sample_shift:
                    config = b["xdp_config"]
                    value = config.Leaf()
                    value.epoch, value.sample_shift = 1, args.sample_shift
                    if hasattr(value, "sample_mask"):  # a program that tests a mask rather than shifting by k
                        value.sample_mask = sample_mask(args.sample_shift)
                    config[ct.c_int(0)] = value
                programs[(label, version)] = prog_id_of_fd(b.load_func(xdp.PROGRAM, BPF.XDP).fd)
        samples: dict[tuple[str, str, str], list[int]] = {}
        order = list(programs.items())
        for r in range(args.rounds):
            random.Random(r).shuffle(order)  # no program always runs right after the same other one
            for (label, version), prog_id in order:
                for path in ("pass", "drop"):
                    frame = paths["drop_prefix"] if (path == "drop" and "prefixes" in label) else paths[path]
                    verdict, ns = prog_run(prog_id, frame, args.repeat)
                    if verdict != (DROP if path == "drop" else PASS):
                        raise RuntimeError(f"{version} on {label}, {path} path: verdict {verdict}")
                    samples.setdefault((label, version, path), []).append(ns)
    finally:
        for b in loaded:
            b.cleanup()
        for fd in config_fds:
            bpfsys.close(fd)
        for pin in pins:
            remove_pins(pin)
        shutil.rmtree(work, ignore_errors=True)
    mode = f"per-source sampled, k = {args.sample_shift}" if args.sample_shift else "per-source exact"
    print(f"\n### XDP per-packet cost, {args.before} (before) vs this checkout (after): BPF_PROG_TEST_RUN, 64-byte "
          f"UDP/IPv4, {mode}, median of {args.rounds} shuffled rounds x {args.repeat:,} runs; kernel "
          f"{os.uname().release}\n")
    print("| list, path | before (ns/packet) | after (ns/packet) | after / before | median of per-round ratios |")
    print("|---|---:|---:|---:|---:|")
    for label in lists:
        for path in ("pass", "drop"):
            before_ns, after_ns = samples[(label, "before", path)], samples[(label, "after", path)]
            before, after = statistics.median(before_ns), statistics.median(after_ns)
            per_round = statistics.median(a / b for a, b in zip(after_ns, before_ns))
            print(f"| {label}, {path} | {before:.0f} | {after:.0f} | {after / before:.2f} | {per_round:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
