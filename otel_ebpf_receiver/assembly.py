"""The one place where a running agent is put together from a configuration: telemetry, probes, the state
classifier, mitigation and the live view, in that order, with one close-on-failure path. ``run``, the recorder,
the scenario lab and the tests all call :func:`build_agent`."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable, Sequence

from .agent import Agent, MetricSource
from .config import Config
from .errors import AgentError, PrivilegeError, ProbeError
from .memory import release_after_load
from .otel_env import export_interval_ms
from .probe_cost import ProbeCost, build_probe_cost
from .probes import REGISTRY
from .probes.base import Probe
from .telemetry import Telemetry

log = logging.getLogger("otel_ebpf_receiver")

Say = Callable[[str], None]

# Capabilities that let a process load tracing and XDP programs (linux/capability.h numbers).
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39


def effective_capabilities() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = effective_capabilities()
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    if not (has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))):
        raise PrivilegeError("must run as root (or with CAP_BPF and CAP_PERFMON) to load eBPF programs; "
                             "try: sudo otel-ebpf-receiver run")


def load_probes(wanted: Sequence[str | Probe], settings: dict[str, dict[str, Any]], say: Say,
                on_event: Callable[[str, dict[str, Any]], None] | None = None) -> list[Probe]:
    """Instantiate (names) and attach; a probe that cannot run here is skipped with one line, never a crash.
    ``wanted`` holds probe names or probe objects not yet loaded; empty means every registered probe.
    ``on_event(name, attributes)`` receives probe events (blocklist changes) as OTel log events."""
    from .probes.syscall_hub import load_shared

    loaded: list[Probe] = []
    candidates: list[Probe] = []
    try:
        for item in wanted or list(REGISTRY):
            probe = item if isinstance(item, Probe) else None
            cls = type(probe) if probe is not None else REGISTRY[item]
            reason = cls.unavailable_reason()
            if reason:
                say(f"probe {cls.name} disabled: {reason}")
                continue
            probe = probe or cls(settings.get(cls.name))
            probe.on_event = on_event
            candidates.append(probe)
        # The syscall-based probes first, as one program (probes/syscall_hub.py); those it could not take load
        # alone below, on their classic tracepoints.
        shared = [p for p in candidates if p.syscall_hub]
        if shared:
            load_shared(shared, say)
        for probe in candidates:
            cls = type(probe)
            if probe.hub is not None:
                loaded.append(probe)
                continue
            try:
                probe.load()
            except ProbeError as exc:
                say(str(exc))
                continue
            except AgentError:
                probe.close()
                raise
            except Exception as exc:  # bcc raises bare Exceptions for attach failures
                say(f"probe {cls.name} disabled: {exc}")
                probe.close()
                continue
            loaded.append(probe)
    except BaseException:
        for probe in candidates:
            if probe in loaded or probe.hub is not None:
                probe.close()
        raise
    if not loaded:
        what = ", ".join(p if isinstance(p, str) else p.name for p in wanted) if wanted else "any probe"
        raise AgentError(f"could not attach {what} on this kernel; run `otel-ebpf-receiver doctor` to see why")
    return loaded


def build_mitigator(config: Config, probes: Sequence[Probe], telemetry: Telemetry, classifier: Any,
                    say: Say) -> Any:
    """The mitigator the configuration asks for, wired to the XDP probe's blocklist and busiest sources; None when
    mitigation is off or there is no XDP probe to act through. Enforce mode refuses to start (one line) when this
    host's addresses cannot be read: its never-block list would be missing exactly what it is for."""
    from .mitigation import HardAllowlist, MitigationSettings, Mitigator
    from .probes.xdp.lists import ALLOW
    from .probes.xdp.sidecar import sidecar_path

    settings = MitigationSettings(**config.mitigation)
    if settings.mode == "off":
        return None
    xdp = next((p for p in probes if p.name == "xdp"), None)
    if xdp is None or xdp.blocklist is None:
        say(f"mitigation {settings.mode} needs the xdp probe (probe_settings.xdp.interfaces); mitigation is off")
        return None
    blocklist = xdp.blocklist
    allow = HardAllowlist.build(settings, netns=[None] + ([xdp.netns] if xdp.netns else []),
                                extra=lambda: [(cidr, "XDP allowlist") for cidr in blocklist.cidrs(ALLOW)])
    if allow.error:
        if settings.mode == "enforce":
            allow.close()
            raise AgentError(f"mitigation enforce refused: {allow.error}; the never-block list needs this host's "
                             f"addresses and gateways (install iproute2), or use mitigation mode dry-run")
        say(f"mitigation dry-run: {allow.error}; would_block events may name this host's own addresses")
    incidents = getattr(classifier, "incidents", None)
    say(f"mitigation {settings.mode}: attack states {', '.join(settings.attack_states)}; "
        f"{len(allow.networks)} protected prefixes")
    return Mitigator(settings, blocklist, allow, emit=telemetry.emit_event,
                     span_event=incidents.event if incidents is not None else None,
                     top_sources=lambda: xdp.top_sources(xdp.settings["top_sources"]),
                     state_file=sidecar_path(blocklist.pin_dir, xdp.settings["state_dir"], "mitigation"))


