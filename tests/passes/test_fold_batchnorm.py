"""Batch-norm folding: golden IR, purity, outputs unchanged, when folding is not allowed."""

from __future__ import annotations

import numpy as np
import pytest
from passes_testlib import assert_same_outputs, fingerprint, run_pass

from kiln.ir import GraphBuilder, TensorType, print_graph
from kiln.passes import FoldBatchNorm, run_pipeline


def bn_params(b: GraphBuilder, channels: int, seed: int = 0) -> list[str]:
    """Random running statistics and affine parameters."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(channels), rng.random(channels) + 0.5,
              rng.standard_normal(channels), rng.standard_normal(channels)]
    return [b.constant(a.astype(np.float32), f"bn.{k}")
            for a, k in zip(arrays, ("mean", "var", "weight", "bias"))]


def simple_conv_bn():
    b = GraphBuilder("conv_bn")
    x = b.input("x", TensorType((1, 1, 3, 3)))
    w = b.constant(np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2), "conv.weight")
    c = b.op("conv", [x, w], name="conv", source="m.py:3 self.conv(x)")
    # eps=0 and var 1, 4 give scale [2, 2] and shift [0.5 - 1*2, 0 + 1*2] = [-1.5, 2].
    params = [b.constant(np.array(v, np.float32), n) for v, n in
              [([1, -1], "mean"), ([1, 4], "var"), ([2, 4], "gamma"), ([0.5, 0], "beta")]]
    y = b.op("batch_norm", [c, *params], {"eps": 0.0}, name="bn", source="m.py:4 self.bn(x)")
    b.output(y)
    return b.build()


def test_golden_conv():
    result = run_pass(FoldBatchNorm(), simple_conv_bn())
    assert result.changed
    assert print_graph(result.graph) == """\
graph conv_bn(%x: f32[1,1,3,3]) -> (%bn) {
  const %conv.weight.bn: f32[2,1,2,2] = [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]
  const %bn.bias: f32[2] = [-1.5, 2.0]
  %bn: f32[1,2,2,2] = conv(%x, %conv.weight.bn, %bn.bias) {stride=1, padding=0, dilation=1, groups=1}  # m.py:3 self.conv(x)
  return %bn
}
"""  # noqa: E501


def test_input_graph_unchanged():
    g = simple_conv_bn()
    before = fingerprint(g)
    FoldBatchNorm().run(g)
    assert fingerprint(g) == before


def test_golden_unfoldable_becomes_scale_shift():
    b = GraphBuilder("bn_input")
    x = b.input("x", TensorType((2, 3, 4)))
    params = [b.constant(np.array(v, np.float32), n) for v, n in
              [([0, 1, 2], "mean"), ([1, 1, 1], "var"), ([1, 2, 3], "gamma"), ([0, 0, 1], "beta")]]
    y = b.op("batch_norm", [x, *params], {"eps": 0.0}, name="bn", source="m.py:9 self.bn(x)")
    b.output(y)
    result = run_pass(FoldBatchNorm(), b.build())
    assert print_graph(result.graph) == """\
