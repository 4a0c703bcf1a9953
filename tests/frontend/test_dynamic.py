"""Dynamic shapes, first step: kiln.compile(dynamic=...) and torch.compile(backend="kiln")
with changing batch sizes and sequence lengths give eager's answers (one program per size,
compiled on the call that first brings it)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import kiln
from kiln import dynamic as dyn
from kiln.zoo import get_model


def assert_matches(got, want, tol=1e-4) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * max(np.abs(want).max(), 1e-6)


@pytest.mark.parametrize("name", ["lenet5", "resnet18_cifar"])
def test_dynamic_batch_matches_eager(name) -> None:
    model, inputs = get_model(name)
    compiled = kiln.compile(model, inputs, dynamic=True)
    assert compiled.dynamic_dims == {"x": {0: "batch"}}
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3, 8, 3):
        x = torch.randn((batch, *inputs[0].shape[1:]), generator=gen)
        with torch.no_grad():
            assert_matches(compiled(x), model(x))
        assert_matches(compiled(x.numpy()), model(x).detach().numpy())
    assert len(compiled._programs) == 3


def test_dynamic_batch_and_sequence_of_an_encoder() -> None:
    model, inputs = get_model("bert")
    compiled = kiln.compile(model, inputs, dynamic={"input_ids": {0: "batch", 1: "seq"}})
    gen = torch.Generator().manual_seed(1)
    for batch, seq in ((1, 32), (3, 16), (8, 5), (2, 1)):
        ids = torch.randint(0, 1000, (batch, seq), generator=gen)
        with torch.no_grad():
            assert_matches(compiled(ids), model(ids))


def test_calls_that_do_not_fit_the_declared_dimensions_are_refused() -> None:
    model, inputs = get_model("lenet5")
    compiled = kiln.compile(model, inputs, dynamic={0: {0: "batch"}})
    with pytest.raises(kiln.KilnError, match="dimension 2 is 30.*not dynamic") as info:
        compiled(torch.randn(2, 1, 30, 32))
    assert "dynamic={'x': {2: 'name'}}" in str(info.value)
    with pytest.raises(kiln.KilnError, match="has 3 dimensions"):
        compiled(torch.randn(2, 32, 32))
    with pytest.raises(kiln.KilnError, match="takes 1 <= batch <= "):
        compiled(torch.randn(0, 1, 32, 32))


class TwoInputs(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * 2 + b


def test_dimensions_with_one_name_must_agree() -> None:
    model = TwoInputs().eval()
    x = (torch.randn(2, 4), torch.randn(2, 4))
    compiled = kiln.compile(model, x, dynamic={"a": {0: "n"}, "b": {0: "n"}})
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    assert_matches(compiled(a, b), model(a, b))
    with pytest.raises(kiln.KilnError, match="must be equal"):
        compiled(torch.randn(5, 4), torch.randn(3, 4))


@pytest.mark.parametrize(("spec", "message"), [
    ({"c": {0: "n"}}, "does not take"), ({0: {2: "n"}}, "not one of its 2 dimensions"),
    ({0: {0: "not a name"}}, "needs a name"), ({0: [0]}, "map dimensions"), ({}, "non-empty"),
    ("batch", "must be True"),
])
def test_bad_dynamic_specs_are_kiln_errors(spec, message) -> None:
    with pytest.raises(kiln.KilnError, match=message):
        kiln.compile(TwoInputs().eval(), (torch.randn(2, 4), torch.randn(2, 4)), dynamic=spec)


def test_export_dims_name_and_bound_the_sizes_through_the_export_frontend() -> None:
    model = TwoInputs().eval()
    x = (torch.randn(2, 4), torch.randn(2, 4))
    n = torch.export.Dim("n", min=2, max=6)
    compiled = kiln.compile(model, x, frontend="export",
                            dynamic={"a": {0: n}, "b": {0: torch.export.Dim("n", max=5)}})
    assert compiled.bounds == {"n": (2, 5)}          # one name: the bounds meet
    for rows in (2, 5, 3):
        a, b = torch.randn(rows, 4), torch.randn(rows, 4)
        assert_matches(compiled(a, b), model(a, b))
    with pytest.raises(kiln.KilnError, match="takes 2 <= n <= 5"):
        compiled(torch.randn(6, 4), torch.randn(6, 4))
    with pytest.raises(kiln.KilnError, match="takes 2 <= n <= 5"):
        compiled(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(kiln.KilnError, match=r"is 2 in the example inputs, outside its bounds 3"):
        kiln.compile(model, x, dynamic={"a": {0: torch.export.Dim("m", min=3)}})


def test_dynamic_with_tuning_is_refused_clearly() -> None:
    model, inputs = get_model("mlp")
    with pytest.raises(kiln.KilnError, match="does not combine with tuning"):
        kiln.compile(model, inputs, dynamic=True, tune=True)


def test_least_recently_used_sizes_are_dropped(monkeypatch) -> None:
    monkeypatch.setattr(dyn, "MAX_SPECIALIZATIONS", 2)
    model, inputs = get_model("mlp")
    compiled = kiln.compile(model, inputs, dynamic=True)
    for batch in (2, 3, 4, 2):
        x = torch.randn(batch, inputs[0].shape[1])
        with torch.no_grad():
            assert_matches(compiled(x), model(x))
    assert sorted(compiled._programs) == [(2,), (4,)]


def test_threads_calling_with_different_sizes_get_their_answers() -> None:
    model, inputs = get_model("mlp")
    compiled = kiln.compile(model, inputs, dynamic=True)
    xs = {b: torch.randn(b, inputs[0].shape[1]) for b in (1, 2, 5, 7)}
    with torch.no_grad():
        want = {b: model(x).numpy() for b, x in xs.items()}
    wrong = []

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(40):
            b = int(rng.choice(list(xs)))
            if not np.array_equal(np.asarray(compiled(xs[b])), want[b]) and not np.allclose(
                    np.asarray(compiled(xs[b])), want[b], rtol=1e-5, atol=1e-6):
                wrong.append(b)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


# ---- torch.compile ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "bert", "gpt2_block"])
def test_torch_compile_survives_changing_batch_sizes(name) -> None:
    torch._dynamo.reset()
    model, inputs = get_model(name)
    fast = torch.compile(model, backend="kiln")
    for batch in (1, 3, 8, 3):
        xb = tuple(torch.cat([t] * batch) for t in inputs)
        with torch.no_grad():
            assert_matches(fast(*xb), model(*xb))
    torch._dynamo.reset()


def test_torch_compile_with_dynamic_sequence_length() -> None:
    torch._dynamo.reset()
    model, inputs = get_model("bert")
    fast = torch.compile(model, backend="kiln", dynamic=True)
    for seq in (32, 16, 9):
        ids = inputs[0][:, :seq]
        with torch.no_grad():
            assert_matches(fast(ids), model(ids))
    torch._dynamo.reset()


def test_torch_compile_runs_new_batch_sizes_on_row_slices() -> None:
    # Dynamo's symbolic graph runs as a DynamicModel: a batch size never seen runs on
    # power-of-two programs (13 = 8 + 4 + 1) instead of a compile of its own.
    torch._dynamo.reset()
    model, inputs = get_model("lenet5")
    fast = torch.compile(model, backend="kiln")
    gen = torch.Generator().manual_seed(4)
    for batch in (1, 3, 8, 5, 13):
        x = torch.randn((batch, *inputs[0].shape[1:]), generator=gen)
        with torch.no_grad():
            assert_matches(fast(x), model(x))
    models = [m for m in list(dyn._LIVE) if any(n.startswith("s") for d in m.dims.values()
                                                  for n in d.values())]
    assert models, "the Dynamo graph did not run as a DynamicModel"
    sizes = {k[0] for m in models for k in m._programs}
    assert 13 not in sizes and 5 not in sizes and {8, 4, 1} <= sizes, sizes
    torch._dynamo.reset()
