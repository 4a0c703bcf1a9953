"""Structured pruning: channel groups, importance criteria, the rewrite and its options.

The strongest check is an equivalence: removing a set of channels must compute exactly what the
original graph computes when only the consumers' input columns of those channels are zeroed
(every other member only ever touches its own channel). ``assert_prunes_exactly`` checks that
for every crafted graph and every zoo model, on the reference backend.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from passes_testlib import fingerprint, random_inputs

from kiln.backends.llvm.compiler import compile_graph
from kiln.backends.reference import run_graph
from kiln.compression.channel_groups import find_channel_groups
from kiln.compression.prune import (
    PruneChannels,
    element_mask,
    graph_flops,
    kept_units,
    plan_pruning,
    rewrite,
    unit_scores,
)
from kiln.compression.prune_scores import taylor_scores
from kiln.frontend.trace import trace_module
from kiln.ir import Graph, GraphBuilder, KilnError, TensorType, print_graph, verify
from kiln.passes import PassContext, run_pipeline
from kiln.passes.instruments import compare_arrays
from kiln.zoo import ZOO, get_model


def prune(graph: Graph, **options) -> Graph:
    """Run prune_channels with ``options`` and check it left its input alone."""
    before = fingerprint(graph)
    result = PruneChannels().run(graph, PassContext({f"prune_channels.{k}": v
                                                     for k, v in options.items()}))
    assert fingerprint(graph) == before, "prune_channels modified its input"
    verify(result.graph)
    assert all(not a.flags.writeable for a in result.graph.constants.values())
    return result.graph


def masked_original(graph: Graph, keep: dict) -> Graph:
    """``graph`` with the input columns of the removed channels zeroed in every consumer."""
    analysis = find_channel_groups(graph)
    mask = element_mask(analysis, keep)
    out = graph.copy()
    for ed in analysis.const_edits:
        m = mask[ed.elem]
        if ed.role != "input" or m.all():
            continue
        name = graph.nodes[ed.node].inputs[ed.index]
        arr = np.array(out.constants[name])
        index = [slice(None)] * arr.ndim
        index[ed.axis] = ~m
        arr[tuple(index)] = 0
        out.constants[name] = arr
    return out


def assert_prunes_exactly(graph: Graph, inputs: list[np.ndarray] | None = None,
                          **options) -> tuple[Graph, list[np.ndarray]]:
    """Prune; the result must match the masked original and keep the output types. Returns
    the pruned graph and its outputs on ``inputs`` (default: random ones)."""
    # Exact only where no layer norm shrinks with the channels (norms=True is approximate).
    options.setdefault("norms", False)
    ctx = PassContext({f"prune_channels.{k}": v for k, v in options.items()})
    keep, analysis = plan_pruning(graph, None, ctx)
    pruned = prune(graph, **options)
    assert print_graph(pruned) == print_graph(rewrite(graph, analysis, keep))
    assert [pruned.types[o] for o in pruned.outputs] == [graph.types[o] for o in graph.outputs]
    inputs = random_inputs(graph, seed=1) if inputs is None else inputs
    want = run_graph(masked_original(graph, keep), inputs)
    got = run_graph(pruned, inputs)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()))
    return pruned, got


def const(b: GraphBuilder, rng: np.random.Generator, shape, hint: str = "w") -> str:
    return b.constant(rng.standard_normal(shape).astype(np.float32), hint)


def bn(b: GraphBuilder, rng: np.random.Generator, x: str, channels: int, name: str,
       gamma: np.ndarray | None = None) -> str:
    stats = [rng.standard_normal(channels), rng.random(channels) + 0.5,
             rng.random(channels) + 0.5 if gamma is None else gamma,
             rng.standard_normal(channels)]
    params = [b.constant(np.asarray(s, np.float32), f"{name}.{k}")
              for s, k in zip(stats, ("mean", "var", "weight", "bias"))]
    return b.op("batch_norm", [x, *params], name=name)


# ---- golden IR -----------------------------------------------------------------------------
def tiny_conv_bn_relu_conv() -> Graph:
    """conv (4 channels, 1x1) -> batch_norm -> relu -> conv (3 channels); l1 norms of the
    first conv's filters are 1, 4, 2, 3."""
    b = GraphBuilder("tiny")
    x = b.input("x", TensorType((1, 2, 2, 2)))
    w1 = b.constant(np.array([[1, 0], [2, 2], [0, -2], [3, 0]], np.float32).reshape(4, 2, 1, 1),
                    "conv1.weight")
    c = b.op("conv", [x, w1], name="conv1")
    params = [b.constant(np.array(v, np.float32), f"bn1.{k}") for v, k in
              [([0, 1, 2, 3], "mean"), ([1, 1, 1, 1], "var"), ([1, 2, 3, 4], "weight"),
               ([0, 0, 0, 1], "bias")]]
    h = b.op("relu", [b.op("batch_norm", [c, *params], {"eps": 0.0}, name="bn1")], name="relu")
    w2 = b.constant(np.arange(12, dtype=np.float32).reshape(3, 4, 1, 1), "conv2.weight")
    b.output(b.op("conv", [h, w2], name="conv2"))
    return b.build()


