"""Each PyTorch operation the frontend covers, imported through fx and torch.export, matches
eager PyTorch with torch.testing's fp32 tolerances."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kiln


class _Fn(nn.Module):
    def __init__(self, fn, **modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for k, m in modules.items():
            self.add_module(k, m)


class _Fn1(_Fn):
    def forward(self, a):
        return self.fn(self, a)


class _Fn2(_Fn):
    def forward(self, a, b):
        return self.fn(self, a, b)


class _Fn3(_Fn):
    def forward(self, a, b, c):
        return self.fn(self, a, b, c)


class _Fn4(_Fn):
    def forward(self, a, b, c, d):
        return self.fn(self, a, b, c, d)


def Fn(fn, **modules: nn.Module) -> nn.Module:
    """A module computing ``fn(module, *inputs)``, owning ``modules`` (fx needs fixed arity)."""
    arity = fn.__code__.co_argcount - 1
    return {1: _Fn1, 2: _Fn2, 3: _Fn3, 4: _Fn4}[arity](fn, **modules)


def _bn(c: int, cls=nn.BatchNorm2d) -> nn.Module:
    bn = cls(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


def _split_cat_stack(x):
    s = x.split(2, dim=1)
    c = torch.chunk(x, 3, dim=1)
    parts = x.split([1, 5], 1)[1].chunk(5, 1)
    stacked = torch.stack([parts[0], parts[2], parts[4]], 0).sum(0).sum(1, keepdim=True)
    return torch.cat([s[2], s[1], s[0], c[0], c[1], c[2]], dim=1) + stacked


def r(*shape):
    return torch.randn(*shape)


CASES = {
    "linear": (Fn(lambda m, x: m.l(x), l=nn.Linear(8, 5)), (r(3, 8),)),
    "linear_3d_nobias": (Fn(lambda m, x: m.l(x), l=nn.Linear(8, 5, bias=False)), (r(2, 3, 8),)),
    "conv1d": (Fn(lambda m, x: m.c(x), c=nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2)),
               (r(2, 4, 17),)),
    "conv2d_groups": (Fn(lambda m, x: m.c(x), c=nn.Conv2d(4, 8, 3, padding=1, groups=2)),
                      (r(1, 4, 9, 9),)),
    "conv2d_depthwise_same": (Fn(lambda m, x: m.c(x), c=nn.Conv2d(6, 6, 5, padding="same",
                                                                   groups=6)), (r(1, 6, 8, 8),)),
    "conv2d_stride_dilation": (Fn(lambda m, x: m.c(x), c=nn.Conv2d(3, 4, 3, stride=2,
                                                                    padding=2, dilation=2)),
                               (r(2, 3, 11, 10),)),
    "conv_transpose2d": (Fn(lambda m, x: m.c(x), c=nn.ConvTranspose2d(4, 6, 3, stride=2,
                                                                       padding=1,
                                                                       output_padding=1,
                                                                       groups=2)),
                         (r(1, 4, 5, 6),)),
    "batchnorm1d": (Fn(lambda m, x: m.bn(x), bn=_bn(5, nn.BatchNorm1d)), (r(4, 5),)),
    "batchnorm2d": (Fn(lambda m, x: m.bn(x), bn=_bn(3)), (r(2, 3, 4, 4),)),
    "layernorm": (Fn(lambda m, x: m.ln(x), ln=nn.LayerNorm([4, 6])), (r(2, 4, 6),)),
    "groupnorm": (Fn(lambda m, x: m.gn(x), gn=nn.GroupNorm(2, 6)), (r(2, 6, 3, 3),)),
    "embedding": (Fn(lambda m, i: m.e(i), e=nn.Embedding(20, 7)),
                  (torch.randint(0, 20, (2, 5)),)),
    "dropout_eval": (Fn(lambda m, x: m.d(x) + F.dropout(x, 0.3, training=False),
                        d=nn.Dropout(0.5)), (r(3, 4),)),
    "relu_relu6_leaky": (Fn(lambda m, x: F.relu(x) + m.r6(x * 4) + F.leaky_relu(x, 0.2)
                            + m.lr(x), r6=nn.ReLU6(), lr=nn.LeakyReLU(0.05)), (r(3, 5),)),
    "gelu_both": (Fn(lambda m, x: F.gelu(x) + F.gelu(x, approximate="tanh") + m.g(x),
                     g=nn.GELU("tanh")), (r(4, 6),)),
    "silu_sigmoid_tanh": (Fn(lambda m, x: F.silu(x) * torch.sigmoid(x) + torch.tanh(x)
                             + m.s(x), s=nn.SiLU()), (r(4, 6),)),
    "hardswish_hardsigmoid": (Fn(lambda m, x: F.hardswish(x * 3) + m.h(x * 3),
                                 h=nn.Hardsigmoid()), (r(4, 6),)),
    "softsign": (Fn(lambda m, x: F.softsign(x * 3) + m.s(x), s=nn.Softsign()), (r(4, 6),)),
    "softmax_logsoftmax": (Fn(lambda m, x: F.softmax(x, dim=-1) + F.log_softmax(x, dim=1)
                              + m.s(x), s=nn.Softmax(dim=0)), (r(3, 5),)),
    "pools": (Fn(lambda m, x: m.mp(x) + F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
                 + F.max_pool2d(x, 2, 2, ceil_mode=True)[..., :4, :4] * 0
                 + m.ap(x), mp=nn.MaxPool2d(3, 2, 1), ap=nn.AvgPool2d(3, 2, 1)),
              (r(1, 3, 8, 8),)),
    "adaptive_avg_pool": (Fn(lambda m, x: m.a(x).flatten(1) + F.adaptive_avg_pool2d(x, 1)
                             .flatten(1)[:, :1], a=nn.AdaptiveAvgPool2d((1, 1))),
                          (r(2, 4, 7, 5),)),
    "adaptive_avg_pool_uneven": (Fn(lambda m, x: F.adaptive_avg_pool2d(x, (3, 2))),
                                 (r(1, 2, 7, 5),)),
    "max_pool1d": (Fn(lambda m, x: F.max_pool1d(x, 3, 2) + 0), (r(2, 3, 9),)),
    "arith_broadcast": (Fn(lambda m, x, y: (x + y) * 2 - y / (x.abs() + 1) + (-x)
                           + x ** 2 + torch.pow(x.abs() + 1, y) + torch.sqrt(x.abs())
                           + torch.rsqrt(x.abs() + 1) + torch.exp(y) + 1.5 - x),
                        (r(3, 4), r(1, 4))),
    "rsub_radd_rdiv": (Fn(lambda m, x: 1 - x + (2 + x) * (3 / (x.abs() + 1))), (r(2, 3),)),
    "matmul_family": (Fn(lambda m, a, b, c: torch.bmm(a, b) + torch.baddbmm(c, a, b, beta=0.5,
                                                                           alpha=2.0)
                         + (a @ b) + torch.matmul(a, b)), (r(2, 3, 4), r(2, 4, 5), r(2, 3, 5))),
    "matmul_vector": (Fn(lambda m, a, v: torch.matmul(a, v)), (r(3, 4), r(4))),
    "addmm": (Fn(lambda m, b, x, w: torch.addmm(b, x, w)), (r(5), r(3, 4), r(4, 5))),
    "sdpa": (Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v)),
             (r(2, 2, 5, 8), r(2, 2, 7, 8), r(2, 2, 7, 4))),
    "sdpa_causal": (Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v,
                                                                         is_causal=True)),
                    (r(1, 2, 6, 8), r(1, 2, 6, 8), r(1, 2, 6, 8))),
    "sdpa_masks": (Fn(lambda m, q, k, v, bm: F.scaled_dot_product_attention(q, k, v, bm)
                      + F.scaled_dot_product_attention(q, k, v, torch.zeros(6, 6) - 0.5,
                                                       scale=0.3)),
                   (r(1, 2, 6, 8), r(1, 2, 6, 8), r(1, 2, 6, 8),
                    torch.tril(torch.ones(6, 6, dtype=torch.bool)))),
    "reductions": (Fn(lambda m, x: x.mean(dim=(1, 2), keepdim=True).flatten()
                      + torch.sum(x, 1).sum(-1) + torch.amax(x, dim=-1).mean(1)
                      + x.mean() + x.sum(dim=[0, 2]).mean()), (r(2, 3, 4),)),
    "reshape_family": (Fn(lambda m, x: x.reshape(2, 12).view(4, 6).flatten().unsqueeze(0).squeeze(0)
                          .view(-1, 3).permute(1, 0).transpose(0, 1).contiguous()
                          .reshape(2, 3, 4)), (r(2, 3, 4),)),
    "split_chunk_cat_stack": (Fn(lambda m, x: _split_cat_stack(x)), (r(2, 6, 3),)),
    "slicing": (Fn(lambda m, x: x[:, 1:5:2, ..., None][0] + x[1, :2, :].unsqueeze(-1)
                   + x.narrow(2, 0, 3)[..., None][:1, :2].sum()), (r(2, 6, 5),)),
    "expand": (Fn(lambda m, x, y: x.expand(3, 4, 5) + y.expand_as(x.expand(3, 4, 5))),
               (r(1, 4, 1), r(3, 1, 5))),
    "getattr_shapes": (Fn(lambda m, x: x.view(x.shape[0], x.size(1) * x.size()[2], -1)
                          * x.dim()), (r(2, 3, 4, 5),)),
    "masked_fill_where": (Fn(lambda m, x: torch.where(x > 0, x, x * 0.1)
                             .masked_fill(x < -1, -5.0)), (r(4, 5),)),
    "clamp_minmax": (Fn(lambda m, x, y: torch.clamp(x, -0.5, 0.5) + x.clamp(min=0)
                        + torch.maximum(x, y) + torch.minimum(x, y)), (r(3, 4), r(3, 4))),
    "cast": (Fn(lambda m, x, i: x + i.float() + i.to(torch.float32) * 2), (r(2, 3),
                                                                           torch.arange(6)
                                                                           .view(2, 3))),
    "pad": (Fn(lambda m, x: F.pad(x, (1, 2, 0, 1), value=0.5)), (r(1, 2, 3, 4),)),
    "erf_log": (Fn(lambda m, x: torch.erf(x) + torch.log(x.abs() + 1)), (r(3, 3),)),
    "trig": (Fn(lambda m, x: torch.sin(x) + x.cos() * torch.atan(x * 3) + torch.tan(x * 0.5)
                + torch.asin(x.clamp(-1, 1)) - torch.arccos(x.clamp(-1, 1) * 0.999)), (r(3, 5),)),
    # Halves (x.5) round to even, as in PyTorch.
    "round": (Fn(lambda m, x: torch.round(x * 4) + (x * 2).round()), (r(3, 3),)),
}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_eager(case: str, frontend: str) -> None:
    torch.manual_seed(0)
    model, inputs = CASES[case]
    model = model.eval()
    compiled = kiln.compile(model, inputs, frontend=frontend, pipeline="O0",
                            backend="reference")
    with torch.no_grad():
        expected = model(*inputs)
    torch.testing.assert_close(compiled(*inputs), expected)


def test_every_case_is_imported_to_kiln_ops() -> None:
    # The cases above really exercise kiln ops (not folded away as constants).
    model, inputs = CASES["sdpa_causal"]
    g = kiln.compile(model.eval(), inputs, pipeline="O0", backend="reference").graph
    assert [n.op for n in g.nodes] == ["attention"]
    assert g.nodes[0].attrs["causal"] is True
