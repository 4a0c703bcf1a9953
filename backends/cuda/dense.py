"""Shared-memory tiled GEMM for contraction loop nests (linear, matmul, conv, int8 GEMMs).

The lowering writes every dense op as the same scalar nest (see ``passes/lower``)::

    for <outer loops, all independent>:          # output elements
        acc = init                                # 0, or the bias of an int8 GEMM
        for <reduction loops>:                    # k; (c, kh, kw) for a convolution
            acc = acc + a * b
        <epilogue: stores of acc, fused bias / activation / residual / requantize>

``match_contraction`` recognizes that shape in a segment and sorts the outer loops by which
factor reads them: those only ``a`` reads index the rows of an implicit GEMM (M), those only
``b`` reads its columns (N), the rest are a batch. For a convolution the image factor indexes
the output pixels and the weight factor the output channels, and the reduction loops are the
flattened (channel, kh, kw) axis, so the convolution runs as an implicit im2col GEMM: patches
are gathered from the image as the tiles are loaded, never materialized.

``render_tiled_gemm`` turns it into one CUDA kernel: a block of ``threads_n`` x ``threads_m``
threads computes a (BM x BN) output tile of one batch entry; the K axis runs in steps of BK,
each step staging a BM x BK tile of ``a`` and a BK x BN tile of ``b`` in shared memory
(cooperative loads, zero-filled past the edges, so ragged tiles need no special case); each
thread keeps an RM x RN micro-tile of accumulators in registers and reads RM + RN values from
shared memory per k for RM * RN multiply-adds. The epilogue statements of the nest run per
output element as they are (any fused chain the lowering produced), after the accumulator is
completed with ``init``. Accumulation is in the accumulator's type, except f16, which
accumulates in f32 and is rounded once at the end.

Anything else (a depthwise convolution, where the weight has no axis of its own; a batch-1
linear, which is a matrix-vector product with nothing to reuse; nests with loop bounds that are
not constants) returns None and keeps the generic mapping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kiln.backends.cuda.codegen import NUMBA_TYPES, TYPE_NAMES, KernelWriter, Launch
from kiln.backends.cuda.mapping import BoundLoop, Segment, const_int
from kiln.ir import kernel as K
from kiln.ir.kernel import Assign, Binary, Decl, Expr, For, Load, Stmt, Var

# Launch limits of every CUDA device: grid y and z dimensions.
MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class GemmTiling:
    """Block shape of the tiled GEMM: ``threads_n`` x ``threads_m`` threads per block, each
    computing up to ``max_micro`` x ``max_micro`` outputs (fewer on a small M or N), and K
    staged ``block_k`` at a time. A GEMM with fewer than ``min_rows`` rows (a small batch
    through a linear layer) keeps a thread per output: most of a tile would idle."""

    threads_m: int
    threads_n: int
    max_micro: int
    block_k: int
    min_rows: int = 1


@dataclass(frozen=True)
class Contraction:
    """A segment that is a GEMM: ``rows``/``cols``/``batch`` partition its outer loops (rows
    read only by ``a``, columns only by ``b``), ``k`` are its reduction loops."""

    acc: Var
    init: Expr
    a: Expr
    b: Expr
    rows: tuple[BoundLoop, ...]
    cols: tuple[BoundLoop, ...]
    batch: tuple[BoundLoop, ...]
    k: tuple[BoundLoop, ...]
    epilogue: tuple[Stmt, ...]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(batch, M, N, K)."""
        def size(loops: tuple[BoundLoop, ...]) -> int:
            return math.prod(b.count for b in loops)

        return size(self.batch), size(self.rows), size(self.cols), size(self.k)

    @property
    def compute_dtype(self) -> str:
        return "f32" if self.acc.dtype == "f16" else self.acc.dtype


def _names(e: Expr) -> set[str]:
    return {x.name for x in K.walk_expr(e) if isinstance(x, Var)}


def _stmt_names(stmts: Sequence[Stmt]) -> set[str]:
    out: set[str] = set()
    for s in K.walk_stmts(stmts):
        for e in K.stmt_exprs(s):
            out |= _names(e)
    return out


def _product(acc: Var, value: Expr) -> tuple[Expr, Expr] | None:
    """(a, b) when ``value`` is ``acc + a * b`` (either order of the sum)."""
    if not isinstance(value, Binary) or value.op != "add":
        return None
    for left, right in ((value.a, value.b), (value.b, value.a)):
        if left == acc and isinstance(right, Binary) and right.op == "mul" \
                and right.lanes == 1:
            return right.a, right.b
    return None


