"""The decompositions of kiln.frontend.handlers_coverage (activations, statistics, edge padding,
adaptive max pooling, einsum, multi-head attention) on the CUDA backend (simulator) match eager
PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kiln


class _Mix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.prelu = nn.PReLU(3)
        self.norm = nn.InstanceNorm2d(3, affine=True)
        self.pool = nn.AdaptiveMaxPool2d((2, 3))

    def forward(self, x):
        act = F.elu(x) + F.selu(x) + F.softplus(x, 2.0, 3.0) + F.mish(x) + self.prelu(x)
        padded = F.pad(act, (1, 1, 2, 1), mode="reflect") + F.pad(x, (1, 1, 2, 1),
                                                                  mode="replicate")
        stats = x.var(1, keepdim=True) + F.normalize(x, dim=1)
        pooled = self.pool(self.norm(stats + x))
        return padded, pooled, torch.einsum("bchw,bdhw->bcd", x, act)


def assert_matches_eager(model: nn.Module, inputs, got) -> None:
    """Every output equals eager PyTorch's within fp32 tolerances."""
    with torch.no_grad():
        expected = model(*inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=2e-5, atol=2e-5)


def test_coverage_ops_match_eager_on_cuda() -> None:
    torch.manual_seed(0)
    model, x = _Mix().eval(), torch.randn(1, 3, 5, 6)
    compiled = kiln.compile(model, (x,), backend="cuda")
    assert_matches_eager(model, (x,), compiled(x))


def test_multi_head_attention_matches_eager_on_cuda() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    q = torch.randn(1, 4, 8)
    mask = torch.tensor([[False, False, True, False]])

    class WithMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, q):
            return self.mha(q, q, q, key_padding_mask=mask)

    model = WithMask().eval()
    compiled = kiln.compile(model, (q,), backend="cuda")
    assert_matches_eager(model, (q,), compiled(q))
