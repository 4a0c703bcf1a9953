"""Shape ops: reshape, permute, slice, concat, split, expand, pad. No arithmetic."""

from __future__ import annotations

import math

import numpy as np

from kiln.ir.errors import ShapeError
from kiln.ir.ops._rules import broadcast, norm_axis, same_dtype, slice_length
from kiln.ir.registry import REQUIRED, no_flops, register
from kiln.ir.types import TensorType


def _not_scalar(t: TensorType, op: str) -> None:
    # norm_axis accepts axis 0 of a scalar (reductions, softmax); there is no axis here to cut.
    if t.rank == 0:
        raise ShapeError(f"{op} needs a tensor of rank >= 1, got a scalar",
                         hint="reshape the scalar to [1] first")


def _reshape_infer(ins, attrs):
    shape = tuple(attrs["shape"])
    if any(d < 0 for d in shape) or math.prod(shape) != ins[0].numel:
        raise ShapeError(f"cannot reshape {list(ins[0].shape)} to {list(shape)}")
    return [ins[0].with_shape(shape)]


register("reshape", ["x"], infer=_reshape_infer,
         reference=lambda x, shape: np.reshape(x, shape), kind="shape",
         description="same elements in row-major order, new shape",
         attrs={"shape": REQUIRED}, flops=no_flops)


def _permute_infer(ins, attrs):
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(ins[0].rank)):
        raise ShapeError(f"perm {list(perm)} is not a permutation of {ins[0].rank} axes")
    return [ins[0].with_shape(tuple(ins[0].shape[p] for p in perm))]


register("permute", ["x"], infer=_permute_infer,
         reference=lambda x, perm: np.transpose(x, perm), kind="shape",
         description="reorder axes", attrs={"perm": REQUIRED}, flops=no_flops)


def _slice_infer(ins, attrs):
    x = ins[0]
    _not_scalar(x, "slice")
    axis = norm_axis(attrs["axis"], x.rank)
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    if not (0 <= start <= end <= x.shape[axis]) or step < 1:
        raise ShapeError(f"slice [{start}:{end}:{step}] is not normalized for a dimension of "
                         f"{x.shape[axis]}", hint="0 <= start <= end <= size, step >= 1")
    shape = list(x.shape)
    shape[axis] = slice_length(start, end, step)
    return [x.with_shape(tuple(shape))]


def _slice_ref(x, axis, start, end, step):
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(start, end, step)
    return x[tuple(idx)]


register("slice", ["x"], infer=_slice_infer, reference=_slice_ref, kind="shape",
         description="x[start:end:step] along one axis (normalized bounds)",
         attrs={"axis": REQUIRED, "start": REQUIRED, "end": REQUIRED, "step": 1},
         flops=no_flops)


def _concat_infer(ins, attrs):
    dt = same_dtype(ins)
    _not_scalar(ins[0], "concat")
    rank = ins[0].rank
    axis = norm_axis(attrs["axis"], rank)
    for t in ins:
        if t.rank != rank or any(t.shape[i] != ins[0].shape[i] for i in range(rank) if i != axis):
            raise ShapeError(f"concat along axis {axis}: shapes "
                             f"{[list(t.shape) for t in ins]} differ off that axis")
    shape = list(ins[0].shape)
    shape[axis] = sum(t.shape[axis] for t in ins)
    return [TensorType(tuple(shape), dt)]


register("concat", ["xs"], infer=_concat_infer,
         reference=lambda *xs, axis: np.concatenate(xs, axis=axis), kind="shape",
         description="join tensors along an axis", attrs={"axis": REQUIRED}, flops=no_flops,
         variadic=True)


def _split_infer(ins, attrs):
    x = ins[0]
    _not_scalar(x, "split")
    axis = norm_axis(attrs["axis"], x.rank)
    sizes = tuple(attrs["sizes"])
    if not sizes or sum(sizes) != x.shape[axis] or any(s < 0 for s in sizes):
        raise ShapeError(f"split sizes {list(sizes)} do not add up to {x.shape[axis]}")
    out = []
    for s in sizes:
        shape = list(x.shape)
        shape[axis] = s
        out.append(x.with_shape(tuple(shape)))
    return out


def _split_ref(x, axis, sizes):
    cuts = np.cumsum(sizes)[:-1]
    return tuple(np.split(x, cuts, axis=axis))


register("split", ["x"], infer=_split_infer, reference=_split_ref, kind="shape",
         description="cut along an axis into pieces of the given sizes (one output each)",
         attrs={"axis": REQUIRED, "sizes": REQUIRED}, flops=no_flops)


def _expand_infer(ins, attrs):
    shape = tuple(attrs["shape"])
    if len(shape) < ins[0].rank or broadcast(ins[0].shape, shape) != shape:
        raise ShapeError(f"cannot expand {list(ins[0].shape)} to {list(shape)}")
    return [ins[0].with_shape(shape)]


register("expand", ["x"], infer=_expand_infer,
         reference=lambda x, shape: np.broadcast_to(x, shape),
         kind="shape", description="broadcast to a larger shape", attrs={"shape": REQUIRED},
         flops=no_flops)


def _pad_infer(ins, attrs):
    x = ins[0]
    pads = tuple(attrs["pads"])
    if len(pads) != 2 * x.rank:
        raise ShapeError(f"pad wants 2 entries per axis ({2 * x.rank}), got {len(pads)}")
    # Negative pads crop the input before positive ones pad it (PyTorch's order), so the
    # crops alone must fit: cropping 4 from an axis of 3 is an error even with padding after.
    if any(d + min(pads[2 * i], 0) + min(pads[2 * i + 1], 0) < 0 for i, d in enumerate(x.shape)):
        raise ShapeError(f"pads {list(pads)} remove more than {list(x.shape)} holds")
    value = attrs["value"]
    if not x.dtype.is_float and x.dtype.value != "bool":
        info = np.iinfo(x.dtype.numpy)
        # A fraction is truncated (as NumPy and PyTorch do); a value out of range has no
        # meaning (NumPy wraps it, PyTorch refuses).
        if not (math.isfinite(value) and info.min <= int(value) <= info.max):
            raise ShapeError(f"pad value {value} does not fit a {x.dtype} tensor",
                             hint=f"use an integer in [{info.min}, {info.max}]")
    shape = tuple(d + pads[2 * i] + pads[2 * i + 1] for i, d in enumerate(x.shape))
    return [x.with_shape(shape)]


def _pad_ref(x, pads, value):
    if x.ndim == 0:
        return x.copy()  # nothing to pad (and np.pad refuses scalars)
    pos = [(max(pads[2 * i], 0), max(pads[2 * i + 1], 0)) for i in range(x.ndim)]
    y = np.pad(x, pos, constant_values=np.asarray(value).astype(x.dtype))
    # Negative pads crop.
    idx = tuple(slice(-min(pads[2 * i], 0), y.shape[i] + min(pads[2 * i + 1], 0))
                for i in range(x.ndim))
    return y[idx]


register("pad", ["x"], infer=_pad_infer, reference=_pad_ref, kind="shape",
         description="constant padding; pads = (lo0, hi0, lo1, hi1, ...), negative crops",
         attrs={"pads": REQUIRED, "value": 0.0}, flops=no_flops)
