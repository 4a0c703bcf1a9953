"""The CUDA code generator on hand-written kernels: every kernel-IR construct renders and
matches the kernel interpreter, and loops are bound to threads only when that is safe."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.cuda import compile_graph_cuda, run_kernel_cuda
from kiln.backends.cuda.mapping import plan_segments
from kiln.backends.cuda.schedule import GENERIC
from kiln.backends.reference import run_graph
from kiln.ir import GraphBuilder, KilnError, TensorType
from kiln.ir import kernel as K
from kiln.ir.kernel import (
    INDEX,
    Assign,
    Binary,
    Broadcast,
    Buffer,
    Cast,
    Const,
    Decl,
    DotAdd4,
    For,
    If,
    Kernel,
    Load,
    ReduceLanes,
    Select,
    Store,
    Unary,
    Var,
)

RNG = np.random.default_rng(3)


def idx(name: str) -> Var:
    return Var(name, INDEX)


def c(v: int) -> Const:
    return Const(v, INDEX)


def f(v: float) -> Const:
    return Const(v, "f32")


def run_both(kernel: Kernel, buffers: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The buffers after the interpreter and after the CUDA kernels (from the same inputs)."""
    want = {k: v.copy() for k, v in buffers.items()}
    got = {k: v.copy() for k, v in buffers.items()}
    K.run_kernel(kernel, want)
    run_kernel_cuda(kernel, got)
    return want, got


def assert_same(want: dict, got: dict) -> None:
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)


def bound_vars(kernel: Kernel) -> list[tuple[str, ...]]:
    return [tuple(b.var for b in seg.bound) for seg in plan_segments(kernel)]


def test_loop_carried_memory_dependence_stays_in_one_thread():
    # out[i] = out[i - 1] + x[i]: iteration i reads what i - 1 wrote.
    i = idx("i")
    body = [Store("out", c(0), Load("x", c(0))),
            For(i, c(1), c(7), (Store("out", i, Load("out", i - c(1)) + Load("x", i)),))]
    k = Kernel("prefix", (Buffer("x", "f32", 8), Buffer("out", "f32", 8)), tuple(body))
    assert bound_vars(k) == [(), ()]
    want, got = run_both(k, {"x": RNG.standard_normal(8).astype(np.float32),
                             "out": np.zeros(8, np.float32)})
    assert_same(want, got)
    np.testing.assert_allclose(got["out"], np.cumsum(got["x"]), rtol=1e-5)


def test_shared_accumulator_and_racy_store_are_not_bound():
    i, j = idx("i"), idx("j")
    acc = Var("acc", "f32")
    # A sum into a local declared at the top level: one segment, one thread.
    total = [Decl(acc, f(0.0)), For(i, c(0), c(6), (Assign(acc, acc + Load("x", i)),)),
             Store("out", c(0), acc)]
    # Every iteration stores element 1 (the last one wins): not independent.
    racy = [For(j, c(0), c(6), (Store("out", c(1), Load("x", j)),), "parallel")]
    k = Kernel("sums", (Buffer("x", "f32", 6), Buffer("out", "f32", 2)), (*total, *racy))
    assert bound_vars(k) == [(), ()]
    want, got = run_both(k, {"x": RNG.standard_normal(6).astype(np.float32),
                             "out": np.zeros(2, np.float32)})
    assert_same(want, got)


def test_triangular_nest_binds_only_the_rectangular_part():
    # for i: for j in [0, i]: out[i * 5 + j] = x[j] (the inner extent depends on i).
    i, j = idx("i"), idx("j")
    inner = For(j, c(0), i + c(1), (Store("out", i * c(5) + j, Load("x", j)),))
    k = Kernel("tri", (Buffer("x", "f32", 5), Buffer("out", "f32", 25)),
               (For(i, c(0), c(5), (inner,)),))
    assert bound_vars(k) == [("i",)]
    want, got = run_both(k, {"x": RNG.standard_normal(5).astype(np.float32),
                             "out": np.zeros(25, np.float32)})
    assert_same(want, got)


