"""Issue 18's transformer point: a small pre-norm transformer (2 layers, d=64) on the synthetic
signals task, 50% of its FLOPs pruned with distillation, loses at most 1 point of accuracy.
The residual stream (the hidden size, through every layer norm) is pruned with the heads and
MLP widths (``prune={"norms": True}``, the default). Heavy: about a minute on one thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.backends.llvm.compiler import compile_graph
from kiln.examples.search import signal_data, signal_transformer


def _accuracy(graph, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    program = compile_graph(graph, threads=1)
    outs = [program.run([x[i:i + batch].numpy()])[0] for i in range(0, len(x), batch)]
    return float((np.concatenate(outs).argmax(1) == y.numpy()).mean())


@pytest.mark.heavy
def test_half_the_flops_pruned_with_distillation_loses_at_most_a_point():
    torch.set_num_threads(1)
    data = signal_data(test=3000)   # 3000 test signals: one point is 30 of them
    x_train, x_test, y_train, y_test = data
    model, _ = signal_transformer(data=data)
    batch = 50
    with torch.no_grad():
        fp32 = float((model(x_test).argmax(1) == y_test).float().mean())
    compressed = kiln.compress(model, x_train, example_inputs=(x_test[:batch],),
                               prune={"flops_target": 0.5, "multiple": 8},
                               distill={"epochs": 10}, labels=y_train)
    assert abs(compressed.pruning["flops_removed"] - 0.5) < 0.03
    g = compressed.graph
    # The hidden size shrank: the embedding's outputs (the stream) lost channels.
    embed = next(n for n in g.nodes if n.name == "embed")
    assert g.types[embed.outputs[0]].shape[-1] < 64
    pruned = _accuracy(g, x_test, y_test, batch)
    print(f"fp32 {fp32:.4f}, pruned 50% + distillation {pruned:.4f}")
    assert pruned >= fp32 - 0.01