def test_golden_conv_bn_relu_conv():
    g = tiny_conv_bn_relu_conv()
    assert print_graph(g) == """\
graph tiny(%x: f32[1,2,2,2]) -> (%conv2) {
  const %conv1.weight: f32[4,2,1,1] = [1.0, 0.0, 2.0, 2.0, 0.0, -2.0, 3.0, 0.0]
  const %bn1.mean: f32[4] = [0.0, 1.0, 2.0, 3.0]
  const %bn1.var: f32[4] = [1.0, 1.0, 1.0, 1.0]
  const %bn1.weight: f32[4] = [1.0, 2.0, 3.0, 4.0]
  const %bn1.bias: f32[4] = [0.0, 0.0, 0.0, 1.0]
  const %conv2.weight: f32[3,4,1,1] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
  %conv1: f32[1,4,2,2] = conv(%x, %conv1.weight) {stride=1, padding=0, dilation=1, groups=1}
  %bn1: f32[1,4,2,2] = batch_norm(%conv1, %bn1.mean, %bn1.var, %bn1.weight, %bn1.bias) {eps=0.0}
  %relu: f32[1,4,2,2] = relu(%bn1) {}
  %conv2: f32[1,3,2,2] = conv(%relu, %conv2.weight) {stride=1, padding=0, dilation=1, groups=1}
  return %conv2
}
"""  # noqa: E501
    # l1 keeps channels 1 and 3 (norms 4 and 3): rows of conv1, entries of the batch-norm
    # parameters and columns of conv2 go.
    assert print_graph(assert_prunes_exactly(g, ratio=0.5, multiple=1)[0]) == """\
graph tiny(%x: f32[1,2,2,2]) -> (%conv2) {
  const %conv1.weight: f32[2,2,1,1] = [2.0, 2.0, 3.0, 0.0]
  const %bn1.mean: f32[2] = [1.0, 3.0]
  const %bn1.var: f32[2] = [1.0, 1.0]
  const %bn1.weight: f32[2] = [2.0, 4.0]
  const %bn1.bias: f32[2] = [0.0, 1.0]
  const %conv2.weight: f32[3,2,1,1] = [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]
  %conv1: f32[1,2,2,2] = conv(%x, %conv1.weight) {stride=1, padding=0, dilation=1, groups=1}
  %bn1: f32[1,2,2,2] = batch_norm(%conv1, %bn1.mean, %bn1.var, %bn1.weight, %bn1.bias) {eps=0.0}
  %relu: f32[1,2,2,2] = relu(%bn1) {}
  %conv2: f32[1,3,2,2] = conv(%relu, %conv2.weight) {stride=1, padding=0, dilation=1, groups=1}
  return %conv2
}
"""  # noqa: E501


def test_input_graph_unchanged_and_logged(caplog):
    g = tiny_conv_bn_relu_conv()
    before = fingerprint(g)
    with caplog.at_level(logging.INFO, logger="kiln.passes"):
        result = PruneChannels().run(g, PassContext({"prune_channels.ratio": 0.5,
                                                     "prune_channels.multiple": 1}))
    assert result.changed and fingerprint(g) == before
    assert "group 0 (conv1): kept 2/4 units" in caplog.text


# ---- dependency analysis -------------------------------------------------------------------
def test_residual_add_couples_producers():
    rng = np.random.default_rng(0)
    b = GraphBuilder("residual")
    x = b.input("x", TensorType((1, 3, 6, 6)))
    a = b.op("relu", [bn(b, rng, b.op("conv", [x, const(b, rng, (8, 3, 3, 3))], {"padding": 1},
                                      name="a"), 8, "bn_a")])
    h = b.op("relu", [b.op("conv", [a, const(b, rng, (8, 8, 3, 3))], {"padding": 1}, name="b")])
    c = b.op("conv", [h, const(b, rng, (8, 8, 1, 1))], name="c")
    s = b.op("relu", [b.op("add", [c, a], name="add")])
    b.output(b.op("conv", [s, const(b, rng, (4, 8, 1, 1))], name="head"))
    g = b.build()
    analysis = find_channel_groups(g)
    assert "unprunable: channels reach graph output %head" in analysis.summary()
    groups = {tuple(s.node for s in grp.sources): grp for grp in analysis.groups}
    assert set(groups) == {("a", "c"), ("b",), ("head",)}
    res = groups[("a", "c")]
    assert res.prunable and res.num_units == 8
    np.testing.assert_array_equal(res.unit_of["a"], res.unit_of["c"])
    roles = {(m.role, m.node) for m in res.members}
    assert {("filters", "a"), ("filters", "c"), ("param", "bn_a"), ("input", "b"),
            ("input", "head"), ("value", "add")} <= roles
    assert groups[("head",)].reasons == ("channels reach graph output %head",)
    pruned, _ = assert_prunes_exactly(g, ratio=0.5, multiple=1)
    assert pruned.types["add"].shape == (1, 4, 6, 6)