graph bn_input(%x: f32[2,3,4]) -> (%bn) {
  const %bn.scale: f32[3,1] = [1.0, 2.0, 3.0]
  const %bn.shift: f32[3,1] = [0.0, -2.0, -5.0]
  %bn_1: f32[2,3,4] = mul(%x, %bn.scale) {}  # m.py:9 self.bn(x)
  %bn: f32[2,3,4] = add(%bn_1, %bn.shift) {}  # m.py:9 self.bn(x)
  return %bn
}
"""


@pytest.mark.parametrize("case", ["conv_bias_groups", "conv1d", "conv_transpose_groups",
                                  "linear", "linear_bias"])
def test_folds_into_producer(case):
    rng = np.random.default_rng(1)
    b = GraphBuilder(case)

    def const(*shape):
        return b.constant(rng.standard_normal(shape).astype(np.float32))

    if case == "conv_bias_groups":
        x = b.input("x", TensorType((2, 4, 6, 6)))
        y = b.op("conv", [x, const(6, 2, 3, 3), const(6)], {"groups": 2, "padding": 1})
    elif case == "conv1d":
        x = b.input("x", TensorType((2, 3, 9)))
        y = b.op("conv", [x, const(5, 3, 3)], {"stride": 2})
    elif case == "conv_transpose_groups":
        x = b.input("x", TensorType((2, 4, 5, 5)))
        y = b.op("conv_transpose", [x, const(4, 3, 3, 3), const(6)], {"groups": 2, "stride": 2})
    elif case == "linear":
        x = b.input("x", TensorType((3, 7)))
        y = b.op("linear", [x, const(5, 7)])
    else:
        x = b.input("x", TensorType((3, 7)))
        y = b.op("linear", [x, const(5, 7), const(5)])
    channels = b.type_of(y).shape[1]
    b.output(b.op("batch_norm", [y, *bn_params(b, channels)], name="bn"))
    result = run_pass(FoldBatchNorm(), b.build())
    assert [n.op for n in result.graph.nodes] == [b.graph.nodes[0].op]
    assert result.graph.outputs == ["bn"]


def unfoldable(case: str):
    rng = np.random.default_rng(2)
    b = GraphBuilder(case)
    x = b.input("x", TensorType((2, 3, 5, 5)))
    w = b.constant(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    if case == "conv_output_also_used":
        c = b.op("conv", [x, w], name="c")
        b.output(b.op("batch_norm", [c, *bn_params(b, 4)], name="bn"), c)
    elif case == "weight_not_constant":
        w_in = b.input("w_in", TensorType((4, 3, 3, 3)))
        c = b.op("conv", [x, w_in], name="c")
        b.output(b.op("batch_norm", [c, *bn_params(b, 4)], name="bn"))
    elif case == "linear_rank3":
        h = b.op("linear", [b.op("reshape", [x], {"shape": [2, 3, 25]}),
                            b.constant(rng.standard_normal((6, 25)).astype(np.float32))])
        b.output(b.op("batch_norm", [h, *bn_params(b, 3)], name="bn"))
    return b.build()


@pytest.mark.parametrize("case", ["conv_output_also_used", "weight_not_constant",
                                  "linear_rank3"])
def test_unfoldable_producer_gets_scale_shift(case):
    g = unfoldable(case)
    result = run_pass(FoldBatchNorm(), g)
    ops = [n.op for n in result.graph.nodes]
    assert "batch_norm" not in ops and ops[-2:] == ["mul", "add"]
    assert ops[:-2] == [n.op for n in g.nodes[:-1]]


def test_statistics_not_constant_stay():
    b = GraphBuilder("dynamic_stats")
    x = b.input("x", TensorType((2, 3)))
    mean = b.input("mean", TensorType((3,)))
    params = bn_params(b, 3)
    b.output(b.op("batch_norm", [x, mean, *params[1:]]))
    g = b.build()
    result = run_pass(FoldBatchNorm(), g)
    assert not result.changed
    assert print_graph(result.graph) == print_graph(g)


def test_o1_leaves_no_batch_norm_after_a_foldable_conv():
    rng = np.random.default_rng(3)
    b = GraphBuilder("net")
    x = b.input("x", TensorType((1, 3, 8, 8)))
    h = x
    for i in range(3):
        w = b.constant(rng.standard_normal((3, 3, 3, 3)).astype(np.float32), f"conv{i}.w")
        c = b.op("conv", [h, w], {"padding": 1})
        # An identity reshape between conv and batch_norm must not block the fold.
        c = b.op("reshape", [c], {"shape": [1, 3, 8, 8]})
        h = b.op("relu", [b.op("batch_norm", [c, *bn_params(b, 3, seed=i)])])
    b.output(h)
    g = b.build()
    out = run_pipeline(g, "O1")
    assert [n.op for n in out.nodes] == ["conv", "relu"] * 3
    assert_same_outputs(g, out)
