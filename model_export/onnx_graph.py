"""The ONNX graph of a fitted pipeline (StandardScaler + KMeans | GaussianMixture | Birch), and the parity check.

Every algorithm gives the same three outputs (the contract in ``otel_ebpf_receiver.model.contract``): ``label``,
``distances`` to every cluster, and ``deviation`` (scaled input minus the assigned centre); a model with a
``normal`` cluster also ``normal_deviation``, what explains a window that is not normal (each feature's signed
share of the distance to the nearest normal centre, see the contract's "Explanations"; appended to the graph by
:func:`append_normal_deviation`, which :func:`upgrade_normal_deviation` also applies to a kmeans file exported
before that output existed, from the centres the file holds). The scaler is
converted by skl2onnx's own converter; the clustering part is composed with skl2onnx's algebra operators
rather than taken from its converters, because:

* kmeans: skl2onnx's KMeans converter computes distances as sqrt(|x|² − 2x·c + |c|²) in float32. Near a
  centroid — exactly where normal windows are — that cancels catastrophically (measured: 3e-3 absolute error
  for points 1e-3 from their centroid, 100 % relative) and can take the sqrt of a small negative number. The
  anomaly score is that distance, so we compute |x − c| directly; labels are the same ArgMin.
* gmm: the converter gives labels and probabilities, not a distance. We output the Mahalanobis distance to
  each component, sqrt((x − μ_k)ᵀ Σ_k⁻¹ (x − μ_k)), and label = argmax of the weighted log-likelihood
  (log w_k + log|P_k| − ½(n log 2π + d_k²)), which is what GaussianMixture.predict does.
* birch: skl2onnx has no Birch converter. Birch.predict gives the label of the nearest subcluster centre;
  we output that label, distances[k] = distance to the nearest subcluster centre belonging to cluster k,
  and the deviation from that nearest subcluster centre.

Parity (see :func:`check_parity`): labels identical, distances, deviation and normal_deviation within
``|onnx − sklearn| <= ATOL + RTOL·|sklearn|`` with ATOL = RTOL = 1e-4, on the training data, with the
scikit-learn side computed in float64 from the same float32 input the agent will feed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from otel_ebpf_receiver.model import (INPUT_NAME, NORMAL_STATE, OUTPUT_DEVIATION, OUTPUT_DISTANCES, OUTPUT_LABEL,
                                      OUTPUT_NORMAL_DEVIATION)

TARGET_OPSET = 17   # onnxruntime >= 1.14 runs it; pinned so a model exported today loads on older agents
RTOL = 1e-4
ATOL = 1e-4

ALGORITHMS = ("kmeans", "gmm", "birch")
DISTANCE_KIND = {"kmeans": "euclidean", "gmm": "mahalanobis", "birch": "euclidean"}


def algorithm_of(pipeline: Any) -> str:
    from sklearn.cluster import Birch, KMeans
    from sklearn.mixture import GaussianMixture

    est = pipeline[-1]
    if isinstance(est, KMeans):
        return "kmeans"
    if isinstance(est, GaussianMixture):
        return "gmm"
    if isinstance(est, Birch):
        return "birch"
    raise TypeError(f"unsupported estimator {type(est).__name__}")


def n_clusters_of(pipeline: Any) -> int:
    est = pipeline[-1]
    algorithm = algorithm_of(pipeline)
    if algorithm == "kmeans":
        return len(est.cluster_centers_)
    if algorithm == "gmm":
        return len(est.means_)
    return int(np.max(est.subcluster_labels_)) + 1


def _gmm_precision_cholesky(gmm: Any) -> np.ndarray:
    """(K, n, n) upper-triangular precision Cholesky factors whatever the covariance_type."""
    k, n = gmm.means_.shape
    pc = gmm.precisions_cholesky_
    kind = gmm.covariance_type
    if kind == "full":
        return np.asarray(pc, dtype=np.float64)
    if kind == "tied":
        return np.repeat(pc[None, :, :], k, axis=0)
    if kind == "diag":
        return np.stack([np.diag(row) for row in pc])
    if kind == "spherical":
        return np.stack([np.eye(n) * s for s in pc])
    raise ValueError(f"unsupported covariance_type {kind!r}")


def _gmm_bias(gmm: Any) -> np.ndarray:
    """log w_k + log|P_k| − ½ n log 2π: the weighted log-likelihood is bias_k − ½ d_k²."""
    pc = _gmm_precision_cholesky(gmm)
    n = gmm.means_.shape[1]
    log_det = np.log(np.diagonal(pc, axis1=1, axis2=2)).sum(axis=1)
    return np.log(gmm.weights_) + log_det - 0.5 * n * np.log(2 * np.pi)


# -- the scikit-learn side ------------------------------------------------------------------------------------

def reference_outputs(pipeline: Any, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, distances, deviation) computed by scikit-learn / numpy in float64 — the truth the graph matches."""
    X = np.asarray(X, dtype=np.float64)
    algorithm = algorithm_of(pipeline)
    scaler, est = pipeline[0], pipeline[-1]
    Z = scaler.transform(X)
    labels = np.asarray(pipeline.predict(X), dtype=np.int64)
    if algorithm == "kmeans":
        distances = est.transform(Z)
        deviation = Z - est.cluster_centers_[labels]
    elif algorithm == "gmm":
        pc = _gmm_precision_cholesky(est)
        diff = Z[None, :, :] - est.means_[:, None, :]           # (K, N, n)
        y = np.matmul(diff, pc)                                 # (K, N, n)
        distances = np.sqrt(np.sum(y * y, axis=2)).T            # (N, K)
        deviation = Z - est.means_[labels]
    else:
        sub = est.transform(Z)                                  # (N, S) distances to subcluster centres
        nearest = np.argmin(sub, axis=1)
        k = n_clusters_of(pipeline)
        distances = np.stack([sub[:, est.subcluster_labels_ == c].min(axis=1) for c in range(k)], axis=1)
        deviation = Z - est.subcluster_centers_[nearest]
    return labels, distances, deviation


