"""More ONNX ops imported as decompositions into kiln's existing ops: InstanceNormalization,
LpNormalization and MeanVarianceNormalization; ReduceProd and CumProd; GatherND; the scatters
(ScatterElements, its older name Scatter, ScatterND), TensorScatter and MaxUnpool; Upsample;
Det; Col2Im; AffineGrid; GridSample; RoiAlign; STFT; DynamicQuantizeLinear; QLinearConv;
Einsum; the bitwise ops (BitwiseNot on every integer type, BitwiseAnd / Or / Xor and BitShift
on 8-bit integers). Importing this module adds them to ``kiln.frontend.onnx_import``'s
``ONNX_IMPORT`` table (that module imports it at its end). Several decompositions live in
``kiln.frontend.handlers_shared``, which the PyTorch handlers use too.

No op here needs a kernel of its own: each is a short chain of kiln ops (elementwise chains
fuse into one kernel). Where a decomposition needs an operand while compiling (AffineGrid's
size, STFT's frame_step, MaxUnpool's indices, QLinearConv's scales), it reads it as a
constant and refuses a computed one with a KilnError that names the operand. The scatters
take computed indices too (by comparison, bounded by ``SCATTER_COMPARE_LIMIT``) and constant
ones by constant gathers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx

from kiln.frontend.handlers_shared import (
    COMBINE,
    affine_grid,
    cumulative_product,
    determinant,
    floor,
    grid_sample,
    product_along,
    scatter_along_axis,
    scatter_by_compare,
    scatter_compare_count,
    wrap_indices,
)
from kiln.frontend.onnx_import import (
    ONNX_IMPORT,
    ImportContext,
    ImportFn,
    _axis,
    conv_operand_and_attrs,
)
from kiln.frontend.onnx_import_extra import _centered, _dft_along
from kiln.ir import DType


def _slice(ctx: ImportContext, x: str, axis: int, start: int, end: int) -> str:
    return ctx.op("slice", [x], {"axis": axis, "start": start, "end": end})


def _keep_shape(shape: Sequence[int], axes: Sequence[int]) -> list[int]:
    return [1 if i in axes else d for i, d in enumerate(shape)]


# ---- normalizations ----------------------------------------------------------------------------
def _instance_norm(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """InstanceNormalization: a group norm with one channel per group."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    if t.rank < 3:
        raise ctx.error(f"InstanceNormalization needs an input [N, C, d...], got rank {t.rank}")
    return [ctx.op("group_norm", [x, ctx.input(1), ctx.input(2)],
                   {"groups": t.shape[1], "eps": float(ctx.attr("epsilon", 1e-5))})]


