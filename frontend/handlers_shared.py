"""Decompositions both frontends use (the PyTorch handlers and the ONNX importer): products
along an axis and running products, a scatter whose indices are known only at run time,
affine grids and grid sampling, and the determinant. They import neither torch nor onnx.

Each function builds kiln ops through ``b``, anything with ``op(name, inputs, attrs)``,
``type_of(value)`` and ``constant(array, hint)``: the ONNX ``ImportContext`` is one, and
``ImporterOps`` wraps a PyTorch ``Importer`` as one. Callers check operands and raise their
own errors first; these functions assume well-formed operands.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from kiln.ir import DType


class Builder(Protocol):
    def op(self, op: str, inputs: Sequence[str], attrs: dict | None = None) -> str: ...

    def type_of(self, value: str) -> Any: ...

    def constant(self, array: np.ndarray, hint: str | None = None) -> str: ...


class ImporterOps:
    """A PyTorch ``Importer`` seen as a ``Builder``."""

    def __init__(self, imp: Any) -> None:
        self.imp = imp

    def op(self, op: str, inputs: Sequence[str], attrs: dict | None = None) -> str:
        return self.imp.op(op, inputs, attrs)

    def type_of(self, value: str) -> Any:
        return self.imp.type_of(value)

    def constant(self, array: np.ndarray, hint: str | None = None) -> str:
        return self.imp.b.constant(np.asarray(array), hint or "const")


def scalar(b: Builder, value: Any, dtype: DType, hint: str = "scalar") -> str:
    """A rank-0 constant of ``dtype``."""
    return b.constant(np.asarray(value).astype(dtype.numpy), hint)


def reshape(b: Builder, x: str, shape: Sequence[int]) -> str:
    """``x`` reshaped (no node when it has the shape already)."""
    shape = tuple(int(d) for d in shape)
    return x if b.type_of(x).shape == shape else b.op("reshape", [x], {"shape": shape})


def take_slice(b: Builder, x: str, axis: int, start: int, end: int) -> str:
    return b.op("slice", [x], {"axis": axis, "start": start, "end": end})


# ---- products ----------------------------------------------------------------------------------
def product_along(b: Builder, x: str, axis: int) -> str:
    """The product along ``axis`` (kept, size 1; an axis of size 0 stays 0) by halving: the
    first half times the second, an odd element carried, so log2(n) elementwise steps that
    fuse; exact for integers (wrapping as their type does)."""
    n = b.type_of(x).shape[axis]
    while n > 1:
        half = n // 2
        y = b.op("mul", [take_slice(b, x, axis, 0, half), take_slice(b, x, axis, half, 2 * half)])
        if n % 2:
            y = b.op("concat", [y, take_slice(b, x, axis, 2 * half, n)], {"axis": axis})
        x, n = y, half + n % 2
    return x


def cumulative_product(b: Builder, x: str, axis: int, exclusive: bool = False,
                       reverse: bool = False) -> str:
    """The running product along ``axis`` as a Hillis-Steele scan: log2(n) steps, each
    multiplying by the product so far shifted 2^k places with ones shifted in (a pad that
    crops what leaves the axis); ``exclusive`` shifts once more, ``reverse`` runs from the
    end (ONNX CumProd's attributes)."""
    t = b.type_of(x)

    def shifted(v: str, k: int) -> str:
        pads = [0] * (2 * t.rank)
        pads[2 * axis], pads[2 * axis + 1] = (-k, k) if reverse else (k, -k)
        return b.op("pad", [v], {"pads": tuple(pads), "value": 1.0})

    n = t.shape[axis]
    k = 1
    while k < n:
        x = b.op("mul", [x, shifted(x, k)])
        k *= 2
    return shifted(x, 1) if exclusive and n else x


# ---- scatter with run-time indices -------------------------------------------------------------
COMBINE = {"add": "add", "mul": "mul", "max": "maximum", "min": "minimum"}


def wrap_indices(b: Builder, idx: str, size: int) -> str:
    """Run-time indices with the negative ones counted from the end."""
    dt = b.type_of(idx).dtype
    negative = b.op("lt", [idx, scalar(b, 0, dt, "zero")])
    return b.op("where", [negative, b.op("add", [idx, scalar(b, size, dt, "size")]), idx])


def scatter_by_compare(b: Builder, data: str, updates: str, hit: str, reduction: str) -> str:
    """``data`` [P, *R] with the updates [M, *R] that ``hit`` [M, P, *R] (bool: update m
    lands on row p) set into, or combined (``reduction`` add, mul, max, min) with, its
    rows. Without a reduction the last update to hit a row stays; an index out of range hits
    no row. The work is M * P * prod(R) comparisons: callers bound it."""
    ut = b.type_of(updates)
    m = ut.shape[0]
    shape = b.type_of(hit).shape
    hits = b.op("cast", [hit], {"dtype": "u8"})
    has = b.op("gt", [b.op("reduce_max", [hits], {"axes": (0,), "keepdim": False}),
                      scalar(b, 0, DType.u8, "zero")])
    if reduction == "none":
        order = b.constant(np.arange(m, dtype=np.int64).reshape([m] + [1] * (len(shape) - 1)),
                           "order")
        tagged = b.op("where", [hit, order, scalar(b, -1, DType.i64, "none")])
        last = b.op("reduce_max", [tagged], {"axes": (0,), "keepdim": False})
        last = b.op("maximum", [last, scalar(b, 0, DType.i64, "first")])
        value = b.op("gather_elements", [updates, last], {"axis": 0, "wrap": False})
    else:
        dt = ut.dtype
        if reduction in ("add", "mul"):
            fill: Any = 0 if reduction == "add" else 1
        elif dt.is_float:
            fill = -np.inf if reduction == "max" else np.inf
        else:
            info = np.iinfo(dt.numpy)
            fill = info.min if reduction == "max" else info.max
        spread = reshape(b, updates, [m, 1, *ut.shape[1:]])
        each = b.op("where", [hit, spread, scalar(b, fill, dt, "identity")])
        if reduction == "mul":
            value = reshape(b, product_along(b, each, 0), shape[1:])
        else:
            kiln_op = {"add": "reduce_sum", "max": "reduce_max", "min": "reduce_min"}[reduction]
            value = b.op(kiln_op, [each], {"axes": (0,), "keepdim": False})
        value = b.op(COMBINE[reduction], [data, value])
    return b.op("where", [has, value, data])


def scatter_along_axis(b: Builder, data: str, idx: str, updates: str, axis: int,
                       reduction: str) -> str:
    """ScatterElements / torch.scatter with run-time indices (idx and updates of one shape,
    within data's off ``axis``): with the axis moved first, update [m, ...] hits row p of
    data where its (wrapped) index is p; off the axis the positions pair up as they are."""
    t, it = b.type_of(data), b.type_of(idx)
    perm = (axis, *[k for k in range(t.rank) if k != axis])
    back = tuple(int(v) for v in np.argsort(perm))
    rows = t.shape[axis]
    data_p, idx_p, updates_p = [b.op("permute", [v], {"perm": perm}) if axis else v
                                for v in (data, idx, updates)]
    inner = [it.shape[k] for k in perm[1:]]
    covered = [t.shape[k] for k in perm[1:]]
    places = b.constant(np.arange(rows, dtype=it.dtype.numpy).reshape(
        [1, rows] + [1] * len(inner)), "rows")
    wrapped = reshape(b, wrap_indices(b, idx_p, rows), [it.shape[axis], 1, *inner])
    hit = b.op("eq", [wrapped, places])
    part = data_p
    for k, n in enumerate(inner):  # indices may cover a corner of data off the axis
        if n != covered[k]:
            part = take_slice(b, part, k + 1, 0, n)
    y = scatter_by_compare(b, part, updates_p, hit, reduction)
    if inner != covered:  # the corner back into the rest of data
        ends = {"pads": (0, 0, *[v for n, d in zip(inner, covered) for v in (0, d - n)]),
                "value": 0.0}
        inside = b.op("pad", [b.constant(np.ones([rows, *inner], np.bool_), "inside")], ends)
        y = b.op("where", [inside, b.op("pad", [y], ends), data_p])
    return b.op("permute", [y], {"perm": back}) if axis else y


def scatter_compare_count(b: Builder, idx: str, data: str, axis: int) -> int:
    """How many comparisons ``scatter_along_axis`` makes."""
    return math.prod(b.type_of(idx).shape) * b.type_of(data).shape[axis]


# ---- geometry ----------------------------------------------------------------------------------
def affine_grid(b: Builder, theta: str, size: Sequence[int], align_corners: bool) -> str:
    """The sampling grid [N, *spatial, nd] of affine matrices ``theta`` [N, nd, nd + 1] for an
    output of ``size`` [N, C, *spatial] (ONNX AffineGrid, F.affine_grid): the normalized
    base grid (x, y[, z], 1), a constant, times theta^T in one batched matmul."""
    nd = len(size) - 2
    spatial = [int(m) for m in size[2:]]

    def points(m: int) -> np.ndarray:
        if align_corners:
            return np.linspace(-1.0, 1.0, m) if m > 1 else np.zeros(m)
        return (2 * np.arange(m) + 1) / m - 1

    mesh = np.meshgrid(*[points(m) for m in spatial], indexing="ij")
    # The last axis lists x (the innermost spatial axis) first.
    base = np.stack([*reversed(mesh), np.ones(spatial)], axis=-1).reshape(1, -1, nd + 1)
    dt = b.type_of(theta).dtype
    grid = b.op("matmul", [b.constant(base.astype(dt.numpy), "base"),
                           b.op("permute", [theta], {"perm": (0, 2, 1)})])
    return reshape(b, grid, [int(size[0]), *spatial, nd])


def floor(b: Builder, v: str) -> str:
    """floor of a float tensor from round: the nearest integer is one too many exactly where
    it is above v."""
    r = b.op("round", [v])
    return b.op("sub", [r, b.op("cast", [b.op("gt", [r, v])],
                                {"dtype": b.type_of(v).dtype.value})])


def _reflect(b: Builder, c: str, low2: int, high2: int) -> str:
    """Coordinate ``c`` reflected into [low2 / 2, high2 / 2] (PyTorch's and ONNX's
    reflect_coordinates): the distance from the low end folds back at each end."""
    dt = b.type_of(c).dtype
    if low2 == high2:
        return b.op("mul", [c, scalar(b, 0.0, dt, "zero")])
    low, span = low2 / 2, (high2 - low2) / 2
    d = b.op("abs", [b.op("sub", [c, scalar(b, low, dt, "low")])])
    flips = floor(b, b.op("div", [d, scalar(b, span, dt, "span")]))
    extra = b.op("sub", [d, b.op("mul", [flips, scalar(b, span, dt, "span")])])
    half = floor(b, b.op("mul", [flips, scalar(b, 0.5, dt, "half")]))
    odd = b.op("ne", [flips, b.op("add", [half, half])])
    back = b.op("sub", [scalar(b, span, dt, "span"), extra])
    return b.op("add", [b.op("where", [odd, back, extra]), scalar(b, low, dt, "low")])


def grid_sample(b: Builder, x: str, grid: str, mode: str, padding: str, align: bool) -> str:
    """GridSample / F.grid_sample (``mode`` nearest or linear; ``padding`` zeros, border or
    reflection) as gathers: each output point reads its 1 (nearest) or 2^d (linear)
    neighbours of x with one take over [n, *spatial] (indices clamped inside, the weight of an
    outside neighbour 0 under zeros padding) and weighs them elementwise. A NaN in the grid
    (an infinity too, under reflection) reads as a point left of the image: 0 under zeros
    padding, the first pixel otherwise. Nearest rounds halves to even, as both define it."""
    t, gt = b.type_of(x), b.type_of(grid)
    nd = t.rank - 2
    n, sizes = t.shape[0], t.shape[2:]
    out = gt.shape[1:-1]
    dt = t.dtype
    coords = []  # per spatial axis of x (grid's last axis lists x, the last axis, first)
    for axis, size in enumerate(sizes):
        g = reshape(b, take_slice(b, grid, gt.rank - 1, nd - 1 - axis, nd - axis), [n, *out])
        g = b.op("where", [b.op("eq", [g, g]), g, scalar(b, -3.0, dt, "nan")])
        if align:
            cc = b.op("mul", [b.op("add", [g, scalar(b, 1.0, dt, "one")]),
                              scalar(b, (size - 1) / 2, dt, "scale")])
        else:
            cc = b.op("sub", [b.op("mul", [b.op("add", [g, scalar(b, 1.0, dt, "one")]),
                                           scalar(b, size / 2, dt, "scale")]),
                              scalar(b, 0.5, dt, "half")])
        if padding == "reflection":
            cc = _reflect(b, cc, 0, 2 * (size - 1)) if align else _reflect(
                b, cc, -1, 2 * size - 1)
            # an infinite coordinate reflects to NaN: outside, as a NaN in the grid
            cc = b.op("where", [b.op("eq", [cc, cc]), cc, scalar(b, -3.0, dt, "nan")])
        lo, hi = (0.0, size - 1.0) if padding != "zeros" else (-2.0, size + 1.0)
        cc = b.op("clamp", [cc], {"min": lo, "max": float(hi)})
        coords.append(cc)
    batch = b.constant(np.arange(n, dtype=np.int64).reshape([n] + [1] * len(out)), "batch")
    channels_last = b.op("permute", [x], {"perm": (0, *range(2, t.rank), 1)})
    zero = scalar(b, 0.0, dt, "zero")

    def read(points: list[str]) -> str:
        """x at integer (float-valued) points [n, *out] per axis, 0 outside: [n, *out, c]."""
        idx, inside = [], None
        for p, size in zip(points, sizes):
            ok = b.op("where", [b.op("ge", [p, zero]),
                                b.op("le", [p, scalar(b, size - 1.0, dt, "last")]),
                                scalar(b, False, DType.bool, "no")])
            inside = ok if inside is None else b.op("where", [inside, ok, inside])
            safe = b.op("clamp", [p], {"min": 0.0, "max": size - 1.0})
            idx.append(b.op("cast", [safe], {"dtype": "i64"}))
        v = b.op("take", [channels_last, batch, *idx], {"axis": 0, "wrap": False})
        mask = reshape(b, inside, [n, *out, 1])
        return b.op("where", [mask, v, zero])

    if mode == "nearest":
        y = read([b.op("round", [cc]) for cc in coords])
    else:
        floors = [floor(b, cc) for cc in coords]
        fracs = [b.op("sub", [cc, f]) for cc, f in zip(coords, floors)]
        one = scalar(b, 1.0, dt, "one")
        y = None
        for corner in np.ndindex(*[2] * nd):
            points, weight = [], None
            for k, up in enumerate(corner):
                points.append(b.op("add", [floors[k], one]) if up else floors[k])
                w = fracs[k] if up else b.op("sub", [one, fracs[k]])
                weight = w if weight is None else b.op("mul", [weight, w])
            term = b.op("mul", [read(points), reshape(b, weight, [n, *out, 1])])
            y = term if y is None else b.op("add", [y, term])
    return b.op("permute", [y], {"perm": (0, len(out) + 1, *range(1, len(out) + 1))})


# ---- determinant -------------------------------------------------------------------------------
def determinant(b: Builder, x: str) -> str:
    """det of float matrices [..., n, n] by Gaussian elimination with partial pivoting,
    unrolled over the n columns: per column the largest remaining |pivot| (argmax) is
    swapped up (a gather of rows), its value (negated for a swap) joins the product, and the
    rows below subtract their multiple of the pivot row. A zero pivot (a singular matrix)
    gives 0, not NaN."""
    t = b.type_of(x)
    size, batch, dt = t.shape[-1], t.shape[:-2], t.dtype
    n = math.prod(batch)
    a = reshape(b, x, [n, size, size])
    rows = b.constant(np.arange(size, dtype=np.int64).reshape(1, size, 1), "rows")
    zero, one = scalar(b, 0, dt, "zero"), scalar(b, 1, dt, "one")
    det = b.constant(np.ones((n, 1, 1), dt.numpy), "one")
    for j in range(size):
        jj = scalar(b, j, DType.i64, "j")
        col = b.op("abs", [take_slice(b, take_slice(b, a, 2, j, j + 1), 1, j, size)])
        p = b.op("argmax", [reshape(b, col, [n, size - j])], {"axis": 1, "keepdim": True})
        p = reshape(b, b.op("add", [p, jj]), [n, 1, 1])
        order = b.op("where", [b.op("eq", [rows, jj]), p,
                               b.op("where", [b.op("eq", [rows, p]), jj, rows])])
        order = b.op("expand", [order], {"shape": (n, size, size)})
        a = b.op("gather_elements", [a, order], {"axis": 1, "wrap": False})
        pivot = take_slice(b, take_slice(b, a, 1, j, j + 1), 2, j, j + 1)  # [n, 1, 1]
        signed = b.op("where", [b.op("ne", [p, jj]), b.op("neg", [pivot]), pivot])
        det = b.op("mul", [det, signed])
        if j == size - 1:
            break
        safe = b.op("where", [b.op("eq", [pivot, zero]), one, pivot])
        factor = b.op("where", [b.op("gt", [rows, jj]),
                                b.op("div", [take_slice(b, a, 2, j, j + 1), safe]), zero])
        a = b.op("sub", [a, b.op("mul", [factor, take_slice(b, a, 1, j, j + 1)])])
    return reshape(b, det, batch)
