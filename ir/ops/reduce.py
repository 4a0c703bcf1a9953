"""Reductions over a set of axes."""

from __future__ import annotations

import numpy as np

from kiln.ir.errors import ShapeError
from kiln.ir.ops._rules import norm_axes
from kiln.ir.registry import register
from kiln.ir.types import DType, TensorType


def _reduce_infer(float_only: bool, allow_empty: bool):
    def infer(ins, attrs):
        x = ins[0]
        if x.dtype == DType.bool or (float_only and not x.dtype.is_float):
            raise ShapeError(f"cannot reduce a {x.dtype} tensor this way",
                             hint="cast it to f32 first")
        axes = norm_axes(attrs["axes"], x.rank)
        if not axes and x.rank:
            raise ShapeError("reduction over an empty set of axes")
        if not allow_empty and any(x.shape[a] == 0 for a in axes):
            raise ShapeError("max/min over an empty axis")
        if attrs["keepdim"]:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return [TensorType(shape, x.dtype)]

    return infer


def _axes(x, axes):
    return tuple(norm_axes(axes, x.ndim))


def _sum(x, axes, keepdim):
    acc = np.float64 if x.dtype.kind == "f" else np.int64
    return x.sum(axis=_axes(x, axes), keepdims=keepdim, dtype=acc).astype(x.dtype)


def _mean(x, axes, keepdim):
    return x.astype(np.float64).mean(axis=_axes(x, axes), keepdims=keepdim).astype(x.dtype)


def _max(x, axes, keepdim):
    return x.max(axis=_axes(x, axes), keepdims=keepdim)


def _min(x, axes, keepdim):
    return x.min(axis=_axes(x, axes), keepdims=keepdim)


for _name, _ref, _float, _empty, _desc in [
    ("reduce_sum", _sum, False, True, "sum over axes (null: all)"),
    ("reduce_mean", _mean, True, False, "mean over axes (null: all)"),
    ("reduce_max", _max, False, False, "maximum over axes (null: all)"),
    ("reduce_min", _min, False, False, "minimum over axes (null: all)"),
]:
    register(_name, ["x"], infer=_reduce_infer(_float, _empty), reference=_ref, kind="reduction",
             description=_desc, attrs={"axes": None, "keepdim": False},
             flops=lambda i, o, a: i[0].numel)
