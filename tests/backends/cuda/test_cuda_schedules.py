"""The CUDA-specific schedules (simulator): tiled GEMMs for dense nests and a thread block per
row for row reductions match the reference interpreter, take the nests they should, leave the
others to the generic mapping, and show their tiling in the source and launch configuration."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.cuda import compile_graph_cuda
from kiln.backends.cuda.dense import GemmTiling, match_contraction
from kiln.backends.cuda.mapping import plan_segments
from kiln.backends.cuda.reduce import RowTiling
from kiln.backends.cuda.schedule import GPU_TUNING, SIM_TUNING, CudaTuning, render_scheduled
from kiln.backends.reference import run_graph
from kiln.ir import GraphBuilder, TensorType
from kiln.passes.lower import lower_graph

RNG = np.random.default_rng(11)


def f32(*shape, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def build(ops: list[tuple[str, list, dict]], inputs: dict[str, np.ndarray],
          consts: dict[str, np.ndarray] | None = None):
    """A graph of a chain of ops: each op's operands name inputs, constants or ``"_"`` (the
    previous op's output)."""
    b = GraphBuilder("g")
    names = {k: b.input(k, TensorType.of(v)) for k, v in inputs.items()}
    names |= {k: b.constant(v, k) for k, v in (consts or {}).items()}
    prev = None
    for op, operands, attrs in ops:
        prev = b.op(op, [prev if o == "_" else names[o] for o in operands], attrs)
    b.output(prev)
    return b.build(), list(inputs.values())


def check(graph, inputs, tuning: CudaTuning = SIM_TUNING, rtol: float = 1e-5):
    """Compile with ``tuning``, compare with the reference; returns the program."""
    program = compile_graph_cuda(graph, tuning=tuning)
    want = run_graph(graph, inputs)
    got = program.run(*inputs)
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == w.dtype
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol,
                                       atol=rtol * max(1.0, float(np.abs(w).max())),
                                       equal_nan=True)
        else:
            np.testing.assert_array_equal(g, w)
    return program


def schedules(program) -> list[str]:
    return [lc.schedule for lc in program.launches()]


# ---- tiled GEMM ------------------------------------------------------------------------------
def test_matmul_5x7x9_runs_as_a_tiled_gemm_with_ragged_tiles():
    # Simulator tiles: 2 x 2 threads, 4 x 4 outputs each (8 x 8 tiles), K staged 16 at a time:
    # M = 5 fills part of one row tile, N = 9 needs two column tiles, K = 7 part of a step.
    graph, inputs = build([("matmul", ["a", "b"], {})], {"a": f32(5, 7), "b": f32(7, 9)})
    program = check(graph, inputs)
    [lc] = program.launches()
    assert lc.schedule == "tiled-gemm" and lc.work == 45
    assert lc.grid == (2, 1, 1) and lc.block == (2, 2, 1)
    # A tile 16 x (8 + 1 padding word), B tile 16 x 8, f32.
    assert lc.shared_bytes == (16 * 9 + 16 * 8) * 4
    src = program.source
    assert "cuda.shared.array((16, 9), numba.types.float32)" in src
    assert "cuda.shared.array((16, 8), numba.types.float32)" in src
    assert "cuda.local.array((4, 4), numba.types.float32)" in src
    assert src.count("cuda.syncthreads()") == 2


@pytest.mark.parametrize(("a_shape", "b_shape"), [
    ((17, 13), (13, 19)),          # several tiles along M and N, ragged everywhere
    ((9, 40), (40, 6)),            # three K steps, the last one ragged
    ((2, 5, 7), (2, 7, 9)),        # a batch: one grid z-slice per matrix
    ((1, 5, 4), (2, 4, 3)),        # a broadcast batch
    ((2, 3, 4), (4, 5)),           # a batch folded into the rows (b has no batch axis)
    ((6, 1), (1, 5)),              # K = 1
])
def test_matmul_shapes(a_shape, b_shape):
    graph, inputs = build([("matmul", ["a", "b"], {})], {"a": f32(*a_shape),
                                                         "b": f32(*b_shape)})
    assert schedules(check(graph, inputs)) == ["tiled-gemm"]


