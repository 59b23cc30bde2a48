"""Hostile model files, built from a good one: the named builders the model tests use, and the mutation catalogue
of the model fuzzer (tests/test_model_fuzz.py). Every function is deterministic given its ``random.Random``."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from otel_ebpf_receiver import model as rt

BUNDLED = sorted((Path(rt.__file__).parent / "bundled").glob("*.onnx"))


# -- protobuf plumbing ------------------------------------------------------------------------------------------

def load(data: bytes) -> onnx.ModelProto:
    return onnx.load_model_from_string(data)


def set_meta(proto: onnx.ModelProto, key: str, value: str | None) -> None:
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key != key]
    del proto.metadata_props[:]
    for k, v in keep + ([(key, value)] if value is not None else []):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def meta(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def n_clusters(proto: onnx.ModelProto) -> int:
    return len(json.loads(meta(proto)[rt.METADATA_STATES]))


def n_features(proto: onnx.ModelProto) -> int:
    return len(json.loads(meta(proto)[rt.METADATA_FEATURES]))


# -- named hostile models (each returns new bytes) -----------------------------------------------------------------

def relabel(data: bytes, mapping: dict[int, int]) -> bytes:
    """The same graph with its label output passed through a lookup table: cluster c is reported as mapping[c].
    A valid graph whose label can leave 0..K-1 on some windows only."""
    proto = load(data)
    k = n_clusters(proto)
    table = np.array([mapping.get(c, c) for c in range(k)], dtype=np.int64)
    for node in proto.graph.node:
        node.output[:] = ["raw_label" if o == rt.OUTPUT_LABEL else o for o in node.output]
        node.input[:] = ["raw_label" if i == rt.OUTPUT_LABEL else i for i in node.input]
    proto.graph.initializer.append(numpy_helper.from_array(table, "relabel_table"))
    proto.graph.node.append(helper.make_node("Gather", ["relabel_table", "raw_label"], [rt.OUTPUT_LABEL], axis=0))
    return proto.SerializeToString()


def with_operator(data: bytes, op_type: str) -> bytes:
    """A real ``op_type`` node added in front of the graph: ConstantOfShape of 2^40 elements, a Loop of 2^62
    iterations, or ``op_type`` replacing the Sqrt node."""
    proto = load(data)
    g = proto.graph
    if op_type == "ConstantOfShape":
        g.initializer.append(numpy_helper.from_array(np.array([1 << 20, 1 << 20], dtype=np.int64), "huge_shape"))
        g.node.insert(0, helper.make_node("ConstantOfShape", ["huge_shape"], ["huge"]))
        g.node.append(helper.make_node("ReduceMin", ["huge"], ["huge_min"], keepdims=0))
    elif op_type == "Loop":
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("Identity", ["v_in"], ["v_out"])],
            "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
        g.initializer.extend([numpy_helper.from_array(np.array(1 << 62, dtype=np.int64), "trips"),
                              numpy_helper.from_array(np.array(True), "keep_going")])
        g.node.insert(0, helper.make_node("Loop", ["trips", "keep_going", rt.INPUT_NAME], ["looped"], body=body))
    else:
        for node in g.node:
            if node.op_type == "Sqrt":
                node.op_type = op_type
                break
    return proto.SerializeToString()


def memory_bomb(data: bytes) -> bytes:
    """Only allowlisted operators and small tensors: Gather of a (1, 1024) row by 2^20 zero indices is a
    4 GiB constant that onnxruntime folds while creating the session. It feeds the input, so it is not pruned."""
    proto = load(data)
    g = proto.graph
    g.initializer.extend([numpy_helper.from_array(np.ones((1, 1024), dtype=np.float32), "bomb_row"),
                          numpy_helper.from_array(np.zeros(1 << 20, dtype=np.int64), "bomb_index")])
    _feed_input_through(g, [helper.make_node("Gather", ["bomb_row", "bomb_index"], ["bomb"], axis=0),
                            helper.make_node("ReduceMin", ["bomb"], ["bomb_min"], axes=[0, 1], keepdims=0)],
                        "bomb_min")
    return proto.SerializeToString()


def matmul_graph(data: bytes, repeats: int, side: int = 1000) -> bytes:
    """Only allowlisted operators: ``repeats`` (side x side) matrix products that depend on the input (so nothing
    is folded at session creation): 2·side³ multiply-adds each, every run."""
    proto = load(data)
    g = proto.graph
    g.initializer.append(numpy_helper.from_array(np.ones((side, side), dtype=np.float32), "mm_c"))
    nodes, previous = [], rt.INPUT_NAME
    for i in range(repeats):
        nodes += [helper.make_node("ReduceMin", [previous], [f"mm_s{i}"], axes=[0, 1], keepdims=0),
                  helper.make_node("Add", ["mm_c", f"mm_s{i}"], [f"mm_a{i}"]),
                  helper.make_node("MatMul", [f"mm_a{i}", "mm_c"], [f"mm_p{i}"]),
                  helper.make_node("ReduceMin", [f"mm_p{i}"], [f"mm_m{i}"], axes=[0, 1], keepdims=0),
                  helper.make_node("Add", [previous, f"mm_m{i}"], [f"mm_x{i}"])]
        previous = f"mm_x{i}"
    _feed_input_through(g, nodes, previous, add=False)
    return proto.SerializeToString()


def _feed_input_through(g: onnx.GraphProto, nodes: list[onnx.NodeProto], scalar: str, add: bool = True) -> None:
    """Rewire the graph so its first node reads features + ``scalar`` (or ``scalar`` itself) instead of the input."""
    fed = "fed_features"
    for node in g.node:
        node.input[:] = [fed if i == rt.INPUT_NAME else i for i in node.input]
    if add:
        nodes = nodes + [helper.make_node("Add", [rt.INPUT_NAME, scalar], [fed])]
    else:
        nodes = nodes + [helper.make_node("Identity", [scalar], [fed])]
    for i, node in enumerate(nodes):
        g.node.insert(i, node)


def external_in(data: bytes, where: str) -> bytes:
    """A tensor marked as stored in another file, hidden in ``where``: initializer, function, training_info,
    sparse attribute."""
    proto = load(data)
    ext = helper.make_tensor("leak", TensorProto.FLOAT, [1], [0.0])
    ext.ClearField("float_data")
    ext.data_location = TensorProto.EXTERNAL
    entry = ext.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/shadow"
    if where == "initializer":
        proto.graph.initializer.append(ext)
    elif where == "function":
        const = helper.make_node("Constant", [], ["c"], value=ext)
        proto.functions.append(helper.make_function("local", "Leak", [], ["c"], [const],
                                                    [helper.make_opsetid("", 17)]))
    elif where == "training_info":
        info = proto.training_info.add()
        info.initialization.name = "init"
        info.initialization.initializer.append(ext)
    elif where == "sparse_attribute":
        indices = helper.make_tensor("leak_idx", TensorProto.INT64, [1], [0])
        sparse = helper.make_sparse_tensor(ext, indices, [4])
        proto.graph.node[0].attribute.append(helper.make_attribute("hidden", sparse))
    return proto.SerializeToString()


def empty_tensor(name: str, dims: list[int]) -> onnx.TensorProto:
    """A float tensor that declares ``dims`` and holds nothing (onnx.helper refuses to build one)."""
    t = onnx.TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(dims)
    return t


def with_metadata(data: bytes, key: str, value: str | None) -> bytes:
    proto = load(data)
    set_meta(proto, key, value)
    return proto.SerializeToString()


# -- the fuzzer's mutations: (rng, data, others) -> bytes ---------------------------------------------------------

Mutation = Callable[[random.Random, bytes, list[bytes]], bytes]


def _flip_bits(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _overwrite(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    out = bytearray(data)
    start = rng.randrange(len(out))
    span = rng.randint(1, 64)
    out[start:start + span] = rng.randbytes(min(span, len(out) - start))
    return bytes(out)


def _truncate(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    return data[: rng.randrange(1, len(data))]


def _splice(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    other = rng.choice(others)
    return data[: rng.randrange(1, len(data))] + other[rng.randrange(len(other)):]


def _duplicate_span(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 256))
    at = rng.randrange(len(data))
    return data[:at] + data[start:end] + data[at:]


def _proto_edit(edit: Callable[[random.Random, onnx.ModelProto], None]) -> Mutation:
    def mutate(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
        proto = load(data)
        edit(rng, proto)
        return proto.SerializeToString()
    mutate.__name__ = edit.__name__
    return mutate


def _swap_nodes(rng: random.Random, p: onnx.ModelProto) -> None:
    nodes = list(p.graph.node)
    i, j = rng.sample(range(len(nodes)), 2)
    a, b = onnx.NodeProto(), onnx.NodeProto()
    a.CopyFrom(nodes[i])
    b.CopyFrom(nodes[j])
    p.graph.node[i].CopyFrom(b)
    p.graph.node[j].CopyFrom(a)


def _remove_node(rng: random.Random, p: onnx.ModelProto) -> None:
    del p.graph.node[rng.randrange(len(p.graph.node))]


OTHER_OPS = ("Loop", "If", "Scan", "ConstantOfShape", "Expand", "Tile", "Range", "Reshape", "NonZero", "TopK",
             "Resize", "Pad", "Constant", "Einsum", "Div", "Relu", "MyCustomOp")


def _change_op(rng: random.Random, p: onnx.ModelProto) -> None:
    node = rng.choice(p.graph.node)
    node.op_type = rng.choice(OTHER_OPS)
    if rng.random() < 0.3:
        node.domain = rng.choice(["com.microsoft", "ai.onnx.ml", "evil"])


def _change_dims(rng: random.Random, p: onnx.ModelProto) -> None:
    t = rng.choice(p.graph.initializer)
    if t.dims:
        t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, 2, 3, 7, 1 << 20, 1 << 40, -1])
    else:
        t.dims.append(rng.choice([1, 1 << 30]))


def _change_input(rng: random.Random, p: onnx.ModelProto) -> None:
    tt = p.graph.input[0].type.tensor_type
    if rng.random() < 0.5:
        tt.elem_type = rng.choice([TensorProto.DOUBLE, TensorProto.INT64, TensorProto.STRING, TensorProto.FLOAT16])
    else:
        tt.shape.dim[-1].dim_value = rng.choice([1, 2, 999, 1 << 31])


def _change_output(rng: random.Random, p: onnx.ModelProto) -> None:
    out = rng.choice(p.graph.output)
    choice = rng.randrange(3)
    if choice == 0:
        out.name = rng.choice(["labels", "Label", "distance", "", "deviation\n"])
    elif choice == 1:
        out.type.tensor_type.elem_type = rng.choice([TensorProto.FLOAT, TensorProto.INT32, TensorProto.DOUBLE])
    else:
        del out.type.tensor_type.shape.dim[:]


def _huge_initializer(rng: random.Random, p: onnx.ModelProto) -> None:
    p.graph.initializer.append(empty_tensor("huge", [1 << 20, rng.choice([1, 1 << 20])]))


def _sparse_initializer(rng: random.Random, p: onnx.ModelProto) -> None:
    values = helper.make_tensor("sparse_v", TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor("sparse_i", TensorProto.INT64, [1], [0])
    p.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [1 << 31, 1 << 20]))


def _add_function(rng: random.Random, p: onnx.ModelProto) -> None:
    node = helper.make_node("Identity", ["x"], ["y"])
    p.functions.append(helper.make_function("local", "Noop", ["x"], ["y"], [node], [helper.make_opsetid("", 17)]))
    if rng.random() < 0.5:
        p.graph.node.append(helper.make_node("Noop", [rt.OUTPUT_DISTANCES], ["noop_out"], domain="local"))
        p.opset_import.append(helper.make_opsetid("local", 1))


def _change_opset(rng: random.Random, p: onnx.ModelProto) -> None:
    p.opset_import[rng.randrange(len(p.opset_import))].version = rng.choice([1, 7, 99, 1 << 40])


def _change_attribute(rng: random.Random, p: onnx.ModelProto) -> None:
    node = rng.choice([n for n in p.graph.node if n.attribute])
    attr = rng.choice(node.attribute)
    if attr.type == onnx.AttributeProto.INT:
        attr.i = rng.choice([-5, 5, 1 << 40])
    elif attr.type == onnx.AttributeProto.INTS:
        attr.ints[:] = rng.choice([[], [7], [0, 1, 2, 3]])
    elif attr.type == onnx.AttributeProto.FLOATS:
        attr.floats[:] = list(attr.floats)[: rng.randrange(len(attr.floats) + 1)] or [float("nan")]


def _poison_weights(rng: random.Random, p: onnx.ModelProto) -> None:
    floats = [t for t in p.graph.initializer if t.data_type == TensorProto.FLOAT]
    t = rng.choice(floats)
    arr = numpy_helper.to_array(t).copy()
    arr.flat[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, -np.inf, 1e38, -1e38])
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _relabel(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    k = n_clusters(load(data))
    return relabel(data, {rng.randrange(k): k + rng.randrange(3)})


def _operator(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    return with_operator(data, rng.choice(["ConstantOfShape", "Loop", "Expand", "Tile", "If"]))


def _external(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    return external_in(data, rng.choice(["initializer", "function", "training_info", "sparse_attribute"]))


# metadata payloads
def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


HUGE_INT = "1" + "0" * 400
NASTY_STRINGS = ["bad\nstate", "\x1b[31mred\x1b[0m", "normal\r", "x" * 70, "Normal", "", "syn flood", "ünïcode",
                 "\x00", "a\u202eb", "unknown"]
JSON_PAYLOADS = [deep(100_000), deep(40), HUGE_INT, "1" * 5000, "NaN", "Infinity", "-Infinity", "1e999", "[1e999]",
                 f"[{HUGE_INT}]", "[NaN]", "[true]", "{}", '"text"', "null", "[]", "[[]]", '["\\u001b[2J"]',
                 "{\"a\": " * 50 + "1" + "}" * 50, "[" + ",".join(["1"] * 100_000) + "]", "[-1]", "[0]", "[1,",
                 '{"rows": 1e400}', '{"k": "\\n\\u001b"}']


def _metadata(rng: random.Random, p: onnx.ModelProto) -> None:
    m = meta(p)
    key = rng.choice(list(rt.REQUIRED_METADATA) + [rt.METADATA_ATTACK_STATES, rt.METADATA_FEATURE_BOUNDS, "extra"])
    states = json.loads(m[rt.METADATA_STATES])
    choice = rng.randrange(9)
    if choice == 0:
        value: str | None = rng.choice(JSON_PAYLOADS)
    elif choice == 1:
        value = None
    elif choice == 2:
        value = rng.choice(NASTY_STRINGS)
    elif choice == 3:  # lying state lists
        value = json.dumps(rng.choice([
            states[:-1], states + ["normal"], states[:1] * len(states), [1] * len(states), states + [None],
            [rng.choice(NASTY_STRINGS)] + states[1:], [], ["unknown"] * len(states)]))
        key = rng.choice([rt.METADATA_STATES, rt.METADATA_ATTACK_STATES])
    elif choice == 4:  # numbers for the scalar keys
        key = rng.choice([rt.METADATA_UNKNOWN_ABOVE, rt.METADATA_PERCENTILE])
        value = rng.choice(["nan", "inf", "-inf", "1e999", HUGE_INT, "0", "-1", "101", "1_5", " 2 ", "0x10"])
    elif choice == 5:  # thresholds
        key = rt.METADATA_THRESHOLDS
        value = rng.choice([json.dumps([1.0] * (len(states) + rng.choice([-1, 0, 1]))), f"[{HUGE_INT}]",
                            json.dumps(["1"] * len(states)), "[" + ",".join(["true"] * len(states)) + "]",
                            "[" + ",".join(["1e-320"] * len(states)) + "]"])
    elif choice == 7:  # benign bounds (contract.py, "Novelty"): valid, reversed, short, huge, not numbers
        key, n = rt.METADATA_FEATURE_BOUNDS, len(json.loads(m[rt.METADATA_FEATURES]))
        low, high = rng.choice([([0.0] * n, [1.0] * n), ([1.0] * n, [0.0] * n), ([0.0] * (n - 1), [1.0] * (n - 1)),
                                ([-1e39] * n, [1e39] * n), ([0.0] * n, [0.0] * n), (["0"] * n, ["1"] * n),
                                ([True] * n, [True] * n), ([0.0] * n, [1e-320] * n)])
        value = rng.choice([json.dumps({"low": low, "high": high}), json.dumps({"low": low}),
                            json.dumps({"low": low, "high": high, "extra": 1}), json.dumps([low, high])])
    elif choice == 6:  # version
        key = rt.METADATA_VERSION
        value = rng.choice(NASTY_STRINGS + ["v" * 10_000, "   ", "v1\t2"])
    else:  # attack-state declarations
        key = rt.METADATA_ATTACK_STATES
        value = json.dumps(rng.choice([states[:2], ["syn_flood"], ["unknown"], states, [states[0]] * 2]))
    set_meta(p, key, value)


GRAPH_MUTATIONS: list[Mutation] = [
    _proto_edit(_swap_nodes), _proto_edit(_remove_node), _proto_edit(_change_op), _proto_edit(_change_dims),
    _proto_edit(_change_input), _proto_edit(_change_output), _proto_edit(_huge_initializer),
    _proto_edit(_sparse_initializer), _proto_edit(_add_function), _proto_edit(_change_opset),
    _proto_edit(_change_attribute), _proto_edit(_poison_weights), _relabel, _operator, _external,
]
BYTE_MUTATIONS: list[Mutation] = [_flip_bits, _overwrite, _truncate, _splice, _duplicate_span]
METADATA_MUTATIONS: list[Mutation] = [_proto_edit(_metadata)]


def mutate(rng: random.Random, bases: list[bytes]) -> tuple[bytes, list[str]]:
    """One fuzz case: a bundled model with 1-3 mutations (a third each from bytes, graph and metadata)."""
    data = rng.choice(bases)
    applied = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        family = rng.choice([BYTE_MUTATIONS, GRAPH_MUTATIONS, METADATA_MUTATIONS])
        mutation = rng.choice(family)
        try:
            data = mutation(rng, data, bases)
        except Exception:  # a structural edit that needs a parseable model, after a byte mutation broke it
            continue
        applied.append(mutation.__name__.lstrip("_"))
    return data, applied
