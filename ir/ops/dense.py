"""Dense anchor ops: matmul, linear, convolution, transposed convolution, attention.

References accumulate in float64 and round once."""

from __future__ import annotations

import math

import numpy as np

from kiln.ir.errors import ShapeError
from kiln.ir.ops._rules import as_tuple, broadcast, conv_out_size, same_dtype, want_float
from kiln.ir.registry import register
from kiln.ir.types import DType, TensorType


def _f64(*arrays: np.ndarray) -> list[np.ndarray]:
    return [a.astype(np.float64) for a in arrays]


# ---- matmul ----------------------------------------------------------------------------------
def _matmul_infer(ins, attrs):
    a, b = ins
    dt = same_dtype(ins)
    want_float(a)
    if a.rank < 2 or b.rank < 2:
        raise ShapeError(f"matmul wants operands of rank >= 2, got {a.shape} and {b.shape}",
                         hint="unsqueeze vectors to matrices first")
    if a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"matmul inner dimensions differ: {a.shape} @ {b.shape}")
    batch = broadcast(a.shape[:-2], b.shape[:-2])
    return [TensorType(batch + (a.shape[-2], b.shape[-1]), dt)]


def _matmul_flops(ins, outs, attrs):
    return 2 * outs[0].numel * ins[0].shape[-1]


register("matmul", ["a", "b"], infer=_matmul_infer,
         reference=lambda a, b: np.matmul(*_f64(a, b)).astype(a.dtype),
         kind="dense", description="batched matrix product with broadcast batch dimensions",
         flops=_matmul_flops)


# ---- linear ----------------------------------------------------------------------------------
def _linear_infer(ins, attrs):
    x, w = ins[0], ins[1]
    # Half-precision storage of the weights (and bias) of a float32 layer: computed in f32.
    if not (x.dtype == DType.f32 and all(t.dtype == DType.f16 for t in ins[1:2])
            and all(t.dtype in (DType.f16, DType.f32) for t in ins[2:])):
        same_dtype(ins)
    want_float(x)
    if w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[1]:
        raise ShapeError(f"linear: input {list(x.shape)} does not fit weight {list(w.shape)}",
                         hint="the input's last dimension must equal the weight's second")
    if len(ins) == 3 and ins[2].shape != (w.shape[0],):
        raise ShapeError(f"linear: bias {list(ins[2].shape)} must be [{w.shape[0]}]")
    return [TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)]


def _linear_ref(x, w, b=None):
    y = np.matmul(*_f64(x, w.T))
    if b is not None:
        y = y + b.astype(np.float64)
    return y.astype(x.dtype)


register("linear", ["x", "weight", "bias?"], infer=_linear_infer, reference=_linear_ref,
         kind="dense", description="x @ weight.T + bias (weight is [out, in])",
         flops=lambda i, o, a: 2 * o[0].numel * i[1].shape[1])


