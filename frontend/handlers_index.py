"""PyTorch's indexing and data-movement operations as kiln IR: gather, index_select,
take_along_dim, advanced indexing, argmax / argmin, max / min along a dim, topk, sort, cumsum,
roll, interpolate / Upsample, and boolean and / or (which combine index-built attention masks).

Importing this module registers the handlers in ``kiln.frontend.handlers``' tables (that module
imports it at its end). Negative indices follow PyTorch: advanced indexing and take_along_dim
count them from the end; gather and index_select reject them (a KilnError at run time, as
PyTorch raises).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.frontend.handlers import method, on, on_module, permute, reshape_to, slice_axis
from kiln.frontend.importer import Importer, Traced, kiln_dtype
from kiln.ir import DType

aten = torch.ops.aten


def _axis(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _indices(imp: Importer, idx: Any) -> str:
    """An integer index operand (tensor, traced value or list of ints) as a kiln value."""
    if isinstance(idx, (list, tuple)) and not any(isinstance(i, Traced) for i in idx):
        idx = torch.tensor(idx, dtype=torch.int64)
    if not isinstance(idx, (Traced, torch.Tensor)):
        raise imp.error(f"index of type {type(idx).__name__} is not supported")
    if idx.dtype in (torch.bool, torch.uint8):
        raise imp.error("indexing with a boolean mask makes a shape that depends on the data",
                        hint="use torch.where(mask, x, other) to keep the shape")
    if idx.dtype not in (torch.int32, torch.int64):
        return imp.value(idx, DType.i64)
    return imp.value(idx)


# ---- gathers ---------------------------------------------------------------------------------
@on(torch.gather, aten.gather, method("gather"))
def _gather(imp, real, input, dim, index, *, sparse_grad=False):
    d = _axis(dim, input.ndim)
    return imp.op("gather_elements", [imp.value(input), _indices(imp, index)],
                  {"axis": d, "wrap": False})


@on(torch.take_along_dim, aten.take_along_dim, method("take_along_dim"))
def _take_along_dim(imp, real, input, indices, dim=None):
    x, idx = imp.value(input), _indices(imp, indices)
    if dim is None:
        x = reshape_to(imp, x, (math.prod(input.shape),))
        idx = reshape_to(imp, idx, (math.prod(indices.shape),))
        # Without dim, PyTorch gathers from the flattened tensor and rejects negative indices.
        return imp.op("gather_elements", [x, idx], {"axis": 0, "wrap": False})
    d = _axis(dim, input.ndim)
    # Both operands broadcast against each other except along dim.
    xs, js = list(input.shape), list(indices.shape)
    xe = [real.shape[k] if k != d else xs[k] for k in range(len(xs))]
    je = [real.shape[k] if k != d else js[k] for k in range(len(js))]
    if xe != xs:
        x = imp.op("expand", [x], {"shape": tuple(xe)})
    if je != js:
        idx = imp.op("expand", [idx], {"shape": tuple(je)})
    return imp.op("gather_elements", [x, idx], {"axis": d, "wrap": True})


@on(torch.index_select, aten.index_select, method("index_select"))
def _index_select(imp, real, input, dim, index):
    d = _axis(dim, input.ndim)
    y = imp.op("take", [imp.value(input), _indices(imp, index)], {"axis": d, "wrap": False})
    return reshape_to(imp, y, real.shape)


def advanced_index(imp: Importer, real, x: Any, indices: Sequence[Any]) -> str:
    """``x[indices]`` where ``indices`` has one entry per leading dim: None (the whole dim) or
    an integer index tensor; PyTorch's placement of the indexed dims (where the tensors stand
    when they are adjacent, in front otherwise)."""
    at = [k for k, i in enumerate(indices) if i is not None]
    inds = [_indices(imp, indices[k]) for k in at]
    v = imp.value(x)
    if at == list(range(at[0], at[0] + len(at))):
        y = imp.op("take", [v, *inds], {"axis": at[0], "wrap": True})
    else:
        rest = [k for k in range(x.ndim) if k not in at]
        y = imp.op("take", [permute(imp, v, at + rest), *inds], {"axis": 0, "wrap": True})
    return reshape_to(imp, y, real.shape)


@on(aten.index, aten._unsafe_index)
def _aten_index(imp, real, input, indices):
    return advanced_index(imp, real, input, list(indices))


def tensor_getitem(imp: Importer, real, obj: Traced, idx: tuple) -> str:
    """``obj[idx]`` where ``idx`` holds index tensors (or lists of ints) beside whole-dim
    slices and an Ellipsis."""
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (obj.ndim - len(idx) + 1) + idx[e + 1:]
    entries = []
    for i in idx:
        if isinstance(i, slice) and i == slice(None):
            entries.append(None)
        elif isinstance(i, (Traced, torch.Tensor, list)):
            entries.append(i)
        else:
            raise imp.error("advanced indexing that mixes index tensors with integers, "
                            "partial slices or None is not supported",
                            hint="index with the tensors and whole-dim slices only, then "
                                 "slice the result")
    return advanced_index(imp, real, obj, entries)


# ---- arg-reductions, max / min along a dim, topk, sort -----------------------------------------
def _arg(op: str):
    def handler(imp, real, input, dim=None, keepdim=False):
        axis = None if dim is None else _axis(dim, input.ndim)
        return imp.op(op, [imp.value(input)], {"axis": axis, "keepdim": bool(keepdim)})

    return handler


on(torch.argmax, aten.argmax, method("argmax"))(_arg("argmax"))
on(torch.argmin, aten.argmin, method("argmin"))(_arg("argmin"))


def max_min_dim(imp: Importer, input: Any, dim: int, keepdim: bool, is_max: bool):
    """(values, indices) of torch.max / torch.min along ``dim``."""
    d = _axis(dim, input.ndim)
    x = imp.value(input)
    values = imp.op("reduce_max" if is_max else "reduce_min", [x],
                    {"axes": (d,), "keepdim": bool(keepdim)})
    at = imp.op("argmax" if is_max else "argmin", [x], {"axis": d, "keepdim": bool(keepdim)})
    return values, at


def _sorted(imp: Importer, input: Any, k: int, dim: int, largest: bool):
    d = _axis(dim, input.ndim)
    x = imp.value(input)
    if input.ndim == 0:  # a scalar is its own sort: index 0
        x = reshape_to(imp, x, (1,))
    at = imp.op("topk", [x], {"k": int(k), "axis": d, "largest": bool(largest)})
    values = imp.op("gather_elements", [x, at], {"axis": d, "wrap": False})
    shape = tuple(input.shape[:d]) + (int(k),) * (input.ndim > 0) + tuple(input.shape[d + 1:])
    return reshape_to(imp, values, shape), reshape_to(imp, at, shape)


@on(torch.topk, aten.topk, method("topk"))
def _topk(imp, real, input, k, dim=-1, largest=True, sorted=True):
    # sorted=False leaves the order to the implementation; kiln's is sorted.
    return _sorted(imp, input, k, dim, largest)


@on(torch.sort, aten.sort, method("sort"))
def _sort(imp, real, input, dim=-1, descending=False, stable=None):
    n = input.shape[_axis(dim, input.ndim)] if input.ndim else 1
    # Ties keep their index order, which is what stable=True promises.
    return _sorted(imp, input, n, dim, descending)


@on(torch.argsort, aten.argsort, method("argsort"))
def _argsort(imp, real, input, dim=-1, descending=False, stable=False):
    return _sort(imp, real, input, dim, descending)[1]


# ---- cumsum and roll ---------------------------------------------------------------------------
@on(aten.type_as)
def _type_as(imp, real, input, other):
    # RoBERTa's position ids: cumsum(mask).type_as(mask) reaches torch.export as this packet.
    return imp.value(input, kiln_dtype(real.dtype))


@on(torch.cumsum, aten.cumsum, method("cumsum"))
def _cumsum(imp, real, input, dim, *, dtype=None):
    x = imp.value(input, kiln_dtype(real.dtype))
    return imp.op("cumsum", [x], {"axis": _axis(dim, input.ndim)})


@on(torch.roll, aten.roll, method("roll"))
def _roll(imp, real, input, shifts, dims=None):
    shifts = (shifts,) if isinstance(shifts, int) else tuple(shifts)
    v = imp.value(input)
    if dims is None or (not isinstance(dims, int) and len(dims) == 0):
        if len(shifts) != 1:
            raise imp.error("roll without dims takes one shift")
        flat = _roll_axis(imp, reshape_to(imp, v, (math.prod(input.shape),)), 0, shifts[0])
        return reshape_to(imp, flat, real.shape)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if len(dims) != len(shifts):
        raise imp.error(f"roll got {len(shifts)} shifts for {len(dims)} dims")
    for s, d in zip(shifts, dims):
        v = _roll_axis(imp, v, _axis(d, input.ndim), s)
    return v


def _roll_axis(imp: Importer, v: str, axis: int, shift: int) -> str:
    """``v`` rolled by ``shift`` along ``axis``: the last ``shift`` entries move to the front
    (two slices and a concat, all index arithmetic that fuses into the consumer)."""
    n = imp.type_of(v).shape[axis] if imp.type_of(v).rank else 1
    s = int(shift) % n if n else 0
    if s == 0:
        return v
    tail, head = slice_axis(imp, v, axis, n - s, n), slice_axis(imp, v, axis, 0, n - s)
    return imp.op("concat", [tail, head], {"axis": axis})


# ---- interpolate / Upsample --------------------------------------------------------------------
_MODES = {"nearest": ("nearest", "asymmetric", "floor"),
          "nearest-exact": ("nearest", "half_pixel", "round_prefer_ceil"),
          "linear": ("linear", None, "floor"), "bilinear": ("linear", None, "floor"),
          "trilinear": ("linear", None, "floor"), "bicubic": ("cubic", None, "floor")}


def interpolate(imp: Importer, real, input: Any, scale_factor: Any, mode: str,
                align_corners: bool | None, recompute_scale_factor: bool | None = None,
                antialias: bool = False) -> str:
    """F.interpolate as one kiln ``resize``; output sizes come from PyTorch's result."""
    if mode not in _MODES:
        raise imp.error(f"interpolate mode {mode!r} is not supported",
                        hint=f"use one of {sorted(_MODES)}")
    if antialias:
        raise imp.error("interpolate with antialias=True is not supported",
                        hint="use antialias=False")
    kind, coordinate, nearest = _MODES[mode]
    if coordinate is None:
        coordinate = "align_corners" if align_corners else "half_pixel"
    nd = input.ndim - 2
    sizes = tuple(int(s) for s in real.shape[2:])
    scales = None
    if scale_factor is not None and not recompute_scale_factor:
        sf = (scale_factor,) * nd if isinstance(scale_factor, (int, float)) else scale_factor
        scales = tuple(float(s) for s in sf)
    return imp.op("resize", [imp.value(input)],
                  {"sizes": sizes, "scales": scales, "mode": kind, "coordinate": coordinate,
                   "nearest": nearest})


