"""ONNX ops imported as decompositions into existing kiln ops: hyperbolic and trigonometric
functions (Sin, Cos and Atan are kiln ops), Sign,
Tile, DepthToSpace / SpaceToDepth, CenterCropPad, Compress, ReverseSequence, EyeLike, OneHot,
LpPool, the two classification losses, the window functions, Hardmax, LRN, DFT,
QLinearMatMul, MatMulInteger and ConvInteger; and ``function_body``, through which the
importer reads any other op ONNX defines as a function (Attention, RMSNormalization, Selu,
Shrink, ...). Importing this module adds the ops to ``kiln.frontend.onnx_import``'s
``ONNX_IMPORT`` table (that module imports it at its end).

Each decomposition computes what ONNX's definition says in kiln's elementwise, shape and
matmul ops, so every backend runs it with no new kernel; where a formula loses precision
against the ONNX definition, its comment says where and why that stays within float32
tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from kiln.frontend.onnx_import import (
    ONNX_IMPORT,
    ImportContext,
    ImportFn,
    _axis,
    _dtype_of_elem,
    _pool,
    conv_operand_and_attrs,
)
from kiln.ir import DType


# ---- elementwise -------------------------------------------------------------------------------
def _exp_pair(ctx: ImportContext, x: str, sign: str) -> str:
    """(exp(x) + exp(-x)) / 2 for ``sign`` "add", (exp(x) - exp(-x)) / 2 for "sub"."""
    dt = ctx.type_of(x).dtype
    both = ctx.op(sign, [ctx.op("exp", [x]), ctx.op("exp", [ctx.op("neg", [x])])])
    return ctx.op("mul", [both, ctx.scalar(0.5, dt, "half")])


def _sinh(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    # exp(x) - exp(-x) cancels near 0: each exp is within half an f32 ulp of ~1, so the
    # difference 2x keeps a relative error of about 6e-8 / x, under 1e-4 for |x| > 1e-3.
    return [_exp_pair(ctx, ctx.input(0), "sub")]


def _cosh(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    return [_exp_pair(ctx, ctx.input(0), "add")]


def _sqrt_sq_plus(ctx: ImportContext, x: str, c: float) -> str:
    """sqrt(x * x + c)."""
    dt = ctx.type_of(x).dtype
    return ctx.op("sqrt", [ctx.op("add", [ctx.op("mul", [x, x]), ctx.scalar(c, dt, "one")])])


def _asinh(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    # asinh is odd: computing it on |x| and restoring the sign avoids log(x + sqrt(x^2 + 1))
    # cancelling for large negative x.
    x = ctx.input(0)
    ax = ctx.op("abs", [x])
    y = ctx.op("log", [ctx.op("add", [ax, _sqrt_sq_plus(ctx, ax, 1.0)])])
    return [ctx.op("where", [ctx.op("lt", [x, ctx.scalar(0, ctx.type_of(x).dtype, "zero")]),
                             ctx.op("neg", [y]), y])]


def _acosh(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)  # x < 1 gives NaN through the square root, as ONNX's acosh does
    return [ctx.op("log", [ctx.op("add", [x, _sqrt_sq_plus(ctx, x, -1.0)])])]


def _atanh(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    dt = ctx.type_of(x).dtype
    one = ctx.scalar(1.0, dt, "one")
    ratio = ctx.op("div", [ctx.op("add", [one, x]), ctx.op("sub", [one, x])])
    return [ctx.op("mul", [ctx.op("log", [ratio]), ctx.scalar(0.5, dt, "half")])]


def _sign(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    dt = ctx.type_of(x).dtype
    zero = ctx.scalar(0, dt, "zero")
    # x * 0 keeps NaN as NaN (ONNX's sign of NaN) and is 0 for every other value left.
    rest = ctx.op("mul", [x, zero]) if dt.is_float else zero
    if dt.numpy.kind == "u":
        negative = rest
    else:
        negative = ctx.op("where", [ctx.op("lt", [x, zero]), ctx.scalar(-1, dt, "minus"), rest])
    return [ctx.op("where", [ctx.op("gt", [x, zero]), ctx.scalar(1, dt, "plus"), negative])]


def _unary_op(op: str) -> ImportFn:
    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        return [ctx.op(op, [ctx.input(0)])]

    return imp


def _tan(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    # sin and cos are each accurate relative to their size, so the quotient is too.
    x = ctx.input(0)
    return [ctx.op("div", [ctx.op("sin", [x]), ctx.op("cos", [x])])]


def _asin(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    # atan(x / sqrt((1 - x)(1 + x))): no 1 - x^2 to cancel near |x| = 1, where the quotient
    # is +-inf and atan +-pi/2; |x| > 1 gives NaN, as ONNX's Asin does.
    x = ctx.input(0)
    one = ctx.scalar(1.0, ctx.type_of(x).dtype, "one")
    rest = ctx.op("mul", [ctx.op("sub", [one, x]), ctx.op("add", [one, x])])
    return [ctx.op("atan", [ctx.op("div", [x, ctx.op("sqrt", [rest])])])]


def _acos(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    # 2 atan(sqrt((1 - x) / (1 + x))), not pi/2 - asin(x), which cancels near x = 1.
    x = ctx.input(0)
    dt = ctx.type_of(x).dtype
    one = ctx.scalar(1.0, dt, "one")
    ratio = ctx.op("div", [ctx.op("sub", [one, x]), ctx.op("add", [one, x])])
    half = ctx.op("atan", [ctx.op("sqrt", [ratio])])
    return [ctx.op("mul", [half, ctx.scalar(2.0, dt, "two")])]


# ---- data movement -----------------------------------------------------------------------------
def _tile(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    shape = ctx.type_of(x).shape
    repeats = ctx.shape_input(1, "repeats")
    if len(repeats) != len(shape) or min(repeats, default=1) < 0:
        raise ctx.error(f"Tile repeats {repeats} do not fit an input of shape {list(shape)}")
    # Each axis d becomes (r, d): broadcast a size-1 axis in front of it, then merge the two.
    paired = [v for d in shape for v in (1, d)]
    wide = [v for r, d in zip(repeats, shape) for v in (r, d)]
    y = ctx.op("expand", [ctx.reshape(x, paired)], {"shape": tuple(wide)})
    return [ctx.reshape(y, [r * d for r, d in zip(repeats, shape)])]


def _depth_to_space(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    n, c, h, w = _nchw(ctx, x)
    b = int(ctx.attr("blocksize"))
    if c % (b * b):
        raise ctx.error(f"DepthToSpace: {c} channels are not a multiple of blocksize^2")
    if ctx.attr("mode", "DCR") == "DCR":
        split, perm = (n, b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2)
    else:  # CRD
        split, perm = (n, c // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3)
    y = ctx.op("permute", [ctx.reshape(x, split)], {"perm": perm})
    return [ctx.reshape(y, (n, c // (b * b), h * b, w * b))]


def _space_to_depth(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    n, c, h, w = _nchw(ctx, x)
    b = int(ctx.attr("blocksize"))
    if h % b or w % b:
        raise ctx.error(f"SpaceToDepth: {h}x{w} is not a multiple of blocksize {b}")
    y = ctx.op("permute", [ctx.reshape(x, (n, c, h // b, b, w // b, b))],
               {"perm": (0, 3, 5, 1, 2, 4)})
    return [ctx.reshape(y, (n, c * b * b, h // b, w // b))]


def _nchw(ctx: ImportContext, x: str) -> tuple[int, ...]:
    shape = ctx.type_of(x).shape
    if len(shape) != 4:
        raise ctx.error(f"{ctx.node.op_type} wants a rank-4 input, got {list(shape)}")
    return shape


def _center_crop_pad(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """Crop each listed axis around its centre, or pad it with zeros on both sides (the odd
    cell after), to the constant target shape."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    target = ctx.shape_input(1)
    axes = [_axis(ctx, a, t.rank) for a in ctx.attr("axes", range(t.rank))]
    if len(target) != len(axes) or min(target, default=0) < 0:
        raise ctx.error(f"CenterCropPad shape {target} does not fit axes {axes}")
    pads = [0] * (2 * t.rank)
    for axis, want in zip(axes, target):
        have = t.shape[axis]
        if have > want:
            start = (have - want) // 2
            x = ctx.op("slice", [x], {"axis": axis, "start": start, "end": start + want})
        else:
            pads[2 * axis] = (want - have) // 2
            pads[2 * axis + 1] = want - have - (want - have) // 2
    if any(pads):
        x = ctx.op("pad", [x], {"pads": tuple(pads), "value": 0.0})
    return [x]


