"""Low-rank factorization: golden IR, the SVD's error, rank options, skips, bad options, the zoo,
and the reference and llvm backends on factorized graphs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from passes_testlib import fingerprint, random_inputs, run_pass

import kiln.compression.low_rank as low_rank
from kiln.backends.reference import run_graph
from kiln.frontend.trace import trace_module
from kiln.ir import Graph, GraphBuilder, KilnError, TensorType, print_graph, verify
from kiln.passes import LOSSY, PassContext, get_pass
from kiln.zoo import ZOO, get_model

LowRank = low_rank.LowRank


def ctx(**options) -> PassContext:
    """A context holding ``low_rank.<key>`` options."""
    return PassContext({f"low_rank.{k}": v for k, v in options.items()})


def run_lossy(graph: Graph, context: PassContext):
    """Run the pass checking that it leaves ``graph`` untouched and returns a valid graph with
    the same output types (its numbers may move: the pass is lossy)."""
    verify(graph)
    before = fingerprint(graph)
    result = LowRank().run(graph, context)
    assert fingerprint(graph) == before, "low_rank modified its input"
    verify(result.graph)
    assert all(not a.flags.writeable for a in result.graph.constants.values())
    assert [result.graph.types[o] for o in result.graph.outputs] == \
        [graph.types[o] for o in graph.outputs]
    return result


def tiny_linear() -> Graph:
    b = GraphBuilder("tiny")
    x = b.input("x", TensorType((2, 5)))
    # Singular values 4, 1 and 0.5: the first keeps 16 / 17.25 = 0.93 of the energy.
    w = np.zeros((3, 5), np.float32)
    w[0, 0], w[1, 2], w[2, 4] = 4.0, 1.0, 0.5
    y = b.op("linear", [x, b.constant(w, "fc.weight"), b.constant(np.float32([1, 2, 3]),
                                                                   "fc.bias")],
             name="fc", source="m.py:3 self.fc(x)")
    b.output(b.op("relu", [y], name="act", source="m.py:3 relu"))
    return b.build()


def test_golden_tiny_linear():
    g = tiny_linear()
    assert print_graph(g) == """\
graph tiny(%x: f32[2,5]) -> (%act) {
  const %fc.weight: f32[3,5] = [4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]
  const %fc.bias: f32[3] = [1.0, 2.0, 3.0]
  %fc: f32[2,3] = linear(%x, %fc.weight, %fc.bias) {}  # m.py:3 self.fc(x)
  %act: f32[2,3] = relu(%fc) {}  # m.py:3 relu
  return %act
}
"""  # noqa: E501
    result = run_lossy(g, ctx(multiple=1, min_size=0))
    assert result.changed
    assert print_graph(result.graph) == """\
