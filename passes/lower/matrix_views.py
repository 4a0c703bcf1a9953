"""How the GEMM lowerings see tensors as matrices: an operand of any rank read as [rows, k]
(``rows_of``), and the fused epilogue's values with the anchor's leading or trailing dims
merged into one, so that one flat column index addresses them (``collapsed_views``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kiln.ir import get_op
from kiln.ir.kernel import INDEX, Const, Expr
from kiln.passes.lower.core import Lowering, unflatten
from kiln.passes.lower.microkernel import ALoad


def collapsed_views(low: Lowering, final: str, anchor_out: str, inline: set[str],
                    merge: Sequence[int]) -> dict[str, tuple[int, ...]] | None:
    """Shapes of the epilogue's values with dims ``merge`` (consecutive, of the anchor's output)
    merged into one, so that one flat column index addresses them; None if some operand
    broadcasts over part of the merged dims only."""
    rank = len(low.graph.types[anchor_out].shape)
    lo, hi = merge[0], merge[-1] + 1
    views: dict[str, tuple[int, ...]] = {}
    on_path: dict[str, bool] = {anchor_out: True}

    def from_anchor(v: str) -> bool:
        """Whether ``v`` is computed in the epilogue from the anchor's output."""
        if v not in on_path:
            node = low.producers.get(v)
            on_path[v] = node is not None and node.name in inline and any(
                from_anchor(i) for i in node.inputs)
        return on_path[v]

    stack, seen = [final], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        shape = low.graph.types[v].shape
        lead = rank - len(shape)
        full = (1,) * lead + tuple(shape)
        part = full[lo:hi]
        if all(d == 1 for d in part):
            merged = 1
        elif all(d == s for d, s in zip(part, low.graph.types[anchor_out].shape[lo:hi])):
            merged = math.prod(part)
        else:
            return None
        views[v] = full[:lo] + (merged,) + full[hi:]
        node = low.producers.get(v)
        if node is not None and node.name in inline and v != anchor_out:
            # batch_norm's rule reads its channel as index 1: merging two or more dims at or
            # before it moves it (random graph 145: qlinear on [4, 7, 11, 8], then BN over 7).
            if node.op == "batch_norm" and lo <= 1 and hi - lo > 1:
                return None
            # A side operand computed by a shape op (a slice, reshape, permute of another
            # value) indexes its input by its own axes: a collapsed view of it reads the wrong
            # elements (x + linear(x) with x a slice of an input was wrong on every target).
            if get_op(node.op).kind != "elementwise" and not from_anchor(v):
                return None
            stack.extend(node.inputs)
    return views


def rows_of(low: Lowering, x: str, rows: int, k: int) -> ALoad:
    """Element (row, col) of ``x`` seen as a [rows, k] matrix. A stored ``x`` is read through
    that 2-d view. One computed in the kernel (an inlined reshape or permute) keeps its own
    shape: its leading dimensions are indexed by the row, its trailing ones (k elements) by
    the column, so the inner K loop's index needs no division (random graph 131 crashed on a
    2-d index into a 3-d permute)."""
    if not low.is_inline(x):
        low.view_shapes[x] = (rows, k)
        return lambda row, col: low.element(x, [row, col])
    shape = low.shape(x)
    for split in range(len(shape), -1, -1):
        if math.prod(shape[split:]) == k:
            lead, trail = shape[:split], shape[split:]
            return lambda row, col: low.element(x, _split_index(row, lead)
                                                + _split_index(col, trail))
    return lambda row, col: low.element_flat(x, row * k + col)


def _split_index(flat: Expr, dims: Sequence[int]) -> list[Expr]:
    """The index of ``flat`` in ``dims`` (row-major); where one dimension is all there is
    (the others 1), it is ``flat`` itself."""
    if sum(d > 1 for d in dims) <= 1:
        return [flat if d > 1 else Const(0, INDEX) for d in dims]
    return unflatten(flat, dims)

