"""Closed-loop mitigation: from the state verdict to XDP blocklist entries, with safety rails.

The per-source verdict is a documented rule on top of the system state rather than a second model: while the
host is in an attack state — the *debounced* state, two consecutive windows: a single window of the model saying
"flood" during a heavy-but-benign transfer once blocked the transfer's source in the lab, and two windows still
put the first drop about 2 s after a flood starts — a source is *offending* when it sends at least ``min_share``
of all packets at ``min_packet_rate`` or more, in packets averaging at most ``max_bytes_per_packet`` (a source
sending full-size packets is a bulk transfer — a backup, a large download — and the floods that exhaust a host
are packet floods: a model that once mistook a transfer for a UDP flood cannot get its source blocked; a
large-packet volumetric flood is left to the operator, or to a setting of 0, which lifts this rail). Early
warnings never block: they fire on a trend, and heavy-but-benign traffic (a backup, a large transfer) is a trend
too. A rule is auditable — an operator can say exactly why an address was blocked — and the state model already
did the hard part, deciding that the host is under attack. Sources are ranked by packet rate (then SYN share).

Modes: ``off`` (default, nothing evaluated), ``dry-run`` (events say what enforce would do, rails and caps
included: a would-be block counts against the caps and escalation as a block would, in memory), ``enforce``.
Rails, each enforced before any map write: a hard allowlist (loopback, this host's addresses, default gateways,
DNS resolvers, the Collector endpoint, operator CIDRs, and the XDP allowlist) that is never blocked even when
flood packets forge those sources; at most ``max_blocks_per_minute`` new blocks in any 60 s and at most
``max_auto_blocks`` automatic entries at once; a TTL that doubles for each repeat offence up to ``max_ttl``.
Every action is an OTel log event and a span event on the open incident. A full blocklist is a rail too: the
source is skipped ("list full") and reported, and the agent carries on — an exception here would end the agent in
the middle of the attack it is there to report.

State. What the mitigator remembers is bounded and pruned every window: live automatic blocks until their TTL,
offences (for escalation) until ``max_ttl`` after their block ended, reported skips until ten quiet minutes —
a random-source flood cannot grow it without bound. In enforce mode the offences and the recent-block times are
kept in a small JSON file next to the blocklist sidecar (written atomically on each block), so a restart — a pod
replaced, an OOM kill — forgets neither the escalation nor the rate cap.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..model.runtime import Verdict
from ..probes.base import COUNTER, GAUGE, Metric, Reading
from ..probes.xdp.lists import BlocklistError, ListFull
from ..probes.xdp.sidecar import write_json_atomically
from .protected import HardAllowlist
from .settings import MODES, MitigationSettings

log = logging.getLogger("otel_ebpf_receiver")

AUTO_REASON_PREFIX = "auto:"
SKIP_REPORT_QUIET_S = 600.0   # a skipped source unseen this long is reported again when it comes back
MAX_REMEMBERED = 10_000       # offences / reported skips kept at most (oldest dropped first)
STATE_VERSION = 1


# -- the engine ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    kind: str          # block | would_block | skipped
    address: str
    reason: str
    ttl: float = 0.0
    packets_per_s: float = 0.0
    share: float = 0.0


@dataclass
class Offence:
    """A source's record for TTL escalation: how often it was blocked, and when its last block ends."""

    count: int
    blocked_until: float


