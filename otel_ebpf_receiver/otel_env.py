"""The standard OTEL_* environment variables the agent honours, as named constants, and their check at start-up.

The OpenTelemetry SDK reads most of them itself, and on a bad value it either raises deep inside an exporter (a
traceback) or logs and falls back to a default (a setting silently ignored). :func:`check` reads every one we
depend on before anything is built and refuses a bad value with one line naming the variable and what it accepts.

Deliberate deviations from the SDK's leniency, each because a silent fallback would send data somewhere the user
did not ask for: OTEL_SDK_DISABLED accepts only true/false (the spec reads anything else as false), and
OTEL_EXPORTER_OTLP_HEADERS entries without ``=`` are refused (the SDK skips them).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping
from urllib.parse import urlparse

from .errors import ConfigError

SIGNALS = ("metrics", "logs", "traces")

OTEL_SDK_DISABLED = "OTEL_SDK_DISABLED"
"""true: export nothing at all (probes, classifier and mitigation still run); false or unset: export."""
OTEL_METRIC_EXPORT_INTERVAL = "OTEL_METRIC_EXPORT_INTERVAL"
"""Milliseconds between metric exports (integer, at least 100; default 10000)."""
OTEL_EXPORTER_OTLP_TIMEOUT = "OTEL_EXPORTER_OTLP_TIMEOUT"
"""Seconds one OTLP export may take, retries included (the Python exporters read seconds, default 10)."""
OTEL_EXPORTER_OTLP_COMPRESSION = "OTEL_EXPORTER_OTLP_COMPRESSION"
"""gzip, deflate or none."""
OTEL_EXPORTER_OTLP_CERTIFICATE = "OTEL_EXPORTER_OTLP_CERTIFICATE"
"""CA bundle (PEM) that verifies the Collector; must be readable."""


def signal_exporter_variable(signal: str) -> str:
    """OTEL_METRICS_EXPORTER, OTEL_LOGS_EXPORTER, OTEL_TRACES_EXPORTER: otlp, console, none, or a comma list
    (``otlp,console``)."""
    return f"OTEL_{signal.upper()}_EXPORTER"


def otlp_variable(setting: str, signal: str | None = None) -> str:
    """OTEL_EXPORTER_OTLP_<SETTING>, or its per-signal form OTEL_EXPORTER_OTLP_<SIGNAL>_<SETTING>."""
    return f"OTEL_EXPORTER_OTLP_{signal.upper()}_{setting}" if signal else f"OTEL_EXPORTER_OTLP_{setting}"


EXPORTER_KINDS = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")
COMPRESSIONS = ("gzip", "deflate", "none")
MIN_EXPORT_INTERVAL_MS = 100  # below that, export (serialise + send) would take a large share of a 2-core host
DEFAULT_EXPORT_INTERVAL_MS = 10_000  # when OTEL_METRIC_EXPORT_INTERVAL is unset (the SDK's own default is 60 s)
# Batch processor settings the SDK reads (it logs and falls back to its default on a bad value).
POSITIVE_INTEGERS = ("OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                     "OTEL_BSP_EXPORT_TIMEOUT", "OTEL_BLRP_SCHEDULE_DELAY", "OTEL_BLRP_MAX_QUEUE_SIZE",
                     "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", "OTEL_BLRP_EXPORT_TIMEOUT")
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):\d{1,5}$")


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value.strip() if value is not None and value.strip() != "" else None


def sdk_disabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    value = (_get(env, OTEL_SDK_DISABLED) or "false").lower()
    if value not in ("true", "false"):
        raise ConfigError(f"{OTEL_SDK_DISABLED}={env[OTEL_SDK_DISABLED]!r} must be true or false")
    return value == "true"


def signal_exporters(signal: str, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The exporters OTEL_<SIGNAL>_EXPORTER asks for (default otlp); () for none."""
    env = os.environ if env is None else env
    name = signal_exporter_variable(signal)
    raw = _get(env, name) or "otlp"
    kinds = tuple(dict.fromkeys(k.strip().lower() for k in raw.split(",") if k.strip()))
    bad = [k for k in kinds if k not in EXPORTER_KINDS]
    if bad or not kinds:
        raise ConfigError(f"{name}={raw!r}: {bad[0] if bad else 'empty'} is not supported; use otlp, console, none, "
                          "or a comma list such as otlp,console")
    if "none" in kinds and len(kinds) > 1:
        raise ConfigError(f"{name}={raw!r}: none cannot be combined with other exporters")
    return () if kinds == ("none",) else kinds