def test_columns_of_a_row_major_buffer_are_independent():
    # for i < 4: for j < 3: out[j * 4 + i] = out[(j - 1) * 4 + i] + ...: a running sum down
    # each column. Columns are independent; the rows of one column are not.
    i, j = idx("i"), idx("j")
    k = Kernel("cols", (Buffer("x", "f32", 12), Buffer("out", "f32", 12)),
               (For(i, c(0), c(4), (Store("out", i, Load("x", i)), For(j, c(1), c(2), (
                   Store("out", j * c(4) + i, Load("out", (j - c(1)) * c(4) + i)
                         + Load("x", j * c(4) + i)),)))),))
    assert bound_vars(k) == [("i",)]
    # Overlapping rows (stride 2 < row length 3) are not.
    k2 = Kernel("overlap", (Buffer("x", "f32", 12), Buffer("out", "f32", 12)),
                (For(i, c(0), c(4), (For(j, c(0), c(3), (
                    Store("out", i * c(2) + j, Load("out", i * c(2) + j) + f(1.0)),)),)),))
    assert bound_vars(k2) == [()]
    for kern in (k, k2):
        want, got = run_both(kern, {"x": RNG.standard_normal(12).astype(np.float32),
                                    "out": np.zeros(12, np.float32)})
        assert_same(want, got)


def all_constructs_kernel() -> Kernel:
    """A kernel using every expression and statement kind of the kernel IR (also compiled to
    PTX by test_cuda_gpu.py)."""
    i, j, l_ = idx("i"), idx("j"), idx("l")
    v4 = Var("v", "f32", 4)
    s = Var("s", "f32")
    n = Var("n", "i32")
    acc = Var("acc", "i32")
    x4 = Load("x", i * c(8), "f32", 4, 2)                     # strided vector load
    body = (
        Decl(v4, x4 * Broadcast(f(0.5), 4)),
        Assign(v4, Binary("max", v4, Broadcast(Load("y", i), 4))),
        Decl(s, ReduceLanes("add", v4) + ReduceLanes("max", v4 - Broadcast(
            ReduceLanes("min", v4), 4))),
        Store("vec", i * c(4), Select(Binary("gt", v4, Broadcast(f(0.0), 4)), v4,
                                      Unary("neg", v4))),
        Decl(n, Cast(Unary("floor", Load("y", i) * f(3.0)), "i32")),
        If(Binary("and", Binary("ge", n, Const(0, "i32")), Unary("not", Binary(
            "eq", Binary("mod", n, Const(2, "i32")), Const(1, "i32")))),
           (Store("ints", i, Binary("div", n, Const(2, "i32"))),),
           (Store("ints", i, Cast(Unary("trunc", Load("y", i) * f(-2.5)), "i32")),)),
        Store("scratch", c(0), Unary("rsqrt", Unary("abs", s) + f(1.0))),
        Store("scratch", c(1), Binary("pow", Unary("abs", s) + f(0.5), f(1.5))),
        Store("out", i, Load("scratch", c(0)) + Load("scratch", c(1))
              + Unary("round", s * f(10.0)) + Binary("div", s, f(0.75))
              + Unary("tanh", s) + Unary("erf", s) + Unary("exp", Unary("log", f(2.0)))),
        Decl(acc, Const(5, "i32")),
        For(l_, c(1), c(6), (Assign(acc, acc + Cast(l_, "i32")),), step=2),
        Assign(acc, DotAdd4(acc, Load("u", i * c(4), "u8", 4), Load("w", c(0), "i8", 4))),
        Store("ints2", i, acc),
    )
    params = (Buffer("x", "f32", 48), Buffer("y", "f32", 6), Buffer("u", "u8", 24),
              Buffer("w", "i8", 4), Buffer("vec", "f32", 24), Buffer("ints", "i32", 6),
              Buffer("out", "f32", 6), Buffer("ints2", "i32", 6))
    return Kernel("all", params, (For(j, c(0), c(1), (For(i, c(0), c(6), body),)),),
                  scratch=(Buffer("scratch", "f32", 2),))


def test_every_construct_renders_and_matches_the_interpreter():
    k = all_constructs_kernel()
    assert bound_vars(k) == [("j", "i")]
    buffers = {"x": RNG.standard_normal(48).astype(np.float32),
               "y": RNG.standard_normal(6).astype(np.float32),
               "u": RNG.integers(0, 256, 24).astype(np.uint8),
               "w": RNG.integers(-128, 128, 4).astype(np.int8),
               "vec": np.zeros(24, np.float32), "ints": np.zeros(6, np.int32),
               "out": np.zeros(6, np.float32), "ints2": np.zeros(6, np.int32)}
    want, got = run_both(k, buffers)
    assert_same(want, got)