def match_contraction(seg: Segment) -> Contraction | None:
    """The GEMM form of ``seg``, or None when it is not a contraction nest."""
    if not seg.bound:
        return None
    body = seg.body()
    if len(body) < 2 or not isinstance(body[0], Decl) or not isinstance(body[1], For):
        return None
    acc, init = body[0].var, body[0].init
    if acc.lanes != 1 or not K.is_float(acc.dtype) and acc.dtype not in ("i32", "i64"):
        return None
    k_loops: list[BoundLoop] = []
    s: Stmt = body[1]
    while isinstance(s, For):
        start, extent = const_int(s.start), const_int(s.extent)
        if start is None or extent is None or len(s.body) != 1:
            return None
        k_loops.append(BoundLoop(s.var.name, start, max(0, -(-extent // s.step)), s.step))
        s = s.body[0]
    if not isinstance(s, Assign) or s.var != acc:
        return None
    factors = _product(acc, s.value)
    if factors is None:
        return None
    x, y = factors
    if x.dtype != y.dtype or K.is_float(x.dtype) != K.is_float(acc.dtype):
        return None
    outer = {b.var for b in seg.bound}
    k_names = {b.var for b in k_loops}
    nx, ny = _names(x), _names(y)
    epilogue = tuple(body[2:])
    if not (nx | ny) <= outer | k_names or acc.name in nx | ny or not _names(init) <= outer \
            or _stmt_names(epilogue) & k_names:
        return None
    side_x, side_y, batch = [], [], []
    for b in seg.bound:
        if b.count > 1 and (b.var in nx) != (b.var in ny):
            (side_x if b.var in nx else side_y).append(b)
        else:
            batch.append(b)
    if not side_x or not side_y:
        return None
    # Columns are the side of the innermost output loop, so that neighbouring threads store
    # neighbouring output elements.
    innermost = next((b for b in reversed(seg.bound) if b.count > 1), None)
    if innermost in side_x:
        x, y, side_x, side_y = y, x, side_y, side_x
    return Contraction(acc, init, x, y, tuple(side_x), tuple(side_y), tuple(batch),
                       tuple(k_loops), epilogue)


def _micro(extent: int, threads: int, most: int) -> int:
    """Outputs per thread along one axis: the smallest power of two that covers ``extent``
    with ``threads`` threads, at most ``most``."""
    r = 1
    while r < most and r * threads < extent:
        r *= 2
    return r


def _k_fastest(factor: Expr, own: Sequence[BoundLoop], k: Sequence[BoundLoop],
               default: bool) -> bool:
    """Whether consecutive threads should load consecutive k of ``factor`` (it is contiguous
    along k in memory) rather than consecutive rows/columns of its own axis."""
    def unit(loops: Sequence[BoundLoop]) -> bool:
        inner = next((b for b in reversed(loops) if b.count > 1), None)
        if inner is None:
            return False
        for e in K.walk_expr(factor):
            if isinstance(e, Load):
                c = K.affine_coef(e.index, inner.var)
                if c is not None and c * inner.step == 1:
                    return True
        return False

    if unit(k):
        return True
    return False if unit(own) else default


def render_tiled_gemm(tiling: GemmTiling, writer: KernelWriter, seg: Segment, name: str,
                      out: list[str]) -> Launch | None:
    """The tiled GEMM kernel of ``seg`` (a ``SegmentSchedule``), or None when ``seg`` is not a
    contraction or its grid would not fit."""
    c = match_contraction(seg)
    if c is None:
        return None
    nb, m, n, kk = c.shape
    if m < tiling.min_rows:
        return None
    ty, tx = tiling.threads_m, tiling.threads_n
    rm, rn = _micro(m, ty, tiling.max_micro), _micro(n, tx, tiling.max_micro)
    bm, bn, bk = ty * rm, tx * rn, tiling.block_k
    grid = (-(-n // bn), -(-m // bm), nb)
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        return None
    ct = c.compute_dtype
    ntype = f"numba.types.{NUMBA_TYPES[ct]}"
    a_kfast = _k_fastest(c.a, c.rows, c.k, True)
    b_kfast = _k_fastest(c.b, c.cols, c.k, False)
    # Threads that load along k store to shared rows BM (BN) words apart: one padding word
    # keeps those stores in distinct banks.
    pad_a, pad_b = int(a_kfast), int(b_kfast)
    zero = writer.const(0, ct)
    lines: list[str] = []
    params = writer.header(name, seg.stmts, lines)
    lines += [
        f"    _sa = cuda.shared.array(({bk}, {bm + pad_a}), {ntype})",
        f"    _sb = cuda.shared.array(({bk}, {bn + pad_b}), {ntype})",
        f"    _acc = cuda.local.array(({rm}, {rn}), {ntype})",
        f"    _ra = cuda.local.array({rm}, {ntype})",
        f"    _rb = cuda.local.array({rn}, {ntype})",
        "    _tx = cuda.threadIdx.x",
        "    _ty = cuda.threadIdx.y",
        f"    _tid = _ty * {tx} + _tx",
        f"    _m0 = cuda.blockIdx.y * {bm}",
        f"    _n0 = cuda.blockIdx.x * {bn}",
        "    _z = cuda.blockIdx.z",
    ]
    writer.decode("_z", c.batch, 1, lines)
    lines += [f"    for _i in range({rm}):", f"        for _j in range({rn}):",
              f"            _acc[_i, _j] = {zero}",
              f"    for _k0 in range(0, {kk}, {bk}):"]
    for tile, own, extent, width, factor, kfast, value in (
            ("_sa", c.rows, m, bm, c.a, a_kfast, "_va"),
            ("_sb", c.cols, n, bn, c.b, b_kfast, "_vb")):
        origin = "_m0" if tile == "_sa" else "_n0"
        lines.append(f"        for _e in range(_tid, {width * bk}, {tx * ty}):")
        if kfast:
            lines += [f"            _r = _e // {bk}", f"            _c = _e % {bk}"]
        else:
            lines += [f"            _c = _e // {width}", f"            _r = _e % {width}"]
        lines += [f"            _p = {origin} + _r", "            _k = _k0 + _c",
                  f"            {value} = {zero}",
                  f"            if _p < {extent} and _k < {kk}:"]
        writer.decode("_p", own, 4, lines)
        writer.decode("_k", c.k, 4, lines)
        text = writer.expr_at(factor if factor.dtype == ct else K.Cast(factor, ct), 4, lines)
        lines += [f"                {value} = {text}", f"            {tile}[_c, _r] = {value}"]
    update = "_acc[_i, _j] + _ra[_i] * _rb[_j]"
    if ct == "i32":  # numba computes in int64: wrap back like the generic nest does
        update = f"{TYPE_NAMES[ct]}({update})"
    lines += [
        "        cuda.syncthreads()",
        f"        for _kk in range({bk}):",
        f"            for _i in range({rm}):",
        f"                _ra[_i] = _sa[_kk, _ty + _i * {ty}]",
        f"            for _j in range({rn}):",
        f"                _rb[_j] = _sb[_kk, _tx + _j * {tx}]",
        f"            for _i in range({rm}):",
        f"                for _j in range({rn}):",
        f"                    _acc[_i, _j] = {update}",
        # The next step overwrites the tiles: every thread must be done reading them.
        "        cuda.syncthreads()",
        f"    for _i in range({rm}):",
        f"        _p = _m0 + _ty + _i * {ty}",
        f"        for _j in range({rn}):",
        f"            _q = _n0 + _tx + _j * {tx}",
        f"            if _p < {m} and _q < {n}:",
    ]
    writer.decode("_p", c.rows, 4, lines)
    writer.decode("_q", c.cols, 4, lines)
    total = "_acc[_i, _j]"
    if c.init != K.reduction_identity("add", c.acc.dtype):
        init = c.init if c.init.dtype == ct else K.Cast(c.init, ct)
        total = f"{writer.expr_at(init, 4, lines)} + {total}"
        total = f"{TYPE_NAMES[ct]}({total})" if ct == "i32" else total
    if c.acc.dtype != ct:
        total = f"{TYPE_NAMES[c.acc.dtype]}({total})"
    lines.append(f"                {writer.var(c.acc)} = {total}")
    writer.stmts(c.epilogue, 4, lines)
    lines += ["", ""]
    out.extend(lines)
    itemsize = K.np_dtype(ct).itemsize
    shared = (bk * (bm + pad_a) + bk * (bn + pad_b)) * itemsize
    return Launch(name, params, nb * m * n, True, tuple(b.var for b in seg.bound),
                  "tiled-gemm", grid, (tx, ty, 1), shared)
