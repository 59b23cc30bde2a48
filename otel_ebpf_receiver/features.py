"""The one feature schema, shared by the agent (inference) and ``model_export`` (recording and training).

A feature vector is built per window from every enabled probe's declared features, in registry order, so
adding a probe adds its features, and a model names (in its metadata) exactly the features it was trained on.
Models are matched by *name*: a model trained without a probe's features still runs on a host that has more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from .probes import REGISTRY
from .probes.base import Feature

def schema(probe_names: Iterable[str] | None = None) -> list[Feature]:
    """Every feature the named probes (default: all known probes) offer, in the canonical order."""
    wanted = set(probe_names) if probe_names is not None else None
    out: list[Feature] = []
    for name, cls in REGISTRY.items():
        if wanted is None or name in wanted:
            out.extend(cls.features)
    return out


def feature_names(probe_names: Iterable[str] | None = None) -> list[str]:
    return [f.name for f in schema(probe_names)]


def owning_probe(feature_name: str) -> str | None:
    for name, cls in REGISTRY.items():
        if any(f.name == feature_name for f in cls.features):
            return name
    return None


@dataclass
class FeatureWindow:
    """One window's features: what `record` writes as a row and what the model scores."""

    timestamp: float
    values: dict[str, float]


def merge(feature_maps: Iterable[Mapping[str, float]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for features in feature_maps:
        merged.update(features)
    return merged