def test_matmul_through_an_inlined_transpose():
    # b.T is index arithmetic inside the kernel: the tile loader reads b along k.
    graph, inputs = build([("permute", ["b"], {"perm": [1, 0]}), ("matmul", ["a", "_"], {})],
                          {"a": f32(6, 5), "b": f32(7, 5)})
    graph2, _ = build([("matmul", ["a", "bt"], {})], {"a": f32(6, 5), "bt": f32(5, 7)})
    program = check(graph, inputs)
    assert schedules(program) == ["tiled-gemm"]


def test_linear_with_fused_bias_gelu_and_residual():
    x, w, bias, res = f32(9, 6), f32(10, 6), f32(10), f32(9, 10)
    graph, inputs = build([("linear", ["x", "w", "bias"], {}),
                           ("gelu", ["_"], {"approximate": "tanh"}),
                           ("add", ["_", "res"], {})],
                          {"x": x, "res": res}, {"w": w, "bias": bias})
    program = check(graph, inputs)
    assert schedules(program) == ["tiled-gemm"]
    # One kernel: bias, GELU and the residual add happen as the tile is stored.
    assert len(program.lowered.steps) == 1 and "math.tanh" in program.source


def test_linear_3d_input_and_relu():
    graph, inputs = build([("linear", ["x", "w"], {}), ("relu", ["_"], {})],
                          {"x": f32(2, 3, 5)}, {"w": f32(6, 5)})
    assert schedules(check(graph, inputs)) == ["tiled-gemm"]


@pytest.mark.parametrize("attrs", [
    {"stride": 2, "padding": 1},
    {"stride": [1, 2], "padding": [2, 0], "dilation": [2, 1]},
    {"dilation": 2, "padding": 2},
])
def test_conv2d_as_implicit_gemm(attrs):
    graph, inputs = build([("conv", ["x", "w", "bias"], attrs), ("relu", ["_"], {})],
                          {"x": f32(2, 3, 7, 6)}, {"w": f32(5, 3, 3, 3), "bias": f32(5)})
    program = check(graph, inputs)
    assert schedules(program) == ["tiled-gemm"]
    # Rows are output channels; columns are output pixels of every image (the weight does
    # not depend on the image, so the batch joins the columns rather than the grid's z).
    [seg] = plan_segments(program.lowered.steps[0].kernel)
    c = match_contraction(seg)
    assert c is not None and len(c.rows) == 1 and len(c.cols) == 3 and c.shape[0] == 1
    assert program.launches()[0].grid[2] == 1


def test_conv1d_and_conv3d():
    graph, inputs = build([("conv", ["x", "w"], {"stride": 2, "padding": 1})],
                          {"x": f32(2, 3, 9), "w": f32(4, 3, 3)})
    assert schedules(check(graph, inputs)) == ["tiled-gemm"]
    graph, inputs = build([("conv", ["x", "w"], {"padding": 1})],
                          {"x": f32(1, 2, 3, 4, 3), "w": f32(4, 2, 2, 2, 2)})
    assert schedules(check(graph, inputs)) == ["tiled-gemm"]


def test_f16_matmul_accumulates_in_f32():
    a = RNG.uniform(-1, 1, (6, 40)).astype(np.float16)
    b = RNG.uniform(-1, 1, (40, 5)).astype(np.float16)
    graph, inputs = build([("matmul", ["a", "b"], {})], {"a": a, "b": b})
    program = compile_graph_cuda(graph)
    assert schedules(program) == ["tiled-gemm"]
    assert "cuda.shared.array((16, 9), numba.types.float32)" in program.source
    (got,) = program.run(a, b)
    exact = (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float16)
    # One rounding to f16 at the end: as close as the f16 result of the f32 product.
    np.testing.assert_allclose(got.astype(np.float32), exact.astype(np.float32),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("op", "shapes", "attrs", "schedule"), [
    # A batch-1 linear layer (a matrix-vector product: a block per output's dot product).
    ("linear", {"x": (1, 4096), "w": (3, 4096)}, {}, "block-reduce"),
    # A long row reduction (a block per row) and a strided one (a thread per column).
    ("reduce_sum", {"x": (2, 4096)}, {"axes": [1], "keepdim": False}, "block-reduce"),
    ("reduce_sum", {"x": (4096, 3)}, {"axes": [0], "keepdim": False}, "grid-stride"),
])
def test_f16_long_reductions_accumulate_in_f32_on_every_schedule(op, shapes, attrs, schedule):
    """Sums of 4096 positive f16 terms: an f16 accumulator stalls near 2048 (its spacing there
    exceeds the terms); kiln's f32 accumulator is off by the one rounding of the result."""
    arrays = {k: RNG.uniform(0, 1, v).astype(np.float16) for k, v in shapes.items()}
    graph, inputs = build([(op, list(arrays), attrs)], arrays)
    program = compile_graph_cuda(graph)
    assert schedules(program) == [schedule]
    (got,) = program.run(*inputs)
    wide = [a.astype(np.float64) for a in inputs]
    exact = wide[0] @ wide[1].T if op == "linear" else wide[0].sum(axis=attrs["axes"][0])
    assert got.dtype == np.float16
    ulp = np.spacing(exact.astype(np.float16)).astype(np.float64)
    np.testing.assert_array_less(np.abs(got.astype(np.float64) - exact), ulp)


