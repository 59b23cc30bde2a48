"""The state model at run time: load and validate an ONNX file (the contract is in ``contract.py``, the static
checks in ``checks.py``, the bounded first run in ``sandbox.py``), score one feature window.

A model file is an input like any other. :func:`load_model` opens it without following a symlink or blocking on
a FIFO, requires a regular file (for the model watcher: owned by root or the agent's user and writable by nobody
else), and refuses with one :class:`ModelError` line anything it cannot serve safely.
:meth:`StateModel.predict_vector` never raises: a window whose outputs break the contract is reported as
``unknown`` with :attr:`Verdict.fault` set.

No import of the probe registry happens here at import time: the runtime is given explicit feature-name lists.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .checks import (attack_states, check_graph, check_metadata, check_session_io, check_structure, external_tensors,
                     feature_bounds, parse_json)
from .contract import (DEFAULT_MAX_BYTES, METADATA_ALGORITHM, METADATA_DISTANCE, METADATA_FEATURES,
                       METADATA_PERCENTILE, METADATA_STATES, METADATA_THRESHOLDS, METADATA_TRAINING,
                       METADATA_UNKNOWN_ABOVE, METADATA_VERSION, NORMAL_STATE, OUTPUT_NAMES,
                       OUTPUT_NORMAL_DEVIATION, TOP_FEATURES, UNKNOWN_STATE, ModelError, output_problem, printable)
from .novelty import novelty_score
from .sandbox import prove_bounded, session_options

_NOT_NEGATIVE = (0.0).__le__   # False for NaN too


EXPLAINED_FROM_NORMAL = "nearest_normal"     # top_features: normal_deviation, why the window is not normal
EXPLAINED_FROM_CLUSTER = "assigned_cluster"  # top_features: deviation from the centre of the window's own cluster
EXPLAINED_FROM_BOUNDS = "benign_bounds"      # top_features: bound widths beyond the benign range (novelty.py)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What is known about one window: the model's own answer, and — once the state layer has debounced it — the
    state to report. The one verdict type of the product: the model returns it with ``state == raw_state``, the
    classifier replaces ``state`` with the debounced one."""

    cluster: int
    state: str                      # reported: the debounced state (the model's own answer before debouncing)
    score: float                    # distance / distance_thresholds[cluster]; > 1.0 is beyond the percentile
                                    # (with feature_bounds: at least the novelty score, contract.py "Novelty")
    distance: float                 # to the assigned cluster's centre, in the model's distance metric
    model_version: str
    # (feature, signed deviation in the scaled space), largest first: why the window is in its state (contract.py,
    # "Explanations") — from the nearest normal cluster when not normal, from its own normal centre when normal
    top_features: list[tuple[str, float]]
    nearest_state: str              # the cluster's state even when the model's answer is "unknown"
    raw_state: str                  # the model's answer this window: nearest_state, or "unknown" above the threshold
    fault: str = ""                 # why this window's model output broke the contract (state is then unknown)
    declared_attack: bool = False   # the serving model declares ``state`` an attack state: mitigation may act
    explained_from: str = ""        # what top_features measure from: EXPLAINED_FROM_NORMAL or EXPLAINED_FROM_CLUSTER

    @classmethod
    def unknown(cls, model_version: str = "none") -> "Verdict":
        """No model, or none yet: nothing is known about the window."""
        return cls(-1, UNKNOWN_STATE, 0.0, 0.0, model_version, [], UNKNOWN_STATE, UNKNOWN_STATE)


def probe_vectors(n_features: int) -> list[tuple[str, np.ndarray]]:
    """Windows every model must answer within its contract at load: zeros (an idle host), ones, large and negative
    values (a feature far outside training), and seeded values in the range of log1p rates and ratios."""
    rng = np.random.default_rng(14)
    shaped = lambda v: np.full((1, n_features), v, dtype=np.float32)  # noqa: E731
    probes = [("zero", shaped(0.0)), ("ones", shaped(1.0)), ("large", shaped(1e3)), ("negative", shaped(-1e3))]
    probes += [(f"random #{i}", rng.uniform(0, 20, (1, n_features)).astype(np.float32)) for i in range(4)]
    return probes


def top_indices(values: Sequence[float], n: int = TOP_FEATURES) -> list[int]:
    """The ``n`` indices of the largest ``|value|``, largest first; NaN last (a NaN feature explains nothing)."""
    return sorted(range(len(values)), key=lambda i: -abs(values[i]) if values[i] == values[i] else math.inf)[:n]


