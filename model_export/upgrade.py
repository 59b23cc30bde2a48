"""`otel-ebpf-model upgrade`: give a model file exported before ``normal_deviation`` existed that output, without
retraining (the training windows of a file are not always at hand: the bundled models' recording is not in the
repository). The new nodes read the centres the file already holds (onnx_graph.upgrade_normal_deviation); the
file's label, distances and deviation come from the very same nodes, so its detection figures do not change."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from otel_ebpf_receiver.model import runtime

from .train import TrainError, write_checked


def upgrade(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> runtime.StateModel:
    """Write ``source`` (a kmeans file we exported before ``normal_deviation`` existed) to ``path`` with that output
    added from the centres it holds (onnx_graph.upgrade_normal_deviation); metadata and version unchanged.
    Refuses unless label, distances and deviation are bit-identical to the source's on test windows (the probe
    vectors, the centres, random windows around them) and normal_deviation equals deviation wherever the window's
    own cluster is normal (kmeans: then it is the nearest normal centre)."""
    import onnx

    from .onnx_graph import upgrade_normal_deviation

    old = runtime.load_model(source, None)
    if old.explains_from_normal:
        raise TrainError(f"{source} already has {runtime.OUTPUT_NORMAL_DEVIATION}: nothing to upgrade")
    try:
        proto = upgrade_normal_deviation(onnx.load_model_from_string(Path(source).read_bytes()))
    except ValueError as exc:
        raise TrainError(f"cannot upgrade {source}: {exc}") from None
    session = runtime.StateModel(Path(source), _session(proto.SerializeToString()), old.metadata,
                                 digest="", size=0)
    X = _upgrade_windows(old, proto)
    before, after = old.run(X), session.run_all(X)
    same = all(np.array_equal(a, b) for a, b in zip(before, after[:3]))
    label, deviation, normal_dev = after[0], after[2], after[3]
    own_normal = np.array([old.cluster_states[c] == runtime.NORMAL_STATE for c in label])
    if not same or normal_dev is None or not np.array_equal(normal_dev[own_normal], deviation[own_normal]):
        raise TrainError(f"refusing to write {path}: the upgraded graph does not reproduce {source}")
    out = Path(path)
    write_checked(proto, out)
    return runtime.load_model(out, None)


def _session(data: bytes) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(data, runtime.session_options(), providers=["CPUExecutionProvider"])


def _upgrade_windows(model: runtime.StateModel, proto: Any) -> np.ndarray:
    """The probe vectors, each centre mapped back to raw features, and 1000 seeded windows around them."""
    from onnx import numpy_helper

    probes = np.vstack([x for _, x in runtime.probe_vectors(len(model.feature_names))])
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    scaler = next(n for n in proto.graph.node if n.op_type == "Scaler")
    attrs = {a.name: list(a.floats) for a in scaler.attribute}
    offset, scale = np.asarray(attrs["offset"]), np.asarray(attrs["scale"])   # z = (x − offset) · scale
    centres = init["normal_dev_centres"].astype(np.float64) / scale + offset
    rng = np.random.default_rng(13)
    around = centres[rng.integers(0, len(centres), 1000)] + rng.normal(0, 1, (1000, len(offset))) / scale
    return np.vstack([probes, centres, around]).astype(np.float32)
