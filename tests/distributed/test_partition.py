"""The partition pass: stages are ordinary graphs whose chained outputs equal the whole
graph's, cuts balance predicted time and prefer small crossings, limits are enforced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.api import optimize
from kiln.backends.reference import run_graph
from kiln.frontend.trace import trace_module
from kiln.ir import GraphBuilder, TensorType, verify
from kiln.passes.fusion import covered_nodes, plan_fusion
from kiln.passes.partition import (
    _crossing,
    kernel_node_seconds,
    node_seconds,
    partition,
)
from kiln.zoo import get_model


def graph_of(name: str):
    model, inputs = get_model(name)
    graph, _ = trace_module(model, inputs)
    return optimize(graph, "O1")[0], [x.numpy() for x in inputs]


def run_chain(graphs, inputs):
    values = list(inputs)
    for g in graphs:
        values = run_graph(g, values)
    return values


@pytest.mark.parametrize(("name", "stages"), [("lenet5", 2), ("lenet5", 3),
                                              ("resnet18_cifar", 4), ("bert", 3)])
def test_chained_stages_compute_the_whole_graph(name, stages) -> None:
    graph, inputs = graph_of(name)
    part = partition(graph, stages)
    assert len(part.stages) == stages
    assert sum(s.nodes for s in part.stages) == len(graph.nodes)
    for g in part.graphs:
        verify(g)
    for got, want in zip(run_chain(part.graphs, inputs), run_graph(graph, inputs)):
        np.testing.assert_array_equal(got, want)
    assert part.stages[-1].send_bytes == sum(graph.types[o].nbytes for o in graph.outputs)
    lines = part.table().splitlines()
    assert "GFLOP" in lines[0] and len(lines) == stages + 2
    assert lines[-1].startswith("cost: predicted per node: max(FLOPs at 50 GFLOP/s")


def test_cuts_balance_predicted_time() -> None:
    graph, _ = graph_of("resnet18_cifar")
    part = partition(graph, 2)
    times = [s.predicted_s for s in part.stages]
    assert max(times) <= 0.65 * sum(times), times
    assert sum(times) == pytest.approx(sum(node_seconds(graph)))


def _wide_and_narrow():
    """relu chain whose values alternate between 64 and 256 floats (concat widens, slice
    narrows), so the bytes crossing a cut depend on where it is."""
    b = GraphBuilder("chain")
    v = b.input("x", TensorType((64,)))
    for _ in range(4):
        v = b.op("relu", [v])
        v = b.op("concat", [v, v, v, v], {"axis": 0})
        v = b.op("relu", [v])
        v = b.op("slice", [v], {"axis": 0, "start": 0, "end": 64})
    b.output(b.op("relu", [v]))
    return b.build()


def test_a_cut_near_the_balance_point_prefers_fewer_bytes() -> None:
    graph = _wide_and_narrow()
    _, sizes = _crossing(graph)
    n = len(graph.nodes)
    part = partition(graph, 2, seconds=[1.0] * n, window=0.3)
    cut = part.stages[0].nodes
    near = [p for p in range(1, n) if abs(p - n / 2) <= 0.3 * n / 2]
    assert sizes[cut] == min(sizes[p] for p in near) == 64 * 4 < max(sizes[p] for p in near)
    assert part.stages[0].send_bytes == sizes[cut]
    by_name = {node.name: 1.0 for node in graph.nodes}
    assert partition(graph, 2, seconds=by_name, window=0.3).stages[0].nodes == cut


def test_limits_are_kiln_errors() -> None:
    graph, _ = graph_of("lenet5")
    with pytest.raises(kiln.KilnError, match="over the memory limit"):
        partition(graph, 2, memory_limit=1000)
    with pytest.raises(kiln.KilnError, match="too few for"):
        partition(graph, len(graph.nodes) + 1)
    with pytest.raises(kiln.KilnError, match="positive integer"):
        partition(graph, 0)
    with pytest.raises(kiln.KilnError, match="entries for"):
        partition(graph, 2, seconds=[1.0])


def test_each_stage_compiles_on_llvm() -> None:
    graph, inputs = graph_of("mlp")
    part = partition(graph, 2)
    values = list(inputs)
    for g in part.graphs:
        values = kiln.runtime.Executable(g, "llvm").run(values)
    model, x = get_model("mlp")
    with torch.no_grad():
        np.testing.assert_allclose(values[0], model(*x).numpy(), rtol=1e-5, atol=1e-5)


def test_a_measured_expensive_layer_moves_the_cut() -> None:
    # Every node costs 1 except layer2_0_bn1, which costs as much as all the others: the
    # balance point lies inside it, and the cut goes right after it (nearer the target than
    # right before it), far from where FLOPs or uniform costs put it.
    graph, inputs = graph_of("resnet18_cifar")
    names = [node.name for node in graph.nodes]
    heavy = names.index("layer2_0_bn1")
    table = {name: 1.0 for name in names}
    table["layer2_0_bn1"] = float(len(names))
    part = partition(graph, 2, seconds=table, cost="a test table")
    assert part.stages[0].nodes == heavy + 1
    assert part.graphs[0].nodes[-1].name == "layer2_0_bn1"
    assert part.stages[0].predicted_s == heavy + len(names)
    assert part.stages[1].predicted_s == len(names) - heavy - 1
    assert partition(graph, 2).stages[0].nodes != heavy + 1
    assert part.table().splitlines()[-1] == "cost: measured seconds per node (a test table)"
    for got, want in zip(run_chain(part.graphs, inputs), run_graph(graph, inputs)):
        np.testing.assert_array_equal(got, want)
    # The same table made cheap there sends the cut elsewhere: the table, not the graph,
    # decides.
    table["layer2_0_bn1"] = 1.0
    assert partition(graph, 2, seconds=table).stages[0].nodes != heavy + 1


def test_kernel_times_are_spread_over_the_nodes_each_kernel_computes() -> None:
    graph, _ = graph_of("lenet5")
    covered = covered_nodes(graph, plan_fusion(graph))
    assert covered["conv1"] == ("conv1", "relu1")
    assert covered["fc1"] == ("flatten", "fc1", "relu3")
    per_kernel = {root: float(k + 1) for k, root in enumerate(covered)}
    per_node = kernel_node_seconds(graph, per_kernel)
    assert set(per_node) == {node.name for node in graph.nodes}
    assert sum(per_node.values()) == pytest.approx(sum(per_kernel.values()))
    for root, nodes in covered.items():
        assert sum(per_node[v] for v in nodes) == pytest.approx(per_kernel[root])
    # In proportion to the predicted cost: the conv keeps nearly all of its kernel's time.
    assert per_node["conv1"] > 10 * per_node["relu1"] > 0
    with pytest.raises(kiln.KilnError, match="not a fusion root"):
        kernel_node_seconds(graph, {"relu1": 1.0})