class Mitigator:
    name = "mitigation"
    metrics = (
        Metric("otel_ebpf_receiver.mitigation.actions", COUNTER, "{action}",
               "Mitigation decisions: block, would_block (dry-run) or skipped (rail), per reason.",
               ("mitigation.action", "mitigation.reason")),
        Metric("otel_ebpf_receiver.mitigation.auto_blocks", GAUGE, "{entry}",
               "Blocklist entries added automatically and not yet expired."),
    )

    def __init__(self, settings: MitigationSettings, blocklist: Any, allowlist: HardAllowlist,
                 emit: Callable[[str, dict[str, Any]], None] | None = None,
                 span_event: Callable[[str, dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 top_sources: Callable[[], Sequence[Any]] | None = None,
                 state_file: str | Path | None = None) -> None:
        if settings.mode not in MODES:
            raise ValueError(f"mitigation mode {settings.mode!r}: use one of {', '.join(MODES)}")
        self.settings = settings
        self.blocklist = blocklist
        self.allowlist = allowlist
        self.emit = emit or (lambda name, attrs: None)
        self.span_event = span_event or (lambda name, attrs: None)
        self.clock = clock
        self.top_sources = top_sources or (lambda: [])  # the busiest sources of the window (the XDP probe's)
        # Enforce mode only: dry-run's would-be offences must not escalate real blocks later.
        self.state_file = Path(state_file) if state_file is not None and settings.mode == "enforce" else None
        self.recent_blocks: deque[float] = deque()
        self.offences: dict[str, Offence] = {}
        self.expiries: dict[str, float] = {}    # our live blocks (dry-run: would-be blocks) -> when they end
        self._pending = Reading()
        self._skipped_reported: dict[tuple[str, str], float] = {}  # (address, reason) -> last seen
        self._load_state()

    # The rule ---------------------------------------------------------------------------------------------
    def under_attack(self, state: str) -> bool:
        return state in self.settings.attack_states

    def offenders(self, sources: Sequence[Any]) -> list[Any]:
        s = self.settings
        chosen = [src for src in sources if src.share >= s.min_share and src.packets_per_s >= s.min_packet_rate]
        return sorted(chosen, key=lambda src: (src.packets_per_s, src.syn_share), reverse=True)

    def auto_entries(self, now: float) -> int:
        """Automatic entries in force: enforce counts the blocklist's (its sidecar, no map walk: entries a previous
        agent added count too), dry-run its own would-be blocks."""
        if self.settings.mode == "enforce" and self.blocklist is not None:
            return self.blocklist.count_with_reason(AUTO_REASON_PREFIX)
        return sum(1 for until in self.expiries.values() if until > now)

    def ttl_for(self, address: str) -> float:
        """Base TTL doubled for each earlier offence of this source, capped at max_ttl."""
        offence = self.offences.get(address)
        repeats = offence.count if offence is not None else 0
        return min(self.settings.ttl * (2 ** min(repeats, 64)), self.settings.max_ttl)

    # Each window ------------------------------------------------------------------------------------------
    def act(self, verdict: Verdict) -> None:
        """The agent's call, once per window, with the debounced state. Only a state the serving model declares
        an attack state counts (``Verdict.declared_attack``: the attack-state rule in model/contract.py)."""
        self.step(verdict.state, self.top_sources(), declared=verdict.declared_attack)

    def step(self, state: str, sources: Sequence[Any], *, declared: bool = True) -> list[Action]:
        now = self.clock()
        self.prune(now)
        if self.settings.mode == "off":
            return []
        self.allowlist.refresh()  # cheap unless an address, route or resolver changed
        if not (declared and self.under_attack(state)):
            # No map walk on quiet windows: our own record of what we added, minus what expired.
            self._pending.gauges.append(("otel_ebpf_receiver.mitigation.auto_blocks", len(self.expiries), {}))
            return []
        actions: list[Action] = []
        auto = self.auto_entries(now)
        for src in self.offenders(sources):
            action = self._decide(src, state, now, auto)
            if action is None:
                continue
            if action.kind in ("block", "would_block"):
                self._record_block(src.address, action.ttl, now)
                auto += 1
            actions.append(action)
        if any(a.kind == "block" for a in actions):
            self._save_state()
        for action in actions:
            self._report(action, state, now)
        self._pending.gauges.append(("otel_ebpf_receiver.mitigation.auto_blocks", auto, {}))
        return actions

    def _decide(self, src: Any, state: str, now: float, auto: int) -> Action | None:
        """What to do about one offender: block (or would_block), skipped by a rail, or None (already blocked)."""
        def skipped(reason: str) -> Action:
            return Action("skipped", src.address, reason, 0, src.packets_per_s, src.share)

        protected = self.allowlist.covers(src.address)
        if protected:
            return skipped(f"allowlisted ({protected})")
        if 0 < self.settings.max_bytes_per_packet < src.bytes_per_packet:
            return skipped(f"bulk transfer ({src.bytes_per_packet:.0f} bytes/packet > max_bytes_per_packet)")
        if self.settings.mode == "dry-run" and self.expiries.get(src.address, 0) > now:
            return None  # would already be blocked
        if self.blocklist is not None and self.blocklist.lookup(src.address) is not None:
            return None  # already blocked (by us or by an operator)
        if len(self.recent_blocks) >= self.settings.max_blocks_per_minute:
            return skipped("rate cap (max_blocks_per_minute)")
        if auto >= self.settings.max_auto_blocks:
            return skipped("total cap (max_auto_blocks)")
        ttl = self.ttl_for(src.address)
        reason = (f"{AUTO_REASON_PREFIX} state={state} {src.packets_per_s:.0f} pkt/s "
                  f"share={src.share:.2f} syn={src.syn_share:.2f}")
        if self.settings.mode != "enforce":
            return Action("would_block", src.address, reason, ttl, src.packets_per_s, src.share)
        try:
            self.blocklist.block(src.address, ttl=ttl, reason=reason)
        except ListFull as exc:
            return skipped(f"list full ({exc})")
        except BlocklistError as exc:  # e.g. the address became this host's between refresh and block
            return skipped(f"refused ({exc})")
        return Action("block", src.address, reason, ttl, src.packets_per_s, src.share)

    def _record_block(self, address: str, ttl: float, now: float) -> None:
        previous = self.offences.pop(address, None)  # re-inserted last: dict order is oldest offence first
        self.offences[address] = Offence((previous.count if previous else 0) + 1, now + ttl)
        self.expiries[address] = now + ttl
        self.recent_blocks.append(now)
        while len(self.offences) > MAX_REMEMBERED:
            del self.offences[next(iter(self.offences))]

    def prune(self, now: float) -> None:
        """Forget what no longer matters, so that memory stays bounded under any flood."""
        while self.recent_blocks and now - self.recent_blocks[0] > 60:
            self.recent_blocks.popleft()
        for address in [a for a, until in self.expiries.items() if until <= now]:
            del self.expiries[address]
        for address in [a for a, o in self.offences.items() if o.blocked_until + self.settings.max_ttl < now]:
            del self.offences[address]
        for key in [k for k, seen in self._skipped_reported.items() if now - seen > SKIP_REPORT_QUIET_S]:
            del self._skipped_reported[key]

    def _report(self, action: Action, state: str, now: float) -> None:
        kind = action.reason.split(" (")[0] if action.kind == "skipped" else "rule"
        self._pending.counters.append(("otel_ebpf_receiver.mitigation.actions", 1,
                                       {"mitigation.action": action.kind, "mitigation.reason": kind}))
        attrs = {"mitigation.action": action.kind, "source.address": action.address,
                 "mitigation.reason": action.reason, "mitigation.ttl_s": action.ttl,
                 "mitigation.packets_per_s": action.packets_per_s, "mitigation.share": action.share,
                 "mitigation.mode": self.settings.mode, "system.state": state}
        key = (action.address, action.reason)
        if action.kind == "skipped":
            seen_before = key in self._skipped_reported
            self._skipped_reported.pop(key, None)  # re-inserted last: dict order is least recently seen first
            self._skipped_reported[key] = now
            while len(self._skipped_reported) > MAX_REMEMBERED:
                del self._skipped_reported[next(iter(self._skipped_reported))]
            if seen_before:
                return  # a forged allowlisted source floods every window: say it once
        name = {"block": "mitigation.block", "would_block": "mitigation.would_block"}.get(action.kind,
                                                                                        "mitigation.skipped")
        self.emit(name, attrs)
        self.span_event(name, attrs)
        log.warning("mitigation %s %s: %s", action.kind, action.address, action.reason)

    # Persistence (enforce) --------------------------------------------------------------------------------
    def _load_state(self) -> None:
        if self.state_file is None:
            return
        try:
            data = json.loads(self.state_file.read_text())
            offences = {str(a): Offence(int(c), float(u)) for a, (c, u) in data.get("offences", {}).items()}
            recent = sorted(float(t) for t in data.get("recent_blocks", []))
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError, RecursionError) as exc:
            # A damaged file only loses escalation history; say so once and start afresh.
            log.warning("mitigation: ignoring %s (%s); TTL escalation starts afresh", self.state_file, exc)
            return
        now = self.clock()
        self.offences = dict(sorted(offences.items(), key=lambda item: item[1].blocked_until)[-MAX_REMEMBERED:])
        self.recent_blocks = deque(t for t in recent if 0 <= now - t <= 60)
        self.expiries = {a: o.blocked_until for a, o in self.offences.items() if o.blocked_until > now}
        self.prune(now)

    def _save_state(self) -> None:
        if self.state_file is None:
            return
        data = {"version": STATE_VERSION,
                "offences": {a: [o.count, o.blocked_until] for a, o in self.offences.items()},
                "recent_blocks": list(self.recent_blocks)}
        try:
            self.state_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_json_atomically(self.state_file, data)
        except OSError as exc:  # a full or read-only disk must not stop mitigation
            log.warning("mitigation: cannot write %s (%s); escalation is kept in memory only", self.state_file,
                        exc.strerror)

    def read(self, seconds: float) -> Reading:
        reading, self._pending = self._pending, Reading()
        return reading

    def close(self) -> None:
        self.allowlist.close()
