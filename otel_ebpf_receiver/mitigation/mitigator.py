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

Modes: ``off`` (default, nothing evaluated), ``dry-run`` (events say what would be blocked), ``enforce``.
Rails, each enforced before any map write: a hard allowlist (loopback, this host's addresses, default gateways,
DNS resolvers, the Collector endpoint, operator CIDRs, and the XDP allowlist) that is never blocked even when
flood packets forge those sources; at most ``max_blocks_per_minute`` new blocks in any 60 s and at most
``max_auto_blocks`` automatic entries at once; a TTL that doubles for each repeat offence up to ``max_ttl``.
Every action is an OTel log event and a span event on the open incident.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..model.runtime import Verdict
from ..probes.base import COUNTER, GAUGE, Metric, Reading
from .protected import HardAllowlist
from .settings import MODES, MitigationSettings

log = logging.getLogger("otel_ebpf_receiver")

AUTO_REASON_PREFIX = "auto:"


# -- the engine ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    kind: str          # block | would_block | skipped
    address: str
    reason: str
    ttl: float = 0.0
    packets_per_s: float = 0.0
    share: float = 0.0


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
                 top_sources: Callable[[], Sequence[Any]] | None = None) -> None:
        if settings.mode not in MODES:
            raise ValueError(f"mitigation mode {settings.mode!r}: use one of {', '.join(MODES)}")
        self.settings = settings
        self.blocklist = blocklist
        self.allowlist = allowlist
        self.emit = emit or (lambda name, attrs: None)
        self.span_event = span_event or (lambda name, attrs: None)
        self.clock = clock
        self.top_sources = top_sources or (lambda: [])  # the busiest sources of the window (the XDP probe's)
        self.recent_blocks: deque[float] = deque()
        self.offences: dict[str, int] = {}
        self.expiries: dict[str, float] = {}
        self._pending = Reading()
        self._skipped_reported: set[tuple[str, str]] = set()

    # The rule ---------------------------------------------------------------------------------------------
    def under_attack(self, state: str) -> bool:
        return state in self.settings.attack_states

    def offenders(self, sources: Sequence[Any]) -> list[Any]:
        s = self.settings
        chosen = [src for src in sources if src.share >= s.min_share and src.packets_per_s >= s.min_packet_rate]
        return sorted(chosen, key=lambda src: (src.packets_per_s, src.syn_share), reverse=True)

    def auto_entries(self) -> int:
        if self.blocklist is None:
            return 0
        return sum(1 for e in self.blocklist.list() if (e.reason or "").startswith(AUTO_REASON_PREFIX))

    def ttl_for(self, address: str) -> float:
        """Base TTL doubled for each earlier offence of this source, capped at max_ttl."""
        repeats = self.offences.get(address, 0)
        return min(self.settings.ttl * (2 ** repeats), self.settings.max_ttl)

    # Each window ------------------------------------------------------------------------------------------
    def act(self, verdict: Verdict) -> None:
        """The agent's call, once per window, with the debounced state. Only a state the serving model declares
        an attack state counts (``Verdict.declared_attack``: the attack-state rule in model/contract.py)."""
        self.step(verdict.state, self.top_sources(), declared=verdict.declared_attack)

    def step(self, state: str, sources: Sequence[Any], *, declared: bool = True) -> list[Action]:
        now = self.clock()
        if self.settings.mode == "off" or not (declared and self.under_attack(state)):
            # No map walk on quiet windows: our own record of what we added, minus what expired.
            live = sum(1 for expiry in self.expiries.values() if expiry > now)
            self._pending.gauges.append(("otel_ebpf_receiver.mitigation.auto_blocks", live, {}))
            return []
        while self.recent_blocks and now - self.recent_blocks[0] > 60:
            self.recent_blocks.popleft()
        actions: list[Action] = []
        auto = self.auto_entries()
        for src in self.offenders(sources):
            protected = self.allowlist.covers(src.address)
            if protected:
                actions.append(Action("skipped", src.address, f"allowlisted ({protected})", 0, src.packets_per_s,
                                      src.share))
                continue
            if 0 < self.settings.max_bytes_per_packet < src.bytes_per_packet:
                actions.append(Action("skipped", src.address, f"bulk transfer ({src.bytes_per_packet:.0f} "
                                      "bytes/packet > max_bytes_per_packet)", 0, src.packets_per_s, src.share))
                continue
            if self.blocklist is not None and self.blocklist.lookup(src.address) is not None:
                continue  # already blocked (by us or by an operator)
            if len(self.recent_blocks) >= self.settings.max_blocks_per_minute:
                actions.append(Action("skipped", src.address, "rate cap (max_blocks_per_minute)", 0,
                                      src.packets_per_s, src.share))
                continue
            if auto >= self.settings.max_auto_blocks:
                actions.append(Action("skipped", src.address, "total cap (max_auto_blocks)", 0, src.packets_per_s,
                                      src.share))
                continue
            ttl = self.ttl_for(src.address)
            reason = (f"{AUTO_REASON_PREFIX} state={state} {src.packets_per_s:.0f} pkt/s "
                      f"share={src.share:.2f} syn={src.syn_share:.2f}")
            if self.settings.mode == "enforce":
                self.blocklist.block(src.address, ttl=ttl, reason=reason)
                self.offences[src.address] = self.offences.get(src.address, 0) + 1
                self.expiries[src.address] = now + ttl
                self.recent_blocks.append(now)
                auto += 1
                actions.append(Action("block", src.address, reason, ttl, src.packets_per_s, src.share))
            else:
                actions.append(Action("would_block", src.address, reason, ttl, src.packets_per_s, src.share))
        for action in actions:
            self._report(action, state)
        self._pending.gauges.append(("otel_ebpf_receiver.mitigation.auto_blocks", auto, {}))
        return actions

    def _report(self, action: Action, state: str) -> None:
        kind = action.reason.split(" (")[0] if action.kind == "skipped" else "rule"
        self._pending.counters.append(("otel_ebpf_receiver.mitigation.actions", 1,
                                       {"mitigation.action": action.kind, "mitigation.reason": kind}))
        attrs = {"mitigation.action": action.kind, "source.address": action.address,
                 "mitigation.reason": action.reason, "mitigation.ttl_s": action.ttl,
                 "mitigation.packets_per_s": action.packets_per_s, "mitigation.share": action.share,
                 "mitigation.mode": self.settings.mode, "system.state": state}
        key = (action.address, action.reason)
        if action.kind == "skipped" and key in self._skipped_reported:
            return  # a forged allowlisted source floods every window: say it once
        self._skipped_reported.add(key)
        name = {"block": "mitigation.block", "would_block": "mitigation.would_block"}.get(action.kind,
                                                                                        "mitigation.skipped")
        self.emit(name, attrs)
        self.span_event(name, attrs)
        log.warning("mitigation %s %s: %s", action.kind, action.address, action.reason)

    def read(self, seconds: float) -> Reading:
        reading, self._pending = self._pending, Reading()
        return reading
