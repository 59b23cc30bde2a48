"""Static checks of a parsed model file, before anything runs it: no external data anywhere, only the operators
and tensors our exporter writes, the metadata contract (with every free-text field bounded and printable), and the
graph's inputs and outputs. Each refusal is one :class:`ModelError` line naming the field, why, and the fix.

A model file is an input like any other: everything here assumes it may have been written to hurt the agent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from .contract import (ALLOWED_DOMAINS, ALLOWED_OPERATORS, FEATURE_NAME, INPUT_NAME, MAX_CLUSTERS, MAX_FEATURES,
                       MAX_JSON_DEPTH, MAX_METADATA_CHARS, MAX_NODES, MAX_TENSOR_ELEMENTS, MAX_VERSION_CHARS,
                       METADATA_ALGORITHM, METADATA_ATTACK_STATES, METADATA_DISTANCE, METADATA_FEATURE_BOUNDS,
                       METADATA_FEATURES,
                       METADATA_FORMAT, METADATA_PERCENTILE, METADATA_STATES, METADATA_THRESHOLDS,
                       METADATA_TRAINING, METADATA_UNKNOWN_ABOVE, METADATA_VERSION, MODEL_FORMAT, OUTPUT_DEVIATION,
                       OUTPUT_DISTANCES, OUTPUT_LABEL, OUTPUT_NAMES, OUTPUT_NORMAL_DEVIATION, REQUIRED_METADATA,
                       STATE_NAME, UNKNOWN_STATE, WORD, ModelError)
from .novelty import FeatureBounds

REEXPORT = "re-export it with `otel-ebpf-model export`"
GRAPH_HINT = "the graph does not follow the state-model contract; " + REEXPORT


# -- JSON metadata ------------------------------------------------------------------------------------------------

def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} overflows a float")
    return value


def _small_int(text: str) -> int:
    if len(text.lstrip("-")) > 18:  # beyond int64: nothing in our metadata counts that high
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


def parse_json(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, numbers that fit a float or an int64, at most MAX_JSON_DEPTH levels, no
    control characters in any string. Raises ValueError (RecursionError and OverflowError become ValueError)."""
    if len(text) > MAX_METADATA_CHARS:
        raise ValueError(f"{len(text)} characters (limit {MAX_METADATA_CHARS})")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_small_int)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except OverflowError as exc:
        raise ValueError(str(exc)) from None
    _walk(value, 1)
    return value


