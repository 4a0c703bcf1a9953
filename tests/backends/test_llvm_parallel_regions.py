"""Parallel regions where they pay, none where they cannot.

A parallel loop of one iteration runs on the caller: no OpenMP region to wake and join (BERT's
batch-1 attention P @ V matmul, when it was parallel over its batch axis of extent 1: at 2
threads 10.2 us as a region, 7.9 us without; codegen._outline). A batched matmul of shape
(1, heads, L, S) with enough work runs its heads in parallel, the first batch axis with more
than one entry."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.llvm import compile_graph
from kiln.backends.llvm.codegen import Binding, ModuleBuilder, emit_entry, emit_kernel
from kiln.backends.llvm.compiler import default_target, run_kernel_llvm
from kiln.ir import GraphBuilder, TensorType
from kiln.ir import kernel as K
from kiln.ir.kernel import INDEX, Buffer, Const, For, Kernel, Var

REGION = "call void @GOMP_parallel"


def _batched_matmul(batch: int, heads: int, seq: int):
    b = GraphBuilder("attention_pv")
    p = b.input("p", TensorType((batch, heads, seq, seq)))
    v = b.input("v", TensorType((batch, heads, seq, 64)))
    b.output(b.op("matmul", [p, v]))
    rng = np.random.default_rng(batch)
    arrays = [rng.standard_normal((batch, heads, seq, seq)).astype(np.float32),
              rng.standard_normal((batch, heads, seq, 64)).astype(np.float32)]
    return b.build(), arrays


@pytest.mark.parametrize("batch, heads, seq, regions", [
    (1, 1, 32, 0),   # one product, below the parallel threshold
    (1, 4, 32, 0),   # BERT's heads: 262k MACs, faster on one thread
    (1, 8, 64, 1),   # 2M MACs: heads in parallel
    (2, 8, 64, 1),
    (4, 1, 64, 1),
])
def test_batched_matmul_is_parallel_over_its_first_batch_axis_of_several(batch, heads, seq,
                                                                         regions):
    graph, arrays = _batched_matmul(batch, heads, seq)
    prog = compile_graph(graph, cache=False)
    assert prog.ir_text.count(REGION) == regions
    for threads in (1, 2):
        prog.threads(threads, adaptive=False)
        got = prog(arrays)[0]
        np.testing.assert_allclose(got, arrays[0] @ arrays[1], rtol=1e-5, atol=1e-5)


def _doubling_kernel(outer: int) -> Kernel:
    """y[i, j] = 2 x[i, j] over (outer, 64), its outer loop marked parallel."""
    i, j = Var("i"), Var("j")
    body = (For(i, Const(0, INDEX), Const(outer, INDEX), (
        For(j, Const(0, INDEX), Const(64, INDEX), (
            K.Store("y", i * 64 + j, K.Load("x", i * 64 + j, "f32") * K.Const(2.0, "f32")),
        )),), "parallel"),)
    return Kernel("double", (Buffer("x", "f32", outer * 64), Buffer("y", "f32", outer * 64)),
                  body)


@pytest.mark.parametrize("outer, regions", [(1, 0), (3, 1)])
def test_parallel_loop_of_one_iteration_opens_no_region(outer, regions):
    kernel = _doubling_kernel(outer)
    m = ModuleBuilder(default_target())
    emit_kernel(m, kernel)
    emit_entry(m, [(kernel, [Binding("input", 0), Binding("input", 1)])])
    assert m.text().count(REGION) == regions
    x = np.arange(outer * 64, dtype=np.float32)
    y = np.zeros_like(x)
    run_kernel_llvm(kernel, {"x": x, "y": y}, threads=2)
    np.testing.assert_array_equal(y, 2 * x)


def _team_kernel(steps: int, n: int) -> Kernel:
    """A ``team`` loop over steps: a parallel update of acc, a total on one thread that reads
    every thread's acc, a local, then a parallel loop that reads the total (each phase needs
    the barrier before it)."""
    t, i, j, r = Var("t"), Var("i"), Var("j"), Var("r")
    tot, v = Var("tot", "f32"), Var("v", "f32")
    acc_i = K.Load("acc", i, "f32")
    body = (
        For(i, Const(0, INDEX), Const(n, INDEX), (
            K.Store("acc", i, acc_i + K.Load("x", t * n + i, "f32") * K.Cast(t + 1, "f32")),),
            "parallel"),
        K.Decl(tot, K.Const(0.0, "f32")),
        For(r, Const(0, INDEX), Const(n, INDEX), (
            K.Assign(tot, tot + K.Load("acc", r, "f32")),)),
        K.Store("s", t, tot),
        K.Decl(v, K.Cast(t * 2, "f32")),
        For(j, Const(0, INDEX), Const(n, INDEX), (
            K.Store("y", t * n + j, K.Load("acc", j, "f32") + K.Load("s", t, "f32") + v),),
            "parallel"),
    )
    return Kernel("team", (Buffer("x", "f32", steps * n), Buffer("acc", "f32", n),
                           Buffer("s", "f32", steps), Buffer("y", "f32", steps * n)),
                  (For(t, Const(0, INDEX), Const(steps, INDEX), body, "team"),))


@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_team_loop_shares_parallel_loops_and_waits_between_phases(n, threads):
    steps = 12
    kernel = _team_kernel(steps, n)
    m = ModuleBuilder(default_target())
    emit_kernel(m, kernel)
    text = m.text()
    assert text.count(REGION) == 1 and "GOMP_barrier" in text   # one region for all steps
    rng = np.random.default_rng(n)
    x = rng.standard_normal(steps * n).astype(np.float32)
    want = {"x": x, "acc": np.zeros(n, np.float32), "s": np.zeros(steps, np.float32),
            "y": np.zeros(steps * n, np.float32)}
    K.run_kernel(kernel, want)
    for _ in range(3):   # a missing barrier would show as a race
        got = {"x": x, "acc": np.zeros(n, np.float32), "s": np.zeros(steps, np.float32),
               "y": np.zeros(steps * n, np.float32)}
        run_kernel_llvm(kernel, got, threads=threads)
        for name in ("acc", "s", "y"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
