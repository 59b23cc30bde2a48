"""The XDP probe and the source lists it enforces.

``probe`` attaches bpf/xdp.bpf.c and reads its maps; ``lists`` says what an entry is and how the C side keys it;
``pins`` opens the pinned list maps after checking their layout; ``sidecar`` keeps what the kernel does not need
(reasons, wall-clock expiry); ``blocklist`` keeps maps and sidecar in step for the agent and the CLI alike."""

from .probe import SourceRate, XdpProbe

__all__ = ["SourceRate", "XdpProbe"]
