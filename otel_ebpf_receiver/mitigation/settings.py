"""Mitigation settings (the ``mitigation:`` section of the configuration) and their defaults."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("off", "dry-run", "enforce")


@dataclass
class MitigationSettings:
    mode: str = "off"
    attack_states: tuple[str, ...] = ("network_flood", "syn_flood", "udp_flood", "random_source_flood")
    min_share: float = 0.2
    min_packet_rate: float = 500.0
    max_bytes_per_packet: float = 1000.0  # larger average packets: a transfer, not a packet flood (0: no limit)
    ttl: float = 300.0
    max_ttl: float = 86400.0
    max_blocks_per_minute: int = 10
    max_auto_blocks: int = 100
    allow: tuple[str, ...] = ()           # operator CIDRs that are never blocked
    protect_dns: bool = True
    protect_gateway: bool = True

    KEYS = ("mode", "attack_states", "min_share", "min_packet_rate", "max_bytes_per_packet", "ttl", "max_ttl",
            "max_blocks_per_minute", "max_auto_blocks", "allow", "protect_dns", "protect_gateway")