def _walk(value: Any, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        if not value.isprintable():
            raise ValueError("a string holds control characters")
    elif isinstance(value, list):
        for item in value:
            _walk(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(key, depth + 1)
            _walk(item, depth + 1)


def check_metadata(path: Path, meta: Mapping[str, str]) -> None:
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelError(path, f"metadata_props lacks {', '.join(missing)}",
                         f"this is not an otel-ebpf-model state model; {REEXPORT}")
    if meta[METADATA_FORMAT] != MODEL_FORMAT:
        raise ModelError(path, f"model format {meta[METADATA_FORMAT]!r}, this agent reads {MODEL_FORMAT!r}",
                         f"{REEXPORT} from this version")

    def parsed(key: str, kind: type) -> Any:
        try:
            value = parse_json(meta[key])
        except ValueError as exc:
            raise ModelError(path, f"metadata {key} is not valid JSON ({exc})", REEXPORT) from None
        if not isinstance(value, kind):
            raise ModelError(path, f"metadata {key} is not a JSON {kind.__name__}", REEXPORT)
        return value

    version = meta[METADATA_VERSION]
    if not version.strip() or len(version) > MAX_VERSION_CHARS or not all(" " <= c <= "~" for c in version):
        raise ModelError(path, f"metadata model_version must be 1-{MAX_VERSION_CHARS} printable ASCII characters "
                               f"(it goes into every data point)", REEXPORT)
    for key in (METADATA_ALGORITHM, METADATA_DISTANCE):
        if not WORD.fullmatch(meta[key]):
            raise ModelError(path, f"metadata {key} must be a lower-case word like 'kmeans'", REEXPORT)
    names = parsed(METADATA_FEATURES, list)
    if not 0 < len(names) <= MAX_FEATURES or len(set(map(str, names))) != len(names) \
            or not all(isinstance(n, str) and FEATURE_NAME.fullmatch(n) for n in names):
        raise ModelError(path, f"metadata feature_names must be 1-{MAX_FEATURES} distinct names like "
                               "'syscalls.rate_log1p'", REEXPORT)
    states = parsed(METADATA_STATES, list)
    if not 0 < len(states) <= MAX_CLUSTERS or not all(isinstance(s, str) and STATE_NAME.fullmatch(s) for s in states):
        raise ModelError(path, f"metadata cluster_states must be 1-{MAX_CLUSTERS} state names matching "
                               f"{STATE_NAME.pattern} (they become attribute values)", REEXPORT)
    thresholds = parsed(METADATA_THRESHOLDS, list)
    if len(thresholds) != len(states):
        raise ModelError(path, f"{len(thresholds)} distance thresholds for {len(states)} clusters", REEXPORT)
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0
               for t in thresholds):
        raise ModelError(path, "metadata distance_thresholds must be finite numbers > 0", REEXPORT)
    parsed(METADATA_TRAINING, dict)
    for key, high in ((METADATA_UNKNOWN_ABOVE, math.inf), (METADATA_PERCENTILE, 100.0)):
        try:
            value = float(meta[key])
        except ValueError:
            raise ModelError(path, f"metadata {key}={meta[key][:40]!r} is not a number", REEXPORT) from None
        if not (math.isfinite(value) and 0 < value <= high):
            limit = f", at most {high:g}" if math.isfinite(high) else ""
            raise ModelError(path, f"metadata {key}={meta[key][:40]!r} must be a positive number{limit}",
                             REEXPORT)
    if METADATA_ATTACK_STATES in meta:
        declared = parsed(METADATA_ATTACK_STATES, list)
        if not all(isinstance(s, str) and s in states and s != UNKNOWN_STATE for s in declared) \
                or len(set(declared)) != len(declared):
            raise ModelError(path, "metadata attack_states must list distinct cluster states (never 'unknown')",
                             REEXPORT + " and declare only states the model has")
    feature_bounds(path, meta, len(names))


def feature_bounds(path: Path, meta: Mapping[str, str], n_features: int) -> FeatureBounds | None:
    """The optional benign bounds (contract.py, "Novelty"), validated: one finite number per feature, low < high;
    None when the file has none."""
    if METADATA_FEATURE_BOUNDS not in meta:
        return None
    try:
        return FeatureBounds.from_json(parse_json(meta[METADATA_FEATURE_BOUNDS]), n_features)
    except ValueError as exc:
        raise ModelError(path, f"metadata {METADATA_FEATURE_BOUNDS} is invalid ({exc})", REEXPORT) from None


def attack_states(meta: Mapping[str, str]) -> frozenset[str] | None:
    """The states the file declares as attack states (validated by :func:`check_metadata`), None if it does not
    say."""
    if METADATA_ATTACK_STATES not in meta:
        return None
    return frozenset(parse_json(meta[METADATA_ATTACK_STATES]))


# -- external data --------------------------------------------------------------------------------------------

def external_tensors(model: Any) -> list[str]:
    """Names of tensors whose data lives outside the file, anywhere a tensor can be: initializers (dense and
    sparse), node attributes (tensor, tensors, sparse tensor(s)), subgraphs, model-local functions and
    training_info graphs."""
    from onnx import AttributeProto, TensorProto

    found: list[str] = []

    def tensor(t: Any) -> None:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            found.append(t.name or "<unnamed>")

    def sparse(st: Any) -> None:
        tensor(st.values)
        tensor(st.indices)

    def nodes(node_list: Any) -> None:
        for node in node_list:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    tensor(attr.t)
                elif attr.type == AttributeProto.TENSORS:
                    for t in attr.tensors:
                        tensor(t)
                elif attr.type == AttributeProto.SPARSE_TENSOR:
                    sparse(attr.sparse_tensor)
                elif attr.type == AttributeProto.SPARSE_TENSORS:
                    for st in attr.sparse_tensors:
                        sparse(st)
                elif attr.type == AttributeProto.GRAPH:
                    graph(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        graph(sub)

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for st in g.sparse_initializer:
            sparse(st)
        nodes(g.node)

    graph(model.graph)
    for function in model.functions:
        nodes(function.node)
    for info in model.training_info:
        graph(info.initialization)
        graph(info.algorithm)
    return found


# -- what the graph is made of ----------------------------------------------------------------------------------

def check_structure(path: Path, model: Any) -> None:
    """Only what our exporter writes: default and ai.onnx.ml opsets, the allowlisted operators, no functions,
    training graphs, sparse tensors, tensor or graph attributes; initializers float32/int64, dense, bounded."""
    import numpy as np
    from onnx import AttributeProto, TensorProto, helper

    for opset in model.opset_import:
        if opset.domain not in ALLOWED_DOMAINS:
            raise ModelError(path, f"imports operator domain {opset.domain!r}",
                             "state models use the default and ai.onnx.ml operators only; " + REEXPORT)
    if len(model.functions):
        raise ModelError(path, f"defines {len(model.functions)} model-local function(s)",
                         "our exporter writes none; " + REEXPORT)
    if len(model.training_info):
        raise ModelError(path, "carries training_info graphs", "our exporter writes none; " + REEXPORT)
    graph = model.graph
    if len(graph.sparse_initializer):
        raise ModelError(path, "has sparse initializers", "our exporter writes dense tensors only; " + REEXPORT)
    if len(graph.node) > MAX_NODES:
        raise ModelError(path, f"has {len(graph.node)} nodes (limit {MAX_NODES})", GRAPH_HINT)
    plain = (AttributeProto.FLOAT, AttributeProto.INT, AttributeProto.STRING, AttributeProto.FLOATS,
             AttributeProto.INTS, AttributeProto.STRINGS)
    for node in graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (domain, node.op_type) not in ALLOWED_OPERATORS:
            shown = f"{domain}.{node.op_type}" if domain else node.op_type
            raise ModelError(path, f"uses operator {shown!r}, which state models never need",
                             "only the operators otel-ebpf-model export writes are accepted "
                             "(no loops, branches or data-dependent shapes); " + REEXPORT)
        for attr in node.attribute:
            if attr.type not in plain:
                raise ModelError(path, f"operator {node.op_type} has a tensor or graph attribute {attr.name!r}",
                                 GRAPH_HINT)
    for t in graph.initializer:
        if t.data_type not in (TensorProto.FLOAT, TensorProto.INT64):
            raise ModelError(path, f"initializer {t.name!r} has element type {t.data_type}", "state models "
                             "hold float32 (1) and int64 (7) tensors only; " + REEXPORT)
        if any(d < 0 for d in t.dims):
            raise ModelError(path, f"initializer {t.name!r} has a negative dimension", GRAPH_HINT)
        elements = math.prod(t.dims)
        if elements > MAX_TENSOR_ELEMENTS:
            raise ModelError(path, f"initializer {t.name!r} declares {elements} elements "
                                   f"(limit {MAX_TENSOR_ELEMENTS})", GRAPH_HINT)
        if t.raw_data:
            held = len(t.raw_data) // np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        else:
            held = len(t.float_data) if t.data_type == TensorProto.FLOAT else len(t.int64_data)
        if held != elements:
            raise ModelError(path, f"initializer {t.name!r} declares {elements} elements and holds {held}",
                             "the file is damaged; " + REEXPORT)


# -- the contract's inputs and outputs --------------------------------------------------------------------------

def check_graph(path: Path, model: Any, n_features: int, n_clusters: int) -> None:
    from onnx import TensorProto

    initialized = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialized]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        shown = [i.name[:40] for i in inputs[:5]]
        raise ModelError(path, f"inputs are {shown}, expected one named {INPUT_NAME!r}", GRAPH_HINT)
    tensor_type = inputs[0].type.tensor_type
    if not inputs[0].type.HasField("tensor_type") or tensor_type.elem_type != TensorProto.FLOAT:
        raise ModelError(path, f"input {INPUT_NAME!r} is not float32", GRAPH_HINT)
    dims = tensor_type.shape.dim
    if len(dims) != 2 or (dims[1].HasField("dim_value") and dims[1].dim_value != n_features):
        width = dims[1].dim_value if len(dims) == 2 else "?"
        raise ModelError(path, f"input is {len(dims)}-D with width {width}, metadata names {n_features} features",
                         GRAPH_HINT)
    outputs = {o.name: o for o in model.graph.output}
    missing = [o for o in OUTPUT_NAMES if o not in outputs]
    if missing:
        raise ModelError(path, f"graph has no output {', '.join(missing)}", GRAPH_HINT)
    expected = {OUTPUT_LABEL: (TensorProto.INT64, 1, None), OUTPUT_DISTANCES: (TensorProto.FLOAT, 2, n_clusters),
                OUTPUT_DEVIATION: (TensorProto.FLOAT, 2, n_features)}
    if OUTPUT_NORMAL_DEVIATION in outputs:  # optional (contract.py, "Explanations"); checked like deviation
        expected[OUTPUT_NORMAL_DEVIATION] = (TensorProto.FLOAT, 2, n_features)
    for name, (elem, rank, width) in expected.items():
        out = outputs[name]
        kind = "int64" if elem == TensorProto.INT64 else "float32"
        if not out.type.HasField("tensor_type") or out.type.tensor_type.elem_type != elem:
            raise ModelError(path, f"output {name!r} is not a {kind} tensor", GRAPH_HINT)
        shape = out.type.tensor_type
        if shape.HasField("shape"):
            odims = shape.shape.dim
            if len(odims) != rank or (width is not None and odims[1].HasField("dim_value")
                                      and odims[1].dim_value != width):
                raise ModelError(path, f"output {name!r} is declared with {len(odims)} dimension(s), expected "
                                       f"{rank}" + (f" with width {width}" if width else ""), GRAPH_HINT)


def check_session_io(path: Path, session: Any, n_features: int, n_clusters: int) -> None:
    """:func:`check_graph`'s input and output rules, read from an onnxruntime session instead of the ONNX graph:
    for bundled models, which the agent loads without importing onnx (see ``runtime.load_model``)."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise ModelError(path, f"inputs are {[i.name[:40] for i in inputs[:5]]}, expected one named "
                               f"{INPUT_NAME!r}", GRAPH_HINT)
    if inputs[0].type != "tensor(float)":
        raise ModelError(path, f"input {INPUT_NAME!r} is not float32", GRAPH_HINT)
    dims = inputs[0].shape or []
    if len(dims) != 2 or (isinstance(dims[1], int) and dims[1] != n_features):
        width = dims[1] if len(dims) == 2 else "?"
        raise ModelError(path, f"input is {len(dims)}-D with width {width}, metadata names {n_features} features",
                         GRAPH_HINT)
    outputs = {o.name: o for o in session.get_outputs()}
    missing = [o for o in OUTPUT_NAMES if o not in outputs]
    if missing:
        raise ModelError(path, f"graph has no output {', '.join(missing)}", GRAPH_HINT)
    expected = {OUTPUT_LABEL: ("tensor(int64)", 1, None), OUTPUT_DISTANCES: ("tensor(float)", 2, n_clusters),
                OUTPUT_DEVIATION: ("tensor(float)", 2, n_features)}
    for name, (kind, rank, width) in expected.items():
        out = outputs[name]
        if out.type != kind:
            raise ModelError(path, f"output {name!r} is not a {'int64' if 'int' in kind else 'float32'} tensor",
                             GRAPH_HINT)
        odims = out.shape  # None when the graph declares no shape: as check_graph, nothing to compare
        if odims is None:
            continue
        if len(odims) != rank or (width is not None and isinstance(odims[1], int) and odims[1] != width):
            raise ModelError(path, f"output {name!r} is declared with {len(odims)} dimension(s), expected "
                                   f"{rank}" + (f" with width {width}" if width else ""), GRAPH_HINT)
