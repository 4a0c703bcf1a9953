"""PyTorch's products, determinant, affine grids, grid sampling and scatters as kiln IR:
prod, cumprod, linalg.det, F.affine_grid, F.grid_sample (nearest, bilinear), and scatter /
scatter_add / scatter_reduce (with their in-place forms), through the decompositions the ONNX
importer uses too
(``kiln.frontend.handlers_shared``).

Importing this module registers the handlers in ``kiln.frontend.handlers``' tables (that module
imports it at its end). The scatters take indices computed at run time; their cost is
index elements x the size of the scattered axis comparisons, bounded by
``SCATTER_COMPARE_LIMIT``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.frontend.handlers import HANDLERS, method, on
from kiln.frontend.handlers_shared import (
    ImporterOps,
    affine_grid,
    cumulative_product,
    determinant,
    grid_sample,
    product_along,
    reshape,
    scatter_along_axis,
    scatter_compare_count,
    take_slice,
)
from kiln.frontend.importer import Importer, Traced, kiln_dtype
from kiln.ir import DType

aten = torch.ops.aten

SCATTER_COMPARE_LIMIT = 1 << 24


def _axis(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _promoted(imp: Importer, input: Any, real: Any, dtype: Any) -> str:
    """``input`` as a kiln value of the result's dtype (PyTorch sums and multiplies bools
    and integers in int64, or in ``dtype`` when given)."""
    want = kiln_dtype(real.dtype) if isinstance(real, torch.Tensor) else None
    if dtype is not None:
        want = kiln_dtype(dtype)
    return imp.value(input, want)


# ---- products ----------------------------------------------------------------------------------
@on(torch.prod, aten.prod, method("prod"))
def _prod(imp, real, input, dim=None, keepdim=False, *, dtype=None):
    b = ImporterOps(imp)
    x = _promoted(imp, input, real, dtype)
    shape = b.type_of(x).shape
    if dim is None:
        if not shape:
            return x
        x, dims = reshape(b, x, [math.prod(shape)]), [0]
        out: list[int] = []
    else:
        dims = [_axis(dim, len(shape))]
        out = [1 if k in dims else n for k, n in enumerate(shape)] if keepdim else [
            n for k, n in enumerate(shape) if k not in dims]
    if any(b.type_of(x).shape[d] == 0 for d in dims):  # the product of nothing is 1
        return b.op("expand", [imp.scalar(1, b.type_of(x).dtype)], {"shape": tuple(out)})
    for d in dims:
        x = product_along(b, x, d)
    return reshape(b, x, out)


@on(torch.cumprod, aten.cumprod, method("cumprod"))
def _cumprod(imp, real, input, dim, *, dtype=None):
    b = ImporterOps(imp)
    x = _promoted(imp, input, real, dtype)
    if not b.type_of(x).shape:
        return x
    return cumulative_product(b, x, _axis(dim, b.type_of(x).rank))


# ---- determinant -------------------------------------------------------------------------------
_DET_MAX = 64


@on(torch.linalg.det, torch.det, aten.linalg_det, aten.det, method("det"))
def _det(imp, real, A, *, out=None):
    x = imp.value(A)
    t = imp.type_of(x)
    if t.rank < 2 or t.shape[-1] != t.shape[-2] or not t.dtype.is_float:
        raise imp.error(f"det needs float square matrices [..., n, n], got {t.dtype.value} "
                        f"{list(t.shape)}")
    if t.shape[-1] > _DET_MAX:
        raise imp.error(f"det of {t.shape[-1]}x{t.shape[-1]} matrices: kiln unrolls the "
                        f"elimination up to {_DET_MAX}x{_DET_MAX}")
    return determinant(ImporterOps(imp), x)


# ---- geometry ----------------------------------------------------------------------------------
@on(torch.nn.functional.affine_grid, aten.affine_grid_generator)
def _affine_grid(imp, real, theta, size, align_corners=None):
    size = [int(s) for s in size]
    v = imp.value(theta)
    t = imp.type_of(v)
    nd = len(size) - 2
    if nd not in (2, 3) or t.shape != (size[0], nd, nd + 1) or not t.dtype.is_float:
        raise imp.error(f"affine_grid of theta {list(t.shape)} for size {size}",
                        hint="theta is [N, 2, 3] for a 4-d size, [N, 3, 4] for a 5-d one")
    return affine_grid(ImporterOps(imp), v, size, bool(align_corners))


@on(torch.nn.functional.grid_sample, aten.grid_sampler, aten.grid_sampler_2d,
    aten.grid_sampler_3d)
def _grid_sample(imp, real, input, grid, mode="bilinear", padding_mode="zeros",
                 align_corners=None):
    if not isinstance(mode, str):  # aten.grid_sampler*: enums (0 bilinear, 1 nearest, ...)
        mode = {0: "bilinear", 1: "nearest", 2: "bicubic"}[mode]
        padding_mode = {0: "zeros", 1: "border", 2: "reflection"}[padding_mode]
    x, g = imp.value(input), imp.value(grid)
    t, gt = imp.type_of(x), imp.type_of(g)
    if mode not in ("bilinear", "nearest") or padding_mode not in ("zeros", "border",
                                                                    "reflection"):
        raise imp.error(f"grid_sample mode={mode!r} padding_mode={padding_mode!r} is not "
                        "supported", hint="kiln samples with mode 'bilinear' or 'nearest'")
    if t.rank not in (4, 5) or gt.rank != t.rank or gt.shape[-1] != t.rank - 2 or (
            not t.dtype.is_float or gt.dtype != t.dtype):
        raise imp.error(f"grid_sample of {list(t.shape)} at a grid {list(gt.shape)}")
    return grid_sample(ImporterOps(imp), x, g, "linear" if mode == "bilinear" else mode,
                       padding_mode, bool(align_corners))


# ---- scatters ----------------------------------------------------------------------------------
_REDUCE = {None: "none", "add": "add", "multiply": "mul", "sum": "add", "prod": "mul",
           "amax": "max", "amin": "min"}


def _scatter_value(imp: Importer, input: Any, dim: int, index: Any, src: Any,
                   reduce: str | None) -> str:
    """``input`` with ``src`` (a tensor, or a number for every index) scattered along ``dim``
    at ``index`` (PyTorch: index no larger than src, nor than input off ``dim``)."""
    b = ImporterOps(imp)
    data = imp.value(input)
    t = b.type_of(data)
    idx = imp.value(index, DType.i64) if index.dtype not in (torch.int32, torch.int64) else \
        imp.value(index)
    it = b.type_of(idx)
    axis = _axis(dim, t.rank)
    if reduce not in _REDUCE:
        raise imp.error(f"scatter reduce={reduce!r} is not supported",
                        hint="kiln scatters with reduce add / multiply (scatter) and sum / prod /"
                             " amax / amin (scatter_reduce, include_self=True)")
    if it.rank != t.rank or any(i > n for k, (i, n) in enumerate(zip(it.shape, t.shape))
                                if k != axis):
        raise imp.error(f"scatter index {list(it.shape)} does not fit input {list(t.shape)}")
    if isinstance(src, (Traced, torch.Tensor)):
        updates = imp.value(src, t.dtype)
        for k, n in enumerate(it.shape):  # only the index's corner of src is used
            if b.type_of(updates).shape[k] != n:
                updates = take_slice(b, updates, k, 0, n)
    else:
        updates = b.op("expand", [imp.scalar(src, t.dtype)], {"shape": tuple(it.shape)})
    count = scatter_compare_count(b, idx, data, axis)
    if count > SCATTER_COMPARE_LIMIT:
        raise imp.error(f"scatter compares {count} index and position pairs (more than "
                        f"{SCATTER_COMPARE_LIMIT})",
                        hint="scatter fewer elements at once, or along a shorter axis")
    return scatter_along_axis(b, data, idx, updates, axis, _REDUCE[reduce])


@on(torch.scatter, aten.scatter, method("scatter"))
def _scatter(imp, real, input, dim, index, src=None, value=None, *, reduce=None):
    return _scatter_value(imp, input, dim, index, value if src is None else src, reduce)


@on(torch.scatter_add, aten.scatter_add, method("scatter_add"))
def _scatter_add(imp, real, input, dim, index, src):
    return _scatter_value(imp, input, dim, index, src, "add")


@on(torch.scatter_reduce, aten.scatter_reduce, method("scatter_reduce"))
def _scatter_reduce(imp, real, input, dim, index, src, reduce, *, include_self=True):
    if not include_self or reduce == "mean":
        raise imp.error(f"scatter_reduce with reduce={reduce!r}, include_self={include_self} "
                        "is not supported",
                        hint="kiln reduces sum / prod / amax / amin with include_self=True")
    return _scatter_value(imp, input, dim, index, src, reduce)


def _inplace(handler):
    """``x.scatter_(...)``: the handler's value, which ``x`` holds from here on."""

    def inplace(imp, real, x, *args, **kwargs):
        out = handler(imp, real, x, *args, **kwargs)
        if isinstance(x, Traced):
            x.value = out
        return out

    return inplace


for _name, _handler in (("scatter", _scatter), ("scatter_add", _scatter_add),
                        ("scatter_reduce", _scatter_reduce)):
    HANDLERS[method(_name + "_")] = _inplace(_handler)
    if hasattr(aten, _name + "_"):
        HANDLERS[getattr(aten, _name + "_")] = _inplace(_handler)