def test_concat_shifts_channel_offsets():
    rng = np.random.default_rng(1)
    b = GraphBuilder("concat")
    x = b.input("x", TensorType((1, 3, 5, 5)))
    left = b.op("conv", [x, const(b, rng, (8, 3, 1, 1))], name="left")
    right = b.op("conv", [x, const(b, rng, (4, 3, 1, 1)), const(b, rng, (4,))], name="right")
    cat = b.op("concat", [b.op("relu", [left]), right], {"axis": 1}, name="cat")
    b.output(b.op("conv", [cat, const(b, rng, (2, 12, 3, 3))], name="head"))
    g = b.build()
    analysis = find_channel_groups(g)
    by_source = {grp.sources[0].node: grp for grp in analysis.groups}
    head_in = {name: next(m for m in grp.members if m.role == "input" and m.node == "head")
               for name, grp in by_source.items() if name != "head"}
    np.testing.assert_array_equal(head_in["left"].units, list(range(8)) + [-1] * 4)
    np.testing.assert_array_equal(head_in["right"].units, [-1] * 8 + list(range(4)))
    pruned, _ = assert_prunes_exactly(g, ratio=0.5, multiple=1)
    assert pruned.types["cat"].shape == (1, 6, 5, 5)
    assert pruned.types[pruned.nodes[-1].inputs[1]].shape == (2, 6, 3, 3)


def test_depthwise_conv_prunes_its_filters_with_the_input():
    rng = np.random.default_rng(2)
    b = GraphBuilder("depthwise")
    x = b.input("x", TensorType((1, 3, 6, 6)))
    e = b.op("clamp", [b.op("conv", [x, const(b, rng, (16, 3, 1, 1))], name="expand")],
             {"min": 0.0, "max": 6.0})
    d = b.op("conv", [e, const(b, rng, (16, 1, 3, 3)), const(b, rng, (16,))],
             {"groups": 16, "padding": 1}, name="dw")
    d = bn(b, rng, d, 16, "dw_bn")
    b.output(b.op("conv", [d, const(b, rng, (4, 16, 1, 1))], name="project"))
    g = b.build()
    (grp,) = [grp for grp in find_channel_groups(g).groups if grp.prunable]
    assert [s.node for s in grp.sources] == ["expand"]
    assert {("param", "dw"), ("attr", "dw"), ("param", "dw_bn"), ("input", "project")} <= {
        (m.role, m.node) for m in grp.members}
    pruned, _ = assert_prunes_exactly(g, ratio=0.5)
    dw = next(n for n in pruned.nodes if n.name == "dw")
    assert dw.attrs["groups"] == 8 and pruned.types[dw.inputs[1]].shape == (8, 1, 3, 3)


def test_grouped_conv_prunes_whole_groups():
    rng = np.random.default_rng(3)
    b = GraphBuilder("grouped")
    x = b.input("x", TensorType((1, 3, 6, 6)))
    a = b.op("relu", [b.op("conv", [x, const(b, rng, (8, 3, 1, 1))], name="a")])
    gc = b.op("conv", [a, const(b, rng, (8, 2, 3, 3))], {"groups": 4, "padding": 1},
              name="grouped")
    b.output(b.op("conv", [b.op("relu", [gc]), const(b, rng, (2, 8, 1, 1))], name="head"))
    g = b.build()
    (grp,) = [grp for grp in find_channel_groups(g).groups if grp.prunable]
    assert grp.num_units == 4 and grp.unit_width == 2
    np.testing.assert_array_equal(grp.unit_of["a"], [0, 0, 1, 1, 2, 2, 3, 3])
    pruned, _ = assert_prunes_exactly(g, ratio=0.5, multiple=2)
    node = next(n for n in pruned.nodes if n.name == "grouped")
    assert node.attrs["groups"] == 2 and pruned.types["grouped"].shape == (1, 4, 6, 6)


