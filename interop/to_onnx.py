"""kiln Graph -> ONNX model: ahead-of-time export that ONNX Runtime (or any ONNX consumer) runs.

``ONNX_IMPL`` maps every registered op to a function ``fn(emitter, node)`` that writes the
ONNX nodes computing that kiln node: the kiln node's output names become the last ONNX nodes'
outputs, intermediates get fresh names. Constants become initializers under their kiln names;
the shape, axes and pad operands ONNX takes as tensors become extra int64 initializers.

A composite op without an ``ONNX_IMPL`` entry (gelu, silu, rsqrt, group_norm ...) is written as
its registered decomposition (kiln.ir.decompose), evaluated by ``OnnxNodes`` over ONNX value
names: the same formula its NumPy reference and its lowering use, and the ops inside it get
their own ``ONNX_IMPL`` entries (silu's sigmoid is one Sigmoid node). Other ops ONNX has no one
node for are written here so that they compute what kiln's NumPy reference computes: attention
(with kiln's rule that a fully masked row gives zeros), adaptive_avg_pool (separable slices and
means when not global).

The model uses the default ONNX domain only, at opset 17 (the first with LayerNormalization)
up to 21, with the static shapes and dtypes of the kiln graph; kiln.interop.onnx_dynamic writes
a model with dynamic dimensions (``dim_param``s) from this module's output at several sizes.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.ir import (
    DType,
    Graph,
    KilnError,
    Node,
    TensorType,
    UnsupportedOpError,
    get_op,
    infer_types,
)
from kiln.ir.decompose import Evaluator

try:
    import onnx
    from onnx import helper, numpy_helper
except ImportError as exc:  # onnx is an optional dependency of kiln
    raise KilnError("ONNX export needs the onnx package",
                    hint="pip install onnx (or kiln's 'test' extra)") from exc

MIN_OPSET = 17
MAX_OPSET = 21


def onnx_dtype(dtype: DType) -> int:
    """The ONNX TensorProto element type of a kiln dtype."""
    return helper.np_dtype_to_tensor_dtype(dtype.numpy)


def _ntuple(value: Any, n: int) -> tuple[int, ...]:
    """An int or a 1- or n-entry sequence as an n-tuple (kiln attrs allow all three)."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


