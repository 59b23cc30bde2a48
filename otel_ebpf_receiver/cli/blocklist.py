"""`otel-ebpf-receiver block | unblock | allow | disallow | blocklist [list|import]`: the XDP lists from the shell.

The lists are pinned maps (see probes/xdp/blocklist.py), so these verbs work whether or not the agent runs."""

from __future__ import annotations

import argparse
import json
import os
import time

from ..durations import format_duration, parse_duration
from .common import say
from ..probes.xdp.blocklist import Blocklist
from ..probes.xdp.lists import ALLOW, BLOCK, DEFAULT_PIN_DIR, DEFAULT_STATE_DIR, BlocklistError, Entry, parse_cidr

CLI_EPILOG = """examples:
  otel-ebpf-receiver block 203.0.113.7                        drop everything from one address
  otel-ebpf-receiver block 198.51.100.0/24 --ttl 10m --reason "scanner"
  otel-ebpf-receiver block 2001:db8:bad::/48 --ttl 1d
  otel-ebpf-receiver unblock 198.51.100.0/24
  otel-ebpf-receiver allow 192.0.2.10                         always pass, even inside a blocked prefix
  otel-ebpf-receiver blocklist                                entries with hits, reason and expiry
  otel-ebpf-receiver blocklist import /etc/bad-ips.txt --ttl 1d   one address or CIDR per line, # comments
  otel-ebpf-receiver block 10.0.0.0/8 --force                 a prefix that covers this host, a gateway or DNS

The lists are pinned BPF maps: these commands work whether or not the agent runs, and the agent enforces them
on the interfaces in probe_settings.xdp.interfaces. TTLs run out in the kernel, agent or not: 30s, 10m, 2h, 1d,
1h30m (at most ten years). A prefix covering loopback, this host's addresses, a default gateway, a DNS resolver or
the Collector is refused unless --force: two /1 prefixes would lock the host out.
"""


def _common(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    # Under `blocklist list|import` the defaults are suppressed, or they would overwrite a --pin-dir given
    # before the sub-command (argparse applies a sub-parser's defaults last).
    parser.add_argument("--pin-dir", default=argparse.SUPPRESS if nested else DEFAULT_PIN_DIR,
                        help=f"where the list maps are pinned (default {DEFAULT_PIN_DIR}; as probe_settings.xdp.pin_dir)")
    parser.add_argument("--state-dir", default=argparse.SUPPRESS if nested else DEFAULT_STATE_DIR,
                        help=f"where reasons and expiry times are kept (default {DEFAULT_STATE_DIR})")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds block, unblock, allow, disallow and blocklist [list|import FILE] to the main command."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("block", help="drop all traffic from an address or CIDR prefix (XDP)",
                              epilog=CLI_EPILOG, formatter_class=fmt)
    p.add_argument("cidr", metavar="CIDR", help="address or prefix, IPv4 or IPv6")
    p.add_argument("--ttl", help="remove the entry after this long, e.g. 10m, 2h, 1d (default: never)")
    p.add_argument("--reason", help="free text, shown by `blocklist` and in the log event")
    p.add_argument("--force", action="store_true",
                   help="block even a prefix that covers this host, a gateway, a DNS resolver or the Collector")
    _common(p)
    p.set_defaults(handler=_cmd_block)

    p = subparsers.add_parser("unblock", help="remove an address or prefix from the blocklist", epilog=CLI_EPILOG,
                              formatter_class=fmt)
    p.add_argument("cidr", metavar="CIDR")
    _common(p)
    p.set_defaults(handler=_cmd_unblock)

    p = subparsers.add_parser("allow", help="always pass an address or prefix, even when blocklisted",
                              epilog=CLI_EPILOG, formatter_class=fmt)
    p.add_argument("cidr", metavar="CIDR")
    p.add_argument("--ttl", help="remove the entry after this long (default: never)")
    p.add_argument("--reason")
    _common(p)
    p.set_defaults(handler=_cmd_allow)

    p = subparsers.add_parser("disallow", help="remove an address or prefix from the allowlist", epilog=CLI_EPILOG,
                              formatter_class=fmt)
    p.add_argument("cidr", metavar="CIDR")
    _common(p)
    p.set_defaults(handler=_cmd_disallow)

    p = subparsers.add_parser("blocklist", help="show the block- and allowlist, or import a list of bad addresses",
                              epilog=CLI_EPILOG, formatter_class=fmt)
    _common(p)
    p.set_defaults(handler=_cmd_list, json=False)
    sub = p.add_subparsers(dest="blocklist_command", metavar="{list,import}")
    lp = sub.add_parser("list", help="entries with hits, reason and expiry (the default)")
    lp.add_argument("--json", action="store_true", help="one JSON object per entry, for scripts")
    _common(lp, nested=True)
    lp.set_defaults(handler=_cmd_list)
    ip_ = sub.add_parser("import", help="block every address or CIDR of a file ('-' = stdin)",
                         description="One address or CIDR per line; '#' starts a comment; blank lines are fine. "
                                     "Lines already blocked are skipped; lines longer than 1024 bytes are refused. "
                                     "Exit status 1 if a line is invalid or refused.")
    ip_.add_argument("file", metavar="FILE")
    ip_.add_argument("--ttl", help="TTL for the imported entries (default: never)")
    ip_.add_argument("--reason", help="reason for the imported entries (default: 'imported from FILE')")
    ip_.add_argument("--force", action="store_true",
                     help="import even prefixes that cover this host, a gateway, a DNS resolver or the Collector")
    _common(ip_, nested=True)
    ip_.set_defaults(handler=_cmd_import)


