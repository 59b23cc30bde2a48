"""The state model at run time: load and validate an ONNX file (the contract is in ``contract.py``), score one
feature window.

No import of the probe registry happens here at import time: the runtime is given explicit feature-name lists.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .contract import (DEFAULT_MAX_BYTES, INPUT_NAME, METADATA_ALGORITHM, METADATA_DISTANCE, METADATA_FEATURES,
                       METADATA_FORMAT, METADATA_PERCENTILE, METADATA_STATES, METADATA_THRESHOLDS, METADATA_TRAINING,
                       METADATA_UNKNOWN_ABOVE, METADATA_VERSION, MODEL_FORMAT, OUTPUT_NAMES, REQUIRED_METADATA,
                       TOP_FEATURES, UNKNOWN_STATE, ModelError)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What is known about one window: the model's own answer, and — once the state layer has debounced it — the
    state to report. The one verdict type of the product: the model returns it with ``state == raw_state``, the
    classifier replaces ``state`` with the debounced one."""

    cluster: int
    state: str                      # reported: the debounced state (the model's own answer before debouncing)
    score: float                    # distance / distance_thresholds[cluster]; > 1.0 is beyond the percentile
    distance: float                 # to the assigned cluster's centre, in the model's distance metric
    model_version: str
    top_features: list[tuple[str, float]]  # (feature, deviation in training std units), largest |deviation| first
    nearest_state: str              # the cluster's state even when the model's answer is "unknown"
    raw_state: str                  # the model's answer this window: nearest_state, or "unknown" above the threshold

    @classmethod
    def unknown(cls, model_version: str = "none") -> "Verdict":
        """No model, or none yet: nothing is known about the window."""
        return cls(-1, UNKNOWN_STATE, 0.0, 0.0, model_version, [], UNKNOWN_STATE, UNKNOWN_STATE)


def session_options() -> Any:
    """One thread, no spinning, sequential: scoring one small vector per second must not take a core."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only; our own validation says what is wrong
    return opts


class StateModel:
    """A validated model with its onnxruntime session. Build it with :func:`load_model`."""

    def __init__(self, path: Path, session: Any, metadata: Mapping[str, str], *, digest: str, size: int) -> None:
        self.path = path
        self.digest = digest                          # sha256 of the file, for logs
        self.size = size
        self.metadata = dict(metadata)
        self.version = metadata[METADATA_VERSION]
        self.algorithm = metadata[METADATA_ALGORITHM]
        self.distance_kind = metadata[METADATA_DISTANCE]
        self.feature_names: tuple[str, ...] = tuple(json.loads(metadata[METADATA_FEATURES]))
        self.cluster_states: tuple[str, ...] = tuple(json.loads(metadata[METADATA_STATES]))
        self.thresholds = np.asarray(json.loads(metadata[METADATA_THRESHOLDS]), dtype=np.float64)
        self.percentile = float(metadata[METADATA_PERCENTILE])
        self.unknown_above = float(metadata[METADATA_UNKNOWN_ABOVE])
        self.training: dict[str, Any] = json.loads(metadata[METADATA_TRAINING])
        self._session = session
        self._input = session.get_inputs()[0].name
        self._thresholds = self.thresholds.tolist()    # Python floats: cheaper to index per window
        self._outputs = list(OUTPUT_NAMES)

    @property
    def states(self) -> list[str]:
        """Every value ``system.state`` can take with this model (cluster states and ``unknown``), sorted."""
        return sorted(set(self.cluster_states) | {UNKNOWN_STATE})

    def vector(self, values: Mapping[str, float]) -> np.ndarray:
        """(1, n) float32 in the model's order; a feature absent from ``values`` is 0 (an idle counter)."""
        get = values.get
        return np.array([[get(name, 0.0) for name in self.feature_names]], dtype=np.float32)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw outputs (label, distances, deviation) for a float32 batch of shape (N, n_features)."""
        label, distances, deviation = self._session.run(self._outputs, {self._input: x})
        return label, distances, deviation

    def predict(self, values: Mapping[str, float]) -> Verdict:
        return self.predict_vector(self.vector(values))

    def predict_vector(self, x: np.ndarray) -> Verdict:
        label, distances, deviation = self._session.run(self._outputs, {self._input: x})
        cluster = int(label[0])
        distance = float(distances[0, cluster])
        score = distance / self._thresholds[cluster]
        nearest = self.cluster_states[cluster]
        # written as "<= else unknown" so that a NaN score (a NaN feature: a probe bug) is unknown too
        state = nearest if score <= self.unknown_above else UNKNOWN_STATE
        dev = deviation[0].tolist()  # a handful of floats: plain Python beats numpy's per-call overhead here
        order = sorted(range(len(dev)), key=lambda i: -abs(dev[i]))[:TOP_FEATURES]
        top = [(self.feature_names[i], dev[i]) for i in order]
        return Verdict(cluster, state, score, distance, self.version, top, nearest, state)

    def describe(self) -> dict[str, Any]:
        """Everything `otel-ebpf-model info` and the agent's startup log show."""
        return {
            "path": str(self.path),
            "size": self.size,
            "sha256": self.digest,
            "model_version": self.version,
            "algorithm": self.algorithm,
            "distance": self.distance_kind,
            "threshold_percentile": self.percentile,
            "unknown_above": self.unknown_above,
            "feature_names": list(self.feature_names),
            "clusters": [
                {"cluster": i, "state": s, "distance_threshold": float(t)}
                for i, (s, t) in enumerate(zip(self.cluster_states, self.thresholds))
            ],
            "training": self.training,
        }

    def __repr__(self) -> str:
        return f"StateModel({str(self.path)!r}, version={self.version!r}, clusters={len(self.cluster_states)})"


