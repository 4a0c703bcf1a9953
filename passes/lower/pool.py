"""2-d window ops over a padded, phase-split copy of each plane: max and average pooling, and
the loop nest that depthwise convolution of small maps shares with them.

Per (image, channel) the plane is copied into a per-thread scratch, zero (or -inf) padded
and split into its column stride phases, so that every output row is one vector loop over
the scratch without bounds tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kiln.ir import Node
from kiln.ir import kernel as K
from kiln.ir.kernel import Assign, Decl, Expr, For, Var, as_expr
from kiln.passes.lower.anchors import StoreFn, parallel_kind
from kiln.passes.lower.conv_geometry import ConvGeometry
from kiln.passes.lower.core import Lowering, f32

ReadFn = Callable[[Expr, Expr], Expr]    # (row, col) -> element of the current plane


@dataclass(frozen=True)
class WindowFold:
    """How a window op combines its taps: from ``init``, acc = tap(acc, value, p, q) for
    each tap (p, q), then the output is ``finish(acc)``."""

    init: Expr
    tap: Callable[[Expr, Expr, int, int], Expr]
    finish: Callable[[Expr], Expr]


@dataclass(frozen=True)
class Planes:
    """The planes a window nest runs over, one per image ``n`` and channel ``c``: ``fill``
    copies the current one into ``scratch`` (see ``fill_padded``)."""

    n: Var
    c: Var
    scratch: str
    fill: list


def padded_scratch(low: Lowering, geo: ConvGeometry, prefix: str) -> str:
    """A new per-thread scratch holding one padded, phase-split plane of ``geo``'s input."""
    scratch = f"{prefix}_{low.fresh('s').name}"
    low.scratch.append(K.Buffer(scratch, "f32", geo.split_rows * geo.stride[1] * geo.split_cols))
    return scratch


def fill_padded(low: Lowering, geo: ConvGeometry, read: ReadFn, dst: str,
                pad_value: Expr) -> list:
    """Copy one H x W plane, element (row, col) given by ``read``, into the padded,
    phase-split scratch ``dst``: column j*sw + ph of padded row r lands at
    dst[(r*sw + ph) * split_cols + j]; everything else holds ``pad_value``.

    A vector fill of the whole scratch, then a copy of the interior whose bounds are known
    here, so neither loop tests bounds per element (the copy is a plain vector copy when
    sw is 1)."""
    (H, W), (pad_h, pad_w), sw = geo.in_sp, geo.pad, geo.stride[1]
    Hp, Wj = geo.split_rows, geo.split_cols
    i, r = low.fresh("i"), low.fresh("r")
    stmts: list = [For(i, as_expr(0), as_expr(Hp * sw * Wj), (K.Store(dst, i, pad_value),),
                       "vectorized")]
    rows = min(H, Hp - pad_h)
    for ph in range(sw):
        j0 = max(0, -(-(pad_w - ph) // sw))
        j1 = min(Wj, -(-(W + pad_w - ph) // sw))
        if j1 <= j0 or rows <= 0:
            continue
        jj = low.fresh("j")
        copy = K.Store(dst, ((r + pad_h) * sw + ph) * Wj + jj, read(r, jj * sw + (ph - pad_w)))
        stmts.append(For(r, as_expr(0), as_expr(rows), (
            For(jj, as_expr(j0), as_expr(j1 - j0), (copy,), "vectorized" if sw == 1
                else "serial"),)))
    return stmts


def window_nest(low: Lowering, node: Node, geo: ConvGeometry, planes: Planes, fold: WindowFold,
                store: StoreFn) -> list:
    """The loop nest of a window op (depthwise conv, pooling) over ``planes``: per plane its
    ``fill`` statements, then for each output row a vector loop folding the taps and storing
    the result at [n, c, oh, ow]. Images run in parallel, or channels when there is one
    image."""
    (OH, OW), (kh_, kw_), (sh, sw), dh = geo.out_sp, geo.kernel, geo.stride, geo.dil[0]
    Wj = geo.split_cols
    oh, ow = low.fresh("oh"), low.fresh("ow")
    acc = low.fresh("acc", "f32")
    taps: list = []
    for p in range(kh_):
        for q in range(kw_):
            v = K.Load(planes.scratch, ((oh * sh + p * dh) * sw + (q % sw)) * Wj + ow + (q // sw),
                       "f32")
            taps.append(Assign(acc, fold.tap(acc, v, p, q)))
    compute = For(oh, as_expr(0), as_expr(OH), (For(ow, as_expr(0), as_expr(OW), (
        Decl(acc, fold.init), *taps, store([planes.n, planes.c, oh, ow], fold.finish(acc))),
        "vectorized"),))
    kind = parallel_kind(low, node)
    return [For(planes.n, as_expr(0), as_expr(geo.n), (
        For(planes.c, as_expr(0), as_expr(geo.c), (*planes.fill, compute),
            kind if geo.n == 1 else "serial"),),
        kind if geo.n > 1 else "serial")]


def lower_pool(low: Lowering, node: Node, final: str, inline: set[str],
               width: int) -> list | None:
    """2-d max / average pooling vectorized along output rows, over a padded phase-split
    copy of each channel (as for depthwise convolution; padding is -inf for max, 0 for
    average). Average pooling takes this path only when every window has the same divisor."""
    x = node.inputs[0]
    a_ = node.attrs
    if len(a_["kernel"]) != 2 or low.dtype(x) != "f32":
        return None
    geo = ConvGeometry.of_pool(low, node)
    (H, W), (OH, OW), (kh_, kw_) = geo.in_sp, geo.out_sp, geo.kernel
    (sh, sw), (ph_, pw), dw = geo.stride, geo.pad, geo.dil[1]
    out = node.outputs[0]
    is_max = node.op == "max_pool"
    if dw != 1:
        return None
    if not is_max:
        overhang = ((OH - 1) * sh + kh_ > H + 2 * ph_) or ((OW - 1) * sw + kw_ > W + 2 * pw)
        if overhang or (not a_["count_include_pad"] and (ph_ or pw)):
            return None
    scratch = padded_scratch(low, geo, "pool")
    nv, cv = low.fresh("n"), low.fresh("c")
    pad_value = f32(float("-inf") if is_max else 0.0)
    if low.is_inline(x):  # e.g. a channels-last tensor seen through a permute
        def read(r, col):
            return low.element(x, [nv, cv, r, col])
    else:
        xb, base = low.buffer(x), (nv * geo.c + cv) * (H * W)

        def read(r, col):
            return K.Load(xb, base + r * W + col, "f32")
    fill = fill_padded(low, geo, read, scratch, pad_value)
    fold = WindowFold(pad_value, lambda acc, v, p, q: K.maximum(acc, v) if is_max else acc + v,
                      lambda acc: acc if is_max else acc * f32(1.0 / (kh_ * kw_)))
    return window_nest(low, node, geo, Planes(nv, cv, scratch, fill), fold,
                       lambda idx, value: low.store_at(final, idx, value, out))
