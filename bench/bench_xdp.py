#!/usr/bin/env python3
"""Per-packet cost of bpf/xdp.bpf.c against xdp-filter (xdp-tools) and an empty XDP program.

    sudo .venv/bin/python bench/bench_xdp.py                  # table 1: ns/packet (BPF_PROG_TEST_RUN)
    sudo .venv/bin/python bench/bench_xdp.py --throughput     # + table 2: packets/s received across veth
    sudo .venv/bin/python bench/bench_xdp.py --rounds 9 --repeat 2000000 --json bench/results/xdp.json

Table 1 runs each program on one 64-byte UDP/IPv4 frame with ``bpftool prog run ... repeat N`` (the kernel's
BPF_PROG_TEST_RUN: the program's own cost, no driver), on the pass path (source not listed) and the drop path
(source listed), with 10,000 listed addresses in every program. Programs are interleaved within each round and
the median of the rounds is reported, so that drifting CPU frequency or noisy neighbours hit all alike.

* ours: the probe as the agent loads it (lists + per-source table), per-source exact (sampling shift 0: what the
  agent runs while the last window stayed at or below ``per_source_exact_below``, 50,000 packets/s);
* ours, per-source sampled: the same program with the sampling shift the agent sets at 1 Mpps (k = 5, see
  otel_ebpf_receiver/probes/xdp/sources.py), i.e. under the floods where the per-packet cost matters;
* ours, per_source off: the same program without the per-source table (setting per_source: false);
* ours, 10,000 /24 prefixes: the blocklist as 10,000 CIDR prefixes, i.e. the LPM-trie path;
* xdp-filter: Debian's xdp-tools 1.3, ``xdp-filter load -f ipv4,ipv6`` with the same 10,000 addresses
  (per-CPU hash of single addresses, matched on source and destination);
* empty: ``return XDP_PASS`` — the floor of BPF_PROG_TEST_RUN itself.

Everything runs in a private network namespace (and a private bpffs for xdp-filter's libxdp) that is deleted at
the end; the pin dir is private too, so a running agent's blocklist is never touched.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from otel_ebpf_receiver.kernel import bpfsys  # noqa: E402
from otel_ebpf_receiver.probes.xdp.blocklist import Blocklist  # noqa: E402
from otel_ebpf_receiver.probes.xdp.pins import remove_pins  # noqa: E402
from model_export.lab.netns import Lab  # noqa: E402
from otel_ebpf_receiver.probes.xdp import XdpProbe  # noqa: E402
from otel_ebpf_receiver.probes.xdp.sources import sample_shift  # noqa: E402

N_ADDRESSES = 10_000
FLOOD_SHIFT = sample_shift(1_000_000, XdpProbe.defaults["per_source_exact_below"])  # what the agent sets at 1 Mpps


def csum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def udp_frame(src: str, dst: str = "10.200.0.1", size: int = 64) -> bytes:
    payload = b"x" * (size - 14 - 20 - 8)
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, socket.inet_aton(src),
                      socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00" + hdr + udp


def random_addresses(n: int, seed: int = 1) -> list[str]:
    rnd = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        a = ipaddress.IPv4Address(rnd.getrandbits(32))
        if a.is_global:
            out[str(a)] = None
    return list(out)


def prog_run(prog_id: int, frame: Path, repeat: int) -> tuple[int, int]:
    """(verdict, ns per run) from bpftool prog run."""
    out = subprocess.run(["bpftool", "prog", "run", "id", str(prog_id), "data_in", str(frame), "repeat", str(repeat)],
                         capture_output=True, text=True)
    m = re.search(r"Return value: (\d+), duration \(average\): (\d+)ns", out.stdout + out.stderr)
    if not m:
        raise RuntimeError(f"bpftool prog run id {prog_id}: {out.stdout} {out.stderr}")
    return int(m.group(1)), int(m.group(2))


def prog_id_of_fd(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as fh:
        for line in fh:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise RuntimeError("no prog_id")


class XdpFilter:
    """xdp-filter loaded on an interface of a lab namespace, filled with addresses through its map."""

    def __init__(self, lab: Lab, host: str, ifname: str = "eth0") -> None:
        self.lab, self.host, self.ifname = lab, host, ifname
        # `ip netns exec` remounts /sys: libxdp wants a bpffs, so give it a private one for the load.
        res = lab.run(host, "sh", "-c", f"mount -t bpf bpf /sys/fs/bpf && xdp-filter load -m native "
                                        f"-f ipv4,ipv6 {ifname}", check=False)
        if res.returncode != 0:
            raise RuntimeError(f"xdp-filter load failed: {res.stderr.strip()}")
        ids = lab.xdp_programs(host)
        if not ids:
            raise RuntimeError("xdp-filter did not attach")
        self.prog_id = ids[0]
        info = json.loads(subprocess.run(["bpftool", "prog", "show", "id", str(self.prog_id), "-j"],
                                         capture_output=True, text=True).stdout)
        self.prog_name = info.get("name", "")
        maps = [json.loads(subprocess.run(["bpftool", "map", "show", "id", str(i), "-j"], capture_output=True,
                                          text=True).stdout) for i in info.get("map_ids", [])]
        self.ipv4 = next((m for m in maps if m.get("name") == "filter_ipv4"), None)
        if self.ipv4 is None:
            raise RuntimeError(f"xdp-filter program {self.prog_name} has no filter_ipv4 map "
                               f"(dispatcher in the way? maps: {[m.get('name') for m in maps]})")

    def add(self, addresses: list[str]) -> None:
        fd = bpfsys.map_fd_by_id(self.ipv4["id"])
        ncpu = len(_possible_cpus())
        value = struct.pack("=Q", 1) * ncpu  # MAP_FLAG_SRC on every CPU (xdp-filter's `ip ADDR -m src`)
        try:
            for a in addresses:
                bpfsys.map_update(fd, socket.inet_aton(a), value)
        finally:
            bpfsys.close(fd)

    def unload(self) -> None:
        self.lab.run(self.host, "sh", "-c", f"mount -t bpf bpf /sys/fs/bpf; xdp-filter unload {self.ifname}",
                     check=False)
        if self.lab.xdp_programs(self.host):
            self.lab.host(self.host).ip("link", "set", "dev", self.ifname, "xdp", "off", check=False)


def _possible_cpus() -> list[int]:
    from bcc.utils import get_possible_cpus

    return get_possible_cpus()


def per_packet_table(args: argparse.Namespace, workdir: Path) -> dict:
    from bcc import BPF

    addresses = random_addresses(N_ADDRESSES)
    prefixes = random_addresses(N_ADDRESSES, seed=2)
    prefixes = list(dict.fromkeys(str(ipaddress.ip_network(a + "/24", strict=False)) for a in prefixes))
    rnd = random.Random(3)
    frames = {
        "pass": udp_frame("192.0.2.77"),                 # TEST-NET-1: in no list
        "drop": udp_frame(rnd.choice(addresses)),
    }
    prefix_drop = udp_frame(str(ipaddress.ip_network(rnd.choice(prefixes)).network_address + 77))
    paths = {}
    for name, frame in {**frames, "drop_prefix": prefix_drop}.items():
        paths[name] = workdir / f"{name}.bin"
        paths[name].write_bytes(frame)
    (workdir / "addresses.txt").write_text("\n".join(addresses) + "\n")
    (workdir / "prefixes.txt").write_text("\n".join(prefixes) + "\n")

    programs: dict[str, int] = {}
    cleanup = []
    with Lab(clients=5, prefix=f"oerbench{os.getpid()}") as lab:
        try:
            def ours(label: str, host: str, listfile: str, **extra) -> XdpProbe:
                pin = f"/sys/fs/bpf/oer-bench-{os.getpid()}-{len(programs)}"
                remove_pins(pin)
                state = workdir / f"state{len(programs)}"
                with Blocklist(pin, str(state)) as bl:
                    added, skipped = bl.import_file(str(workdir / listfile))
                    assert len(added) >= N_ADDRESSES * 0.99, skipped[:3]
                probe = XdpProbe({"interfaces": ["eth0"], "netns": lab.hosts[host].netns, "pin_dir": pin,
                                  "state_dir": str(state), "mode": "native", **extra})
                probe.load()
                cleanup.append(lambda: (probe.close(), remove_pins(pin)))
                programs[label] = probe.attached_program_ids()[0]
                return probe

            ours("ours", "client0", "addresses.txt")
            sampled = ours(f"ours, per-source sampled (k = {FLOOD_SHIFT})", "client4", "addresses.txt")
            sampled.set_sample_shift(FLOOD_SHIFT)
            ours("ours, per_source off", "client1", "addresses.txt", per_source=False)
            ours("ours, 10,000 /24 prefixes", "client2", "prefixes.txt")
            xf = XdpFilter(lab, "client3")
            cleanup.append(xf.unload)
            xf.add(addresses)
            programs["xdp-filter"] = xf.prog_id
            empty = BPF(text="int empty(struct xdp_md *ctx) { return XDP_PASS; }")
            fn = empty.load_func("empty", BPF.XDP)
            cleanup.append(empty.cleanup)
            programs["empty XDP program"] = prog_id_of_fd(fn.fd)

            samples: dict[tuple[str, str], list[int]] = {}
            verdicts: dict[tuple[str, str], int] = {}
            for _ in range(args.rounds):
                for label, prog_id in programs.items():
                    for path_name in ("pass", "drop"):
                        frame = paths["drop_prefix"] if (path_name == "drop" and "prefixes" in label) else paths[path_name]
                        verdict, ns = prog_run(prog_id, frame, args.repeat)
                        samples.setdefault((label, path_name), []).append(ns)
                        verdicts[(label, path_name)] = verdict
        finally:
            for fn_ in reversed(cleanup):
                try:
                    fn_()
                except Exception as exc:  # keep cleaning up
                    print(f"cleanup: {exc}", file=sys.stderr)
    result = {}
    for (label, path_name), values in samples.items():
        # Per round, against xdp-filter run moments before or after: on a shared machine the speed of a whole
        # round drifts (other jobs, CPU frequency) far more than programs differ, and the ratio cancels that.
        ref = samples[("xdp-filter", path_name)]
        ratios = sorted(v / r for v, r in zip(values, ref))
        result.setdefault(label, {})[path_name] = {
            "median_ns": statistics.median(values), "min_ns": min(values), "max_ns": max(values), "samples": values,
            "vs_xdp_filter": statistics.median(ratios), "vs_xdp_filter_range": [ratios[0], ratios[-1]],
            "verdict": verdicts[(label, path_name)]}
    return result


def rx_packets(lab: Lab, host: str) -> int:
    out = lab.host(host).ip("-j", "-s", "link", "show", "dev", "eth0").stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def throughput_table(args: argparse.Namespace, workdir: Path) -> dict:
    """Packets/s the victim receives from a bounded hping3 flood (one sender thread), per program on its eth0."""
    addresses = random_addresses(N_ADDRESSES)
    (workdir / "addresses.txt").write_text("\n".join(addresses) + "\n")
    result: dict[str, float] = {}
    with Lab(clients=1, prefix=f"oerbtp{os.getpid()}") as lab:
        def flood() -> float:
            before = rx_packets(lab, "victim")
            t0 = time.monotonic()
            lab.run("client0", "timeout", str(args.flood_seconds), "hping3", "-q", "--udp", "--flood", "-p", "9",
                    lab.victim.ipv4, check=False, timeout=args.flood_seconds + 10)
            return (rx_packets(lab, "victim") - before) / (time.monotonic() - t0)

        configs = ["no XDP program", "ours", "xdp-filter"]
        runs: dict[str, list[float]] = {c: [] for c in configs}
        for _ in range(args.tp_rounds):
            for config in configs:
                cleanup = None
                if config == "ours":
                    pin = f"/sys/fs/bpf/oer-benchtp-{os.getpid()}"
                    remove_pins(pin)
                    state = workdir / "tpstate"
                    with Blocklist(pin, str(state)) as bl:
                        bl.import_file(str(workdir / "addresses.txt"))
                    probe = XdpProbe({"interfaces": ["eth0"], "netns": lab.victim.netns, "pin_dir": pin,
                                      "state_dir": str(state), "mode": "native"})
                    probe.load()
                    cleanup = lambda: (probe.close(), remove_pins(pin))  # noqa: E731
                elif config == "xdp-filter":
                    xf = XdpFilter(lab, "victim")
                    xf.add(addresses)
                    cleanup = xf.unload
                try:
                    runs[config].append(flood())
                finally:
                    if cleanup:
                        cleanup()
        for config, values in runs.items():
            result[config] = statistics.median(values)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds, median reported (default 7)")
    parser.add_argument("--repeat", type=int, default=1_000_000, help="runs per bpftool prog run (default 1e6)")
    parser.add_argument("--throughput", action="store_true", help="also measure packets/s across veth")
    parser.add_argument("--flood-seconds", type=int, default=3)
    parser.add_argument("--tp-rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_xdp: run as root (loads XDP programs, creates namespaces)", file=sys.stderr)
        return 1
    for tool in ("bpftool", "xdp-filter", "hping3"):
        if not shutil.which(tool):
            print(f"bench_xdp: {tool} is missing (deploy/host-setup.sh installs it)", file=sys.stderr)
            return 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-xdp-"))
    try:
        table = per_packet_table(args, workdir)
        print(f"\n### XDP per-packet cost (BPF_PROG_TEST_RUN, 64-byte UDP/IPv4, {N_ADDRESSES:,} listed sources, "
              f"median of {args.rounds} interleaved rounds x {args.repeat:,} runs; kernel {os.uname().release})\n")
        print("ns/packet: median (min–max); × xdp-filter: median of the per-round ratios (range)\n")
        print("| program | pass path (ns/packet) | pass, × xdp-filter | drop path (ns/packet) | drop, × xdp-filter |")
        print("|---|---:|---:|---:|---:|")
        for label, paths in table.items():
            def cell(p: str) -> str:
                r = paths[p]
                verdict = {1: "", 2: " (passed)"}.get(r["verdict"], f" (verdict {r['verdict']})")
                if label.startswith("empty"):
                    verdict = ""
                return f"{r['median_ns']:.0f} ({r['min_ns']}–{r['max_ns']}){verdict}"

            def vs(p: str) -> str:
                r = paths[p]
                lo, hi = r["vs_xdp_filter_range"]
                return f"{r['vs_xdp_filter']:.2f} ({lo:.2f}–{hi:.2f})"
            empty = label.startswith("empty")
            print(f"| {label} | {cell('pass')} | {vs('pass')} | {cell('drop') if not empty else '—'} | "
                  f"{vs('drop') if not empty else '—'} |")
        out = {"per_packet": table}
        if args.throughput:
            tp = throughput_table(args, workdir)
            print(f"\n### Received packets/s across veth (hping3 --flood, UDP, {args.flood_seconds} s, one sender, "
                  f"median of {args.tp_rounds}; pass path)\n")
            print("| program on the victim's eth0 | packets/s |")
            print("|---|---:|")
            for label, pps in tp.items():
                print(f"| {label} | {pps:,.0f} |")
            out["throughput_pps"] = tp
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