class OnnxEmitter:
    """Collects the ONNX nodes and initializers for one kiln graph.

    ``g`` is the kiln graph being exported; ``opset`` the target opset (some ops take their
    axes as an attribute before opset 18 and as an input from 18 on).
    """

    def __init__(self, g: Graph, opset: int) -> None:
        self.g = g
        self.wide_int8_weights: list[str] = []   # int8 layers whose weights pass +-64
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.types: dict[str, TensorType] = {}  # of decompositions' values and scalars
        self._used: set[str] = set(g.values())
        self._node_name = ""

    def fresh(self, hint: str) -> str:
        """A value name not used by the kiln graph nor by anything emitted so far."""
        name, k = hint, 0
        while name in self._used:
            k += 1
            name = f"{hint}_{k}"
        self._used.add(name)
        return name

    def type_of(self, value: str) -> TensorType:
        """The kiln type of a kiln value, or of one made here (a decomposition's, a constant)."""
        made = self.types.get(value)
        return made if made is not None else self.g.type_of(value)

    def begin(self, name: str) -> None:
        """Start the ONNX nodes of kiln node ``name`` (intermediates are named after it)."""
        self._node_name = name

    def const(self, array: np.ndarray, hint: str = "const") -> str:
        """A new initializer holding ``array``; returns its name."""
        name = self.fresh(f"{self._node_name}/{hint}")
        # np.ascontiguousarray makes a 0-d array 1-d; the reshape keeps scalars rank 0.
        array = np.ascontiguousarray(array).reshape(np.shape(array))
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, values: Sequence[int], hint: str = "ints") -> str:
        """A 1-d int64 initializer (shapes, axes, pads, starts ...)."""
        return self.const(np.asarray(list(values), dtype=np.int64).reshape(-1), hint)

    def scalar(self, value: Any, dtype: DType, hint: str = "scalar") -> str:
        """A rank-0 initializer of kiln dtype ``dtype``."""
        name = self.const(np.asarray(value).astype(dtype.numpy), hint)
        self.types[name] = TensorType((), dtype)
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None,
           **attrs: Any) -> str:
        """Emit a single-output ONNX node; returns its output (``out`` or a fresh name)."""
        out = out or self.fresh(f"{self._node_name}/{op_type}")
        self.op_multi(op_type, inputs, [out], **attrs)
        return out

    def op_multi(self, op_type: str, inputs: Sequence[str], outs: Sequence[str],
                 **attrs: Any) -> None:
        """Emit an ONNX node with the given outputs."""
        name = self.fresh(f"{self._node_name}/{op_type}_node")
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outs), name=name,
                                           **attrs))

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool,
               out: str | None = None) -> str:
        """ReduceMean/Max/Min/Sum over ``axes``: as an attribute or an input, by opset."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.ints(axes, "axes")], out, keepdims=int(keepdims))
        return self.op(op_type, [x], out, axes=list(axes), keepdims=int(keepdims))


Emit = Callable[[OnnxEmitter, Node], None]


def _simple(op_type: str, **fixed: Any) -> Emit:
    """An op that is one ONNX node with the same operands in the same order."""

    def emit(e: OnnxEmitter, node: Node) -> None:
        e.op_multi(op_type, node.inputs, node.outputs, **fixed)

    return emit


# ---- dense -----------------------------------------------------------------------------------
def _linear(e: OnnxEmitter, node: Node) -> None:
    x, w = node.inputs[:2]
    out = node.outputs[0]
    inputs = list(node.inputs)
    x_type = e.type_of(x).dtype
    for i in range(1, len(inputs)):   # half-precision storage of a float32 layer: cast up
        if e.type_of(inputs[i]).dtype != x_type:
            inputs[i] = e.op("Cast", [inputs[i]], to=onnx_dtype(x_type))
    if e.type_of(x).rank == 2:
        e.op("Gemm", inputs, out, transB=1)
        return
    if inputs[1] != w:
        w = inputs[1]
        wt = e.op("Transpose", [w], perm=[1, 0])
        if len(inputs) == 2:
            e.op("MatMul", [x, wt], out)
        else:
            e.op("Add", [e.op("MatMul", [x, wt]), inputs[2]], out)
        return
    if e.g.is_constant(w):
        wt = e.const(np.asarray(e.g.constants[w]).T, "weight_t")
    else:
        wt = e.op("Transpose", [w], perm=[1, 0])
    if len(node.inputs) == 2:
        e.op("MatMul", [x, wt], out)
    else:
        e.op("Add", [e.op("MatMul", [x, wt]), inputs[2]], out)


def _recurrent_seq(e: OnnxEmitter, node: Node) -> None:
    """lstm_seq / gru_seq unrolled over the steps into MatMul and elementwise nodes (ONNX's
    LSTM node has no per-step cell state, kiln's lstm_seq output holds one)."""
    lstm = node.op == "lstm_seq"
    xproj, w_hh = node.inputs[:2]
    steps, batch, rows = e.type_of(xproj).shape
    hidden = e.type_of(w_hh).shape[1]
    gates = node.attrs["gates"]
    if e.g.is_constant(w_hh):
        wt = e.const(np.asarray(e.g.constants[w_hh]).T, "w_hh_t")
    else:
        wt = e.op("Transpose", [w_hh], perm=[1, 0])

    def reshape(v: str, shape: Sequence[int]) -> str:
        return e.op("Reshape", [v, e.ints(shape, "shape")])

    def part(v: str, name: str) -> str:
        k = gates.index(name) * hidden
        return e.op("Slice", [v, e.ints([k], "start"), e.ints([k + hidden], "end"),
                              e.ints([1], "axis")])

    h = reshape(node.inputs[2] if lstm else node.inputs[3], (batch, hidden))
    c = reshape(node.inputs[3], (batch, hidden)) if lstm else ""
    width = 2 * hidden if lstm else hidden
    outs = [""] * steps
    for t in range(steps - 1, -1, -1) if node.attrs["reverse"] else range(steps):
        x = reshape(e.op("Gather", [xproj, e.ints([t], "step")], axis=0), (batch, rows))
        rec = e.op("MatMul", [h, wt])
        if lstm:
            pre = e.op("Add", [x, rec])
            i, f, o = (e.op("Sigmoid", [part(pre, q)]) for q in "ifo")
            g = e.op("Tanh", [part(pre, "g")])
            c = e.op("Add", [e.op("Mul", [f, c]), e.op("Mul", [i, g])])
            h = e.op("Mul", [o, e.op("Tanh", [c])])
            step = e.op("Concat", [h, c], axis=1)
        else:
            rec = e.op("Add", [rec, node.inputs[2]])
            r, z = (e.op("Sigmoid", [e.op("Add", [part(x, q), part(rec, q)])]) for q in "rz")
            n = e.op("Tanh", [e.op("Add", [part(x, "n"), e.op("Mul", [r, part(rec, "n")])])])
            h = step = e.op("Add", [n, e.op("Mul", [z, e.op("Sub", [h, n])])])
        outs[t] = reshape(step, (1, batch, width))
    e.op("Concat", outs, node.outputs[0], axis=0)


def _conv_attrs(node: Node, nd: int) -> dict[str, Any]:
    a = node.attrs
    pads = _ntuple(a["padding"], nd)
    return dict(strides=list(_ntuple(a["stride"], nd)), pads=list(pads) * 2,
                dilations=list(_ntuple(a["dilation"], nd)), group=a["groups"])


def _conv(e: OnnxEmitter, node: Node) -> None:
    w = e.type_of(node.inputs[1])
    e.op("Conv", node.inputs, node.outputs[0], kernel_shape=list(w.shape[2:]),
         **_conv_attrs(node, w.rank - 2))


def _conv_transpose(e: OnnxEmitter, node: Node) -> None:
    w = e.type_of(node.inputs[1])
    nd = w.rank - 2
    e.op("ConvTranspose", node.inputs, node.outputs[0], kernel_shape=list(w.shape[2:]),
         output_padding=list(_ntuple(node.attrs["output_padding"], nd)),
         **_conv_attrs(node, nd))


def _attention(e: OnnxEmitter, node: Node) -> None:
    q, k, v = node.inputs[:3]
    qt, kt = e.type_of(q), e.type_of(k)
    dt = qt.dtype
    scale = node.attrs["scale"]
    scale = 1.0 / math.sqrt(qt.shape[-1]) if scale is None else scale
    perm = list(range(kt.rank - 2)) + [kt.rank - 1, kt.rank - 2]
    scores = e.op("MatMul", [q, e.op("Transpose", [k], perm=perm)])
    scores = e.op("Mul", [scores, e.scalar(scale, dt, "scale")])
    if node.attrs["causal"]:
        keep = np.tril(np.ones((qt.shape[-2], kt.shape[-2]), dtype=bool))
        scores = e.op("Where", [e.const(keep, "causal"), scores,
                                e.scalar(-np.inf, dt, "neg_inf")])
    if len(node.inputs) == 3:
        # Without a mask no row is fully masked (the causal triangle keeps the diagonal).
        e.op("MatMul", [e.op("Softmax", [scores], axis=-1), v], node.outputs[0])
        return
    mask = node.inputs[3]
    if e.type_of(mask).dtype == DType.bool:
        scores = e.op("Where", [mask, scores, e.scalar(-np.inf, dt, "neg_inf")])
    else:
        scores = e.op("Add", [scores, mask])
    # kiln's softmax where a row that attends to nothing gives zeros (Softmax would give NaN):
    # subtract the row max unless it is -inf, divide by the row sum unless it is 0.
    zero, one = e.scalar(0.0, dt, "zero"), e.scalar(1.0, dt, "one")
    top = e.reduce("ReduceMax", scores, [-1], True)
    top = e.op("Where", [e.op("IsInf", [top], detect_positive=0), zero, top])
    p = e.op("Exp", [e.op("Sub", [scores, top])])
    total = e.reduce("ReduceSum", p, [-1], True)
    total = e.op("Where", [e.op("Equal", [total, zero]), one, total])
    e.op("MatMul", [e.op("Div", [p, total]), v], node.outputs[0])


# ---- elementwise -----------------------------------------------------------------------------
def _relu(e: OnnxEmitter, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    dt = e.type_of(x).dtype
    if dt.is_float:
        e.op("Relu", [x], out)
    else:
        e.op("Max", [x, e.scalar(0, dt, "zero")], out)


def _clamp(e: OnnxEmitter, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    lo, hi = node.attrs["min"], node.attrs["max"]
    if lo is None and hi is None:
        e.op("Identity", [x], out)
        return
    dt = e.type_of(x).dtype
    bounds = ["" if b is None else e.scalar(b, dt, name) for b, name in ((lo, "min"),
                                                                          (hi, "max"))]
    e.op("Clip", [x, *bounds] if bounds[1] else [x, bounds[0]], out)


def _cast(e: OnnxEmitter, node: Node) -> None:
    e.op("Cast", node.inputs, node.outputs[0], to=onnx_dtype(DType(node.attrs["dtype"])))


def _ne(e: OnnxEmitter, node: Node) -> None:
    e.op("Not", [e.op("Equal", node.inputs)], node.outputs[0])


# ---- normalization ---------------------------------------------------------------------------
def _batch_norm(e: OnnxEmitter, node: Node) -> None:
    x, mean, var, weight, bias = node.inputs
    e.op("BatchNormalization", [x, weight, bias, mean, var], node.outputs[0],
         epsilon=node.attrs["eps"])


def _layer_norm(e: OnnxEmitter, node: Node) -> None:
    x = node.inputs[0]
    xt = e.type_of(x)
    k = node.attrs["normalized_ndim"]
    operands = list(node.inputs)
    if len(operands) == 1:
        # ONNX's scale operand is required: ones leave the normalized values as they are.
        operands.append(e.const(np.ones(xt.shape[-k:], xt.dtype.numpy), "ones"))
    e.op("LayerNormalization", operands, node.outputs[0], axis=-k, epsilon=node.attrs["eps"])


# ---- pooling ---------------------------------------------------------------------------------
def _pool(e: OnnxEmitter, node: Node, op_type: str, **extra: Any) -> None:
    """MaxPool/AveragePool with PyTorch's ceil mode.

    PyTorch (and kiln) drop a last ceil-mode window that would start in the right padding;
    ONNX's ceil mode keeps it. Such a dropped window leaves exactly the floor-mode count, so
    ceil mode is asked for only where some axis needs it, and the windows ONNX adds past
    kiln's on the other axes are sliced off (the kept windows are the same in both).
    """
    a = node.attrs
    x, out = node.inputs[0], node.outputs[0]
    nd = len(a["kernel"])
    kernel = _ntuple(a["kernel"], nd)
    stride = _ntuple(kernel if a["stride"] is None else a["stride"], nd)
    padding = _ntuple(a["padding"], nd)
    dilation = _ntuple(a.get("dilation", 1), nd)
    sizes = e.type_of(x).shape[2:]
    want = e.type_of(out).shape[2:]
    avail = [n + 2 * p - d * (k - 1) - 1 for n, p, d, k in zip(sizes, padding, dilation, kernel)]
    ceil_mode = any(w != v // s + 1 for w, v, s in zip(want, avail, stride))
    attrs = dict(kernel_shape=list(kernel), strides=list(stride), pads=list(padding) * 2,
                 ceil_mode=int(ceil_mode), **extra)
    if ceil_mode:
        got = [-(-v // s) + 1 for v, s in zip(avail, stride)]
        extra_axes = [2 + i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        if extra_axes:
            pooled = e.op(op_type, [x], **attrs)
            ends = [want[i - 2] for i in extra_axes]
            e.op("Slice", [pooled, e.ints([0] * len(ends), "starts"), e.ints(ends, "ends"),
                           e.ints(extra_axes, "axes")], out)
            return
    e.op(op_type, [x], out, **attrs)


def _max_pool(e: OnnxEmitter, node: Node) -> None:
    nd = len(node.attrs["kernel"])
    _pool(e, node, "MaxPool", dilations=list(_ntuple(node.attrs["dilation"], nd)))


def _avg_pool(e: OnnxEmitter, node: Node) -> None:
    _pool(e, node, "AveragePool", count_include_pad=int(node.attrs["count_include_pad"]))


def _adaptive_avg_pool(e: OnnxEmitter, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    xt = e.type_of(x)
    size = tuple(node.attrs["output_size"])
    if all(s == 1 for s in size):
        e.op("GlobalAveragePool", [x], out)
        return
    # A mean over a box is a mean over each of its axes in turn, so pool one axis at a time:
    # per output position, slice PyTorch's window and average it; then concatenate.
    axes = [2 + i for i, s in enumerate(size) if s != xt.shape[2 + i]]
    if not axes:
        e.op("Identity", [x], out)
        return
    y = x
    for j, axis in enumerate(axes):
        n_in, n_out = xt.shape[axis], size[axis - 2]
        pieces = []
        for i in range(n_out):
            lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
            window = e.op("Slice", [y, e.ints([lo], "start"), e.ints([hi], "end"),
                                    e.ints([axis], "axis")])
            pieces.append(e.reduce("ReduceMean", window, [axis], True))
        y = e.op("Concat", pieces, out if j == len(axes) - 1 else None, axis=axis)


# ---- reductions ------------------------------------------------------------------------------
def _reduction(op_type: str) -> Emit:
    def emit(e: OnnxEmitter, node: Node) -> None:
        x, out = node.inputs[0], node.outputs[0]
        rank = e.type_of(x).rank
        if rank == 0:
            e.op("Identity", [x], out)
            return
        axes = node.attrs["axes"]
        axes = range(rank) if axes is None else sorted({a % rank for a in axes})
        e.reduce(op_type, x, list(axes), node.attrs["keepdim"], out)

    return emit


# ---- shape -----------------------------------------------------------------------------------
def _reshape(e: OnnxEmitter, node: Node) -> None:
    e.op("Reshape", [node.inputs[0], e.ints(node.attrs["shape"], "shape")], node.outputs[0])


def _permute(e: OnnxEmitter, node: Node) -> None:
    e.op("Transpose", node.inputs, node.outputs[0], perm=list(node.attrs["perm"]))


def _slice(e: OnnxEmitter, node: Node) -> None:
    a = node.attrs
    e.op("Slice", [node.inputs[0], e.ints([a["start"]], "start"), e.ints([a["end"]], "end"),
                   e.ints([a["axis"]], "axis"), e.ints([a["step"]], "step")], node.outputs[0])


def _concat(e: OnnxEmitter, node: Node) -> None:
    e.op("Concat", node.inputs, node.outputs[0], axis=node.attrs["axis"])


def _split(e: OnnxEmitter, node: Node) -> None:
    e.op_multi("Split", [node.inputs[0], e.ints(node.attrs["sizes"], "sizes")], node.outputs,
               axis=node.attrs["axis"])


def _expand(e: OnnxEmitter, node: Node) -> None:
    e.op("Expand", [node.inputs[0], e.ints(node.attrs["shape"], "shape")], node.outputs[0])


def _pad(e: OnnxEmitter, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    xt = e.type_of(x)
    pads = node.attrs["pads"]
    if xt.rank == 0:
        e.op("Identity", [x], out)
        return
    # kiln lists (lo, hi) per axis; ONNX all the starts, then all the ends. Negative pads
    # crop in both.
    onnx_pads = list(pads[0::2]) + list(pads[1::2])
    e.op("Pad", [x, e.ints(onnx_pads, "pads"), e.scalar(node.attrs["value"], xt.dtype, "value")],
         out, mode="constant")


# ---- quantized ops: QuantizeLinear / DequantizeLinear around float ops (the QDQ form) --------
def _quantize(e: OnnxEmitter, node: Node) -> None:
    a = node.attrs
    e.op("QuantizeLinear", [node.inputs[0], e.scalar(a["scale"], DType.f32, "scale"),
                            e.scalar(a["zero_point"], DType(a["dtype"]), "zero_point")],
         node.outputs[0])


def _dequantize(e: OnnxEmitter, node: Node) -> None:
    a, q = node.attrs, node.inputs[0]
    e.op("DequantizeLinear", [q, e.scalar(a["scale"], DType.f32, "scale"),
                              e.scalar(a["zero_point"], e.type_of(q).dtype, "zero_point")],
         node.outputs[0])


def _q_anchor(e: OnnxEmitter, node: Node, float_op) -> None:
    """x_q, w_q, bias_i32, scale -> DQ(x) op DQ(w) + DQ(bias) [-> Relu] [-> Q].

    Only the product x_scale * w_scale / out_scale is known, so the QDQ form uses it as the
    weights' per-channel scale with x and output scales of 1: the same function, up to the
    float rounding of ONNX's float convolution (kiln accumulates in int32)."""
    x, w, bias, scale = node.inputs
    a = node.attrs
    wv = e.g.constants.get(w)
    if wv is not None and np.abs(wv.astype(np.int16)).max(initial=0) > 64:
        e.wide_int8_weights.append(node.name)
    one = e.scalar(1.0, DType.f32, "unit_scale")
    xf = e.op("DequantizeLinear", [x, one, e.scalar(a["x_zero_point"], DType.u8, "x_zp")])
    cout = e.type_of(w).shape[0]
    wf = e.op("DequantizeLinear", [w, scale, e.const(np.zeros(cout, np.int8), "w_zp")], axis=0)
    bf = e.op("DequantizeLinear", [bias, scale, e.const(np.zeros(cout, np.int32), "b_zp")],
              axis=0)
    last = a["out_dtype"] == "f32" and not a["relu"]
    y = float_op(xf, wf, bf, node.outputs[0] if last else None)
    if a["relu"]:
        y = e.op("Relu", [y], node.outputs[0] if a["out_dtype"] == "f32" else None)
    if a["out_dtype"] == "u8":
        e.op("QuantizeLinear", [y, one, e.scalar(a["out_zero_point"], DType.u8, "out_zp")],
             node.outputs[0])


def _qlinear(e: OnnxEmitter, node: Node) -> None:
    def gemm(xf, wf, bf, out):
        return e.op("Add", [e.op("MatMul", [xf, e.op("Transpose", [wf], perm=[1, 0])]), bf],
                    out)

    _q_anchor(e, node, gemm)


def _qconv(e: OnnxEmitter, node: Node) -> None:
    wt = e.type_of(node.inputs[1])

    def conv(xf, wf, bf, out):
        # kiln's qconv is channels-last; ONNX's Conv is channels-first.
        xc = e.op("Transpose", [xf], perm=[0, 3, 1, 2])
        wc = e.op("Transpose", [wf], perm=[0, 3, 1, 2])
        y = e.op("Conv", [xc, wc, bf], kernel_shape=list(wt.shape[1:3]),
                 strides=list(_ntuple(node.attrs["stride"], 2)),
                 pads=list(_ntuple(node.attrs["padding"], 2)) * 2,
                 dilations=list(_ntuple(node.attrs["dilation"], 2)))
        return e.op("Transpose", [y], out, perm=[0, 2, 3, 1])

    _q_anchor(e, node, conv)


def _linear_w8(e: OnnxEmitter, node: Node) -> None:
    """i8 weights stored as such, widened by Cast and scaled by Mul: a DequantizeLinear here
    would let ONNX Runtime quantize x too (its QDQ MatMul fusion), which kiln does not do."""
    x, w, scale = node.inputs[:3]
    column = e.op("Unsqueeze", [scale, e.ints([1], "axes")])
    wf = e.op("Mul", [e.op("Cast", [w], to=onnx_dtype(DType.f32)), column])
    y = e.op("MatMul", [x, e.op("Transpose", [wf], perm=[1, 0])],
             None if len(node.inputs) > 3 else node.outputs[0])
    if len(node.inputs) > 3:
        e.op("Add", [y, node.inputs[3]], node.outputs[0])


def _dynamic_qlinear(e: OnnxEmitter, node: Node) -> None:
    """The per-call scale max|x| / 127, x rounded to it, a float product of the integer-valued
    operands (exact while sums stay below 2^24), then the two scales and the bias."""
    x, w, scale = node.inputs[:3]
    f32 = DType.f32
    amax = e.reduce("ReduceMax", e.op("Abs", [x]), list(range(e.type_of(x).rank)), False)
    s = e.op("Div", [amax, e.scalar(127.0, f32, "int8_max")])
    is_zero = e.op("Equal", [amax, e.scalar(0.0, f32, "zero")])
    s = e.op("Where", [is_zero, e.scalar(1.0, f32, "one"), s])
    xq = e.op("Clip", [e.op("Round", [e.op("Div", [x, s])]), e.scalar(-127.0, f32, "lo"),
                       e.scalar(127.0, f32, "hi")])
    wf = e.op("Cast", [w], to=onnx_dtype(f32))
    acc = e.op("MatMul", [xq, e.op("Transpose", [wf], perm=[1, 0])])
    last = len(node.inputs) == 3
    y = e.op("Mul", [acc, e.op("Mul", [s, scale])], node.outputs[0] if last else None)
    if not last:
        e.op("Add", [y, node.inputs[3]], node.outputs[0])


# ---- indexing (kiln.ir.ops.index) ------------------------------------------------------------
def _take(e: OnnxEmitter, node: Node) -> None:
    x, *inds = node.inputs
    out = node.outputs[0]
    xt = e.type_of(x)
    axis = node.attrs["axis"] % xt.rank
    if len(inds) == 1:
        e.op("Gather", [x, inds[0]], out, axis=axis)
        return
    # Several index tensors: one flat index into the indexed dims merged into one.
    dims = xt.shape[axis:axis + len(inds)]
    flat = None
    for k, (i, n) in enumerate(zip(inds, dims)):
        dt = e.type_of(i).dtype
        i = e.op("Where", [e.op("Less", [i, e.scalar(0, dt)]),
                           e.op("Add", [i, e.scalar(n, dt)]), i])
        i = e.op("Cast", [i], to=onnx.TensorProto.INT64)
        stride = math.prod(dims[k + 1:])
        if stride != 1:
            i = e.op("Mul", [i, e.scalar(stride, DType.i64)])
        flat = i if flat is None else e.op("Add", [flat, i])
    merged = xt.shape[:axis] + (math.prod(dims),) + xt.shape[axis + len(inds):]
    e.op("Gather", [e.op("Reshape", [x, e.ints(merged, "shape")]), flat], out, axis=axis)


def _argmax_argmin(e: OnnxEmitter, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    xt = e.type_of(x)
    op_type = "ArgMax" if node.op == "argmax" else "ArgMin"
    if node.attrs["axis"] is None or xt.rank == 0:
        flat = e.op("Reshape", [x, e.ints([-1], "flat")])
        y = e.op(op_type, [flat], axis=0, keepdims=0)
        e.op("Reshape", [y, e.ints(e.type_of(out).shape, "shape")], out)
        return
    e.op(op_type, [x], out, axis=node.attrs["axis"] % xt.rank,
         keepdims=int(node.attrs["keepdim"]))


def _topk(e: OnnxEmitter, node: Node) -> None:
    a = node.attrs
    x = node.inputs[0]
    values = e.fresh(f"{node.name}/values")
    e.op_multi("TopK", [x, e.ints([a["k"]], "k")], [values, node.outputs[0]],
               axis=a["axis"] % e.type_of(x).rank, largest=int(a["largest"]), sorted=1)


def _cumsum(e: OnnxEmitter, node: Node) -> None:
    a = node.attrs
    x, out = node.inputs[0], node.outputs[0]
    if e.type_of(x).rank == 0:
        e.op("Identity" if not a["exclusive"] else "Sub", [x] if not a["exclusive"] else [x, x],
             out)
        return
    e.op("CumSum", [x, e.scalar(a["axis"], DType.i64, "axis")], out,
         exclusive=int(a["exclusive"]), reverse=int(a["reverse"]))


def _resize(e: OnnxEmitter, node: Node) -> None:
    a = node.attrs
    x, out = node.inputs[0], node.outputs[0]
    xt = e.type_of(x)
    lead = xt.rank - len(a["sizes"])
    attrs = {"mode": a["mode"], "coordinate_transformation_mode": a["coordinate"],
             "nearest_mode": a["nearest"], "cubic_coeff_a": a["cubic_a"]}
    if a["scales"] is not None:
        scales = np.asarray([1.0] * lead + list(a["scales"]), np.float32)
        e.op("Resize", [x, "", e.const(scales, "scales")], out, **attrs)
    else:
        e.op("Resize", [x, "", "", e.ints(xt.shape[:lead] + tuple(a["sizes"]), "sizes")], out,
             **attrs)


ONNX_IMPL: dict[str, Emit] = {
    "take": _take,
    "gather_elements": lambda e, node: e.op("GatherElements", node.inputs, node.outputs[0],
                                            axis=node.attrs["axis"] % max(
                                                e.type_of(node.inputs[0]).rank, 1)),
    "argmax": _argmax_argmin,
    "argmin": _argmax_argmin,
    "topk": _topk,
    "cumsum": _cumsum,
    "resize": _resize,
    "embedding": lambda e, node: e.op("Gather", node.inputs[::-1], node.outputs[0], axis=0),
    "matmul": _simple("MatMul"),
    "linear": _linear,
    "lstm_seq": _recurrent_seq,
    "gru_seq": _recurrent_seq,
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "attention": _attention,
    "relu": _relu,
    "clamp": _clamp,
    "leaky_relu": lambda e, node: e.op("LeakyRelu", node.inputs, node.outputs[0],
                                       alpha=node.attrs["negative_slope"]),
    "sigmoid": _simple("Sigmoid"),
    "tanh": _simple("Tanh"),
    "hardswish": _simple("HardSwish"),
    "hardsigmoid": _simple("HardSigmoid", alpha=1.0 / 6.0, beta=0.5),
    "softsign": _simple("Softsign"),
    "exp": _simple("Exp"),
    "log": _simple("Log"),
    "sqrt": _simple("Sqrt"),
    "erf": _simple("Erf"),
    "reciprocal": _simple("Reciprocal"),
    "neg": _simple("Neg"),
    "abs": _simple("Abs"),
    "round": _simple("Round"),
    "sin": _simple("Sin"),
    "cos": _simple("Cos"),
    "atan": _simple("Atan"),
    "cast": _cast,
    "add": _simple("Add"),
    "sub": _simple("Sub"),
    "mul": _simple("Mul"),
    "div": _simple("Div"),
    "pow": _simple("Pow"),
    "maximum": _simple("Max"),
    "minimum": _simple("Min"),
    "eq": _simple("Equal"),
    "ne": _ne,
    "lt": _simple("Less"),
    "le": _simple("LessOrEqual"),
    "gt": _simple("Greater"),
    "ge": _simple("GreaterOrEqual"),
    "where": _simple("Where"),
    "logical_not": _simple("Not"),
    "softmax": lambda e, node: e.op("Softmax", node.inputs, node.outputs[0],
                                    axis=node.attrs["axis"]),
    "log_softmax": lambda e, node: e.op("LogSoftmax", node.inputs, node.outputs[0],
                                        axis=node.attrs["axis"]),
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "max_pool": _max_pool,
    "avg_pool": _avg_pool,
    "adaptive_avg_pool": _adaptive_avg_pool,
    "reduce_sum": _reduction("ReduceSum"),
    "reduce_mean": _reduction("ReduceMean"),
    "reduce_max": _reduction("ReduceMax"),
    "reduce_min": _reduction("ReduceMin"),
    "reshape": _reshape,
    "permute": _permute,
    "slice": _slice,
    "concat": _concat,
    "split": _split,
    "expand": _expand,
    "pad": _pad,
    "quantize": _quantize,
    "dequantize": _dequantize,
    "qlinear": _qlinear,
    "qconv": _qconv,
    "linear_w8": _linear_w8,
    "dynamic_qlinear": _dynamic_qlinear,
}
"""Op name -> function(emitter, node) writing the ONNX nodes that compute the kiln node. A
composite op without an entry is written as its decomposition."""

NOT_EXPORTED: dict[str, str] = {}
"""Op name -> why ONNX export refuses it: the ops that have neither an ``ONNX_IMPL`` entry nor
a decomposition (tests/ir/test_op_checklist.py holds every other op to one of the two)."""


# ---- decompositions --------------------------------------------------------------------------
class OnnxNodes(Evaluator):
    """Decompositions as ONNX nodes: a value is an ONNX value name; the ops inside a
    decomposition are written by their ``ONNX_IMPL`` entries (or, composite, expanded)."""

    def __init__(self, e: OnnxEmitter) -> None:
        self.e = e

    def const(self, value: float, like: str) -> str:
        return self.e.scalar(value, self.e.type_of(like).dtype, "c")

    def native(self, op, operands, attrs):
        emit = ONNX_IMPL.get(op)
        if emit is None:
            return None
        (out_type,) = infer_types(op, [self.e.type_of(v) for v in operands], attrs)
        out = self.e.fresh(f"{self.e._node_name}/{op}")
        self.e.types[out] = out_type
        emit(self.e, Node(op, operands, (out,), attrs))
        return out

    def shape_of(self, value: str) -> tuple[int, ...]:
        return self.e.type_of(value).shape


def _emit_decomposition(e: OnnxEmitter, node: Node) -> None:
    """Write ``node`` as its op's decomposition, the last ONNX node producing its output."""
    result = OnnxNodes(e).expand(node.op, node.inputs, node.attrs)
    out = node.outputs[0]
    last = e.nodes[-1] if e.nodes else None
    if last is not None and list(last.output) == [result] and result in e.types:
        last.output[0] = out  # made by this decomposition, so read by no other node yet
    else:  # the formula returned an operand or a constant
        e.op("Identity", [result], out)


# ---- graph -> model --------------------------------------------------------------------------
def _value_info(name: str, t: TensorType) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_dtype(t.dtype), list(t.shape))


def graph_to_onnx(g: Graph, opset: int = MIN_OPSET) -> onnx.ModelProto:
    """An ONNX model (default domain, opset ``opset``) computing the same outputs as ``g``.

    Graph inputs keep their kiln names, types and static shapes; constants become initializers
    under their kiln names; every node is written by its ``ONNX_IMPL`` entry. An output that is
    a graph input, a constant or listed twice goes through an Identity node to a fresh name.

    Raises:
        KilnError: for an opset outside 17..21; an UnsupportedOpError naming the node and op
            for an op without an ONNX mapping.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise KilnError(f"ONNX opset {opset} is not supported",
                        hint=f"export with an opset from {MIN_OPSET} to {MAX_OPSET}")
    e = OnnxEmitter(g, opset)
    for node in g.nodes:
        emit = ONNX_IMPL.get(node.op)
        if emit is None and get_op(node.op).decomposition is not None:
            emit = _emit_decomposition
        if emit is None:
            raise UnsupportedOpError(f"no ONNX mapping for op {node.op}", node=node.name,
                                     op=node.op, source=node.source,
                                     hint=NOT_EXPORTED.get(node.op))
        e.begin(node.name)
        emit(e, node)

    if e.wide_int8_weights:
        # ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI (AVX2: AMD Zen 1-3, Intel
        # before Ice Lake) add pairs of products in 16 bits, which saturate past +-64.
        names = ", ".join(e.wide_int8_weights[:4]) + (", ..." if len(e.wide_int8_weights) > 4
                                                      else "")
        warnings.warn(f"kiln: int8 weights of {names} use more than +-64; ONNX Runtime "
                      "saturates such weights on x86 CPUs without VNNI (AVX2) and answers "
                      "wrong there. For a model that runs right on every CPU, quantize with "
                      "quantize={'weight_max': 64} (kiln's default when it compiles for such "
                      "a CPU)", stacklevel=2)
    produced = {o for n in g.nodes for o in n.outputs}
    outputs, seen = [], set()
    for name in g.outputs:
        if name not in produced or name in seen:
            e.begin(name)
            name = e.op("Identity", [name], e.fresh(f"{name}_output"))
        seen.add(name)
        outputs.append(name)
    # Only the constants some ONNX node reads (linear may have read a transposed copy instead).
    read = {i for n in e.nodes for i in n.input}
    e.initializers[:0] = [numpy_helper.from_array(np.ascontiguousarray(a).reshape(a.shape), name)
                          for name, a in g.constants.items() if name in read]

    graph = helper.make_graph(
        e.nodes,
        g.name,
        inputs=[_value_info(i, g.types[i]) for i in g.inputs],
        outputs=[_value_info(o, g.types[src]) for o, src in zip(outputs, g.outputs)],
        initializer=e.initializers,
        # Every kiln intermediate's type, so the checker's shape inference judges the mapping.
        value_info=[_value_info(o, g.types[o]) for o in sorted(produced - seen)],
    )
    opset_ids = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opset_ids, producer_name="kiln",
                              ir_version=helper.find_min_ir_version_for(opset_ids))
    return model


def export_onnx(model_or_graph: Any, path: str | os.PathLike, opset: int = MIN_OPSET, *,
                overwrite: bool = False) -> Path:
    """Write a kiln CompiledModel's optimized graph (or a Graph) as an ONNX file at ``path``.

    A ``DynamicModel`` (``kiln.compile(..., dynamic=...)``) is written for every size: its
    dynamic dimensions as ``dim_param``s and the sizes inside the graph computed from the
    inputs' shapes (kiln.interop.onnx_dynamic), or a KilnError naming the node that would hold
    only at one size. The model passes ``onnx.checker.check_model(..., full_check=True)``
    before it is written. An existing file is kept (KilnError) unless ``overwrite`` is True.
    Returns the path.
    """
    dynamic = hasattr(model_or_graph, "graph_at") and hasattr(model_or_graph, "dims")
    g = model_or_graph if isinstance(model_or_graph, Graph) else getattr(
        model_or_graph, "graph", None)
    if not isinstance(g, Graph) and not dynamic:
        raise KilnError(f"cannot export a {type(model_or_graph).__name__} to ONNX",
                        hint="pass a kiln CompiledModel (from kiln.compile) or a kiln Graph")
    path = Path(path)
    if path.exists() and not overwrite:
        raise KilnError(f"{path} already exists",
                        hint="choose another path or pass overwrite=True")
    if dynamic:
        from kiln.interop.onnx_dynamic import dynamic_graph_to_onnx

        if not MIN_OPSET <= opset <= MAX_OPSET:   # before the probe graphs are built
            raise KilnError(f"ONNX opset {opset} is not supported",
                            hint=f"export with an opset from {MIN_OPSET} to {MAX_OPSET}")
        proto = dynamic_graph_to_onnx(model_or_graph, opset)
    else:
        proto = graph_to_onnx(g, opset)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    return path