def test_a_name_declared_with_two_types_gets_one_python_name_per_type():
    i = idx("i")
    t_f, t_i = Var("t", "f32"), Var("t", "i32")
    k = Kernel("retype", (Buffer("x", "f32", 3), Buffer("a", "f32", 3), Buffer("b", "i32", 3)),
               (For(i, c(0), c(3), (Decl(t_f, Load("x", i) * f(2.0)), Store("a", i, t_f),
                                    Decl(t_i, Cast(t_f, "i32")), Store("b", i, t_i))),))
    want, got = run_both(k, {"x": RNG.standard_normal(3).astype(np.float32) * 4,
                             "a": np.zeros(3, np.float32), "b": np.zeros(3, np.int32)})
    assert_same(want, got)
    text = run_kernel_cuda(k, {"x": np.ones(3, np.float32), "a": np.zeros(3, np.float32),
                               "b": np.zeros(3, np.int32)})
    assert "t_f32 =" in text and "t_i32 =" in text


def _graph(op: str, operands: list[np.ndarray], attrs: dict | None = None,
           consts: tuple[int, ...] = ()):
    b = GraphBuilder(op)
    names, inputs = [], []
    for k, a in enumerate(operands):
        if k in consts:
            names.append(b.constant(a, f"c{k}"))
        else:
            names.append(b.input(f"in{k}", TensorType.of(a)))
            inputs.append(a)
    b.output(*b.op_multi(op, names, attrs))
    return b.build(), inputs


def _f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(("op", "operands", "attrs", "consts"), [
    ("linear", [_f32(3, 9), _f32(5, 9), _f32(5)], None, (1, 2)),
    ("conv", [_f32(1, 2, 6, 6), _f32(4, 2, 3, 3)], {"padding": 1}, (1,)),
    ("max_pool", [_f32(1, 2, 6, 6)], {"kernel": [2, 2], "stride": [2, 2]}, ()),
    ("softmax", [_f32(3, 10)], {"axis": -1}, ()),
    ("qlinear", [RNG.integers(0, 256, (2, 8)).astype(np.uint8),
                 RNG.integers(-127, 128, (4, 8)).astype(np.int8),
                 RNG.integers(-3000, 3000, 4).astype(np.int32),
                 RNG.uniform(2e-4, 1e-3, 4).astype(np.float32)], {"out_dtype": "f32"}, (1, 2, 3)),
], ids=["linear", "conv", "max_pool", "softmax", "qlinear"])
def test_cpu_schedules_run_as_they_are(op, operands, attrs, consts):
    """At width 8 the lowering emits the CPU's packed GEMM (workspaces in the arena), vector
    loads, broadcasts, lane reductions and dot_add4: all scalarized, all correct."""
    graph, inputs = _graph(op, operands, attrs, consts)
    program = compile_graph_cuda(graph, width=8)
    assert any("_l" in s.text for s in program.sources)  # some lane loop was generated
    np.testing.assert_allclose(program.run(*inputs)[0], run_graph(graph, inputs)[0],
                               rtol=1e-5, atol=1e-5)


def test_launches_bind_the_output_loops():
    # A softmax over the first axis reads its columns with a stride: a thread per column.
    graph, _ = _graph("softmax", [_f32(3, 4)], {"axis": 0})
    program = compile_graph_cuda(graph)
    [launch] = program.launches()
    assert launch.work == 4 and launch.bound == ("i1",) and launch.schedule == "grid-stride"
    (blocks, _, _), (threads, _, _) = launch.grid, launch.block
    assert blocks * threads <= launch.work + threads
    assert "cuda.grid(1)" in program.source and "@cuda.jit" in program.source
    # A sum over everything: one block folds it, instead of one thread.
    graph, _ = _graph("reduce_sum", [_f32(3, 4)], {"axes": None, "keepdim": False})
    [launch] = compile_graph_cuda(graph).launches()
    assert (launch.work, launch.grid, launch.bound, launch.schedule) == (
        1, (1, 1, 1), (), "block-reduce")
    # With the CUDA schedules off it is the generic single thread.
    [launch] = compile_graph_cuda(graph, tuning=GENERIC).launches()
    assert (launch.work, launch.grid, launch.block, launch.schedule) == (
        1, (1, 1, 1), (1, 1, 1), "serial")


def test_run_kernel_cuda_checks_buffers():
    k = Kernel("copy", (Buffer("x", "f32", 4), Buffer("y", "f32", 4)),
               (For(idx("i"), c(0), c(4), (Store("y", idx("i"), Load("x", idx("i"))),)),))
    with pytest.raises(KilnError, match="must be flat f32"):
        run_kernel_cuda(k, {"x": np.zeros(4, np.float64), "y": np.zeros(4, np.float32)})