# -- loading ---------------------------------------------------------------------------------------------------

def load_model(
    path: str | os.PathLike[str],
    available_features: Sequence[str] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    feature_owner: Callable[[str], str | None] | None = None,
) -> StateModel:
    """Validate ``path`` and open it, or raise :class:`ModelError` (one line: file, problem, what to do).

    Checks, in order: size cap; ONNX protobuf parses (never following external-data references); no tensor
    stored as external data; ``onnx.checker``; the metadata contract; the graph's input and outputs; every
    model feature BY NAME in ``available_features`` (None skips this check, e.g. for `info`); an onnxruntime
    session; one test inference on a zero vector.
    ``feature_owner(name) -> probe`` names the probe to enable for a missing feature (default: the registry,
    looked up lazily and only when a feature is missing).
    """
    import onnx

    path = Path(path)
    data = _read_capped(path, max_bytes)
    try:
        # From bytes, so nothing on disk is followed: external-data locations are checked below, never opened.
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise ModelError(path, f"cannot parse as ONNX, truncated or not a model ({type(exc).__name__}: {exc})",
                         "if it is still being copied wait, else export one with "
                         "`otel-ebpf-model export DIR -o MODEL.onnx`") from None
    external = _external_tensors(model.graph)
    if external:
        raise ModelError(path, f"tensor {external[0]!r} is stored as external data",
                         "export a self-contained model (all weights inside the .onnx file)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(path, f"invalid ONNX ({exc})",
                         "the file is damaged or was not written by otel-ebpf-model; re-export it") from None

    meta = {p.key: p.value for p in model.metadata_props}
    _check_metadata(path, meta)
    names = json.loads(meta[METADATA_FEATURES])
    n_clusters = len(json.loads(meta[METADATA_STATES]))
    _check_graph(path, model, len(names))
    if available_features is not None:
        _check_features(path, names, available_features, feature_owner)

    session = _open_session(path, data)
    digest = hashlib.sha256(data).hexdigest()
    state_model = StateModel(path, session, meta, digest=digest, size=len(data))
    _test_inference(path, state_model, len(names), n_clusters)
    return state_model


