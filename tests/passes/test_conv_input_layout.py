"""Convolutions over permuted, split, sliced or concatenated inputs read a stored buffer in their
own layout, and so take their packed schedules (issue 17: ShuffleNet's channel shuffles left its
1x1 convs the unpacked loop nest at 0.4 GFLOP/s, GoogLeNet's and Inception's concats likewise).

The checks are on the kernel plan, not on timings: which values a conv kernel reads from memory,
and whether it got a packed schedule (``meta["schedule"]``) or the unpacked fallback."""

from __future__ import annotations

import numpy as np

from kiln.backends.llvm import compile_graph
from kiln.backends.reference import run_graph
from kiln.ir import Graph, GraphBuilder, TensorType
from kiln.passes.fusion import plan_fusion
from kiln.passes.lower import KernelStep, lower_graph

WIDTH = 8  # an AVX2-width target: the packed schedules are on


def _weights(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def _shuffle_block() -> Graph:
    """One ShuffleNetV2 unit after another: concat, channel shuffle (reshape, permute,
    reshape), split into halves; a 1x1 conv and a depthwise conv read the second half, the
    first half goes on to the next concat unchanged."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("shuffle")
    a = b.input("a", TensorType((1, 8, 10, 10)))
    c = b.input("c", TensorType((1, 8, 10, 10)))
    cat = b.op("concat", [a, c], {"axis": 1}, name="cat")
    r = b.op("reshape", [cat], {"shape": (1, 2, 8, 10, 10)}, name="split_groups")
    p = b.op("permute", [r], {"perm": (0, 2, 1, 3, 4)}, name="shuffle")
    s = b.op("reshape", [p], {"shape": (1, 16, 10, 10)}, name="merge_groups")
    keep, work = b.op_multi("split", [s], {"axis": 1, "sizes": (8, 8)}, name="chunk")
    y = b.op("conv", [work, b.constant(_weights(rng, 8, 8, 1, 1), "w1")], name="pw")
    y = b.op("relu", [y], name="pw_relu")
    y = b.op("conv", [y, b.constant(_weights(rng, 8, 1, 3, 3), "wd")],
             {"padding": 1, "groups": 8}, name="dw")
    y = b.op("conv", [y, b.constant(_weights(rng, 8, 8, 1, 1), "w2")], name="pw2")
    out = b.op("concat", [keep, y], {"axis": 1}, name="cat2")
    # The next unit's shuffle and split: its conv reads the shuffled concat again.
    r2 = b.op("reshape", [out], {"shape": (1, 2, 8, 10, 10)}, name="split_groups2")
    p2 = b.op("permute", [r2], {"perm": (0, 2, 1, 3, 4)}, name="shuffle2")
    s2 = b.op("reshape", [p2], {"shape": (1, 16, 10, 10)}, name="merge_groups2")
    half = b.op("slice", [s2], {"axis": 1, "start": 8, "end": 16}, name="half")
    b.output(b.op("conv", [half, b.constant(_weights(rng, 12, 8, 1, 1), "w3")], name="pw3"))
    return b.build()


def _inception_block() -> Graph:
    """GoogLeNet's pattern: a concat read by two convolutions and a max pool."""
    rng = np.random.default_rng(1)
    b = GraphBuilder("inception")
    x = b.input("x", TensorType((1, 8, 12, 12)))
    b1 = b.op("conv", [x, b.constant(_weights(rng, 8, 8, 1, 1), "w1")], name="b1")
    b2 = b.op("conv", [x, b.constant(_weights(rng, 8, 8, 3, 3), "w2")], {"padding": 1},
              name="b2")
    cat = b.op("concat", [b1, b2], {"axis": 1}, name="cat")
    y1 = b.op("conv", [cat, b.constant(_weights(rng, 8, 16, 1, 1), "w3")], name="next1")
    y2 = b.op("conv", [cat, b.constant(_weights(rng, 8, 16, 3, 3), "w4")], {"padding": 1},
              name="next2")
    y3 = b.op("max_pool", [cat], {"kernel": (3, 3), "stride": (1, 1), "padding": (1, 1)},
              name="pool")
    b.output(b.op("concat", [y1, y2, y3], {"axis": 1}, name="out"))
    return b.build()


def _conv_steps(g: Graph) -> dict[str, KernelStep]:
    lowered = lower_graph(g, width=WIDTH)
    return {s.root: s for s in lowered.steps if s.kernel.meta["op"] == "conv"}


def _check_numerics(g: Graph, seed: int = 2) -> None:
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal(g.types[i].shape).astype(np.float32) for i in g.inputs]
    got = compile_graph(g, cache=False)(inputs)
    for have, want in zip(got, run_graph(g, inputs)):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_shuffled_and_split_input_is_stored_once_before_the_conv() -> None:
    g = _shuffle_block()
    plan = plan_fusion(g)
    # The split (both halves) and the slice are stored, each by one copy kernel that computes
    # the shuffle inline; the shuffle's own nodes stay index arithmetic inside those copies.
    for name in ("chunk", "half"):
        assert plan.roles[name] == "root", plan.reasons[name]
        assert "read by the convolution" in plan.reasons[name]
    for name in ("cat", "split_groups", "shuffle", "merge_groups", "cat2", "shuffle2"):
        assert plan.roles[name] == "inline", plan.reasons[name]
    steps = _conv_steps(g)
    chunk = next(n for n in g.nodes if n.name == "chunk")
    # Each conv reads exactly one stored activation, the one in its own layout (not a, c or
    # the concat's other producers through the shuffle's index arithmetic) ...
    assert set(steps["pw"].reads.values()) & set(g.inputs) == set()
    assert chunk.outputs[1] in steps["pw"].reads.values()
    assert "half" in steps["pw3"].reads.values()
    assert "a" not in steps["pw3"].reads.values() and "c" not in steps["pw3"].reads.values()
    # ... and so takes a packed schedule, not the unpacked loop nest.
    assert steps["pw"].kernel.meta.get("schedule"), steps["pw"].kernel.meta
    assert steps["pw3"].kernel.meta.get("schedule"), steps["pw3"].kernel.meta
    _check_numerics(g)