def _int8_case(op: str):
    if op == "qconv":
        x = RNG.integers(0, 256, (1, 5, 6, 7)).astype(np.uint8)
        w = RNG.integers(-127, 128, (6, 3, 3, 7)).astype(np.int8)
        attrs = {"stride": 1, "padding": 1, "x_zero_point": 9, "out_zero_point": 128}
    else:
        x = RNG.integers(0, 256, (5, 19)).astype(np.uint8)
        w = RNG.integers(-127, 128, (7, 19)).astype(np.int8)
        attrs = {"x_zero_point": 120, "out_zero_point": 3, "relu": True}
    n = w.shape[0]
    return build([(op, ["x", "w", "bias", "scale"], attrs)], {"x": x},
                 {"w": w, "bias": RNG.integers(-3000, 3000, n).astype(np.int32),
                  "scale": RNG.uniform(2e-4, 1e-3, n).astype(np.float32)})


@pytest.mark.parametrize("op", ["qlinear", "qconv"])
def test_int8_gemms_accumulate_in_int32_with_their_requantize_epilogue(op):
    graph, inputs = _int8_case(op)
    program = check(graph, inputs)
    assert schedules(program) == ["tiled-gemm"]
    assert "numba.types.int32" in program.source


@pytest.mark.parametrize("op", ["linear_w8", "dynamic_qlinear"])
def test_int8_weight_linears(op):
    graph, inputs = build([(op, ["x", "w", "scale", "bias"], {})], {"x": f32(5, 12)},
                          {"w": RNG.integers(-127, 128, (6, 12)).astype(np.int8),
                           "scale": RNG.uniform(1e-3, 1e-2, 6).astype(np.float32),
                           "bias": f32(6)})
    program = check(graph, inputs)
    assert "tiled-gemm" in schedules(program) or op == "dynamic_qlinear"


def test_nests_without_reuse_keep_the_generic_mapping():
    # A depthwise convolution: the weight has no output axis of its own (no N side).
    graph, inputs = build([("conv", ["x", "w"], {"groups": 3, "padding": 1})],
                          {"x": f32(1, 3, 5, 5), "w": f32(3, 1, 3, 3)})
    assert schedules(check(graph, inputs)) == ["grid-stride"]
    # A batch-1 linear is a matrix-vector product (no M side), and a batch of 2 has too few
    # rows to fill a tile.
    for batch in (1, 2):
        graph, inputs = build([("linear", ["x", "w"], {})], {"x": f32(batch, 8)},
                              {"w": f32(20, 8)})
        assert schedules(check(graph, inputs)) == ["grid-stride"]
    # Max pooling reduces with max, not a sum of products.
    graph, inputs = build([("max_pool", ["x"], {"kernel": [2, 2], "stride": 2})],
                          {"x": f32(1, 2, 4, 4)})
    assert schedules(check(graph, inputs)) == ["grid-stride"]


def test_contraction_sides():
    graph, _ = build([("matmul", ["a", "b"], {})], {"a": f32(2, 3, 4), "b": f32(2, 4, 5)})
    [seg] = plan_segments(lower_graph(graph).steps[0].kernel)
    c = match_contraction(seg)
    assert c is not None and c.shape == (2, 3, 5, 4)
    assert [b.count for b in c.batch] == [2] and len(c.rows) == len(c.cols) == 1


