"""The one feature schema, shared by the agent (inference) and ``model_export`` (recording and training).

A feature vector is built per window from every enabled probe's declared features, in registry order, so
adding a probe adds its features, and a model names (in its metadata) exactly the features it was trained on.
Models are matched by *name*: a model trained without a probe's features still runs on a host that has more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from .probes import REGISTRY
from .probes.base import Feature, Probe

TIMESTAMP_COLUMN = "timestamp"
LABEL_COLUMN = "label"


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


def missing_features(required: Sequence[str], available: Iterable[str]) -> list[str]:
    have = set(available)
    return [name for name in required if name not in have]


@dataclass
class FeatureWindow:
    """One window's features: what `record` writes as a row and what the model scores."""

    timestamp: float
    values: dict[str, float]

    def vector(self, names: Sequence[str]) -> np.ndarray:
        """Shape (1, len(names)) float32, in the order the model was trained on. A feature the probes did not
        produce this window (no events at all) is 0, which is what an idle counter means."""
        return np.asarray([[self.values.get(n, 0.0) for n in names]], dtype=np.float32)


def merge(feature_maps: Iterable[Mapping[str, float]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for features in feature_maps:
        merged.update(features)
    return merged


def describe(probes: Iterable[type[Probe]]) -> list[tuple[str, str, str]]:
    """(probe, feature, description) rows for `probes` and `model info`."""
    return [(p.name, f.name, f.description) for p in probes for f in p.features]
