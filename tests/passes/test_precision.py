"""f16 is a storage type: kernels compute it in f32 (passes/lower/precision.py)."""

from __future__ import annotations

import numpy as np

from kiln.ir import kernel as K
from kiln.ir.builder import GraphBuilder
from kiln.ir.kernel import INDEX, Assign, Buffer, Cast, Const, Decl, For, Kernel, Load, Store, Var
from kiln.ir.types import TensorType
from kiln.passes.lower import lower_graph, run_lowered
from kiln.passes.lower.precision import compute_f16_in_f32, uses_half


def _half_sum(n: int) -> Kernel:
    """out[0] = sum of x, then y[i] = erf(x[i] * 0.5) rounded to f16 and back (an explicit
    cast in the graph), all written in f16 as a naive lowering would."""
    i, j, acc = Var("i"), Var("j"), Var("acc", "f16")
    body = [Decl(acc, Const(0.0, "f16")),
            For(i, Const(0, INDEX), Const(n, INDEX), (Assign(acc, acc + Load("x", i, "f16")),)),
            Store("out", Const(0, INDEX), acc),
            For(j, Const(0, INDEX), Const(n, INDEX), (
                Store("y", j, Cast(Cast(K.call("erf", Load("x", j, "f16")
                                               * Const(0.5, "f16")), "f16"), "f32")),))]
    return Kernel("half_sum", (Buffer("x", "f16", n), Buffer("out", "f16", 1),
                               Buffer("y", "f32", n)), tuple(body))


def test_ir_text_before_and_after() -> None:
    before = _half_sum(8)
    assert str(before) == (
        "kernel half_sum(x: f16[8], out: f16[1], y: f32[8]) {\n"
        "  f16 acc = f16(0.0)\n"
        "  for i in [0, +8):\n"
        "    acc = (acc + x[i])\n"
        "  out[0] = acc\n"
        "  for j in [0, +8):\n"
        "    y[j] = f32(f16(erf((x[j] * f16(0.5)))))\n"
        "}\n")
    after = compute_f16_in_f32(before)
    # Loads widen, the accumulator and constants are f32, the store rounds once, and the
    # graph's explicit rounding to f16 stays (then widens again).
    assert str(after) == (
        "kernel half_sum(x: f16[8], out: f16[1], y: f32[8]) {\n"
        "  f32 acc = 0.0\n"
        "  for i in [0, +8):\n"
        "    acc = (acc + f32(x[i]))\n"
        "  out[0] = f16(acc)\n"
        "  for j in [0, +8):\n"
        "    y[j] = f32(f16(erf((f32(x[j]) * 0.5))))\n"
        "}\n")
    assert uses_half(before) and not any(
        e.dtype == "f16" and not isinstance(e, (Load, Cast))
        for s in K.walk_stmts(after.body) for x in K.stmt_exprs(s) for e in K.walk_expr(x))


def test_kernel_without_f16_is_unchanged() -> None:
    i, acc = Var("i"), Var("acc", "f32")
    k = Kernel("f32_sum", (Buffer("x", "f32", 4), Buffer("out", "f32", 1)), (
        Decl(acc, Const(0.0)),
        For(i, Const(0, INDEX), Const(4, INDEX), (Assign(acc, acc + Load("x", i)),)),
        Store("out", Const(0, INDEX), acc)))
    assert not uses_half(k)
    assert compute_f16_in_f32(k) is k


def test_f32_accumulation_is_what_makes_a_long_f16_sum_accurate() -> None:
    n = 16384
    x = np.random.default_rng(0).uniform(0, 1, n).astype(np.float16)
    exact = float(np.sum(x.astype(np.float64)))

    def run(kernel):
        bufs = {"x": x.copy(), "out": np.zeros(1, np.float16), "y": np.zeros(n, np.float32)}
        K.run_kernel(kernel, bufs)
        return float(bufs["out"][0]), bufs["y"]

    naive, _ = run(_half_sum(n))
    widened, y = run(compute_f16_in_f32(_half_sum(n)))
    # f16 accumulation stalls where the sum's spacing (2 from 2048 on) exceeds twice the
    # terms (mean 0.5): 2048 of ~8220. f32 accumulation is off by the one final rounding to
    # f16 (spacing 8 at 8192).
    assert abs(naive - exact) > 1000
    assert abs(widened - exact) <= 4.0
    from scipy import special

    expected_y = special.erf(x.astype(np.float32) * np.float32(0.5)).astype(np.float16)
    np.testing.assert_array_equal(y, expected_y.astype(np.float32))


def test_lowered_f16_graph_reduces_in_f32() -> None:
    b = GraphBuilder("half_softmax")
    x = b.input("x", TensorType((3, 2000), "f16"))
    b.output(b.op("softmax", [x], {"axis": -1}))
    g = b.build()
    lowered = lower_graph(g)
    for step in lowered.steps:
        decls = [s.var for s in K.walk_stmts(step.kernel.body) if isinstance(s, Decl)]
        assert decls and all(v.dtype != "f16" for v in decls), step.kernel
    xs = np.random.default_rng(1).normal(0, 3, (3, 2000)).astype(np.float16)
    (got,) = run_lowered(lowered, [xs])
    assert got.dtype == np.float16
    wide = xs.astype(np.float64)
    e = np.exp(wide - wide.max(-1, keepdims=True))
    expected = e / e.sum(-1, keepdims=True)
    # One rounding to f16 at the store: within half an f16 ulp of the exact value (plus f32).
    ulp = np.spacing(expected.astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(got.astype(np.float64) - expected) <= 0.5 * ulp + 1e-7)