def _compress(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """The slices where the (constant) condition is true, as a take of their positions."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    condition = ctx.const_input(1, "condition").reshape(-1).astype(bool)
    if ctx.has_attr("axis"):
        axis = _axis(ctx, ctx.attr("axis"), t.rank)
    else:
        x, axis = ctx.reshape(x, (t.numel,)), 0
    size = ctx.type_of(x).shape[axis]
    if condition.size > size:
        raise ctx.error(f"Compress condition of {condition.size} entries for an axis of {size}")
    picked = ctx.constant(np.flatnonzero(condition).astype(np.int64), "picked")
    return [ctx.op("take", [x, picked], {"axis": axis, "wrap": False})]


def _reverse_sequence(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """Reverse the first sequence_lens[b] steps of each batch entry b: a gather along the
    time axis by a constant [batch, time] position table broadcast over the other axes."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    batch_axis, time_axis = int(ctx.attr("batch_axis", 1)), int(ctx.attr("time_axis", 0))
    lens = [int(v) for v in ctx.const_input(1, "sequence_lens").reshape(-1)]
    steps = t.shape[time_axis]
    if sorted((batch_axis, time_axis)) != [0, 1] or len(lens) != t.shape[batch_axis] or any(
            not 0 <= n <= steps for n in lens):
        raise ctx.error(f"ReverseSequence lengths {lens} do not fit {list(t.shape)} with "
                        f"batch_axis {batch_axis} and time_axis {time_axis}")
    step = np.arange(steps)
    table = np.stack([np.where(step < n, n - 1 - step, step) for n in lens])  # [batch, time]
    if time_axis == 0:
        table = table.T
    table = table.reshape(table.shape + (1,) * (t.rank - 2)).astype(np.int64)
    index = ctx.op("expand", [ctx.constant(table, "positions")], {"shape": t.shape})
    return [ctx.op("gather_elements", [x, index], {"axis": time_axis, "wrap": False})]


# ---- DFT ---------------------------------------------------------------------------------------
def _dft(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """DFT along one axis as matmuls with constant cosine and sine tables: x is [..., 1]
    (real) or [..., 2] (real, imaginary), and so is the result: N // 2 + 1 frequencies when
    onesided, and a real signal for an inverse onesided one."""
    x = ctx.input(0)
    if ctx.has_input(1):
        raise ctx.unsupported("DFT with dft_length", hint="pad or slice the signal instead")
    if ctx.opset >= 20:
        axis = ctx.int_input(2, "axis", 1)[0] if ctx.has_input(2) else -2
    else:
        axis = int(ctx.attr("axis", 1))
    return [_dft_along(ctx, x, axis, bool(ctx.attr("inverse", 0)),
                       bool(ctx.attr("onesided", 0)))]


def _dft_along(ctx: ImportContext, x: str, axis: int, inverse: bool, onesided: bool) -> str:
    """The DFT of signal ``x`` [..., 1 or 2] along ``axis`` (see ``_dft``)."""
    t = ctx.type_of(x)
    if t.rank < 3 or t.shape[-1] not in (1, 2) or not t.dtype.is_float:
        raise ctx.error(f"DFT wants a float signal [..., 1 or 2], got {t}")
    axis = _axis(ctx, axis, t.rank)
    if axis == t.rank - 1:
        raise ctx.error("DFT along the real / imaginary axis")
    n = t.shape[axis]
    if inverse and onesided:
        # The real signal of length 2 (n - 1) whose spectrum's first half is given: each
        # frequency but the first and the last (Nyquist) stands for itself and its conjugate.
        freqs = 2 * (n - 1)
        angle = 2 * np.pi * np.outer(np.arange(n), np.arange(freqs)) / freqs
        weight = np.where((np.arange(n) == 0) | (np.arange(n) == n - 1), 1.0, 2.0)[:, None]
        scale = weight / freqs
    else:
        freqs = n // 2 + 1 if onesided else n
        angle = 2 * np.pi * np.outer(np.arange(n), np.arange(freqs)) / n
        scale = 1 / n if inverse else 1.0
    dt = t.dtype.numpy
    cos = ctx.constant((np.cos(angle) * scale).astype(dt), "cos")
    sin = ctx.constant((np.sin(angle) * scale).astype(dt), "sin")
    # Signal axis last: [..., n] @ [n, freqs].
    rest = [i for i in range(t.rank - 1) if i != axis]
    perm = tuple(rest) + (axis,)
    parts = []
    for k in range(t.shape[-1]):
        part = ctx.op("slice", [x], {"axis": t.rank - 1, "start": k, "end": k + 1})
        part = ctx.reshape(part, t.shape[:-1])
        parts.append(ctx.op("permute", [part], {"perm": perm}))
    re_cos, re_sin = (ctx.op("matmul", [parts[0], table]) for table in (cos, sin))
    if len(parts) == 2:
        im_cos, im_sin = (ctx.op("matmul", [parts[1], table]) for table in (cos, sin))
    # e^(-i theta) forward, e^(+i theta) inverse: (a + ib)(cos -+ i sin).
    if inverse:
        real = re_cos if len(parts) == 1 else ctx.op("sub", [re_cos, im_sin])
        imag = re_sin if len(parts) == 1 else ctx.op("add", [re_sin, im_cos])
    else:
        real = re_cos if len(parts) == 1 else ctx.op("add", [re_cos, im_sin])
        imag = ctx.op("neg", [re_sin]) if len(parts) == 1 else ctx.op("sub", [im_cos, re_sin])
    back = tuple(perm.index(i) for i in range(t.rank - 1))
    shape = list(t.shape[:-1])
    shape[axis] = freqs
    out = [ctx.reshape(ctx.op("permute", [v], {"perm": back}), (*shape, 1))
           for v in ((real,) if inverse and onesided else (real, imag))]
    return out[0] if len(out) == 1 else ctx.op("concat", out, {"axis": t.rank - 1})


# ---- constants from shapes ---------------------------------------------------------------------
def _eye_like(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    t = ctx.in_type(0)
    if t.rank != 2:
        raise ctx.error(f"EyeLike wants a rank-2 input, got {list(t.shape)}")
    dtype = t.dtype.numpy
    if ctx.has_attr("dtype"):
        dtype = _dtype_of_elem(ctx.attr("dtype"), "EyeLike's dtype").numpy
    return [ctx.constant(np.eye(*t.shape, k=int(ctx.attr("k", 0)), dtype=dtype))]


def _one_hot(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    idx, values = ctx.input(0), ctx.input(2)
    it = ctx.type_of(idx)
    depth_array = ctx.const_input(1, "depth").reshape(-1)
    if depth_array.size != 1 or not float(depth_array[0]) >= 1:
        raise ctx.error(f"OneHot depth {depth_array.tolist()} is not one positive number")
    depth = int(depth_array[0])
    axis = _axis(ctx, ctx.attr("axis", -1), it.rank + 1)
    # Negative indices count from the end (ONNX); any index outside [-depth, depth) matches
    # no class and gives an all-off row, as ONNX says.
    zero = ctx.scalar(0, it.dtype, "zero")
    wrapped = ctx.op("add", [idx, ctx.scalar(depth, it.dtype, "depth")])
    idx = ctx.op("where", [ctx.op("lt", [idx, zero]), wrapped, idx])
    shape = [1] * (it.rank + 1)
    shape[axis] = depth
    classes = ctx.constant(np.arange(depth).astype(it.dtype.numpy).reshape(shape), "classes")
    expanded = ctx.reshape(idx, it.shape[:axis] + (1,) + it.shape[axis:])
    hit = ctx.op("eq", [expanded, classes])
    vt = ctx.type_of(values)
    if vt.shape != (2,):
        raise ctx.error(f"OneHot values must be [off, on], got shape {list(vt.shape)}")
    off = ctx.reshape(ctx.op("slice", [values], {"axis": 0, "start": 0, "end": 1}), ())
    on = ctx.reshape(ctx.op("slice", [values], {"axis": 0, "start": 1, "end": 2}), ())
    return [ctx.op("where", [hit, on, off])]


# ---- pooling -----------------------------------------------------------------------------------
def _lp_pool(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """LpPool: (sum over the window of |x|^p)^(1/p), as a mean that counts every cell of the
    window (padding included, where |x|^p is 0) times the window's size."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    p = float(ctx.attr("p", 2))
    kernel = [int(k) for k in ctx.attr("kernel_shape")]
    powered = ctx.op("abs", [x])
    if p != 1.0:
        powered = ctx.op("pow", [powered, ctx.scalar(p, t.dtype, "p")])
    mean = _pool(ctx, "avg_pool", powered, count_pad=True)
    total = ctx.op("mul", [mean, ctx.scalar(math.prod(kernel), t.dtype, "window")])
    if p == 1.0:
        return [total]
    return [ctx.op("pow", [total, ctx.scalar(1.0 / p, t.dtype, "root")])]


# ---- losses ------------------------------------------------------------------------------------
def _nll(ctx: ImportContext, log_prob: str, target: str, weight: str | None) -> str:
    """NegativeLogLikelihoodLoss of ``log_prob`` [N, C, d...] at ``target`` [N, d...]: the
    class axis is read through a one-hot mask (kiln has no gather by a computed index along a
    middle axis), so a target outside [0, C) picks nothing and weighs 0."""
    t = ctx.type_of(log_prob)
    tt = ctx.type_of(target)
    if t.rank < 2 or tt.shape != t.shape[:1] + t.shape[2:]:
        raise ctx.error(f"{ctx.node.op_type}: target {list(tt.shape)} does not fit input "
                        f"{list(t.shape)}")
    c = t.shape[1]
    dt = t.dtype
    column = (1, c) + (1,) * (t.rank - 2)
    classes = ctx.constant(np.arange(c).astype(tt.dtype.numpy).reshape(column), "classes")
    hit = ctx.op("eq", [ctx.reshape(target, tt.shape[:1] + (1,) + tt.shape[1:]), classes])
    zero = ctx.scalar(0, dt, "zero")
    ignore = ctx.attr("ignore_index")
    keep = None if ignore is None else ctx.op("ne", [target, ctx.scalar(ignore, tt.dtype,
                                                                           "ignore")])
    sum_c = {"axes": (1,), "keepdim": False}
    picked = ctx.op("reduce_sum", [ctx.op("where", [hit, log_prob, zero])], sum_c)
    if weight is None:
        w = ctx.op("cast", [hit], {"dtype": dt.value})
    else:
        w = ctx.op("where", [hit, ctx.reshape(weight, column), zero])
    w = ctx.op("reduce_sum", [w], sum_c)
    if keep is not None:
        w = ctx.op("where", [keep, w, zero])
    # where, not a product: an ignored position may hold -inf, and -inf * 0 is NaN.
    loss = ctx.op("where", [ctx.op("ne", [w, zero]), ctx.op("mul", [ctx.op("neg", [picked]), w]),
                            zero])
    reduction = ctx.attr("reduction", "mean")
    if reduction == "none":
        return loss
    every = {"axes": tuple(range(tt.rank)), "keepdim": False}
    total = ctx.op("reduce_sum", [loss], every)
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ctx.error(f"{ctx.node.op_type}: unknown reduction {reduction!r}")
    return ctx.op("div", [total, ctx.op("reduce_sum", [w], every)])


def _nll_loss(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    return [_nll(ctx, ctx.input(0), ctx.input(1), ctx.optional(2))]


def _softmax_cross_entropy(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    log_prob = ctx.op("log_softmax", [ctx.input(0)], {"axis": 1})
    return [_nll(ctx, log_prob, ctx.input(1), ctx.optional(2)), log_prob]


# ---- windows, hardmax, local response normalization ---------------------------------------------
def _window_fn(coefficients: tuple[float, ...]) -> ImportFn:
    """Hann / Hamming / Blackman windows: sum_k (-1)^k a_k cos(2 pi k n / N), N the size
    (periodic) or size - 1 (symmetric); a constant, since the size must be one."""

    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        (size,) = ctx.int_input(0, "size", 1)
        if size < 0:
            raise ctx.error(f"{node.op_type} of negative size {size}")
        dtype = _dtype_of_elem(ctx.attr("output_datatype", onnx.TensorProto.FLOAT),
                               f"{node.op_type}'s output_datatype").numpy
        period = size if ctx.attr("periodic", 1) else size - 1
        n = np.arange(size, dtype=np.float64)
        w = sum((-1) ** k * a * np.cos(2 * np.pi * k * n / period) if period else
                np.full(size, (-1) ** k * a) for k, a in enumerate(coefficients))
        return [ctx.constant(np.asarray(w).astype(dtype))]

    return imp


def _hardmax(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """1 at the first maximum along the axis, 0 elsewhere."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    if ctx.opset < 13:
        raise ctx.unsupported("Hardmax before opset 13 (rows of the flattened trailing axes)")
    axis = _axis(ctx, ctx.attr("axis", -1), t.rank)
    first = ctx.op("argmax", [x], {"axis": axis, "keepdim": True})
    shape = [1] * t.rank
    shape[axis] = t.shape[axis]
    positions = ctx.constant(np.arange(t.shape[axis], dtype=np.int64).reshape(shape), "positions")
    return [ctx.op("cast", [ctx.op("eq", [first, positions])], {"dtype": t.dtype.value})]


def _lrn(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """LRN: x / (bias + alpha / size * sum of x^2 over size neighbouring channels)^beta, the
    channel sum as a mean pooled over a [size, 1] window of [N, 1, C, H*W]."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    if t.rank < 3:
        raise ctx.error(f"LRN wants an input [N, C, ...], got {list(t.shape)}")
    size = int(ctx.attr("size"))
    dt = t.dtype
    n, c, spatial = t.shape[0], t.shape[1], math.prod(t.shape[2:])
    squares = ctx.reshape(ctx.op("mul", [x, x]), (n, 1, c, spatial))
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = ctx.op("pad", [squares], {"pads": (0, 0, 0, 0, lo, hi, 0, 0), "value": 0.0})
    mean = ctx.op("avg_pool", [padded], {"kernel": (size, 1), "stride": (1, 1),
                                         "count_include_pad": True})
    scaled = ctx.op("mul", [ctx.reshape(mean, t.shape),
                            ctx.scalar(float(ctx.attr("alpha", 1e-4)), dt, "alpha")])
    base = ctx.op("add", [scaled, ctx.scalar(float(ctx.attr("bias", 1.0)), dt, "bias")])
    denominator = ctx.op("pow", [base, ctx.scalar(float(ctx.attr("beta", 0.75)), dt, "beta")])
    return [ctx.op("div", [x, denominator])]


# ---- quantized matmul --------------------------------------------------------------------------
def _qlinear_matmul(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """QLinearMatMul as kiln's dequantize, float matmul and quantize (per-tensor constant
    scales and zero points, as kiln's quantized activations are): the float sum can round a
    result that lies within f32 rounding of a half step the other way, as kiln's QDQ graphs
    (and ONNX's reference, which also computes it in float) can."""

    def params(i: int, what: str) -> tuple[float, int, np.ndarray]:
        scale = ctx.const_input(i, f"{what} scale").astype(np.float32)
        zero = ctx.const_input(i + 1, f"{what} zero point")
        if scale.size != 1 or zero.size != 1:
            raise ctx.unsupported(f"QLinearMatMul with a per-row or per-column {what} scale",
                                  hint="kiln quantizes matmul operands per tensor")
        return float(scale.reshape(())), int(zero.reshape(())), zero

    operands = []
    for i, what in ((0, "a"), (3, "b")):
        scale, zero, _ = params(i + 1, what)
        operands.append(ctx.op("dequantize", [ctx.input(i)],
                               {"scale": scale, "zero_point": zero}))
    scale, zero, array = params(6, "y")
    y = ctx.op("matmul", operands)
    return [ctx.op("quantize", [y], {"scale": scale, "zero_point": zero,
                                     "dtype": DType.from_numpy(array.dtype).value})]


_EXACT_SUM = 1 << 24  # integers of at most this magnitude, and their sums, are exact in f32


def _centered(ctx: ImportContext, i: int, zero_index: int, shape: tuple[int, ...]) -> str:
    """Integer operand ``i`` minus its constant zero point (operand ``zero_index``, absent:
    0), in f32; the zero point reshaped to ``shape`` (per row, column or channel)."""
    x = ctx.op("cast", [ctx.input(i)], {"dtype": "f32"})
    if not ctx.has_input(zero_index):
        return x
    zero = ctx.const_input(zero_index, "zero point").astype(np.float32)
    return ctx.op("sub", [x, ctx.constant(zero.reshape(() if zero.size == 1 else shape),
                                          "zero")])


def _check_exact(ctx: ImportContext, terms: int) -> None:
    """Refuse a product sum whose integers f32 might not hold exactly: int8 / uint8 operands
    minus their zero points lie in [-255, 255]."""
    if terms * 255 * 255 > _EXACT_SUM:
        raise ctx.unsupported(f"{ctx.node.op_type} summing {terms} products: kiln computes it "
                              "in f32, exact only up to 258 terms",
                              hint="dequantize to float and use MatMul / Conv")


def _matmul_integer(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    at, bt = ctx.in_type(0), ctx.in_type(1)
    if at.rank < 2 or bt.rank < 2:
        raise ctx.unsupported("MatMulInteger of vectors", hint="reshape them to matrices")
    _check_exact(ctx, at.shape[-1])
    a = _centered(ctx, 0, 2, (at.shape[-2], 1))
    b = _centered(ctx, 1, 3, (1, bt.shape[-1]))
    return [ctx.op("cast", [ctx.op("matmul", [a, b])], {"dtype": "i32"})]


def _conv_integer(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    wt = ctx.in_type(1)
    kernel = list(wt.shape[2:])
    _check_exact(ctx, math.prod(wt.shape[1:]))
    # Subtracting the zero point first makes ONNX's padding with it a padding with 0.
    x = _centered(ctx, 0, 2, ())
    w = _centered(ctx, 1, 3, (wt.shape[0],) + (1,) * (wt.rank - 1))
    x, attrs = conv_operand_and_attrs(ctx, x, kernel)
    return [ctx.op("cast", [ctx.op("conv", [x, w], attrs)], {"dtype": "i32"})]


# ---- ops ONNX defines as functions ------------------------------------------------------------
_DTYPE_TO_ELEM = {DType.f32: onnx.TensorProto.FLOAT, DType.f16: onnx.TensorProto.FLOAT16,
                  DType.i8: onnx.TensorProto.INT8, DType.u8: onnx.TensorProto.UINT8,
                  DType.i32: onnx.TensorProto.INT32, DType.i64: onnx.TensorProto.INT64,
                  DType.bool: onnx.TensorProto.BOOL}


def _body_version(versions: list[int], opset: int) -> int:
    """The opset of the function body to read at ``opset``: the newest written for it, or
    (for an op unchanged since, whose body ONNX wrote later) the oldest there is."""
    older = [v for v in versions if v <= opset]
    return max(older) if older else min(versions)


def function_body(ctx: ImportContext, node: onnx.NodeProto
                  ) -> tuple[list[onnx.NodeProto], int] | None:
    """The nodes of the ONNX function that defines ``node``'s op at the model's opset, wired
    to ``node``'s operands, outputs and attributes, and the default-domain opset the body is
    written in; None when ONNX defines the op by no function.

    Many ONNX ops (Attention, RMSNormalization, Selu, Shrink ...) are defined as a graph of
    simpler ops; kiln imports such an op it has no importer for by importing that graph, just
    as onnx's own ``*_expanded`` test cases do. Internal values are named ``<output>/<name>``
    so they cannot clash with the model's."""
    try:
        schema = onnx.defs.get_schema(node.op_type, ctx.opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None
    if schema.has_context_dependent_function:
        version = _body_version(schema.context_dependent_function_opset_versions, ctx.opset)
        types = []
        for name in node.input:
            t = ctx.type_of(ctx.values[name]) if name else None
            proto = onnx.TypeProto() if t is None else onnx.helper.make_tensor_type_proto(
                _DTYPE_TO_ELEM[t.dtype], t.shape)
            types.append(proto.SerializeToString())
        raw = schema.get_context_dependent_function_with_opset_version(
            version, node.SerializeToString(), types)
    elif schema.has_function:
        raw = schema.get_function_with_opset_version(
            _body_version(schema.function_opset_versions, ctx.opset))
    else:
        return None
    function = onnx.FunctionProto.FromString(raw)
    opset = next((o.version for o in function.opset_import if o.domain in ("", "ai.onnx")),
                 ctx.opset)
    prefix = f"{node.output[0] if node.output else ctx.name}/"
    names = dict(zip(function.input, list(node.input) + [""] * len(function.input)))
    names.update((f, o) for f, o in zip(function.output, node.output) if o)
    given = {a.name: a for a in node.attribute}
    defaults = {name: a.default_value for name, a in schema.attributes.items()
                if a.default_value.type}
    defaults.update((a.name, a) for a in function.attribute_proto)
    body = []
    for inner in function.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(inner)
        copy.name = prefix + (inner.name or inner.op_type)
        copy.input[:] = [names.get(v, prefix + v) if v else "" for v in inner.input]
        copy.output[:] = [names.get(v, prefix + v) if v else "" for v in inner.output]
        del copy.attribute[:]
        for a in inner.attribute:
            if a.HasField("g") or len(a.graphs):
                raise ctx.unsupported(f"{node.op_type}'s ONNX function has a subgraph")
            if a.ref_attr_name:  # the function's attribute, as the node (or default) sets it
                source = given.get(a.ref_attr_name, defaults.get(a.ref_attr_name))
                if source is None:
                    continue
                value = onnx.AttributeProto()
                value.CopyFrom(source)
                value.name = a.name
                a = value
            copy.attribute.append(a)
        body.append(copy)
    return body, opset


_EXTRA: dict[str, ImportFn] = {
    "MatMulInteger": _matmul_integer,
    "ConvInteger": _conv_integer,
    "QLinearMatMul": _qlinear_matmul,
    "DFT": _dft,
    "CenterCropPad": _center_crop_pad,
    "Compress": _compress,
    "ReverseSequence": _reverse_sequence,
    "HannWindow": _window_fn((0.5, 0.5)),
    "HammingWindow": _window_fn((25 / 46, 21 / 46)),
    "BlackmanWindow": _window_fn((0.42, 0.5, 0.08)),
    "Hardmax": _hardmax,
    "LRN": _lrn,
    "NegativeLogLikelihoodLoss": _nll_loss,
    "SoftmaxCrossEntropyLoss": _softmax_cross_entropy,
    "Sinh": _sinh,
    "Cosh": _cosh,
    "Asinh": _asinh,
    "Acosh": _acosh,
    "Atanh": _atanh,
    "Sign": _sign,
    "Sin": _unary_op("sin"),
    "Cos": _unary_op("cos"),
    "Atan": _unary_op("atan"),
    "Tan": _tan,
    "Asin": _asin,
    "Acos": _acos,
    "Tile": _tile,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    "EyeLike": _eye_like,
    "OneHot": _one_hot,
    "LpPool": _lp_pool,
}
ONNX_IMPORT.update(_EXTRA)
