"""Every zoo model, through kiln.compile and torch.compile(backend="kiln"), matches eager."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.ir import parse_graph, print_graph, verify
from kiln.zoo import ZOO, get_model


def assert_model_close(got, expected) -> None:
    """Model outputs agree within 1e-4 of the output's largest magnitude."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        scale = max(e.abs().max().item(), 1e-6)
        err = (g - e).abs().max().item() / scale
        assert err <= 1e-4, f"relative error {err:.3e}"


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_compile_matches_eager(name: str, frontend: str) -> None:
    model, inputs = get_model(name, batch=2)
    compiled = kiln.compile(model, inputs, frontend=frontend, backend="reference")
    with torch.no_grad():
        expected = model(*inputs)
    assert_model_close(compiled(*inputs), expected)
    # NumPy in, NumPy out.
    out_np = compiled(*[x.numpy() for x in inputs])
    assert_model_close(torch.from_numpy(out_np), expected)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_torch_compile_backend_matches_eager(name: str) -> None:
    torch._dynamo.reset()
    model, inputs = get_model(name)
    fast = torch.compile(model, backend="kiln", options={"backend": "reference"})
    with torch.no_grad():
        expected = model(*inputs)
        got = fast(*inputs)
    assert_model_close(got, expected)


def test_torch_compile_backend_defaults_to_native_code() -> None:
    torch._dynamo.reset()
    model, inputs = get_model("lenet5")
    fast = torch.compile(model, backend="kiln")
    with torch.no_grad():
        assert_model_close(fast(*inputs), model(*inputs))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_text_form_round_trips(name: str) -> None:
    model, inputs = get_model(name)
    compiled = kiln.compile(model, inputs, pipeline="O0", backend="reference")
    for g in (compiled.source_graph, kiln.compile(model, inputs, backend="reference").graph):
        text = print_graph(g)
        back = parse_graph(text, g.constants)
        verify(back)
        assert print_graph(back) == text


def test_batchnorm_folding_removes_every_batchnorm_from_resnet18() -> None:
    model, inputs = get_model("resnet18")
    compiled = kiln.compile(model, inputs, backend="reference")
    assert any(n.op == "batch_norm" for n in compiled.source_graph.nodes)
    assert not any(n.op == "batch_norm" for n in compiled.graph.nodes)
    with torch.no_grad():
        assert_model_close(compiled(*inputs), model(*inputs))


def test_dynamo_recompiles_when_a_weight_changes_in_place() -> None:
    torch._dynamo.reset()
    model, inputs = get_model("mlp")
    fast = torch.compile(model, backend="kiln", options={"backend": "reference"})
    with torch.no_grad():
        fast(*inputs)
        first_linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        first_linear.weight.mul_(2.0)
        assert_model_close(fast(*inputs), model(*inputs))