def otlp_protocol(signal: str, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    for name in (otlp_variable("PROTOCOL", signal), otlp_variable("PROTOCOL")):
        value = _get(env, name)
        if value is not None:
            if value.lower() not in PROTOCOLS:
                raise ConfigError(f"{name}={value!r} is not supported: use grpc or http/protobuf")
            return value.lower()
    return "grpc"


def otlp_endpoint(signal: str, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    default = "http://localhost:4317" if otlp_protocol(signal, env) == "grpc" else "http://localhost:4318"
    return _get(env, otlp_variable("ENDPOINT", signal)) or _get(env, otlp_variable("ENDPOINT")) or default


def export_interval_ms(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    raw = _get(env, OTEL_METRIC_EXPORT_INTERVAL)
    if raw is None:
        return DEFAULT_EXPORT_INTERVAL_MS
    if not raw.isdigit() or int(raw) < MIN_EXPORT_INTERVAL_MS:
        raise ConfigError(f"{OTEL_METRIC_EXPORT_INTERVAL}={raw!r} must be a whole number of milliseconds, at least "
                          f"{MIN_EXPORT_INTERVAL_MS}, e.g. 10000")
    return int(raw)


def _check_endpoint(name: str, value: str, protocol: str) -> None:
    url = urlparse(value)
    if url.scheme in ("http", "https") and url.hostname:
        try:
            url.port  # noqa: B018 (raises on a port that is not a number or out of range)
        except ValueError:
            raise ConfigError(f"{name}={value!r} has a bad port; e.g. http://collector:4317") from None
        return
    if protocol == "grpc" and _HOST_PORT.match(value):  # the gRPC exporter also takes host:port
        return
    example = "http://collector:4317" if protocol == "grpc" else "http://collector:4318"
    raise ConfigError(f"{name}={value!r} is not an http:// or https:// URL; e.g. {example}")


def _check_headers(name: str, value: str) -> None:
    for item in value.split(","):
        if item.strip() and ("=" not in item or not item.split("=", 1)[0].strip()):
            raise ConfigError(f"{name}: {item.strip()!r} is not key=value; use e.g. api-key=secret,tenant=a "
                              "(values URL-encoded)")


def _check_positive_number(name: str, value: str, unit: str) -> None:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise ConfigError(f"{name}={value!r} must be a positive number of {unit}")


def check(env: Mapping[str, str] | None = None) -> None:
    """Every OTEL_* setting the agent or the SDK's exporters will read; raises ConfigError on the first bad one."""
    env = os.environ if env is None else env
    if sdk_disabled(env):
        return  # nothing will be exported: the other settings are not read
    export_interval_ms(env)
    for signal in SIGNALS:
        signal_exporters(signal, env)
        protocol = otlp_protocol(signal, env)
        for name in (otlp_variable("ENDPOINT", signal), otlp_variable("ENDPOINT")):
            if _get(env, name):
                _check_endpoint(name, _get(env, name), protocol)
        for scope in (signal, None):
            if _get(env, otlp_variable("HEADERS", scope)):
                _check_headers(otlp_variable("HEADERS", scope), _get(env, otlp_variable("HEADERS", scope)))
            if _get(env, otlp_variable("TIMEOUT", scope)):
                _check_positive_number(otlp_variable("TIMEOUT", scope), _get(env, otlp_variable("TIMEOUT", scope)),
                                       "seconds (the Python OTLP exporters read seconds), e.g. 10")
            compression = _get(env, otlp_variable("COMPRESSION", scope))
            if compression and compression.lower() not in COMPRESSIONS:
                raise ConfigError(f"{otlp_variable('COMPRESSION', scope)}={compression!r} must be one of: "
                                  f"{', '.join(COMPRESSIONS)}")
            certificate = _get(env, otlp_variable("CERTIFICATE", scope))
            if certificate and not os.access(certificate, os.R_OK):
                raise ConfigError(f"{otlp_variable('CERTIFICATE', scope)}={certificate!r} cannot be read; give the "
                                  "path of a PEM CA bundle")
    for name in POSITIVE_INTEGERS:
        value = _get(env, name)
        if value is not None and (not value.isdigit() or int(value) < 1):
            raise ConfigError(f"{name}={value!r} must be a positive whole number")


# The SDK's gRPC exporter replaces its channel after an UNAVAILABLE error, but gRPC keeps a connection's reconnect
# backoff in the subchannel, and by default subchannels live in a process-wide pool shared by every channel to the
# same target with the same options. Our three exporters (metrics, logs, spans) share one Collector, so one of them
# always holds the shared subchannel and a new channel inherits its backoff, which grows to gRPC's ceiling of
# 120 s (±20 %) during a long outage. Measured before this (tests/outage.py, README "Reliability"): the first
# export reached a restarted Collector 76 s after it came back from a 15-minute outage. A pool per channel and a
# 5 s ceiling make it seconds; one connection attempt per 5 s to a Collector that is away costs nothing.
GRPC_CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1), ("grpc.max_reconnect_backoff_ms", 5000))

OTLP_EXPORTER_CLASSES = {"metrics": ("metric_exporter", "OTLPMetricExporter"),
                         "logs": ("_log_exporter", "OTLPLogExporter"),
                         "traces": ("trace_exporter", "OTLPSpanExporter")}


def otlp_exporter(signal: str) -> tuple[Any, str]:
    """The OTLP exporter for ``signal`` (metrics, logs, traces) over the protocol OTEL_* asks for, and its target.
    Only the module of that signal and protocol is imported."""
    import importlib

    protocol = otlp_protocol(signal)
    module, name = OTLP_EXPORTER_CLASSES[signal]
    package = "grpc" if protocol == "grpc" else "http"  # http/protobuf
    kind = getattr(importlib.import_module(f"opentelemetry.exporter.otlp.proto.{package}.{module}"), name)
    exporter = kind(channel_options=GRPC_CHANNEL_OPTIONS) if protocol == "grpc" else kind()
    return exporter, f"{otlp_endpoint(signal)} ({protocol})"
