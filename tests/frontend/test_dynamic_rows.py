"""Dynamic batch sizes on power-of-two programs: a call of 13 rows runs as 8 + 4 + 1 when the
model's symbolic graph shows its rows never meet (DynamicModel.split_rows)."""

from __future__ import annotations

import threading

import pytest
import torch

import kiln
from kiln.zoo import get_model


def _sizes(model) -> list[int]:
    return sorted(k[0] for k in model._programs)


def _call_from_threads(compiled, orders: list[list[tuple]]) -> None:
    """One thread per order, each calling ``compiled`` on its (inputs, eager answer) pairs;
    fails on a wrong answer or a thread still running after 300 s."""
    errors: list[BaseException] = []

    def worker(order: list[tuple]) -> None:
        try:
            for xs, want in order:
                torch.testing.assert_close(compiled(xs), want, rtol=1e-4, atol=1e-4)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(o,)) for o in orders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors[0]


def test_odd_batch_runs_on_power_of_two_programs() -> None:
    model, (x,) = get_model("lenet5")
    compiled = kiln.compile(model, (x,), dynamic=True)
    assert compiled.rows[0] == "batch", compiled.rows
    gen = torch.Generator().manual_seed(0)
    for n in (13, 3, 8, 5, 1):
        xs = torch.randn((n, *x.shape[1:]), generator=gen)
        with torch.no_grad():
            want = model(xs)
        got = compiled(xs)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # 13 = 8 + 4 + 1, 3 = 2 + 1, 5 = 4 + 1: nothing compiled but powers of two.
    assert _sizes(compiled) == [1, 2, 4, 8]
    # Numbers as in a program compiled for that size.
    x13 = torch.randn((13, *x.shape[1:]), generator=gen)
    exact = kiln.compile(model, (x13,))
    torch.testing.assert_close(compiled(x13), exact(x13), rtol=1e-5, atol=1e-6)


class _Centred(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x - x.mean(0, keepdim=True))      # the rows meet


class _TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x, y):
        return self.fc(x).softmax(-1), (x * y).sum(-1)


def test_model_whose_rows_meet_compiles_each_size() -> None:
    model = _Centred().eval()
    compiled = kiln.compile(model, (torch.randn(4, 5),), dynamic=True)
    name, why = compiled.rows
    assert name is None and ("mean" in why or "reduce" in why), why
    x = torch.randn(3, 5)
    torch.testing.assert_close(compiled(x), model(x))
    assert _sizes(compiled) == [3, 4]


def test_split_rows_off_compiles_each_size_and_nested_outputs_join() -> None:
    model = _TwoOutputs().eval()
    compiled = kiln.compile(model, (torch.randn(2, 6), torch.randn(2, 6)), dynamic=True)
    x, y = torch.randn(7, 6), torch.randn(7, 6)
    got = compiled(x, y)
    with torch.no_grad():
        want = model(x, y)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert _sizes(compiled) == [1, 2, 4]
    compiled.split_rows = False
    torch.testing.assert_close(compiled(x, y)[0], want[0], rtol=1e-5, atol=1e-5)
    assert _sizes(compiled) == [1, 2, 4, 7]


def test_bounds_that_exclude_small_parts_compile_the_size() -> None:
    model = _TwoOutputs().eval()
    batch = torch.export.Dim("batch", min=4, max=64)
    compiled = kiln.compile(model, (torch.randn(4, 6), torch.randn(4, 6)),
                            dynamic={0: {0: batch}, 1: {0: batch}})
    x = torch.randn(5, 6)                                   # 4 + 1: 1 is out of bounds
    torch.testing.assert_close(compiled(x, x)[1], model(x, x)[1])
    assert _sizes(compiled) == [4, 5]


def test_threads_calling_odd_sizes_get_their_own_rows() -> None:
    model, (x,) = get_model("mlp")
    compiled = kiln.compile(model, (x,), dynamic=True)
    # Eager answers first: torch.fx tracing (a compile in another thread) patches
    # nn.Module.__call__ process-wide, so eager calls must not overlap a trace.
    orders = []
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        order = []
        for n in (3, 5, 6, 7, 9):
            xs = torch.randn((n, *x.shape[1:]), generator=gen)
            with torch.no_grad():
                order.append((xs, model(xs)))
        orders.append(order)
    _call_from_threads(compiled, orders)
    assert all(n & (n - 1) == 0 for n in _sizes(compiled))