def test_concat_read_by_convs_is_stored_once() -> None:
    g = _inception_block()
    plan = plan_fusion(g)
    assert plan.roles["cat"] == "root", plan.reasons["cat"]
    steps = _conv_steps(g)
    for name in ("next1", "next2"):
        assert "cat" in steps[name].reads.values()
        assert "b1" not in steps[name].reads.values()
        assert steps[name].kernel.meta.get("schedule"), steps[name].kernel.meta
    _check_numerics(g)


def test_reshape_into_a_conv_is_read_in_place() -> None:
    """A reshape moves no data: the conv reads the reshaped tensor's buffer itself, with no
    copy kernel, and keeps its packed schedule."""
    rng = np.random.default_rng(3)
    b = GraphBuilder("view")
    x = b.input("x", TensorType((1, 8, 100)))
    v = b.op("reshape", [x], {"shape": (1, 8, 10, 10)}, name="view")
    y = b.op("conv", [v, b.constant(_weights(rng, 16, 8, 3, 3), "w")], {"padding": 1},
             name="conv")
    y = b.op("conv", [y, b.constant(_weights(rng, 16, 1, 3, 3), "wd")],
             {"padding": 1, "groups": 16}, name="dw")
    b.output(y)
    g = b.build()
    assert plan_fusion(g).roles["view"] == "inline"
    lowered = lower_graph(g, width=WIDTH)
    assert [s.root for s in lowered.steps] == ["conv", "dw"]
    assert "x" in lowered.steps[0].reads.values()
    assert lowered.steps[0].kernel.meta.get("schedule")
    _check_numerics(g)


def test_elementwise_op_through_a_reshape_is_stored() -> None:
    """An elementwise op seen by a conv through a reshape is stored by its own kernel (the
    conv then reads it in place through the reshape), not recomputed at every tap."""
    rng = np.random.default_rng(4)
    b = GraphBuilder("act_view")
    x = b.input("x", TensorType((1, 8, 100)))
    a = b.op("relu", [x], name="act")
    v = b.op("reshape", [a], {"shape": (1, 8, 10, 10)}, name="view")
    b.output(b.op("conv", [v, b.constant(_weights(rng, 16, 8, 1, 1), "w")], name="conv"))
    g = b.build()
    plan = plan_fusion(g)
    assert plan.roles["act"] == "root" and plan.roles["view"] == "inline"
    steps = _conv_steps(g)
    assert "act" in steps["conv"].reads.values()
    assert steps["conv"].kernel.meta.get("schedule")
    _check_numerics(g)


def test_permuted_input_of_a_3d_conv_with_per_axis_strides() -> None:
    """A 3-d conv over a stored copy of its permuted input takes the packed lowering, whose
    algorithm key spells each of its three strides (random graph 817: the key read them as
    two and raised ShapeError once the input was stored)."""
    rng = np.random.default_rng(5)
    b = GraphBuilder("conv3d")
    x = b.input("x", TensorType((1, 5, 6, 7, 3)))
    p = b.op("permute", [x], {"perm": (0, 4, 1, 2, 3)}, name="to_ncdhw")
    b.output(b.op("conv", [p, b.constant(_weights(rng, 4, 3, 2, 3, 2), "w")],
                  {"stride": (1, 1, 2), "padding": (1, 2, 1), "dilation": (1, 2, 1)},
                  name="conv"))
    g = b.build()
    assert plan_fusion(g).roles["to_ncdhw"] == "root"
    assert "to_ncdhw" in _conv_steps(g)["conv"].reads.values()
    _check_numerics(g)
