"""The packed, register-blocked GEMM micro-kernel that linear, matmul and convolution share.

C[M, N] = A[M, K] @ B[K, N] is computed in tiles of MR rows x NR columns (NR = NV vectors of
the target's width): the accumulators of one tile stay in vector registers over the whole K
loop (a BLIS-style micro-kernel), each step broadcasting one element of A per row and loading
NV vectors of B. Constant operands are packed once at compile time into the order the
micro-kernel reads them: B as [N/NR][K][NR] panels (zero padded), A as [M/MR][K][MR]; runtime
operands can be packed the same way by a loop in the kernel (``pack_rows``). The operands are
read, and C written, through accessors, so each caller decides where they live and applies its
epilogue (bias, activation, residual) to each vector as it is stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from kiln.ir import kernel as K
from kiln.ir.kernel import Assign, Broadcast, Decl, Expr, For, If, Var, as_expr
from kiln.passes.lower.core import Lowering, clamp_index, f32
from kiln.passes.target import Target


@dataclass(frozen=True)
class GemmShape:
    """Micro-kernel geometry for a target: MR rows, NV vectors of W lanes of ``dtype``."""

    mr: int
    nv: int
    w: int
    dtype: str = "f32"

    @property
    def nr(self) -> int:
        """Columns per tile."""
        return self.nv * self.w


def micro_shape(width: int, m: int) -> GemmShape:
    """Register blocking for ``width``-lane vectors: AVX-512 has 32 vector registers (8 x 3
    accumulators), AVX2 16 (6 x 2)."""
    if width >= 16:
        mr, nv = 8, 3
    elif width == 8:
        mr, nv = 6, 2
    else:
        mr, nv = 4, 2
    return GemmShape(max(1, min(mr, m)), nv, width)


ALoad = Callable[[Expr, Expr], Expr]          # (row, k) -> scalar element of A
BLoad = Callable[[Expr, Expr, int], Expr]     # (k, col, lanes) -> lanes elements of B
# (row, col, value) -> store statement(s) (value has lanes)
CStore = Callable[[Expr, Expr, Expr], "K.Stmt | list"]


@dataclass(frozen=True)
class Gemm:
    """The product C[m, n] = A[m, kd] @ B[kd, n], its operands read through ``a`` and ``b``."""

    m: int
    n: int
    kd: int
    a: ALoad
    b: BLoad


def gemm_loops(low: Lowering, M: int, N: int, Kd: int, a: ALoad, b: BLoad, store: CStore,
               shape: GemmShape, parallel: bool = True, b_cols: int = 0) -> list:
    """The tiled loop nest computing C = A @ B through the given element accessors.

    ``b_cols``: how many columns of B may be read (at least N; more when B is padded). With
    a whole vector readable past the last full one, the last few columns are computed as one
    vector into a scratch tile and copied out; otherwise they fall back to dot products."""
    gemm = Gemm(M, N, Kd, a, b)
    w, mr, dtype = shape.w, shape.mr, shape.dtype
    # Waking the thread pool costs microseconds: small products run on the calling thread.
    parallel = parallel and M * N * Kd >= low.tuning.parallel_min_macs
    stmts: list = []
    full_tiles = N // shape.nr
    n_done = full_tiles * shape.nr
    pieces: list[tuple[int, int, int]] = []  # (first column, tile count, vectors per tile)
    if full_tiles:
        pieces.append((0, full_tiles, shape.nv))
    rest = N - n_done
    if rest >= w:
        pieces.append((n_done, 1, rest // w))
        n_done += (rest // w) * w
    m_tiles = -(-M // mr)

    def wrap(count, body, jt, it):
        # Threads share whichever of column tiles and row tiles there are more of (a thread
        # then reads its B panels from cache for every row tile, or its A rows for every
        # column tile). Blocking the rows as well measured slower here: packed B panels
        # stream well, and every block would cost a thread-pool round trip. With more row
        # tiles, one parallel loop runs over all (column, row) tile pairs, column-major: each
        # B panel stays in cache while all row tiles run over it (row-major order streamed
        # every panel once per row tile: 1024^3 matmul 310 -> 200 GFLOP/s), in one
        # thread-pool round trip instead of one per column tile.
        rb = row_block(low.target, M, mr, Kd, dtype)
        groups = (low.target.cores if low.target else 1) * low.tuning.column_groups_per_core
        # Only where the column groups come out equal: a smaller last group leaves a thread
        # idle at the end (AVX-512's 22 tiles of 48 columns in 4 groups: 2 threads 10% slower).
        if rb and count >= low.tuning.min_blocked_column_tiles and count % groups == 0:
            return _blocked_tiles(low, count, m_tiles, rb, body, jt, it, parallel)
        if m_tiles > count and parallel and count > 1:
            t = low.fresh("t")
            return For(t, as_expr(0), as_expr(count * m_tiles), (
                Decl(jt, t // m_tiles), Decl(it, t % m_tiles), *body), "parallel")
        if m_tiles > count:
            return For(jt, as_expr(0), as_expr(count), (
                For(it, as_expr(0), as_expr(m_tiles), tuple(body),
                    "parallel" if parallel else "serial"),))
        kind = "parallel" if parallel and count > 1 else "serial"
        return For(jt, as_expr(0), as_expr(count), (
            For(it, as_expr(0), as_expr(m_tiles), tuple(body)),), kind)

    for first, count, nv in pieces:
        jt, it = low.fresh("jt"), low.fresh("it")
        n0 = as_expr(first) + jt * (nv * w)
        stmts.append(wrap(count, _micro(low, gemm, it * mr, n0, store, replace(shape, nv=nv)),
                          jt, it))
    if n_done < N and b_cols >= n_done + w:
        tile = f"tile_{low.fresh('t').name}"
        low.scratch.append(K.Buffer(tile, dtype, mr * w))
        jt, it = low.fresh("jt"), low.fresh("it")
        m0, n0 = it * mr, as_expr(n_done)

        def to_tile(row, col, value):
            return K.Store(tile, (row - m0) * w + (col - n0), value)

        body = _micro(low, gemm, m0, n0, to_tile, replace(shape, nv=1))
        r, j = low.fresh("r"), low.fresh("j")
        body.append(For(r, as_expr(0), as_expr(mr), (If(K.cmp("lt", m0 + r, as_expr(M)), (
            For(j, as_expr(0), as_expr(N - n_done), (
                store(m0 + r, n0 + j, K.Load(tile, r * w + j, dtype)),)),)),)))
        stmts.append(wrap(1, body, jt, it))
    elif n_done < N:  # the last columns, fewer than a vector: scalar dot products
        i, j, k, acc = low.fresh("i"), low.fresh("j"), low.fresh("k"), low.fresh("acc", dtype)
        body = [Decl(acc, f32(0.0, dtype)),
                For(k, as_expr(0), as_expr(Kd), (Assign(acc, acc + a(i, k) * b(k, j, 1)),)),
                store(i, j, acc)]
        stmts.append(For(i, as_expr(0), as_expr(M), (
            For(j, as_expr(n_done), as_expr(N - n_done), tuple(body)),)))
    return stmts


def row_block(target: Target | None, M: int, mr: int, Kd: int, dtype: str) -> int:
    """Row tiles per block of A for ``gemm_loops``, or 0 for no blocking (A fits in the
    target's L2): as many as fill half of the L2 with their K-long rows. A block then stays in
    L2 while every column tile's B panel runs over it, instead of all of A streaming from L3
    once per column tile (1024^3 matmul on one thread: AVX2 102 -> 108-111 GFLOP/s, AVX-512
    162 -> 170-189). With A in L2 already it only cost time (5% on ResNet-18 and MobileNetV2
    convolutions), so no zoo model's kernel takes it."""
    row_bytes = Kd * (2 if dtype == "f16" else 4)
    if target is None or M * row_bytes <= target.l2_bytes:
        return 0
    return max(1, target.l2_bytes // 2 // row_bytes // mr)


def _blocked_tiles(low: Lowering, count: int, m_tiles: int, rb: int, body: list, jt: Var,
                   it: Var, parallel: bool) -> For:
    """All (column tile, row tile) pairs of a GEMM whose A exceeds the L2 share, in the
    order [column group][row block][column tile][row tile]: a thread takes whole column
    groups; within one, each block of ``rb`` row tiles stays in L2 while the group's B panels
    run over it."""
    cores = low.target.cores if low.target is not None else 1
    per_group = -(-count // max(1, cores * low.tuning.column_groups_per_core))
    groups = -(-count // per_group)
    blocks = -(-m_tiles // rb)
    inner = per_group * rb
    t, g, ib, rem = low.fresh("t"), low.fresh("g"), low.fresh("ib"), low.fresh("rem")
    inside = K.Binary("and", K.cmp("lt", it, as_expr(m_tiles)), K.cmp("lt", jt, as_expr(count)))
    return For(t, as_expr(0), as_expr(groups * blocks * inner), (
        Decl(g, t // (blocks * inner)), Decl(rem, t % (blocks * inner)),
        Decl(ib, rem // inner),
        Decl(jt, g * per_group + (rem % inner) // rb), Decl(it, ib * rb + rem % rb),
        If(inside, tuple(body))), "parallel" if parallel else "serial")


def _micro(low: Lowering, gemm: Gemm, m0: Expr, n0: Expr, store: CStore, shape: GemmShape,
           init: tuple[Expr, Callable[[Expr, Expr], Expr]] | None = None) -> list:
    """One MR x NV*W register tile of ``gemm`` at row ``m0``, column ``n0``, over the whole K
    loop. ``init``: (cond, load(row, col)): when cond holds, the accumulators start from the
    loaded values instead of zero."""
    mr, nv, w, dtype, M = shape.mr, shape.nv, shape.w, shape.dtype, gemm.m
    accs = [[low.fresh("c", dtype, w) for _ in range(nv)] for _ in range(mr)]
    k = low.fresh("k")
    bvs = [low.fresh("b", dtype, w) for _ in range(nv)]
    zero = Broadcast(f32(0.0, dtype), w)
    body: list = [Decl(acc, zero) for row in accs for acc in row]
    if init is not None:
        cond, load = init
        body.append(If(cond, tuple(Assign(accs[r][v], load(m0 + r, n0 + v * w))
                                   for r in range(mr) for v in range(nv))))
    kbody: list = [Decl(bv, gemm.b(k, n0 + v * w, w)) for v, bv in enumerate(bvs)]
    for r in range(mr):
        # Rows past M (the last, partial row tile) read a valid row and are not stored.
        row = K.minimum(m0 + r, as_expr(M - 1)) if M % mr else m0 + r
        av = Broadcast(gemm.a(row, k), w)
        for v in range(nv):
            kbody.append(Assign(accs[r][v], accs[r][v] + av * bvs[v]))
    body.append(For(k, as_expr(0), as_expr(gemm.kd), tuple(kbody)))
    for r in range(mr):
        stores = []
        for v in range(nv):
            st = store(m0 + r, n0 + v * w, accs[r][v])
            stores.extend(st if isinstance(st, list) else [st])
        if M % mr:
            body.append(If(K.cmp("lt", m0 + r, as_expr(M)), tuple(stores)))
        else:
            body.extend(stores)
    return body


def k_block(Kd: int, target: int = 256) -> int:
    """The K block of ``gemm_kblocked``: the largest divisor of Kd not above ``target`` (at
    least 64), so that one block of a B panel stays in L1; Kd itself when there is none."""
    for kc in range(min(target, Kd), 63, -1):
        if Kd % kc == 0:
            return kc
    return Kd


def gemm_kblocked(low: Lowering, gemm: Gemm, cbuf: str, ldc: int, shape: GemmShape,
                  kc: int) -> list:
    """C = A @ B into the f32 workspace ``cbuf`` (row stride ``ldc``, at least N rounded up to
    NR) in K blocks of ``kc``: for each column tile, each K block of B (KC x NR: a packed
    constant panel's slice) stays in L1 while every row tile of A runs over it, adding to
    the partial sums in C after the first block. For long K, where one tile's whole panel
    would stream from L2 for every row tile.

    Threads take column tiles. All ceil(N / NR) tiles are full: ``gemm.b`` must be readable up
    to that column (the extra columns are computed and never used)."""
    M, N, Kd = gemm.m, gemm.n, gemm.kd
    w, mr, nr = shape.w, shape.mr, shape.nr
    tiles, m_tiles, blocks = -(-N // nr), -(-M // mr), Kd // kc
    jt, kb, it = low.fresh("jt"), low.fresh("kb"), low.fresh("it")
    n0, k0 = jt * nr, kb * kc

    def a_blk(row, kk):
        return gemm.a(row, k0 + kk)

    def b_blk(kk, col, lanes):
        return gemm.b(k0 + kk, col, lanes)

    def store(row, col, value):
        return K.Store(cbuf, row * ldc + col, value)

    def load(row, col):
        return K.Load(cbuf, row * ldc + col, "f32", w)

    micro = _micro(low, Gemm(M, N, kc, a_blk, b_blk), it * mr, n0, store, shape,
                   init=(K.cmp("gt", kb, as_expr(0)), load) if blocks > 1 else None)
    parallel = M * N * Kd >= low.tuning.parallel_min_macs
    if tiles == 1:  # one column tile: threads take row tiles
        return [Decl(jt, as_expr(0)), For(it, as_expr(0), as_expr(m_tiles), (
            For(kb, as_expr(0), as_expr(blocks), tuple(micro)),),
            "parallel" if parallel and m_tiles > 1 else "serial")]
    return [For(jt, as_expr(0), as_expr(tiles), (For(kb, as_expr(0), as_expr(blocks), (
        For(it, as_expr(0), as_expr(m_tiles), tuple(micro)),)),),
        "parallel" if parallel else "serial")]


# ---- packing ---------------------------------------------------------------------------------
def pack_b(b: np.ndarray, nr: int) -> np.ndarray:
    """[K, N] -> [ceil(N/NR), K, NR] panels, zero padded. One copy, read through the [N, K]
    view (a linear layer's weight as stored), whose NR-row blocks transpose in cache: packing
    GPT-2's weights took seconds with a padded [K, N] copy in between."""
    kd, n = b.shape
    tiles, full = -(-n // nr), n // nr
    out = np.empty((tiles, kd, nr), b.dtype)
    bt = b.T
    out[:full] = bt[:full * nr].reshape(full, nr, kd).transpose(0, 2, 1)
    if full < tiles:
        out[full:] = 0
        out[full, :, :n - full * nr] = bt[full * nr:].T
    return out


def pack_a(a: np.ndarray, mr: int) -> np.ndarray:
    """[M, K] -> [ceil(M/MR), K, MR] panels, zero padded (one copy, as pack_b: a padded
    copy in between took a third of packing a ResNet-50's weights)."""
    m, kd = a.shape
    tiles, full = -(-m // mr), m // mr
    out = np.empty((tiles, kd, mr), a.dtype)
    out[:full] = a[:full * mr].reshape(full, mr, kd).transpose(0, 2, 1)
    if full < tiles:
        out[full:] = 0
        out[full, :, :m - full * mr] = a[full * mr:].T
    return out


@dataclass(frozen=True)
class PackedA:
    """A constant A operand packed by ``pack_a`` into ``buffer``: one [M/MR][K][MR] block of
    panels per group (of a grouped convolution, or of Winograd's transformed rows)."""

    buffer: str
    shape: GemmShape
    m: int
    kd: int

    @property
    def m_tiles(self) -> int:
        """Row tiles (of MR rows) per group."""
        return -(-self.m // self.shape.mr)

    def element(self, row: Expr, k: Expr, group: Expr | None = None) -> Expr:
        """A[row, k] of group ``group`` (of the only group when None)."""
        tile, r = row // self.shape.mr, row % self.shape.mr
        panel = tile if group is None else group * self.m_tiles + tile
        return K.Load(self.buffer, (panel * self.kd + k) * self.shape.mr + r, "f32")


@dataclass(frozen=True)
class StridedRows:
    """A [rows, cols] f32 matrix in ``buffer`` from ``base`` on, its rows ``stride`` apart."""

    buffer: str
    base: Expr
    rows: int
    cols: int
    stride: int


def pack_rows(low: Lowering, src: StridedRows, dst: str, dst_base: Expr, nr: int,
              kind: str) -> list:
    """Loops packing ``src`` at run time into ``pack_b``'s panels at ``dst_base`` of ``dst``:
    dst[tile][k][j] = src[k, tile*NR + j], zero past its last column."""
    jt, k, j = low.fresh("jt"), low.fresh("k"), low.fresh("j")
    Kd, N = src.rows, src.cols
    full = N // nr
    stmts: list = []
    if full:
        stmts.append(For(jt, as_expr(0), as_expr(full), (For(k, as_expr(0), as_expr(Kd), (
            For(j, as_expr(0), as_expr(nr), (
                K.Store(dst, dst_base + (jt * Kd + k) * nr + j,
                        K.Load(src.buffer, src.base + k * src.stride + jt * nr + j, "f32")),),
                "vectorized"),)),), kind))
    if N % nr:
        k2, j2 = low.fresh("k"), low.fresh("j")
        col = j2 + full * nr
        value = K.Select(K.cmp("lt", col, as_expr(N)),
                         K.Load(src.buffer, src.base + k2 * src.stride + clamp_index(col, N),
                                "f32"),
                         f32(0.0))
        stmts.append(For(k2, as_expr(0), as_expr(Kd), (For(j2, as_expr(0), as_expr(nr), (
            K.Store(dst, dst_base + (full * Kd + k2) * nr + j2, value),)),)))
    return stmts
