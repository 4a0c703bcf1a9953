"""Normalizations and softmax: reductions fused with their elementwise producers/consumers."""

from __future__ import annotations

import numpy as np

from kiln.ir.errors import ShapeError
from kiln.ir.ops._rules import norm_axis, same_dtype, want_float
from kiln.ir.registry import REQUIRED, register


def _softmax_infer(ins, attrs):
    want_float(ins[0])
    norm_axis(attrs["axis"], ins[0].rank)
    return [ins[0]]


def _softmax_ref(x, axis):
    z = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        z = z - z.max(axis=axis, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)


def _log_softmax_ref(x, axis):
    z = x.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = z - z.max(axis=axis, keepdims=True)
        return (z - np.log(np.exp(z).sum(axis=axis, keepdims=True))).astype(x.dtype)


register("softmax", ["x"], infer=_softmax_infer, reference=_softmax_ref, kind="norm",
         description="exp(x) / sum(exp(x)) along axis", attrs={"axis": REQUIRED},
         flops=lambda i, o, a: 5 * o[0].numel)
register("log_softmax", ["x"], infer=_softmax_infer, reference=_log_softmax_ref, kind="norm",
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


def _ln_ref(x, weight=None, bias=None, *, normalized_ndim, eps):
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x64 - mu) / np.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


register("layer_norm", ["x", "weight?", "bias?"], infer=_ln_infer, reference=_ln_ref,
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


def _gn_ref(x, weight=None, bias=None, *, groups, eps):
    n, c = x.shape[:2]
    xg = x.astype(np.float64).reshape(n, groups, -1)
    mu = xg.mean(axis=2, keepdims=True)
    var = ((xg - mu) ** 2).mean(axis=2, keepdims=True)
    y = ((xg - mu) / np.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y.astype(x.dtype)


register("group_norm", ["x", "weight?", "bias?"], infer=_gn_infer, reference=_gn_ref,
         kind="norm", description="normalize each group of channels, then per-channel affine",
         attrs={"groups": REQUIRED, "eps": 1e-5}, flops=lambda i, o, a: 8 * o[0].numel)