@on(F.interpolate, F.upsample)
def _interpolate(imp, real, input, size=None, scale_factor=None, mode="nearest",
                 align_corners=None, recompute_scale_factor=None, antialias=False):
    return interpolate(imp, real, input, scale_factor, mode, align_corners,
                       recompute_scale_factor, antialias)


@on_module(nn.Upsample)
def _upsample_mod(imp, mod, real, x):
    return interpolate(imp, real, x, mod.scale_factor, mod.mode, mod.align_corners,
                       mod.recompute_scale_factor)


def _aten_upsample(mode: str, has_align: bool):
    def handler(imp, real, input, output_size=None, *args, **kwargs):
        args = list(args)
        align = bool(args.pop(0) if has_align and args else kwargs.get("align_corners", False))
        scales = args[0] if args else kwargs.get("scale_factors", kwargs.get("scales"))
        # The .vec overloads take a list of factors; the others one optional float per dim.
        if scales is not None and not isinstance(scales, (list, tuple)):
            scales = [scales, *args[1:]]
        if scales is not None and any(s is None for s in scales):
            scales = None
        return interpolate(imp, real, input, scales, mode, align)

    return handler


on(aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d)(
    _aten_upsample("nearest", False))
on(aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d,
   aten._upsample_nearest_exact3d)(_aten_upsample("nearest-exact", False))