def _normal_candidates(pipeline: Any, cluster_states: Sequence[str]) -> tuple[np.ndarray, np.ndarray,
                                                                                np.ndarray | None]:
    """(centres (M, n), is_normal (M,) bool, unit (M, n) or None) that ``normal_deviation`` measures from: the
    cluster centres (kmeans), subcluster centres (birch), or component means with sqrt(diag(precision)) (gmm)."""
    algorithm = algorithm_of(pipeline)
    est = pipeline[-1]
    states = np.asarray(list(cluster_states))
    if algorithm == "kmeans":
        return est.cluster_centers_, states == NORMAL_STATE, None
    if algorithm == "gmm":
        pc = _gmm_precision_cholesky(est)                       # P_k = pc_k pc_kᵀ, so P_ii = Σ_j pc_ij²
        return est.means_, states == NORMAL_STATE, np.sqrt(np.sum(pc * pc, axis=2))
    return est.subcluster_centers_, states[est.subcluster_labels_] == NORMAL_STATE, None


def reference_normal_deviation(pipeline: Any, X: np.ndarray, cluster_states: Sequence[str]) -> np.ndarray | None:
    """``normal_deviation`` computed by numpy in float64 (None when no cluster is ``normal``): the scaled window
    minus the nearest normal centre (nearest in the model's own distance), times sqrt(P_ii) for gmm."""
    centres, is_normal, unit = _normal_candidates(pipeline, cluster_states)
    if not is_normal.any():
        return None
    X = np.asarray(X, dtype=np.float64)
    Z = pipeline[0].transform(X)
    if algorithm_of(pipeline) == "gmm":
        nearness = reference_outputs(pipeline, X)[1]            # Mahalanobis distance to every component
    else:
        nearness = np.sqrt(((Z[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2))
    nearest = np.argmin(np.where(is_normal[None, :], nearness, np.inf), axis=1)
    diff = Z - centres[nearest]
    return diff * unit[nearest] if unit is not None else diff


# -- the ONNX side --------------------------------------------------------------------------------------------

def build_onnx(pipeline: Any, n_features: int, cluster_states: Sequence[str] | None = None) -> Any:
    """ModelProto with input ``features`` float32 [None, n] and outputs label, distances, deviation, and
    normal_deviation when ``cluster_states`` names a ``normal`` cluster."""
    from skl2onnx.algebra.onnx_operator import OnnxSubEstimator
    from skl2onnx.algebra.onnx_ops import (
        OnnxAdd, OnnxArgMax, OnnxArgMin, OnnxGather, OnnxMatMul, OnnxMul, OnnxReduceMin,
        OnnxReduceSumSquareApi18, OnnxSqrt, OnnxSub, OnnxTranspose, OnnxUnsqueeze,
    )
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType

    op = TARGET_OPSET
    f32 = np.float32
    algorithm = algorithm_of(pipeline)
    est = pipeline[-1]
    k = n_clusters_of(pipeline)
    axis = lambda *a: np.array(a, dtype=np.int64)  # noqa: E731

    scaled = OnnxSubEstimator(pipeline[0], INPUT_NAME, op_version=op)           # skl2onnx's Scaler converter

    def euclidean(centres: np.ndarray, **names: Any) -> Any:                    # (N, C) = |z − c|
        diff = OnnxSub(OnnxUnsqueeze(scaled, axis(1), op_version=op), centres[None, :, :], op_version=op)
        return OnnxSqrt(OnnxReduceSumSquareApi18(diff, axes=[2], keepdims=0, op_version=op),
                        op_version=op, **names)

    if algorithm == "kmeans":
        centres = est.cluster_centers_.astype(f32)
        distances = euclidean(centres, output_names=[OUTPUT_DISTANCES])
        label = OnnxArgMin(distances, axis=1, keepdims=0, op_version=op, output_names=[OUTPUT_LABEL])
        centre = OnnxGather(centres, label, axis=0, op_version=op)
    elif algorithm == "gmm":
        pc = _gmm_precision_cholesky(est).astype(f32)                           # (K, n, n)
        means = est.means_.astype(f32)
        diff = OnnxSub(OnnxUnsqueeze(scaled, axis(0), op_version=op), means[:, None, :], op_version=op)
        d2 = OnnxReduceSumSquareApi18(OnnxMatMul(diff, pc, op_version=op), axes=[2], keepdims=0,
                                      op_version=op)                            # (K, N)
        d2t = OnnxTranspose(d2, perm=[1, 0], op_version=op)                     # (N, K)
        distances = OnnxSqrt(d2t, op_version=op, output_names=[OUTPUT_DISTANCES])
        loglik = OnnxAdd(OnnxMul(d2t, np.array([-0.5], dtype=f32), op_version=op),
                         _gmm_bias(est).astype(f32)[None, :], op_version=op)
        label = OnnxArgMax(loglik, axis=1, keepdims=0, op_version=op, output_names=[OUTPUT_LABEL])
        centre = OnnxGather(means, label, axis=0, op_version=op)
    else:
        centres = est.subcluster_centers_.astype(f32)                           # (S, n)
        sub_labels = est.subcluster_labels_.astype(np.int64)
        sub = euclidean(centres, output_names=[_SUBCLUSTER_DISTANCES])         # (N, S)
        nearest = OnnxArgMin(sub, axis=1, keepdims=0, op_version=op)
        label = OnnxGather(sub_labels, nearest, axis=0, op_version=op, output_names=[OUTPUT_LABEL])
        mask = np.where(sub_labels[None, :] == np.arange(k)[:, None], 0.0, np.inf).astype(f32)  # (K, S)
        distances = OnnxReduceMin(  # axes is an attribute up to opset 17
            OnnxAdd(OnnxUnsqueeze(sub, axis(1), op_version=op), mask, op_version=op),
            axes=[2], keepdims=0, op_version=op, output_names=[OUTPUT_DISTANCES])
        centre = OnnxGather(centres, nearest, axis=0, op_version=op)
    deviation = OnnxSub(scaled, centre, op_version=op, output_names=[OUTPUT_DEVIATION])

    model = label.to_onnx(
        inputs=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        outputs=[(OUTPUT_LABEL, Int64TensorType([None])),
                 (OUTPUT_DISTANCES, FloatTensorType([None, k])),
                 (OUTPUT_DEVIATION, FloatTensorType([None, n_features]))],
        other_outputs=[distances, deviation],
        target_opset=op,
    )
    model.graph.name = f"otel_ebpf_state_{algorithm}"
    if cluster_states is not None:
        centres, is_normal, unit = _normal_candidates(pipeline, cluster_states)
        if is_normal.any():
            nearness = {"kmeans": OUTPUT_DISTANCES, "gmm": OUTPUT_DISTANCES, "birch": _SUBCLUSTER_DISTANCES}
            append_normal_deviation(model, _scaled_name(model), nearness[algorithm], centres, is_normal, unit)
    return model


_SUBCLUSTER_DISTANCES = "subcluster_distances"
_PREFIX = "normal_dev_"


def _scaled_name(model: Any) -> str:
    """The scaled window: the first input of the node that writes ``deviation`` (scaled − centre)."""
    writer = [n for n in model.graph.node if OUTPUT_DEVIATION in n.output]
    if len(writer) != 1 or writer[0].op_type != "Sub":
        raise ValueError("the graph does not compute deviation as scaled - centre")
    return writer[0].input[0]


def append_normal_deviation(model: Any, scaled: str, nearness: str, centres: np.ndarray, is_normal: np.ndarray,
                            unit: np.ndarray | None = None) -> None:
    """Add the output ``normal_deviation`` to ``model`` in place: ``scaled − centres[m]`` (times ``unit[m]``),
    m the candidate with the smallest ``nearness`` (tensor (N, M)) among those ``is_normal``. Only operators the
    runtime allows (Add, ArgMin, Gather, Sub, Mul); the existing outputs are untouched."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    taken = {name for n in graph.node for name in n.output} | {t.name for t in graph.initializer}
    if any(name.startswith(_PREFIX) for name in taken) or any(o.name == OUTPUT_NORMAL_DEVIATION
                                                               for o in graph.output):
        raise ValueError(f"the graph already has {OUTPUT_NORMAL_DEVIATION}")
    p = _PREFIX
    mask = np.where(np.asarray(is_normal, dtype=bool), 0.0, np.inf).astype(np.float32)[None, :]   # (1, M)
    graph.initializer.extend([numpy_helper.from_array(mask, p + "mask"),
                              numpy_helper.from_array(np.asarray(centres, dtype=np.float32), p + "centres")])
    last = OUTPUT_NORMAL_DEVIATION if unit is None else p + "diff"
    nodes = [helper.make_node("Add", [nearness, p + "mask"], [p + "masked"], name=p + "add"),
             helper.make_node("ArgMin", [p + "masked"], [p + "nearest"], axis=1, keepdims=0, name=p + "argmin"),
             helper.make_node("Gather", [p + "centres", p + "nearest"], [p + "centre"], axis=0, name=p + "gather"),
             helper.make_node("Sub", [scaled, p + "centre"], [last], name=p + "sub")]
    if unit is not None:
        graph.initializer.append(numpy_helper.from_array(np.asarray(unit, dtype=np.float32), p + "unit"))
        nodes += [helper.make_node("Gather", [p + "unit", p + "nearest"], [p + "scale"], axis=0,
                                   name=p + "gather_unit"),
                  helper.make_node("Mul", [p + "diff", p + "scale"], [OUTPUT_NORMAL_DEVIATION], name=p + "mul")]
    graph.node.extend(nodes)
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NORMAL_DEVIATION, TensorProto.FLOAT,
                                                      [None, len(centres[0])]))


def upgrade_normal_deviation(model: Any) -> Any:
    """A copy of a kmeans model file written by our exporter before ``normal_deviation`` existed, with that output
    added from the centres and scaler the file already holds (no retraining: label, distances and deviation are
    computed by the very same nodes). Raises ValueError for anything else."""
    import json

    from onnx import numpy_helper

    upgraded = type(model)()
    upgraded.CopyFrom(model)
    meta = {p.key: p.value for p in upgraded.metadata_props}
    if meta.get("algorithm") != "kmeans":
        raise ValueError(f"only kmeans files can be upgraded in place (this one is {meta.get('algorithm')!r}); "
                         "re-export it from its training directory")
    states = json.loads(meta["cluster_states"])
    scaled = _scaled_name(upgraded)
    writer = next(n for n in upgraded.graph.node if OUTPUT_DEVIATION in n.output)
    gather = [n for n in upgraded.graph.node if writer.input[1] in n.output and n.op_type == "Gather"]
    initializers = {t.name: t for t in upgraded.graph.initializer}
    if len(gather) != 1 or gather[0].input[0] not in initializers:
        raise ValueError("the graph does not gather its centres from a constant")
    centres = numpy_helper.to_array(initializers[gather[0].input[0]])
    if centres.shape[0] != len(states):
        raise ValueError(f"{centres.shape[0]} centres for {len(states)} cluster states")
    is_normal = np.array([state == NORMAL_STATE for state in states])
    if not is_normal.any():
        raise ValueError("no cluster is normal: nothing to explain from")
    append_normal_deviation(upgraded, scaled, OUTPUT_DISTANCES, centres, is_normal)
    return upgraded


# -- parity ---------------------------------------------------------------------------------------------------

@dataclass
class Parity:
    rows: int
    label_mismatches: int
    distance_failures: int
    deviation_failures: int
    max_abs_distance_error: float
    max_abs_deviation_error: float
    first_bad_row: int | None
    normal_deviation_failures: int = 0   # rows whose normal_deviation (when the graph has it) is outside tolerance

    @property
    def ok(self) -> bool:
        return (self.label_mismatches == 0 and self.distance_failures == 0 and self.deviation_failures == 0
                and self.normal_deviation_failures == 0)

    def summary(self) -> str:
        return (f"{self.rows} rows: {self.label_mismatches} label mismatches, "
                f"{self.distance_failures} distances, {self.deviation_failures} deviations and "
                f"{self.normal_deviation_failures} normal deviations outside "
                f"|onnx-sklearn| <= {ATOL:g} + {RTOL:g}*|sklearn| (max abs error: distances "
                f"{self.max_abs_distance_error:.3g}, deviation {self.max_abs_deviation_error:.3g})")


def check_parity(pipeline: Any, onnx_outputs: tuple[np.ndarray, ...], X32: np.ndarray,
                 cluster_states: Sequence[str] | None = None) -> Parity:
    """Compare the graph's outputs on ``X32`` with scikit-learn on the same (float32-rounded) values; a fourth
    output (normal_deviation) with :func:`reference_normal_deviation` for ``cluster_states``."""
    ref_label, ref_dist, ref_dev = reference_outputs(pipeline, X32.astype(np.float64))
    label, dist, dev = onnx_outputs[:3]
    label_bad = label != ref_label
    dist_err = np.abs(dist.astype(np.float64) - ref_dist)
    dev_err = np.abs(dev.astype(np.float64) - ref_dev)
    dist_bad = (dist_err > ATOL + RTOL * np.abs(ref_dist)).any(axis=1)
    dev_bad = (dev_err > ATOL + RTOL * np.abs(ref_dev)).any(axis=1)
    normal_bad = np.zeros(len(X32), dtype=bool)
    if len(onnx_outputs) > 3:
        ref_normal = (reference_normal_deviation(pipeline, X32.astype(np.float64), cluster_states)
                      if cluster_states is not None else None)
        if ref_normal is None:
            normal_bad[:] = True   # the graph explains from a normal cluster the states do not have
        else:
            normal_err = np.abs(onnx_outputs[3].astype(np.float64) - ref_normal)
            normal_bad = (normal_err > ATOL + RTOL * np.abs(ref_normal)).any(axis=1)
    any_bad = np.flatnonzero(label_bad | dist_bad | dev_bad | normal_bad)
    return Parity(
        rows=len(X32),
        label_mismatches=int(label_bad.sum()),
        distance_failures=int(dist_bad.sum()),
        deviation_failures=int(dev_bad.sum()),
        max_abs_distance_error=float(dist_err.max(initial=0.0)),
        max_abs_deviation_error=float(dev_err.max(initial=0.0)),
        first_bad_row=int(any_bad[0]) if len(any_bad) else None,
        normal_deviation_failures=int(normal_bad.sum()),
    )
