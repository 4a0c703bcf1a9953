"""Loop nests of the recurrent ops (lstm_seq, gru_seq): one kernel per direction of a layer.

The kernel's outer loop runs the time steps serially. Each step has two phases:

1. the recurrent product ``h @ W_hh^T`` into a gates workspace: a loop over blocks of
   ``block_rows`` gate rows (parallel when a step has enough work), each row a dot product over the
   hidden dimension, innermost and contiguous in both ``h`` and ``W_hh`` so the vectorizer makes
   it a vector reduction; a block's rows share the loads of ``h`` and keep independent
   accumulators, so the reductions' add chains overlap;
2. the gates' elementwise math over the hidden units (vectorized), updating the ``h`` (and
   ``c``) workspaces and storing the step's output.

The states live in workspaces rather than being read back from the output: the output's store
applies the fused epilogue, so it need not hold the raw state.
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.ir import Node
from kiln.ir import kernel as K
from kiln.ir.kernel import INDEX, Assign, Const, Decl, Expr, For, Load, Store, Var
from kiln.passes.lower.anchors import StoreFn, anchor_rule
from kiln.passes.lower.core import Lowering, f32

ROWS_PER_REGISTER = 2
"""Vector registers per gate row of a block of the recurrent product: a block's rows are
independent accumulators that hide the FMA latency, half the registers leave room for the loads.
Measured with H=256 per 100-step layer on a loaded 2-core AVX-512 machine: 1 row 2.0 ms, 4 rows
1.6 ms, 8 to 32 rows 0.94-1.45 ms (0.94 when the weights are 64-byte aligned, 1.45 when the
constant blob is not: that varies between processes more than the block size does); forced
AVX2 (16 registers): 8 rows 1.12 ms, 16 rows 1.23 ms."""


def block_rows(low: Lowering, rows: int) -> int:
    """Gate rows per block for the target (8 without one), a divisor of ``rows``."""
    registers = low.target.vector_registers if low.target is not None else 16
    want = registers // ROWS_PER_REGISTER
    return next(r for r in (want, 8, 4, 2, 1) if rows % r == 0)


def _loop(var: Var, extent: int, body: list, kind: str = "serial") -> For:
    return For(var, Const(0, INDEX), Const(int(extent), INDEX), tuple(body), kind)


def _sigmoid(x: Expr, dt: str) -> Expr:
    return f32(1.0, dt) / (f32(1.0, dt) + K.call("exp", -x))


def _copy_state(low: Lowering, ws: str, value: str, batch: int, hidden: int) -> For:
    """``ws[b, j] = value[0, b, j]``: the initial state into its workspace."""
    b, j = low.fresh("b"), low.fresh("j")
    store = Store(ws, b * hidden + j, low.element(value, [Const(0, INDEX), b, j]))
    return _loop(b, batch, [_loop(j, hidden, [store], "vectorized")])


def _recurrent_product(low: Lowering, node: Node, h_ws: str, gates_ws: str, batch: int,
                       hidden: int, plus: Callable[[Expr, Expr], Expr]) -> For:
    """``gates[b, j] = sum_k h[b, k] * W_hh[j, k] + plus(b, j)`` for every gate row j."""
    rows = low.shape(node.inputs[1])[0]
    block = block_rows(low, rows)
    dt = low.dtype(node.inputs[0])
    jb, b, k = low.fresh("jb"), low.fresh("b"), low.fresh("k")
    accs = [low.fresh("acc", dt) for _ in range(block)]
    h = Load(h_ws, b * hidden + k, dt)
    row = [jb * block + r for r in range(block)]
    dots = [Assign(a, a + h * low.element(node.inputs[1], [j, k])) for a, j in zip(accs, row)]
    body = [*(Decl(a, f32(0.0, dt)) for a in accs), _loop(k, hidden, dots, "vectorized"),
            *(Store(gates_ws, b * rows + j, a + plus(b, j)) for a, j in zip(accs, row))]
    work = 2 * batch * rows * hidden  # per step
    kind = "parallel" if work >= low.tuning.parallel_min_work and rows > block else "serial"
    return _loop(jb, rows // block, [_loop(b, batch, body)], kind)


def _steps_kind(product: For) -> str:
    """The step loop's kind: ``team`` when the recurrent product runs in parallel, so that one
    parallel region holds every step (a barrier after the product and after the update, which
    thread 0 runs; split among the threads it measured no faster) instead of one region per
    step. LSTM, 2 layers, hidden 256, 100 steps, batch 1, 2 threads: a layer's kernel 840 ->
    680 us, the model 2.30 -> 1.92 ms."""
    return "team" if product.kind == "parallel" else "serial"


def _time(low: Lowering, node: Node) -> tuple[Var, Expr]:
    """The step loop's variable and the time index it stands for."""
    steps = low.shape(node.inputs[0])[0]
    s = low.fresh("t")
    return s, (Const(steps - 1, INDEX) - s if node.attrs["reverse"] else s)


