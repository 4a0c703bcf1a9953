"""Kernel IR: text form, interpreter, and the kernel passes (vectorize, unroll, parallel)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.ir import KilnError
from kiln.ir import kernel as K
from kiln.ir.kernel import INDEX, Assign, Buffer, Const, Decl, For, Kernel, Load, Store, Var
from kiln.passes.vectorize import place_parallel, unroll, vectorize


def _scale_add_kernel(n: int) -> Kernel:
    i = Var("i")
    body = [For(i, Const(0, INDEX), Const(n, INDEX), (
        Store("out", i, Load("x", i) * 2.0 + Load("y", i)),), "vectorized")]
    return Kernel("scale_add", (Buffer("x", "f32", n), Buffer("y", "f32", n),
                                Buffer("out", "f32", n)), tuple(body))


def _sum_kernel(n: int) -> Kernel:
    i, acc = Var("i"), Var("acc", "f32")
    body = [Decl(acc, Const(0.0)),
            For(i, Const(0, INDEX), Const(n, INDEX), (Assign(acc, acc + Load("x", i)),),
                "vectorized"),
            Store("out", Const(0, INDEX), acc)]
    return Kernel("total", (Buffer("x", "f32", n), Buffer("out", "f32", 1)), tuple(body))


def test_text_form() -> None:
    assert str(_scale_add_kernel(10)) == (
        "kernel scale_add(x: f32[10], y: f32[10], out: f32[10]) {\n"
        "  vectorized for i in [0, +10):\n"
        "    out[i] = ((x[i] * 2.0) + y[i])\n"
        "}\n")


def test_vectorize_splits_main_loop_and_tail() -> None:
    after = vectorize(_scale_add_kernel(9), 4)
    assert str(after) == (
        "kernel scale_add(x: f32[9], y: f32[9], out: f32[9]) {\n"
        "  for i in [0, +8) step 4:\n"
        "    out[i, 4] = ((x[i, 4] * broadcast(2.0, 4)) + y[i, 4])\n"
        "  for i in [8, +1):\n"
        "    out[i] = ((x[i] * 2.0) + y[i])\n"
        "}\n")


def test_short_rows_take_the_widest_vector_that_fits() -> None:
    # A 7-wide row on 16 lanes: 4 + 2 lanes and one scalar, not 7 scalar iterations
    # (MobileNetV2's 7x7 depthwise convolutions ran 1.5x slower scalar).
    assert str(vectorize(_scale_add_kernel(7), 16)) == (
        "kernel scale_add(x: f32[7], y: f32[7], out: f32[7]) {\n"
        "  for i in [0, +4) step 4:\n"
        "    out[i, 4] = ((x[i, 4] * broadcast(2.0, 4)) + y[i, 4])\n"
        "  for i in [4, +2) step 2:\n"
        "    out[i, 2] = ((x[i, 2] * broadcast(2.0, 2)) + y[i, 2])\n"
        "  for i in [6, +1):\n"
        "    out[i] = ((x[i] * 2.0) + y[i])\n"
        "}\n")
    # 14 wide: 8 + 4 + 2 lanes.
    text = str(vectorize(_scale_add_kernel(14), 16))
    assert "for i in [0, +8) step 8:" in text and "for i in [8, +4) step 4:" in text
    assert "for i in [12, +2) step 2:" in text and "out[i] =" not in text


def test_vectorize_reduction_uses_vector_accumulator() -> None:
    after = vectorize(_sum_kernel(11), 4)
    text = str(after)
    assert "f32x4 acc_v = broadcast(0.0, 4)" in text
    assert "acc = (acc + reduce_add(acc_v))" in text
    x = np.arange(11, dtype=np.float32)
    out = np.zeros(1, np.float32)
    K.run_kernel(after, {"x": x, "out": out})
    assert out[0] == x.sum()


@pytest.mark.parametrize("n", [1, 4, 7, 16, 33])
@pytest.mark.parametrize("width", [1, 4, 8])
def test_vectorized_kernel_computes_the_same(n: int, width: int) -> None:
    rng = np.random.default_rng(n)
    x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    outs = []
    for k in (_scale_add_kernel(n), vectorize(_scale_add_kernel(n), width)):
        out = np.zeros(n, np.float32)
        K.run_kernel(k, {"x": x, "y": y, "out": out})
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], x * 2 + y, rtol=1e-6)


def test_wide_gather_is_not_vectorized() -> None:
    i = Var("i")
    k = Kernel("gather", (Buffer("x", "f32", 50), Buffer("out", "f32", 10)), (
        For(i, Const(0, INDEX), Const(10, INDEX), (Store("out", i, Load("x", i * 5)),),
            "vectorized"),))
    after = vectorize(k, 4)
    assert "step" not in str(after) and "vectorized" not in str(after)


def test_stride_two_load_becomes_a_strided_vector_load() -> None:
    i = Var("i")
    k = Kernel("evens", (Buffer("x", "f32", 19), Buffer("out", "f32", 10)), (
        For(i, Const(0, INDEX), Const(10, INDEX), (Store("out", i, Load("x", i * 2)),),
            "vectorized"),))
    after = vectorize(k, 4)
    assert "out[i, 4] = x[(i * 2), 4:2]" in str(after)
    x = np.arange(19, dtype=np.float32)
    out = np.zeros(10, np.float32)
    K.run_kernel(after, {"x": x, "out": out})  # the last lane reads x[18], the last element
    np.testing.assert_array_equal(out, x[::2])


def test_unroll_and_parallel_placement() -> None:
    i, j = Var("i"), Var("j")
    inner = For(j, Const(0, INDEX), Const(2, INDEX), (Store("out", i * 2 + j, Const(1.0)),),
                "unrolled")
    k = Kernel("fill", (Buffer("out", "f32", 6),), (
        For(i, Const(0, INDEX), Const(3, INDEX), (inner,), "parallel"),))
    text = str(unroll(place_parallel(k)))
    assert "parallel for i" in text and "for j" not in text
    assert "out[(i * 2)] = 1.0" in text and "out[((i * 2) + 1)] = 1.0" in text


def test_interpreter_checks_bounds() -> None:
    i = Var("i")
    k = Kernel("oob", (Buffer("out", "f32", 4),), (
        For(i, Const(0, INDEX), Const(5, INDEX), (Store("out", i, Const(0.0)),)),))
    with pytest.raises(KilnError, match="out-of-bounds"):
        K.run_kernel(k, {"out": np.zeros(4, np.float32)})


def test_affine_coefficient() -> None:
    i, j = Var("i"), Var("j")
    assert K.affine_coef(i * 3 + j + 2, "i") == 3
    assert K.affine_coef(i * 3 + j + 2, "j") == 1
    assert K.affine_coef(i * j, "i") is None
    assert K.affine_coef(j + 1, "i") == 0
