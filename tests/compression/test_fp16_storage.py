"""Half-precision weight storage of float32 linear layers (quantize={"mode": "fp16"}, and
{"fp16": [patterns]} beside int8): the linear op with an f16 weight against NumPy and PyTorch,
on the LLVM backend (host ISA and AVX2; the packed panels stay f16), through PyTorch and ONNX
Runtime, and through kiln.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kiln
from kiln.backends.llvm import compile_graph
from kiln.backends.reference import run_graph
from kiln.interop.to_torch import run_torch
from kiln.ir import GraphBuilder, KilnError, TensorType

RNG = np.random.default_rng(0)


def _mixed_graph(rows: int, k: int = 96, n: int = 40, bias: bool = True):
    b = GraphBuilder("mixed")
    x = b.input("x", TensorType((rows, k)))
    w = b.constant(RNG.standard_normal((n, k)).astype(np.float16), "w")
    ins = [x, w]
    if bias:
        ins.append(b.constant(RNG.standard_normal(n).astype(np.float32), "b"))
    b.output(b.op("relu", [b.op("linear", ins)]))
    return b.build()


@pytest.mark.parametrize("target", ["host", "avx2"])
@pytest.mark.parametrize("rows, bias", [(1, True), (3, False), (64, True)])
def test_f16_weight_linear_matches_numpy(rows, bias, target):
    from kiln.backends.llvm.compiler import host_target
    from kiln.passes.target import named_target

    g = _mixed_graph(rows, bias=bias)
    x = RNG.standard_normal((rows, 96)).astype(np.float32)
    w = g.constants["w"].astype(np.float64)
    want = x.astype(np.float64) @ w.T
    if bias:
        want = want + g.constants["b"]
    want = np.maximum(want, 0)
    ref = run_graph(g, [x])[0]
    assert ref.dtype == np.float32
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)
    prog = compile_graph(g, cache=False, target=named_target(target, host_target()))
    got = prog.run([x])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    torch_out = run_torch(g, [x])[0]
    np.testing.assert_allclose(np.asarray(torch_out), want, rtol=1e-5, atol=2e-5)
    # The packed weights stay half precision: about half of the f32 program's constants.
    g32 = g.copy()
    g32.constants["w"] = g.constants["w"].astype(np.float32)
    g32.types["w"] = TensorType((40, 96))
    f32_bytes = len(compile_graph(g32, cache=False).image.const_blob)
    assert len(prog.image.const_blob) < 0.6 * f32_bytes


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_fp16_mode_through_compile_torch_and_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _Mlp().eval()
    x = torch.randn(4, 64)
    c = kiln.compile(model, (x,), quantize={"mode": "fp16"})
    assert {p for p, _ in c.compression.layers.values()} == {"fp16"}
    text = str(c.graph)
    assert text.count("f16[") >= 3
    with torch.no_grad():
        want = model(x)
    got = c(x)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()
    path = tmp_path / "mlp16.onnx"
    kiln.export(c, path)
    session = ort.InferenceSession(str(path))
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(onnx_out, got.numpy(), rtol=1e-5, atol=1e-5)


def test_int8_beside_fp16_layers():
    torch.manual_seed(0)
    model = _Mlp().eval()
    x = torch.randn(4, 64)
    data = [(torch.randn(4, 64),) for _ in range(4)]
    c = kiln.compile(model, (x,), data=data, quantize={"fp16": ["head"]})
    layers = c.compression.layers
    assert layers["head"][0] == "fp16" and layers["fc1"][0] == "int8"
    with torch.no_grad():
        want = model(x)
    assert (c(x) - want).abs().max() <= 0.05 * want.abs().max()
    with pytest.raises(KilnError, match="matches no linear layer"):
        kiln.compile(model, (x,), data=data, quantize={"fp16": ["nothing*"]})


def test_layers_that_cannot_store_f16_stay_float():
    torch.manual_seed(0)
    model = _Mlp().eval()
    with torch.no_grad():
        model.fc2.weight[0, 0] = 1e6   # beyond float16's range
    c = kiln.compile(model, (torch.randn(4, 64),), quantize={"mode": "fp16", "protect": ["head"]})
    layers = c.compression.layers
    assert layers["fc1"][0] == "fp16"
    assert layers["fc2"] == ("fp32", "weights beyond float16's range (or not finite)")
    assert layers["head"] == ("fp32", "protected")
