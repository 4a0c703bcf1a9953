"""kiln.compress and the compression options of kiln.compile."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import kiln
from kiln.backends.llvm import compile_graph
from kiln.backends.reference import run_graph
from kiln.compression.prune import graph_flops
from kiln.passes import get_pass
from kiln.zoo import get_model


def batches(inputs, count: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(x.shape, generator=gen) for x in inputs) for _ in range(count)]


def test_every_stage_shrinks_and_reports():
    model, inputs = get_model("lenet5")
    data = batches(inputs)
    result = kiln.compress(model, data, prune={"ratio": 0.5, "multiple": 4},
                           low_rank={"param_ratio": 0.5, "min_size": 1000},
                           distill={"epochs": 1, "progress": False}, quantize=True)
    stages = [r.stage for r in result.report]
    assert stages == ["imported", "pruned", "low-rank", "distilled", "O1", "int8"]
    assert result.report[1].parameters < result.report[0].parameters
    assert result.report[1].flops < result.report[0].flops
    assert "int8" in result.table()
    ops = {n.op for n in result.graph.nodes}
    assert "qconv" in ops and "qlinear" in ops and "batch_norm" not in ops
    x = [a.numpy() for a in data[0]]
    np.testing.assert_array_equal(compile_graph(result.graph, cache=False)(x)[0],
                                  run_graph(result.graph, x)[0])


def test_table_says_which_layers_run_int8_and_why():
    from kiln.backends.llvm.compiler import default_target

    model, inputs = get_model("lenet5")
    result = kiln.compress(model, batches(inputs), quantize=True)
    assert set(result.layers) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    bound = default_target().int8_weight_max
    for name, (precision, why) in result.layers.items():
        assert precision == "int8" and f"|w| <= {bound}" in why, (name, why)
        assert any(line.split()[:2] == [name, "int8"] for line in result.table().splitlines())
    for n in result.graph.nodes:
        if n.op in ("qconv", "qlinear"):
            assert np.abs(result.graph.constants[n.inputs[1]].astype(int)).max() <= bound


def test_compile_with_int8_stays_close_to_eager():
    model, inputs = get_model("resnet18_cifar")
    data = batches(inputs, 4)
    compiled = kiln.compile(model, inputs, quantize={"method": "minmax"}, data=data)
    assert compiled.compression is not None
    assert get_pass("quantize_int8").error_budget is not None
    x = batches(inputs, 1, seed=7)[0]
    with torch.no_grad():
        want = model(*x).numpy()
    got = compiled(*x).numpy()
    budget = get_pass("quantize_int8").error_budget
    assert np.abs(got - want).max() <= budget.atol * np.abs(want).max()


def test_pruned_compile_is_smaller_and_runs():
    model, inputs = get_model("resnet18_cifar")
    compiled = kiln.compile(model, inputs, prune=0.5)
    full = kiln.compile(model, inputs)
    removed = 1 - graph_flops(compiled.graph) / graph_flops(full.graph)
    assert 0.45 <= removed <= 0.55
    out = compiled(*inputs)
    assert out.shape == full(*inputs).shape and torch.isfinite(out).all()


def test_nan_in_calibration_data_is_ignored_with_a_warning(caplog):
    model, inputs = get_model("mlp")
    data = batches(inputs, 3)
    data[1][0][0, :3] = float("nan")
    with caplog.at_level(logging.WARNING, logger="kiln.calibration"):
        result = kiln.compress(model, data, quantize=True)
    assert "non-finite" in caplog.text
    assert any(n.op == "qlinear" for n in result.graph.nodes)


def test_all_nan_calibration_data_is_refused():
    model, inputs = get_model("mlp")
    data = [tuple(torch.full_like(x, float("nan")) for x in inputs)]
    with pytest.raises(kiln.KilnError, match="no finite value"):
        kiln.compress(model, data, quantize=True)


def test_bad_arguments_are_clear():
    model, inputs = get_model("mlp")
    with pytest.raises(kiln.KilnError, match="needs data"):
        kiln.compile(model, inputs, quantize=True)
    with pytest.raises(kiln.KilnError, match="prune= takes"):
        kiln.compress(model, batches(inputs), prune="half")
    wrong = [torch.randn(3, 5)]
    with pytest.raises(kiln.KilnError, match="shaped"):
        kiln.compress(model, wrong, example_inputs=inputs, quantize=True)
    with pytest.raises(kiln.KilnError, match="unknown calibration method"):
        kiln.compress(model, batches(inputs), quantize={"method": "mse"})


def test_tensor_of_samples_is_cut_into_batches():
    model, inputs = get_model("mlp")
    samples = torch.randn(10, *inputs[0].shape[1:])
    result = kiln.compress(model, samples, quantize=True)
    assert result.graph.types[result.graph.inputs[0]].shape[0] == 1


def test_loader_batches_larger_than_the_model_are_cut_into_its_batches():
    # A data loader's batches of 8 for a model compiled at batch 1 calibrate exactly as the
    # same 16 samples passed one by one.
    model, inputs = get_model("mlp")
    gen = torch.Generator().manual_seed(2)
    loader = [torch.randn(8, *inputs[0].shape[1:], generator=gen) for _ in range(2)]
    singles = [(x[i:i + 1],) for x in loader for i in range(8)]
    x = torch.randn(inputs[0].shape, generator=gen)
    a = kiln.compile(model, inputs, data=loader, quantize=True)
    b = kiln.compile(model, inputs, data=singles, quantize=True)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    with pytest.raises(kiln.KilnError, match="multiple of their batch size"):
        kiln.compile(model, inputs, data=[torch.randn(3, 5)], quantize=True)


def test_dynamic_int8_needs_no_data():
    model, inputs = get_model("bert")
    compiled = kiln.compile(model, inputs, quantize={"mode": "dynamic"})
    assert any(n.op == "dynamic_qlinear" for n in compiled.graph.nodes)
    with torch.no_grad():
        want = model(*inputs)
    got = compiled(*inputs)
    assert float((got - want).abs().max()) <= 0.1 * float(want.abs().max())
