"""Packed, register-blocked GEMM schedules for linear, matmul and convolution.

C[M, N] = A[M, K] @ B[K, N] is computed in tiles of MR rows x NR columns (NR = NV vectors of
the target's width): the accumulators of one tile stay in vector registers over the whole K
loop (a BLIS-style micro-kernel), each step broadcasting one element of A per row and loading
NV vectors of B. Constant operands are packed once at compile time into the order the
micro-kernel reads them: B as [N/NR][K][NR] panels (zero padded), A as [M/MR][K][MR].
Convolutions read B straight from the input for 1x1 stride-1 kernels, otherwise from an
im2col workspace filled by a parallel loop first. The epilogue (bias, activation, residual) is
applied to each vector as it is stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kiln.ir import Node, get_op
from kiln.ir import kernel as K
from kiln.ir.kernel import (
    INDEX,
    Assign,
    Broadcast,
    Const,
    Decl,
    Expr,
    For,
    If,
    Var,
    affine_coef,
    as_expr,
)
from kiln.ir.ops._rules import as_tuple
from kiln.passes.lower import winograd
from kiln.passes.lower.anchors import node_work
from kiln.passes.lower.core import Lowering, clamp_index, f32, unflatten
from kiln.passes.target import Target


@dataclass(frozen=True)
class GemmShape:
    """Micro-kernel geometry for a target: MR rows, NV vectors of W lanes."""

    mr: int
    nv: int
    w: int

    @property
    def nr(self) -> int:
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


def gemm_loops(low: Lowering, M: int, N: int, Kd: int, a: ALoad, b: BLoad, store: CStore,
               shape: GemmShape, dtype: str = "f32", parallel: bool = True,
               b_cols: int = 0) -> list:
    """The tiled loop nest computing C = A @ B through the given element accessors.

    ``b_cols``: how many columns of B may be read (at least N; more when B is padded). With
    a whole vector readable past the last full one, the last few columns are computed as one
    vector into a scratch tile and copied out; otherwise they fall back to dot products."""
    w, mr = shape.w, shape.mr
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
        stmts.append(wrap(count, _micro(low, it * mr, n0, M, Kd, a, b, store, mr, nv, w, dtype),
                          jt, it))
    if n_done < N and b_cols >= n_done + w:
        tile = f"tile_{low.fresh('t').name}"
        low.scratch.append(K.Buffer(tile, dtype, mr * w))
        jt, it = low.fresh("jt"), low.fresh("it")
        m0, n0 = it * mr, as_expr(n_done)

        def to_tile(row, col, value):
            return K.Store(tile, (row - m0) * w + (col - n0), value)

        body = _micro(low, m0, n0, M, Kd, a, b, to_tile, mr, 1, w, dtype)
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


def _micro(low, m0, n0, M, Kd, a, b, store, mr, nv, w, dtype, init=None) -> list:
    """One MR x NV*W register tile over the whole K loop. ``init``: (cond, load(row, col)):
    when cond holds, the accumulators start from the loaded values instead of zero."""
    accs = [[low.fresh("c", dtype, w) for _ in range(nv)] for _ in range(mr)]
    k = low.fresh("k")
    bvs = [low.fresh("b", dtype, w) for _ in range(nv)]
    zero = Broadcast(f32(0.0, dtype), w)
    body: list = [Decl(acc, zero) for row in accs for acc in row]
    if init is not None:
        cond, load = init
        body.append(If(cond, tuple(Assign(accs[r][v], load(m0 + r, n0 + v * w))
                                   for r in range(mr) for v in range(nv))))
    kbody: list = [Decl(bv, b(k, n0 + v * w, w)) for v, bv in enumerate(bvs)]
    for r in range(mr):
        # Rows past M (the last, partial row tile) read a valid row and are not stored.
        row = K.minimum(m0 + r, as_expr(M - 1)) if M % mr else m0 + r
        av = Broadcast(a(row, k), w)
        for v in range(nv):
            kbody.append(Assign(accs[r][v], accs[r][v] + av * bvs[v]))
    body.append(For(k, as_expr(0), as_expr(Kd), tuple(kbody)))
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


def gemm_kblocked(low: Lowering, M: int, N: int, Kd: int, a: ALoad, b: BLoad, cbuf: str,
                  ldc: int, shape: GemmShape, kc: int, parallel: bool = True) -> list:
    """C = A @ B into the workspace ``cbuf`` (row stride ``ldc``, at least N rounded up to NR)
    in K blocks of ``kc``: for each column tile, each K block of B (KC x NR: a packed
    constant panel's slice) stays in L1 while every row tile of A runs over it, adding to
    the partial sums in C after the first block. For long K, where one tile's whole panel
    would stream from L2 for every row tile.

    Threads take column tiles. All ceil(N / NR) tiles are full: ``b`` must be readable up
    to that column (the extra columns are computed and never used)."""
    w, mr, nv, nr = shape.w, shape.mr, shape.nv, shape.nr
    tiles, m_tiles, blocks = -(-N // nr), -(-M // mr), Kd // kc
    jt, kb, it = low.fresh("jt"), low.fresh("kb"), low.fresh("it")
    n0, k0 = jt * nr, kb * kc

    def a_blk(row, kk):
        return a(row, k0 + kk)

    def b_blk(kk, col, lanes):
        return b(k0 + kk, col, lanes)

    def store(row, col, value):
        return K.Store(cbuf, row * ldc + col, value)

    def load(row, col):
        return K.Load(cbuf, row * ldc + col, "f32", w)

    micro = _micro(low, it * mr, n0, M, kc, a_blk, b_blk, store, mr, nv, w, "f32",
                   init=(K.cmp("gt", kb, as_expr(0)), load) if blocks > 1 else None)
    parallel = parallel and M * N * Kd >= low.tuning.parallel_min_macs
    if tiles == 1:  # one column tile: threads take row tiles
        return [Decl(jt, as_expr(0)), For(it, as_expr(0), as_expr(m_tiles), (
            For(kb, as_expr(0), as_expr(blocks), tuple(micro)),),
            "parallel" if parallel and m_tiles > 1 else "serial")]
    return [For(jt, as_expr(0), as_expr(tiles), (For(kb, as_expr(0), as_expr(blocks), (
        For(it, as_expr(0), as_expr(m_tiles), tuple(micro)),)),),
        "parallel" if parallel else "serial")]


# ---- packing of constant operands ------------------------------------------------------------
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
    """[M, K] -> [ceil(M/MR), K, MR] panels, zero padded."""
    m, kd = a.shape
    tiles = -(-m // mr)
    padded = np.zeros((tiles * mr, kd), a.dtype)
    padded[:m] = a
    return np.ascontiguousarray(padded.reshape(tiles, mr, kd).transpose(0, 2, 1))


# ---- epilogue views --------------------------------------------------------------------------
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


# ---- op lowerings ----------------------------------------------------------------------------
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


def lower_linear(low: Lowering, node: Node, final: str, inline: set[str],
                 width: int) -> list | None:
    """x[T, K] @ W^T with W packed at compile time."""
    x, w = node.inputs[:2]
    wv = low.constant_value(w)
    if wv is None or low.dtype(x) != "f32":
        return None
    out = node.outputs[0]
    oshape = low.graph.types[out].shape
    if len(oshape) < 2:
        return None
    T, N = math.prod(oshape[:-1]), oshape[-1]
    Kd = wv.shape[1]
    views = collapsed_views(low, final, out, inline, list(range(len(oshape) - 1)))
    if views is None or N < width:
        return None
    low.view_shapes.update(views)
    shape = micro_shape(width, T)
    bp = low.constant(pack_b(np.asarray(wv.T, np.float32), shape.nr), f"{node.name}_packed")
    bias = low.constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    bias_buf = low.constant(bias.astype(np.float32), f"{node.name}_bias") \
        if bias is not None else None
    if len(node.inputs) > 2 and bias is None:
        return None
    nr = shape.nr
    a = rows_of(low, x, T, Kd)

    def b(k, col, lanes):
        # Panel layout: column col of tile col // NR at position col % NR.
        return K.Load(bp, (col // nr) * (Kd * nr) + k * nr + col % nr, "f32", lanes)

    def store(row, col, value):
        if bias_buf is not None:
            value = value + K.Load(bias_buf, col, "f32", value.lanes)
        return low.store_at(final, [row, col], value, out)

    return gemm_loops(low, T, N, Kd, a, b, store, shape, b_cols=-(-N // nr) * nr)


def lower_conv(low: Lowering, node: Node, final: str, inline: set[str],
               width: int) -> list | None:
    """Convolution as GEMM: out[n, g] = W_g[og, K] @ im2col(x[n, g])[K, OH*OW]."""
    x, w = node.inputs[:2]
    wv = low.constant_value(w)
    if wv is None or low.dtype(x) != "f32":
        return None
    a_ = node.attrs
    in_shape, out = low.shape(x), node.outputs[0]
    oshape = low.graph.types[out].shape
    nd = len(wv.shape) - 2
    stride = as_tuple(a_["stride"], nd, "stride")
    pad = as_tuple(a_["padding"], nd, "padding")
    dil = as_tuple(a_["dilation"], nd, "dilation")
    g = a_["groups"]
    cout, cg = wv.shape[:2]
    og = cout // g
    if og == 1 and cg == 1 and g > 1:
        return lower_depthwise(low, node, final, inline, width)
    if low.is_inline(x):
        return None  # the im2col and direct paths read the input from memory
    ksp = wv.shape[2:]
    Kd = cg * math.prod(ksp)
    sp_out = oshape[2:]
    Nn = math.prod(sp_out)
    if Nn < width:
        return None
    views = collapsed_views(low, final, out, inline, list(range(2, len(oshape))))
    if views is None:
        return None
    low.view_shapes.update(views)
    shape = micro_shape(width, og)
    wmat = wv.reshape(g, og, Kd).astype(np.float32)

    def packed_a() -> str:  # made only on the paths that read it (else dead weight in the image)
        return low.constant(np.stack([pack_a(wmat[i], shape.mr) for i in range(g)]),
                            f"{node.name}_packed")

    m_tiles = -(-og // shape.mr)
    bias = low.constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    if len(node.inputs) > 2 and bias is None:
        return None
    bias_buf = low.constant(bias.astype(np.float32), f"{node.name}_bias") \
        if bias is not None else None
    xb = low.buffer(x)
    direct = all(k == 1 for k in ksp) and all(s == 1 for s in stride) and not any(pad)
    n_var, g_var = low.fresh("n"), low.fresh("grp")
    # Several images: threads take whole images (one thread-pool round trip per conv), each
    # with its own workspaces; one image: the loops inside share the work.
    # Only when the weights are small: with large weights, threads sharing each image read
    # them once per image, where threads on separate images would each stream all of them.
    # Nor when an image's im2col buffer alone outgrows the cache (the ImageNet stem): then
    # both threads are better off streaming one image's columns together.
    tn = low.tuning
    small_weights = wv.nbytes <= tn.image_parallel_max_weight_bytes
    im2col_bytes = 0 if direct else Kd * Nn * 4
    images = oshape[0] if (oshape[0] > 1 and small_weights
                           and im2col_bytes <= tn.image_parallel_max_workspace_bytes
                           and _par(low, node) == "parallel") else 1
    image = n_var if images > 1 else None
    batch_kind = "parallel" if images > 1 else "serial"
    in_sp = in_shape[2:]
    hw_in = math.prod(in_sp)
    x_base = (n_var * in_shape[1] + g_var * cg) * hw_in
    stmts: list = []
    structural = (not direct and nd == 2 and all(s_ == 1 for s_ in stride))
    padded_ok = structural and sp_out[0] * (in_shape[3] + 2 * pad[1]) <= 1.25 * Nn
    fits = {
        "winograd": (tn.winograd and not direct and nd == 2
                     and winograd.fits(wv, stride, dil, g, oshape)),
        "direct_t": not direct and nd == 2 and g == 1,
        "direct_batch": not direct and nd == 2 and g == 1,
        "padded_direct": structural,
        "batched_im2col": not direct and nd == 2 and g == 1 and oshape[0] > 1,
        "gemm": True,
    }

    def default() -> str:  # what the thresholds of the tuning pick
        if fits["winograd"] and winograd.applies(wv, stride, dil, g, oshape, tn):
            return "winograd"
        if fits["direct_t"] and Nn <= tn.direct_t_max_pixels:
            return "direct_t"
        if (fits["direct_batch"] and (oshape[0] > 1 or any(s_ > 1 for s_ in stride))
                and not (padded_ok and images > 1)
                and direct_batch_waste(oshape[0], sp_out, ksp, stride, pad, dil)
                <= tn.direct_batch_max_waste):
            return "direct_batch"
        if padded_ok:
            return "padded_direct"
        if fits["batched_im2col"] and Nn <= tn.batched_im2col_max_pixels:
            return "batched_im2col"
        return "gemm"

    alg = tn.conv_algorithm(conv_signature(node, in_shape, wv))
    if alg is None or not fits[alg]:
        alg = default()
    low.schedule = alg
    if alg == "winograd":
        return winograd.lower_winograd(low, node, final, out, oshape, xb, wv, bias_buf, width,
                                       in_sp, sp_out, pad)
    # Small maps (any batch), several images (unless each thread takes whole images on the
    # per-image path), or a strided convolution: one GEMM over the batch (weights read once
    # per batch), its input split into stride phases instead of im2col; transposed for small
    # maps, whose pixels are then the GEMM's rows (no columns dropped between images).
    if alg == "direct_t":
        return _direct_batch_t(low, node, final, out, oshape, xb, wv, bias_buf, width, cg, og,
                               Kd, in_sp, sp_out, ksp, stride, pad, dil)
    if alg == "direct_batch":
        return _direct_batch(low, node, final, out, oshape, xb, packed_a(), bias_buf, shape,
                             m_tiles, cg, og, Kd, in_sp, sp_out, ksp, stride, pad, dil)
    ap = packed_a()
    if alg == "padded_direct":
        return _padded_direct(low, node, final, out, oshape, xb, ap, bias_buf, shape, m_tiles,
                              cg, og, g, Kd, in_sp, sp_out, ksp, pad, dil, n_var, g_var, x_base,
                              images)
    if alg == "batched_im2col":
        return _batched_im2col(low, node, final, out, oshape, xb, ap, bias_buf, shape, m_tiles,
                               cg, og, Kd, in_sp, sp_out, ksp, stride, pad, dil, width)
    b_cols = Nn + width
    if direct and m_tiles <= tn.direct_unpacked_max_row_tiles:
        # Few output channels: each column of B is read by few row tiles, so the micro-kernel
        # reads it straight from the input's K rows (packing it first would copy the whole
        # input for little reuse). Nothing past a row's end is read.
        b_cols = Nn

        def b(k, col, lanes):
            return K.Load(xb, x_base + k * hw_in + col, "f32", lanes)
    elif direct:
        # Pack B (the input's rows) into [N/NR][K][NR] panels first: the micro-kernel then
        # reads one contiguous stream instead of K rows a whole image apart.
        nr = shape.nr
        b_cols = -(-Nn // nr) * nr
        tiles = -(-Nn // nr)
        per_image = tiles * Kd * nr
        bpk = low.workspace(f"{node.name}_packed_b", "f32", per_image * images)
        pbase = image * per_image if image is not None else Const(0, INDEX)
        stmts += _pack_rows(low, xb, x_base, bpk, pbase, Kd, Nn, hw_in, nr, _par(low, node))

        def b(k, col, lanes):
            return K.Load(bpk, pbase + (col // nr) * (Kd * nr) + k * nr + col % nr, "f32",
                          lanes)
    else:
        # One vector of slack: the last row's tail vector reads past it into junk.
        per_image = Kd * Nn + width
        col_buf = low.workspace(f"{node.name}_cols", "f32", per_image * images)
        col_base = image * per_image if image is not None else Const(0, INDEX)
        stmts += _im2col(low, xb, x_base, col_buf, cg, in_sp, sp_out, ksp, stride, pad, dil,
                         _par(low, node), image, images, width)

        def b(k, col, lanes):
            return K.Load(col_buf, col_base + k * Nn + col, "f32", lanes)

    def a(row, k):
        tile, r = row // shape.mr, row % shape.mr
        return K.Load(ap, ((g_var * m_tiles + tile) * Kd + k) * shape.mr + r, "f32")

    def store(row, col, value):
        co = g_var * og + row
        if bias_buf is not None:
            value = value + K.Broadcast(K.Load(bias_buf, co, "f32"), value.lanes) \
                if value.lanes > 1 else value + K.Load(bias_buf, co, "f32")
        return low.store_at(final, [n_var, co, col], value, out)

    stmts += gemm_loops(low, og, Nn, Kd, a, b, store, shape, b_cols=b_cols)
    return [For(n_var, as_expr(0), as_expr(oshape[0]), (
        For(g_var, as_expr(0), as_expr(g), tuple(stmts)),), batch_kind)]


def conv_signature(node: Node, in_shape: Sequence[int], wv: np.ndarray) -> str:
    """What a convolution's best algorithm depends on: its input and weight shapes and its
    attributes (the key of ``Tuning.conv_algorithms`` and of the tuning database)."""
    a = node.attrs
    return (f"conv x{list(in_shape)} w{list(wv.shape)} s{list(as_tuple(a['stride'], 2, 's'))}"
            f" p{list(as_tuple(a['padding'], 2, 'p'))} d{list(as_tuple(a['dilation'], 2, 'd'))}"
            f" g{a['groups']}").replace(" ", "")


def _batched_im2col(low, node, final, out, oshape, xb, ap, bias_buf, shape, m_tiles, cg, og,
                    Kd, in_sp, sp_out, ksp, stride, pad, dil, width) -> list:
    """Several images as one GEMM: the im2col columns of image n follow those of image n-1,
    so N = images x pixels and small feature maps still fill whole register tiles. When the
    pixels per image are not a multiple of the vector width, vectors that may straddle two
    images are stored element by element."""
    images, Nn = oshape[0], math.prod(sp_out)
    Nt = images * Nn
    col_buf = low.workspace(f"{node.name}_cols", "f32", Kd * Nt + width)
    n_var = low.fresh("n")
    x_base = n_var * (cg * math.prod(in_sp))
    # Threads take whole images (one thread-pool round trip, not one per image).
    fill = _im2col(low, xb, x_base, col_buf, cg, in_sp, sp_out, ksp, stride, pad, dil,
                   "serial", images=images, row_len=Nt, col_offset=n_var * Nn,
                   padded_image=n_var)

    def a(row, k):
        tile, r = row // shape.mr, row % shape.mr
        return K.Load(ap, (tile * Kd + k) * shape.mr + r, "f32")

    # Then pack the columns into contiguous [N/NR][K][NR] panels for the micro-kernel.
    nr = shape.nr
    tiles = -(-Nt // nr)
    packed = low.workspace(f"{node.name}_packed_b", "f32", tiles * Kd * nr)
    pack = _pack_rows(low, col_buf, Const(0, INDEX), packed, Const(0, INDEX), Kd, Nt, Nt, nr,
                      _par(low, node))

    def b(k, col, lanes):
        return K.Load(packed, (col // nr) * (Kd * nr) + k * nr + col % nr, "f32", lanes)

    lane_tile = None
    if Nn % width:
        # Vectors may straddle two images: they go through a small scratch and are stored one
        # element at a time.
        lane_tile = f"lanes_{low.fresh('t').name}"
        low.scratch.append(K.Buffer(lane_tile, "f32", width))

    def store(row, col, value):
        if bias_buf is not None:
            bias = K.Load(bias_buf, row, "f32")
            value = value + (K.Broadcast(bias, value.lanes) if value.lanes > 1 else bias)
        if lane_tile is None or value.lanes == 1:
            return low.store_at(final, [col // Nn, row, col % Nn], value, out)
        j = low.fresh("j")
        c = col + j
        return [K.Store(lane_tile, Const(0, INDEX), value),
                For(j, as_expr(0), as_expr(value.lanes), (
                    low.store_at(final, [c // Nn, row, c % Nn],
                                 K.Load(lane_tile, j, "f32"), out),))]

    gemm = gemm_loops(low, og, Nt, Kd, a, b, store, shape, b_cols=tiles * nr)
    return [For(n_var, as_expr(0), as_expr(images), tuple(fill), _par(low, node)), *pack, *gemm]


def _padded_direct(low, node, final, out, oshape, xb, ap, bias_buf, shape, m_tiles, cg, og, g,
                   Kd, in_sp, sp_out, ksp, pad, dil, n_var, g_var, x_base, images) -> list:
    """Stride-1 2-d convolution without im2col.

    The input is copied once into a zero-padded image; output position (oh, ow) is then
    column oh*Wp + ow of a GEMM whose B element (k, col) is padded[koff[k] + col], with
    koff[k] the offset of channel and kernel tap k. Columns with ow >= OW are computed and
    dropped; the results go to a workspace and the epilogue copies the real ones out."""
    H, W = in_sp
    OH, OW = sp_out
    Hp, Wp = H + 2 * pad[0], W + 2 * pad[1]
    kh_, kw_ = ksp
    npad = cg * Hp * Wp
    slack = dil[1] * (kw_ - 1) + 2 * shape.nr  # reads past the image land in dropped columns
    padded = low.workspace(f"{node.name}_padded", "f32", (npad + slack) * images)
    Nc = OH * Wp
    cbuf = low.workspace(f"{node.name}_acc", "f32", og * Nc * images)
    pbase = n_var * (npad + slack) if images > 1 else Const(0, INDEX)
    cbase = n_var * (og * Nc) if images > 1 else Const(0, INDEX)
    koff = np.array([ci * Hp * Wp + a * dil[0] * Wp + b * dil[1]
                     for ci in range(cg) for a in range(kh_) for b in range(kw_)], np.int64)
    kb = low.constant(koff, f"{node.name}_koff")
    ci, r, c = low.fresh("ci"), low.fresh("r"), low.fresh("c")
    ir, ic = r - pad[0], c - pad[1]
    ok = K.Binary("and", K.Binary("and", K.cmp("ge", ir, as_expr(0)), K.cmp("lt", ir, as_expr(H))),
                  K.Binary("and", K.cmp("ge", ic, as_expr(0)), K.cmp("lt", ic, as_expr(W))))
    src = x_base + (ci * H + clamp_index(ir, H)) * W + clamp_index(ic, W)
    fill = For(ci, as_expr(0), as_expr(cg), (For(r, as_expr(0), as_expr(Hp), (
        For(c, as_expr(0), as_expr(Wp), (
            K.Store(padded, pbase + (ci * Hp + r) * Wp + c,
                    K.Select(ok, K.Load(xb, src, "f32"), f32(0.0))),)),)),), _par(low, node))

    def a(row, k):
        tile, rr = row // shape.mr, row % shape.mr
        return K.Load(ap, ((g_var * m_tiles + tile) * Kd + k) * shape.mr + rr, "f32")

    def b(k, col, lanes):
        return K.Load(padded, pbase + K.Load(kb, k, "i64") + col, "f32", lanes)

    def to_acc(row, col, value):
        return K.Store(cbuf, cbase + row * Nc + col, value)

    gemm = gemm_loops(low, og, Nc, Kd, a, b, to_acc, shape, b_cols=Nc + shape.w)
    co, oh, ow = low.fresh("co"), low.fresh("oh"), low.fresh("ow")
    value = K.Load(cbuf, cbase + co * Nc + oh * Wp + ow, "f32")
    if bias_buf is not None:
        value = value + K.Load(bias_buf, g_var * og + co, "f32")
    epilogue = For(co, as_expr(0), as_expr(og), (For(oh, as_expr(0), as_expr(OH), (
        For(ow, as_expr(0), as_expr(OW), (
            low.store_at(final, [n_var, g_var * og + co, oh * OW + ow], value, out),),
            "vectorized"),)),), _par(low, node))
    return [For(n_var, as_expr(0), as_expr(oshape[0]), (
        For(g_var, as_expr(0), as_expr(g), (fill, *gemm, epilogue)),),
        "parallel" if images > 1 else "serial")]


@dataclass(frozen=True)
class _PhaseLayout:
    """Where the batched direct convolutions put their input (see ``_direct_batch``): per
    input channel, one plane of Hq rows x Wrow columns for each stride phase, images S columns
    apart along the rows; ``koff[k]``: the offset of tap k = (ci, a, b) from its output
    position; ``nc``: the GEMM columns up to the last image's last output."""

    phases: list
    hq: int
    wq: int
    s: int
    wrow: int
    plane: int
    per_ci: int
    nc: int
    koff: np.ndarray


def _phase_layout(n_img, cg, sp_out, ksp, stride, pad, dil) -> _PhaseLayout:
    OH, OW = sp_out
    kh_, kw_ = ksp
    sh, sw = stride
    dh, dw = dil
    rph = sorted({(a * dh) % sh for a in range(kh_)})
    cph = sorted({(b * dw) % sw for b in range(kw_)})
    phases = [(pr, pc) for pr in rph for pc in cph]
    hq = OH + ((kh_ - 1) * dh) // sh
    wq = OW + ((kw_ - 1) * dw) // sw
    s = wq - pad[1] if sw == 1 else wq   # stride 1: neighbours share their zero padding
    wrow = (n_img - 1) * s + wq
    plane = hq * wrow
    tap = np.array([phases.index(((a * dh) % sh, (b * dw) % sw)) * plane
                    + ((a * dh) // sh) * wrow + (b * dw) // sw
                    for a in range(kh_) for b in range(kw_)], np.int64)
    koff = (np.arange(cg, dtype=np.int64)[:, None] * (len(phases) * plane) + tap).reshape(-1)
    return _PhaseLayout(phases, hq, wq, s, wrow, plane, len(phases) * plane,
                        (OH - 1) * wrow + (n_img - 1) * s + OW, koff)


def _direct_batch(low, node, final, out, oshape, xb, ap, bias_buf, shape, m_tiles, cg, og,
                  Kd, in_sp, sp_out, ksp, stride, pad, dil) -> list:
    """All images of a batch as one GEMM without im2col, for any stride (2-d, one group).

    Each image's zero-padded input P is split into its stride phases, Q[pr, pc][i, j] =
    P[i*sh + pr, j*sw + pc] (only the phases some kernel tap reads), and the images lie side
    by side along every phase row, S columns apart. Tap (a, b) of output (oh, ow) of image n
    reads phase ((a*dh) % sh, (b*dw) % sw) at row oh + a*dh//sh, column n*S + ow + b*dw//sw:
    at a fixed offset koff[k] from column oh*Wrow + n*S + ow. So B(k, col) = Q[koff[k] + col]
    and the whole batch is one GEMM with N ~ OH * Wrow columns, its weights read once per batch
    rather than once per image. Columns between images are computed and dropped: with stride
    1 neighbouring images share their zero padding (S = W + pad), so few are. The GEMM writes
    a workspace; the epilogue copies the real columns out through the fused ops."""
    n_img = oshape[0]
    OH, OW = sp_out
    lay = _phase_layout(n_img, cg, sp_out, ksp, stride, pad, dil)
    Wrow, S, Nc = lay.wrow, lay.s, lay.nc
    ldc = -(-Nc // shape.nr) * shape.nr      # every column tile full
    slack = Wrow + 3 * shape.nr   # reads past the last plane land in dropped columns
    q = low.workspace(f"{node.name}_phases", "f32", cg * lay.per_ci + slack)
    cbuf = low.workspace(f"{node.name}_acc", "f32", og * ldc)
    kb = low.constant(lay.koff, f"{node.name}_koff")
    stmts = _fill_phases(low, node, xb, q, cg, lay, n_img, in_sp, stride, pad)

    def a(row, k):
        tile, rr = row // shape.mr, row % shape.mr
        return K.Load(ap, (tile * Kd + k) * shape.mr + rr, "f32")

    def b(k, col, lanes):
        return K.Load(q, K.Load(kb, k, "i64") + col, "f32", lanes)

    def to_acc(row, col, value):
        return K.Store(cbuf, row * ldc + col, value)

    stmts += gemm_loops(low, og, Nc, Kd, a, b, to_acc, shape, b_cols=ldc)
    co, n, oh, ow = low.fresh("co"), low.fresh("n"), low.fresh("oh"), low.fresh("ow")
    value = K.Load(cbuf, co * ldc + oh * Wrow + n * S + ow, "f32")
    if bias_buf is not None:
        value = value + K.Load(bias_buf, co, "f32")
    stmts.append(For(co, as_expr(0), as_expr(og), (For(n, as_expr(0), as_expr(n_img), (
        For(oh, as_expr(0), as_expr(OH), (
            For(ow, as_expr(0), as_expr(OW), (
                low.store_at(final, [n, co, oh * OW + ow], value, out),), "vectorized"),)),)),),
        _par(low, node)))
    return stmts


def _direct_batch_t(low, node, final, out, oshape, xb, wv, bias_buf, width, cg, og, Kd,
                    in_sp, sp_out, ksp, stride, pad, dil) -> list:
    """The batched direct convolution transposed: output pixels are the GEMM's rows and output
    channels its vector columns, C^T[pixel, co] = sum_k Q[koff[k] + pos[pixel]] * W^T[k, co].

    The phase buffer Q is the one of ``_direct_batch``; but a pixel's value is broadcast from
    its own position pos[pixel], so no column between images is computed, and the weights are
    packed at compile time into contiguous [K][NR] panels that stream from memory once per
    batch (each stays in L2 while every pixel tile runs over it). For small feature maps,
    where the gaps between images cost most. The result goes to a workspace ([pixel, co]) and
    the epilogue writes it out in NCHW order through the fused ops."""
    n_img = oshape[0]
    OH, OW = sp_out
    lay = _phase_layout(n_img, cg, sp_out, ksp, stride, pad, dil)
    q = low.workspace(f"{node.name}_phases", "f32", cg * lay.per_ci)
    nn, oo, ww = np.meshgrid(np.arange(n_img), np.arange(OH), np.arange(OW), indexing="ij")
    stmts = _fill_phases(low, node, xb, q, cg, lay, n_img, in_sp, stride, pad)
    return stmts + _gemm_transposed(low, node, final, out, oshape, wv, bias_buf, width, og, Kd,
                                    q, lay.koff, (nn * lay.s + oo * lay.wrow + ww).reshape(-1))


def _gemm_transposed(low, node, final, out, oshape, wv, bias_buf, width, og, Kd, q: str,
                     koff: np.ndarray, pos: np.ndarray) -> list:
    """out[n, co, s] = sum_k q[koff[k] + pos[p]] * W[co, k] for pixel p = (n, s): output pixels
    are the GEMM's rows (each broadcast from its own position), output channels its vector
    columns over weights packed at compile time into contiguous [K][NR] panels, in K blocks
    (gemm_kblocked). The result goes to a workspace ([pixel, co]) that the epilogue writes out
    in NCHW order through the fused ops."""
    n_img, hw = oshape[0], math.prod(oshape[2:])
    P = n_img * hw
    kb = low.constant(koff.astype(np.int64), f"{node.name}_koff")
    pb = low.constant(pos.astype(np.int64), f"{node.name}_pos")
    if width >= 16 and og % (4 * width) == 0:
        shape = GemmShape(6, 4, width)
    elif og <= width:  # one vector of output channels: more pixel rows per tile instead
        shape = GemmShape(min(12, P), 1, width)
    else:
        shape = micro_shape(width, P)
    nr = shape.nr
    wt = np.asarray(wv.reshape(og, Kd).T, np.float32)
    wp = low.constant(pack_b(wt, nr), f"{node.name}_packed_t")
    ldc = -(-og // nr) * nr

    def a(row, k):
        return K.Load(q, K.Load(kb, k, "i64") + K.Load(pb, row, "i64"), "f32")

    def b(k, col, lanes):
        return K.Load(wp, (col // nr) * (Kd * nr) + k * nr + col % nr, "f32", lanes)

    cbuf = low.workspace(f"{node.name}_acc", "f32", P * ldc)
    stmts = gemm_kblocked(low, P, og, Kd, a, b, cbuf, ldc, shape,
                          k_block(Kd, low.tuning.direct_t_kc))
    n, co, sp = low.fresh("n"), low.fresh("co"), low.fresh("s")
    value = K.Load(cbuf, (n * hw + sp) * ldc + co, "f32")
    if bias_buf is not None:
        value = value + K.Load(bias_buf, co, "f32")
    stmts.append(For(co, as_expr(0), as_expr(og), (For(n, as_expr(0), as_expr(n_img), (
        For(sp, as_expr(0), as_expr(hw), (
            low.store_at(final, [n, co, sp], value, out),), "vectorized"),)),), _par(low, node)))
    return stmts


def _fill_phases(low, node, xb, q, cg, lay: _PhaseLayout, n_img, in_sp, stride, pad) -> list:
    """Q[ci, phase (pr, pc), i, n*S + j] = P_n[ci, i*sh + pr, j*sw + pc] (P: the zero-padded
    input of image n): zero each channel's phases, then copy the images' rows in."""
    H, W = in_sp
    sh, sw = stride
    ph, pw = pad
    per_ci, plane, Hq, Wq, Wrow, S = lay.per_ci, lay.plane, lay.hq, lay.wq, lay.wrow, lay.s
    ci, i0v = low.fresh("ci"), low.fresh("i")
    fill: list = [For(i0v, as_expr(0), as_expr(per_ci),
                      (K.Store(q, ci * per_ci + i0v, f32(0.0)),), "vectorized")]
    for p, (pr, pc) in enumerate(lay.phases):
        r0 = max(0, -(-(ph - pr) // sh))
        r1 = min(Hq, -(-(H + ph - pr) // sh))
        j0 = max(0, -(-(pw - pc) // sw))
        j1 = min(Wq, -(-(W + pw - pc) // sw))
        if r1 <= r0 or j1 <= j0:
            continue
        n, r, j = low.fresh("n"), low.fresh("r"), low.fresh("j")
        src = ((n * cg + ci) * H + (r * sh + pr - ph)) * W + j * sw + (pc - pw)
        dst = ci * per_ci + p * plane + r * Wrow + n * S + j
        fill.append(For(n, as_expr(0), as_expr(n_img), (For(r, as_expr(r0), as_expr(r1 - r0), (
            For(j, as_expr(j0), as_expr(j1 - j0), (K.Store(q, dst, K.Load(xb, src, "f32")),),
                "vectorized"),)),)))   # strided loads when sw > 1 (see passes/vectorize)
    return [For(ci, as_expr(0), as_expr(cg), tuple(fill), _par(low, node))]


def direct_batch_waste(n_img, sp_out, ksp, stride, pad, dil) -> float:
    """Columns the batched direct GEMM computes per output pixel (1.0: none wasted)."""
    lay = _phase_layout(n_img, 1, sp_out, ksp, stride, pad, dil)
    return lay.nc / (n_img * math.prod(sp_out))


def lower_depthwise(low: Lowering, node: Node, final: str, inline: set[str],
                    width: int) -> list | None:
    """Depthwise 2-d convolution (one filter per channel), vectorized along output rows and
    reading the input in place.

    The output plane splits into an interior, where every kernel tap lands inside the image
    (plain vector loads, strided ones for stride 2), and a border of a few rows and columns
    whose taps test their bounds one element at a time. No padded copy is made: on large maps
    the layer is limited by memory traffic, and a copy would double it."""
    x, w = node.inputs[:2]
    wv = low.constant_value(w)
    if wv is None or wv.ndim != 4 or low.dtype(x) != "f32" or low.is_inline(x):
        return None
    n_, c_, H, W = low.shape(x)
    if wv.shape[:2] != (c_, 1):
        return None  # one filter per input channel only (no channel multiplier)
    a_ = node.attrs
    sh, sw = as_tuple(a_["stride"], 2, "stride")
    ph_, pw = as_tuple(a_["padding"], 2, "padding")
    dh, dw = as_tuple(a_["dilation"], 2, "dilation")
    out = node.outputs[0]
    _, _, OH, OW = low.graph.types[out].shape
    kh_, kw_ = wv.shape[2:]
    wb = low.constant(wv.reshape(c_, kh_ * kw_).astype(np.float32), f"{node.name}_w")
    bias = low.constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    if len(node.inputs) > 2 and bias is None:
        return None
    bb = low.constant(bias.astype(np.float32), f"{node.name}_b") if bias is not None else None
    xb = low.buffer(x)
    nv, cv = low.fresh("n"), low.fresh("c")
    base = (nv * c_ + cv) * (H * W)
    init = K.Load(bb, cv, "f32") if bb is not None else f32(0.0)

    def interior_range(n_out, size, stride, pad, taps, dil):
        # Outputs o with 0 <= o*stride - pad and o*stride - pad + (taps-1)*dil < size.
        lo = -(-pad // stride)
        hi = (size - 1 - (taps - 1) * dil + pad) // stride + 1
        lo, hi = min(max(lo, 0), n_out), min(max(hi, 0), n_out)
        return (lo, hi) if hi > lo else (n_out, n_out)

    if H * W <= low.tuning.depthwise_padded_max_pixels and (sh, sw, dw) == (1, 1, 1):
        return _depthwise_padded(low, node, final, out, xb, wb, init, nv, cv, n_, c_, H, W, OH,
                                 OW, kh_, kw_, sh, sw, ph_, pw, dh)
    r0, r1 = interior_range(OH, H, sh, ph_, kh_, dh)
    c0, c1 = interior_range(OW, W, sw, pw, kw_, dw)

    def body(oh, ow, guarded):
        acc = low.fresh("acc", "f32")
        stmts: list = [Decl(acc, init)]
        for a in range(kh_):
            for b in range(kw_):
                ih, iw = oh * sh + (a * dh - ph_), ow * sw + (b * dw - pw)
                wt = K.Load(wb, cv * (kh_ * kw_) + (a * kw_ + b), "f32")
                if guarded:
                    ok = K.Binary("and", K.Binary("and", K.cmp("ge", ih, as_expr(0)),
                                                  K.cmp("lt", ih, as_expr(H))),
                                  K.Binary("and", K.cmp("ge", iw, as_expr(0)),
                                           K.cmp("lt", iw, as_expr(W))))
                    v = K.Select(ok, K.Load(xb, base + clamp_index(ih, H) * W
                                            + clamp_index(iw, W), "f32"), f32(0.0))
                else:
                    v = K.Load(xb, base + ih * W + iw, "f32")
                stmts.append(Assign(acc, acc + wt * v))
        stmts.append(low.store_at(final, [nv, cv, oh, ow], acc, out))
        return stmts

    def cols(oh, lo, hi, guarded, kind="serial"):
        ow = low.fresh("ow")
        return For(ow, as_expr(lo), as_expr(hi - lo), tuple(body(oh, ow, guarded)), kind)

    def rows(lo, hi, interior):
        if hi <= lo:
            return []
        oh = low.fresh("oh")
        if interior:
            inner = [cols(oh, 0, c0, True), cols(oh, c0, c1, False, "vectorized"),
                     cols(oh, c1, OW, True)]
            inner = [f for f in inner if int(f.extent.value) > 0]
        else:
            inner = [cols(oh, 0, OW, True)]
        return [For(oh, as_expr(lo), as_expr(hi - lo), tuple(inner))]

    compute = rows(0, r0, False) + rows(r0, r1, True) + rows(r1, OH, False)
    kind = _par(low, node)
    return [For(nv, as_expr(0), as_expr(n_), (
        For(cv, as_expr(0), as_expr(c_), tuple(compute), kind if n_ == 1 else "serial"),),
        kind if n_ > 1 else "serial")]


def _depthwise_padded(low, node, final, out, xb, wb, init, nv, cv, n_, c_, H, W, OH, OW, kh_,
                      kw_, sh, sw, ph_, pw, dh) -> list:
    """Depthwise convolution of a small map over a zero-padded, phase-split copy of each
    channel (a per-thread scratch, as for pooling): every output row is one vector loop
    without bounds tests. On small maps the border, tested element by element in place, is
    most of the plane, and the copy costs little."""
    Hp = max(H + 2 * ph_, (OH - 1) * sh + dh * (kh_ - 1) + 1)
    Wj = -(-(max(W + 2 * pw, (OW - 1) * sw + kw_)) // sw)
    scratch = f"dw_{low.fresh('s').name}"
    low.scratch.append(K.Buffer(scratch, "f32", Hp * sw * Wj))
    fill = _fill_padded(low, xb, (nv * c_ + cv) * (H * W), scratch, Const(0, INDEX), H, W, ph_,
                        pw, sw, Hp, Wj, f32(0.0))
    def tap(acc, v, p, q):
        return acc + K.Load(wb, cv * (kh_ * kw_) + (p * kw_ + q), "f32") * v

    return _window_nest(low, node, final, out, scratch, fill, nv, cv, n_, c_, OH, OW, kh_, kw_,
                        sh, sw, dh, Wj, init, tap, lambda acc: acc)


def lower_pool(low: Lowering, node: Node, final: str, inline: set[str],
               width: int) -> list | None:
    """2-d max / average pooling vectorized along output rows, over a padded phase-split
    copy of each channel (as for depthwise convolution; padding is -inf for max, 0 for
    average). Average pooling takes this path only when every window has the same divisor."""
    x = node.inputs[0]
    a_ = node.attrs
    if len(a_["kernel"]) != 2 or low.dtype(x) != "f32":
        return None
    kh_, kw_ = a_["kernel"]
    sh, sw = as_tuple(a_["stride"] if a_["stride"] is not None else a_["kernel"], 2, "stride")
    ph_, pw = as_tuple(a_["padding"], 2, "padding")
    dh, dw = as_tuple(a_.get("dilation", 1), 2, "dilation")
    n_, c_, H, W = low.shape(x)
    out = node.outputs[0]
    _, _, OH, OW = low.graph.types[out].shape
    is_max = node.op == "max_pool"
    if dw != 1:
        return None
    if not is_max:
        overhang = ((OH - 1) * sh + kh_ > H + 2 * ph_) or ((OW - 1) * sw + kw_ > W + 2 * pw)
        if overhang or (not a_["count_include_pad"] and (ph_ or pw)):
            return None
    Hp = max(H + 2 * ph_, (OH - 1) * sh + dh * (kh_ - 1) + 1)
    Wj = -(-(max(W + 2 * pw, (OW - 1) * sw + kw_)) // sw)
    scratch = f"pool_{low.fresh('s').name}"
    low.scratch.append(K.Buffer(scratch, "f32", Hp * sw * Wj))
    nv, cv = low.fresh("n"), low.fresh("c")
    pad_value = f32(float("-inf") if is_max else 0.0)
    if low.is_inline(x):  # e.g. a channels-last tensor seen through a permute
        xb, read = None, lambda r, col: low.element(x, [nv, cv, r, col])
    else:
        xb, read = low.buffer(x), None
    fill = _fill_padded(low, xb, (nv * c_ + cv) * (H * W), scratch, Const(0, INDEX), H, W, ph_,
                        pw, sw, Hp, Wj, pad_value, read)
    return _window_nest(low, node, final, out, scratch, fill, nv, cv, n_, c_, OH, OW, kh_, kw_,
                        sh, sw, dh, Wj, pad_value,
                        lambda acc, v, p, q: K.maximum(acc, v) if is_max else acc + v,
                        lambda acc: acc if is_max else acc * f32(1.0 / (kh_ * kw_)))


def _window_nest(low, node, final, out, scratch, fill, nv, cv, n_, c_, OH, OW, kh_, kw_, sh, sw,
                 dh, Wj, init, tap, finish) -> list:
    """The loop nest of a window op (depthwise conv, pooling) over a padded phase-split copy
    of each channel: per (image, channel) the ``fill`` statements, then for each output row a
    vector loop folding the kh x kw taps with ``tap(acc, value, p, q)`` from ``init`` and
    storing ``finish(acc)``. Images run in parallel, or channels when there is one image."""
    oh, ow = low.fresh("oh"), low.fresh("ow")
    acc = low.fresh("acc", "f32")
    taps: list = []
    for p in range(kh_):
        for q in range(kw_):
            v = K.Load(scratch, ((oh * sh + p * dh) * sw + (q % sw)) * Wj + ow + (q // sw), "f32")
            taps.append(Assign(acc, tap(acc, v, p, q)))
    compute = For(oh, as_expr(0), as_expr(OH), (For(ow, as_expr(0), as_expr(OW), (
        Decl(acc, init), *taps, low.store_at(final, [nv, cv, oh, ow], finish(acc), out)),
        "vectorized"),))
    kind = _par(low, node)
    return [For(nv, as_expr(0), as_expr(n_), (
        For(cv, as_expr(0), as_expr(c_), (*fill, compute), kind if n_ == 1 else "serial"),),
        kind if n_ > 1 else "serial")]


def _pack_rows(low, src, base, dst, dbase, Kd, N, row_stride, nr, kind) -> list:
    """dst[tile][k][j] = src[base + k*row_stride + tile*NR + j], zero past column N."""
    jt, k, j = low.fresh("jt"), low.fresh("k"), low.fresh("j")
    full = N // nr
    stmts: list = []
    if full:
        stmts.append(For(jt, as_expr(0), as_expr(full), (For(k, as_expr(0), as_expr(Kd), (
            For(j, as_expr(0), as_expr(nr), (
                K.Store(dst, dbase + (jt * Kd + k) * nr + j,
                        K.Load(src, base + k * row_stride + jt * nr + j, "f32")),),
                "vectorized"),)),), kind))
    if N % nr:
        k2, j2 = low.fresh("k"), low.fresh("j")
        col = j2 + full * nr
        value = K.Select(K.cmp("lt", col, as_expr(N)),
                         K.Load(src, base + k2 * row_stride + clamp_index(col, N), "f32"),
                         f32(0.0))
        stmts.append(For(k2, as_expr(0), as_expr(Kd), (For(j2, as_expr(0), as_expr(nr), (
            K.Store(dst, dbase + (full * Kd + k2) * nr + j2, value),)),)))
    return stmts


def _fill_padded(low: Lowering, src: str | None, src_base: Expr, dst: str, dst_base: Expr,
                 H: int, W: int, pad_h: int, pad_w: int, sw: int, Hp: int, Wj: int,
                 pad_value: Expr, read: Callable[[Expr, Expr], Expr] | None = None) -> list:
    """Copy one H x W image into a padded, phase-split scratch image: column j*sw + ph of
    padded row r lands at dst[(r*sw + ph)*Wj + j]; everything else holds ``pad_value``.

    A vector fill of the whole scratch, then a copy of the interior whose bounds are known
    here, so neither loop tests bounds per element (the copy is a plain vector copy when
    sw is 1). ``read(row, col)``, when given, computes an image element instead of loading it
    from ``src`` (an input made by an inlined producer, e.g. a channels-last permute)."""
    i, r = low.fresh("i"), low.fresh("r")
    stmts: list = [For(i, as_expr(0), as_expr(Hp * sw * Wj),
                       (K.Store(dst, dst_base + i, pad_value),), "vectorized")]
    rows = min(H, Hp - pad_h)
    for ph in range(sw):
        j0 = max(0, -(-(pad_w - ph) // sw))
        j1 = min(Wj, -(-(W + pad_w - ph) // sw))
        if j1 <= j0 or rows <= 0:
            continue
        jj = low.fresh("j")
        col = jj * sw + (ph - pad_w)
        value = read(r, col) if read is not None else K.Load(src, src_base + r * W + col, "f32")
        copy = K.Store(dst, dst_base + ((r + pad_h) * sw + ph) * Wj + jj, value)
        stmts.append(For(r, as_expr(0), as_expr(rows), (
            For(jj, as_expr(j0), as_expr(j1 - j0), (copy,), "vectorized" if sw == 1
                else "serial"),)))
    return stmts


def _par(low: Lowering, node: Node) -> str:
    """Parallel when the op has enough work to pay for waking the thread pool."""
    return "parallel" if node_work(low, node) >= low.tuning.parallel_min_work else "serial"


def _im2col(low, xb, x_base, col_buf, cg, in_sp, sp_out, ksp, stride, pad, dil,
            kind: str = "parallel", image: Expr | None = None, images: int = 1,
            col_pad: int = 0, row_len: int | None = None,
            col_offset: Expr | None = None, padded_image: Expr | None = None) -> list:
    """Fill col[k, n] = x[ci, o*stride + kk*dil - pad] (0 outside), k = (ci, kernel offsets).

    The input is first copied into a zero-padded workspace, so the im2col loops need no
    bounds checks and their innermost loop is a plain (vectorizable) copy when stride is 1.
    With ``image`` set, each of ``images`` images has its own padded copy and its own block
    of ``col`` (K*N + ``col_pad`` elements). ``row_len``/``col_offset`` place this image's
    columns inside longer rows (several images in one GEMM); ``padded_image`` alone gives each
    of ``images`` images its own padded copy (for threads filling images in parallel)."""
    nd = len(ksp)
    stmts: list = []
    src_buf, src_sp = xb, list(in_sp)
    if any(pad):
        src_sp = [n + 2 * p for n, p in zip(in_sp, pad)]
        per_image = cg * math.prod(src_sp)
        src_buf = low.workspace("padded", "f32", per_image * images)
        pad_image = padded_image if padded_image is not None else image
        pad_base = pad_image * per_image if pad_image is not None else Const(0, INDEX)
        ci, ivs = low.fresh("ci"), [low.fresh("p") for _ in range(nd)]
        ok, src, dst = None, Const(0, INDEX), Const(0, INDEX)
        for d in range(nd):
            i = ivs[d] - pad[d]
            inside = K.Binary("and", K.cmp("ge", i, as_expr(0)), K.cmp("lt", i, as_expr(in_sp[d])))
            ok = inside if ok is None else K.Binary("and", ok, inside)
            src = src * in_sp[d] + clamp_index(i, in_sp[d])
            dst = dst * src_sp[d] + ivs[d]
        value = K.Select(ok, K.Load(xb, x_base + ci * math.prod(in_sp) + src, "f32"), f32(0.0))
        inner: list = [K.Store(src_buf, pad_base + ci * math.prod(src_sp) + dst, value)]
        for d in reversed(range(nd)):
            inner = [For(ivs[d], as_expr(0), as_expr(src_sp[d]), tuple(inner))]
        stmts.append(For(ci, as_expr(0), as_expr(cg), tuple(inner), kind))
        x_base = pad_base
    Nn, kk = math.prod(sp_out), math.prod(ksp)
    ci = low.fresh("ci")
    kvs = [low.fresh("kk") for _ in range(nd)]
    ovs = [low.fresh("o") for _ in range(nd)]
    src, kidx, flat = Const(0, INDEX), Const(0, INDEX), Const(0, INDEX)
    for d in range(nd):
        src = src * src_sp[d] + ovs[d] * stride[d] + kvs[d] * dil[d]
        kidx = kidx * ksp[d] + kvs[d]
        flat = flat * sp_out[d] + ovs[d]
    col_base = image * (math.prod(ksp) * cg * Nn + col_pad) if image is not None \
        else Const(0, INDEX)
    if col_offset is not None:
        col_base = col_base + col_offset
    row = row_len or Nn
    inner = [K.Store(col_buf, col_base + (ci * kk + kidx) * row + flat,
                     K.Load(src_buf, x_base + ci * math.prod(src_sp) + src, "f32"))]
    for d in reversed(range(nd)):
        okind = "vectorized" if d == nd - 1 and stride[d] == 1 else "serial"
        inner = [For(ovs[d], as_expr(0), as_expr(sp_out[d]), tuple(inner), okind)]
    for d in reversed(range(nd)):
        inner = [For(kvs[d], as_expr(0), as_expr(ksp[d]), tuple(inner))]
    stmts.append(For(ci, as_expr(0), as_expr(cg), tuple(inner), kind))
    return stmts


def lower_matmul(low: Lowering, node: Node, final: str, inline: set[str],
                 width: int) -> list | None:
    """Batched matmul of runtime operands: rows of B are read as vectors directly."""
    a_v, b_v = node.inputs
    if low.dtype(a_v) != "f32":
        return None
    out = node.outputs[0]
    oshape = low.graph.types[out].shape
    M, N = oshape[-2:]
    Kd = low.shape(a_v)[-1]
    if N < width:
        return None
    batch = oshape[:-2]
    bvars = [low.fresh("bt") for _ in batch]
    ia = low.broadcast_index(a_v, list(bvars) + [Const(0, INDEX)] * 2)[:-2]
    ib = low.broadcast_index(b_v, list(bvars) + [Const(0, INDEX)] * 2)[:-2]
    shape = micro_shape(width, M)

    def a(row, k):
        return low.element(a_v, ia + [row, k])

    def b(k, col, lanes):
        e = low.element(b_v, ib + [k, col])
        if lanes == 1:
            return e
        if not isinstance(e, K.Load):
            raise _Unsupported
        return K.Load(e.buffer, e.index, e.dtype, lanes)

    def store(row, col, value):
        return low.store_at(final, list(bvars) + [row, col], value, out)

    bv = low.constant_value(b_v)
    if bv is not None and all(d == 1 for d in bv.shape[:-2]):
        # A constant B (x @ W): packed once at compile time, like linear's weight.
        nr = shape.nr
        bp = low.constant(pack_b(np.asarray(bv.reshape(bv.shape[-2:]), np.float32), nr),
                          f"{node.name}_packed")

        def b(k, col, lanes):  # noqa: F811
            return K.Load(bp, (col // nr) * (Kd * nr) + k * nr + col % nr, "f32", lanes)

        body = gemm_loops(low, M, N, Kd, a, b, store, shape, parallel=math.prod(batch) <= 1,
                          b_cols=-(-N // nr) * nr)
    else:
        # B must be read along its rows with stride 1 (a stored tensor, not a transposed view).
        kv, cv = Var("__k"), Var("__col")
        probe = low.element(b_v, ib + [kv, cv])
        if not isinstance(probe, K.Load) or affine_coef(probe.index, cv.name) != 1:
            return None
        try:
            body = gemm_loops(low, M, N, Kd, a, b, store, shape,
                              parallel=math.prod(batch) <= 1)
        except _Unsupported:
            return None
    kinds = ["serial"] * len(batch)
    if batch and math.prod(batch) > 1:
        kinds[0] = "parallel"
    for v, n, kind in reversed(list(zip(bvars, batch, kinds))):
        body = [For(v, as_expr(0), as_expr(n), tuple(body), kind)]
    return body


class _Unsupported(Exception):
    pass