graph tiny(%x: f32[2,5]) -> (%act) {
  const %fc.bias: f32[3] = [1.0, 2.0, 3.0]
  const %fc.weight.low_rank_in: f32[1,5] = [2.0, 0.0, 0.0, 0.0, 0.0]
  const %fc.weight.low_rank_out: f32[3,1] = [2.0, 0.0, 0.0]
  %fc.low_rank: f32[2,1] = linear(%x, %fc.weight.low_rank_in) {}  # m.py:3 self.fc(x)
  %fc: f32[2,3] = linear(%fc.low_rank, %fc.weight.low_rank_out, %fc.bias) {}  # m.py:3 self.fc(x)
  %act: f32[2,3] = relu(%fc) {}  # m.py:3 relu
  return %act
}
"""  # noqa: E501


def test_registered_as_lossy_with_the_default_energys_budget():
    p = get_pass("low_rank")
    assert isinstance(p, LowRank) and p.numerics == LOSSY
    assert p.error_budget.atol == pytest.approx(np.sqrt(1 - low_rank.DEFAULT_ENERGY))


def product_of_halves(graph: Graph, node: str) -> np.ndarray:
    """The weight [out, fan_in] the two halves of factorized ``node`` multiply to, in float64."""
    second = next(n for n in graph.nodes if n.name == node)
    first = next(n for n in graph.nodes if n.name == second.inputs[0])
    a = graph.constants[first.inputs[1]].astype(np.float64)
    b = graph.constants[second.inputs[1]].astype(np.float64)
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_reconstruction_error_is_the_discarded_energy(energy):
    rng = np.random.default_rng(0)
    # A falling spectrum, as in trained layers.
    u, _ = np.linalg.qr(rng.standard_normal((96, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((80, 64)))
    s = 0.9 ** np.arange(64)
    w = (u * s) @ v.T
    b = GraphBuilder("one")
    x = b.input("x", TensorType((4, 80)))
    b.output(b.op("linear", [x, b.constant(w.astype(np.float32), "w")], name="fc"))
    result = run_lossy(b.build(), ctx(energy=energy, multiple=1))
    rank = result.graph.types["fc.low_rank"].shape[-1]
    kept = np.cumsum(s**2) / np.sum(s**2)
    assert rank == np.searchsorted(kept, energy) + 1
    err = np.sum((product_of_halves(result.graph, "fc") - w) ** 2)
    assert err == pytest.approx(np.sum(s[rank:] ** 2), rel=1e-4, abs=1e-9)


def test_full_rank_random_layer_is_left_alone(caplog):
    rng = np.random.default_rng(1)
    b = GraphBuilder("square")
    x = b.input("x", TensorType((2, 64)))
    b.output(b.op("linear", [x, b.constant(rng.standard_normal((64, 64)).astype(np.float32))],
                  name="fc"))
    g = b.build()
    with caplog.at_level(logging.INFO, logger="kiln.passes"):
        result = run_pass(LowRank(), g, ctx(energy=0.95))
    assert not result.changed and result.graph is g
    assert "fc (linear) left alone" in caplog.text and "would not reduce" in caplog.text


def low_rank_weight(rng, out: int, fan_in: int, rank: int) -> np.ndarray:
    return (rng.standard_normal((out, rank)) @ rng.standard_normal((rank, fan_in))
            ).astype(np.float32)


@pytest.mark.parametrize("case", ["linear_rank3", "conv1x1_stride", "conv3x3_pad_dilation",
                                  "conv1d", "conv_no_bias"])
def test_exactly_low_rank_layers_keep_their_outputs(case):
    # A weight of rank 3 loses nothing at rank 8: the factorized graph computes the same.
    rng = np.random.default_rng(2)
    b = GraphBuilder(case)
    if case == "linear_rank3":
        x = b.input("x", TensorType((2, 3, 48)))
        y = b.op("linear", [x, b.constant(low_rank_weight(rng, 40, 48, 3)),
                            b.constant(np.ones(40, np.float32))], name="layer")
        first_shape = (8, 48)
    else:
        cin, cout = 24, 32
        k = {"conv1x1_stride": (1, 1), "conv1d": (3,)}.get(case, (3, 3))
        spatial = (9,) * len(k)
        x = b.input("x", TensorType((2, cin) + spatial))
        w = low_rank_weight(rng, cout, cin * int(np.prod(k)), 3).reshape((cout, cin) + k)
        attrs = {"conv1x1_stride": {"stride": 2},
                 "conv3x3_pad_dilation": {"padding": 2, "dilation": 2}}.get(case, {})
        ins = [x, b.constant(w)] + ([] if case == "conv_no_bias"
                                    else [b.constant(rng.standard_normal(cout).astype("f4"))])
        y = b.op("conv", ins, attrs, name="layer", source="m.py:7 self.conv(x)")
        first_shape = (8, cin) + k
    b.output(b.op("relu", [y]))
    g = b.build()
    result = run_pass(LowRank(), g, ctx(min_size=0))
    assert result.changed
    first, second = result.graph.nodes[:2]
    assert result.graph.constants[first.inputs[1]].shape == first_shape
    assert second.name == "layer" and second.inputs[0] == first.name
    assert first.source == second.source == g.nodes[0].source
    assert second.inputs[2:] == g.nodes[0].inputs[2:]
    if first.op == "conv":
        assert first.attrs == g.nodes[0].attrs
        assert second.attrs == {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    assert g.nodes[0].inputs[1] not in result.graph.constants


def zoo_graph(name: str, batch: int = 1) -> tuple[Graph, list[np.ndarray]]:
    model, inputs = get_model(name, batch=batch)
    graph, _ = trace_module(model, inputs)
    return graph, [x.numpy() for x in inputs]


def linear_params(graph: Graph) -> int:
    return sum(graph.constants[n.inputs[1]].size for n in graph.nodes if n.op == "linear")


def test_param_ratio_halves_the_zoo_mlp():
    g, _ = zoo_graph("mlp", batch=64)
    result = run_lossy(g, ctx(param_ratio=0.5))
    before, after = linear_params(g), linear_params(result.graph)
    assert after <= before / 2
    # fc1 [128, 64] -> rank 16 and fc2 [128, 128] -> rank 32; fc3 [10, 128] is below min_size.
    assert [result.graph.types[v].shape[-1] for v in ("fc1.low_rank", "fc2.low_rank")] == [16, 32]
    assert "fc3.weight" in result.graph.constants


def test_per_layer_group_settings_override_by_glob():
    g, _ = zoo_graph("mlp", batch=64)
    # fc1 keeps a quarter of its parameters, fc2 is left alone, fc3 follows the default.
    result = run_lossy(g, ctx(param_ratio=0.5, min_size=0,
                              layers={"fc*": 0.25, "fc2": False}))
    assert result.graph.types["fc1.low_rank"].shape[-1] == 8
    assert "fc2.low_rank" not in result.graph.types and "fc2.weight" in result.graph.constants
    # With energy: the random fc1 keeps too many ranks at the default 0.9 to gain, not at 0.5.
    assert "fc1.low_rank" not in run_lossy(g, ctx()).graph.types
    half = run_lossy(g, ctx(layers={"fc1": 0.5}))
    assert half.graph.types["fc1.low_rank"].shape[-1] < 64
    assert "fc2.low_rank" not in half.graph.types


def test_param_ratio_keeps_outputs_close_when_the_spectrum_falls():
    # The zoo MLP's weights are random (flat spectra: half the rank loses much of the energy,
    # and the outputs move by 0.8 of their scale); trained layers' spectra fall. Give the MLP's
    # layers a falling spectrum (sigma_i = sigma_0 * 0.8^i; rank 16 then drops 0.8^16 ~ 3% of
    # fc1's scale) and no output bias, so the outputs are all signal.
    model, (x,) = get_model("mlp", batch=64)
    with torch.no_grad():
        for layer in (model.fc1, model.fc2, model.fc3):
            u, s, vh = torch.linalg.svd(layer.weight, full_matrices=False)
            layer.weight.copy_((u * (s[0] * 0.8 ** torch.arange(len(s)))) @ vh)
        model.fc3.bias.zero_()
    g, _ = trace_module(model, (x,))
    result = run_lossy(g, ctx(param_ratio=0.5))
    assert linear_params(result.graph) <= linear_params(g) / 2
    want = run_graph(g, [x.numpy()])[0]
    got = run_graph(result.graph, [x.numpy()])[0]
    assert np.abs(got - want).max() <= 0.04 * np.abs(want).max()


def test_flops_target_is_met_and_an_unreachable_one_is_an_error():
    g, _ = zoo_graph("mlp", batch=4)
    result = run_lossy(g, ctx(flops_target=0.6, multiple=4))
    assert low_rank.graph_flops(result.graph) <= 0.6 * low_rank.graph_flops(g)
    with pytest.raises(KilnError, match="flops_target=0.05 cannot be reached") as e:
        LowRank().run(g, ctx(flops_target=0.05))
    assert "low_rank.flops_target >=" in e.value.hint


def test_protect_min_size_groups_and_shared_weights_are_left_alone(caplog):
    rng = np.random.default_rng(3)
    b = GraphBuilder("skips")
    x = b.input("x", TensorType((2, 64)))
    w = b.constant(low_rank_weight(rng, 64, 64, 2), "shared")
    h = b.op("linear", [b.op("linear", [x, w], name="tied_a"), w], name="tied_b")
    h = b.op("linear", [h, b.constant(low_rank_weight(rng, 64, 64, 2))], name="kept")
    h = b.op("linear", [h, b.constant(low_rank_weight(rng, 64, 64, 2))], name="factored")
    h = b.op("linear", [h, b.input("w_in", TensorType((8, 64)))], name="dynamic")
    b.output(h)
    g = b.build()
    with caplog.at_level(logging.INFO, logger="kiln.passes"):
        result = run_pass(LowRank(), g, ctx(protect=["kept"]))
    assert [n.name for n in result.graph.nodes if n.op == "linear"] == \
        ["tied_a", "tied_b", "kept", "factored.low_rank", "factored", "dynamic"]
    assert "protected by option low_rank.protect" in caplog.text
    assert "also read elsewhere" in caplog.text and "is not a constant" in caplog.text
    small = run_pass(LowRank(), g, ctx(min_size=64 * 64 + 1))
    assert not small.changed


def test_grouped_conv_is_left_alone(caplog):
    rng = np.random.default_rng(4)
    b = GraphBuilder("depthwise")
    x = b.input("x", TensorType((1, 64, 6, 6)))
    w = b.constant(rng.standard_normal((64, 1, 3, 3)).astype(np.float32))
    b.output(b.op("conv", [x, w], {"groups": 64, "padding": 1}, name="dw"))
    with caplog.at_level(logging.INFO, logger="kiln.passes"):
        result = run_pass(LowRank(), b.build(), ctx(min_size=0))
    assert not result.changed and "grouped conv" in caplog.text


@pytest.mark.parametrize("options, message", [
    ({"energy": 0.0}, "low_rank.energy"),
    ({"energy": 1.5}, "low_rank.energy"),
    ({"param_ratio": 1.0}, "low_rank.param_ratio"),
    ({"param_ratio": "half"}, "low_rank.param_ratio"),
    ({"flops_target": -1}, "low_rank.flops_target"),
    ({"energy": 0.9, "param_ratio": 0.5}, "are all set"),
    ({"multiple": 0}, "low_rank.multiple"),
    ({"multiple": 2.5}, "low_rank.multiple"),
    ({"min_size": -1}, "low_rank.min_size"),
    ({"min_size": True}, "low_rank.min_size"),
    ({"protect": ["no_such_node"]}, "low_rank.protect names"),
    ({"protect": [3]}, "low_rank.protect"),
    ({"layers": {"nothing*": 0.5}}, "matches no node"),
    ({"layers": {"fc": 1.5}}, r"layers\['fc'\] is 1.5"),
    ({"flops_target": 0.5, "layers": {"fc": 0.5}}, "layers and low_rank.flops_target"),
])
def test_invalid_options_are_kiln_errors(options, message):
    with pytest.raises(KilnError, match=message) as e:
        LowRank().run(tiny_linear(), ctx(**options))
    assert e.value.hint


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_factorize_and_verify(name):
    g, inputs = zoo_graph(name)
    result = run_lossy(g, ctx(param_ratio=0.5))
    assert result.changed
    assert result.graph.num_parameters() < g.num_parameters()
    assert low_rank.graph_flops(result.graph) < low_rank.graph_flops(g)
    want = run_graph(g, inputs)
    got = run_graph(result.graph, inputs)
    assert [a.shape for a in got] == [a.shape for a in want]
    assert all(np.isfinite(a).all() for a in got)


@pytest.mark.parametrize("name", ["mlp", "lenet5"])
def test_reference_and_llvm_agree_on_the_factorized_graph(name):
    from kiln.backends.llvm import compile_graph

    g, _ = zoo_graph(name, batch=2)
    result = run_lossy(g, ctx(param_ratio=0.5, min_size=0, multiple=4))
    factored = {n.op for n in result.graph.nodes if n.name.endswith(".low_rank")}
    assert factored == ({"linear", "conv"} if name == "lenet5" else {"linear"})
    inputs = random_inputs(result.graph, seed=5)
    want = run_graph(result.graph, inputs)
    got = compile_graph(result.graph, cache=False)(inputs)
    for w, o in zip(want, got):
        np.testing.assert_allclose(o, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_factors_are_deterministic():
    g, _ = zoo_graph("mlp")
    a = LowRank().run(g, ctx(param_ratio=0.5)).graph
    b = LowRank().run(g, ctx(param_ratio=0.5)).graph
    assert fingerprint(a) == fingerprint(b)