def _open(args: argparse.Namespace, reconcile: bool = False) -> Blocklist:
    if os.geteuid() != 0:
        raise BlocklistError("the blocklist is a set of pinned BPF maps: run this as root (sudo)")
    bl = Blocklist(args.pin_dir, args.state_dir, reconcile=reconcile)
    if bl.migrated is not None:
        say(f"moved {sum(bl.migrated.moved.values())} single addresses in {bl.pin_dir} to this version's list layout "
            f"(hits and TTLs kept)")
    for cidr, why in bl.refused_on_restore:  # the maps were re-created (a reboot) and a row failed the checks
        say(f"not restored from {bl.sidecar.path}: {cidr}: {why}")
    return bl


def _ttl(args: argparse.Namespace) -> float | None:
    return parse_duration(args.ttl, "--ttl") if getattr(args, "ttl", None) else None


def _describe(entry: Entry) -> str:
    extra = []
    if entry.expires_at is not None:
        extra.append(f"expires in {format_duration(entry.expires_at - time.time())}")
    if entry.reason:
        extra.append(f"reason: {entry.reason}")
    return entry.cidr + (f" ({', '.join(extra)})" if extra else "")


def _cmd_block(args: argparse.Namespace) -> int:
    ttl = _ttl(args)
    with _open(args) as bl:
        entry = bl.block(args.cidr, ttl=ttl, reason=args.reason, force=args.force)
        covered = bl.lookup(entry.cidr, ALLOW)
    print(f"blocked {_describe(entry)}")
    if covered is not None:
        print(f"note: {entry.cidr} is also allowlisted, and the allowlist wins (disallow {entry.cidr} to enforce)")
    return 0


def _cmd_unblock(args: argparse.Namespace) -> int:
    with _open(args) as bl:
        removed = bl.unblock(args.cidr)
    net = parse_cidr(args.cidr)
    print(f"unblocked {net}" if removed else f"{net} was not blocked")
    return 0 if removed else 1


def _cmd_allow(args: argparse.Namespace) -> int:
    ttl = _ttl(args)
    with _open(args) as bl:
        entry = bl.allow(args.cidr, reason=args.reason, ttl=ttl)
    print(f"allowed {_describe(entry)}")
    return 0


def _cmd_disallow(args: argparse.Namespace) -> int:
    with _open(args) as bl:
        removed = bl.disallow(args.cidr)
    net = parse_cidr(args.cidr)
    print(f"removed {net} from the allowlist" if removed else f"{net} was not allowlisted")
    return 0 if removed else 1


def _cmd_list(args: argparse.Namespace) -> int:
    with _open(args, reconcile=True) as bl:
        bl.expire()
        entries = bl.list(BLOCK) + bl.list(ALLOW)
    if args.json:
        for e in entries:
            print(json.dumps(e.__dict__, sort_keys=True))
        return 0
    if not entries:
        print("the blocklist is empty (add entries with `otel-ebpf-receiver block CIDR`)")
        return 0
    now = time.time()
    rows = [("CIDR", "LIST", "HITS", "LAST HIT", "EXPIRES", "REASON")]
    for e in entries:
        rows.append((e.cidr, e.list, str(e.hits),
                     f"{format_duration(now - e.last_hit)} ago" if e.last_hit else "-",
                     f"in {format_duration(e.expires_at - now)}" if e.expires_at else "never",
                     e.reason or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.rjust(w) if i == 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip())
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    ttl = _ttl(args)
    with _open(args) as bl:
        result = bl.import_file(args.file, ttl=ttl, reason=args.reason, force=args.force)
    print(f"imported {len(result.added)} entries from {args.file}; skipped {result.skipped_count}")
    for lineno, text, why in result.skipped:
        print(f"  line {lineno}: {text}: {why}")
    if result.skipped_count > len(result.skipped):
        print(f"  ... and {result.skipped_count - len(result.skipped)} more skipped lines")
    return 1 if result.invalid_count else 0
