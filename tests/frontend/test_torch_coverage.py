"""Activations, statistics, norms, padding modes, adaptive max pooling, einsum, attention
modules, in-place ops and the fx frontend's fallbacks match eager PyTorch through fx,
torch.export and Dynamo, on the reference and llvm backends."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import kiln
from kiln.frontend.trace import FrontendFallbackWarning, trace_module
from kiln.interop.to_onnx import export_onnx
from kiln.interop.to_torch import run_torch
from kiln.ir import KilnError
from kiln.passes.fusion import plan_fusion


def stochastic_depth(input, p, mode, training=True):
    """torchvision.ops.stochastic_depth's semantics outside training (the identity); it carries
    torchvision's qualified name, so kiln finds its handler as it would torchvision's."""
    if not training or p == 0.0:
        return input
    raise AssertionError("the tests call stochastic_depth in eval mode only")


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")  # as torchvision does: one fx node, not traced through


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


def Fn(fn, **modules: nn.Module) -> nn.Module:
    """A module computing ``fn(module, *inputs)``, owning ``modules`` (fx needs fixed arity)."""
    return {1: _Fn1, 2: _Fn2, 3: _Fn3}[fn.__code__.co_argcount - 1](fn, **modules)


def r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _inplace_chain(x):
    y = x * 1.0
    y.relu_()
    y.add_(0.5)
    y.mul_(2.0)
    F.silu(y, inplace=True)
    F.hardswish(y, inplace=True)
    y.sub_(x).clamp_min_(-1.0)
    return y


def _prelu() -> nn.PReLU:
    p = nn.PReLU(4)
    with torch.no_grad():
        p.weight.copy_(torch.tensor([0.1, -0.3, 0.5, 2.0]))
    return p


def _mha(batch_first: bool) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(8, 2, batch_first=batch_first)


_PAD_MASK = torch.tensor([[False, False, False, True, True], [False] * 5])
_ATTN_MASK = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)

# name -> (model, inputs). Each case is small: a compile per frontend and backend.
CASES = {
    "elu_selu_celu": (Fn(lambda m, x: F.elu(x) + F.elu(x, 0.5) + F.selu(x) + F.celu(x, 0.7)),
                      (r(2, 4, 5) * 3,)),
    "elu_modules": (Fn(lambda m, x: m.a(x) + m.b(x) + m.c(x), a=nn.ELU(1.5), b=nn.SELU(),
                       c=nn.CELU(2.0)), (r(2, 4, 5) * 3,)),
    "prelu": (Fn(lambda m, x: m.p(x), p=_prelu()), (r(2, 4, 3, 3),)),
    "nan_to_num": (Fn(lambda m, x: torch.nan_to_num(x * 2)
                      + x.nan_to_num(nan=1.5, posinf=7.0, neginf=-7.0)),
                   (torch.tensor([[1.0, math.nan, math.inf, -math.inf, 3e38, -2.0]]),)),
    "softplus_mish": (Fn(lambda m, x: F.softplus(x) + F.softplus(x, beta=2.0, threshold=3.0)
                         + F.mish(x) + m.s(x) + m.m(x), s=nn.Softplus(0.5, 4.0), m=nn.Mish()),
                      (r(3, 7) * 8,)),
    "instance_norm": (Fn(lambda m, x: m.a(x) + m.b(x),
                         a=nn.InstanceNorm2d(4, affine=True), b=nn.InstanceNorm2d(4)),
                      (r(2, 4, 5, 6) * 2 + 1,)),
    "var_std": (Fn(lambda m, x: x.var(1, keepdim=True) + torch.std(x, dim=(1, 2), keepdim=True)
                   + torch.var(x, dim=2, correction=0, keepdim=True)
                   + x.std(unbiased=False) + torch.var(x, 1, False, True)), (r(2, 5, 6),)),
    "normalize": (Fn(lambda m, x: F.normalize(x) + F.normalize(x, p=1.0, dim=-1)
                     + F.normalize(x, dim=2, eps=0.5)), (r(2, 3, 4),)),
    "vector_norm": (Fn(lambda m, x: torch.linalg.vector_norm(x, dim=(1, 2))
                       + torch.linalg.vector_norm(x, 1, dim=1).sum(1)
                       + torch.linalg.vector_norm(x, math.inf, dim=(1, 2))
                       + torch.norm(x, p=2, dim=(1, 2)) + torch.norm(x, p=1, dim=(1, 2))
                       + x.norm(dim=(1, 2)) + torch.linalg.vector_norm(x, 3, dim=(1, 2))
                       + torch.norm(x, p=math.inf, dim=(1, 2))),
                    (r(2, 3, 4),)),
    "adaptive_max_pool": (Fn(lambda m, x: m.a(x).sum((2, 3)) + m.b(x).sum((2, 3))
                             + F.adaptive_max_pool2d(x, (3, 5)).amax((2, 3)),
                             a=nn.AdaptiveMaxPool2d((2, 3)), b=nn.AdaptiveMaxPool2d(4)),
                          (r(2, 3, 6, 9),)),
    "adaptive_max_pool_1d": (Fn(lambda m, x: m.a(x), a=nn.AdaptiveMaxPool1d(3)),
                             (r(2, 3, 7),)),
    "pad_reflect_replicate": (Fn(lambda m, x: F.pad(x, (1, 2, 2, 1), mode="reflect")
                                 + F.pad(x, (1, 2, 2, 1), mode="replicate")
                                 + m.a(x) + m.b(x), a=nn.ReflectionPad2d((1, 2, 2, 1)),
                                 b=nn.ReplicationPad2d((1, 2, 2, 1))), (r(2, 3, 4, 5),)),
    "pad_1d": (Fn(lambda m, x: F.pad(x, (2, 3), mode="reflect")
                  + F.pad(x, (2, 3), mode="replicate")), (r(2, 3, 6),)),
    "conv2d_same_even_kernel": (Fn(lambda m, x: m.a(x) + m.b(x),
                                   a=nn.Conv2d(3, 4, 4, padding="same"),
                                   b=nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(2, 1))),
                                (r(2, 3, 7, 8),)),
    "conv1d_same_even_kernel": (Fn(lambda m, x: F.conv1d(x, m.c.weight, m.c.bias,
                                                         padding="same"),
                                   c=nn.Conv1d(3, 4, 4)), (r(2, 3, 9),)),
    "einsum_bmm": (Fn(lambda m, a, b: torch.einsum("bij,bjk->bik", a, b)),
                   (r(2, 3, 4), r(2, 4, 5))),
    "einsum_attention_scores": (Fn(lambda m, q, k: torch.einsum("bhqd,bhkd->bhqk", q, k)),
                                (r(2, 2, 3, 4), r(2, 2, 5, 4))),
    "einsum_transpose_dot": (Fn(lambda m, a, b: torch.einsum("ij->ji", a).sum(0)
                                + torch.einsum("bi,bi->b", a, b)), (r(3, 4), r(3, 4))),
    "einsum_outer_sum": (Fn(lambda m, a, b: torch.einsum("i,j->ij", a, b)
                            + torch.einsum("ij->", a.unsqueeze(1))), (r(3), r(4))),
    "unflatten": (Fn(lambda m, x: x.unflatten(1, (2, 3)) + torch.unflatten(x, -1, (2, 3))),
                  (r(2, 6),)),
    "stochastic_depth": (Fn(lambda m, x: stochastic_depth(x * 2.0, 0.2, "row", training=False)),
                         (r(2, 3),)),
    "inplace": (Fn(lambda m, x: _inplace_chain(x)), (r(2, 3, 4) * 4,)),
    "mha_batch_first": (Fn(lambda m, q, k: m.a(q, k, k), a=_mha(True)),
                        (r(2, 5, 8), r(2, 5, 8))),
    "mha_masks_weights": (Fn(lambda m, x, k: m.a(x, k, k, key_padding_mask=_PAD_MASK,
                                                attn_mask=_ATTN_MASK.float() * -2.0,
                                                average_attn_weights=False)[1].sum(1)
                             + m.a(x, x, x, attn_mask=_ATTN_MASK)[0].sum(-1, keepdim=True)
                             + m.a(x, k, k)[1], a=_mha(True)), (r(2, 5, 8), r(2, 5, 8))),
    "mha_seq_first_no_weights": (Fn(lambda m, x: m.a(x, x, x, need_weights=False,
                                                     key_padding_mask=_PAD_MASK)[0],
                                    a=_mha(False)), (r(5, 2, 8),)),
    "transformer_encoder_layer": (Fn(lambda m, x: m.a(x, src_key_padding_mask=_PAD_MASK)
                                     + m.b(x, src_mask=_ATTN_MASK),
                                     a=nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                                     b=nn.TransformerEncoderLayer(8, 2, 16, batch_first=True,
                                                                  norm_first=True,
                                                                  activation="gelu")),
                                  (r(2, 5, 8),)),
    "transformer_decoder_layer": (Fn(lambda m, x, mem: m.a(x, mem, tgt_mask=_ATTN_MASK),
                                     a=nn.TransformerDecoderLayer(8, 2, 16)),
                                  (r(5, 2, 8), r(3, 2, 8))),
}


def assert_matches_eager(model: nn.Module, inputs, got) -> None:
    """``got`` equals the eager model's outputs (fp32 tolerances; NaN where eager has NaN)."""
    with torch.no_grad():
        expected = model(*[x.clone() for x in inputs])
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5, equal_nan=True)


