"""`otel-ebpf-receiver run --check`: load and validate the configuration exactly as `run` would, say in one line
what would run, and exit — 0 when the agent could start with it; when not, one line saying why and the error's exit
code (2 for a configuration error).

What it checks without loading anything into the kernel: the configuration (file, OTEL_EBPF_RECEIVER_* variables,
flags: every key and value), the standard OTEL_* variables (otel_env.check), that the chosen probes' hook points
exist on this kernel, the model directory, which bundled model fits those probes, and whether mitigation has the
XDP probe to act through.
Compiling and attaching the programs takes seconds per probe: `doctor` and `run` do that."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..errors import AgentError, ConfigError
from .common import PROG


def check(cfg: Config) -> str:
    """The one-line summary of what `run` would do with ``cfg``; raises AgentError (one line) when it could not."""
    from .. import otel_env
    from ..features import feature_names
    from ..mitigation.settings import MitigationSettings
    from ..model.watch import DEFAULT_MODEL_DIR, best_bundled_model
    from ..probes import REGISTRY
    from ..telemetry import exporter_kinds

    wanted = cfg.probes or list(REGISTRY)
    unavailable = {name: REGISTRY[name].unavailable_reason() for name in wanted}
    runnable = [name for name in wanted if unavailable[name] is None]
    if not runnable:
        name, reason = next(iter(unavailable.items()))
        raise AgentError(f"none of the probes {', '.join(wanted)} can run on this kernel ({name}: {reason}); "
                         "run `otel-ebpf-receiver doctor` to see why")
    skipped = [f"{name} ({unavailable[name]})" for name in wanted if unavailable[name] is not None]

    otel_env.check()  # every standard OTEL_* variable the exporters will read
    kinds = exporter_kinds(cfg.exporter, "metrics")
    exporter = ",".join(f"otlp to {otel_env.otlp_endpoint('metrics')} ({otel_env.otlp_protocol('metrics')})"
                        if kind == "otlp" else kind for kind in kinds) or "none"

    if cfg.model_dir and Path(cfg.model_dir) != DEFAULT_MODEL_DIR and not Path(cfg.model_dir).is_dir():
        raise ConfigError(f"model directory {cfg.model_dir} does not exist; create it or drop --model-dir to use "
                          f"{DEFAULT_MODEL_DIR}")
    # best_bundled_model explains a misfit at length (every missing feature); the summary stays one line.
    model = best_bundled_model(feature_names(runnable), lambda _why: None)
    model_line = f"bundled model {model.path.name}" if model else \
        "no bundled model fits these probes (system.state stays unknown until the model directory has one)"

    mode = MitigationSettings(**cfg.mitigation).mode
    if mode != "off" and ("xdp" not in runnable or not cfg.probe_settings.get("xdp", {}).get("interfaces")):
        mode += " (inactive: needs the xdp probe on an interface, --interfaces IFACE)"  # as build_mitigator says

    line = (f"configuration ok ({cfg.source}): probes {', '.join(runnable)}; interval "
            f"{cfg.interval:g}s; exporter {exporter}; {model_line}; mitigation {mode}")
    if skipped:
        line += f"; skipped here: {', '.join(skipped)}"
    return line


def cmd_check(cfg: Config) -> int:
    print(f"{PROG}: {check(cfg)}", flush=True)
    return 0
