"""Gradual (AGP) pruning during distillation: the cubic schedule, masks that make the final
physical removal exact, its use through kiln.compress, and AGP against one-shot pruning at the
same fine-tuning budget on the digits CNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.compression.distill import GraphRunner, _trained_graph
from kiln.compression.gradual import GradualPruning, agp_fraction
from kiln.compression.prune import graph_flops
from kiln.frontend.trace import trace_module
from kiln.interop.to_torch import graph_to_module
from kiln.ir import KilnError
from kiln.zoo import ZOO


def test_agp_fraction_follows_the_cubic_schedule():
    assert agp_fraction(0, 8, 0.7) == 0.0
    assert agp_fraction(8, 8, 0.7) == pytest.approx(0.7)
    assert agp_fraction(4, 8, 0.7) == pytest.approx(0.7 * (1 - 0.5 ** 3))
    steps = [agp_fraction(k, 8, 0.7) for k in range(9)]
    assert all(a < b for a, b in zip(steps, steps[1:]))
    # Most of the pruning happens early, while the network can still adapt.
    assert steps[2] > 0.7 / 2


@pytest.mark.parametrize("name", ["resnet18_cifar", "gpt2_block"])
def test_masked_channels_are_removed_exactly(name):
    """After every update the masked student computes what the physically pruned one does:
    nothing reads a masked channel (residual stages and attention heads included)."""
    torch.manual_seed(0)
    model, inputs = ZOO[name]()
    graph, _ = trace_module(model.eval(), inputs, "fx")
    runner = GraphRunner(graph, trainable=True)
    total = 4
    pruner = GradualPruning(graph, {"ratio": 0.5, "multiple": 1, "steps": 2, "end": 1.0},
                            total, runner.trained)
    for done in range(1, total + 1):
        pruner.step(done)
        if done not in pruner.update_at:
            continue
        masked = _trained_graph(graph, runner)
        pruned = pruner.finish(masked)
        assert graph_flops(pruned) < graph_flops(graph)
        with torch.no_grad():
            want = graph_to_module(masked)(*inputs)
            got = graph_to_module(pruned)(*inputs)
        for w, g in zip(want if isinstance(want, tuple) else (want,),
                        got if isinstance(got, tuple) else (got,)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert [k for k, _ in pruner.history] == [2, 4]
    assert [f for _, f in pruner.history] == pytest.approx([0.5 * (1 - 0.5 ** 3), 0.5])


def test_gradual_pruning_needs_distillation_and_a_known_schedule():
    model, inputs = ZOO["mlp"]()
    with pytest.raises(KilnError, match="during distillation"):
        kiln.compress(model.eval(), None, example_inputs=inputs,
                      prune={"ratio": 0.5, "schedule": "agp"})
    data = torch.randn(32, *inputs[0].shape[1:])
    with pytest.raises(KilnError, match="unknown pruning schedule"):
        kiln.compress(model.eval(), data, example_inputs=inputs,
                      prune={"ratio": 0.5, "schedule": "linear"}, distill={"epochs": 1})
    with pytest.raises(KilnError, match="prune.steps"):
        kiln.compress(model.eval(), data, example_inputs=inputs,
                      prune={"ratio": 0.5, "schedule": "agp", "steps": 0},
                      distill={"epochs": 1})


# ---- AGP against one-shot pruning on the digits CNN -------------------------------------------
@pytest.fixture(scope="module")
def digits_cnn():
    pytest.importorskip("sklearn", reason="the digits data needs scikit-learn")
    from kiln.examples import digits

    x_train, x_test, y_train, y_test = digits.load_data()
    # One thread: the teacher's float rounding (and so which of AGP and one-shot wins by a
    # test image or two) depends on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = digits.train(x_train, y_train, 8)
        yield model, x_train, x_test, y_train, y_test
    finally:
        torch.set_num_threads(threads)


def _accuracy(graph, x, y, n):
    module = graph_to_module(graph)
    usable = len(x) - len(x) % n
    xs = torch.from_numpy(x)
    with torch.no_grad():
        pred = torch.cat([module(xs[i:i + n]) for i in range(0, usable, n)]).argmax(-1)
    return float((pred.numpy() == y[:usable]).mean())


def compress_digits(digits_cnn, prune, epochs, seed):
    model, x_train, x_test, y_train, y_test = digits_cnn
    n = 8
    inputs = (torch.from_numpy(x_test[:n]),)
    c = kiln.compress(model, torch.from_numpy(x_train), example_inputs=inputs,
                      labels=torch.from_numpy(y_train), prune=prune,
                      distill={"epochs": epochs, "lr": 1e-3, "progress": False, "seed": seed})
    removed = 1 - graph_flops(c.graph) / graph_flops(c.source_graph)
    return _accuracy(c.graph, x_test, y_test, n), removed


@pytest.mark.heavy
def test_agp_matches_one_shot_at_the_same_budget(digits_cnn):
    """70% of the FLOPs removed, 4 distillation epochs either way (AGP's default 16 updates
    over the first 2), four seeds. On digits the two are within noise of each other: with
    this (one-thread) teacher AGP scored 98.61% against one-shot's 98.40% over seeds 0-7,
    with a teacher trained on two threads 98.75% against 98.89% (fp32 99.44%; 360 test images,
    0.28% each). What holds either way is asserted: the same FLOPs, and AGP within half a
    point of one-shot."""
    # Like for like: the batch-norm re-estimation one-shot pruning now gets before its
    # fine-tune (bn_stats.py) has no AGP counterpart (channels go during the fine-tune), so it
    # is off here; with it, one-shot is ahead (README, compression search).
    one_shot = {"flops_target": 0.7, "multiple": 1, "recalibrate_bn": False}
    agp = {"flops_target": 0.7, "multiple": 1, "schedule": "agp"}
    acc = {"one-shot": [], "agp": []}
    for seed in range(4):
        for name, prune in (("one-shot", one_shot), ("agp", agp)):
            a, removed = compress_digits(digits_cnn, prune, 4, seed)
            assert removed == pytest.approx(0.7, abs=0.02)
            acc[name].append(a)
    print("accuracy", acc)
    assert np.mean(acc["agp"]) >= np.mean(acc["one-shot"]) - 0.005, acc
