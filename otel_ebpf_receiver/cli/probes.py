"""`otel-ebpf-receiver probes`: every probe, its metrics and features, and whether this kernel can run it."""

from __future__ import annotations

import argparse


def cmd_probes(args: argparse.Namespace) -> int:
    from ..probes import REGISTRY

    for name, cls in REGISTRY.items():
        reason = cls.unavailable_reason()
        status = "available" if reason is None else f"NOT AVAILABLE: {reason}"
        print(f"{name}: {cls.summary}\n  status: {status}")
        print(f"  hooks: {', '.join(h.tracepoint for h in cls.hooks) or 'network interfaces (XDP)'}")
        print("  metrics:")
        for m in cls.metrics:
            attrs = f" [{', '.join(m.attributes)}]" if m.attributes else ""
            print(f"    {m.name} ({m.kind}, {m.unit}){attrs}: {m.description}")
        if cls.features:
            print("  features:")
            for f in cls.features:
                print(f"    {f.name}: {f.description}")
        print()
    return 0




def register(sub: argparse._SubParsersAction) -> None:
    probes = sub.add_parser("probes", help="list probes, their metrics and whether this kernel can run them")
    probes.set_defaults(handler=cmd_probes)
