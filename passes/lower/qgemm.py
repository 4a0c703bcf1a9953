"""Lowering of the int8 anchors qlinear and qconv (semantics: kiln.ir.ops.quant).

Both are a GEMM C[M, N] = A[M, K] @ B[K, N] with u8 activations A (rows: tokens or output
pixels, channels last) and i8 weights B (columns: output channels). The packed schedule keeps
an MR x NV-vector tile of int32 accumulators in registers; each step of the K loop takes four
consecutive k at once: NV vector loads of packed weights ([N/NR][K/4][NR][4] bytes, packed at
compile time) and, per row, one 4-byte group of activations splat over the lanes, combined by
``dot_add4`` (vpdpbusd on AVX-512 VNNI). For a convolution the K loop runs over kernel taps and
channel groups and reads the (zero-point padded) input in place: no im2col. The zero point of
the activations is folded into the bias (sum_k (x - zx) w = sum_k x w - zx sum_k w), padded
input positions hold zx, and the float32 requantization is the epilogue of each vector.

Without vectors (``width`` 1, or shapes the schedule does not take) the plain loop nests
registered as anchor rules compute the same integers one element at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kiln.ir import KilnError, Node
from kiln.ir import kernel as K
from kiln.ir.kernel import INDEX, Broadcast, Const, Decl, Expr, For, If, Var, as_expr
from kiln.ir.ops._rules import as_tuple
from kiln.passes.lower.anchors import StoreFn, anchor_rule, node_work
from kiln.passes.lower.core import Lowering, clamp_index, default_kinds, f32, loop_nest
from kiln.passes.lower.matrix_views import collapsed_views


def requantize(acc: Expr, scale: Expr, attrs) -> Expr:
    """The float32 epilogue of qlinear / qconv applied to int32 ``acc`` (scalar or vector)."""
    lanes = acc.lanes

    def c(v: float) -> Expr:
        e = f32(v)
        return Broadcast(e, lanes) if lanes > 1 else e

    y = K.Cast(acc, "f32") * scale
    if attrs["out_dtype"] == "f32":
        return K.maximum(y, c(0.0)) if attrs["relu"] else y
    zp = attrs["out_zero_point"]
    q = K.Unary("round", y) + c(float(zp))
    q = K.minimum(K.maximum(q, c(float(zp if attrs["relu"] else 0))), c(255.0))
    return K.Cast(q, "u8")


def _centered(low: Lowering, value: str, idx: Sequence[Expr], zero_point: int) -> Expr:
    return K.Cast(low.element(value, idx), "i32") - Const(zero_point, "i32")


# ---- plain loop nests ------------------------------------------------------------------------
@anchor_rule("qlinear")
def _qlinear_plain(low: Lowering, node: Node, store: StoreFn) -> list:
    x, w, bias, scale = node.inputs
    out_shape = low.shape(node.outputs[0])
    kdim = low.shape(w)[1]
    a = node.attrs

    def body(idx):
        acc, k = low.fresh("acc", "i32"), low.fresh("k")
        prod = _centered(low, x, list(idx[:-1]) + [k], a["x_zero_point"]) * \
            K.Cast(low.element(w, [idx[-1], k]), "i32")
        return [Decl(acc, low.element(bias, [idx[-1]])),
                For(k, as_expr(0), as_expr(kdim), (K.Assign(acc, acc + prod),)),
                store(idx, requantize(acc, low.element(scale, [idx[-1]]), a))]

    return loop_nest(low, out_shape, body, default_kinds(out_shape, innermost_vector=False))


@anchor_rule("qconv")
def _qconv_plain(low: Lowering, node: Node, store: StoreFn) -> list:
    x, w, bias, scale = node.inputs
    out_shape = low.shape(node.outputs[0])
    _, h, wd, c = low.shape(x)
    _, kh, kw, _ = low.shape(w)
    a = node.attrs
    stride = as_tuple(a["stride"], 2, "stride")
    pad = as_tuple(a["padding"], 2, "padding")
    dil = as_tuple(a["dilation"], 2, "dilation")

    def body(idx):
        n, oh, ow, co = idx
        acc = low.fresh("acc", "i32")
        i, j, ci = low.fresh("kh"), low.fresh("kw"), low.fresh("ci")
        ih = oh * stride[0] + i * dil[0] - pad[0]
        iw = ow * stride[1] + j * dil[1] - pad[1]
        inside = K.Binary("and", K.Binary("and", K.cmp("ge", ih, 0), K.cmp("lt", ih, h)),
                          K.Binary("and", K.cmp("ge", iw, 0), K.cmp("lt", iw, wd)))
        xv = _centered(low, x, [n, clamp_index(ih, h), clamp_index(iw, wd), ci],
                       a["x_zero_point"])
        prod = K.Select(inside, xv, Const(0, "i32")) * \
            K.Cast(low.element(w, [co, i, j, ci]), "i32")
        loops = For(i, as_expr(0), as_expr(kh), (For(j, as_expr(0), as_expr(kw), (
            For(ci, as_expr(0), as_expr(c), (K.Assign(acc, acc + prod),)),)),))
        return [Decl(acc, low.element(bias, [co])), loops,
                store(idx, requantize(acc, low.element(scale, [co]), a))]

    kinds = default_kinds(out_shape, innermost_vector=False)
    if node_work(low, node) < low.tuning.int8_parallel_min_macs:
        kinds = ["serial"] * len(kinds)
    return loop_nest(low, out_shape, body, kinds)


# ---- packed schedule -------------------------------------------------------------------------
# Register tiles (MR rows, NV vectors) the 32-register (AVX-512) schedule chooses among: at most
# 28 registers of accumulators and weight vectors (the activations take one more), and at least
# 16 accumulators (vpdpbusd's latency times its two ports).
WIDE_TILES = ((6, 4), (8, 3), (8, 2), (12, 2))


def tile_cost(rows: int, vectors: int, mr: int, nv: int) -> float:
    """Modelled cycles per 4-k step of the whole GEMM with ``mr`` x ``nv`` tiles: per tile,
    the larger of its dot products (two per cycle) and its loads (``mr`` broadcasts and ``nv``
    weight vectors, 1.5 per cycle), plus the weight vectors streamed from L2 again for each row
    tile (two 64-byte vectors per cycle). Rows past ``rows`` in the last row tile and the
    narrower last column tile count as computed: that is where a tile that does not divide the
    shape loses (M = 32 tokens in (6, 4) tiles computes 36 rows)."""
    full, last = divmod(vectors, nv)

    def step(n: int) -> float:
        return max(mr * n / 2, (mr + n) / 1.5) + n / 2

    return -(-rows // mr) * (full * step(nv) + (step(last) if last else 0.0))


def tile_shape(width: int, cols: int, rows: int | None = None) -> tuple[int, int]:
    """(MR rows, NV vectors) of int32 accumulators for ``width``-lane vectors and a ``rows`` x
    ``cols`` output. With 32 registers (AVX-512): the tile of ``WIDE_TILES`` that ``tile_cost``
    models fastest (measured on BERT's M = 32 token GEMMs: (8, 2) took 491 us where (6, 4) took
    546); with 16 (AVX2): 4 x 2."""
    if width >= 16:
        vectors = -(-cols // width)
        if rows is None:
            rows = 1 << 20
        tiles = [(mr, min(nv, vectors)) for mr, nv in WIDE_TILES]
        return min(tiles, key=lambda t: (tile_cost(rows, vectors, *t), -t[0] * t[1]))
    if width == 8:
        return 4, 2
    return 4, 1


def pack_weights(w: np.ndarray, nr: int) -> np.ndarray:
    """i8 [N, K] (K a multiple of 4) -> [ceil(N/NR)][K/4][NR][4], zero padded."""
    n, kd = w.shape
    tiles = -(-n // nr)
    padded = np.zeros((tiles * nr, kd), np.int8)
    padded[:n] = w
    return np.ascontiguousarray(padded.reshape(tiles, nr, kd // 4, 4).transpose(0, 2, 1, 3))


def _padded_vector(v: np.ndarray, size: int, dtype) -> np.ndarray:
    out = np.zeros(size, dtype)
    out[:v.size] = v
    return out


class _QGemm:
    """The packed int8 GEMM of one node: rows from ``row_base``, taps, channel groups."""

    def __init__(self, low: Lowering, node: Node, final: str, width: int, M: int, N: int,
                 taps: list[int], groups4: int, a_buf: str, row_base) -> None:
        self.low, self.node, self.final, self.w = low, node, final, width
        self.M, self.N, self.taps, self.groups4 = M, N, taps, groups4
        self.a_buf, self.row_base = a_buf, row_base

    def build(self, wmat: np.ndarray, bias: np.ndarray, scale: np.ndarray,
              epilogue=None) -> list:
        """The loop nest; ``epilogue(acc, col, scale)`` turns an int32 accumulator vector (bias
        added) into the stored value (default: the static requantization)."""
        low, w = self.low, self.w
        self.epilogue = epilogue or (lambda acc, col, sc: requantize(acc, sc, self.node.attrs))
        self.mr, self.nv = tile_shape(w, self.N, self.M)
        self.mr = max(1, min(self.mr, self.M))
        nr = self.nv * w
        tiles = -(-self.N // nr)
        self.k4 = len(self.taps) * self.groups4
        self.packed = low.constant(pack_weights(wmat, nr), f"{self.node.name}_packed")
        # The weights' bound, which lets a target without VNNI use pmaddubsw (see DotAdd4).
        self.s_max = int(np.abs(wmat.astype(np.int16)).max(initial=0))
        self.bias = low.constant(_padded_vector(bias, tiles * nr, np.int32),
                                 f"{self.node.name}_bias")
        self.scale = low.constant(_padded_vector(scale, tiles * nr, np.float32),
                                  f"{self.node.name}_scale")
        vectors = -(-self.N // w)
        full, last = divmod(vectors, self.nv)
        m_tiles = -(-self.M // self.mr)
        macs = self.M * self.N * self.k4 * 4
        parallel = macs >= low.tuning.int8_parallel_min_macs
        stmts = []
        for first_tile, count, nv in ((0, full, self.nv), (full, 1 if last else 0, last)):
            if not count:
                continue
            jt, it = low.fresh("jt"), low.fresh("it")
            body = self._micro(it, as_expr(first_tile) + jt, nv, nr)
            # Threads share the larger of the two tile counts (see microkernel.gemm_loops).
            if m_tiles > count:
                inner = For(it, as_expr(0), as_expr(m_tiles), tuple(body),
                            "parallel" if parallel else "serial")
                stmts.append(For(jt, as_expr(0), as_expr(count), (inner,)))
            else:
                inner = For(it, as_expr(0), as_expr(m_tiles), tuple(body))
                stmts.append(For(jt, as_expr(0), as_expr(count), (inner,),
                                 "parallel" if parallel and count > 1 else "serial"))
        return stmts

    def _micro(self, it: Var, tile: Expr, nv: int, nr: int) -> list:
        low, w, mr, M = self.low, self.w, self.mr, self.M
        m0 = it * mr
        bases = [low.fresh("row") for _ in range(mr)]
        body: list = []
        for r, b in enumerate(bases):
            row = K.minimum(m0 + r, as_expr(M - 1)) if M % mr else m0 + r
            body.append(Decl(b, self.row_base(row)))
        accs = [[low.fresh("c", "i32", w) for _ in range(nv)] for _ in range(mr)]
        body += [Decl(acc, Broadcast(Const(0, "i32"), w)) for row in accs for acc in row]
        bvs = [low.fresh("b", "i8", 4 * w) for _ in range(nv)]
        t, g = low.fresh("tap"), low.fresh("g")
        kk = t * self.groups4 + g
        # Per tap the rows move by a fixed offset, so a taps table costs one load per tap.
        taps = low.constant(np.asarray(self.taps, np.int64), f"{self.node.name}_taps")
        off = low.fresh("toff")
        step: list = [Decl(bv, K.Load(self.packed, ((tile * self.k4 + kk) * nr + v * w) * 4,
                                      "i8", 4 * w)) for v, bv in enumerate(bvs)]
        for r in range(mr):
            av = K.Load(self.a_buf, bases[r] + off + g * 4, "u8", 4)
            for v in range(nv):
                step.append(K.Assign(accs[r][v], K.DotAdd4(accs[r][v], av, bvs[v], self.s_max)))
        body.append(For(t, as_expr(0), as_expr(len(self.taps)), (
            Decl(off, K.Load(taps, t, INDEX)),
            For(g, as_expr(0), as_expr(self.groups4), tuple(step)))))
        for r in range(mr):
            stores: list = []
            for v in range(nv):
                col = tile * nr + v * w
                value = self.epilogue(accs[r][v] + K.Load(self.bias, col, "i32", w), col,
                                      K.Load(self.scale, col, "f32", w))
                stores += self._store(m0 + r, col, value, v, tile, nr)
            if M % mr:
                body.append(If(K.cmp("lt", m0 + r, as_expr(M)), tuple(stores)))
            else:
                body.extend(stores)
        return body

    def _store(self, row: Expr, col: Expr, value: Expr, v: int, tile: Expr, nr: int) -> list:
        low, w, N = self.low, self.w, self.N
        out = self.node.outputs[0]
        full = low.store_at(self.final, [row, col], value, out)
        if N % w == 0:
            return [full]
        # The last vector of the last tile is partial: through a scratch, element by element.
        lanes = f"lanes_{low.fresh('t').name}"
        low.scratch.append(K.Buffer(lanes, value.dtype, w))
        j = low.fresh("j")
        part = [K.Store(lanes, Const(0, INDEX), value),
                For(j, as_expr(0), as_expr(N % w), (
                    low.store_at(self.final, [row, col + j], K.Load(lanes, j, value.dtype),
                                 out),))]
        return [If(K.cmp("le", col + w, as_expr(N)), (full,), tuple(part))]


def _fold_zero_point(w: np.ndarray, bias: np.ndarray, zx: int, node: Node) -> np.ndarray:
    folded = bias.astype(np.int64) - zx * w.reshape(w.shape[0], -1).astype(np.int64).sum(1)
    if np.abs(folded).max(initial=0) >= 2 ** 31:
        raise KilnError("int8 bias with the zero point folded in overflows int32",
                        node=node.name, op=node.op, hint="leave this layer in float")
    return folded.astype(np.int32)


def _padded_copy(low: Lowering, x: str, dims: tuple[int, int, int, int], pad: tuple[int, int],
                 cp: int, zx: int, work: int, read) -> tuple[str, list]:
    """x [N, H, W, C] -> workspace [N, H + 2ph, W + 2pw, Cp] with zx around and past C.

    ``read(n, h, w, c)`` gives an element of x (computed in place when x is an inlined
    producer, such as the permute that makes a channels-first input channels-last)."""
    n_, h, wd, c = dims
    hp, wp = h + 2 * pad[0], wd + 2 * pad[1]
    xp = low.workspace(f"{x}_qpad", "u8", n_ * hp * wp * cp)
    n, i, j, ch = low.fresh("n"), low.fresh("h"), low.fresh("w"), low.fresh("c")
    dst = ((n * hp + i) * wp + j) * cp
    ih, iw = i - pad[0], j - pad[1]
    inside = K.Binary("and", K.Binary("and", K.cmp("ge", ih, 0), K.cmp("lt", ih, h)),
                      K.Binary("and", K.cmp("ge", iw, 0), K.cmp("lt", iw, wd)))
    zero = Const(zx, "u8")
    copy: list = [For(ch, as_expr(0), as_expr(c), (K.Store(xp, dst + ch, read(n, ih, iw, ch)),),
                      "vectorized")]
    if cp > c:
        copy.append(For(ch, as_expr(c), as_expr(cp - c), (K.Store(xp, dst + ch, zero),)))
    fill = For(ch, as_expr(0), as_expr(cp), (K.Store(xp, dst + ch, zero),), "vectorized")
    kind = "parallel" if work >= low.tuning.int8_parallel_min_macs and n_ * hp > 1 else "serial"
    rows = For(j, as_expr(0), as_expr(wp), (If(inside, tuple(copy), (fill,)),))
    return xp, [For(n, as_expr(0), as_expr(n_), (For(i, as_expr(0), as_expr(hp), (rows,),
                                                     kind),))]


def lower_qconv(low: Lowering, node: Node, final: str, inline: set[str],
                width: int) -> list | None:
    """qconv as a packed int8 GEMM over output pixels x output channels."""
    x, w, bias, scale = node.inputs
    wv, bv, sv = (low.constant_value(v) for v in (w, bias, scale))
    if wv is None or bv is None or sv is None:
        return None
    a = node.attrs
    out = node.outputs[0]
    oshape = low.graph.types[out].shape
    views = collapsed_views(low, final, out, inline, [0, 1, 2])
    if views is None:
        return None
    low.view_shapes.update(views)
    # The input's own NHWC shape: an epilogue that reads it too (a residual add of the conv's
    # input after a 1x1 conv) may have collapsed its view along with the output's.
    n_, h, wd, c = low.graph.types[x].shape
    cout, kh, kw, _ = wv.shape
    stride = as_tuple(a["stride"], 2, "stride")
    pad = as_tuple(a["padding"], 2, "padding")
    dil = as_tuple(a["dilation"], 2, "dilation")
    cp = -(-c // 4) * 4
    zx = a["x_zero_point"]
    stmts: list = []
    if any(pad) or cp != c or low.is_inline(x):
        xbuf, stmts = _padded_copy(low, x, (n_, h, wd, c), pad, cp, zx, node_work(low, node),
                                   lambda n, i, j, ch: low.element_flat(
                                       x, ((n * h + i) * wd + j) * c + ch))
        hp, wp = h + 2 * pad[0], wd + 2 * pad[1]
    else:
        xbuf, hp, wp = low.buffer(x), h, wd
    _, oh, ow, _ = oshape
    M = n_ * oh * ow

    def row_base(m: Expr) -> Expr:
        img, pix = m // (oh * ow), m % (oh * ow)
        return ((img * hp + (pix // ow) * stride[0]) * wp + (pix % ow) * stride[1]) * cp

    taps = [(i * dil[0] * wp + j * dil[1]) * cp for i in range(kh) for j in range(kw)]
    wpad = np.zeros((cout, kh, kw, cp), np.int8)
    wpad[..., :c] = wv
    gemm = _QGemm(low, node, final, width, M, cout, taps, cp // 4, xbuf, row_base)
    return stmts + gemm.build(wpad.reshape(cout, -1), _fold_zero_point(wv, bv, zx, node), sv)


def _token_rows(low: Lowering, node: Node, final: str, inline: set[str]
                ) -> tuple[list[np.ndarray], int] | None:
    """For a linear-like node (x [..., K] and constant operands after it): the operands'
    constant values and the number of rows T, with the output (and its epilogue) viewed as
    [T, N]; None when an operand is not constant or the views do not collapse."""
    consts = [low.constant_value(v) for v in node.inputs[1:]]
    out = node.outputs[0]
    oshape = low.graph.types[out].shape
    if any(c is None for c in consts) or len(oshape) < 2:
        return None
    views = collapsed_views(low, final, out, inline, list(range(len(oshape) - 1)))
    if views is None:
        return None
    low.view_shapes.update(views)
    return consts, math.prod(oshape[:-1])


def lower_qlinear(low: Lowering, node: Node, final: str, inline: set[str],
                  width: int) -> list | None:
    """qlinear as a packed int8 GEMM over tokens x output features."""
    x = node.inputs[0]
    found = _token_rows(low, node, final, inline)
    if found is None:
        return None
    (wv, bv, sv), T = found
    N, kd = wv.shape
    kp = -(-kd // 4) * 4
    zx = node.attrs["x_zero_point"]
    stmts: list = []
    if kp != kd or low.is_inline(x):
        xbuf, stmts = _padded_copy(low, x, (1, T, 1, kd), (0, 0), kp, zx, node_work(low, node),
                                   lambda n, i, j, ch: low.element_flat(x, i * kd + ch))
    else:
        xbuf = low.buffer(x)
    wpad = np.zeros((N, kp), np.int8)
    wpad[:, :kd] = wv
    gemm = _QGemm(low, node, final, width, T, N, [0], kp // 4, xbuf, lambda m: m * kp)
    return stmts + gemm.build(wpad, _fold_zero_point(wv, bv, zx, node), sv)


# ---- float activations, int8 weights --------------------------------------------------------
@anchor_rule("linear_w8")
def _linear_w8_plain(low: Lowering, node: Node, store: StoreFn) -> list:
    x, w, scale = node.inputs[:3]
    out_shape = low.shape(node.outputs[0])
    kdim = low.shape(w)[1]

    def body(idx):
        acc, k = low.fresh("acc", "f32"), low.fresh("k")
        prod = low.element(x, list(idx[:-1]) + [k]) * K.Cast(low.element(w, [idx[-1], k]),
                                                               "f32")
        value = acc * low.element(scale, [idx[-1]])
        if len(node.inputs) > 3:
            value = value + low.element(node.inputs[3], [idx[-1]])
        return [Decl(acc, f32(0.0)),
                For(k, as_expr(0), as_expr(kdim), (K.Assign(acc, acc + prod),)),
                store(idx, value)]

    return loop_nest(low, out_shape, body, default_kinds(out_shape, innermost_vector=False))


def lower_linear_w8(low: Lowering, node: Node, final: str, inline: set[str],
                    width: int) -> list | None:
    """The float packed GEMM (microkernel.gemm_loops) with its weight panels stored as i8 and
    widened to float as they are loaded: a quarter of the weight bytes to stream, which is what
    bounds a linear layer at small batch."""
    from kiln.passes.lower.matrix_views import rows_of
    from kiln.passes.lower.microkernel import gemm_loops, micro_shape, pack_b

    x = node.inputs[0]
    out = node.outputs[0]
    found = _token_rows(low, node, final, inline)
    if found is None:
        return None
    (wv, sv, *rest), T = found
    bv = rest[0] if rest else None
    N, kd = wv.shape
    if N < width:
        return None
    shape = micro_shape(width, T)
    nr = shape.nr
    tiles = -(-N // nr)
    bp = low.constant(pack_b(wv.T, nr), f"{node.name}_packed")
    sbuf = low.constant(_padded_vector(sv, tiles * nr, np.float32), f"{node.name}_scale")
    bbuf = low.constant(_padded_vector(bv, tiles * nr, np.float32), f"{node.name}_bias") \
        if bv is not None else None
    a = rows_of(low, x, T, kd)

    def b(k, col, lanes):
        return K.Cast(K.Load(bp, (col // nr) * (kd * nr) + k * nr + col % nr, "i8", lanes), "f32")

    def store(row, col, value):
        lanes = value.lanes
        value = value * K.Load(sbuf, col, "f32", lanes)
        if bbuf is not None:
            value = value + K.Load(bbuf, col, "f32", lanes)
        return low.store_at(final, [row, col], value, out)

    return gemm_loops(low, T, N, kd, a, b, store, shape, b_cols=tiles * nr)


def _dynamic_scale(low: Lowering, x: str, count: int, work: int) -> tuple[Var, list]:
    """Statements computing the per-call scale max|x| / 127 (1 when x is all zeros)."""
    amax, i, s = low.fresh("amax", "f32"), low.fresh("i"), low.fresh("xscale", "f32")
    stmts = [Decl(amax, f32(0.0)),
             For(i, as_expr(0), as_expr(count), (
                 K.Assign(amax, K.maximum(amax, K.call("abs", low.element_flat(x, i)))),),
                 "vectorized"),
             Decl(s, K.Select(K.cmp("eq", amax, f32(0.0)), f32(1.0), amax / f32(127.0)))]
    return s, stmts


def _quantized_x(xv: Expr, s: Var) -> Expr:
    """x rounded to the int8 grid of scale s, as the u8 value x_q + 128."""
    q = K.Unary("round", xv / s)
    q = K.Select(K.cmp("eq", q, q), q, f32(0.0))
    return K.Cast(K.minimum(K.maximum(q, f32(-127.0)), f32(127.0)) + f32(128.0), "u8")


@anchor_rule("dynamic_qlinear")
def _dynamic_qlinear_plain(low: Lowering, node: Node, store: StoreFn) -> list:
    x, w, scale = node.inputs[:3]
    out_shape = low.shape(node.outputs[0])
    x_shape = low.shape(x)
    kdim = low.shape(w)[1]
    s, stmts = _dynamic_scale(low, x, math.prod(x_shape), 0)

    def body(idx):
        acc, k = low.fresh("acc", "i32"), low.fresh("k")
        xq = K.Cast(_quantized_x(low.element(x, list(idx[:-1]) + [k]), s), "i32") - \
            Const(128, "i32")
        prod = xq * K.Cast(low.element(w, [idx[-1], k]), "i32")
        value = K.Cast(acc, "f32") * (s * low.element(scale, [idx[-1]]))
        if len(node.inputs) > 3:
            value = value + low.element(node.inputs[3], [idx[-1]])
        return [Decl(acc, Const(0, "i32")),
                For(k, as_expr(0), as_expr(kdim), (K.Assign(acc, acc + prod),)),
                store(idx, value)]

    return stmts + loop_nest(low, out_shape, body,
                             default_kinds(out_shape, innermost_vector=False))


def lower_dynamic_qlinear(low: Lowering, node: Node, final: str, inline: set[str],
                          width: int) -> list | None:
    """Scale of x (a vector max), x to u8 (x_q + 128) in a workspace, then the packed int8
    GEMM with the two scales and the float bias in its epilogue."""
    x = node.inputs[0]
    found = _token_rows(low, node, final, inline)
    if found is None:
        return None
    (wv, sv, *rest), T = found
    bv = rest[0] if rest else None
    N, kd = wv.shape
    kp = -(-kd // 4) * 4
    s, stmts = _dynamic_scale(low, x, T * kd, node_work(low, node))
    xq = low.workspace(f"{node.name}_xq", "u8", T * kp)
    t, k = low.fresh("t"), low.fresh("k")
    fill = [For(k, as_expr(0), as_expr(kd), (
        K.Store(xq, t * kp + k, _quantized_x(low.element_flat(x, t * kd + k), s)),),
        "vectorized")]
    if kp > kd:
        fill.append(For(k, as_expr(kd), as_expr(kp - kd), (
            K.Store(xq, t * kp + k, Const(128, "u8")),)))
    stmts.append(For(t, as_expr(0), as_expr(T), tuple(fill)))
    wpad = np.zeros((N, kp), np.int8)
    wpad[:, :kd] = wv
    gemm = _QGemm(low, node, final, width, T, N, [0], kp // 4, xq, lambda m: m * kp)
    # Padded past the last column tile the GEMM may load from (at most four vectors wide).
    padded = (-(-N // width) + 4) * width
    bbuf = low.constant(_padded_vector(bv, padded, np.float32), f"{node.name}_fbias") \
        if bv is not None else None

    def epilogue(acc, col, sc):
        lanes = acc.lanes
        value = K.Cast(acc, "f32") * (Broadcast(s, lanes) * sc)
        if bbuf is not None:
            value = value + K.Load(bbuf, col, "f32", lanes)
        return value

    zeros = np.zeros(N, np.int32)
    return stmts + gemm.build(wpad, _fold_zero_point(wv, zeros, 128, node), sv, epilogue)
