"""What keeps the LLVM backend's compile time in check: every kernel is a function of its
own (LLVM does not inline it into ``kiln_run``), and the cycle collector is paused while the
pipeline runs, then left as it was; constants and arenas start on a cache line."""

from __future__ import annotations

import gc

import numpy as np

from kiln.backends.llvm import compiler as C
from kiln.backends.llvm.codegen import ModuleBuilder, emit_kernel
from kiln.ir import DType, GraphBuilder, TensorType
from kiln.ir.kernel import INDEX, Buffer, Const, For, Kernel, Load, Store, Var


def _kernel() -> Kernel:
    i = Var("i")
    body = (For(i, Const(0, INDEX), Const(8, INDEX), (Store("y", i, Load("x", i) * 2.0),)),)
    return Kernel("k0_double", (Buffer("x", "f32", 8), Buffer("y", "f32", 8)), body)


def test_kernels_are_not_inlined() -> None:
    m = ModuleBuilder(C.host_target())
    emit_kernel(m, _kernel())
    define = next(line for line in m.text().splitlines() if "@k0_double(" in line)
    assert define.startswith("define internal void") and "noinline" in define


def _graph():
    b = GraphBuilder()
    x = b.input("x", TensorType((2, 8), DType.f32))
    b.output(b.op("relu", [x]))
    return b.build()


def test_collector_state_is_restored() -> None:
    g = _graph()
    was = gc.isenabled()
    try:
        for state in (True, False):
            (gc.enable if state else gc.disable)()
            prog = C.compile_graph(g, cache=False)
            assert gc.isenabled() is state
        x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
        np.testing.assert_array_equal(prog.run([x])[0], np.maximum(x, 0))
    finally:
        (gc.enable if was else gc.disable)()


def test_constants_and_arenas_start_on_a_cache_line() -> None:
    """Kernels read weights with full-width vector loads at 64-byte offsets of the constant
    blob and values at 64-byte offsets of the arena: both must start on a 64-byte boundary,
    whatever address NumPy gave the blob (a loaded artifact's, a cached image's)."""
    from kiln.backends.llvm.compiler import ALIGNMENT, CompiledProgram, aligned_copy

    b = GraphBuilder()
    x = b.input("x", TensorType((4, 40)))
    w = b.constant(np.random.default_rng(0).standard_normal((24, 40)).astype(np.float32), "w")
    b.output(b.op("relu", [b.op("linear", [x, w])]))
    prog = C.compile_graph(b.build(), cache=False)
    raw = np.zeros(prog.image.const_blob.nbytes + 64, np.uint8)
    off = raw[16:16 + prog.image.const_blob.nbytes]
    off[...] = prog.image.const_blob
    if off.ctypes.data % ALIGNMENT == 0:  # make sure the copy below starts misaligned
        off = raw[48:48 + prog.image.const_blob.nbytes]
        off[...] = prog.image.const_blob
    prog.image.const_blob = off
    moved = CompiledProgram(prog.image)
    assert moved._consts_ptr % ALIGNMENT == 0
    assert all(state.arena_ptr % ALIGNMENT == 0 for state in moved._free)
    assert aligned_copy(off).tobytes() == off.tobytes()
    xs = np.random.default_rng(1).standard_normal((4, 40)).astype(np.float32)
    np.testing.assert_array_equal(moved.run([xs])[0], prog.run([xs])[0])