def test_flatten_into_linear_removes_blocks_of_features():
    rng = np.random.default_rng(4)
    b = GraphBuilder("flatten")
    x = b.input("x", TensorType((2, 1, 8, 8)))
    c = b.op("max_pool", [b.op("relu", [b.op("conv", [x, const(b, rng, (8, 1, 3, 3))],
                                               {"padding": 1}, name="conv")])], {"kernel": [2, 2]})
    flat = b.op("reshape", [c], {"shape": [2, 128]}, name="flatten")
    b.output(b.op("linear", [flat, const(b, rng, (10, 128)), const(b, rng, (10,))], name="fc"))
    g = b.build()
    grp = find_channel_groups(g).groups[0]
    fc_in = next(m for m in grp.members if m.role == "input" and m.node == "fc")
    np.testing.assert_array_equal(fc_in.units, np.repeat(np.arange(8), 16))
    pruned, _ = assert_prunes_exactly(g, ratio=0.5, multiple=2)
    assert pruned.types["flatten"].shape == (2, 64)
    assert next(n for n in pruned.nodes if n.name == "flatten").attrs["shape"] == (2, 64)


@pytest.fixture(scope="module")
def zoo_graphs() -> dict[str, Graph]:
    """Every zoo model at batch 1; resnet18 and mobilenetv2 on 32x32 images (their
    adaptive pooling takes any size) so that the suite stays fast."""
    graphs = {}
    for name in ZOO:
        model, inputs = get_model(name)
        if name in ("resnet18", "mobilenetv2"):
            inputs = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
        graphs[name], _ = trace_module(model, inputs)
    return graphs


@pytest.mark.parametrize("name", ["bert", "gpt2_block", "gpt2_block_manual_mask"])
def test_attention_heads_are_units(zoo_graphs, name):
    g = zoo_graphs[name]
    analysis = find_channel_groups(g)
    heads = [grp for grp in analysis.prunable() if grp.num_units == 4]
    qkv = ({"layers_0_attention_query", "layers_0_attention_key", "layers_0_attention_value"}
           if name == "bert" else {"block_attn_c_attn"})
    first = heads[0]
    assert {s.node for s in first.sources} == qkv
    assert len(heads) == (4 if name == "bert" else 1)
    out_proj = "layers_0_attention_out" if name == "bert" else "block_attn_c_proj"
    member = next(m for m in first.members if m.role == "input" and m.node == out_proj)
    np.testing.assert_array_equal(member.units, np.repeat(np.arange(4), 64))
    if name != "bert":
        # One fused projection: head h is q, k and v channels [64h, 64h + 64) of each third.
        np.testing.assert_array_equal(first.unit_of["block_attn_c_attn"],
                                      np.tile(np.repeat(np.arange(4), 64), 3))
    pruned, _ = assert_prunes_exactly(g, ratio=0.5)
    for n in pruned.nodes:
        if n.op == "reshape" and len(n.attrs["shape"]) == 4:
            assert n.attrs["shape"][2] == 2  # two heads of 64 left
    assert pruned.types[out_proj].shape == g.types[out_proj].shape


def _single_conv_then(op: str, **attrs) -> Graph:
    rng = np.random.default_rng(5)
    b = GraphBuilder(op)
    x = b.input("x", TensorType((1, 3, 4, 4)))
    c = b.op("conv", [x, const(b, rng, (8, 3, 1, 1))], name="conv")
    if op == "reshape":
        y = b.op("reshape", [c], {"shape": [1, 4, 32]})
    else:
        y = b.op(op, [c], attrs)
    b.output(b.op("relu", [y]), b.op("conv", [c, const(b, rng, (2, 8, 1, 1))], name="other"))
    return b.build()


@pytest.mark.parametrize("op, attrs, reason", [
    ("reduce_mean", {"axes": [1]}, "reduction over the channel axis"),
    ("softmax", {"axis": 1}, "softmax over the channel axis"),
    ("reshape", {}, "mixes the channel axis"),
    ("relu", {}, "channels reach graph output"),
    ("group_norm", {"groups": 2}, "group_norm normalizes over the channel axis"),
])
def test_unsupported_uses_refuse_the_group(op, attrs, reason):
    g = _single_conv_then(op, **attrs)
    grp = find_channel_groups(g).groups[0]
    assert not grp.prunable and any(reason in r for r in grp.reasons), grp.reasons
    result = PruneChannels().run(g, PassContext({"prune_channels.ratio": 0.5}))
    assert not result.changed and result.graph is g


# ---- importance criteria -------------------------------------------------------------------
def criteria_graph() -> Graph:
    """A conv whose 4 filters rank differently by each criterion (see test_criteria)."""
    b = GraphBuilder("criteria")
    x = b.input("x", TensorType((1, 4, 3, 3)))
    w = np.array([[3, 0, 0, 0], [1, 1, 1, 1], [2.5, 0, 0, 0], [0.6, 0.6, 0.6, 0.6]],
                 np.float32).reshape(4, 4, 1, 1)
    c = b.op("conv", [x, b.constant(w, "conv.weight")], name="conv")
    params = [b.constant(np.array(v, np.float32), f"bn.{k}") for v, k in
              [([0] * 4, "mean"), ([1] * 4, "var"), ([0.1, 0.2, -0.3, 5], "weight"),
               ([0] * 4, "bias")]]
    h = b.op("relu", [b.op("batch_norm", [c, *params], name="bn")])
    b.output(b.op("conv", [h, b.constant(np.ones((2, 4, 1, 1), np.float32), "head.weight")],
                  name="head"))
    return b.build()