def _read_capped(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelError(path, f"cannot read ({exc.strerror or exc})", "check the path and permissions") from None
    if not path.is_file():
        raise ModelError(path, "not a regular file", "point at a .onnx file")
    if size == 0:
        raise ModelError(path, "file is empty", "wait for the copy to finish or re-export the model")
    if size > max_bytes:
        raise ModelError(path, f"file is {size} bytes, above the {max_bytes}-byte limit",
                         "this is not one of our models (they are a few KiB); raise the limit only if you mean it")
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ModelError(path, f"cannot read ({exc.strerror or exc})", "check the path and permissions") from None
    if len(data) > max_bytes:  # grew between stat and read
        raise ModelError(path, f"file grew above the {max_bytes}-byte limit while being read",
                         "wait for the copy to finish")
    return data


def _external_tensors(graph: Any) -> list[str]:
    """Names of tensors (initializers, constants, attributes, in subgraphs too) whose data lives outside the file."""
    from onnx import AttributeProto, TensorProto

    found: list[str] = []

    def tensor(t: Any) -> None:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            found.append(t.name or "<unnamed>")

    def walk(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for st in g.sparse_initializer:
            tensor(st.values)
            tensor(st.indices)
        for node in g.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    tensor(attr.t)
                elif attr.type == AttributeProto.TENSORS:
                    for t in attr.tensors:
                        tensor(t)
                elif attr.type == AttributeProto.SPARSE_TENSOR:
                    tensor(attr.sparse_tensor.values)
                elif attr.type == AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        walk(sub)

    walk(graph)
    return found


def _check_metadata(path: Path, meta: Mapping[str, str]) -> None:
    reexport = "re-export it with `otel-ebpf-model export`"
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelError(path, f"metadata_props lacks {', '.join(missing)}",
                         f"this is not an otel-ebpf-model state model; {reexport}")
    if meta[METADATA_FORMAT] != MODEL_FORMAT:
        raise ModelError(path, f"model format {meta[METADATA_FORMAT]!r}, this agent reads {MODEL_FORMAT!r}",
                         f"{reexport} from this version")

    def parsed(key: str, kind: type) -> Any:
        try:
            value = json.loads(meta[key])
        except ValueError:
            raise ModelError(path, f"metadata {key} is not valid JSON", reexport) from None
        if not isinstance(value, kind):
            raise ModelError(path, f"metadata {key} is not a JSON {kind.__name__}", reexport)
        return value

    names = parsed(METADATA_FEATURES, list)
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ModelError(path, "metadata feature_names must be distinct non-empty names", reexport)
    states = parsed(METADATA_STATES, list)
    if not states or not all(isinstance(s, str) and s for s in states):
        raise ModelError(path, "metadata cluster_states must be non-empty state names", reexport)
    thresholds = parsed(METADATA_THRESHOLDS, list)
    if len(thresholds) != len(states):
        raise ModelError(path, f"{len(thresholds)} distance thresholds for {len(states)} clusters", reexport)
    if not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in thresholds):
        raise ModelError(path, "metadata distance_thresholds must be finite numbers > 0", reexport)
    parsed(METADATA_TRAINING, dict)
    for key in (METADATA_UNKNOWN_ABOVE, METADATA_PERCENTILE):
        try:
            value = float(meta[key])
        except ValueError:
            raise ModelError(path, f"metadata {key}={meta[key]!r} is not a number", reexport) from None
        if not (math.isfinite(value) and value > 0):
            raise ModelError(path, f"metadata {key}={meta[key]!r} must be a positive number", reexport)
    if not meta[METADATA_VERSION].strip():
        raise ModelError(path, "metadata model_version is empty", reexport)


def _check_graph(path: Path, model: Any, n_features: int) -> None:
    from onnx import TensorProto

    hint = "the graph does not follow the state-model contract; re-export it with `otel-ebpf-model export`"
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise ModelError(path, f"inputs are {[i.name for i in inputs]}, expected one named {INPUT_NAME!r}", hint)
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type != TensorProto.FLOAT:
        raise ModelError(path, f"input {INPUT_NAME!r} is not float32", hint)
    dims = tensor_type.shape.dim
    if len(dims) != 2 or (dims[1].HasField("dim_value") and dims[1].dim_value != n_features):
        width = dims[1].dim_value if len(dims) == 2 else "?"
        raise ModelError(path, f"input is {len(dims)}-D with width {width}, metadata names {n_features} features",
                         hint)
    outputs = {o.name for o in model.graph.output}
    missing = [o for o in OUTPUT_NAMES if o not in outputs]
    if missing:
        raise ModelError(path, f"graph has no output {', '.join(missing)}", hint)


def _default_owner(name: str) -> str | None:
    try:  # the registry is optional here: a broken probe import must not stop us from naming the feature
        from ..features import owning_probe

        return owning_probe(name)
    except Exception:
        return None


def _check_features(path: Path, names: Sequence[str], available: Iterable[str],
                    owner: Callable[[str], str | None] | None) -> None:
    have = set(available)
    missing = [n for n in names if n not in have]
    if not missing:
        return
    owner = owner or _default_owner
    probes = sorted({p for p in map(owner, missing) if p})
    shown = ", ".join(f"{n} (probe {owner(n) or 'unknown to this agent'})" for n in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    what = f"enable probe {', '.join(probes)}, or " if probes else ""
    plural = "s" if len(missing) > 1 else ""
    raise ModelError(path, f"needs feature{plural} {shown}{more}, which this agent does not produce",
                     f"{what}retrain on the features this agent has (otel-ebpf-model train --features ...)")


def _open_session(path: Path, data: bytes) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(data, sess_options=session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(path, f"onnxruntime cannot load it ({exc})",
                         "re-export with this version's otel-ebpf-model (pinned opset)") from None


def _test_inference(path: Path, model: StateModel, n_features: int, n_clusters: int) -> None:
    hint = "the model does not compute what its metadata says; re-export it with `otel-ebpf-model export`"
    try:
        label, distances, deviation = model.run(np.zeros((1, n_features), dtype=np.float32))
    except Exception as exc:
        raise ModelError(path, f"test inference on a zero vector failed ({exc})", hint) from None
    if label.shape != (1,) or not (0 <= int(label[0]) < n_clusters):
        raise ModelError(path, f"test inference gave label {label.tolist()} for {n_clusters} clusters", hint)
    if distances.shape != (1, n_clusters) or not np.all(np.isfinite(distances)):
        raise ModelError(path, f"test inference gave distances of shape {distances.shape}, "
                               f"expected (1, {n_clusters}) finite", hint)
    if deviation.shape != (1, n_features) or not np.all(np.isfinite(deviation)):
        raise ModelError(path, f"test inference gave deviation of shape {deviation.shape}, "
                               f"expected (1, {n_features}) finite", hint)
