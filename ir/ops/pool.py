"""Pooling: max, average, adaptive average, over any number of spatial dims."""

from __future__ import annotations

import math

import numpy as np

from kiln.ir.errors import ShapeError
from kiln.ir.ops._rules import as_tuple, conv_out_size, want_float
from kiln.ir.registry import REQUIRED, register
from kiln.ir.types import TensorType


def _pool_geometry(x: TensorType, attrs):
    nd = len(attrs["kernel"])
    if x.rank != nd + 2:
        raise ShapeError(f"{nd}-d pooling wants an input of rank {nd + 2}, got {list(x.shape)}")
    kernel = as_tuple(attrs["kernel"], nd, "kernel")
    stride = as_tuple(attrs["stride"] if attrs["stride"] is not None else kernel, nd, "stride")
    padding = as_tuple(attrs["padding"], nd, "padding")
    dilation = as_tuple(attrs.get("dilation", 1), nd, "dilation")
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ShapeError("pooling: kernel and stride must be >= 1, padding >= 0")
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ShapeError("pooling: padding must be at most half the kernel size")
    out = tuple(
        conv_out_size(x.shape[2 + i], kernel[i], stride[i], padding[i], padding[i], dilation[i],
                      attrs["ceil_mode"])
        for i in range(nd)
    )
    return nd, kernel, stride, padding, dilation, out


def _pool_infer(ins, attrs):
    want_float(ins[0])
    *_, out = _pool_geometry(ins[0], attrs)
    return [TensorType(ins[0].shape[:2] + out, ins[0].dtype)]


def _windows(xp, kernel, stride, dilation, out):
    """Yield the strided view of ``xp`` for each kernel offset."""
    for offs in np.ndindex(*kernel):
        idx = tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                    for o, d, s, n in zip(offs, dilation, stride, out))
        yield xp[(slice(None), slice(None)) + idx]


def _padded(x, padding, kernel, stride, dilation, out, fill):
    # Pad left by `padding`, right by whatever the last (ceil-mode) window needs.
    pads = [(0, 0), (0, 0)]
    for i, p in enumerate(padding):
        need = (out[i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1
        pads.append((p, max(need - x.shape[2 + i] - p, 0)))
    return np.pad(x, pads, constant_values=fill), pads


def _max_pool_ref(x, *, kernel, stride, padding, dilation, ceil_mode):
    attrs = dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                 ceil_mode=ceil_mode)
    nd, kernel, stride, padding, dilation, out = _pool_geometry(TensorType.of(x), attrs)
    xp, _ = _padded(x, padding, kernel, stride, dilation, out, -np.inf)
    result = None
    for w in _windows(xp, kernel, stride, dilation, out):
        # np.fmax would drop NaN; PyTorch's max pool propagates it.
        result = w.copy() if result is None else np.where(np.isnan(w) | (w > result), w, result)
    return result.astype(x.dtype)


register("max_pool", ["x"], infer=_pool_infer, reference=_max_pool_ref, kind="pool",
         description="sliding-window maximum (padding counts as -inf)",
         attrs={"kernel": REQUIRED, "stride": None, "padding": 0, "dilation": 1,
                "ceil_mode": False},
         flops=lambda i, o, a: o[0].numel * math.prod(a["kernel"]))


def _avg_pool_ref(x, *, kernel, stride, padding, ceil_mode, count_include_pad):
    attrs = dict(kernel=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode)
    nd, kernel, stride, padding, dilation, out = _pool_geometry(TensorType.of(x), attrs)
    xp, pads = _padded(x.astype(np.float64), padding, kernel, stride, dilation, out, 0.0)
    # The divisor counts the window's cells inside the input (and inside the symmetric
    # padding when count_include_pad), never the extra cells a ceil-mode window hangs over.
    ones = np.zeros((1, 1) + xp.shape[2:])
    inner = []
    for i, p in enumerate(padding):
        lo = 0 if count_include_pad else p
        hi = p + x.shape[2 + i] + (p if count_include_pad else 0)
        inner.append(slice(lo, hi))
    inner = tuple(inner)
    ones[(0, 0) + inner] = 1.0
    total = sum(_windows(xp, kernel, stride, dilation, out))
    count = sum(_windows(ones, kernel, stride, dilation, out))
    return (total / count).astype(x.dtype)


register("avg_pool", ["x"], infer=_pool_infer, reference=_avg_pool_ref, kind="pool",
         description="sliding-window mean",
         attrs={"kernel": REQUIRED, "stride": None, "padding": 0, "ceil_mode": False,
                "count_include_pad": True},
         flops=lambda i, o, a: o[0].numel * math.prod(a["kernel"]))


def _adaptive_infer(ins, attrs):
    x = ins[0]
    want_float(x)
    size = tuple(attrs["output_size"])
    if x.rank != len(size) + 2 or min(size, default=1) < 1:
        raise ShapeError(f"adaptive pooling to {list(size)} does not fit input {list(x.shape)}")
    return [TensorType(x.shape[:2] + size, x.dtype)]


def adaptive_bounds(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows: [floor(i*n/m), ceil((i+1)*n/m))."""
    return [((i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)) for i in range(n_out)]


def _adaptive_ref(x, *, output_size):
    nd = len(output_size)
    out = np.empty(x.shape[:2] + tuple(output_size))
    bounds = [adaptive_bounds(x.shape[2 + i], output_size[i]) for i in range(nd)]
    x64 = x.astype(np.float64)
    for idx in np.ndindex(*output_size):
        win = tuple(slice(*bounds[i][j]) for i, j in enumerate(idx))
        out[(slice(None), slice(None)) + idx] = x64[(slice(None), slice(None)) + win].mean(
            axis=tuple(range(2, 2 + nd)))
    return out.astype(x.dtype)


register("adaptive_avg_pool", ["x"], infer=_adaptive_infer, reference=_adaptive_ref,
         kind="pool", description="mean over PyTorch's adaptive windows to a fixed output size",
         attrs={"output_size": REQUIRED}, flops=lambda i, o, a: i[0].numel)