def test_gpu_tiling_of_a_256_cube_matmul():
    """The GPU configuration, read from the source (not run: 256 threads per block)."""
    graph, _ = build([("matmul", ["a", "b"], {})], {"a": f32(256, 256), "b": f32(256, 256)})
    kernel = lower_graph(graph).steps[0].kernel
    src = render_scheduled(kernel, GPU_TUNING)
    [launch] = src.launches
    assert launch.schedule == "tiled-gemm"
    assert launch.grid == (4, 4, 1) and launch.block == (16, 16, 1)
    assert launch.shared_bytes == (16 * 65 + 16 * 64) * 4
    assert "cuda.local.array((4, 4), numba.types.float32)" in src.text
    assert "for _k0 in range(0, 256, 16):" in src.text


def test_gpu_tiling_runs_in_the_simulator():
    # The GPU's 16 x 16 block with 4 x 4 micro-tiles, on a small ragged matmul.
    graph, inputs = build([("matmul", ["a", "b"], {})], {"a": f32(37, 20), "b": f32(20, 70)})
    program = check(graph, inputs, CudaTuning(GPU_TUNING.gemm, None))
    [lc] = program.launches()
    assert lc.block == (16, 16, 1) and lc.grid == (2, 1, 1)


def test_custom_gemm_tiling():
    # Odd block shapes and K steps work too (nothing assumes powers of two).
    tuning = CudaTuning(GemmTiling(threads_m=2, threads_n=3, max_micro=1, block_k=5), None)
    graph, inputs = build([("linear", ["x", "w", "b"], {})], {"x": f32(7, 11)},
                          {"w": f32(4, 11), "b": f32(4)})
    [lc] = check(graph, inputs, tuning).launches()
    assert lc.block == (3, 2, 1) and lc.grid == (2, 4, 1)


# ---- row reductions --------------------------------------------------------------------------
ROW_OPS = [
    ("softmax", {"axis": -1}),
    ("log_softmax", {"axis": -1}),
    ("layer_norm", {"normalized_ndim": 1}),
    ("reduce_sum", {"axes": [-1], "keepdim": False}),
    ("reduce_mean", {"axes": [-1], "keepdim": True}),
    ("reduce_max", {"axes": [-1], "keepdim": False}),
    ("reduce_min", {"axes": [-1], "keepdim": False}),
]
EVERY_ROW = CudaTuning(None, RowTiling(max_threads=8, min_threads=8, min_row=1, max_blocks=2))


@pytest.mark.parametrize("row", [1, 31, 33, 257])
@pytest.mark.parametrize(("op", "attrs"), ROW_OPS, ids=[op for op, _ in ROW_OPS])
def test_row_reductions_one_block_per_row(op, attrs, row):
    # Three rows over two blocks of 8 threads: rows take turns, rows shorter than the block
    # leave threads idle, longer ones give each thread several elements.
    x = f32(3, row, scale=3.0)
    if op == "layer_norm":
        graph, inputs = build([(op, ["x", "g", "b"], attrs)], {"x": x},
                              {"g": f32(row), "b": f32(row)})
    else:
        graph, inputs = build([(op, ["x"], attrs)], {"x": x})
    program = check(graph, inputs, EVERY_ROW)
    [lc] = program.launches()
    assert lc.schedule == "block-reduce" and lc.grid == (2, 1, 1) and lc.block == (8, 1, 1)
    # The default tuning leaves rows shorter than 16 to a thread each.
    default = check(graph, inputs)
    assert schedules(default) == ["block-reduce" if row >= 16 else "grid-stride"]


def test_block_reduce_source():
    graph, inputs = build([("softmax", ["x"], {"axis": -1})], {"x": f32(2, 33)})
    program = check(graph, inputs)
    src = program.source
    assert "for _row in range(cuda.blockIdx.x, 2, cuda.gridDim.x):" in src
    assert "for _f in range(_tid, 33, 8):" in src
    # The simulator's 8 threads are two groups ("warps") of 4 lanes: per reduction (max, then
    # sum) two shuffle steps in each warp, one slot per warp in shared memory, the same two
    # steps over the warps' values, a broadcast from lane 0, and two barriers.
    assert "cuda.shared.array(2, numba.types.float32)" in src
    assert src.count("cuda.shfl_sync_intrinsic(0xFFFFFFFF, 2,") == 2 * 2 * 2
    assert src.count("cuda.shfl_sync_intrinsic(0xFFFFFFFF, 0,") == 2
    assert src.count("cuda.syncthreads()") == 2 * 2
    assert program.launches()[0].shared_bytes == 2 * 4


