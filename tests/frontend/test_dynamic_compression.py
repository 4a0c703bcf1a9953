"""Compression with dynamic shapes: the model is compressed once, at the example inputs (kept
channels, calibrated ranges), and that compression is rebuilt at each new size
(kiln.dynamic.SizedCompression): every size runs the same compressed model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import kiln
from kiln.dynamic import _MOVED, DynamicCompressed, DynamicModel, _merge_attr, transplant
from kiln.ir import DType, Graph, GraphBuilder, TensorType
from kiln.zoo import get_model


def test_int8_resnet_with_dynamic_batch_is_the_static_int8_model_per_sample() -> None:
    """Samples are independent, so batch 3 of the dynamic int8 model must give, row by row,
    what the same compression compiled statically at batch 1 gives each sample."""
    model, (x,) = get_model("resnet18_cifar")
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(1, 3, 32, 32, generator=gen),) for _ in range(2)]
    options = {"quantize": True, "data": data}
    dynamic = kiln.compile(model, (x,), dynamic=True, **options)
    static = kiln.compile(model, (x,), **options)
    assert isinstance(dynamic, DynamicModel)
    assert any(p == "int8" for p, _ in dynamic.compression.layers.values())
    x3 = torch.randn(3, 3, 32, 32, generator=gen)
    want = torch.cat([static(x3[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(dynamic(x3), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dynamic(x), static(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():   # int8 error, as for a static int8 model
        assert (dynamic(x3) - model(x3)).abs().max() <= 0.05 * model(x3).abs().max()


@pytest.fixture(scope="module")
def pruned_bert():
    model, (ids,) = get_model("bert")
    seq = torch.export.Dim("seq", max=64)
    compressed = kiln.compress(model, [(ids,)], prune={"ratio": 0.3},
                               dynamic={"input_ids": {0: "batch", 1: seq}})
    return model, ids, compressed


def test_pruned_bert_with_dynamic_sequence_length(pruned_bert) -> None:
    model, ids, compressed = pruned_bert
    assert isinstance(compressed, DynamicCompressed)
    assert "pruned" in compressed.table()
    assert compressed.graph.num_parameters() < 0.9 * sum(p.numel() for p in model.parameters())
    fast = compressed.compile()
    for batch, seq in ((1, 16), (2, 7)):
        x = torch.cat([ids] * batch)[:, :seq]
        static = kiln.compile(model, (x,), prune={"ratio": 0.3}, data=[(x,)])
        np.testing.assert_allclose(fast(x), static(x), rtol=1e-5, atol=1e-5)
    assert compressed.graph_at({"batch": 2, "seq": 9}).types["input_ids"].shape == (2, 9)


def test_pruned_dynamic_bert_exports_to_onnx(pruned_bert, tmp_path) -> None:
    _, ids, compressed = pruned_bert
    fast = compressed.compile()
    path = kiln.export(fast, tmp_path / "bert_pruned.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seq in (5, 20):
        x = ids[:, :seq]
        got = session.run(None, {"input_ids": x.numpy()})[0]
        np.testing.assert_allclose(got, fast(x), rtol=1e-4, atol=1e-5)


def test_attributes_take_the_sizes_from_the_twin_and_the_rest_from_the_real_graph() -> None:
    # reshape (batch, channels): the batch moves between the twins, pruning changed channels
    assert _merge_attr((1, 248), (1, 256), (3, 256)) == (3, 248)
    assert _merge_attr(0.5, 0.25, 0.25) == 0.5        # a calibrated scale: the real one
    assert _merge_attr(7, 5, 9) is _MOVED             # moves, and compression changed it
    assert _merge_attr((1, 248), (1, 256), (3, 250)) is _MOVED


def linear_graph(batch: int, out: int, seed: int = 0) -> Graph:
    """x[batch, 8] -> linear to `out` -> reshape to (batch, out)."""
    b = GraphBuilder("g")
    x = b.input("x", TensorType((batch, 8), DType.f32))
    w = b.constant(np.random.default_rng(seed).standard_normal((out, 8)).astype(np.float32),
                   "w")
    y = b.op("linear", [x, w], name="fc")
    b.output(b.op("reshape", [y], {"shape": (batch, out)}, name="flat"))
    return b.build()


def test_transplant_keeps_compression_and_takes_the_sizes() -> None:
    real, base, twin = linear_graph(1, 4, seed=1), linear_graph(1, 4), linear_graph(3, 4)
    moved = transplant(real, base, twin, {(1, 3)})
    assert moved.types["x"].shape == (3, 8) and moved.types["flat"].shape == (3, 4)
    assert np.array_equal(moved.constants["w"], real.constants["w"])   # the real weights
    assert dict(moved.nodes[-1].attrs)["shape"] == (3, 4)


def test_transplant_refuses_channels_chosen_differently_at_another_size() -> None:
    real, base, twin = linear_graph(1, 4), linear_graph(1, 4), linear_graph(3, 5)
    with pytest.raises(kiln.KilnError, match="chose other\\s+channels") as info:
        transplant(real, base, twin, {(1, 3)})
    assert info.value.node == "fc" and "ratio" in info.value.hint
