"""One thread block per row for row reductions (softmax, log_softmax, layer/group norm, reduce_*
over trailing axes, whole-tensor reductions).

The lowering writes a row-wise op as a loop over rows whose body is a short program: scalar
statements, *reduction loops* (``acc = acc op f(j)`` with op add, max or min, into a local
declared outside the loop) and *map loops* (independent stores ``out[.. j ..] = g(j)``), e.g.
softmax: a max loop, a sum-of-exp loop, a scale, a store loop. The generic mapping gives each
row to one thread, which walks the row serially (and a reduction over the whole tensor to a
single thread).

``render_block_reduce`` gives each row to a block of T threads (a power of two): a reduction
loop becomes a strided loop (thread t takes j = t, t + T, ...) folding a private partial,
then a tree over a shared-memory array (log2 T steps, one barrier each) whose root every thread
reads back, so all threads continue with the row's value; a map loop becomes a strided loop
followed by a barrier (later statements may read what other threads stored); scalar
statements run in every thread (each computes the same value), and scalar stores in thread 0.
Rows are spread over the grid's blocks by a grid-stride loop. The reduction order changes
(float reassociation, as in any parallel reduction); max and min keep NumPy's NaN rule.

It applies when every loop of the row body is one of those two kinds with constant bounds, no
thread-private scratch buffer is involved, and (for a kernel that has many rows) a reduction
loop reads memory contiguously along its innermost axis with at least ``min_row`` elements: a
short or strided reduction (a pooling window, a softmax over the first axis, a matrix-vector
product) is better served by a thread per row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kiln.backends.cuda.codegen import NUMBA_TYPES, KernelWriter, Launch, buffers_in
from kiln.backends.cuda.mapping import BoundLoop, Segment, const_int, independent
from kiln.ir import kernel as K
from kiln.ir.kernel import Assign, Binary, Decl, Expr, For, If, Load, Stmt, Store, Var

_COMBINE = ("add", "max", "min")


@dataclass(frozen=True)
class RowTiling:
    """Threads per row block: the row length rounded up to a power of two, clamped to
    [``min_threads``, ``max_threads``]; at most ``max_blocks`` blocks (more rows take turns);
    rows shorter than ``min_row`` keep a thread each (when there are several rows).

    ``warp`` > 0 combines the partials with warp shuffles in groups of ``warp`` lanes (32 on
    a GPU: a warp) instead of a shared-memory tree; 0 keeps the tree."""

    max_threads: int
    min_threads: int
    min_row: int
    max_blocks: int
    warp: int = 0


# Types numba's warp shuffle moves (32- and 64-bit); other accumulators use the tree.
SHUFFLE_TYPES = ("f32", "f64", "i32", "i64")
FULL_MASK = "0xFFFFFFFF"


@dataclass(frozen=True)
class _Loop:
    """A perfectly nested chain of constant loops, flattened: its loops and innermost body."""

    loops: tuple[BoundLoop, ...]
    fors: tuple[For, ...]
    body: tuple[Stmt, ...]
    accs: tuple[tuple[Var, str], ...]  # reduction accumulators and their op; () for a map

    @property
    def count(self) -> int:
        return math.prod(b.count for b in self.loops)


def _chain(s: For) -> _Loop | None:
    loops, fors = [], []
    while True:
        start, extent = const_int(s.start), const_int(s.extent)
        if start is None or extent is None:
            return None
        loops.append(BoundLoop(s.var.name, start, max(0, -(-extent // s.step)), s.step))
        fors.append(s)
        if len(s.body) == 1 and isinstance(s.body[0], For):
            s = s.body[0]
            continue
        return _Loop(tuple(loops), tuple(fors), s.body, ())


def _fold(a: Assign) -> tuple[str, Expr] | None:
    """(op, x) when ``a`` is ``v = op(v, x)`` (or ``op(x, v)``) with ``x`` free of ``v``."""
    v = a.var
    if not isinstance(a.value, Binary) or a.value.op not in _COMBINE or v.lanes != 1:
        return None
    for mine, other in ((a.value.a, a.value.b), (a.value.b, a.value.a)):
        if mine == v and not any(isinstance(x, Var) and x.name == v.name
                                 for x in K.walk_expr(other)):
            return a.value.op, other
    return None


def _classify(loop: _Loop) -> _Loop | None:
    """``loop`` with its accumulators (a reduction loop) or none (a map loop); None when it
    is neither: an outer local assigned other than by a fold, a fold's accumulator read
    elsewhere in the loop, or a store inside a reduction."""
    declared = {s.var.name for s in K.walk_stmts(loop.body) if isinstance(s, Decl)}
    outer = [s for s in K.walk_stmts(loop.body)
             if isinstance(s, Assign) and s.var.name not in declared]
    if not outer:
        return loop
    accs: list[tuple[Var, str]] = []
    for s in outer:
        fold = _fold(s) if s in loop.body else None
        if fold is None or any(v.name == s.var.name for v, _ in accs):
            return None
        accs.append((s.var, fold[0]))
    names = {v.name for v, _ in accs}
    for s in K.walk_stmts(loop.body):
        if isinstance(s, Store):
            return None
        exprs = K.stmt_exprs(s)
        fold = _fold(s) if isinstance(s, Assign) and s.var.name in names else None
        if fold is not None:  # the fold reads its accumulator; only its operand counts
            exprs = (fold[1],)
        if any(isinstance(x, Var) and x.name in names for e in exprs for x in K.walk_expr(e)):
            return None
    return _Loop(loop.loops, loop.fors, loop.body, tuple(accs))


def _independent(loop: _Loop, rows: Sequence[BoundLoop]) -> bool:
    """Whether the flattened iterations of map loop ``loop`` touch disjoint stored elements
    (each level independent with the levels above it fixed)."""
    ranges = {b.var: (b.start, b.start + max(b.count - 1, 0) * b.step) for b in rows}
    outer = [b.var for b in rows]
    for b, f in zip(loop.loops, loop.fors):
        ranges[b.var] = (b.start, b.start + max(b.count - 1, 0) * b.step)
        if b.count > 1 and not independent(f, outer, dict(ranges), set()):
            return False
        outer.append(b.var)
    return True


def _contiguous(loop: _Loop) -> bool:
    """Whether every load of a reduction loop that moves with its innermost (non-trivial) loop
    does so with unit stride, so a warp's threads read consecutive elements. A matrix-vector
    product fails this (its weight column is strided) and keeps a thread per output, whose
    neighbours read neighbouring weights."""
    inner = next((b for b in reversed(loop.loops) if b.count > 1), None)
    if inner is None:
        return True
    for s in K.walk_stmts(loop.body):
        for e in K.stmt_exprs(s):
            for x in K.walk_expr(e):
                if isinstance(x, Load):
                    c = K.affine_coef(x.index, inner.var)
                    if c != 0 and (c is None or abs(c * inner.step) != 1):
                        return False
    return True


Item = Decl | Assign | Store | If | _Loop
"""A row-body step: a local (run by every thread), a store or if (run by thread 0), or a
reduction or map loop (spread over the block)."""


def plan_row(seg: Segment, kernel: K.Kernel, tiling: RowTiling) -> list[Item] | None:
    """The row body of ``seg`` as schedule items, or None when the block schedule does not
    apply (see the module docstring)."""
    scratch = {b.name for b in kernel.scratch}
    if scratch & buffers_in(seg.stmts):
        return None
    items: list[Item] = []
    for s in seg.body():
        if isinstance(s, (Decl, Assign)):
            if s.var.lanes != 1:
                return None
            items.append(s)
        elif isinstance(s, For):
            chain = _chain(s)
            loop = None if chain is None else _classify(chain)
            if loop is None or not loop.accs and not _independent(loop, seg.bound):
                return None
            items.append(loop)
        elif isinstance(s, (Store, If)):
            if any(isinstance(x, (For, Decl, Assign)) for x in K.walk_stmts([s])):
                return None
            items.append(s)
        else:
            return None
    reductions = [it for it in items if isinstance(it, _Loop) and it.accs]
    if not reductions:
        return None
    if seg.bound and seg.work > 1 and not any(
            r.count >= tiling.min_row and _contiguous(r) for r in reductions):
        return None
    return items


def _threads(items: list[Item], tiling: RowTiling) -> int:
    longest = max((it.count for it in items if isinstance(it, _Loop)), default=1)
    t = tiling.min_threads
    while t < tiling.max_threads and t < longest:
        t *= 2
    return t


def render_block_reduce(tiling: RowTiling, writer: KernelWriter, seg: Segment, name: str,
                        out: list[str]) -> Launch | None:
    """The block-per-row kernel of ``seg`` (a ``SegmentSchedule``), or None."""
    items = plan_row(seg, writer.kernel, tiling)
    if items is None:
        return None
    nt = _threads(items, tiling)
    rows = seg.work if seg.bound else 1
    body: list[str] = []
    shared: dict[tuple[str, int], str] = {}  # (dtype, slot) -> shared array name (a tree's)
    per_warp: dict[tuple[str, int], str] = {}  # the same, one element per warp (shuffles)
    depth = 1
    if seg.bound:
        body.append(f"    for _row in range(cuda.blockIdx.x, {rows}, cuda.gridDim.x):")
        writer.decode("_row", seg.bound, 2, body)
        depth = 2
    pad = "    " * depth
    decl_init: dict[str, Expr] = {}
    for n, item in enumerate(items):
        last = n == len(items) - 1
        if isinstance(item, Decl):
            writer.stmt(item, depth, body)
            decl_init[item.var.name] = item.init
        elif isinstance(item, Assign):
            writer.stmt(item, depth, body)
            decl_init.pop(item.var.name, None)
        elif isinstance(item, (Store, If)):
            body.append(f"{pad}if _tid == 0:")
            writer.stmt(item, depth + 1, body)
            if not last:
                body.append(f"{pad}cuda.syncthreads()")
        else:
            loop = item
            keep = {}
            for v, op in loop.accs:
                identity = K.reduction_identity(op, v.dtype)
                if decl_init.pop(v.name, None) != identity:
                    # Each thread folds from the identity; the value before the loop joins
                    # the total after the tree.
                    keep[v.name] = writer.fresh("keep")
                    body.append(f"{pad}{keep[v.name]} = {writer.var(v)}")
                    body.append(f"{pad}{writer.var(v)} = "
                                f"{writer.expr_at(identity, depth, body)}")
            body.append(f"{pad}for _f in range(_tid, {loop.count}, {nt}):")
            writer.decode("_f", loop.loops, depth + 1, body)
            writer.stmts(loop.body, depth + 1, body)
            if loop.accs:
                warp = tiling.warp
                if warp and nt % warp == 0 and nt // warp <= warp and all(
                        v.dtype in SHUFFLE_TYPES for v, _ in loop.accs):
                    _shuffle(writer, loop.accs, keep, nt, warp, per_warp, pad, body)
                else:
                    _tree(writer, loop.accs, keep, nt, shared, pad, body)
            elif not last:
                body.append(f"{pad}cuda.syncthreads()")
    lines: list[str] = []
    params = writer.header(name, seg.stmts, lines)
    arrays = [(sh, nt, dtype) for (dtype, _), sh in shared.items()]
    arrays += [(sh, nt // max(tiling.warp, 1), dtype) for (dtype, _), sh in per_warp.items()]
    for sh, slots, dtype in arrays:
        lines.append(f"    {sh} = cuda.shared.array({slots}, numba.types.{NUMBA_TYPES[dtype]})")
    lines.append("    _tid = cuda.threadIdx.x")
    if per_warp:  # a shuffle combine over several warps
        lines += [f"    _lane = _tid % {tiling.warp}", f"    _warp = _tid // {tiling.warp}"]
    out.extend(lines + body + ["", ""])
    blocks = min(rows, tiling.max_blocks)
    nbytes = sum(slots * K.np_dtype(dtype).itemsize for _, slots, dtype in arrays)
    return Launch(name, params, rows, True, tuple(b.var for b in seg.bound), "block-reduce",
                  (blocks, 1, 1), (nt, 1, 1), nbytes)


def _shuffle_text(value: str, mode: int, lane_arg: int, warp: int) -> str:
    """numba's warp shuffle of ``value`` (mode 0: from lane ``lane_arg`` of the group; mode 2:
    from ``lane_arg`` lanes up, or its own value past the group's end) within groups of
    ``warp`` lanes."""
    clamp = ((32 - warp) << 8) | 0x1F
    return (f"cuda.shfl_sync_intrinsic({FULL_MASK}, {mode}, {value}, {lane_arg}, "
            f"{clamp:#x})[0]")


def _warp_fold(writer: KernelWriter, accs: Sequence[tuple[Var, str]], warp: int, pad: str,
               body: list[str]) -> None:
    """Fold each accumulator over its group of ``warp`` lanes (lane 0 ends with the total)."""
    step = warp // 2
    while step >= 1:
        for v, op in accs:
            y = f"_y_{v.dtype}"
            body.append(f"{pad}{y} = {_shuffle_text(writer.var(v), 2, step, warp)}")
            body.append(f"{pad}{writer.var(v)} = {writer.combine(op, v.dtype, writer.var(v), y)}")
        step //= 2


def _shuffle(writer: KernelWriter, accs: Sequence[tuple[Var, str]], keep: dict[str, str],
             nt: int, warp: int, per_warp: dict[tuple[str, int], str], pad: str,
             body: list[str]) -> None:
    """Combine the threads' partials of ``accs`` with warp shuffles: each warp folds its
    lanes, lane 0 of every warp puts its warp's value in shared memory, and (with several
    warps) every warp folds those values the same way; lane 0's total is then broadcast to its
    warp. Every thread runs every shuffle (all lanes of the mask take part), and two barriers
    replace the tree's log2(threads) + 2."""
    _warp_fold(writer, accs, warp, pad, body)
    nwarps = nt // warp
    if nwarps > 1:
        arrays = []
        for slot, (v, _) in enumerate(accs):
            sh = per_warp.setdefault((v.dtype, slot), f"_sw_{v.dtype}_{slot}")
            arrays.append(sh)
        body.append(f"{pad}if _lane == 0:")
        body += [f"{pad}    {sh}[_warp] = {writer.var(v)}" for sh, (v, _) in zip(arrays, accs)]
        body.append(f"{pad}cuda.syncthreads()")
        for sh, (v, op) in zip(arrays, accs):
            identity = writer.expr_at(K.reduction_identity(op, v.dtype), len(pad) // 4, body)
            body.append(f"{pad}{writer.var(v)} = {sh}[_lane] if _lane < {nwarps} "
                        f"else {identity}")
        _warp_fold(writer, accs, warp, pad, body)
    for v, op in accs:
        body.append(f"{pad}{writer.var(v)} = {_shuffle_text(writer.var(v), 0, 0, warp)}")
        if v.name in keep:
            body.append(f"{pad}{writer.var(v)} = "
                        f"{writer.combine(op, v.dtype, keep[v.name], writer.var(v))}")
    if nwarps > 1:
        # The next reduction writes the same arrays: every warp must have read them first.
        body.append(f"{pad}cuda.syncthreads()")


def _tree(writer: KernelWriter, accs: Sequence[tuple[Var, str]], keep: dict[str, str],
          nt: int, shared: dict[tuple[str, int], str], pad: str, body: list[str]) -> None:
    """Combine the threads' partials of ``accs`` through shared memory; every thread ends
    with the row's value in the accumulator."""
    arrays = []
    for slot, (v, _) in enumerate(accs):
        sh = shared.setdefault((v.dtype, slot), f"_sh_{v.dtype}_{slot}")
        arrays.append(sh)
        body.append(f"{pad}{sh}[_tid] = {writer.var(v)}")
    body.append(f"{pad}cuda.syncthreads()")
    step = nt // 2
    while step >= 1:
        body.append(f"{pad}if _tid < {step}:")
        for sh, (v, op) in zip(arrays, accs):
            x, y = f"_x_{v.dtype}", f"_y_{v.dtype}"
            body += [f"{pad}    {x} = {sh}[_tid]", f"{pad}    {y} = {sh}[_tid + {step}]"]
            body.append(f"{pad}    {sh}[_tid] = {writer.combine(op, v.dtype, x, y)}")
        body.append(f"{pad}cuda.syncthreads()")
        step //= 2
    for sh, (v, op) in zip(arrays, accs):
        if v.name in keep:
            y = f"_y_{v.dtype}"
            body.append(f"{pad}{y} = {sh}[0]")
            body.append(f"{pad}{writer.var(v)} = {writer.combine(op, v.dtype, keep[v.name], y)}")
        else:
            body.append(f"{pad}{writer.var(v)} = {sh}[0]")
    # The next reduction reuses the arrays: every thread must have read the root first.
    body.append(f"{pad}cuda.syncthreads()")