# ---- convolution -----------------------------------------------------------------------------
_CONV_ATTRS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _conv_geometry(x: TensorType, w: TensorType, attrs):
    nd = w.rank - 2
    if nd < 1 or x.rank != nd + 2:
        raise ShapeError(f"conv: input {list(x.shape)} and weight {list(w.shape)} ranks differ",
                         hint="input is [N, C, *spatial], weight [Cout, Cin/groups, *kernel]")
    stride = as_tuple(attrs["stride"], nd, "stride")
    padding = as_tuple(attrs["padding"], nd, "padding")
    dilation = as_tuple(attrs["dilation"], nd, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ShapeError("conv: stride and dilation must be >= 1 and padding >= 0")
    return nd, stride, padding, dilation


def _conv_infer(ins, attrs):
    x, w = ins[0], ins[1]
    # Half-precision storage of the weights (and bias) of a float32 layer: computed in f32.
    if not (x.dtype == DType.f32 and all(t.dtype == DType.f16 for t in ins[1:2])
            and all(t.dtype in (DType.f16, DType.f32) for t in ins[2:])):
        same_dtype(ins)
    want_float(x)
    nd, stride, padding, dilation = _conv_geometry(x, w, attrs)
    g = attrs["groups"]
    cout, cg = w.shape[0], w.shape[1]
    if g < 1 or x.shape[1] != cg * g or cout % g:
        raise ShapeError(f"conv: {x.shape[1]} input channels, weight {list(w.shape)} and "
                         f"groups={g} do not fit")
    if len(ins) == 3 and ins[2].shape != (cout,):
        raise ShapeError(f"conv: bias {list(ins[2].shape)} must be [{cout}]")
    spatial = tuple(
        conv_out_size(x.shape[2 + i], w.shape[2 + i], stride[i], padding[i], padding[i],
                      dilation[i])
        for i in range(nd)
    )
    return [TensorType((x.shape[0], cout) + spatial, x.dtype)]


def window_slices(starts, stride, count):
    """Slices that pick ``count`` windows per spatial dim starting at ``starts``."""
    return tuple(slice(s, s + st * (c - 1) + 1, st) for s, st, c in zip(starts, stride, count))


def _conv_ref(x, w, b=None, *, stride, padding, dilation, groups):
    nd = w.ndim - 2
    stride = as_tuple(stride, nd, "stride")
    padding = as_tuple(padding, nd, "padding")
    dilation = as_tuple(dilation, nd, "dilation")
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(p, p) for p in padding])
    n, c = x.shape[:2]
    cout, cg = w.shape[:2]
    kshape = w.shape[2:]
    out_sp = tuple((xp.shape[2 + i] - dilation[i] * (kshape[i] - 1) - 1) // stride[i] + 1
                   for i in range(nd))
    cols = np.empty((n, c, math.prod(kshape)) + out_sp)
    for k, offs in enumerate(np.ndindex(*kshape)):
        starts = [o * d for o, d in zip(offs, dilation)]
        cols[:, :, k] = xp[(slice(None), slice(None)) + window_slices(starts, stride, out_sp)]
    cols = cols.reshape((n, groups, cg, math.prod(kshape)) + out_sp)
    wk = w.astype(np.float64).reshape(groups, cout // groups, cg, math.prod(kshape))
    out = np.einsum("ngck...,gock->ngo...", cols, wk, optimize=True)
    out = out.reshape((n, cout) + out_sp)
    if b is not None:
        out = out + b.astype(np.float64).reshape((1, cout) + (1,) * nd)
    return out.astype(x.dtype)


def _conv_flops(ins, outs, attrs):
    w = ins[1]
    return 2 * outs[0].numel * math.prod(w.shape[1:])


register("conv", ["x", "weight", "bias?"], infer=_conv_infer, reference=_conv_ref, kind="dense",
         description="N-d convolution (1-d and 2-d from PyTorch), symmetric padding, groups",
         attrs=dict(_CONV_ATTRS), flops=_conv_flops)


# ---- transposed convolution ------------------------------------------------------------------
def _convt_infer(ins, attrs):
    x, w = ins[0], ins[1]
    # Half-precision storage of the weights (and bias) of a float32 layer: computed in f32.
    if not (x.dtype == DType.f32 and all(t.dtype == DType.f16 for t in ins[1:2])
            and all(t.dtype in (DType.f16, DType.f32) for t in ins[2:])):
        same_dtype(ins)
    want_float(x)
    nd, stride, padding, dilation = _conv_geometry(x, w, attrs)
    out_pad = as_tuple(attrs["output_padding"], nd, "output_padding")
    g = attrs["groups"]
    if g < 1 or x.shape[1] != w.shape[0] or w.shape[0] % g:
        raise ShapeError(f"conv_transpose: {x.shape[1]} input channels do not fit weight "
                         f"{list(w.shape)} with groups={g}")
    cout = w.shape[1] * g
    if len(ins) == 3 and ins[2].shape != (cout,):
        raise ShapeError(f"conv_transpose: bias {list(ins[2].shape)} must be [{cout}]")
    spatial = []
    for i in range(nd):
        if out_pad[i] >= max(stride[i], dilation[i]):
            raise ShapeError("conv_transpose: output_padding must be smaller than stride or "
                             "dilation")
        size = ((x.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                + dilation[i] * (w.shape[2 + i] - 1) + out_pad[i] + 1)
        if size <= 0:
            raise ShapeError("conv_transpose: output size would be empty")
        spatial.append(size)
    return [TensorType((x.shape[0], cout) + tuple(spatial), x.dtype)]


def _convt_ref(x, w, b=None, *, stride, padding, output_padding, dilation, groups):
    nd = w.ndim - 2
    stride = as_tuple(stride, nd, "stride")
    padding = as_tuple(padding, nd, "padding")
    dilation = as_tuple(dilation, nd, "dilation")
    out_pad = as_tuple(output_padding, nd, "output_padding")
    n, cin = x.shape[:2]
    cig, cog = cin // groups, w.shape[1]
    kshape = w.shape[2:]
    in_sp = x.shape[2:]
    full = tuple((in_sp[i] - 1) * stride[i] + dilation[i] * (kshape[i] - 1) + 1 + out_pad[i]
                 for i in range(nd))
    buf = np.zeros((n, groups, cog) + full)
    xg = x.astype(np.float64).reshape((n, groups, cig) + in_sp)
    wg = w.astype(np.float64).reshape((groups, cig, cog) + kshape)
    for offs in np.ndindex(*kshape):
        contrib = np.einsum("ngc...,gco->ngo...", xg, wg[(slice(None),) * 3 + offs], optimize=True)
        starts = [o * d for o, d in zip(offs, dilation)]
        buf[(slice(None),) * 3 + window_slices(starts, stride, in_sp)] += contrib
    crop = tuple(slice(padding[i], full[i] - padding[i]) for i in range(nd))
    out = buf[(slice(None),) * 3 + crop].reshape((n, groups * cog) + tuple(
        full[i] - 2 * padding[i] for i in range(nd)))
    if b is not None:
        out = out + b.astype(np.float64).reshape((1, -1) + (1,) * nd)
    return out.astype(x.dtype)


register("conv_transpose", ["x", "weight", "bias?"], infer=_convt_infer, reference=_convt_ref,
         kind="dense", description="N-d transposed convolution (weight is [Cin, Cout/groups, *k])",
         attrs={**_CONV_ATTRS, "output_padding": 0},
         flops=lambda i, o, a: 2 * i[0].numel * math.prod(i[1].shape[1:]))


# ---- attention -------------------------------------------------------------------------------
def _attention_infer(ins, attrs):
    q, k, v = ins[:3]
    same_dtype(ins[:3])
    want_float(q)
    if min(q.rank, k.rank, v.rank) < 2 or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ShapeError(f"attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} "
                         "do not fit", hint="q [..., L, E], k [..., S, E], v [..., S, Ev]")
    batch = broadcast(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    if len(ins) == 4:
        m = ins[3]
        if m.dtype.value != "bool" and m.dtype != q.dtype:
            raise ShapeError(f"attention mask must be bool or {q.dtype}, got {m.dtype}")
        scores = batch + (q.shape[-2], k.shape[-2])
        if broadcast(m.shape, scores) != scores:
            # A mask with more (or longer) batch dims would silently grow the output.
            raise ShapeError(f"attention mask {list(m.shape)} does not broadcast to the "
                             f"scores' shape {list(scores)}")
    return [TensorType(batch + (q.shape[-2], v.shape[-1]), q.dtype)]


def _attention_ref(q, k, v, mask=None, *, causal, scale):
    q64, k64, v64 = _f64(q, k, v)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.matmul(q64, np.swapaxes(k64, -1, -2)) * s
    L, S = q.shape[-2], k.shape[-2]
    if causal:
        scores = np.where(np.tril(np.ones((L, S), dtype=bool)), scores, -np.inf)
    if mask is not None:
        if mask.dtype == bool:
            scores = np.where(mask, scores, -np.inf)
        else:
            scores = scores + mask.astype(np.float64)
    # A row that attends to nothing gives zeros, as PyTorch's scaled_dot_product_attention does.
    top = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - np.where(np.isneginf(top), 0.0, top))
    total = p.sum(axis=-1, keepdims=True)
    p = p / np.where(total == 0.0, 1.0, total)
    return np.matmul(p, v64).astype(q.dtype)


def _attention_flops(ins, outs, attrs):
    q, k, v = ins[:3]
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    batch = outs[0].numel // (L * Ev)
    return batch * (2 * L * S * E + 2 * L * S * Ev + 5 * L * S)


register("attention", ["q", "k", "v", "mask?"], infer=_attention_infer,
         reference=_attention_ref, kind="dense",
         description="softmax(q @ k^T * scale + mask) @ v; bool mask True = attend; causal "
                     "masks the upper triangle; a fully masked row gives zeros",
         attrs={"causal": False, "scale": None}, flops=_attention_flops)
