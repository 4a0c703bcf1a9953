"""Normalizations and softmax: reductions fused with their elementwise producers/consumers."""

from __future__ import annotations

import math

import numpy as np

from kiln.ir.decompose import apply
from kiln.ir.errors import ShapeError
from kiln.ir.ops._rules import norm_axis, same_dtype, want_float
from kiln.ir.registry import REQUIRED, register


def _softmax_infer(ins, attrs):
    want_float(ins[0])
    norm_axis(attrs["axis"], ins[0].rank)
    return [ins[0]]


# Softmax, log_softmax, layer_norm and group_norm are declared by their decompositions: those
# are their references and (where ONNX has no node for the op) their ONNX export. Their
# lowering is an anchor's loop nest (passes/lower/anchors.py), a schedule of the same formula.
def _shifted(x, axis):
    """x minus its max along ``axis``: exp of it cannot overflow."""
    return x - apply("reduce_max", x, axes=(axis,), keepdim=True)


def _softmax(x, axis):
    e = apply("exp", _shifted(x, axis))
    return e / apply("reduce_sum", e, axes=(axis,), keepdim=True)


def _log_softmax(x, axis):
    z = _shifted(x, axis)
    return z - apply("log", apply("reduce_sum", apply("exp", z), axes=(axis,), keepdim=True))


register("softmax", ["x"], infer=_softmax_infer, decomposition=_softmax,
         decomposition_cases=[{"axis": -1}], kind="norm",
         description="exp(x) / sum(exp(x)) along axis", attrs={"axis": REQUIRED},
         flops=lambda i, o, a: 5 * o[0].numel)
register("log_softmax", ["x"], infer=_softmax_infer, decomposition=_log_softmax,
         decomposition_cases=[{"axis": -1}], kind="norm",
         description="x - log(sum(exp(x))) along axis", attrs={"axis": REQUIRED},
         flops=lambda i, o, a: 5 * o[0].numel)


def _bn_infer(ins, attrs):
    x = ins[0]
    same_dtype(ins)
    want_float(x)
    if x.rank < 2:
        raise ShapeError(f"batch_norm wants [N, C, ...], got {list(x.shape)}")
    for t, what in zip(ins[1:], ("mean", "var", "weight", "bias")):
        if t.shape != (x.shape[1],):
            raise ShapeError(f"batch_norm {what} {list(t.shape)} must be [{x.shape[1]}]")
    return [x]


def _bn_ref(x, mean, var, weight, bias, *, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x64 = x.astype(np.float64)
    inv = 1.0 / np.sqrt(var.astype(np.float64) + eps)
    y = (x64 - mean.reshape(shape)) * (inv * weight).reshape(shape) + bias.reshape(shape)
    return y.astype(x.dtype)


register("batch_norm", ["x", "mean", "var", "weight", "bias"], infer=_bn_infer,
         reference=_bn_ref, kind="norm",
         description="inference batch norm over channel axis 1 with running statistics",
         attrs={"eps": 1e-5}, flops=lambda i, o, a: 2 * o[0].numel)


def _ln_infer(ins, attrs):
    x = ins[0]
    same_dtype(ins)
    want_float(x)
    k = attrs["normalized_ndim"]
    if not 1 <= k <= x.rank:
        raise ShapeError(f"layer_norm normalized_ndim={k} does not fit rank {x.rank}")
    for t in ins[1:]:
        if t.shape != x.shape[-k:]:
            raise ShapeError(f"layer_norm affine parameter {list(t.shape)} must be "
                             f"{list(x.shape[-k:])}")
    return [x]


def _layer_norm(x, weight=None, bias=None, *, normalized_ndim, eps):
    rank = len(x.shape)
    axes = tuple(range(rank - normalized_ndim, rank))
    centred = x - apply("reduce_mean", x, axes=axes, keepdim=True)
    var = apply("reduce_mean", centred * centred, axes=axes, keepdim=True)
    y = centred / apply("sqrt", var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


register("layer_norm", ["x", "weight?", "bias?"], infer=_ln_infer, decomposition=_layer_norm,
         kind="norm", description="normalize over the last normalized_ndim axes, then affine",
         attrs={"normalized_ndim": 1, "eps": 1e-5}, flops=lambda i, o, a: 8 * o[0].numel)


def _gn_infer(ins, attrs):
    x = ins[0]
    same_dtype(ins)
    want_float(x)
    g = attrs["groups"]
    if x.rank < 2 or g < 1 or x.shape[1] % g:
        raise ShapeError(f"group_norm: {x.shape[1] if x.rank > 1 else '?'} channels do not "
                         f"split into {g} groups")
    for t in ins[1:]:
        if t.shape != (x.shape[1],):
            raise ShapeError(f"group_norm affine parameter {list(t.shape)} must be "
                             f"[{x.shape[1]}]")
    return [x]


def _group_norm(x, weight=None, bias=None, *, groups, eps):
    n, c = x.shape[:2]
    per_group = math.prod(x.shape) // max(n * groups, 1)
    grouped = apply("reshape", x, shape=(n, groups, per_group))
    centred = grouped - apply("reduce_mean", grouped, axes=(2,), keepdim=True)
    var = apply("reduce_mean", centred * centred, axes=(2,), keepdim=True)
    y = apply("reshape", centred / apply("sqrt", var + eps), shape=x.shape)
    per_channel = (c,) + (1,) * (len(x.shape) - 2)  # broadcasts against [N, C, ...]
    if weight is not None:
        y = y * apply("reshape", weight, shape=per_channel)
    if bias is not None:
        y = y + apply("reshape", bias, shape=per_channel)
    return y


register("group_norm", ["x", "weight?", "bias?"], infer=_gn_infer, decomposition=_group_norm,
         decomposition_cases=[{"groups": 1}],
         kind="norm", description="normalize each group of channels, then per-channel affine",
         attrs={"groups": REQUIRED, "eps": 1e-5}, flops=lambda i, o, a: 8 * o[0].numel)
