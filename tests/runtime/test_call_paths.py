"""CompiledModel's calls: plain CPU tensors of the compiled signature take the short path;
everything else (NumPy arrays, a tensor that requires grad, a subclass of Tensor, a
non-contiguous view) takes the general one; all give eager's answers, and a wrong dtype or
shape is a KilnError on either."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kiln
from kiln.ir import KilnError


class Flagged(torch.Tensor):
    """A Tensor subclass (as some libraries pass)."""


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(3, 16)
    return model, kiln.compile(model, (x,)), x


def test_every_call_path_gives_eagers_answer(compiled, monkeypatch):
    model, c, x = compiled
    with torch.no_grad():
        want = model(x)
    calls = []
    general = type(c).__call__

    def spy(self, *args):
        calls.append(self._fast_call(args) is not None)
        return general(self, *args)

    monkeypatch.setattr(type(c), "__call__", spy)
    inputs = {
        "tensor": x,
        "requires_grad": x.clone().requires_grad_(True),
        "subclass": x.clone().as_subclass(Flagged),
        "non_contiguous": torch.randn(16, 3).t().copy_(x),
    }
    for name, arg in inputs.items():
        got = c(arg)
        assert isinstance(got, torch.Tensor), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert calls == [True, False, False, True]
    got = c(x.numpy())
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [torch.zeros(3, 16, dtype=torch.float64), torch.zeros(2, 16),
                                 torch.zeros(3, 16, dtype=torch.bfloat16)])
def test_wrong_inputs_are_kiln_errors(compiled, bad):
    _, c, _ = compiled
    assert c._fast_call((bad,)) is None
    with pytest.raises(KilnError):
        c(bad)


def test_short_path_returns_a_fresh_tensor_from_every_call(compiled):
    model, c, x = compiled
    assert c._into is not None   # this program computes its output: tensors made ahead
    results = []
    for i in range(3 * 8 + 1):   # more calls than one batch of spare outputs
        xi = x + i
        results.append((xi, c(xi)))
    assert len({r.data_ptr() for _, r in results}) == len(results)
    results[0][1].fill_(123.0)   # the caller owns what it got: no later call sees this
    for xi, got in results[1:]:
        with torch.no_grad():
            torch.testing.assert_close(got, model(xi), rtol=1e-5, atol=1e-6)


def test_short_path_from_many_threads(compiled):
    import concurrent.futures

    model, c, x = compiled
    torch.manual_seed(1)
    xs = [torch.randn(3, 16) for _ in range(64)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(c, xs))
    with torch.no_grad():
        for xi, got in zip(xs, outs):
            torch.testing.assert_close(got, model(xi), rtol=1e-5, atol=1e-6)
    assert len({o.data_ptr() for o in outs}) == len(outs)


class _Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, ids):
        return self.emb(ids), ids


def test_short_path_error_and_copied_outputs():
    torch.manual_seed(0)
    model = _Lookup().eval()
    ids = torch.tensor([[1, 2, 3]])
    c = kiln.compile(model, (ids,))
    with pytest.raises(KilnError, match="out of range"):
        c(torch.tensor([[1, 2, 10]]))
    for _ in range(3):   # after the error the calls go on, through the short path
        assert c._fast_call((ids,)) is not None
        emb, same = c(ids)
        torch.testing.assert_close(emb, model(ids)[0].detach())
        assert torch.equal(same, ids) and same.data_ptr() != ids.data_ptr()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_native_index_check_names_the_bad_index(dtype):
    """Token ids are checked by the program's native ``kiln_check`` on the short path (no
    NumPy reductions per call); a program without it (code compiled before it existed)
    checks them in NumPy. Both refuse the same ids with the same message, and negative ids
    where the op counts them from the end (take/gather) pass on both."""
    torch.manual_seed(0)
    model = _Lookup().eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=dtype)
    c = kiln.compile(model, (ids,))
    program = c.executable.program
    assert program.checks_indices and program.checks_indices_natively
    assert c._fast_call((ids,)) is not None   # the short path, by address
    for native in (True, False):
        if not native:
            program._native_check = None
        for bad, shown in (([[1, 2, 3], [4, 5, 10]], "10"), ([[-1, 2, 3], [4, 5, 6]], "-1"),
                           ([[1, 2, 3], [2**31 - 1, 5, 6]], str(2**31 - 1))):
            x = torch.tensor(bad, dtype=dtype)
            for arg in (x, x.numpy()):
                with pytest.raises(KilnError, match=rf"holds index {shown}, out of range "
                                                    r"\[0, 10\)"):
                    c(arg)
        emb, _ = c(ids)
        torch.testing.assert_close(emb, model(ids.long())[0].detach())