@pytest.mark.parametrize("length", [16, 100])
def test_bert_odd_batch_at_a_length(length: int) -> None:
    model, (ids,) = get_model("bert")
    seq = torch.export.Dim("seq", max=128)
    compiled = kiln.compile(model, (ids,), dynamic={0: {0: "batch", 1: seq}})
    assert compiled.rows[0] == "batch", compiled.rows
    x = torch.randint(0, 1000, (3, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        want = model(x)
    got = compiled(x)
    assert (got - want).abs().max() <= 1e-4 * max(want.abs().max(), 1)
    assert {(1, length), (2, length)} <= set(compiled._programs)
    assert (3, length) not in compiled._programs


def test_hot_row_count_gets_its_own_program_in_the_background() -> None:
    model, (x,) = get_model("lenet5")
    compiled = kiln.compile(model, (x,), dynamic=True)
    compiled.compile_hot = 3
    x5 = torch.randn((5, *x.shape[1:]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x5)
    for _ in range(3):
        torch.testing.assert_close(compiled(x5), want, rtol=1e-4, atol=1e-4)
    assert compiled.wait_compiles(timeout=300)
    assert 5 in _sizes(compiled)
    torch.testing.assert_close(compiled(x5), want, rtol=1e-4, atol=1e-4)
    # Never with compile_hot = 0.
    compiled.compile_hot = 0
    x6 = x5[:3].repeat(2, 1, 1, 1)
    for _ in range(5):
        compiled(x6)
    assert compiled.wait_compiles(timeout=1) and 6 not in _sizes(compiled)


def _child(compiled, x, want, queue) -> None:
    try:
        # 7 rows on row slices, and 14 rows, which compiles programs in the child: the
        # parent's background compile may have held the compile lock at the fork.
        ok = torch.allclose(compiled(x), want, rtol=1e-4, atol=1e-4)
        ok &= torch.allclose(compiled(torch.cat([x, x]))[7:], want, rtol=1e-4, atol=1e-4)
        queue.put(bool(ok))
    except BaseException as e:  # noqa: BLE001 (reported to the parent)
        queue.put(repr(e))


def test_forked_child_serves_odd_sizes_while_the_parent_compiles() -> None:
    import multiprocessing as mp

    model, (x,) = get_model("mlp")
    compiled = kiln.compile(model, (x,), dynamic=True)
    compiled.compile_hot = 1
    x7 = torch.randn((7, *x.shape[1:]), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(x7)
    compiled(x7)                       # starts a background compile of 7 rows
    assert compiled.wait_compiles(timeout=300)
    # Fork while another thread is inside a compile (holds the compile lock), as a server
    # forking workers while a hot size compiles would.
    inside, release = threading.Event(), threading.Event()

    def compiling() -> None:
        with compiled._compiling:
            inside.set()
            release.wait(60)

    holder = threading.Thread(target=compiling)
    holder.start()
    assert inside.wait(60)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(compiled, x7, want, queue))
    child.start()
    release.set()
    holder.join()
    try:
        result = queue.get(timeout=60)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert result is True, result


def test_dynamic_quantization_keeps_rows_together() -> None:
    # Dynamic int8 quantizes each call's input with one scale from all its rows: a call of 3
    # rows must not run as 2 + 1 (other scales, other answers).
    model, (x,) = get_model("mlp")
    compiled = kiln.compile(model, (x,), quantize={"mode": "dynamic"}, dynamic=True)
    name, why = compiled.rows
    assert name is None and "one scale" in why, why
    x3 = torch.randn((3, *x.shape[1:]), generator=torch.Generator().manual_seed(1))
    x3[0] *= 50                                   # one row sets the scale of all three
    exact = kiln.compile(model, (x3,), quantize={"mode": "dynamic"})
    torch.testing.assert_close(compiled(x3), exact(x3))
    assert 3 in _sizes(compiled)


def test_threads_with_hot_sizes_compiling_in_the_background_get_their_answers() -> None:
    model, (x,) = get_model("mlp")
    compiled = kiln.compile(model, (x,), dynamic=True)
    compiled.compile_hot = 2             # sizes turn hot while other threads call them
    gen = torch.Generator().manual_seed(11)
    cases = []
    for n in (3, 5, 6, 7, 9, 11):
        xs = torch.randn((n, *x.shape[1:]), generator=gen)
        with torch.no_grad():
            cases.append((xs, model(xs)))
    _call_from_threads(compiled, [(cases * 3)[s:] + (cases * 3)[:s] for s in range(4)])
    assert compiled.wait_compiles(timeout=300)
    assert {3, 5, 6, 7, 9, 11} <= set(_sizes(compiled))      # every size turned hot
