"""Measured per-node times: the llvm kernel profile of a whole model, spread over its nodes,
adds up to the kernels' time and balances a partition whose report says it was measured."""

from __future__ import annotations

import pytest

from kiln.api import optimize
from kiln.distributed.profile import profile_nodes
from kiln.frontend.trace import trace_module
from kiln.passes.partition import partition
from kiln.zoo import get_model


def test_profile_nodes_covers_every_node_and_feeds_the_partition() -> None:
    model, inputs = get_model("lenet5")
    graph, _ = trace_module(model, inputs)
    graph, _ = optimize(graph, "O1")
    measured = profile_nodes(graph, inputs, threads=1, repeat=3)
    assert set(measured.seconds) == {node.name for node in graph.nodes}
    assert measured.total_s > 0 and measured.seconds["conv1"] > 0
    assert measured.kernels == 7 and "7 kernels, 1 thread(s), median of 3 runs" in \
        measured.describe()
    part = partition(graph, 2, seconds=measured.seconds, cost=measured.describe())
    assert sum(s.predicted_s for s in part.stages) == pytest.approx(measured.total_s)
    assert "cost: measured seconds per node (llvm kernel profile" in part.table()