def _run(compiled, inputs):
    return compiled(*[x.clone() for x in inputs])


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_eager_on_reference(case: str, frontend: str) -> None:
    torch.manual_seed(0)
    model, inputs = CASES[case]
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrontendFallbackWarning)  # fx must trace these itself
        compiled = kiln.compile(model, inputs, frontend=frontend, backend="reference")
    assert compiled.source_graph.frontend == frontend
    assert_matches_eager(model, inputs, _run(compiled, inputs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_eager_through_dynamo(case: str) -> None:
    torch._dynamo.reset()
    model, inputs = CASES[case]
    model = model.eval()
    fast = torch.compile(model, backend="kiln", options={"backend": "reference"})
    with torch.no_grad():
        got = fast(*[x.clone() for x in inputs])
    assert_matches_eager(model, inputs, got)


class _AllOps(nn.Module):
    """Every single-input case in one model (one native compile for all of them); its one input
    is the cases' inputs flattened and concatenated (fx needs a fixed number of inputs)."""

    def __init__(self, names, shapes) -> None:
        super().__init__()
        self.shapes = shapes
        self.cases = nn.ModuleList(CASES[n][0] for n in names)

    def forward(self, flat):
        outs, start = [], 0
        for m, shape in zip(self.cases, self.shapes):
            n = math.prod(shape)
            outs.append(m(flat[start:start + n].reshape(shape)))
            start += n
        return tuple(outs)


@pytest.mark.parametrize("frontend", ["fx", "export", "dynamo"])
def test_ops_match_eager_on_llvm(frontend: str) -> None:
    names = sorted(n for n, (_, ins) in CASES.items() if len(ins) == 1)
    xs = [CASES[n][1][0] for n in names]
    model = _AllOps(names, [tuple(x.shape) for x in xs]).eval()
    flat = torch.cat([x.reshape(-1) for x in xs])
    if frontend == "dynamo":
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="kiln")
    else:
        compiled = kiln.compile(model, (flat,), frontend=frontend, backend="llvm")
    with torch.no_grad():
        got = compiled(flat.clone())
    for name, g, m, x in zip(names, got, model.cases, xs):
        try:
            assert_matches_eager(m, (x,), g)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_two_input_cases_match_eager_on_llvm() -> None:
    for name in ("einsum_bmm", "mha_masks_weights", "transformer_decoder_layer"):
        model, inputs = CASES[name]
        model = model.eval()
        for frontend in ("fx", "export"):
            compiled = kiln.compile(model, inputs, frontend=frontend, backend="llvm")
            assert_matches_eager(model, inputs, _run(compiled, inputs))


@pytest.mark.parametrize("act", [F.elu, F.selu, lambda x: F.celu(x, 0.5), _prelu(),
                                 lambda x: F.softplus(x, 2.0, 3.0), F.mish],
                         ids=["elu", "selu", "celu", "prelu", "softplus", "mish"])
def test_activation_is_one_fused_kernel(act) -> None:
    model = (Fn(lambda m, x: m.a(x), a=act) if isinstance(act, nn.Module)
             else Fn(lambda m, x: act(x))).eval()
    compiled = kiln.compile(model, (r(2, 4, 3, 3),), backend="reference")
    plan = plan_fusion(compiled.graph)
    assert list(plan.roles.values()).count("root") == 1, plan.describe(compiled.graph)


def test_einsum_is_a_batched_matmul() -> None:
    model, inputs = CASES["einsum_attention_scores"]
    g = kiln.compile(model.eval(), inputs, pipeline="O0", backend="reference").graph
    assert [n.op for n in g.nodes].count("matmul") == 1


def test_einsum_diagonal_is_refused() -> None:
    model = Fn(lambda m, x: torch.einsum("ii->i", x)).eval()
    with pytest.raises(KilnError, match="diagonal"):
        kiln.compile(model, (r(3, 3),), backend="reference")


def test_inplace_ops_leave_the_callers_inputs_alone() -> None:
    model, inputs = CASES["inplace"]
    x = inputs[0].clone()
    compiled = kiln.compile(model.eval(), (x,), backend="reference")
    torch.testing.assert_close(x, inputs[0], rtol=0, atol=0)
    assert_matches_eager(model, inputs, compiled(x))


def test_export_functionalizes_inplace_ops() -> None:
    model, inputs = CASES["inplace"]
    graph, _ = trace_module(model.eval(), inputs, "export")
    ops = {n.op for n in graph.nodes}
    assert {"relu", "silu", "hardswish"} <= ops, ops


@pytest.mark.parametrize("module, x", [
    (nn.BatchNorm1d(4), r(3, 4)),
    (nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), r(1, 4, 5, 5)),
    (nn.InstanceNorm1d(4, affine=True), r(2, 4, 6)),
    (nn.MultiheadAttention(8, 2), r(5, 2, 8)),
], ids=["BatchNorm1d", "ConvTranspose2d", "InstanceNorm1d", "MultiheadAttention"])
def test_builtin_module_as_the_whole_model(module: nn.Module, x: torch.Tensor) -> None:
    if isinstance(module, nn.BatchNorm1d):
        with torch.no_grad():
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    module = module.eval()
    inputs = (x,) * (3 if isinstance(module, nn.MultiheadAttention) else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrontendFallbackWarning)
        compiled = kiln.compile(module, inputs, backend="reference")
    assert_matches_eager(module, inputs, _run(compiled, inputs))