@anchor_rule("lstm_seq")
def _lstm_seq(low: Lowering, node: Node, store: StoreFn) -> list:
    xproj, _, h0, c0 = node.inputs
    steps, batch, rows = low.shape(xproj)
    hidden = rows // 4
    dt = low.dtype(xproj)
    h_ws = low.workspace("h", dt, batch * hidden)
    c_ws = low.workspace("c", dt, batch * hidden)
    gates_ws = low.workspace("gates", dt, batch * rows)
    s, t = _time(low, node)
    order = node.attrs["gates"]
    product = _recurrent_product(low, node, h_ws, gates_ws, batch, hidden,
                                 lambda b, j: low.element(xproj, [t, b, j]))
    b, j = low.fresh("b"), low.fresh("j")

    def gate(name: str) -> Expr:
        return Load(gates_ws, b * rows + (order.index(name) * hidden) + j, dt)

    state = b * hidden + j
    c_new, h_new = low.fresh("c", dt), low.fresh("h", dt)
    cell = [
        Decl(c_new, _sigmoid(gate("f"), dt) * Load(c_ws, state, dt)
             + _sigmoid(gate("i"), dt) * K.call("tanh", gate("g"))),
        Decl(h_new, _sigmoid(gate("o"), dt) * K.call("tanh", c_new)),
        Store(c_ws, state, c_new), Store(h_ws, state, h_new),
        store([t, b, j], h_new), store([t, b, j + hidden], c_new),
    ]
    update = _loop(b, batch, [_loop(j, hidden, cell, "vectorized")])
    return [_copy_state(low, h_ws, h0, batch, hidden), _copy_state(low, c_ws, c0, batch, hidden),
            _loop(s, steps, [product, update], _steps_kind(product))]


@anchor_rule("gru_seq")
def _gru_seq(low: Lowering, node: Node, store: StoreFn) -> list:
    xproj, _, b_hh, h0 = node.inputs
    steps, batch, rows = low.shape(xproj)
    hidden = rows // 3
    dt = low.dtype(xproj)
    h_ws = low.workspace("h", dt, batch * hidden)
    rec_ws = low.workspace("rec", dt, batch * rows)
    s, t = _time(low, node)
    order = node.attrs["gates"]
    product = _recurrent_product(low, node, h_ws, rec_ws, batch, hidden,
                                 lambda b, j: low.element(b_hh, [j]))
    b, j = low.fresh("b"), low.fresh("j")

    def parts(name: str) -> tuple[Expr, Expr]:
        col = order.index(name) * hidden + j
        return low.element(xproj, [t, b, col]), Load(rec_ws, b * rows + col, dt)

    state = b * hidden + j
    r, z, n, h_new = (low.fresh(v, dt) for v in ("r", "z", "n", "h"))
    (xr, hr), (xz, hz), (xn, hn) = parts("r"), parts("z"), parts("n")
    cell = [
        Decl(r, _sigmoid(xr + hr, dt)),
        Decl(z, _sigmoid(xz + hz, dt)),
        Decl(n, K.call("tanh", xn + r * hn)),
        Decl(h_new, n + z * (Load(h_ws, state, dt) - n)),
        Store(h_ws, state, h_new),
        store([t, b, j], h_new),
    ]
    update = _loop(b, batch, [_loop(j, hidden, cell, "vectorized")])
    return [_copy_state(low, h_ws, h0, batch, hidden),
            _loop(s, steps, [product, update], _steps_kind(product))]

