"""Keep the int8 weights of a weight-only quantised ONNX model int8 in memory.

The shipped MiniLM stores each weight as an int8 initializer followed by Cast(float) and Mul by
a per-column (MatMul) or per-row (embedding table) scale. onnxruntime's constant folding turns
every such pair into a float32 initializer at load: 22.5 MB of int8 become about 90 MB of float.
This rewrite, applied to the model bytes before the session is created (in memory; nothing is
written to disk), keeps them int8:

- ``Cast(Wq) * s -> MatMul(X, .)`` becomes ``MatMulNBits(X, Wq + 128, s, 128)`` (contrib op,
  8 bits, ``block_size`` rows per scale block, the column's scale repeated per block): the same
  weights exactly; with ``accuracy_level`` 4 onnxruntime quantises the activations per block to
  int8 for the product (agreement with the float path: bench/cache_embedder.py).
- ``Cast(Eq) * s -> Gather(., ids)`` becomes ``Gather(Eq, ids)`` cast and multiplied by
  ``Gather(s, ids)``: bit-for-bit the same rows, the table stays int8.

With ``smoothing`` (activation name -> ``PerTensor``: per-input-channel factors and outlier
channels, from a calibration of this very model: smoothing.py), a MatMul reading a named
activation takes the faster per-tensor kernel instead: ``DynamicQuantizeMatMul(X / f, Wq')``, where ``Wq'`` is ``diag(f) . Wq . s``
quantised again per column (symmetric int8) and ``X / f`` one Mul per activation, shared by the
MatMuls that read it. Dividing the activation's outlier channels by ``f`` before it is quantised
to one scale per tensor, and multiplying the weights' rows by the same ``f``, leaves the product
unchanged in exact arithmetic (SmoothQuant, Xiao et al. 2023) and keeps the outliers from taking
the whole int8 range. onnxruntime runs that kernel on VNNI/AMX int8 instructions; the per-block
MatMulNBits above quantises activations per 32 values and is two to three times as slow for a
sentence. An activation named with no factors is quantised per tensor as it is. Where a few
channels are too large for any factor (the feed-forward's GELU output), they are kept out of
int8 altogether: zeroed in the quantised input (the same Mul), gathered and multiplied by their
rows of the weights in float, and the two products added (LLM.int8, Dettmers et al. 2022).

Anything else (other models, per-tensor or differently shaped scales, weights used twice) is
left as it is. The ONNX protobuf is read with a small message subset built at run time from
the ``protobuf`` runtime the services already use (no ``onnx`` package); fields outside the
subset are kept as unknown fields and written back unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_INT8 = 3
_INT64 = 7
_FLOAT = 1
_UINT8 = 2
_ATTR_INT = 2
_CONTRIB = "com.microsoft"

# (message, [(field name, number, type, label, message type)]): wire-compatible with onnx.proto
# (proto2) for the fields used here; enums are read as int32, which has the same encoding.
_T = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _T.LABEL_OPTIONAL, _T.LABEL_REPEATED
_SUBSET: list[tuple[str, list[tuple[str, int, int, int, str]]]] = [
    (
        "TensorProto",
        [
            ("dims", 1, _T.TYPE_INT64, _REP, ""),
            ("data_type", 2, _T.TYPE_INT32, _OPT, ""),
            ("name", 8, _T.TYPE_STRING, _OPT, ""),
            ("raw_data", 9, _T.TYPE_BYTES, _OPT, ""),
            ("data_location", 14, _T.TYPE_INT32, _OPT, ""),
        ],
    ),
    (
        "AttributeProto",
        [
            ("name", 1, _T.TYPE_STRING, _OPT, ""),
            ("i", 3, _T.TYPE_INT64, _OPT, ""),
            ("type", 20, _T.TYPE_INT32, _OPT, ""),
        ],
    ),
    (
        "NodeProto",
        [
            ("input", 1, _T.TYPE_STRING, _REP, ""),
            ("output", 2, _T.TYPE_STRING, _REP, ""),
            ("name", 3, _T.TYPE_STRING, _OPT, ""),
            ("op_type", 4, _T.TYPE_STRING, _OPT, ""),
            ("attribute", 5, _T.TYPE_MESSAGE, _REP, "AttributeProto"),
            ("domain", 7, _T.TYPE_STRING, _OPT, ""),
        ],
    ),
    ("TensorTypeProto", [("elem_type", 1, _T.TYPE_INT32, _OPT, "")]),
    ("TypeProto", [("tensor_type", 1, _T.TYPE_MESSAGE, _OPT, "TensorTypeProto")]),
    (
        "ValueInfoProto",
        [("name", 1, _T.TYPE_STRING, _OPT, ""), ("type", 2, _T.TYPE_MESSAGE, _OPT, "TypeProto")],
    ),
    (
        "GraphProto",
        [
            ("node", 1, _T.TYPE_MESSAGE, _REP, "NodeProto"),
            ("initializer", 5, _T.TYPE_MESSAGE, _REP, "TensorProto"),
            ("output", 12, _T.TYPE_MESSAGE, _REP, "ValueInfoProto"),
        ],
    ),
    (
        "OperatorSetIdProto",
        [("domain", 1, _T.TYPE_STRING, _OPT, ""), ("version", 2, _T.TYPE_INT64, _OPT, "")],
    ),
    (
        "ModelProto",
        [
            ("graph", 7, _T.TYPE_MESSAGE, _OPT, "GraphProto"),
            ("opset_import", 8, _T.TYPE_MESSAGE, _REP, "OperatorSetIdProto"),
        ],
    ),
]
_PACKAGE = "ballast_cache_onnx_subset"


def _model_class() -> Any:
    pool = descriptor_pool.DescriptorPool()
    file = descriptor_pb2.FileDescriptorProto(name=f"{_PACKAGE}.proto", package=_PACKAGE, syntax="proto2")
    for message, fields in _SUBSET:
        proto = file.message_type.add(name=message)
        for name, number, kind, label, type_name in fields:
            field = proto.field.add(name=name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".{_PACKAGE}.{type_name}"
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ModelProto"))


@dataclass(frozen=True)
class Rewritten:
    model: bytes
    matmuls: int  # MatMuls now reading int8 weights
    gathers: int  # embedding tables kept int8
    int8_bytes: int  # weight bytes that stay int8 instead of being folded to float32
    per_tensor: int = 0  # of the MatMuls, those on the per-tensor kernel (smoothing)


@dataclass(frozen=True)
class PerTensor:
    """How one activation takes the per-tensor kernel (see the module doc)."""

    # Per input channel: the activation is divided by them, the weight rows multiplied by them.
    # None: no smoothing.
    factors: npt.NDArray[np.float32] | None = None
    # Input channels kept out of int8: their rows of the weights multiply them in float.
    outliers: npt.NDArray[np.int64] | None = None

    def checked(
        self, activation: str, channels: int
    ) -> tuple[npt.NDArray[np.float32] | None, npt.NDArray[np.int64] | None]:
        factors, outliers = self.factors, self.outliers
        if factors is not None and (
            factors.shape != (channels,) or not np.all(np.isfinite(factors)) or factors.min() <= 0
        ):
            raise ValueError(
                f"smoothing for {activation!r}: need {channels} positive finite factors, got shape {factors.shape}"
            )
        if outliers is not None and (
            outliers.ndim != 1
            or not outliers.size
            or outliers.min() < 0
            or outliers.max() >= channels
            or np.unique(outliers).size != outliers.size
        ):
            raise ValueError(
                f"smoothing for {activation!r}: outliers must be distinct channels of 0..{channels - 1}"
            )
        return factors, outliers


Smoothing = Mapping[str, PerTensor]


def with_outputs(model: bytes, names: list[str]) -> bytes:
    """The model with the named intermediate float tensors as extra graph outputs (calibration)."""
    proto = _model_class()()
    proto.ParseFromString(model)
    for name in names:
        output = proto.graph.output.add(name=name)
        output.type.tensor_type.elem_type = _FLOAT
    return bytes(proto.SerializeToString())


class _Weights:
    """Where a parsed model's weights come from: which are Cast(int8 initializer) * scale."""

    def __init__(self, graph: Any) -> None:
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.uses: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1

    def dequantised(self, name: str) -> tuple[Any, Any, Any, Any] | None:
        """(mul, cast, int8 tensor, scale tensor) when `name` is Cast(int8 init) * scale init."""
        producer, uses, inits = self.producer, self.uses, self.inits
        mul = producer.get(name)
        if mul is None or mul.op_type != "Mul" or mul.domain or len(mul.input) != 2 or uses.get(name) != 1:
            return None
        for cast_out, scale_name in (mul.input, mul.input[::-1]):
            cast = producer.get(cast_out)
            if cast is None or cast.op_type != "Cast":
                continue
            quant = inits.get(cast.input[0])
            scale = inits.get(scale_name)
            if (
                quant is None
                or scale is None
                or uses.get(cast_out) != 1
                or uses.get(quant.name) != 1
                or quant.data_type != _INT8
                or scale.data_type != _FLOAT
                or not quant.raw_data
                or not scale.raw_data
                or quant.data_location
                or scale.data_location
                or len(quant.dims) != 2
                or [a.i for a in cast.attribute if a.name == "to"] != [_FLOAT]
            ):
                continue
            return mul, cast, quant, scale
        return None


