"""Division by a float32 constant in the LLVM backend (codegen.py `_divide_by_constant`): a
multiply by the reciprocal and one FMA correction instead of a division instruction, and
still the correctly rounded quotient, bit for bit the same as NumPy's division, on the host
ISA and on AVX2."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.llvm.codegen import ModuleBuilder, emit_kernel
from kiln.backends.llvm.compiler import default_target, host_target, run_kernel_llvm
from kiln.ir import kernel as K
from kiln.ir.kernel import INDEX, Buffer, Const, For, Kernel, Var
from kiln.passes.target import named_target


def _divide_kernel(n: int, divisor: float, lanes: int) -> Kernel:
    """y = x / divisor over n elements (n a multiple of lanes), the divisor an immediate."""
    i = Var("i")
    d = Const(divisor, "f32")
    body = (For(i, Const(0, INDEX), Const(n, INDEX), (
        K.Store("y", i, K.Load("x", i, "f32", lanes) / (K.Broadcast(d, lanes) if lanes > 1
                                                          else d)),), step=lanes),)
    return Kernel("divide", (Buffer("x", "f32", n), Buffer("y", "f32", n)), body)


def _inputs() -> np.ndarray:
    """Every float32 in [1, 2) (the quotient's rounding depends on the significands only),
    the same scaled near both ends of the normal range, and the special values."""
    ones = np.arange(0x3F800000, 0x40000000, dtype=np.uint32).view(np.float32)
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, 1e-40, 3e38, -3.4e38,
                        np.finfo(np.float32).tiny, 1.5], np.float32)
    x = np.concatenate([ones, -ones * np.float32(1024), ones * np.float32(2.0 ** -100),
                        ones * np.float32(2.0 ** 100), special])
    return np.concatenate([x, np.zeros(-len(x) % 16, np.float32)])


DIVISORS = [0.00917537696659565, 3.0, 0.1, 7.0, 1 / 3, 123.456, 0.0234375, 1 - 2 ** -24,
            1 + 2 ** -23, -0.37, 2.5e-30, 3.1e30]


@pytest.mark.parametrize("isa", ["host", "avx2"])
def test_division_by_a_constant_is_correctly_rounded(isa):
    target = named_target(isa, host_target())
    x = _inputs()
    for divisor, lanes in [(d, target.f32_lanes) for d in DIVISORS] + [(DIVISORS[0], 1)]:
        divisor = float(np.float32(divisor))
        y = np.empty_like(x)
        run_kernel_llvm(_divide_kernel(len(x), divisor, lanes), {"x": x, "y": y}, target)
        with np.errstate(over="ignore", under="ignore"):
            want = x / np.float32(divisor)
        same = (y.view(np.uint32) == want.view(np.uint32)) | (np.isnan(y) & np.isnan(want))
        assert same.all(), (divisor, x[~same][:4], y[~same][:4], want[~same][:4])


def test_no_division_instruction_where_the_target_has_fma():
    target = default_target()
    m = ModuleBuilder(target)
    emit_kernel(m, _divide_kernel(64, 3.0, target.f32_lanes))
    text = m.text()
    if "+fma" in target.features.split(","):
        assert "fdiv" not in text and "llvm.fma" in text
    else:
        assert "fdiv" in text
    # A power of two stays a division: LLVM turns it into an exact multiply itself.
    m = ModuleBuilder(target)
    emit_kernel(m, _divide_kernel(64, 0.25, target.f32_lanes))
    assert "fdiv" in m.text()