on(aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_trilinear3d)(
    _aten_upsample("bilinear", True))
on(aten.upsample_bicubic2d)(_aten_upsample("bicubic", True))


# ---- boolean and / or (attention masks combine index-built masks this way) --------------------
def _logical(is_and: bool, bitwise: bool):
    def handler(imp, real, input, other):
        if bitwise and real.dtype != torch.bool:
            raise imp.error("bitwise and/or of integer tensors is not supported",
                            hint="use boolean tensors")
        a, b = imp.value(input, DType.bool), imp.value(other, DType.bool)
        const = imp.value(not is_and, DType.bool)
        # a and b = where(a, b, False); a or b = where(a, True, b).
        return imp.op("where", [a, b, const] if is_and else [a, const, b])

    return handler


on(operator.and_, operator.iand, aten.__and__, aten.bitwise_and, torch.bitwise_and,
   method("__and__"), method("bitwise_and"))(_logical(True, True))
on(operator.or_, operator.ior, aten.__or__, aten.bitwise_or, torch.bitwise_or,
   method("__or__"), method("bitwise_or"))(_logical(False, True))
on(torch.logical_and, aten.logical_and, method("logical_and"))(_logical(True, False))
on(torch.logical_or, aten.logical_or, method("logical_or"))(_logical(False, False))