class StateModel:
    """A validated model with its onnxruntime session. Build it with :func:`load_model`."""

    def __init__(self, path: Path, session: Any, metadata: Mapping[str, str], *, digest: str, size: int,
                 bundled: bool = False) -> None:
        self.path = path
        self.digest = digest                          # sha256 of the file, for logs
        self.size = size
        self.metadata = dict(metadata)
        self.version = metadata[METADATA_VERSION]
        self.algorithm = metadata[METADATA_ALGORITHM]
        self.distance_kind = metadata[METADATA_DISTANCE]
        self.feature_names: tuple[str, ...] = tuple(parse_json(metadata[METADATA_FEATURES]))
        self.cluster_states: tuple[str, ...] = tuple(parse_json(metadata[METADATA_STATES]))
        self.thresholds = np.asarray(parse_json(metadata[METADATA_THRESHOLDS]), dtype=np.float64)
        self.percentile = float(metadata[METADATA_PERCENTILE])
        self.unknown_above = float(metadata[METADATA_UNKNOWN_ABOVE])
        self.training: dict[str, Any] = parse_json(metadata[METADATA_TRAINING])
        declared = attack_states(metadata)
        if declared is None:  # the attack-state rule (contract.py): only a bundled model declares by default
            declared = frozenset(self.cluster_states) - {UNKNOWN_STATE} if bundled else frozenset()
        self.attack_states: frozenset[str] = declared
        self.bundled = bundled
        self.faults = 0                               # windows whose output broke the contract
        self._session = session
        self._input = session.get_inputs()[0].name
        self._thresholds = self.thresholds.tolist()    # Python floats: cheaper to index per window
        # the optional explanation output (contract.py, "Explanations"); models without it keep the old behaviour
        self.explains_from_normal = any(o.name == OUTPUT_NORMAL_DEVIATION for o in session.get_outputs())
        self._outputs = list(OUTPUT_NAMES) + ([OUTPUT_NORMAL_DEVIATION] if self.explains_from_normal else [])
        self._n_clusters = len(self.cluster_states)
        self._n_features = len(self.feature_names)
        self._distances_shape = (1, self._n_clusters)
        self._deviation_shape = (1, self._n_features)
        # the optional per-feature benign bounds (contract.py, "Novelty"); None: distance alone, as before
        self.bounds = feature_bounds(path, metadata, self._n_features)

    @property
    def states(self) -> list[str]:
        """Every value ``system.state`` can take with this model (cluster states and ``unknown``), sorted."""
        return sorted(set(self.cluster_states) | {UNKNOWN_STATE})

    def vector(self, values: Mapping[str, float]) -> np.ndarray:
        """(1, n) float32 in the model's order; a feature absent from ``values`` is 0 (an idle counter)."""
        get = values.get
        return np.array([[get(name, 0.0) for name in self.feature_names]], dtype=np.float32)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw outputs (label, distances, deviation) for a float32 batch of shape (N, n_features), unchecked."""
        label, distances, deviation = self._session.run(list(OUTPUT_NAMES), {self._input: x})
        return label, distances, deviation

    def run_all(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`run` plus ``normal_deviation`` (None for a model without that output), unchecked."""
        outputs = self._session.run(self._outputs, {self._input: x})
        return outputs[0], outputs[1], outputs[2], outputs[3] if len(outputs) > 3 else None

    def predict(self, values: Mapping[str, float]) -> Verdict:
        try:
            x = self.vector(values)
        except (TypeError, ValueError) as exc:  # a feature value that is not a number: the caller's bug
            return self._fault(f"window is not numeric ({exc})")
        return self.predict_vector(x)

    def predict_vector(self, x: np.ndarray) -> Verdict:
        """The verdict for one window (row 0 of ``x``). Never raises: outputs that break the contract (shape,
        label range, NaN; checked every window, a few microseconds) give ``unknown`` with ``fault`` set."""
        try:
            outputs = self._session.run(self._outputs, {self._input: x})
        except Exception as exc:
            return self._fault(f"inference failed ({type(exc).__name__}: {exc})")
        label, distances, deviation = outputs[0], outputs[1], outputs[2]
        normal_dev = outputs[3] if len(outputs) > 3 else None
        # The contract, checked in plain Python on the row we use (cheaper than numpy reductions on 1-row arrays);
        # anything unusual goes to output_problem for the exact reason.
        cluster = -1
        if (type(label) is np.ndarray and label.shape == (1,) and label.dtype.kind in "iu"
                and type(distances) is np.ndarray and distances.shape == self._distances_shape
                and distances.dtype.kind == "f"
                and type(deviation) is np.ndarray and deviation.shape == self._deviation_shape
                and deviation.dtype.kind == "f"
                and (normal_dev is None or (type(normal_dev) is np.ndarray
                                            and normal_dev.shape == self._deviation_shape
                                            and normal_dev.dtype.kind == "f"))):
            cluster = int(label[0])
            row = distances[0].tolist()
            dev = deviation[0].tolist()  # a handful of floats: plain Python beats numpy's per-call overhead
            from_normal = normal_dev[0].tolist() if normal_dev is not None else None
            if not (0 <= cluster < self._n_clusters and all(map(_NOT_NEGATIVE, row))
                    and not any(map(math.isnan, dev))
                    and (from_normal is None or not any(map(math.isnan, from_normal)))):
                cluster = -1
        if cluster < 0:
            rows = len(x)
            problem = output_problem(label, distances, deviation, rows, self._n_clusters, self._n_features,
                                     normal_deviation=normal_dev)
            if problem is not None and not np.isfinite(x).all():
                # a NaN feature (a probe bug) makes NaN outputs: the window is unknown, the model is not at fault
                problem = output_problem(label, distances, deviation, rows, self._n_clusters, self._n_features,
                                         allow_nan=True, normal_deviation=normal_dev)
            if problem is not None or rows < 1:
                return self._fault(problem or "empty batch")
            cluster = int(label[0])
            row = distances[0].tolist()
            dev = deviation[0].tolist()
            from_normal = normal_dev[0].tolist() if normal_dev is not None else None
        distance = row[cluster]
        score = distance / self._thresholds[cluster]
        nearest = self.cluster_states[cluster]
        # written as "<= else unknown" so that a NaN score (a NaN feature: a probe bug) is unknown too
        state = nearest if score <= self.unknown_above else UNKNOWN_STATE
        # Explanations (contract.py): a normal window by what moved most from its own normal centre; any other
        # state by what puts it furthest from normal, when the model says (normal_deviation)
        if state != NORMAL_STATE and from_normal is not None:
            shares, explained_from = from_normal, EXPLAINED_FROM_NORMAL
        else:
            shares, explained_from = dev, EXPLAINED_FROM_CLUSTER
        top = [(self.feature_names[i], shares[i]) for i in top_indices(shares)]
        if self.bounds is not None and nearest == NORMAL_STATE:
            # Novelty: a few features far out of the benign range leave normal even when the distance dilutes them
            excess, beyond = self.bounds.beyond(x[0].tolist(), self.feature_names, TOP_FEATURES)
            if beyond:
                score = max(score, novelty_score(excess, self.unknown_above))
                state, top, explained_from = UNKNOWN_STATE, beyond, EXPLAINED_FROM_BOUNDS
        return Verdict(cluster, state, score, distance, self.version, top, nearest, state,
                       explained_from=explained_from)

    def _fault(self, problem: str) -> Verdict:
        self.faults += 1
        return Verdict(-1, UNKNOWN_STATE, 0.0, 0.0, self.version, [], UNKNOWN_STATE, UNKNOWN_STATE,
                       fault=printable(problem, 200))

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
            "explanations": EXPLAINED_FROM_NORMAL if self.explains_from_normal else EXPLAINED_FROM_CLUSTER,
            "novelty": "feature_bounds" if self.bounds is not None else "none",
            "attack_states": sorted(self.attack_states),
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
    check_owner: bool = False,
    bundled: bool = False,
) -> StateModel:
    """Validate ``path`` and open it, or raise :class:`ModelError` (one line: file, problem, what to do).

    Checks, in order: the file (not a symlink, a regular file, size cap; with ``check_owner`` — what the model
    watcher asks for every file it would serve — owned by root or this process's user, not writable by group or
    others); ONNX protobuf parses (never following external-data references); no tensor stored
    as external data anywhere; only our exporter's operators and tensor kinds (``checks.check_structure``);
    ``onnx.checker``; the metadata contract; the graph's input and outputs; every model feature BY NAME in
    ``available_features`` (None skips this check, e.g. for `info`); a first session and run in a child process
    with time and memory limits (``sandbox``); the agent's session; test inference on the probe vectors
    (:func:`probe_vectors`), every output checked against the contract.
    ``feature_owner(name) -> probe`` names the probe to enable for a missing feature (default: the registry,
    looked up lazily and only when a feature is missing).
    ``bundled`` is for the models shipped in the package: trusted like the code beside them (no child process),
    and every cluster state counts as declared for mitigation (the attack-state rule). Their ONNX-level checks
    (parse, structure, ``onnx.checker``) run where the code is tested (tests/test_model_runtime.py loads every
    bundled file with all checks), not in the agent: importing onnx and building its checker's operator schemas
    would cost the agent ~9 MB resident for its whole life (bench/bench_memory.py); inputs and outputs are then
    checked on the session. A file named on a command line (`otel-ebpf-model info`, the exporter's own check) is
    the user's choice: no owner check by default.
    """
    path = Path(path)
    data = _read_secure(path, max_bytes, check_owner=check_owner)
    if bundled:
        session = _open_session(path, data)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        names, n_clusters = _metadata_shape(path, meta)
        check_session_io(path, session, len(names), n_clusters)
    else:
        model = _parse_checked(path, data)
        meta = {p.key: p.value for p in model.metadata_props}
        names, n_clusters = _metadata_shape(path, meta)
        check_graph(path, model, len(names), n_clusters)
    if available_features is not None:
        _check_features(path, names, available_features, feature_owner)
    if not bundled:
        prove_bounded(path, data, model, len(names))  # before this process ever opens a session on it
        session = _open_session(path, data)
    state_model = StateModel(path, session, meta, digest=hashlib.sha256(data).hexdigest(), size=len(data),
                             bundled=bundled)
    _test_inference(path, state_model, len(names), n_clusters)
    return state_model


