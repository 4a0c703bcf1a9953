"""Fusion plan: which nodes share a kernel, and the reasons the debugger prints."""

from __future__ import annotations

import numpy as np

from kiln.ir import GraphBuilder, TensorType
from kiln.passes.fusion import plan_fusion
from kiln.passes.lower import lower_graph


def _conv_block():
    b = GraphBuilder("block")
    x = b.input("x", TensorType((1, 4, 6, 6)))
    w = b.constant(np.ones((4, 4, 3, 3), np.float32), "w")
    bias = b.constant(np.zeros(4, np.float32), "bias")
    y = b.op("conv", [x, w, bias], {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)},
             name="conv")
    y = b.op("add", [y, x], name="residual")
    y = b.op("relu", [y], name="relu")
    flat = b.op("reshape", [y], {"shape": (1, 144)}, name="flatten")
    s = b.op("softmax", [flat], {"axis": 1}, name="softmax")
    b.output(s)
    return b.build()


def test_conv_absorbs_residual_and_activation_epilogue() -> None:
    g = _conv_block()
    plan = plan_fusion(g)
    assert plan.describe(g) == (
        "conv                     conv               root      anchor (dense); epilogue "
        "stops: consumer flatten (reshape) is not elementwise\n"
        "residual                 add                epilogue  fused into conv's store\n"
        "relu                     relu               epilogue  fused into conv's store\n"
        "flatten                  reshape            inline    shape op: index arithmetic in "
        "each consumer\n"
        "softmax                  softmax            root      anchor (norm); epilogue stops: "
        "graph output")
    lowered = lower_graph(g)
    assert [s.root for s in lowered.steps] == ["conv", "softmax"]
    assert list(lowered.steps[0].writes.values()) == ["relu"]


def test_shared_value_is_stored_once() -> None:
    b = GraphBuilder("shared")
    x = b.input("x", TensorType((8,)))
    e = b.op("exp", [x], name="e")
    b.output(b.op("add", [e, e], name="twice"), b.op("neg", [e], name="negated"))
    g = b.build()
    plan = plan_fusion(g)
    assert plan.roles == {"e": "root", "twice": "root", "negated": "root"}
    assert plan.reasons["e"] == "2 users: computed once and stored"


def test_elementwise_chain_inlines_into_one_kernel() -> None:
    b = GraphBuilder("chain")
    x = b.input("x", TensorType((4, 5)))
    y = b.op("mul", [x, b.constant(np.float32(2.0).reshape(()), "two")], name="scaled")
    y = b.op("sigmoid", [y], name="sig")
    y = b.op("permute", [y], {"perm": (1, 0)}, name="t")
    b.output(b.op("tanh", [y], name="out"))
    g = b.build()
    lowered = lower_graph(g)
    assert len(lowered.steps) == 1
    assert lowered.plan.roles == {"scaled": "inline", "sig": "inline", "t": "inline",
                                  "out": "root"}


def test_permute_read_by_a_conv_is_stored():
    """A convolution's schedules read their input from memory: a channels-last tensor
    transposed for it is stored once, not recomputed inside the conv."""
    from kiln.backends.llvm import compile_graph
    from kiln.backends.reference import run_graph

    b = GraphBuilder("t")
    x = b.input("x", TensorType((1, 6, 6, 8)))
    p = b.op("permute", [x], {"perm": [0, 3, 1, 2]}, name="to_nchw")
    w = b.constant(np.random.default_rng(0).standard_normal((8, 1, 3, 3)).astype(np.float32))
    b.output(b.op("conv", [p, w], {"padding": 1, "groups": 8}, name="dw"))
    g = b.build()
    plan = plan_fusion(g)
    assert plan.roles["to_nchw"] == "root" and "convolution" in plan.reasons["to_nchw"]
    a = np.random.default_rng(1).standard_normal((1, 6, 6, 8)).astype(np.float32)
    np.testing.assert_allclose(compile_graph(g, cache=False)([a])[0], run_graph(g, [a])[0],
                               rtol=1e-5, atol=1e-5)


def test_permuted_side_operand_of_a_packed_epilogue_is_stored():
    """MaxViT's 1x1 conv adds a residual that arrives grid-permuted: read inline, the
    permute's own axes cannot be viewed with the conv's [channels, pixels] output, and the
    conv fell back to its scalar nest. The permute is stored instead and the conv keeps its
    packed schedule (no loop over single input channels in its kernel)."""
    from kiln.backends.llvm import compile_graph
    from kiln.backends.llvm.compiler import default_target
    from kiln.backends.reference import run_graph
    from kiln.ir.kernel import print_kernel

    rng = np.random.default_rng(0)
    b = GraphBuilder("t")
    x = b.input("x", TensorType((1, 32, 4, 4)))
    r = b.input("r", TensorType((1, 2, 2, 2, 2, 16)))
    w = b.constant(rng.standard_normal((16, 32, 1, 1)).astype(np.float32))
    c = b.op("conv", [x, w], name="conv")
    grid = b.op("permute", [r], {"perm": [0, 5, 1, 3, 2, 4]}, name="grid")
    back = b.op("reshape", [grid], {"shape": [1, 16, 4, 4]}, name="back")
    b.output(b.op("add", [c, back], name="out"))
    g = b.build()
    plan = plan_fusion(g)
    assert plan.roles["out"] == "epilogue"
    assert plan.roles["back"] == "root" and "epilogue" in plan.reasons["back"]
    lowered = lower_graph(g, width=default_target().f32_lanes)
    conv_kernel = next(s.kernel for s in lowered.steps if s.root == "conv")
    assert "for ci" not in print_kernel(conv_kernel)   # the scalar nest's input-channel loop
    feeds = [rng.standard_normal(g.types[v].shape).astype(np.float32) for v in g.inputs]
    np.testing.assert_allclose(compile_graph(g, cache=False)(feeds)[0], run_graph(g, feeds)[0],
                               rtol=1e-5, atol=1e-5)