def _lp_normalization(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """x / ||x||_p along one axis (p = 1 or 2); where the norm is 0 (x is all zeros there)
    the result is 0, as in ONNX's tests and ONNX Runtime."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    axis = _axis(ctx, ctx.attr("axis", -1), t.rank)
    p = ctx.attr("p", 2)
    if p not in (1, 2):
        raise ctx.error(f"LpNormalization with p={p}: ONNX defines p = 1 and p = 2 only")
    term = ctx.op("abs", [x]) if p == 1 else ctx.op("mul", [x, x])
    norm = ctx.op("reduce_sum", [term], {"axes": (axis,), "keepdim": True})
    if p == 2:
        norm = ctx.op("sqrt", [norm])
    zero = ctx.op("eq", [norm, ctx.scalar(0, t.dtype, "zero")])
    safe = ctx.op("where", [zero, ctx.scalar(1, t.dtype, "one"), norm])
    return [ctx.op("div", [x, safe])]


def _mean_variance_normalization(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """(x - mean) / (std + 1e-9) over ``axes`` (ONNX's function); the variance is taken as
    the mean of squared deviations, the same value without E[x^2] - E[x]^2's cancellation."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    axes = tuple(sorted({_axis(ctx, a, t.rank) for a in ctx.attr("axes", [0, 2, 3])}))
    attrs = {"axes": axes, "keepdim": True}
    centered = ctx.op("sub", [x, ctx.op("reduce_mean", [x], attrs)])
    var = ctx.op("reduce_mean", [ctx.op("mul", [centered, centered])], attrs)
    std = ctx.op("add", [ctx.op("sqrt", [var]), ctx.scalar(1e-9, t.dtype, "epsilon")])
    return [ctx.op("div", [centered, std])]


# ---- products ----------------------------------------------------------------------------------
def _reduce_prod(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    t = ctx.type_of(x)
    axes = ctx.ints("axes", 1)
    keep = bool(ctx.attr("keepdims", 1))
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0) or t.rank == 0:
            return [x]
        axes = list(range(t.rank))
    axes = sorted({_axis(ctx, a, t.rank) for a in axes})
    kept = _keep_shape(t.shape, axes)
    out = kept if keep else [d for i, d in enumerate(t.shape) if i not in axes]
    if any(t.shape[a] == 0 for a in axes):  # the product of nothing is 1
        return [ctx.full(out, 1, t.dtype.numpy)]
    for a in axes:
        x = product_along(ctx, x, a)
    return [ctx.reshape(x, out)]


def _cum_prod(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    (axis,) = ctx.int_input(1, "axis", 1)
    axis = _axis(ctx, axis, ctx.type_of(x).rank)
    return [cumulative_product(ctx, x, axis, bool(ctx.attr("exclusive", 0)),
                               bool(ctx.attr("reverse", 0)))]


# ---- gather and scatter ------------------------------------------------------------------------
def _gather_nd(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """GatherND as one kiln take: the index components along the last axis of ``indices``
    index data's axes b..b+k-1, and a broadcast arange indexes each batch axis."""
    data, idx = ctx.input(0), ctx.input(1)
    t, it = ctx.type_of(data), ctx.type_of(idx)
    b = int(ctx.attr("batch_dims", 0))
    k = it.shape[-1] if it.rank else 0
    if it.rank < 1 or k < 1 or b + k > t.rank or b >= it.rank or \
            tuple(it.shape[:b]) != tuple(t.shape[:b]):
        raise ctx.error(f"GatherND indices {list(it.shape)} with batch_dims={b} do not fit "
                        f"data {list(t.shape)}",
                        hint="the last axis of indices must have 1 to rank - batch_dims entries")
    lead = it.shape[:-1]
    batch = []
    for i in range(b):
        shape = [1] * len(lead)
        shape[i] = lead[i]
        batch.append(ctx.constant(np.arange(lead[i], dtype=np.int64).reshape(shape),
                                  f"batch{i}"))
    parts = [ctx.reshape(_slice(ctx, idx, it.rank - 1, j, j + 1), lead) for j in range(k)]
    return [ctx.op("take", [data, *batch, *parts], {"axis": 0, "wrap": True})]


def _scatter_rows(ctx: ImportContext, data: str, updates: str, targets: np.ndarray,
                  reduction: str) -> str:
    """``data`` [P, ...] with row ``targets[m]`` set to (or, with a reduction, combined with)
    row m of ``updates`` [M, ...]; ``targets`` are known while importing.

    Each pass takes, for every row of data, at most one update (a take with constant
    indices) and selects it where there is one: one pass per repeat of the most repeated
    target, in the order of the updates (so, without a reduction, the last one stays)."""
    rows = ctx.type_of(data).shape[0]
    rest = ctx.type_of(data).rank - 1
    seen: dict[int, int] = {}
    level = np.empty(len(targets), np.int64)
    for m, row in enumerate(targets.tolist()):
        level[m] = seen.get(row, 0)
        seen[row] = level[m] + 1
    passes = range(int(level.max()) + 1 if len(targets) else 0)
    if reduction == "none":  # only each row's last update matters
        last = {row: m for m, row in enumerate(targets.tolist())}
        level = np.array([0 if last[row] == m else -1 for m, row in enumerate(targets.tolist())],
                         np.int64)
        passes = range(1 if len(targets) else 0)
    y = data
    for p in passes:
        source = np.full(rows, -1, np.int64)
        chosen = np.flatnonzero(level == p)
        source[targets[chosen]] = chosen
        has = source >= 0
        picked = ctx.op("take", [updates, ctx.constant(np.where(has, source, 0), "rows")],
                        {"axis": 0, "wrap": False})
        value = picked if reduction == "none" else ctx.op(COMBINE[reduction], [y, picked])
        mask = ctx.constant(has.reshape((rows,) + (1,) * rest), "where")
        y = ctx.op("where", [mask, value, y])
    return y


# The most elements the computed-index scatters compare (updates x rows of data x the rest):
# beyond it, constant indices (a file with them fixed) take the constant-index path.
SCATTER_COMPARE_LIMIT = 1 << 24


def _check_compare(ctx: ImportContext, count: int) -> None:
    if count > SCATTER_COMPARE_LIMIT:
        raise ctx.unsupported(
            f"{ctx.node.op_type} with computed indices compares {count} pairs (more than "
            f"{SCATTER_COMPARE_LIMIT})",
            hint="make the indices an initializer of the model: kiln then scatters by "
                 "constant gathers")


def _reduction(ctx: ImportContext) -> str:
    reduction = ctx.attr("reduction", "none")
    if reduction != "none" and reduction not in COMBINE:
        raise ctx.error(f"{ctx.node.op_type} reduction {reduction!r} is not one of ONNX's",
                        hint=f"use one of {['none', *COMBINE]}")
    return reduction


def _wrapped(ctx: ImportContext, indices: np.ndarray, sizes: np.ndarray | Sequence[int]
             ) -> np.ndarray:
    """Indices with negative ones counted from the end; one out of range is a KilnError."""
    sizes = np.asarray(sizes, np.int64)
    if np.any((indices < -sizes) | (indices >= sizes)):
        raise ctx.error(f"{ctx.node.op_type} has an index out of range",
                        hint="indices must lie in [-size, size) of the axis they index")
    return np.where(indices < 0, indices + sizes, indices)


def _scatter_elements(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    data, updates = ctx.input(0), ctx.input(2)
    t = ctx.type_of(data)
    axis = _axis(ctx, ctx.attr("axis", 0), t.rank)
    it = ctx.type_of(ctx.input(1))
    if it.shape != ctx.type_of(updates).shape or it.rank != t.rank or any(
            i > d for k, (i, d) in enumerate(zip(it.shape, t.shape)) if k != axis):
        raise ctx.error(f"{node.op_type} indices {list(it.shape)} and updates "
                        f"{list(ctx.type_of(updates).shape)} must have one shape, of data's "
                        f"rank and within data's shape {list(t.shape)} off the axis")
    if ctx.const_value(ctx.input(1)) is None:
        _check_compare(ctx, scatter_compare_count(ctx, ctx.input(1), data, axis))
        return [scatter_along_axis(ctx, data, ctx.input(1), updates, axis, _reduction(ctx))]
    indices = ctx.const_input(1, "indices").astype(np.int64)
    where = list(np.indices(indices.shape))
    where[axis] = _wrapped(ctx, indices, t.shape[axis])
    targets = np.ravel_multi_index(tuple(where), t.shape).reshape(-1) if indices.size else \
        np.zeros(0, np.int64)
    y = _scatter_rows(ctx, ctx.reshape(data, [math.prod(t.shape)]),
                      ctx.reshape(updates, [indices.size]), targets, _reduction(ctx))
    return [ctx.reshape(y, t.shape)]


def _scatter_nd(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    data, updates = ctx.input(0), ctx.input(2)
    t = ctx.type_of(data)
    it = ctx.type_of(ctx.input(1))
    k = it.shape[-1] if it.rank else 0
    want = tuple(it.shape[:-1]) + tuple(t.shape[k:])
    if it.rank < 1 or not 1 <= k <= t.rank or ctx.type_of(updates).shape != want:
        raise ctx.error(f"ScatterND indices {list(it.shape)} and updates "
                        f"{list(ctx.type_of(updates).shape)} do not fit data {list(t.shape)}",
                        hint=f"updates must have shape {list(want)}")
    if ctx.const_value(ctx.input(1)) is None:
        return [_scatter_nd_computed(ctx, data, ctx.input(1), updates, k)]
    indices = ctx.const_input(1, "indices").astype(np.int64)
    flat = _wrapped(ctx, indices.reshape(-1, k), t.shape[:k])
    targets = np.ravel_multi_index(tuple(flat.T), t.shape[:k]) if len(flat) else \
        np.zeros(0, np.int64)
    rows = math.prod(t.shape[:k])
    y = _scatter_rows(ctx, ctx.reshape(data, [rows, *t.shape[k:]]),
                      ctx.reshape(updates, [len(flat), *t.shape[k:]]), targets,
                      _reduction(ctx))
    return [ctx.reshape(y, t.shape)]


def _scatter_nd_computed(ctx: ImportContext, data: str, idx: str, updates: str, k: int
                         ) -> str:
    """ScatterND with computed indices: each index tuple's flat row of data's first k axes,
    compared with every row."""
    t, it = ctx.type_of(data), ctx.type_of(idx)
    m = math.prod(it.shape[:-1])
    rows = math.prod(t.shape[:k])
    rest = t.shape[k:]
    _check_compare(ctx, m * math.prod(t.shape))
    flat = ctx.reshape(idx, [m, k])
    row = None
    for j in range(k):
        part = wrap_indices(ctx, _slice(ctx, flat, 1, j, j + 1), t.shape[j])
        stride = math.prod(t.shape[j + 1:k])
        if stride != 1:
            part = ctx.op("mul", [part, ctx.scalar(stride, it.dtype, "stride")])
        row = part if row is None else ctx.op("add", [row, part])
    places = ctx.constant(np.arange(rows, dtype=it.dtype.numpy).reshape(1, rows), "rows")
    hit = ctx.reshape(ctx.op("eq", [row, places]), [m, rows] + [1] * len(rest))
    hit = ctx.op("expand", [hit], {"shape": (m, rows, *rest)}) if rest else hit
    y = scatter_by_compare(ctx, ctx.reshape(data, [rows, *rest]),
                           ctx.reshape(updates, [m, *rest]), hit, _reduction(ctx))
    return ctx.reshape(y, t.shape)


def _tensor_scatter(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """TensorScatter (a KV-cache write): cache position p of batch entry b takes update row
    p - write_indices[b] where that lies in [0, L) (modulo the cache length in circular
    mode); one gather_elements of the update and a select, for indices known at run time."""
    cache, update = ctx.input(0), ctx.input(1)
    t, ut = ctx.type_of(cache), ctx.type_of(update)
    axis = _axis(ctx, ctx.attr("axis", -2), t.rank)
    mode = ctx.attr("mode", "linear")
    if mode not in ("linear", "circular"):
        raise ctx.error(f"TensorScatter mode {mode!r} is not 'linear' or 'circular'")
    if axis == 0 or ut.rank != t.rank or ut.dtype != t.dtype or any(
            u != c for k, (u, c) in enumerate(zip(ut.shape, t.shape)) if k != axis) or \
            ut.shape[axis] > t.shape[axis]:
        raise ctx.error(f"TensorScatter update {list(ut.shape)} does not fit the cache "
                        f"{list(t.shape)} along axis {axis}",
                        hint="the update differs from the cache only on the (non-batch) "
                             "sequence axis, and is no longer there")
    batch, size, length = t.shape[0], t.shape[axis], ut.shape[axis]
    if ctx.has_input(2):
        w = ctx.reshape(ctx.op("cast", [ctx.input(2)], {"dtype": "i64"}), [batch, 1])
    else:
        w = ctx.constant(np.zeros((batch, 1), np.int64), "write")
    if mode == "circular" and size:  # w mod size, exact in float32 below 2^24
        wf = ctx.op("cast", [w], {"dtype": "f32"})
        turns = ctx.op("cast", [floor(ctx, ctx.op("mul", [wf, ctx.scalar(
            1.0 / size, DType.f32, "per")]))], {"dtype": "i64"})
        w = ctx.op("sub", [w, ctx.op("mul", [turns, ctx.scalar(size, DType.i64, "size")])])
    places = ctx.constant(np.arange(size, dtype=np.int64).reshape(1, size), "places")
    d = ctx.op("sub", [places, w])  # [batch, size]: the update row each position takes
    zero = ctx.scalar(0, DType.i64, "zero")
    if mode == "circular":
        d = ctx.op("where", [ctx.op("lt", [d, zero]),
                             ctx.op("add", [d, ctx.scalar(size, DType.i64, "size")]), d])
    inside = ctx.op("where", [ctx.op("ge", [d, zero]),
                              ctx.op("lt", [d, ctx.scalar(length, DType.i64, "length")]),
                              ctx.scalar(False, DType.bool, "no")])
    lined = [batch] + [size if k == axis else 1 for k in range(1, t.rank)]
    d = ctx.op("clamp", [ctx.reshape(d, lined)], {"min": 0, "max": max(length - 1, 0)})
    if not length:
        return [cache]
    rows = ctx.op("gather_elements", [update, ctx.op("expand", [d], {"shape": t.shape})],
                  {"axis": axis, "wrap": False})
    return [ctx.op("where", [ctx.reshape(inside, lined), rows, cache])]


def _max_unpool(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """MaxUnpool: zeros of the shape the pooling came from, with each value of x put at its
    (constant) flat index into them; an ``output_shape`` beyond that shape pads zeros at the
    end of each spatial axis (the indices keep their place, as in ONNX's reference)."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    nd = t.rank - 2
    kernel = [int(k) for k in ctx.attr("kernel_shape")]
    strides = [int(s) for s in ctx.attr("strides", [1] * nd)]
    pads = [int(p) for p in ctx.attr("pads", [0] * (2 * nd))]
    out = list(t.shape[:2]) + [(n - 1) * s + k - pads[i] - pads[nd + i]
                               for i, (n, s, k) in enumerate(zip(t.shape[2:], strides, kernel))]
    wanted = ctx.shape_input(2, "output_shape") if ctx.has_input(2) else out
    if len(wanted) != len(out) or wanted[:2] != out[:2] or any(
            w < o for w, o in zip(wanted, out)):
        raise ctx.error(f"MaxUnpool output_shape {wanted} is smaller than the unpooled shape "
                        f"{out}", hint="give an output_shape at least as large, or none")
    indices = ctx.const_input(1, "indices").astype(np.int64).reshape(-1)
    total = math.prod(out)
    if indices.size != math.prod(t.shape):
        raise ctx.error("MaxUnpool indices must have x's shape")
    if np.any((indices < 0) | (indices >= total)):
        raise ctx.error(f"MaxUnpool has an index outside [0, {total}) (the output's elements)")
    targets = indices
    zeros = ctx.full([total], 0, t.dtype.numpy, "zeros")
    y = ctx.reshape(_scatter_rows(ctx, zeros, ctx.reshape(x, [indices.size]), targets, "none"),
                    out)
    if wanted != out:
        ends = [v for w, o in zip(wanted, out) for v in (0, w - o)]
        y = ctx.op("pad", [y], {"pads": tuple(ends), "value": 0.0})
    return [y]


# ---- resampling and geometry -------------------------------------------------------------------
def _upsample(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """Upsample (deprecated since opset 10): Resize with asymmetric coordinates."""
    x = ctx.input(0)
    shape = ctx.type_of(x).shape
    mode = ctx.attr("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        raise ctx.unsupported(f"Upsample mode {mode!r} is not supported",
                              hint="use mode 'nearest' or 'linear'")
    if ctx.has_attr("scales"):
        scales = [float(s) for s in ctx.attr("scales")]
    else:
        scales = [float(s) for s in ctx.const_input(1, "scales").reshape(-1)]
    if len(scales) != len(shape) or min(scales, default=1.0) < 1.0:
        raise ctx.error(f"Upsample scales {scales} must be >= 1, one per axis of a rank-"
                        f"{len(shape)} tensor")
    sizes = [int(math.floor(d * s)) for d, s in zip(shape, scales)]
    changed = [k for k in range(len(shape)) if scales[k] != 1.0]
    if not changed:
        return [x]
    lead = changed[0]
    return [ctx.op("resize", [x], {
        "sizes": tuple(sizes[lead:]), "scales": tuple(scales[lead:]),
        "mode": "nearest" if mode == "nearest" else "linear", "coordinate": "asymmetric",
        "nearest": "floor", "cubic_a": -0.75})]


def _col2im(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """Col2Im as a transposed convolution: the columns [N, C*prod(block), L] are a feature
    map [N, C*prod(block), *blocks], and a grouped transposed convolution with one-hot
    weights adds each block element back where it came from; padding crops."""
    x = ctx.input(0)
    n, ck, length = ctx.type_of(x).shape
    image = ctx.shape_input(1, "image_shape")
    block = ctx.shape_input(2, "block_shape")
    nd = len(image)
    if len(block) != nd:
        raise ctx.error("Col2Im image_shape and block_shape differ in length")
    dil = [int(d) for d in ctx.attr("dilations", [1] * nd)]
    strides = [int(s) for s in ctx.attr("strides", [1] * nd)]
    pads = [int(p) for p in ctx.attr("pads", [0] * (2 * nd))]
    kprod = math.prod(block)
    blocks = [(image[i] + pads[i] + pads[nd + i] - dil[i] * (block[i] - 1) - 1) // strides[i] + 1
              for i in range(nd)]
    if kprod == 0 or ck % kprod or math.prod(blocks) != length or min(blocks) < 1:
        raise ctx.error(f"Col2Im input {[n, ck, length]} does not fit image {image}, block "
                        f"{block}, strides {strides}, dilations {dil}, pads {pads}")
    c = ck // kprod
    weight = np.zeros((ck, 1, *block), ctx.type_of(x).dtype.numpy)
    for j, at in enumerate(np.ndindex(*block)):
        weight[(np.arange(c) * kprod + j, 0) + at] = 1
    y = ctx.op("conv_transpose", [ctx.reshape(x, [n, ck, *blocks]), ctx.constant(weight, "w")],
               {"stride": tuple(strides), "dilation": tuple(dil), "groups": c,
                "padding": (0,) * nd, "output_padding": (0,) * nd})
    full = [(b - 1) * s + d * (k - 1) + 1 for b, s, d, k in zip(blocks, strides, dil, block)]
    edges = []
    for i in range(nd):
        edges += [-pads[i], image[i] + pads[i] - full[i]]
    if any(edges):
        y = ctx.op("pad", [y], {"pads": (0, 0, 0, 0, *edges), "value": 0.0})
    return [y]


def _affine_grid(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """AffineGrid with a constant size (``affine_grid``)."""
    theta = ctx.input(0)
    size = ctx.shape_input(1, "size")
    nd = len(size) - 2
    n = size[0]
    if nd not in (2, 3) or ctx.type_of(theta).shape != (n, nd, nd + 1):
        raise ctx.error(f"AffineGrid theta {list(ctx.type_of(theta).shape)} does not fit "
                        f"size {size}", hint="theta is [N, 2, 3] (2-D) or [N, 3, 4] (3-D)")
    return [affine_grid(ctx, theta, size, bool(ctx.attr("align_corners", 0)))]


def _grid_sample(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """GridSample, nearest or linear, with zeros, border or reflection padding
    (``grid_sample``)."""
    x, grid = ctx.input(0), ctx.input(1)
    t, gt = ctx.type_of(x), ctx.type_of(grid)
    nd = t.rank - 2
    mode = {"bilinear": "linear"}.get(ctx.attr("mode", "linear"), ctx.attr("mode", "linear"))
    padding = ctx.attr("padding_mode", "zeros")
    if mode not in ("nearest", "linear") or padding not in ("zeros", "border", "reflection"):
        raise ctx.unsupported(f"GridSample mode={mode!r} padding_mode={padding!r} is not "
                              "supported", hint="kiln samples with mode 'nearest' or 'linear'")
    if nd < 1 or gt.rank != t.rank or gt.shape[0] != t.shape[0] or gt.shape[-1] != nd or (
            not t.dtype.is_float or gt.dtype != t.dtype):
        raise ctx.error(f"GridSample grid {list(gt.shape)} does not fit x {list(t.shape)}",
                        hint=f"grid is [N, *out, {nd}], of x's float type")
    return [grid_sample(ctx, x, grid, mode, padding, bool(ctx.attr("align_corners", 0)))]


# ---- determinant -------------------------------------------------------------------------------
_DET_MAX = 64


def _det(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """Det by Gaussian elimination with partial pivoting (``determinant``)."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    if t.rank < 2 or t.shape[-1] != t.shape[-2]:
        raise ctx.error(f"Det needs square matrices [..., n, n], got {list(t.shape)}")
    if not t.dtype.is_float:
        raise ctx.error(f"Det of {t.dtype.value}: ONNX defines it for floats")
    size = t.shape[-1]
    if size > _DET_MAX:
        raise ctx.unsupported(f"Det of {size}x{size} matrices: kiln unrolls the elimination "
                              f"up to {_DET_MAX}x{_DET_MAX}")
    return [determinant(ctx, x)]


# ---- quantization ------------------------------------------------------------------------------
def _dynamic_quantize_linear(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """DynamicQuantizeLinear as ONNX defines it, in elementwise ops on float32: the range
    [min(x, 0), max(x, 0)] over 255 is the scale, the zero point is round(clamp(-min /
    scale, 0, 255)), and y = clamp(round(x / scale) + zero point, 0, 255) as uint8."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    if t.dtype != DType.f32:
        raise ctx.error(f"DynamicQuantizeLinear of {t.dtype.value}: ONNX defines it for float32")
    zero = ctx.scalar(0.0, t.dtype, "zero")
    every = {"axes": None, "keepdim": False}
    hi = ctx.op("maximum", [ctx.op("reduce_max", [x], every), zero])
    lo = ctx.op("minimum", [ctx.op("reduce_min", [x], every), zero])
    scale = ctx.op("div", [ctx.op("sub", [hi, lo]), ctx.scalar(255.0, t.dtype, "qrange")])
    # An all-zero x has scale 0 (its output, as in ONNX's reference); dividing by 1 instead
    # quantizes it to 0 with zero point 0 rather than to NaN.
    safe = ctx.op("where", [ctx.op("eq", [scale, zero]), ctx.scalar(1.0, t.dtype, "one"), scale])
    bounds = {"min": 0.0, "max": 255.0}
    zp = ctx.op("round", [ctx.op("clamp", [ctx.op("div", [ctx.op("neg", [lo]), safe])],
                                 bounds)])
    y = ctx.op("clamp", [ctx.op("add", [ctx.op("round", [ctx.op("div", [x, safe])]), zp])],
               bounds)
    return [ctx.op("cast", [y], {"dtype": "u8"}), scale, ctx.op("cast", [zp], {"dtype": "u8"})]


# ---- einsum --------------------------------------------------------------------------------------
class _AsTorchImporter:
    """The ONNX import context as the PyTorch importer that ``einsum_value`` builds through
    (operands are kiln values already)."""

    def __init__(self, ctx: ImportContext) -> None:
        self.ctx = ctx

    def value(self, x: str, dtype: DType | None = None) -> str:
        return x if dtype is None or self.ctx.type_of(x).dtype == dtype else self.ctx.op(
            "cast", [x], {"dtype": dtype.value})

    def op(self, op: str, inputs: Sequence[str], attrs: dict | None = None) -> str:
        return self.ctx.op(op, inputs, attrs)

    def type_of(self, value: str):
        return self.ctx.type_of(value)

    def error(self, message: str, hint: str | None = None):
        return self.ctx.error(message, hint)


def _einsum(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """Einsum through the PyTorch frontend's decomposition (reduce_sum, permute, reshape and
    batched matmuls); imported here, so only a model with an Einsum loads torch."""
    from kiln.frontend.handlers_coverage import einsum_value

    return [einsum_value(_AsTorchImporter(ctx), ctx.attr("equation"), ctx.inputs())]


def _roi_align(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """RoiAlign with a fixed sampling_ratio: each output bin samples sr x sr points of its
    roi bilinearly (ONNX's and ONNX Runtime's rules: a point more than one pixel outside
    reads 0, one below 0 is moved to 0, one past the last row or column reads that row or
    column), as one take of the 4 neighbours of every point from x [N, H, W, C] at the roi's
    batch index; avg averages the points, max takes the largest weighted neighbour (as ONNX
    Runtime does). The rois and batch indices may be computed at run time."""
    x, rois, batch = ctx.input(0), ctx.input(1), ctx.input(2)
    t, rt = ctx.type_of(x), ctx.type_of(rois)
    sr = int(ctx.attr("sampling_ratio", 0))
    mode = ctx.attr("mode", "avg")
    coords = ctx.attr("coordinate_transformation_mode", "half_pixel")
    oh, ow = int(ctx.attr("output_height", 1)), int(ctx.attr("output_width", 1))
    if sr < 1:
        raise ctx.unsupported("RoiAlign with sampling_ratio 0 (as many points as each roi "
                              "covers pixels): the number depends on the rois",
                              hint="export with a fixed sampling_ratio (2 is common)")
    if mode not in ("avg", "max") or coords not in ("half_pixel", "output_half_pixel"):
        raise ctx.error(f"RoiAlign mode={mode!r}, coordinate_transformation_mode={coords!r}")
    if t.rank != 4 or rt.rank != 2 or rt.shape[1] != 4 or not t.dtype.is_float:
        raise ctx.error(f"RoiAlign of x {list(t.shape)} with rois {list(rt.shape)}",
                        hint="x is [N, C, H, W] and rois [R, 4]")
    dt, r_count = t.dtype, rt.shape[0]
    height, width = t.shape[2], t.shape[3]
    scale = float(ctx.attr("spatial_scale", 1.0))
    offset = 0.5 if coords == "half_pixel" else 0.0

    def num(v: float, hint: str = "c") -> str:
        return ctx.scalar(v, dt, hint)

    def corner(k: int) -> str:
        c = ctx.reshape(_slice(ctx, ctx.op("cast", [rois], {"dtype": dt.value}), 1, k, k + 1),
                        [r_count])
        return ctx.op("sub", [ctx.op("mul", [c, num(scale, "scale")]), num(offset, "offset")])

    def samples(start: str, end: str, bins: int, size: int, shape: list[int]) -> list[str]:
        """The sample coordinates along one axis, [R, bins, sr] reshaped to ``shape``, and
        the index and weight pairs of their two neighbours (after ONNX's boundary rules)."""
        extent = ctx.op("sub", [end, start])
        if coords == "output_half_pixel":
            extent = ctx.op("maximum", [extent, num(1.0, "one")])
        step = ctx.op("div", [extent, num(float(bins), "bins")])
        at = np.add.outer(np.arange(bins), (np.arange(sr) + 0.5) / sr).reshape(1, bins, sr)
        p = ctx.op("add", [ctx.reshape(start, [r_count, 1, 1]),
                           ctx.op("mul", [ctx.reshape(step, [r_count, 1, 1]),
                                          ctx.constant(at.astype(dt.numpy), "at")])])
        p = ctx.reshape(p, shape)
        outside = ctx.op("where", [ctx.op("lt", [p, num(-1.0, "edge")]),
                                   ctx.scalar(True, DType.bool, "yes"),
                                   ctx.op("gt", [p, num(float(size), "size")])])
        p = ctx.op("maximum", [p, num(0.0, "zero")])
        low = floor(ctx, p)
        last = ctx.op("ge", [low, num(size - 1.0, "last")])
        low = ctx.op("where", [last, num(size - 1.0, "last"), low])
        p = ctx.op("where", [last, low, p])
        high = ctx.op("minimum", [ctx.op("add", [low, num(1.0, "one")]), num(size - 1.0, "last")])
        frac = ctx.op("sub", [p, low])
        keep = ctx.op("cast", [ctx.op("logical_not", [outside])], {"dtype": dt.value})
        w_low = ctx.op("mul", [ctx.op("sub", [num(1.0, "one"), frac]), keep])
        w_high = ctx.op("mul", [frac, keep])
        return [ctx.op("cast", [low], {"dtype": "i64"}), ctx.op("cast", [high], {"dtype": "i64"}),
                w_low, w_high]

    x1, y1, x2, y2 = (corner(k) for k in range(4))
    ys = samples(y1, y2, oh, height, [r_count, oh, sr, 1, 1])
    xs = samples(x1, x2, ow, width, [r_count, 1, 1, ow, sr])
    channels_last = ctx.op("permute", [x], {"perm": (0, 2, 3, 1)})
    b = ctx.reshape(ctx.op("cast", [batch], {"dtype": "i64"}), [r_count, 1, 1, 1, 1])
    terms = []
    for yi, wy in ((ys[0], ys[2]), (ys[1], ys[3])):
        for xi, wx in ((xs[0], xs[2]), (xs[1], xs[3])):
            v = ctx.op("take", [channels_last, b, yi, xi], {"axis": 0, "wrap": False})
            w = ctx.reshape(ctx.op("mul", [wy, wx]), [r_count, oh, sr, ow, sr, 1])
            terms.append(ctx.op("mul", [v, w]))  # [R, oh, sr, ow, sr, C]
    if mode == "avg":
        total = terms[0]
        for term in terms[1:]:
            total = ctx.op("add", [total, term])
        y = ctx.op("reduce_mean", [total], {"axes": (2, 4), "keepdim": False})
    else:
        best = terms[0]
        for term in terms[1:]:
            best = ctx.op("maximum", [best, term])
        y = ctx.op("reduce_max", [best], {"axes": (2, 4), "keepdim": False})
    return [ctx.op("permute", [y], {"perm": (0, 3, 1, 2)})]


# ---- short-time Fourier transform ---------------------------------------------------------------
def _stft(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """STFT: the frames (one take of constant positions along the signal axis), times the
    window, and the DFT along each frame (onnx_import_extra's tables)."""
    x = ctx.input(0)
    t = ctx.type_of(x)
    if t.rank != 3 or t.shape[-1] not in (1, 2) or not t.dtype.is_float:
        raise ctx.error(f"STFT wants a float signal [batch, length, 1 or 2], got {list(t.shape)}")
    (step,) = ctx.int_input(1, "frame_step", 1)
    window = ctx.optional(2)
    if ctx.has_input(3):
        (length,) = ctx.int_input(3, "frame_length", 1)
    elif window is not None:
        length = ctx.type_of(window).shape[0]
    else:
        length = t.shape[1]
    if window is not None and ctx.type_of(window).shape != (length,):
        raise ctx.error(f"STFT window {list(ctx.type_of(window).shape)} is not [{length}]")
    if step < 1 or not 1 <= length <= t.shape[1]:
        raise ctx.error(f"STFT frame_step {step} / frame_length {length} do not fit a signal "
                        f"of length {t.shape[1]}")
    frames = (t.shape[1] - length) // step + 1
    starts = np.arange(frames)[:, None] * step + np.arange(length)[None, :]
    y = ctx.op("take", [x, ctx.constant(starts.astype(np.int64), "frames")],
               {"axis": 1, "wrap": False})  # [batch, frames, length, 1 or 2]
    if window is not None:
        w = window if ctx.type_of(window).dtype == t.dtype else ctx.op(
            "cast", [window], {"dtype": t.dtype.value})
        y = ctx.op("mul", [y, ctx.reshape(w, [1, 1, length, 1])])
    return [_dft_along(ctx, y, 2, False, bool(ctx.attr("onesided", 1)))]


# ---- quantized convolution ---------------------------------------------------------------------
def _qlinear_conv(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """QLinearConv as ONNX's reference computes it: the convolution of x and w minus their
    zero points (w's per output channel or not) plus the int32 bias, times x_scale * w_scale
    / y_scale, plus y's zero point, clipped and rounded half to even. The products and sums
    run in float32 (exact below 2^24, as in kiln's QLinearMatMul; past it a result within
    float32 rounding of a half step can round the other way). Scales and zero points must
    be constants."""
    wt = ctx.in_type(3)
    cout = wt.shape[0]
    per_channel = (cout,) + (1,) * (wt.rank - 1)
    x = _centered(ctx, 0, 2, ())
    w = _centered(ctx, 3, 5, per_channel)
    x, attrs = conv_operand_and_attrs(ctx, x, list(wt.shape[2:]))
    acc = ctx.op("conv", [x, w], attrs)
    if ctx.has_input(8):
        bias = ctx.op("cast", [ctx.input(8)], {"dtype": "f32"})
        acc = ctx.op("add", [acc, ctx.reshape(bias, [1, cout] + [1] * (wt.rank - 2))])
    x_scale = ctx.const_input(1, "x scale").astype(np.float32).reshape(-1)
    w_scale = ctx.const_input(4, "w scale").astype(np.float32).reshape(-1)
    y_scale = ctx.const_input(6, "y scale").astype(np.float32).reshape(-1)
    if x_scale.size != 1 or y_scale.size != 1 or w_scale.size not in (1, cout):
        raise ctx.error("QLinearConv scales: x's and y's per tensor, w's per tensor or per "
                        "output channel")
    factor = (x_scale[0] * w_scale / y_scale[0]).astype(np.float32)
    shape = [1, cout] + [1] * (wt.rank - 2) if factor.size > 1 else []
    r = ctx.op("mul", [acc, ctx.constant(factor.reshape(shape), "factor")])
    out = ctx.in_type(7).dtype if ctx.has_input(7) else ctx.in_type(0).dtype
    if ctx.has_input(7):
        zero = ctx.const_input(7, "y zero point").astype(np.float32).reshape(-1)
        r = ctx.op("add", [r, ctx.scalar(zero[0], DType.f32, "zero")])
    low, high = (-128.0, 127.0) if out == DType.i8 else (0.0, 255.0)
    r = ctx.op("round", [ctx.op("clamp", [r], {"min": low, "max": high})])
    return [ctx.op("cast", [r], {"dtype": out.value})]


# ---- bitwise ops -----------------------------------------------------------------------------
# kiln's kernels have no bitwise instructions (their and / or are logical): BitwiseNot is
# arithmetic on any integer type, and the others are spelled in exact integer arithmetic on
# the bits of 8-bit integers, which int32 and float32 hold exactly.
_EIGHT_BIT = (DType.u8, DType.i8)


def _eight_bit(ctx: ImportContext, x: str) -> DType:
    dt = ctx.type_of(x).dtype
    if dt not in _EIGHT_BIT:
        raise ctx.unsupported(f"{ctx.node.op_type} of {dt.value}: kiln computes it on 8-bit "
                              "integers (uint8, int8) only",
                              hint="kiln's kernels have no bitwise instructions; cast to uint8 "
                                   "where the values fit")
    return dt


def _as_unsigned(ctx: ImportContext, x: str) -> str:
    """An 8-bit integer as int32 in [0, 256): its bits read as unsigned."""
    dt = ctx.type_of(x).dtype
    wide = ctx.op("cast", [x], {"dtype": "i32"})
    if dt == DType.u8:
        return wide
    negative = ctx.op("cast", [ctx.op("lt", [wide, ctx.scalar(0, DType.i32, "zero")])],
                      {"dtype": "i32"})
    return ctx.op("add", [wide, ctx.op("mul", [negative, ctx.scalar(256, DType.i32, "wrap")])])


def _from_unsigned(ctx: ImportContext, r: str, dt: DType) -> str:
    """int32 in [0, 256) back to the 8-bit type (two's complement for int8)."""
    if dt == DType.i8:
        high = ctx.op("cast", [ctx.op("ge", [r, ctx.scalar(128, DType.i32, "sign")])],
                      {"dtype": "i32"})
        r = ctx.op("sub", [r, ctx.op("mul", [high, ctx.scalar(256, DType.i32, "wrap")])])
    return ctx.op("cast", [r], {"dtype": dt.value})


def _shift_down(ctx: ImportContext, u: str, k: int) -> str:
    """floor(u / 2^k) of a non-negative int32 below 2^24: float32 divides it exactly and the
    cast back truncates, which is the floor there."""
    f = ctx.op("mul", [ctx.op("cast", [u], {"dtype": "f32"}),
                       ctx.scalar(2.0 ** -k, DType.f32, "scale")])
    return ctx.op("cast", [f], {"dtype": "i32"})


def _bits(ctx: ImportContext, u: str) -> list[str]:
    """The 8 bits (int32 0 / 1) of int32 ``u`` in [0, 256), lowest first."""
    high = [u] + [_shift_down(ctx, u, k) for k in range(1, 9)]
    two = ctx.scalar(2, DType.i32, "two")
    return [ctx.op("sub", [high[k], ctx.op("mul", [high[k + 1], two])]) for k in range(8)]


def _bitwise(kind: str) -> ImportFn:
    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        a, b = ctx.input(0), ctx.input(1)
        dt = _eight_bit(ctx, a)
        if ctx.type_of(b).dtype != dt:
            raise ctx.error(f"{node.op_type} of {dt.value} and {ctx.type_of(b).dtype.value}")
        total = None
        for k, (x, y) in enumerate(zip(_bits(ctx, _as_unsigned(ctx, a)),
                                       _bits(ctx, _as_unsigned(ctx, b)))):
            both = ctx.op("mul", [x, y])
            if kind == "and":
                bit = both
            else:  # or: x + y - xy; xor: x + y - 2xy
                twice = both if kind == "or" else ctx.op("add", [both, both])
                bit = ctx.op("sub", [ctx.op("add", [x, y]), twice])
            term = ctx.op("mul", [bit, ctx.scalar(1 << k, DType.i32, "bit")]) if k else bit
            total = term if total is None else ctx.op("add", [total, term])
        return [_from_unsigned(ctx, total, dt)]

    return imp


def _bitwise_not(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """~x: 255 - x for uint8, -1 - x for the signed types (two's complement), exactly."""
    x = ctx.input(0)
    dt = ctx.type_of(x).dtype
    if dt.is_float or dt == DType.bool:
        raise ctx.error(f"BitwiseNot of {dt.value}: ONNX defines it for integers")
    top = 255 if dt == DType.u8 else -1
    return [ctx.op("sub", [ctx.scalar(top, dt, "ones"), x])]


def _bit_shift(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """x << y (the low 8 bits of x * 2^y) or x >> y (floor(x / 2^y): arithmetic for int8);
    a shift below 0 or of 8 and more shifts every bit out (0, or -1 for a negative int8
    shifted right), as ONNX's cases ask."""
    x, y = ctx.input(0), ctx.input(1)
    dt = _eight_bit(ctx, x)
    if ctx.type_of(y).dtype != dt:
        raise ctx.error(f"BitShift of {dt.value} by {ctx.type_of(y).dtype.value}")
    direction = ctx.attr("direction")
    if direction not in ("LEFT", "RIGHT"):
        raise ctx.error(f"BitShift direction {direction!r} is not LEFT or RIGHT")
    y32 = ctx.op("cast", [y], {"dtype": "i32"})
    inside = ctx.op("where", [ctx.op("lt", [y32, ctx.scalar(0, DType.i32, "zero")]),
                              ctx.scalar(False, DType.bool, "no"),
                              ctx.op("lt", [y32, ctx.scalar(8, DType.i32, "width")])])
    steps = ctx.op("cast", [ctx.op("where", [inside, y32, ctx.scalar(8, DType.i32, "all")])],
                   {"dtype": "f32"})
    power = ctx.op("pow", [ctx.scalar(2.0, DType.f32, "two"), steps])  # exact: 1 ... 256
    if direction == "LEFT":
        v = ctx.op("mul", [_as_unsigned(ctx, x), ctx.op("cast", [power], {"dtype": "i32"})])
        low = ctx.op("sub", [v, ctx.op("mul", [_shift_down(ctx, v, 8),
                                               ctx.scalar(256, DType.i32, "wrap")])])
        return [_from_unsigned(ctx, low, dt)]
    q = ctx.op("div", [ctx.op("cast", [x], {"dtype": "f32"}), power])  # exact in float32
    r = ctx.op("round", [q])
    floor = ctx.op("sub", [r, ctx.op("cast", [ctx.op("gt", [r, q])], {"dtype": "f32"})])
    return [ctx.op("cast", [floor], {"dtype": dt.value})]


ONNX_IMPORT.update({
    "BitwiseAnd": _bitwise("and"),
    "BitwiseOr": _bitwise("or"),
    "BitwiseXor": _bitwise("xor"),
    "BitwiseNot": _bitwise_not,
    "BitShift": _bit_shift,
    "Einsum": _einsum,
    "STFT": _stft,
    "RoiAlign": _roi_align,
    "QLinearConv": _qlinear_conv,
    "GridSample": _grid_sample,
    "InstanceNormalization": _instance_norm,
    "LpNormalization": _lp_normalization,
    "MeanVarianceNormalization": _mean_variance_normalization,
    "ReduceProd": _reduce_prod,
    "CumProd": _cum_prod,
    "GatherND": _gather_nd,
    "ScatterElements": _scatter_elements,
    "Scatter": _scatter_elements,
    "ScatterND": _scatter_nd,
    "TensorScatter": _tensor_scatter,
    "MaxUnpool": _max_unpool,
    "Upsample": _upsample,
    "Col2Im": _col2im,
    "AffineGrid": _affine_grid,
    "Det": _det,
    "DynamicQuantizeLinear": _dynamic_quantize_linear,
})