def test_projected_lstm_is_refused_by_name() -> None:
    """LSTM and GRU compile (tests/frontend/test_recurrent.py); an LSTM with proj_size does
    not, and says so."""
    with pytest.raises(kiln.KilnError, match="proj_size"):
        kiln.compile(nn.LSTM(4, 3, proj_size=2).eval(), (r(5, 2, 4),), backend="reference")


class _Unpacks(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=1)  # fx: "Proxy object cannot be iterated"
        if x.shape[0] > 1:  # Python control flow on a size
            return a * b
        return a + b


def test_fx_falls_back_to_export_and_says_so() -> None:
    model, x = _Unpacks().eval(), r(3, 4)
    with pytest.warns(FrontendFallbackWarning, match="frontend='export'"):
        compiled = kiln.compile(model, (x,), backend="reference")
    assert compiled.source_graph.frontend == "export"
    assert_matches_eager(model, (x,), compiled(x))


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_fx_and_export_failures_are_both_reported() -> None:
    with pytest.warns(FrontendFallbackWarning), \
            pytest.raises(KilnError, match="neither torch.fx nor torch.export"):
        kiln.compile(_DataDependent().eval(), (r(3),), backend="reference")


@pytest.mark.parametrize("bad, match", [
    (lambda x: F.pad(x, (4, 0), mode="reflect"), "reflect padding 4"),
    (lambda x: torch.norm(x, p="nuc", dim=(0, 1)), "norm p='nuc'"),
    (lambda x: torch.einsum("...i->i", x), r"'\.\.\.'"),
])
def test_unsupported_forms_are_named(bad, match: str) -> None:
    model = Fn(lambda m, x: bad(x)).eval()
    with pytest.raises(KilnError, match=match):
        kiln.compile(model, (r(3, 4),), backend="reference")


