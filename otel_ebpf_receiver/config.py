"""Configuration: defaults < YAML file < OTEL_EBPF_RECEIVER_* variables < command-line flags.

Exporter, endpoint, headers, timeout, resource and export interval are *not* here: they are the standard
OTEL_* variables, read by the OpenTelemetry SDK itself (see telemetry.py). Every bad key or value raises
ConfigError with one line naming it and saying what is accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .durations import parse_duration
from .errors import ConfigError

ENV_PREFIX = "OTEL_EBPF_RECEIVER_"
ENV_CONFIG = ENV_PREFIX + "CONFIG"
"""Path of the YAML configuration file (same as --config)."""
ENV_INTERVAL = ENV_PREFIX + "INTERVAL"
"""Window length, e.g. 1s, 500ms (same as --interval)."""
ENV_PROBES = ENV_PREFIX + "PROBES"
"""Comma-separated probe names, or 'all' (same as --probes)."""
ENV_EXPORTER = ENV_PREFIX + "EXPORTER"
"""otlp, console or none (same as --exporter)."""
ENV_MODEL_DIR = ENV_PREFIX + "MODEL_DIR"
"""Directory watched for .onnx state models (same as --model-dir)."""
ENV_LIVE = ENV_PREFIX + "LIVE"
"""auto, on or off: the terminal live view (same as --live)."""
ENV_LOG_LEVEL = ENV_PREFIX + "LOG_LEVEL"
"""debug, info, warning or error."""
ENV_MITIGATION = ENV_PREFIX + "MITIGATION"
"""Mitigation mode: off, dry-run or enforce (same as --mitigation)."""
ENV_MAX_SERIES = ENV_PREFIX + "MAX_SERIES_PER_METRIC"
"""Cardinality cap: series kept per metric; further attribute sets go into one otel.metric.overflow=true series."""
ENV_HEALTH_ADDR = ENV_PREFIX + "HEALTH_ADDR"
"""HOST:PORT serving /healthz and /readyz (same as --health-addr; default: off)."""
ENV_BPF_STATS = ENV_PREFIX + "BPF_STATS"
"""off or on: turn on the kernel's per-program run time to report each probe's CPU cost (costs a little itself)."""

EXPORTERS = ("otlp", "console", "none")
LIVE_MODES = ("auto", "on", "off")
LOG_LEVELS = ("debug", "info", "warning", "error")
BPF_STATS_MODES = ("off", "on")
# A window reads every probe's maps, scores the model and records every series: at 1 s this costs a few ms of CPU
# (README, "Cost"); below 100 ms it would be a large share of a core, and rates over so few events are noise.
MIN_INTERVAL_SECONDS = 0.1
# The spec's and the SDK's default cardinality limit. A cap below 10 would fold even the handful of states of
# one metric into overflow.
DEFAULT_MAX_SERIES_PER_METRIC = 2000
MIN_MAX_SERIES_PER_METRIC = 10


@dataclass
class Config:
    interval: float = 1.0
    probes: list[str] = field(default_factory=list)  # empty = every probe available on this kernel
    exporter: str | None = None  # None = per signal from OTEL_{METRICS,LOGS,TRACES}_EXPORTER (default otlp)
    model_dir: str | None = None  # None = the bundled default model
    live: str = "auto"
    log_level: str = "info"
    probe_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    mitigation: dict[str, Any] = field(default_factory=dict)  # see mitigation/settings.py
    max_series_per_metric: int = DEFAULT_MAX_SERIES_PER_METRIC
    health_addr: str = ""  # HOST:PORT for /healthz and /readyz (health.py); empty = off
    bpf_stats: str = "off"  # on: report otel_ebpf_receiver.probe.cpu_time/runs (probe_cost.py); off by default
    source: str = "defaults"

    KEYS = ("interval", "probes", "exporter", "model_dir", "live", "log_level", "probe_settings", "mitigation",
            "max_series_per_metric", "health_addr", "bpf_stats")


def _apply(cfg: Config, key: str, value: Any, where: str) -> None:
    from .probes import REGISTRY  # late: the registry imports bcc-free modules only, but keep config light

    if key == "interval":
        cfg.interval = parse_duration(value, f"interval (from {where})")
        if cfg.interval < MIN_INTERVAL_SECONDS:
            raise ConfigError(f"interval {value!r} (from {where}) is shorter than 100ms: a window's reads and model "
                              "score would take a large share of a CPU; use e.g. 1s (default) or 500ms")
    elif key == "max_series_per_metric":
        number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
        if isinstance(number, bool) or not isinstance(number, int) or number < MIN_MAX_SERIES_PER_METRIC:
            raise ConfigError(f"max_series_per_metric {value!r} (from {where}) must be a whole number of at least "
                              f"{MIN_MAX_SERIES_PER_METRIC}; default {DEFAULT_MAX_SERIES_PER_METRIC}")
        cfg.max_series_per_metric = number
    elif key == "probes":
        names = value if isinstance(value, list) else [p for p in str(value).replace(" ", "").split(",") if p]
        if names == ["all"]:
            names = []
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise ConfigError(f"unknown probe {unknown[0]!r} (from {where}); known probes: {', '.join(REGISTRY)}")
        cfg.probes = list(names)
    elif key == "exporter":
        if value not in EXPORTERS:
            raise ConfigError(f"exporter {value!r} (from {where}) must be one of: {', '.join(EXPORTERS)}")
        cfg.exporter = value
    elif key == "model_dir":
        cfg.model_dir = str(value) if value else None
    elif key == "live":
        value = {True: "on", False: "off"}.get(value, value)
        if value not in LIVE_MODES:
            raise ConfigError(f"live {value!r} (from {where}) must be one of: {', '.join(LIVE_MODES)}")
        cfg.live = value
    elif key == "log_level":
        if str(value).lower() not in LOG_LEVELS:
            raise ConfigError(f"log_level {value!r} (from {where}) must be one of: {', '.join(LOG_LEVELS)}")
        cfg.log_level = str(value).lower()
    elif key == "probe_settings":
        if not isinstance(value, Mapping):
            raise ConfigError(f"probe_settings (from {where}) must be a mapping of probe name to settings")
        for probe, settings in value.items():
            if probe not in REGISTRY:
                raise ConfigError(f"probe_settings: unknown probe {probe!r} (from {where}); known: {', '.join(REGISTRY)}")
            if not isinstance(settings, Mapping):
                raise ConfigError(f"probe_settings.{probe} (from {where}) must be a mapping")
            REGISTRY[probe].validate_settings(settings, where)
            cfg.probe_settings[probe] = dict(settings)
    elif key == "mitigation":
        cfg.mitigation = {**cfg.mitigation, **_mitigation(value, where)}
    elif key == "health_addr":
        from .health import parse_address

        if value:
            parse_address(value, where)
        cfg.health_addr = str(value or "")
    elif key == "bpf_stats":
        value = {True: "on", False: "off"}.get(value, value)  # YAML 1.1 reads bare on/off as booleans
        if value not in BPF_STATS_MODES:
            raise ConfigError(f"bpf_stats {value!r} (from {where}) must be off or on (on: each probe's CPU time, "
                              "at the price of a timestamp per program run)")
        cfg.bpf_stats = value
    else:
        raise ConfigError(f"unknown configuration key {key!r} in {where}; known keys: {', '.join(Config.KEYS)}")


def _mitigation(value: Any, where: str) -> dict[str, Any]:
    """Validate the mitigation section; values keep MitigationSettings' types."""
    import ipaddress

    from .mitigation.settings import MODES, MitigationSettings

    if isinstance(value, str):  # OTEL_EBPF_RECEIVER_MITIGATION=enforce is a mode
        value = {"mode": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"mitigation (from {where}) must be a mapping (mode, ttl, allow, ...) or a mode")
    defaults = MitigationSettings()
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key not in MitigationSettings.KEYS:
            raise ConfigError(f"mitigation: unknown setting {key!r} (from {where}); known: "
                              f"{', '.join(MitigationSettings.KEYS)}")
        if key == "mode":
            if item is False:  # YAML 1.1 reads a bare `off` as false: `mitigation: {mode: off}` means off
                item = "off"
            if item not in MODES:
                raise ConfigError(f"mitigation.mode {item!r} (from {where}) must be one of: {', '.join(MODES)}")
        elif key in ("ttl", "max_ttl"):
            item = parse_duration(item, f"mitigation.{key} (from {where})")
        elif key in ("allow", "attack_states"):
            if isinstance(item, str):
                item = [item]
            if not isinstance(item, list) or not all(isinstance(x, str) for x in item):
                raise ConfigError(f"mitigation.{key} (from {where}) must be a list of strings")
            if key == "attack_states" and "unknown" in item:
                raise ConfigError(f"mitigation.attack_states (from {where}) cannot include 'unknown': an unknown "
                                  "window is novelty the model has not seen, not an attack; name attack states, "
                                  "e.g. network_flood")
            if key == "allow":
                for cidr in item:
                    try:
                        ipaddress.ip_network(cidr, strict=False)
                    except ValueError:
                        raise ConfigError(f"mitigation.allow: {cidr!r} (from {where}) is not an address or CIDR "
                                          "prefix, e.g. 10.0.0.0/8 or 2001:db8::/32") from None
            item = tuple(item)
        else:
            expected = type(getattr(defaults, key))
            number_ok = expected in (int, float) and isinstance(item, (int, float)) and not isinstance(item, bool)
            if expected is bool and not isinstance(item, bool) or expected is not bool and not number_ok or \
                    (number_ok and item < 0):
                raise ConfigError(f"mitigation.{key} (from {where}) must be a non-negative {expected.__name__}, "
                                  f"got {item!r}")
        out[key] = item
    return out


