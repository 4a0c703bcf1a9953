"""One graph for every size: zoo models traced at probe sizes become a graph whose dynamic
dimensions are named sizes (kiln.frontend.symbolic); specialized at sizes never traced, it
must give eager PyTorch's answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.backends.reference.interpreter import run_graph
from kiln.ir import KilnError, parse_graph, print_graph, specialize, verify
from kiln.zoo import get_model


def _check(model: torch.nn.Module, graph, inputs: tuple[torch.Tensor, ...]) -> None:
    sizes = {}
    for name, x in zip(graph.inputs, inputs):
        for want, got in zip(graph.types[name].shape, x.shape):
            if not isinstance(want, int):
                sizes[want.name] = int(got)
    static = specialize(graph, sizes)
    verify(static)
    with torch.no_grad():
        want = model(*inputs)
    got = run_graph(static, [x.numpy() for x in inputs])[0]
    want = want.numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * max(np.abs(want).max(), 1.0)


@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet18_cifar"])
def test_dynamic_batch_cnn_is_one_graph(name: str) -> None:
    model, inputs = get_model(name)
    compiled = kiln.compile(model, inputs, dynamic=True)
    graph = compiled.symbolic_graph()
    assert graph.sizes == {"batch": (1, 1 << 20)}
    assert str(graph.types[graph.inputs[0]]).startswith("f32[batch,")
    assert compiled.symbolic_graph() is graph                 # fitted once
    for batch in (1, 3, 8) if name != "resnet18_cifar" else (1, 3):
        x = torch.randn((batch, *inputs[0].shape[1:]), generator=torch.Generator().manual_seed(
            batch))
        _check(model, graph, (x,))


@pytest.mark.parametrize("name", ["bert", "gpt2_block"])
def test_dynamic_batch_and_length_transformer_is_one_graph(name: str) -> None:
    model, inputs = get_model(name)
    seq = torch.export.Dim("seq", max=128)          # the zoo models' position tables
    compiled = kiln.compile(model, inputs, dynamic={0: {0: "batch", 1: seq}})
    graph = compiled.symbolic_graph()
    assert graph.sizes == {"batch": (1, 1 << 20), "seq": (1, 128)}
    text = print_graph(graph)
    assert "i64[batch,seq]" in text
    # The position table is kept whole and sliced to the call's length.
    assert 'end={"size": "seq"}' in text
    back = parse_graph(text, constants=graph.constants)
    verify(back)
    assert print_graph(back) == text
    gen = torch.Generator().manual_seed(0)
    for batch, length in ((1, 16), (3, 100), (2, 128)):
        ids = torch.randint(0, 1000, (batch, length), generator=gen)
        _check(model, graph, (ids,))


class _Linspace(torch.nn.Module):
    def forward(self, x):          # a constant computed from the length, not a window
        return x * torch.linspace(0, 1, x.shape[1])


class _Arange(torch.nn.Module):
    def forward(self, x):          # a window of arange(max): fine when the length is bounded
        return x + torch.arange(x.shape[1], dtype=torch.float32)


def test_constant_folded_from_a_size_is_refused_by_node() -> None:
    x = torch.randn(2, 6)
    compiled = kiln.compile(_Linspace().eval(), (x,),
                            dynamic={0: {1: torch.export.Dim("n", max=64)}})
    with pytest.raises(KilnError, match="not a leading window") as e:
        compiled.symbolic_graph()
    assert e.value.node is not None and "linspace" in (e.value.source or "") + str(e.value)
    # Still callable at other sizes: each size is compiled on its own.
    y = torch.randn(2, 9)
    assert torch.allclose(compiled(y), _Linspace()(y))


def test_growing_constant_needs_a_bound() -> None:
    x = torch.randn(2, 6)
    compiled = kiln.compile(_Arange().eval(), (x,), dynamic={0: {1: "n"}})
    with pytest.raises(KilnError, match=r"bound n"):
        compiled.symbolic_graph()
    bounded = kiln.compile(_Arange().eval(), (x,),
                           dynamic={0: {1: torch.export.Dim("n", max=64)}})
    graph = bounded.symbolic_graph()
    for n in (1, 7, 64):
        _check(_Arange(), graph, (torch.randn(2, n),))


class _Expanded(torch.nn.Module):
    """HuggingFace BERT's token-type rows: a table slice expanded to the batch, which
    constant folding turns into a [batch, seq, 8] constant."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(1, 64, 8, generator=torch.Generator()
                                                  .manual_seed(3)))

    def forward(self, x):
        b, s = x.shape[:2]
        return x * self.table[:, :s].expand(b, s, 8)


def test_constant_repeated_along_a_size_is_expanded() -> None:
    model = _Expanded().eval()
    seq = torch.export.Dim("seq", max=64)
    compiled = kiln.compile(model, (torch.randn(2, 5, 8),), dynamic={0: {0: "batch", 1: seq}})
    graph = compiled.symbolic_graph()
    text = print_graph(graph)
    # The table keeps one row for the batch (no bound on it needed) and 64 positions.
    assert "const %const.table: f32[1,64,8]" in text and "= expand(%const.slice0)" in text, text
    assert compiled.rows[0] == "batch"
    for b, s in ((1, 1), (3, 17), (7, 64)):
        _check(model, graph, (torch.randn(b, s, 8),))