def _array(tensor: Any, dtype: type) -> np.ndarray:
    return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))


def int8_matmuls(model: bytes) -> dict[str, list[npt.NDArray[np.float32]]]:
    """Activation name -> the float weights (K x N) of the int8-weight MatMuls reading it."""
    proto = _model_class()()
    proto.ParseFromString(model)
    weights = _Weights(proto.graph)
    found: dict[str, list[npt.NDArray[np.float32]]] = {}
    for node in proto.graph.node:
        if node.domain or node.op_type != "MatMul" or len(node.input) != 2:
            continue
        pattern = weights.dequantised(node.input[1])
        if pattern is not None:
            _, _, quant, scale = pattern
            q, s = _array(quant, np.int8), _array(scale, np.float32)
            found.setdefault(node.input[0], []).append(q.astype(np.float32) * s.reshape(1, -1))
    return found


def keep_int8_weights(
    model: bytes,
    *,
    block_size: int = 32,
    accuracy_level: int = 4,
    smoothing: Smoothing | None = None,
    weight_limit: int = 127,
) -> Rewritten:
    """The model with its Cast/Mul-dequantised int8 weights kept int8 (see the module doc).

    `weight_limit` is the largest magnitude of a per-tensor kernel's weight: 127 (all of int8),
    or 63 for a CPU without an int8 dot product instruction, whose kernel (VPMADDUBSW) adds
    pairs of uint8 x int8 products in 16 bits: 2 x 255 x 64 still fits, 2 x 255 x 127 saturates
    (onnxruntime's quantiser calls this reduce_range). The weights then have 7 bits."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if not 1 <= weight_limit <= 127:
        raise ValueError(f"weight_limit must be 1..127, got {weight_limit}")
    smoothing = smoothing or {}
    proto = _model_class()()
    proto.ParseFromString(model)
    graph = proto.graph
    dequantised = _Weights(graph).dequantised

    def attr(node: Any, name: str, value: int) -> None:
        node.attribute.add(name=name, i=value, type=_ATTR_INT)

    dropped: set[int] = set()
    replaced: dict[int, list[Any]] = {}
    removed_inits: set[str] = set()
    added_inits: list[Any] = []
    matmuls = gathers = int8_bytes = per_tensor = 0
    node_class = type(graph.node.add())
    del graph.node[-1]
    tensor_class = type(graph.initializer.add())
    del graph.initializer[-1]

    def new_node(op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "") -> Any:
        node = node_class(op_type=op, name=name, domain=domain)
        node.input.extend(inputs)
        node.output.extend(outputs)
        return node

    def tensor(name: str, data: np.ndarray, dtype: int) -> Any:
        made = tensor_class(name=name, data_type=dtype, raw_data=np.ascontiguousarray(data).tobytes())
        made.dims.extend(data.shape)
        return made

    smoothed_inputs: set[str] = set()
    gathered_inputs: set[str] = set()
    read: set[str] = set()

    for index, node in enumerate(graph.node):
        if node.domain or node.op_type not in ("MatMul", "Gather") or len(node.input) != 2:
            continue
        weight = node.input[1] if node.op_type == "MatMul" else node.input[0]
        found = dequantised(weight)
        if found is None:
            continue
        mul, cast, quant, scale = found
        q = _array(quant, np.int8)
        s = _array(scale, np.float32)
        out = node.output[0]
        if node.op_type == "MatMul" and node.input[0] in smoothing:
            k, n = q.shape
            if s.shape not in ((1, n), (n,)):
                continue
            activation = node.input[0]
            plan = smoothing[activation]
            factors, outliers = plan.checked(activation, k)
            steps = []
            if factors is None and outliers is None and weight_limit == 127:
                weights, columns, source = q, s.reshape(n), activation
            elif factors is None and outliers is None:
                # As shipped but in fewer bits: quantised again per column.
                shipped = q.astype(np.float32) * s.reshape(1, n)
                columns = (np.abs(shipped).max(axis=0) / weight_limit).astype(np.float32)
                columns[columns == 0] = 1.0
                weights = np.clip(np.rint(shipped / columns), -weight_limit, weight_limit).astype(np.int8)
                source = activation
            else:
                # Smoothed and without the outlier rows (computed in float below), quantised
                # again per column.
                kept = np.ones((k, 1), np.float32)
                inverse = np.ones(k, np.float32)
                if outliers is not None:
                    kept[outliers] = 0.0
                if factors is not None:
                    inverse = (1.0 / factors).astype(np.float32)
                smoothed = q.astype(np.float32) * s.reshape(1, n) * kept
                if factors is not None:
                    smoothed *= factors.reshape(k, 1).astype(np.float32)
                columns = (np.abs(smoothed).max(axis=0) / weight_limit).astype(np.float32)
                columns[columns == 0] = 1.0
                weights = np.clip(np.rint(smoothed / columns), -weight_limit, weight_limit).astype(np.int8)
                source = f"{activation}__smoothed"
                if activation not in smoothed_inputs:
                    smoothed_inputs.add(activation)
                    # One Mul divides by the factors and zeroes the outlier channels.
                    scaled = f"{activation}__smoothing"
                    added_inits.append(tensor(scaled, inverse * kept.reshape(k), _FLOAT))
                    steps.append(new_node("Mul", [activation, scaled], [source], f"{activation}_smooth"))
            quantised = (f"{out}__q8", f"{out}__q8_scale")
            added_inits.append(tensor(quantised[0], weights, _INT8))
            added_inits.append(tensor(quantised[1], columns.astype(np.float32), _FLOAT))
            product = f"{out}__int8" if outliers is not None else out
            steps.append(
                new_node(
                    "DynamicQuantizeMatMul", [source, *quantised], [product], f"{node.name}_q8", _CONTRIB
                )
            )
            if outliers is not None:
                # The outlier channels' share of the product, in float: their few rows of the
                # weights (as shipped) times those channels of the activation.
                picked = f"{activation}__outliers"
                if activation not in gathered_inputs:
                    gathered_inputs.add(activation)
                    indices = f"{activation}__outlier_channels"
                    added_inits.append(tensor(indices, outliers.astype(np.int64), _INT64))
                    gather = new_node("Gather", [activation, indices], [picked], f"{activation}_outliers")
                    attr(gather, "axis", -1)
                    steps.append(gather)
                rows = f"{out}__outlier_rows"
                added_inits.append(tensor(rows, q[outliers].astype(np.float32) * s.reshape(1, n), _FLOAT))
                steps.append(new_node("MatMul", [picked, rows], [f"{out}__float"], f"{node.name}_outliers"))
                steps.append(new_node("Add", [product, f"{out}__float"], [out], f"{node.name}_sum"))
            replaced[index] = steps
            removed_inits |= {quant.name, scale.name}
            matmuls += 1
            per_tensor += 1
            read.add(activation)
        elif node.op_type == "MatMul":
            k, n = q.shape
            if s.shape not in ((1, n), (n,)) or k % block_size:
                continue
            blocks = k // block_size
            packed = (q.astype(np.int16) + 128).astype(np.uint8).T.reshape(n, blocks, block_size)
            scales = np.repeat(s.reshape(n, 1), blocks, axis=1).reshape(-1)
            names = (f"{out}__q8", f"{out}__q8_scale", f"{out}__q8_zero")
            for tname, data, dtype in (
                (names[0], packed, _UINT8),
                (names[1], scales, _FLOAT),
                (names[2], np.full(n * blocks, 128, np.uint8), _UINT8),
            ):
                added_inits.append(tensor(tname, data, dtype))
            fused = new_node("MatMulNBits", [node.input[0], *names], [out], f"{node.name}_q8", _CONTRIB)
            settings = {"K": k, "N": n, "bits": 8, "block_size": block_size}
            for name, number in {**settings, "accuracy_level": accuracy_level}.items():
                attr(fused, name, number)
            replaced[index] = [fused]
            removed_inits |= {quant.name, scale.name}
            matmuls += 1
        else:
            if s.shape != (q.shape[0], 1):
                continue
            ids = node.input[1]
            steps = [
                new_node("Gather", [quant.name, ids], [f"{out}__q8"], f"{node.name}_q8"),
                new_node("Cast", [f"{out}__q8"], [f"{out}__q8_float"], f"{node.name}_q8_cast"),
                new_node("Gather", [scale.name, ids], [f"{out}__q8_scale"], f"{node.name}_q8_scale"),
                new_node("Mul", [f"{out}__q8_float", f"{out}__q8_scale"], [out], f"{node.name}_q8_mul"),
            ]
            attr(steps[1], "to", _FLOAT)
            for step in steps[:3:2]:
                step.attribute.extend(a for a in node.attribute if a.name == "axis")
            replaced[index] = steps
            gathers += 1
        int8_bytes += q.nbytes
        dropped |= {id(mul), id(cast)}

    unread = set(smoothing) - read
    if unread:
        raise ValueError(f"smoothing names activations no int8 MatMul reads: {sorted(unread)}")
    if not replaced:
        return Rewritten(model, 0, 0, 0)
    nodes = []
    for index, node in enumerate(graph.node):
        if id(node) in dropped:
            continue
        nodes.extend(replaced.get(index, [node]))
    remaining = [t for t in graph.initializer if t.name not in removed_inits]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend([*remaining, *added_inits])
    if matmuls and not any(o.domain == _CONTRIB for o in proto.opset_import):
        proto.opset_import.add(domain=_CONTRIB, version=1)
    return Rewritten(proto.SerializeToString(), matmuls, gathers, int8_bytes, per_tensor)