@pytest.mark.parametrize("criterion, kept", [
    ("l1", [0, 1]),        # l1 norms 3, 4, 2.5, 2.4
    ("l2", [0, 2]),        # l2 norms 3, 2, 2.5, 1.2
    ("bn_scale", [2, 3]),  # |gamma| 0.1, 0.2, 0.3, 5
    ("taylor", [0, 3]),    # the scores given below
])
def test_criteria(criterion, kept):
    g = criteria_graph()
    scores = {"conv": np.array([9.0, 1.0, 0.5, 8.0])} if criterion == "taylor" else None
    pruned, _ = assert_prunes_exactly(g, ratio=0.5, multiple=1, criterion=criterion,
                                   scores=scores)
    w = np.asarray(pruned.constants["conv.weight"]).reshape(2, 4)
    np.testing.assert_array_equal(w, np.asarray(g.constants["conv.weight"]).reshape(4, 4)[kept])


def test_bn_scale_falls_back_to_l1_and_scores_sum_over_members():
    rng = np.random.default_rng(6)
    b = GraphBuilder("sum")
    x = b.input("x", TensorType((1, 2, 3, 3)))
    p = b.op("conv", [x, const(b, rng, (4, 2, 1, 1))], name="p")
    q = b.op("conv", [x, const(b, rng, (4, 2, 1, 1))], name="q")
    b.output(b.op("conv", [b.op("add", [p, q]), const(b, rng, (2, 4, 1, 1))], name="head"))
    g = b.build()
    grp = next(grp for grp in find_channel_groups(g).groups if grp.prunable)
    l1 = [np.abs(g.constants[g.nodes[k].inputs[1]]).reshape(4, -1).sum(1) for k in (0, 1)]
    np.testing.assert_allclose(unit_scores(g, grp, "l1"), l1[0] + l1[1])
    np.testing.assert_allclose(unit_scores(g, grp, "bn_scale"), l1[0] + l1[1])


def taylor_graph() -> Graph:
    """linear (3 features) -> relu -> mul by [0, 1, 1] -> linear: feature 0 cannot matter."""
    rng = np.random.default_rng(7)
    b = GraphBuilder("taylor")
    x = b.input("x", TensorType((5, 4)))
    h = b.op("relu", [b.op("linear", [x, const(b, rng, (3, 4)), const(b, rng, (3,))],
                           name="fc1")])
    h = b.op("mul", [h, b.constant(np.array([0, 1, 1], np.float32), "gate")])
    b.output(b.op("linear", [h, const(b, rng, (2, 3))], name="fc2"))
    return b.build()


def test_taylor_scores_match_autograd_and_pick_the_dead_feature():
    g = taylor_graph()
    batches = [random_inputs(g, seed=s) for s in range(2)]
    scores = taylor_scores(g, batches, values=["fc1"])
    want = np.zeros(3)
    w1, b1, w2 = (torch.from_numpy(np.array(g.constants[g.nodes[k].inputs[i]]))
                  for k, i in ((0, 1), (0, 2), (3, 1)))
    for (x,) in batches:
        a = (torch.from_numpy(x) @ w1.T + b1).requires_grad_()
        y = (torch.relu(a) * torch.tensor([0.0, 1, 1])) @ w2.T
        (grad,) = torch.autograd.grad(torch.linalg.vector_norm(y), [a])
        want += (a * grad).abs().sum(0).detach().numpy()
    np.testing.assert_allclose(scores["fc1"], want, rtol=1e-5)
    assert scores["fc1"][0] == 0.0
    pruned = prune(g, criterion="taylor", scores=scores, ratio=0.34, multiple=1)
    np.testing.assert_array_equal(pruned.constants["gate"], [1, 1])


def test_taylor_scores_with_labels_and_through_the_prune_scores_alias(zoo_graphs):
    g = zoo_graphs["lenet5"]
    batches = [random_inputs(g, seed=s) for s in range(2)]
    scores = taylor_scores(g, batches, labels=[np.array([3]), np.array([5])])
    assert set(scores) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    assert all(s.shape == (g.types[v].shape[1],) and (s >= 0).all() for v, s in scores.items())
    ctx = PassContext({"prune_channels.criterion": "taylor", "prune.scores": scores})
    assert PruneChannels().run(g, ctx).changed
    with pytest.raises(KilnError, match="needs scores for %conv1"):
        PruneChannels().run(g, PassContext({"prune_channels.criterion": "taylor"}))


