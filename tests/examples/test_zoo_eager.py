"""Every zoo model builds deterministically, runs eagerly with sane outputs, and traces."""

from __future__ import annotations

import pytest
import torch

from kiln.zoo import ZOO, get_model

# Output shape for a batch of B, as a function of B.
EXPECTED_SHAPES = {
    "mlp": lambda b: (b, 10),
    "lenet5": lambda b: (b, 10),
    "resnet18_cifar": lambda b: (b, 10),
    "resnet18": lambda b: (b, 1000),
    "mobilenetv2": lambda b: (b, 1000),
    "bert": lambda b: (b, 256),
    "gpt2_block": lambda b: (b, 32, 1000),
    "gpt2_block_manual_mask": lambda b: (b, 32, 1000),
}

NAMES = sorted(ZOO)


def run(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Run ``model`` on ``inputs`` without autograd."""
    with torch.no_grad():
        return model(*inputs)


def test_every_model_has_an_expected_shape() -> None:
    assert set(EXPECTED_SHAPES) == set(ZOO)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_eager_output_is_finite_well_shaped_and_scaled(name: str, batch: int) -> None:
    model, inputs = get_model(name, batch=batch)
    assert not any(module.training for module in model.modules())
    out = run(model, inputs)
    assert out.shape == EXPECTED_SHAPES[name](batch)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert 0.1 <= out.std().item() <= 10.0


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_same_model_inputs_and_output(name: str) -> None:
    rng_state = torch.get_rng_state()
    model_a, inputs_a = get_model(name, batch=2, seed=3)
    model_b, inputs_b = get_model(name, batch=2, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state), "building a model moved the global RNG"

    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    for a, b in zip(inputs_a, inputs_b, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(run(model_a, inputs_a), run(model_b, inputs_b))


@pytest.mark.parametrize("name", NAMES)
def test_weights_depend_on_seed_not_batch(name: str) -> None:
    state_1 = get_model(name, batch=1, seed=0)[0].state_dict()
    state_2 = get_model(name, batch=2, seed=0)[0].state_dict()
    other = get_model(name, batch=1, seed=1)[0].state_dict()
    assert all(torch.equal(state_1[key], state_2[key]) for key in state_1)
    assert not all(torch.equal(state_1[key], other[key]) for key in state_1)


def test_batchnorms_have_nontrivial_statistics() -> None:
    model, _ = get_model("resnet18_cifar")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for norm in norms:
        assert not torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert not torch.equal(norm.running_var, torch.ones_like(norm.running_var))
        assert not torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert not torch.equal(norm.bias, torch.zeros_like(norm.bias))


@pytest.mark.parametrize("name", NAMES)
def test_fx_symbolic_trace_matches_eager(name: str) -> None:
    model, inputs = get_model(name, batch=2)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(run(traced, inputs), run(model, inputs), rtol=0.0, atol=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_matches_eager(name: str) -> None:
    model, inputs = get_model(name, batch=2)
    exported = torch.export.export(model, inputs)
    torch.testing.assert_close(run(exported.module(), inputs), run(model, inputs))


def test_unknown_name_raises_key_error() -> None:
    with pytest.raises(KeyError, match="unknown zoo model"):
        get_model("no_such_model")


def test_manual_mask_attention_matches_sdpa() -> None:
    sdpa_model, inputs = get_model("gpt2_block", batch=2)
    manual_model, manual_inputs = get_model("gpt2_block_manual_mask", batch=2)
    assert all(torch.equal(a, b) for a, b in zip(inputs, manual_inputs, strict=True))
    torch.testing.assert_close(run(manual_model, inputs), run(sdpa_model, inputs))
