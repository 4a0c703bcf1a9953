"""Static int8 of 1-d convolutions (compression/quantize.py): a Conv1d runs as qconv of
height 1 ([N, C, L] -> [N, 1, L, C]), its outputs u8 between int8 layers, dequantized for
float readers; against eager PyTorch within the int8 budget, on the host ISA and AVX2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln


class Net1d(nn.Module):
    """Strides, dilation and padding, a u8 chain, a float residual reader, a linear head."""

    def __init__(self, cin: int = 6, width: int = 24) -> None:
        super().__init__()
        self.a = nn.Conv1d(cin, width, 7, padding=3)
        self.b = nn.Conv1d(width, width, 5, padding=4, dilation=2)
        self.c = nn.Conv1d(width, 2 * width, 3, stride=2, padding=1)
        self.d = nn.Conv1d(2 * width, 2 * width, 1)
        self.head = nn.Linear(2 * width, 5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + torch.relu(self.b(h))        # b's input is also read in float (the residual)
        h = torch.relu(self.c(h))
        h = torch.relu(self.d(h))
        return self.head(h.mean(-1))


@pytest.mark.parametrize("target", [None, "avx2"])
def test_conv1d_layers_run_int8_and_match_eager(target):
    torch.manual_seed(0)
    model = Net1d().eval()
    x = torch.randn(3, 6, 50)
    data = [(torch.randn(3, 6, 50),) for _ in range(6)]
    q = kiln.compile(model, (x,), data=data, quantize=True, target=target)
    layers = {name: prec for name, (prec, _) in q.compression.layers.items()} \
        if hasattr(q.compression, "layers") else None
    text = str(q.graph)
    assert text.count("qconv(") == 4, text
    assert " conv(" not in text
    if layers is not None:
        assert all(layers[k] == "int8" for k in ("a", "b", "c", "d"))
    for xi in [x, *[d[0] for d in data[:2]]]:
        with torch.no_grad():
            want = model(xi)
        got = q(xi)
        assert (got - want).abs().max() <= 0.03 * want.abs().max(), (got - want).abs().max()


def test_conv1d_int8_graph_before_and_after():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv1d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 4, 16)
    before = str(kiln.compile(model, (x,)).graph)
    assert before.count("conv(") == 2 and "qconv" not in before
    after = str(kiln.compile(model, (x,), data=[(x,)], quantize=True).graph)
    # One quantize of the input in [N, 1, L, C], a u8 qconv -> qconv chain, float out.
    assert after.count("qconv(") == 2 and after.count("quantize(") == 1
    assert "u8[2,1,16,8]" in after
    with torch.no_grad():
        want = model(x)
    got = kiln.compile(model, (x,), data=[(x,)], quantize=True)(x)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


def test_conv1d_int8_exports_to_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Net1d().eval()
    x = torch.randn(3, 6, 50)
    q = kiln.compile(model, (x,), data=[(torch.randn(3, 6, 50),) for _ in range(4)],
                     quantize={"weight_max": 64})   # ORT's u8s8 kernels are exact there
    path = tmp_path / "net1d.onnx"
    kiln.export(q, path)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    want = q(x).numpy()
    assert abs(got - want).max() <= 1e-5 * abs(want).max() + 1e-6