# ---- the zoo -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_pruned_30_percent(zoo_graphs, name):
    g = zoo_graphs[name]
    inputs = random_inputs(g, seed=2)
    pruned, reference = assert_prunes_exactly(g, inputs, ratio=0.3)
    assert pruned.num_parameters() < g.num_parameters()
    assert graph_flops(pruned) < graph_flops(g)
    # The pass's stated error budget holds at this ratio (what NumericCheck enforces).
    budget = PruneChannels.error_budget
    for old, new in zip(run_graph(g, inputs), reference):
        assert compare_arrays(old, new, budget.rtol, budget.atol)[1]
    native = compile_graph(pruned, cache=False, threads=1).run(inputs)
    for r, n in zip(reference, native):
        assert r.shape == n.shape
        np.testing.assert_allclose(n, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))


def test_flops_target_on_resnet18_cifar(zoo_graphs):
    g = zoo_graphs["resnet18_cifar"]
    pruned = prune(g, flops_target=0.5)
    removed = 1 - graph_flops(pruned) / graph_flops(g)
    assert 0.45 <= removed <= 0.55, removed
    assert pruned.num_parameters() < 0.6 * g.num_parameters()


@pytest.mark.parametrize("name, multiple", [("resnet18_cifar", 8), ("resnet18_cifar", 16),
                                            ("mobilenetv2", 16), ("bert", 16), ("mlp", 16)])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.8])
def test_flops_target_lands_within_a_point(zoo_graphs, name, multiple, target):
    """Rounding every group up to the multiple used to miss by up to 7 points (ResNet-18
    CIFAR: 0.3 asked, 0.226 removed; 0.7 -> 0.749); groups now step up or down, and to a
    finer multiple where the multiple alone cannot land (the mlp's 16-wide steps)."""
    g = zoo_graphs[name]
    ctx = PassContext({"prune_channels.flops_target": target,
                       "prune_channels.multiple": multiple})
    keep, analysis = plan_pruning(g, None, ctx)
    pruned = rewrite(g, analysis, keep)
    removed = 1 - graph_flops(pruned) / graph_flops(g)
    assert abs(removed - target) <= 0.01, removed
    finer = ctx.notes["prune_channels.rounding"]
    for grp in analysis.prunable():
        channels = len(keep.get(grp.id, range(grp.num_units))) * grp.unit_width
        label = ", ".join(s.node for s in grp.sources)
        if channels % multiple and grp.id in keep:
            assert label in finer and channels % finer[label] == 0


def test_flops_target_rounding_is_reported():
    from torch import nn

    import kiln

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(),
                          nn.Linear(24, 10)).eval()
    c = kiln.compress(model, (torch.randn(2, 64),), prune=0.3)
    p = c.pruning
    assert p["flops_target"] == 0.3 and abs(p["flops_removed"] - 0.3) <= 0.01
    assert p["finer_rounding"]   # 16-channel steps of 40 and 24 features cannot land on 0.3
    assert "of the FLOPs removed (target 0.300)" in c.table()


def test_global_ranking_prunes_groups_unevenly(zoo_graphs):
    g = zoo_graphs["resnet18_cifar"]
    keep, analysis = plan_pruning(g, None, PassContext({"prune_channels.ratio": 0.3,
                                                        "prune_channels.global": True,
                                                        "prune_channels.multiple": 1}))
    prunable = analysis.prunable()
    fractions = {len(keep.get(grp.id, range(grp.num_units))) / grp.num_units
                 for grp in prunable}
    assert len(fractions) > 3
    removed = sum(grp.num_units - len(keep.get(grp.id, range(grp.num_units)))
                  for grp in prunable)
    assert removed == int(0.3 * sum(grp.num_units for grp in prunable))
    assert_prunes_exactly(g, ratio=0.3, **{"global": True})


def test_protected_layers_keep_their_channels(zoo_graphs):
    g = zoo_graphs["resnet18_cifar"]
    # A node, a value inside a residual stage, and the classifier's weight (whose input
    # channels belong to the last residual stage).
    pruned = prune(g, ratio=0.5, protect=["layer1_0_conv1", "layer2_0_relu1", "fc.weight"])
    for value in ("layer1_0_conv1", "layer2_0_relu1", "layer4_1_relu2", "layer4_0_conv2"):
        assert pruned.types[value] == g.types[value]
    assert pruned.types["layer1_1_conv1"].shape[1] == 32
    assert pruned.constants["fc.weight"] is g.constants["fc.weight"]


def test_multiple_rounds_kept_channels_up(zoo_graphs):
    assert kept_units(64, 1, 0.3, multiple=16) == 48      # 45 -> 48
    assert kept_units(10, 1, 0.9, multiple=8) == 8        # never below the multiple
    assert kept_units(6, 1, 0.5, multiple=8) == 6         # nor above the original count
    assert kept_units(4, 64, 0.5, multiple=8) == 2        # heads of 64 are multiples of 8
    assert kept_units(64, 1, 0.5, multiple=1, min_channels=40) == 40
    g = zoo_graphs["resnet18_cifar"]
    pruned = prune(g, ratio=0.3, multiple=16)
    for grp in find_channel_groups(g).prunable():
        for s in grp.sources:
            kept = pruned.types[s.value].shape[1]
            assert kept % 16 == 0 and 16 <= kept < s.channels


