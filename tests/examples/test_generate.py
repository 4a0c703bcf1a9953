"""Greedy decoding with a KV cache (examples/generate.py): kiln's prefill and decode-step
programs give eager PyTorch's tokens, including across a cache capacity change, and each
program matches its eager module numerically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import kiln
from kiln.examples.generate import (
    CachedGenerator,
    capacity_for,
    kiln_compile,
    measure,
    profile_decode,
)
from kiln.zoo.gpt2_decoder import (
    TINY,
    DecodeStep,
    EagerGenerator,
    Prefill,
    build_decoder,
)

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "generate.py"


def assert_close(got, want, atol=1e-5) -> None:
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w.detach().numpy(), atol=atol, rtol=1e-5)


def test_capacity_doubles_from_64_and_stops_at_the_position_table() -> None:
    assert [capacity_for(n, 1024) for n in (1, 64, 65, 129, 1000)] == [64, 64, 128, 256, 1024]
    assert capacity_for(200, 160) == 160


def test_prefill_and_decode_step_match_eager_modules() -> None:
    decoder = build_decoder(TINY, seed=1)
    b, t, cap = 2, 7, 64
    ids = torch.randint(0, TINY.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(t).repeat(b, 1)
    prefill = Prefill(decoder).eval()
    want = prefill(ids, pos)
    assert_close(kiln.compile(prefill, (ids, pos))(ids, pos), want)

    caches = torch.randn(2 * TINY.n_layer, b, TINY.n_head, cap, TINY.d_head)
    mask = torch.full((b, 1, 1, cap), torch.finfo(torch.float32).min)
    mask[..., :t] = 0
    args = (torch.tensor([[3], [5]]), torch.full((b, 1), t), mask, caches)
    step = DecodeStep(decoder).eval()
    assert_close(kiln.compile(step, args)(*args), step(*args))


def test_kiln_decoding_gives_eager_tokens_across_a_capacity_change() -> None:
    decoder = build_decoder(TINY, seed=0)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, TINY.vocab_size, (3, 9), dtype=np.int64)
    steps = 64            # 9 + 63 fed tokens: the caches grow from 64 to 128 slots
    want = EagerGenerator(decoder).generate(torch.from_numpy(prompt), steps).numpy()
    gen = CachedGenerator(decoder, kiln_compile(threads=0), numpy_io=True)
    tokens, _ = gen.generate(prompt, steps)
    np.testing.assert_array_equal(tokens, want)
    # One program per capacity, not per step: 64 and 128.
    assert sorted(k[0] for k in gen._step._programs) == [64, 128]
    # A second generation reuses the caches, an earlier generation's keys still in the slots
    # the mask hides: the tokens are still eager's.
    prompt2 = rng.integers(0, TINY.vocab_size, (3, 4), dtype=np.int64)
    want2 = EagerGenerator(decoder).generate(torch.from_numpy(prompt2), steps).numpy()
    np.testing.assert_array_equal(gen.generate(prompt2, steps)[0], want2)


def test_script_smoke_run_reports_same_tokens() -> None:
    cmd = [sys.executable, str(SCRIPT), "--config", "tiny", "--batches", "2", "--steps", "6",
           "--repeat", "1", "--skip", "torch.compile", "--fp16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kiln_row = next(line for line in proc.stdout.splitlines() if " kiln " in line)
    assert "same as eager" in kiln_row, proc.stdout
    # Half-precision weights: a row of its own that says how far it follows eager.
    half_row = next(line for line in proc.stdout.splitlines() if " kiln fp16 " in line)
    assert "same as eager" in half_row, proc.stdout


def test_measure_interleaves_the_runtimes_and_rotates_their_order() -> None:
    order: list[str] = []

    def run(name):
        def go():
            order.append(name)
            return np.array([[len(name)]]), 0.0
        return go

    out = measure({"a": run("a"), "bb": run("bb"), "ccc": run("ccc")}, 3, steps=5, batch=2)
    assert order == ["a", "bb", "ccc", "bb", "ccc", "a", "ccc", "a", "bb"]
    assert [int(out[n][0][0, 0]) for n in ("a", "bb", "ccc")] == [1, 2, 3]
    assert all(rate > 0 for _, rate, _ in out.values())


def test_profile_decode_splits_a_step_into_loop_call_and_kernels() -> None:
    decoder = build_decoder(TINY, seed=0)
    prompt = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 5), dtype=np.int64)
    gen = CachedGenerator(decoder, kiln_compile(threads=1), numpy_io=True)
    lines = profile_decode(gen, prompt, steps=6, repeat=2)
    assert lines[0].startswith("decode step:")
    assert "outside the kernels" in lines[1] and "outside the call" in lines[2]
    assert "capacity 64" in lines[3]
    assert any("block linears" in line and "GB/s" in line for line in lines[4:])
    # The generator is left as it was: its step method is the class's again.
    assert "_run_step" not in vars(gen)
