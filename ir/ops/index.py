"""Indexing and data-movement ops: gathers by integer indices, arg-reductions, top-k, running
sums and resizing.

Index operands are i32 or i64. A negative index counts from the end (as in ONNX and in
PyTorch's advanced indexing) when the op's ``wrap`` attribute says so; an index outside the
axis is a KilnError, never a read outside the tensor.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.errors import KilnError, ShapeError
from kiln.ir.ops._rules import broadcast, norm_axis
from kiln.ir.registry import REQUIRED, register
from kiln.ir.types import DType, TensorType

INDEX_DTYPES = (DType.i32, DType.i64)


def _want_index(t: TensorType, what: str) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise ShapeError(f"{what} must be i32 or i64, got {t.dtype}",
                         hint="cast the indices to int64")


def check_indices(op: str, idx: np.ndarray, n: int, wrap: bool) -> np.ndarray:
    """``idx`` as non-negative int64 indices into an axis of ``n`` entries; a KilnError naming
    ``op`` when one lies outside [-n, n) (``wrap``) or [0, n)."""
    idx = np.asarray(idx).astype(np.int64)
    lo = -n if wrap else 0
    bad = (idx < lo) | (idx >= n)
    if bad.any():
        raise KilnError(f"{op} index {int(idx[bad].flat[0])} is out of range [{lo}, {n})",
                        op=op, hint="check the indices fed to the model")
    return np.where(idx < 0, idx + n, idx)


# ---- take: ONNX Gather, index_select, advanced indexing ----------------------------------------
def _take_infer(ins, attrs):
    x, inds = ins[0], ins[1:]
    if not inds:
        raise ShapeError("take needs at least one index operand")
    for t in inds:
        _want_index(t, "take indices")
    axis = norm_axis(attrs["axis"], x.rank)
    if x.rank == 0 or axis + len(inds) > x.rank:
        raise ShapeError(f"{len(inds)} index operand(s) from axis {attrs['axis']} do not fit a "
                         f"rank-{x.rank} tensor")
    b = broadcast(*[t.shape for t in inds])
    return [TensorType(x.shape[:axis] + b + x.shape[axis + len(inds):], x.dtype)]


def _take_ref(x, *inds, axis, wrap):
    axis = norm_axis(axis, x.ndim)
    inds = np.broadcast_arrays(*[check_indices("take", i, x.shape[axis + j], wrap)
                                 for j, i in enumerate(inds)])
    sel = (slice(None),) * axis + tuple(inds)
    return x[sel]


register("take", ["x", "indices"], variadic=True, infer=_take_infer, reference=_take_ref,
         kind="data", attrs={"axis": 0, "wrap": True},
         description="x indexed along consecutive axes from `axis` by broadcast integer index "
                     "tensors (ONNX Gather for one; PyTorch advanced indexing); `wrap`: "
                     "negative indices count from the end", flops=lambda i, o, a: 0)


# ---- gather_elements: torch.gather, ONNX GatherElements -----------------------------------------
def _gather_infer(ins, attrs):
    x, idx = ins
    _want_index(idx, "gather indices")
    if idx.rank != x.rank:
        raise ShapeError(f"gather indices have rank {idx.rank}, the tensor {x.rank}")
    axis = norm_axis(attrs["axis"], x.rank)
    if any(i > d for k, (i, d) in enumerate(zip(idx.shape, x.shape)) if k != axis):
        raise ShapeError(f"gather indices {list(idx.shape)} are larger than the tensor "
                         f"{list(x.shape)} outside axis {axis}")
    return [TensorType(idx.shape, x.dtype)]


def _gather_ref(x, idx, axis, wrap):
    axis = norm_axis(axis, x.ndim)
    if x.ndim == 0:
        check_indices("gather_elements", idx, 1, wrap)
        return x.copy()
    idx = check_indices("gather_elements", idx, x.shape[axis], wrap)
    part = x[tuple(slice(0, d) if k != axis else slice(None)
                   for k, d in enumerate(idx.shape))]
    return np.take_along_axis(part, idx, axis)


register("gather_elements", ["x", "indices"], infer=_gather_infer, reference=_gather_ref,
         kind="data", attrs={"axis": REQUIRED, "wrap": True},
         description="out[i] = x[i with i[axis] replaced by indices[i]] (torch.gather, ONNX "
                     "GatherElements)", flops=lambda i, o, a: 0)


# ---- argmax / argmin ---------------------------------------------------------------------------
def _arg_infer(ins, attrs):
    x = ins[0]
    if x.dtype == DType.bool:
        raise ShapeError("argmax/argmin of a bool tensor", hint="cast it to int32 first")
    axis = attrs["axis"]
    if axis is None:
        if x.numel == 0:
            raise ShapeError("argmax/argmin of an empty tensor")
        return [TensorType((1,) * x.rank if attrs["keepdim"] else (), DType.i64)]
    a = norm_axis(axis, x.rank)
    if x.rank and x.shape[a] == 0:
        raise ShapeError("argmax/argmin over an empty axis")
    if attrs["keepdim"] or x.rank == 0:
        shape = tuple(1 if k == a else d for k, d in enumerate(x.shape))
    else:
        shape = tuple(d for k, d in enumerate(x.shape) if k != a)
    return [TensorType(shape, DType.i64)]


def _arg_ref(largest: bool):
    def ref(x, axis, keepdim):
        fn = np.argmax if largest else np.argmin  # first occurrence; NaN counts as extreme
        if axis is None:
            out = np.asarray(fn(x.reshape(-1)), np.int64)
            return out.reshape((1,) * x.ndim) if keepdim else out
        if x.ndim == 0:
            return np.zeros((), np.int64)
        a = norm_axis(axis, x.ndim)
        out = fn(x, axis=a).astype(np.int64)
        return np.expand_dims(out, a) if keepdim else out

    return ref


for _name, _largest in (("argmax", True), ("argmin", False)):
    register(_name, ["x"], infer=_arg_infer, reference=_arg_ref(_largest), kind="reduction",
             attrs={"axis": None, "keepdim": False},
             description=f"int64 index of the {'largest' if _largest else 'smallest'} element "
                         "along axis (null: of the flattened tensor); ties: the first; NaN "
                         "counts as the extreme", flops=lambda i, o, a: i[0].numel)


# ---- topk: indices of the k largest or smallest --------------------------------------------------
def _topk_infer(ins, attrs):
    x = ins[0]
    if x.dtype == DType.bool:
        raise ShapeError("topk of a bool tensor", hint="cast it to int32 first")
    if x.rank == 0:
        raise ShapeError("topk of a scalar", hint="reshape it to [1] first")
    a = norm_axis(attrs["axis"], x.rank)
    k = attrs["k"]
    if not 0 <= k <= x.shape[a]:
        raise ShapeError(f"topk k={k} is outside [0, {x.shape[a]}] for axis {a}")
    return [TensorType(tuple(k if d == a else s for d, s in enumerate(x.shape)), DType.i64)]


def _topk_ref(x, k, axis, largest):
    a = norm_axis(axis, x.ndim)
    # A stable sort keeps equal elements in index order; NaN sorts as the largest.
    key = -x.astype(np.float64) if largest else x.astype(np.float64)
    if largest:
        key = np.where(np.isnan(x), -np.inf, key)
    order = np.argsort(key, axis=a, kind="stable")
    return np.take(order, np.arange(k), axis=a).astype(np.int64)


register("topk", ["x"], infer=_topk_infer, reference=_topk_ref, kind="reduction",
         attrs={"k": REQUIRED, "axis": -1, "largest": True},
         description="int64 indices of the k largest (or smallest) elements along axis, in "
                     "order; ties: the lower index first (take values with gather_elements)",
         flops=lambda i, o, a: i[0].numel * max(a["k"], 1))


# ---- cumsum ----------------------------------------------------------------------------------
def _cumsum_infer(ins, attrs):
    x = ins[0]
    if x.dtype == DType.bool:
        raise ShapeError("cumsum of a bool tensor", hint="cast it to int64 first")
    norm_axis(attrs["axis"], x.rank)
    return [TensorType(x.shape, x.dtype)]


def _cumsum_ref(x, axis, exclusive, reverse):
    if x.ndim == 0:
        return np.zeros_like(x) if exclusive else x.copy()
    a = norm_axis(axis, x.ndim)
    acc = np.float64 if x.dtype.kind == "f" else np.int64
    y = np.flip(x, a) if reverse else x
    s = np.cumsum(y, axis=a, dtype=acc)
    if exclusive:
        s = s - y
    s = np.flip(s, a) if reverse else s
    return s.astype(x.dtype)


register("cumsum", ["x"], infer=_cumsum_infer, reference=_cumsum_ref, kind="reduction",
         attrs={"axis": REQUIRED, "exclusive": False, "reverse": False},
         flops=lambda i, o, a: o[0].numel,  # one add per element
         description="running sum along axis (ONNX CumSum: exclusive leaves out the element "
                     "itself, reverse runs from the end)")


# ---- resize ------------------------------------------------------------------------------------
RESIZE_MODES = ("nearest", "linear", "cubic")
_TAPS = {"nearest": 1, "linear": 2, "cubic": 4}
COORDINATES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")
NEAREST_MODES = ("floor", "round_prefer_floor", "round_prefer_ceil", "ceil")


def _resize_infer(ins, attrs):
    x = ins[0]
    if not x.dtype.is_float:
        raise ShapeError(f"resize of a {x.dtype} tensor", hint="cast it to f32 first")
    sizes = attrs["sizes"]
    if not 1 <= len(sizes) <= x.rank or any(s < 1 for s in sizes):
        raise ShapeError(f"resize sizes {list(sizes)} do not fit a rank-{x.rank} tensor")
    for name, value, allowed in (("mode", attrs["mode"], RESIZE_MODES),
                                 ("coordinate", attrs["coordinate"], COORDINATES),
                                 ("nearest", attrs["nearest"], NEAREST_MODES)):
        if value not in allowed:
            raise ShapeError(f"resize {name} {value!r} is not one of {list(allowed)}")
    scales = attrs["scales"]
    if scales is not None and (len(scales) != len(sizes) or any(s <= 0 for s in scales)):
        raise ShapeError(f"resize scales {list(scales)} do not match sizes {list(sizes)}")
    return [TensorType(x.shape[:x.rank - len(sizes)] + tuple(sizes), x.dtype)]


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 (PyTorch's and
    ONNX's bicubic), for fractional positions ``t`` (float32, as PyTorch computes them)."""
    a = np.float32(a)
    one = np.float32(1)

    def near(s):  # |s| <= 1
        return ((a + 2) * s - (a + 3)) * s * s + one

    def far(s):  # 1 < |s| < 2
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

    return np.stack([far(t + one), near(t), near(one - t), far(2 * one - t)], axis=-1)