def build_agent(config: Config, *, say: Say | None = None, probes: Sequence[Probe] = (),
                classify: bool = True, live: bool | None = None, privileged: bool = True,
                metric_readers: Sequence[Any] = (), log_exporter: Any = None, span_exporter: Any = None) -> Agent:
    """A ready agent: telemetry, then the probes of ``config.probes`` (or the given ``probes`` objects, not yet
    loaded), then — with ``classify`` — the state classifier (bundled model, model directory) and the mitigation
    the configuration asks for, then the live view (``live`` None: as ``config.live`` says for this terminal).
    Anything that fails half way closes what was built before it, so nothing stays attached.

    ``metric_readers``, ``log_exporter`` and ``span_exporter`` add in-process outputs (tests, the lab)."""
    say = say or (lambda line: log.warning(line))
    if privileged:
        check_privileges()
    telemetry = Telemetry(config.exporter, metric_readers=metric_readers, log_exporter=log_exporter,
                          span_exporter=span_exporter, cardinality_limit=config.max_series_per_metric)
    loaded: list[Probe] = []
    classifier: Any = None
    cost: ProbeCost | None = None
    mitigator: Any = None
    try:
        loaded = load_probes(list(probes) or list(config.probes), config.probe_settings, say,
                             on_event=telemetry.emit_event)
        sources: list[MetricSource] = []
        cost = build_probe_cost(config.bpf_stats, loaded, say)
        if cost is not None:
            sources.append(cost)
        actors: list[Any] = []
        on_reload = None
        if classify:
            from .state.classifier import build_classifier

            classifier = build_classifier(config, [p.name for p in loaded], telemetry, say)
            sources.append(classifier)
            on_reload = classifier.watcher.request_reload
            mitigator = build_mitigator(config, loaded, telemetry, classifier, say)
            if mitigator is not None:
                sources.append(mitigator)
                actors.append(mitigator)
        wanted = [p.name for p in probes] or list(config.probes) or list(REGISTRY)
        skipped = [name for name in wanted if name not in {p.name for p in loaded}]
        agent = Agent(config, telemetry, loaded, classifier=classifier, sources=sources, actors=actors,
                      skipped_probes=skipped, on_reload=on_reload)
        if cost is not None:
            agent.closers.append(cost.close)
        if mitigator is not None:  # its never-block list holds netlink sockets
            agent.closers.append(mitigator.close)
        # Every program is compiled and the model loaded: give back what compiling and loading left resident.
        release_after_load()
    except BaseException:
        for probe in loaded:
            probe.close()
        if cost is not None:
            cost.close()
        if mitigator is not None:
            mitigator.close()
        if classifier is not None:
            classifier.close()
        telemetry.shutdown()
        raise
    from .live import LiveView, live_enabled

    if live if live is not None else live_enabled(config.live, sys.stdout):
        agent.window_listeners.append(LiveView(sys.stdout, agent).render)
    return agent


def run(config: Config, *, metric_readers: Sequence[Any] = (), say: Say | None = None,
        duration: float | None = None) -> None:
    """`otel-ebpf-receiver run`: build the agent, loop until SIGINT/SIGTERM (or for ``duration`` seconds), then
    stop: read the last window, detach every program, flush with a short deadline."""
    from .health import serve_health

    agent = build_agent(config, say=say, metric_readers=metric_readers)
    agent.install_signal_handlers()
    timer = None
    if duration is not None:
        timer = threading.Timer(duration, agent.stop_event.set)
        timer.daemon = True
        timer.start()
    attached = ", ".join(f"{p.name} ({p.mode})" for p in agent.probes)
    log.info("attached %s; exporting metrics to %s every %s ms; state model %s", attached, agent.telemetry.targets,
             export_interval_ms(), agent.classifier.version)
    health = None
    try:
        health = serve_health(config.health_addr, agent)  # None when health_addr is not set
        agent.run()
    finally:
        if health is not None:
            health.close()
        if timer is not None:
            timer.cancel()
        agent.close()
        log.info("stopped: %d probe(s) detached, telemetry flushed", len(agent.probes))


__all__ = ["build_agent", "build_mitigator", "check_privileges", "load_probes", "run"]