@pytest.mark.parametrize("options, message", [
    ({"ratio": 1.0}, "prune groups to zero channels"),
    ({"ratio": -0.1}, r"ratio must be in \[0, 1\)"),
    ({"criterion": "random"}, "unknown pruning criterion"),
    ({"protect": ["no_such_layer"]}, "names %no_such_layer"),
    ({"multiple": 0}, "multiple must be an integer >= 1"),
    ({"flops_target": 0.99}, "can remove at most"),
    ({"ratio": 0.2, "flops_target": 0.5}, "either ratio or flops_target"),
    ({"criterion": "taylor", "scores": {"conv1": np.ones(3)}}, r"have shape \(3,\)"),
])
def test_bad_options_fail_clearly(zoo_graphs, options, message):
    with pytest.raises(KilnError, match=message) as info:
        prune(zoo_graphs["lenet5"], **options)
    if "protect" in options:
        assert info.value.node == "no_such_layer"


def test_prune_then_o1(zoo_graphs):
    g = zoo_graphs["resnet18_cifar"]
    pruned = prune(g, ratio=0.3)
    folded = run_pipeline(pruned, "O1")
    assert "batch_norm" not in {n.op for n in folded.nodes}
    inputs = random_inputs(g, seed=3)
    for want, got in zip(run_graph(pruned, inputs), run_graph(folded, inputs)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_partly_coupled_source():
    """Only 4 of q's 6 channels meet p's in the add: q's other 2 are units of their own."""
    rng = np.random.default_rng(8)
    b = GraphBuilder("partly")
    x = b.input("x", TensorType((1, 2, 3, 3)))
    p = b.op("conv", [x, const(b, rng, (4, 2, 1, 1))], name="p")
    q = b.op("conv", [x, const(b, rng, (6, 2, 1, 1))], name="q")
    head = b.op("slice", [q], {"axis": 1, "start": 0, "end": 4}, name="head")
    tail = b.op("slice", [q], {"axis": 1, "start": 4, "end": 6}, name="tail")
    s = b.op("concat", [b.op("add", [p, head]), tail], {"axis": 1}, name="cat")
    b.output(b.op("conv", [s, const(b, rng, (2, 6, 1, 1))], name="out"))
    g = b.build()
    grp = next(grp for grp in find_channel_groups(g).groups if grp.prunable)
    assert grp.num_units == 6 and grp.unit_width == 1
    np.testing.assert_array_equal(grp.unit_of["p"], [0, 1, 2, 3])
    pruned, _ = assert_prunes_exactly(g, ratio=0.5, multiple=1)
    assert pruned.types["cat"].shape[1] == 3
    slices = [n.attrs for n in pruned.nodes if n.op == "slice"]
    assert slices[0]["end"] == slices[1]["start"] and slices[1]["end"] == 3


def test_per_layer_widths_override_the_ratio_by_glob(zoo_graphs):
    g = zoo_graphs["resnet18_cifar"]
    pruned, _ = assert_prunes_exactly(g, ratio=0.3, multiple=1,
                                      layers={"layer4.*": 0.75, "layer1_*": 0.0})
    # layer4's inner convs lose 3/4 of 512, layer1's keep all, the others lose 30%.
    assert pruned.types["layer4_0_conv1"].shape[1] == 128
    assert pruned.types["layer1_0_conv1"].shape[1] == 64
    assert pruned.types["layer3_0_conv1"].shape[1] == 256 - int(0.3 * 256)
    # A residual stage's group matches through any of its layers; the last pattern wins.
    later = prune(g, ratio=0.3, multiple=1, layers={"layer4*": 0.75, "layer4_1_conv2": 0.5})
    assert later.types["layer4_0_conv2"].shape[1] == 256
    assert later.types["layer4_0_conv1"].shape[1] == 128
    either = prune(g, ratio=0.0, multiple=1, layers={"layer1_*|layer2_*": 0.5})
    assert either.types["layer2_1_conv1"].shape[1] == 64
    assert either.types["layer3_1_conv1"].shape[1] == 256


def test_per_layer_widths_with_a_flops_target(zoo_graphs):
    g = zoo_graphs["resnet18_cifar"]
    pruned = prune(g, flops_target=0.5, multiple=1, layers={"layer1_*": 0.0})
    removed = 1 - graph_flops(pruned) / graph_flops(g)
    assert 0.47 <= removed <= 0.53, removed
    assert pruned.types["layer1_1_conv1"] == g.types["layer1_1_conv1"]


@pytest.mark.parametrize("layers, message", [
    ({"nothing*": 0.5}, "matches no node"),
    ({"conv1": 1.0}, r"layers\['conv1'\] is 1.0"),
    (["conv1"], "must be a dict"),
])
def test_bad_per_layer_widths_fail_clearly(zoo_graphs, layers, message):
    with pytest.raises(KilnError, match=message):
        prune(zoo_graphs["lenet5"], ratio=0.3, layers=layers)


# ---- a transformer's residual stream (layer norms over the channels) and embeddings -------
class _PreNorm(torch.nn.Module):
    """An embedding table and a linear input both feed one residual stream of width 16 with a
    pre-norm block, a final norm and a head."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.tokens, self.embed = nn.Embedding(10, 16), nn.Linear(6, 16)
        self.norm1, self.up, self.down = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 3)
        for ln in (self.norm1, self.norm):   # not the identity, so slicing them matters
            ln.weight.data.uniform_(0.5, 1.5)
            ln.bias.data.uniform_(-0.5, 0.5)

    def forward(self, ids, x):
        z = self.tokens(ids) + self.embed(x)
        z = z + self.down(torch.relu(self.up(self.norm1(z))))
        return self.head(self.norm(z).mean(1))


def test_residual_stream_through_layer_norms_prunes_with_norms():
    """The stream is one group, refused while its layer norms must stay exact; with
    norms=True it prunes, the norms keep the kept channels' weight and bias and normalize
    over those, which is what a torch model built from the kept weights computes."""
    torch.manual_seed(0)
    model = _PreNorm().eval()
    ids, x = torch.randint(0, 10, (2, 5)), torch.randn(2, 5, 6)
    g, _ = trace_module(model, (ids, x))
    stream = lambda a: next(grp for grp in a.groups if "tokens" in grp.unit_of)  # noqa: E731
    exact = stream(find_channel_groups(g))
    assert not exact.prunable and any("layer_norm normalizes over the channel axis" in r
                                      for r in exact.reasons)
    grp = stream(find_channel_groups(g, norms=True))
    assert grp.prunable and {s.node for s in grp.sources} == {"tokens", "embed", "down"}
    assert len(grp.approximate) == 2 and grp.num_units == 16
    options = {"ratio": 0.0, "layers": {"tokens": 0.5}, "multiple": 1, "norms": True}
    pruned = prune(g, **options)   # the stream only: the MLP keeps its 32 channels
    keep, analysis = plan_pruning(g, None, PassContext(
        {f"prune_channels.{k}": v for k, v in options.items()}))
    kept = np.sort(np.asarray(keep[grp.id]))
    assert len(kept) == 8
    # The same model by hand: every stream weight sliced to the kept channels.
    ref = _PreNorm().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.tokens.weight = torch.nn.Parameter(model.tokens.weight[:, kept])
        for lin in ("embed", "down"):
            getattr(ref, lin).weight = torch.nn.Parameter(getattr(model, lin).weight[kept])
            getattr(ref, lin).bias = torch.nn.Parameter(getattr(model, lin).bias[kept])
        for ln in ("norm1", "norm"):
            new = torch.nn.LayerNorm(8)
            new.weight.data, new.bias.data = (getattr(model, ln).weight[kept],
                                              getattr(model, ln).bias[kept])
            setattr(ref, ln, new)
        ref.up.weight = torch.nn.Parameter(model.up.weight[:, kept])
        ref.head.weight = torch.nn.Parameter(model.head.weight[:, kept])
        want = ref(ids, x).numpy()
    feeds = [ids.numpy(), x.numpy()]
    np.testing.assert_allclose(run_graph(pruned, feeds)[0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(compile_graph(pruned).run(feeds)[0], want, rtol=1e-4, atol=1e-5)
    ln_weights = [pruned.types[n.inputs[1]].shape for n in pruned.nodes if n.op == "layer_norm"]
    assert ln_weights == [(8,), (8,)]
    with pytest.raises(KilnError, match="norms must be True or False"):
        prune(g, ratio=0.5, norms="yes")


def test_embedding_columns_are_channels():
    """An embedding table's columns are a source: removed with the readers' input columns,
    exactly (no layer norm in between)."""
    torch.manual_seed(0)

    class Lookup(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table, self.proj = torch.nn.Embedding(12, 16), torch.nn.Linear(16, 4)

        def forward(self, ids):
            return self.proj(torch.relu(self.table(ids)))

    g, _ = trace_module(Lookup().eval(), (torch.randint(0, 12, (3, 7)),))
    (grp,) = find_channel_groups(g).prunable()
    assert [s.node for s in grp.sources] == ["table"] and grp.sources[0].weight_axis == 1
    pruned, _ = assert_prunes_exactly(g, [np.random.default_rng(0).integers(0, 12, (3, 7))],
                                      ratio=0.5, multiple=1)
    assert pruned.types[pruned.nodes[0].inputs[1]].shape == (12, 8)