def test_block_reduce_tree_source():
    # Without shuffles (warp=0): a shared-memory tree of log2(8) = 3 levels per reduction.
    tuning = CudaTuning(None, RowTiling(max_threads=8, min_threads=8, min_row=16,
                                        max_blocks=2, warp=0))
    graph, inputs = build([("softmax", ["x"], {"axis": -1})], {"x": f32(2, 33)})
    src = check(graph, inputs, tuning).source
    assert "cuda.shared.array(8, numba.types.float32)" in src
    assert "shfl" not in src
    assert src.count("if _tid < 4:") == 2 and src.count("if _tid < 1:") == 2


@pytest.mark.parametrize(("threads", "shared"), [(32, 0), (64, 2 * 4)])
def test_row_reduce_with_gpu_warps(threads, shared):
    # A GPU's 32-lane warps: one warp per row needs no shared memory and no barrier; two
    # warps meet through one slot each. Sum, max (with a NaN row) and a norm.
    tuning = CudaTuning(None, RowTiling(max_threads=threads, min_threads=threads, min_row=16,
                                        max_blocks=65535, warp=32))
    x = f32(3, 70)
    x[1, 33] = np.nan
    for op, attrs in (("reduce_sum", {"axes": [1], "keepdim": False}),
                      ("reduce_max", {"axes": [1], "keepdim": False}),
                      ("layer_norm", {"normalized_ndim": 1})):
        graph, inputs = build([(op, ["x"], attrs)], {"x": x})
        program = check(graph, inputs, tuning)
        [lc] = program.launches()
        assert lc.block == (threads, 1, 1) and lc.shared_bytes == shared
        assert "0x1f)[0]" in program.source
        assert ("cuda.syncthreads()" in program.source) == (threads > 32)


def test_block_reduce_keeps_nan_and_integer_wraparound():
    x = f32(2, 40)
    x[0, 17] = np.nan
    graph, inputs = build([("reduce_max", ["x"], {"axes": [-1], "keepdim": False})],
                          {"x": x})
    (got,) = check(graph, inputs).run(x)
    assert np.isnan(got[0]) and not np.isnan(got[1])
    u = RNG.integers(0, 256, (3, 50)).astype(np.uint8)
    graph, inputs = build([("reduce_sum", ["u"], {"axes": [1], "keepdim": False})], {"u": u})
    assert schedules(check(graph, inputs)) == ["block-reduce"]


def test_whole_tensor_and_multi_axis_reductions_use_one_block():
    graph, inputs = build([("reduce_mean", ["x"], {"axes": None, "keepdim": False})],
                          {"x": f32(3, 5, 7)})
    assert schedules(check(graph, inputs)) == ["block-reduce"]
    graph, inputs = build([("layer_norm", ["x"], {"normalized_ndim": 2})], {"x": f32(2, 4, 9)})
    assert schedules(check(graph, inputs)) == ["block-reduce"]
    graph, inputs = build([("group_norm", ["x", "g", "b"], {"groups": 2, "eps": 1e-5})],
                          {"x": f32(2, 4, 12)}, {"g": f32(4), "b": f32(4)})
    assert schedules(check(graph, inputs)) == ["block-reduce"]


def test_f16_softmax_and_fused_producer():
    x = f32(2, 35).astype(np.float16)
    graph, inputs = build([("softmax", ["x"], {"axis": -1})], {"x": x})
    assert schedules(check(graph, inputs, rtol=1e-3)) == ["block-reduce"]
    # An elementwise producer computed inside the reduction kernel, then an epilogue.
    graph, inputs = build([("mul", ["x", "y"], {}), ("log_softmax", ["_"], {"axis": -1})],
                          {"x": f32(3, 20), "y": f32(3, 20)})
    assert schedules(check(graph, inputs)) == ["block-reduce"]


def test_strided_reductions_keep_a_thread_per_row():
    graph, inputs = build([("softmax", ["x"], {"axis": 0})], {"x": f32(40, 3)})
    assert schedules(check(graph, inputs)) == ["grid-stride"]


def test_row_reduce_with_gpu_sized_warp():
    # 32 threads per row (a warp, the GPU's smallest row block) on a row of 70.
    tuning = CudaTuning(None, RowTiling(max_threads=32, min_threads=32, min_row=16,
                                        max_blocks=65535))
    graph, inputs = build([("layer_norm", ["x"], {"normalized_ndim": 1})], {"x": f32(1, 70)})
    [lc] = check(graph, inputs, tuning).launches()
    assert lc.block == (32, 1, 1) and lc.shared_bytes == 32 * 4