def check_probe_settings(probe: str, settings: Mapping[str, Any], where: str) -> None:
    from .probes import REGISTRY

    REGISTRY[probe].validate_settings(settings, where)


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {p} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must contain a mapping of keys (interval, probes, ...)")
    return data


def load(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the effective configuration. ``flags`` holds only the flags the user gave (None = not given)."""
    env = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    cfg = Config()
    path = flags.pop("config", None) or env.get(ENV_CONFIG)
    if path:
        for key, value in load_file(path).items():
            _apply(cfg, key, value, str(path))
        cfg.source = str(path)
    env_keys = {ENV_INTERVAL: "interval", ENV_PROBES: "probes", ENV_EXPORTER: "exporter",
                ENV_MODEL_DIR: "model_dir", ENV_LIVE: "live", ENV_LOG_LEVEL: "log_level",
                ENV_MITIGATION: "mitigation", ENV_MAX_SERIES: "max_series_per_metric", ENV_HEALTH_ADDR: "health_addr",
                ENV_BPF_STATS: "bpf_stats"}
    for var, key in env_keys.items():
        if env.get(var):
            _apply(cfg, key, env[var], var)
    unknown_env = [k for k in env if k.startswith(ENV_PREFIX) and k not in env_keys and k != ENV_CONFIG]
    if unknown_env:
        raise ConfigError(f"unknown environment variable {unknown_env[0]}; known: {', '.join([ENV_CONFIG, *env_keys])}")
    for key, value in flags.items():
        _apply(cfg, key, value, f"--{key.replace('_', '-')}")
    return cfg
