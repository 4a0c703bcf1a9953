"""The compile cache: a second compile loads the stored program; damaged entries are refused."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import kiln
from kiln.examples.models import get_model


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> pathlib.Path:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KILN_CACHE", raising=False)
    return tmp_path


def _compile(name="lenet5"):
    model, inputs = get_model(name)
    return model, inputs, kiln.compile(model, inputs, threads=1)


def test_second_compile_loads_the_cached_program(cache_dir) -> None:
    model, inputs, first = _compile()
    assert "optimize" in first.executable.program.timings
    entries = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert sorted(f.name for f in entries[0].iterdir()) == ["code.o", "consts.bin",
                                                             "manifest.json"]
    _, _, second = _compile()
    assert "cache_load" in second.executable.program.timings
    assert torch.equal(first(*inputs), second(*inputs))


def test_damaged_entry_is_ignored_and_rebuilt(cache_dir) -> None:
    model, inputs, first = _compile()
    entry = next(p for p in cache_dir.iterdir() if not p.name.startswith("."))
    code = entry / "code.o"
    data = bytearray(code.read_bytes())
    data[len(data) // 2] ^= 0xFF
    code.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum of code.o"):
        _, _, second = _compile()
    assert "optimize" in second.executable.program.timings
    with torch.no_grad():
        np.testing.assert_allclose(second(*inputs).numpy(), model(*inputs).numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_cache_can_be_turned_off(cache_dir, monkeypatch) -> None:
    monkeypatch.setenv("KILN_CACHE", "0")
    _compile()
    assert not any(p for p in cache_dir.iterdir())


def test_different_weights_get_different_entries(cache_dir) -> None:
    model, inputs = get_model("mlp")
    kiln.compile(model, inputs, threads=1)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    kiln.compile(model, inputs, threads=1)
    assert len([p for p in cache_dir.iterdir() if not p.name.startswith(".")]) == 2


def test_profile_lists_every_kernel_with_its_rate() -> None:
    model, inputs = get_model("lenet5")
    compiled = kiln.compile(model, inputs, threads=1)
    rows = compiled.profile(*inputs, repeat=3)
    assert len(rows) == len(compiled.executable.program.image.steps)
    assert {r.op for r in rows} >= {"conv", "linear", "max_pool"}
    assert all(r.seconds > 0 and r.flops >= 0 for r in rows)
    assert rows == sorted(rows, key=lambda r: -r.seconds)
    with pytest.raises(kiln.KilnError, match="no per-kernel profile"):
        kiln.compile(model, inputs, backend="reference").profile(*inputs)


def test_schedule_switches_are_part_of_the_key(monkeypatch) -> None:
    """Turning a lowering switch (here Winograd) changes the key: a compile under the other
    setting is never served from the cache."""
    from kiln.backends.llvm.cache import cache_key
    from kiln.backends.llvm.compiler import host_target
    from kiln.ir import GraphBuilder, TensorType
    from kiln.passes.lower import gemm

    b = GraphBuilder("conv")
    x = b.input("x", TensorType((2, 16, 12, 12)))
    w = b.constant(np.ones((16, 16, 3, 3), np.float32), "w")
    b.output(b.op("conv", [x, w], {"padding": 1}))
    g = b.build()
    before = cache_key(g, host_target())
    monkeypatch.setattr(gemm, "WINOGRAD", 0)
    assert cache_key(g, host_target()) not in (None, before)