def resize_taps(n_in: int, n_out: int, scale: float | None, mode: str, coordinate: str,
                nearest: str, cubic_a: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (int64 [n_out, taps], inside [0, n_in)) and weights (float32, same
    shape) of one resized axis; ``scale`` is output/input (None: n_out / n_in). Taps beyond
    the edge read the edge element (PyTorch's and ONNX's border rule)."""
    f32 = np.float32
    dst = np.arange(n_out, dtype=f32)
    # PyTorch computes coordinates in float32 with the reciprocal scale; so does this, so the
    # nearest-neighbour picks agree exactly.
    inv = f32(1.0 / scale) if scale else f32(n_in) / f32(n_out)
    if coordinate == "align_corners":
        ratio = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0)
        src = dst * ratio
    elif coordinate == "asymmetric":
        src = dst * inv
    else:
        src = (dst + f32(0.5)) * inv - f32(0.5)
        if coordinate == "pytorch_half_pixel" and n_out == 1:
            src = np.zeros_like(src)
    if mode == "nearest":
        if nearest == "floor":
            i = np.floor(src)
        elif nearest == "ceil":
            i = np.ceil(src)
        elif nearest == "round_prefer_floor":
            i = np.where(src - np.floor(src) == f32(0.5), np.floor(src), np.floor(src + 0.5))
        else:
            i = np.floor(src + f32(0.5))
        idx = np.clip(i.astype(np.int64), 0, n_in - 1)[:, None]
        return idx, np.ones(idx.shape, f32)
    if mode == "linear":
        src = np.maximum(src, f32(0))
        base = np.floor(src)
        t = (src - base).astype(f32)
        offsets, w = np.arange(2), np.stack([f32(1) - t, t], axis=-1)
    else:
        base = np.floor(src)
        t = (src - base).astype(f32)
        offsets, w = np.arange(-1, 3), _cubic_weights(t, cubic_a)
    idx = np.clip(base.astype(np.int64)[:, None] + offsets[None, :], 0, n_in - 1)
    return idx, w.astype(f32)


def _resize_ref(x, sizes, scales, mode, coordinate, nearest, cubic_a):
    y = x.astype(np.float64)
    lead = x.ndim - len(sizes)
    for k, n_out in enumerate(sizes):
        axis = lead + k
        idx, w = resize_taps(x.shape[axis], n_out, None if scales is None else scales[k], mode,
                             coordinate, nearest, cubic_a)
        picked = np.take(y, idx.reshape(-1), axis=axis)
        picked = picked.reshape(y.shape[:axis] + idx.shape + y.shape[axis + 1:])
        wshape = (1,) * axis + w.shape + (1,) * (y.ndim - axis - 1)
        y = (picked * w.astype(np.float64).reshape(wshape)).sum(axis=axis + 1)
    return y.astype(x.dtype)


register("resize", ["x"], infer=_resize_infer, reference=_resize_ref, kind="data",
         attrs={"sizes": REQUIRED, "scales": None, "mode": "nearest",
                "coordinate": "half_pixel", "nearest": "floor", "cubic_a": -0.75},
         description="resize the trailing len(sizes) axes to `sizes` (ONNX Resize): nearest, "
                     "linear or cubic interpolation; `scales` (output/input per axis) maps "
                     "coordinates when given, else sizes do",
         flops=lambda i, o, a: o[0].numel * 2 * _TAPS[a["mode"]] ** len(a["sizes"]),
         # Every implementation (lowering, PyTorch twin) uses these same tables.
         taps=resize_taps)


# ---- index operands, for checks before a compiled call -----------------------------------------
def index_operands(node, types) -> list[tuple[str, int, bool]]:
    """(value, axis size, negative allowed) for each integer operand of ``node`` that indexes
    an axis: what a backend whose kernels clamp indices checks on graph inputs before a call
    (``types``: the graph's value types)."""
    if node.op == "embedding":
        return [(node.inputs[0], types[node.inputs[1]].shape[0], False)]
    if node.op not in ("take", "gather_elements"):
        return []
    x = types[node.inputs[0]]
    axis = norm_axis(node.attrs["axis"], x.rank)
    wrap = node.attrs["wrap"]
    if x.rank == 0:
        return [(node.inputs[1], 1, wrap)]
    return [(v, x.shape[axis + k] if node.op == "take" else x.shape[axis], wrap)
            for k, v in enumerate(node.inputs[1:])]
