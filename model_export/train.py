"""Label, cluster, classify: fit the pipeline, name each cluster by the majority label of its windows, measure
how far training windows lie from their centre, and export the lot as one self-describing ONNX file.

The intermediate (``DIR/pipeline.joblib``) is a pickle: load only directories you produced yourself.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from otel_ebpf_receiver import model as runtime
from otel_ebpf_receiver.model.contract import METADATA_FEATURE_BOUNDS
from otel_ebpf_receiver.model.novelty import FeatureBounds

from .bounds import benign_bounds
from .onnx_graph import (
    ALGORITHMS, DISTANCE_KIND, TARGET_OPSET, Parity, build_onnx, check_parity, n_clusters_of,
    reference_outputs,
)
from .windows import WindowTable

BUNDLE_FILE = "pipeline.joblib"
METADATA_FILE = "metadata.json"
PLOT_FILE = "clusters.png"
REPORT_FILE = "report.txt"
BUNDLE_FORMAT = 1
PARITY_BATCH = 4096
SILHOUETTE_SAMPLE = 5000


class TrainError(Exception):
    """Training or export cannot go on; the message is one line saying why and what to do."""


@dataclass
class TrainConfig:
    algorithm: str = "kmeans"
    clusters: int | None = None        # default: one per distinct label
    percentile: float = 99.0           # distance_thresholds[k] = this percentile of cluster k's training distances
    unknown_above: float = 1.5         # score above this → "unknown"
    min_threshold: float = 0.25        # floor for a threshold (a cluster of identical windows has percentile 0)
    seed: int = 0
    birch_threshold: float = 0.5       # Birch subcluster radius, in training standard deviations
    gmm_covariance: str = "full"
    gmm_reg_covar: float = 1e-2        # keeps Mahalanobis finite for a feature constant within a component
    weighting: str = "none"            # "segments": weight features by how steady they are within a workload
    scale_floor: float = 0.0           # never divide a feature by less than this (in the feature's own unit)
    min_weight: float = 0.05           # lowest weight a feature gets with weighting="segments"
    # Novelty (runtime contract "Novelty"): per-feature benign bounds, None = none. The range of the normal-labelled
    # windows between these percentiles, widened on each side by bounds_margin x its width (floored at scale_floor)
    bounds_margin: float | None = None
    bounds_percentiles: tuple[float, float] = (0.0, 100.0)

WEIGHTINGS = ("none", "segments")
SEGMENT_GAP_S = 2.5                    # windows further apart than this (or differently labelled): another segment


@dataclass
class Evaluation:
    clusters: np.ndarray               # (N,) assigned cluster
    distances: np.ndarray              # (N,) distance to the assigned cluster
    scores: np.ndarray                 # (N,) distance / threshold of that cluster
    states: np.ndarray                 # (N,) predicted state (with "unknown" beyond unknown_above)
    purity: float
    silhouette: float
    confusion_labels: list[str]
    confusion_states: list[str]
    confusion: np.ndarray              # labels × states counts
    cluster_sizes: list[int]
    cluster_purity: list[float]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Trained:
    """What `train` writes to DIR and `export` reads back."""

    pipeline: Any
    algorithm: str
    feature_names: tuple[str, ...]
    cluster_states: list[str]
    thresholds: list[float]
    config: TrainConfig
    training: dict[str, Any]           # facts that go into the model's metadata
    X: np.ndarray                      # float32 training windows (for the export parity check and plots)
    labels: np.ndarray
    evaluation: Evaluation | None = None
    bounds: FeatureBounds | None = None  # benign range per feature (metadata feature_bounds); None: distance alone


# -- fitting ---------------------------------------------------------------------------------------------------

def make_pipeline(config: TrainConfig, k: int) -> Any:
    from sklearn.cluster import Birch, KMeans
    from sklearn.mixture import GaussianMixture
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if config.algorithm == "kmeans":
        est = KMeans(n_clusters=k, n_init=10, random_state=config.seed)
    elif config.algorithm == "gmm":
        est = GaussianMixture(n_components=k, covariance_type=config.gmm_covariance, n_init=3,
                              reg_covar=config.gmm_reg_covar, random_state=config.seed)
    elif config.algorithm == "birch":
        est = Birch(n_clusters=k, threshold=config.birch_threshold)
    else:
        raise TrainError(f"unknown algorithm {config.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    return Pipeline([("scale", StandardScaler()), ("cluster", est)])


def segments(table: WindowTable, gap: float = SEGMENT_GAP_S) -> np.ndarray:
    """Segment id per window: a run of windows in time order with one label and no gap longer than ``gap`` s —
    one steady workload (the lab leaves an unrecorded drain between scenarios; `otel-ebpf-lab record-host` writes
    one run)."""
    order = np.argsort(table.timestamps, kind="stable")
    ids = np.zeros(len(table), dtype=np.int64)
    current = 0
    for before, after in zip(order[:-1], order[1:]):
        if table.timestamps[after] - table.timestamps[before] > gap or table.labels[after] != table.labels[before]:
            current += 1
        ids[after] = current
    return ids


def feature_weights(table: WindowTable, min_weight: float = 0.05) -> np.ndarray:
    """Per feature, the share of its variance that lies *between* steady workloads (η², the correlation ratio
    over :func:`segments`), floored at ``min_weight``. A feature that moves with what the host is doing keeps
    weight ~1; one that jitters within a steady workload as much as between workloads (a p99 latency over the
    few requests of one window, a neighbour's disk) gets little, so it cannot push a window away from its
    cluster on its own. A feature constant in the recording keeps weight 1 (no evidence that it is noise).
    Standardised distances then weigh each feature by this share: scale = std / weight."""
    X = table.values
    total = X.var(axis=0)
    seg = segments(table)
    within = np.zeros(X.shape[1])
    for s in np.unique(seg):
        part = X[seg == s]
        within += ((part - part.mean(axis=0)) ** 2).sum(axis=0)
    within /= max(len(X), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta2 = np.where(total > 0, 1.0 - within / total, 1.0)
    return np.clip(eta2, min_weight, 1.0)


def majority_states(clusters: np.ndarray, labels: np.ndarray, k: int) -> list[str]:
    """State of each cluster = the most common non-empty label among its windows (ties: alphabetical);
    a cluster with no labelled window is "unknown"."""
    states = []
    for c in range(k):
        votes = Counter(lab for lab in labels[clusters == c] if lab)
        states.append(min(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0] if votes else runtime.UNKNOWN_STATE)
    return states


def distance_thresholds(clusters: np.ndarray, distances: np.ndarray, k: int, percentile: float,
                        floor: float) -> list[float]:
    out = []
    for c in range(k):
        member = distances[clusters == c]
        value = float(np.percentile(member, percentile)) if len(member) else 0.0
        out.append(max(value, floor))
    return out


def fit(table: WindowTable, config: TrainConfig, *, progress: bool = False,
        sources: Sequence[str | os.PathLike[str]] = ()) -> Trained:
    import warnings

    import sklearn
    from sklearn.exceptions import ConvergenceWarning

    labels = np.asarray(table.labels, dtype=object)
    distinct = sorted({lab for lab in labels if lab})
    k = config.clusters or len(distinct)
    if k < 1:
        raise TrainError("no labelled windows: label the recordings or pass --clusters K")
    if len(table) < max(k, 2):
        raise TrainError(f"{len(table)} windows for {k} clusters: record more windows")
    if not (0 < config.percentile <= 100) or config.unknown_above <= 0 or config.min_threshold <= 0:
        raise TrainError("--percentile must be in (0, 100], --unknown-above and --min-threshold > 0")
    if config.weighting not in WEIGHTINGS or config.scale_floor < 0 or not 0 < config.min_weight <= 1:
        raise TrainError(f"weighting must be one of {', '.join(WEIGHTINGS)}, scale_floor >= 0, min_weight in (0, 1]")

    pipeline = make_pipeline(config, k)
    # The scaler is fitted first and adjusted (floor, weights), then the clustering on what it outputs: the ONNX
    # graph converts the scaler from its mean_/scale_, so serving applies exactly the same weighting.
    scaler = pipeline[0].fit(table.values)
    scaler.scale_ = np.maximum(scaler.scale_, config.scale_floor) if config.scale_floor else scaler.scale_
    weights = feature_weights(table, config.min_weight) if config.weighting == "segments" else None
    if weights is not None:
        scaler.scale_ = scaler.scale_ / weights
    with warnings.catch_warnings():
        if config.algorithm != "gmm":  # kmeans/birch: fewer distinct points/subclusters than clusters
            warnings.simplefilter("error", ConvergenceWarning)
        try:
            pipeline[-1].fit(scaler.transform(table.values))
        except ConvergenceWarning as exc:
            raise TrainError(f"{config.algorithm} did not converge ({' '.join(str(exc).split())}); "
                             "lower --clusters (or --birch-threshold for birch)") from None
    k = n_clusters_of(pipeline)
    clusters, dist_all, _ = reference_outputs(pipeline, table.values)
    assigned = dist_all[np.arange(len(clusters)), clusters]
    states = majority_states(clusters, labels, k)
    thresholds = distance_thresholds(clusters, assigned, k, config.percentile, config.min_threshold)

    import onnx
    import skl2onnx

    est_params = {key: v for key, v in pipeline[-1].get_params().items()
                  if isinstance(v, (int, float, str, bool)) or v is None}
    training = {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rows": int(len(table)),
        "labelled_rows": int(sum(1 for lab in labels if lab)),
        "label_counts": dict(sorted(Counter(lab or "(none)" for lab in labels).items())),
        "files": [_file_fact(p, rows) for p, rows in _sources(table, sources)],
        "time_range": [float(table.timestamps.min()), float(table.timestamps.max())] if len(table) else [],
        "algorithm_params": est_params,
        "seed": config.seed,
        "min_threshold": config.min_threshold,
        "weighting": config.weighting,
        "scale_floor": config.scale_floor,
        **({"feature_weights": {n: round(float(w), 4) for n, w in zip(table.names, weights)},
            "segments": int(segments(table).max() + 1) if len(table) else 0} if weights is not None else {}),
        "versions": {"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__,
                     "onnx": onnx.__version__, "numpy": np.__version__, "target_opset": TARGET_OPSET},
    }
    trained = Trained(pipeline, config.algorithm, tuple(table.names), states, thresholds, config, training,
                      table.values.astype(np.float32), labels)
    if config.bounds_margin is not None:
        try:
            trained.bounds = benign_bounds(table, config.bounds_margin, config.bounds_percentiles, config.scale_floor)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        training["feature_bounds"] = {"margin": config.bounds_margin, "percentiles": list(config.bounds_percentiles)}
    trained.evaluation = evaluate(trained, clusters, assigned)
    ev = trained.evaluation
    training.update({
        "cluster_sizes": ev.cluster_sizes,
        "purity": round(ev.purity, 6),
        "silhouette": None if np.isnan(ev.silhouette) else round(ev.silhouette, 6),
        "unknown_rate": round(float(np.mean(ev.states == runtime.UNKNOWN_STATE)), 6),
    })
    return trained


def _sources(table: WindowTable, sources: Sequence[str | os.PathLike[str]]) -> list[tuple[str, int]]:
    return table.sources or [(str(s), 0) for s in sources]


def _file_fact(path: str, rows: int) -> dict[str, Any]:
    fact: dict[str, Any] = {"name": os.path.basename(path), "rows": rows}
    try:
        with open(path, "rb") as fh:
            fact["sha256"] = hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        pass
    return fact


def evaluate(trained: Trained, clusters: np.ndarray, assigned: np.ndarray) -> Evaluation:
    from sklearn.metrics import silhouette_score

    k = len(trained.cluster_states)
    labels = trained.labels
    thresholds = np.asarray(trained.thresholds)
    scores = assigned / thresholds[clusters]
    cluster_state = np.asarray(trained.cluster_states, dtype=object)[clusters]
    states = np.where(scores <= trained.config.unknown_above, cluster_state, runtime.UNKNOWN_STATE)

    labelled = np.asarray([bool(lab) for lab in labels])
    sizes, purities, majority_total = [], [], 0
    for c in range(k):
        member = labels[(clusters == c) & labelled]
        votes = Counter(member)
        top = max(votes.values()) if votes else 0
        majority_total += top
        sizes.append(int(np.sum(clusters == c)))
        purities.append(top / len(member) if len(member) else float("nan"))
    purity = majority_total / labelled.sum() if labelled.any() else float("nan")

    silhouette = float("nan")
    if 1 < len(np.unique(clusters)) < len(clusters):
        Z = trained.pipeline[0].transform(trained.X.astype(np.float64))
        sample = min(len(Z), SILHOUETTE_SAMPLE)
        silhouette = float(silhouette_score(Z, clusters, sample_size=sample, random_state=trained.config.seed))

    row_names = sorted({lab for lab in labels if lab}) + (["(none)"] if not labelled.all() else [])
    col_names = sorted(set(trained.cluster_states) | {runtime.UNKNOWN_STATE})
    matrix = np.zeros((len(row_names), len(col_names)), dtype=np.int64)
    ri = {n: i for i, n in enumerate(row_names)}
    ci = {n: i for i, n in enumerate(col_names)}
    for lab, st in zip(labels, states):
        matrix[ri[lab or "(none)"], ci[st]] += 1

    warnings = [f"label {lab!r} is the majority of no cluster: its windows are reported as other states "
                f"(try --clusters {k + 1} or more)"
                for lab in row_names if lab != "(none)" and lab not in trained.cluster_states]
    warnings += [f"cluster {c} has no labelled window: it reports 'unknown'"
                 for c in range(k) if trained.cluster_states[c] == runtime.UNKNOWN_STATE]
    return Evaluation(clusters, assigned, scores, states, float(purity), silhouette, row_names, col_names,
                      matrix, sizes, purities, warnings)


# -- the training directory -------------------------------------------------------------------------------------

def save(trained: Trained, directory: str | os.PathLike[str]) -> Path:
    import joblib

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    evaluation, trained.evaluation = trained.evaluation, None  # recomputable, and keeps the pickle small
    try:
        joblib.dump({"format": BUNDLE_FORMAT, "trained": trained}, out / BUNDLE_FILE)
    finally:
        trained.evaluation = evaluation
    (out / METADATA_FILE).write_text(json.dumps(metadata(trained, version="(set at export)"), indent=2) + "\n")
    return out / BUNDLE_FILE


def load(directory: str | os.PathLike[str]) -> Trained:
    import joblib

    path = Path(directory) / BUNDLE_FILE
    if not path.is_file():
        raise TrainError(f"{path} not found: run `otel-ebpf-model train FILES -o {directory}` first")
    bundle = joblib.load(path)
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise TrainError(f"{path} was written by another version of otel-ebpf-model: train again")
    trained: Trained = bundle["trained"]
    clusters, dist_all, _ = reference_outputs(trained.pipeline, trained.X.astype(np.float64))
    trained.evaluation = evaluate(trained, clusters, dist_all[np.arange(len(clusters)), clusters])
    return trained


# -- export -------------------------------------------------------------------------------------------------------

def metadata(trained: Trained, version: str) -> dict[str, str]:
    bounds = trained.bounds
    return {
        runtime.METADATA_FORMAT: runtime.MODEL_FORMAT,
        runtime.METADATA_VERSION: version,
        runtime.METADATA_ALGORITHM: trained.algorithm,
        runtime.METADATA_FEATURES: json.dumps(list(trained.feature_names)),
        runtime.METADATA_STATES: json.dumps(trained.cluster_states),
        runtime.METADATA_DISTANCE: DISTANCE_KIND[trained.algorithm],
        runtime.METADATA_THRESHOLDS: json.dumps([float(t) for t in trained.thresholds]),
        runtime.METADATA_PERCENTILE: f"{trained.config.percentile:g}",
        runtime.METADATA_UNKNOWN_ABOVE: f"{trained.config.unknown_above:g}",
        runtime.METADATA_TRAINING: json.dumps(trained.training, sort_keys=True),
        **({METADATA_FEATURE_BOUNDS: json.dumps(bounds.to_json())} if bounds is not None else {}),
    }


@dataclass
class Exported:
    path: Path
    parity: Parity
    model: runtime.StateModel


def onnx_outputs(proto_bytes: bytes, X32: np.ndarray, progress: bool = False) -> tuple[np.ndarray, ...]:
    import onnxruntime as ort
    from tqdm import tqdm

    session = ort.InferenceSession(proto_bytes, runtime.session_options(), providers=["CPUExecutionProvider"])
    names = list(runtime.OUTPUT_NAMES)
    if any(o.name == runtime.OUTPUT_NORMAL_DEVIATION for o in session.get_outputs()):
        names.append(runtime.OUTPUT_NORMAL_DEVIATION)
    parts: list[list[np.ndarray]] = [[] for _ in names]
    batches = range(0, len(X32), PARITY_BATCH)
    for start in tqdm(batches, desc="parity", unit="batch", disable=None if progress else True):
        out = session.run(names, {runtime.INPUT_NAME: X32[start:start + PARITY_BATCH]})
        for acc, part in zip(parts, out):
            acc.append(part)
    return tuple(np.concatenate(p) for p in parts)


def export(trained: Trained, path: str | os.PathLike[str], *, version: str | None = None,
           progress: bool = False, on_step: Callable[[str], None] | None = None,
           attack_states: Sequence[str] = ()) -> Exported:
    """Convert, check parity on the training windows, and write ``path`` — or raise TrainError and write
    nothing. The file appears atomically (written as a dotfile, validated by the runtime's own loader, then
    renamed), so a ModelWatcher on that directory never sees it half-written.

    ``attack_states`` are the states this model declares as attacks (metadata ``attack_states``): a model dropped
    in the model directory drives mitigation only for states it declares (the attack-state rule, contract.py)."""
    step = on_step or (lambda _msg: None)
    out = Path(path)
    attack_states = list(dict.fromkeys(attack_states))
    undeclarable = [s for s in attack_states if s not in trained.cluster_states or s == runtime.UNKNOWN_STATE]
    if undeclarable:
        known = ", ".join(s for s in dict.fromkeys(trained.cluster_states) if s != runtime.UNKNOWN_STATE)
        raise TrainError(f"--attack-states {','.join(undeclarable)}: not a state of this model (its states: "
                         f"{known or 'none'}); name states it has, never 'unknown'")
    step("convert")
    proto = build_onnx(trained.pipeline, len(trained.feature_names), trained.cluster_states)
    X32 = trained.X.astype(np.float32)
    step("parity")
    parity = check_parity(trained.pipeline, onnx_outputs(proto.SerializeToString(), X32, progress), X32,
                          trained.cluster_states)
    if not parity.ok:
        raise TrainError(f"refusing to write {out}: ONNX and scikit-learn disagree on {parity.summary()}, "
                         f"first at training row {parity.first_bad_row}; retrain (another --seed) or report it")
    if version is None:
        digest = hashlib.sha256(proto.SerializeToString()).hexdigest()[:8]
        stamp = trained.training["created"].replace("-", "").replace(":", "")
        version = f"{trained.algorithm}-{stamp}-{digest}"
    props = metadata(trained, version)
    if attack_states:
        props[runtime.METADATA_ATTACK_STATES] = json.dumps(attack_states)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    from otel_ebpf_receiver import __version__

    proto.producer_name = "otel-ebpf-model"
    proto.producer_version = __version__
    proto.doc_string = (f"otel-ebpf-receiver system-state model ({trained.algorithm}); "
                        f"see otel_ebpf_receiver/model/contract.py for the contract")
    step("write")
    write_checked(proto, out)
    return Exported(out, parity, runtime.load_model(out, None))


def write_checked(proto: Any, out: Path) -> None:
    """Write atomically (a dotfile validated by the runtime's own loader, then renamed), or raise TrainError."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.write_bytes(proto.SerializeToString())
        try:
            runtime.load_model(tmp, None)
        except runtime.ModelError as exc:
            raise TrainError(f"refusing to write {out}: the runtime rejects it ({exc.problem})") from None
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

