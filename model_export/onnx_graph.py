"""The ONNX graph of a fitted pipeline (StandardScaler + KMeans | GaussianMixture | Birch), and the parity check.

Every algorithm gives the same three outputs (the contract in ``otel_ebpf_receiver.model.contract``): ``label``,
``distances`` to every cluster, and ``deviation`` (scaled input minus the assigned centre). The scaler is
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

Parity (see :func:`check_parity`): labels identical, distances and deviation within
``|onnx − sklearn| <= ATOL + RTOL·|sklearn|`` with ATOL = RTOL = 1e-4, on the training data, with the
scikit-learn side computed in float64 from the same float32 input the agent will feed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from otel_ebpf_receiver.model import INPUT_NAME, OUTPUT_DEVIATION, OUTPUT_DISTANCES, OUTPUT_LABEL

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


# -- the ONNX side --------------------------------------------------------------------------------------------

def build_onnx(pipeline: Any, n_features: int) -> Any:
    """ModelProto with input ``features`` float32 [None, n] and outputs label, distances, deviation."""
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
        sub = euclidean(centres)                                                # (N, S)
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
    return model


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

    @property
    def ok(self) -> bool:
        return self.label_mismatches == 0 and self.distance_failures == 0 and self.deviation_failures == 0

    def summary(self) -> str:
        return (f"{self.rows} rows: {self.label_mismatches} label mismatches, "
                f"{self.distance_failures} distances and {self.deviation_failures} deviations outside "
                f"|onnx-sklearn| <= {ATOL:g} + {RTOL:g}*|sklearn| (max abs error: distances "
                f"{self.max_abs_distance_error:.3g}, deviation {self.max_abs_deviation_error:.3g})")


def check_parity(pipeline: Any, onnx_outputs: tuple[np.ndarray, np.ndarray, np.ndarray],
                 X32: np.ndarray) -> Parity:
    """Compare the graph's outputs on ``X32`` with scikit-learn on the same (float32-rounded) values."""
    ref_label, ref_dist, ref_dev = reference_outputs(pipeline, X32.astype(np.float64))
    label, dist, dev = onnx_outputs
    label_bad = label != ref_label
    dist_err = np.abs(dist.astype(np.float64) - ref_dist)
    dev_err = np.abs(dev.astype(np.float64) - ref_dev)
    dist_bad = (dist_err > ATOL + RTOL * np.abs(ref_dist)).any(axis=1)
    dev_bad = (dev_err > ATOL + RTOL * np.abs(ref_dev)).any(axis=1)
    any_bad = np.flatnonzero(label_bad | dist_bad | dev_bad)
    return Parity(
        rows=len(X32),
        label_mismatches=int(label_bad.sum()),
        distance_failures=int(dist_bad.sum()),
        deviation_failures=int(dev_bad.sum()),
        max_abs_distance_error=float(dist_err.max(initial=0.0)),
        max_abs_deviation_error=float(dev_err.max(initial=0.0)),
        first_bad_row=int(any_bad[0]) if len(any_bad) else None,
    )