def _parse_checked(path: Path, data: bytes) -> Any:
    """The ONNX-level checks of a file that is not the package's own: parse, no external data, only our
    exporter's operators and tensor kinds, ``onnx.checker``."""
    import onnx

    try:
        # From bytes, so nothing on disk is followed: external-data locations are checked below, never opened.
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise ModelError(path, f"cannot parse as ONNX, truncated or not a model ({type(exc).__name__}: {exc})",
                         "if it is still being copied wait, else export one with "
                         "`otel-ebpf-model export DIR -o MODEL.onnx`") from None
    external = external_tensors(model)
    if external:
        raise ModelError(path, f"tensor {external[0]!r} is stored as external data",
                         "export a self-contained model (all weights inside the .onnx file)")
    check_structure(path, model)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(path, f"invalid ONNX ({exc})",
                         "the file is damaged or was not written by otel-ebpf-model; re-export it") from None
    return model


def _metadata_shape(path: Path, meta: dict[str, str]) -> tuple[list[str], int]:
    """The metadata contract checked; the model's feature names and cluster count."""
    check_metadata(path, meta)
    return json.loads(meta[METADATA_FEATURES]), len(json.loads(meta[METADATA_STATES]))


def _read_secure(path: Path, max_bytes: int, *, check_owner: bool) -> bytes:
    """The file's bytes, read through one descriptor: O_NOFOLLOW (a symlink is refused, not followed), O_NONBLOCK
    (a FIFO swapped in after the directory scan cannot block the agent), then fstat of that very descriptor."""
    if not path.name.isprintable():
        raise ModelError(path, "its name holds control characters", "rename it to plain printable characters")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelError(path, "is a symbolic link, and model files are never followed through links",
                             "copy the file into the model directory (write it, then mv it into place)") from None
        raise ModelError(path, f"cannot read ({exc.strerror or exc})", "check the path and permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(path, "not a regular file", "point at a .onnx file")
        if check_owner:
            _check_owner(path, st)
        if st.st_size == 0:
            raise ModelError(path, "file is empty", "wait for the copy to finish or re-export the model")
        if st.st_size > max_bytes:
            raise ModelError(path, f"{st.st_size} bytes is over the {max_bytes}-byte limit",
                             "this is not a state model (ours are a few KiB); check the file")
        chunks: list[bytes] = []
        held = 0
        while held <= max_bytes:  # the file may grow while we read: never hold more than the cap
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - held))
            if not chunk:
                break
            chunks.append(chunk)
            held += len(chunk)
    except OSError as exc:
        raise ModelError(path, f"cannot read ({exc.strerror or exc})", "check the path and permissions") from None
    finally:
        os.close(fd)
    if held > max_bytes:
        raise ModelError(path, f"grew over the {max_bytes}-byte limit while being read", "check the file")
    return b"".join(chunks)


def _check_owner(path: Path, st: os.stat_result) -> None:
    """Whoever can write the model decides what the agent reports (and, with declared attack states, blocks)."""
    owners = {0, os.geteuid()}
    if st.st_uid not in owners:
        raise ModelError(path, f"is owned by uid {st.st_uid}, not root or this agent's user (uid {os.geteuid()})",
                         f"chown root {path.name} if you trust it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ModelError(path, f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                         f"chmod go-w {path.name}")


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
    for name, x in probe_vectors(n_features):
        try:
            label, distances, deviation, normal_deviation = model.run_all(x)
        except Exception as exc:
            raise ModelError(path, f"test inference on the {name} vector failed ({exc})", hint) from None
        problem = output_problem(label, distances, deviation, 1, n_clusters, n_features,
                                 normal_deviation=normal_deviation)
        if problem is not None:
            raise ModelError(path, f"test inference on the {name} vector: {problem}", hint)


__all__ = ["EXPLAINED_FROM_BOUNDS", "EXPLAINED_FROM_CLUSTER", "EXPLAINED_FROM_NORMAL", "StateModel", "Verdict",
           "load_model", "probe_vectors", "session_options", "top_indices"]
