"""Batch-norm statistics re-estimated after compression (compression/bn_stats.py): against
PyTorch's own cumulative re-estimation, through kiln.compress, and the accuracy they give
back on the digits CNN."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import kiln
from kiln.compression.bn_stats import recalibrate_batch_norms
from kiln.frontend.trace import trace_module


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.BatchNorm1d(5)).eval()
    for m in net.modules():   # statistics that describe some other model
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return net


def test_statistics_match_pytorchs_reestimation():
    net = _net()
    x = torch.randn(48, 3, 6, 6) * 2 + 0.5
    graph, _ = trace_module(net, (x,))
    new, count = recalibrate_batch_norms(graph, [[x.numpy()]])
    assert count == 3
    # PyTorch: a training-mode pass over the same batch with cumulative statistics.
    ref = _net()
    for m in ref.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        ref(x)
    norms = [m for m in ref.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    nodes = [n for n in new.nodes if n.op == "batch_norm"]
    for m, node in zip(norms, nodes):
        mean, var = (new.constants[v] for v in node.inputs[1:3])
        # Later layers see slightly different inputs: PyTorch normalizes a training pass with
        # the biased batch variance, kiln re-estimates on an inference pass (unbiased).
        np.testing.assert_allclose(mean, m.running_mean.numpy(), rtol=0.03, atol=0.03)
        np.testing.assert_allclose(var, m.running_var.numpy(), rtol=0.05, atol=0.01)
    first = nodes[0]
    np.testing.assert_allclose(new.constants[first.inputs[1]], norms[0].running_mean.numpy(),
                               rtol=1e-5, atol=1e-6)   # the first one sees the same input
    assert graph.constants[first.inputs[1]] is not new.constants[first.inputs[1]]


def test_compress_reestimates_after_pruning_unless_told_not_to():
    net = _net()
    x = torch.randn(8, 3, 6, 6)
    data = torch.randn(64, 3, 6, 6)
    on = kiln.compress(net, data, example_inputs=(x,), prune={"ratio": 0.5, "multiple": 1})
    off = kiln.compress(net, data, example_inputs=(x,),
                        prune={"ratio": 0.5, "multiple": 1, "recalibrate_bn": False})
    assert "bn stats" in on.table() and "bn stats" not in off.table()
    from kiln.backends.reference import run_graph

    (a,), (b,) = run_graph(on.graph, [x.numpy()]), run_graph(off.graph, [x.numpy()])
    assert not np.allclose(a, b)


def test_pruned_digits_cnn_gets_its_accuracy_back():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import digits

    x_train, x_test, y_train, y_test = digits.load_data()
    teacher = digits.train(x_train, y_train, epochs=6)
    example = (torch.from_numpy(x_train[:32]),)
    accuracy = {}
    for recal in (False, True):
        c = kiln.compile(teacher, example, data=torch.from_numpy(x_train),
                         prune={"flops_target": 0.7, "multiple": 8, "recalibrate_bn": recal})
        out = []
        xt = torch.from_numpy(x_test)
        pad = torch.cat([xt, torch.zeros(-len(xt) % 32, *xt.shape[1:])])
        for i in range(0, len(pad), 32):
            out.append(c(pad[i:i + 32]))
        pred = torch.cat(out)[:len(y_test)].argmax(-1).numpy()
        accuracy[recal] = (pred == y_test).mean()
    # 70% of the FLOPs pruned without fine-tuning: the stale statistics leave about chance.
    assert accuracy[True] >= accuracy[False] + 0.25, accuracy