def test_decompositions_export_to_onnx_and_torch(tmp_path) -> None:
    """The ops these handlers emit have ONNX and PyTorch translations that agree with kiln."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    names = sorted(n for n, (_, ins) in CASES.items() if len(ins) == 1)
    xs = [CASES[n][1][0] for n in names]
    model = _AllOps(names, [tuple(x.shape) for x in xs]).eval()
    flat = torch.cat([x.reshape(-1) for x in xs])
    compiled = kiln.compile(model, (flat,), backend="reference")
    expected = [o.numpy() for o in compiled(flat)]
    path = export_onnx(compiled, tmp_path / "coverage.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx.checker.check_model(onnx.load(path), full_check=True)
    got = session.run(None, {compiled.graph.inputs[0]: flat.numpy()})
    by_torch = run_torch(compiled.graph, [flat.numpy()])
    for name, e, g, t in zip(names, expected, got, by_torch):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=f"{name}: ONNX")
        np.testing.assert_allclose(t, e, rtol=1e-4, atol=1e-5, err_msg=f"{name}: to_torch")


@pytest.mark.heavy
def test_huggingface_model_falls_back_to_export() -> None:
    from kiln.examples.model_coverage import prepare_transformers

    prepare_transformers()  # torchvision's missing C ops would break transformers' import
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with pytest.warns(FrontendFallbackWarning, match="BertModel"):
        compiled = kiln.compile(model, (ids,), backend="reference")
    assert compiled.source_graph.frontend == "export"
    with torch.no_grad():
        expected = model(ids)
    got = compiled(ids)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state,
                               rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=2e-5, atol=2e-5)
