"""Greedy autoregressive decoding with a KV cache: kiln against eager PyTorch and torch.compile.

    python examples/generate.py                       # GPT-2 small shape, batch 1 and 8
    python examples/generate.py --batches 1 --steps 64 --prompt 16 --skip torch.compile
    python examples/generate.py --config tiny --steps 8   # a few seconds: a smoke test

The model is GPT-2 small's architecture (12 layers, d=768, 12 heads, 50257 tokens) with random
weights built from a config (``zoo/gpt2_decoder.py``; nothing is downloaded).
Generation is two programs: a prefill over the prompt, and a decode step for one token per
sequence against key/value caches of a fixed capacity. The caller writes each step's new keys
and values into the caches (NumPy arrays, no copy of the cache per step) and doubles the
capacity when the caches fill: the step is compiled once per capacity (64, 128, ... a handful of
compiles for any length), never once per step. kiln and torch.compile run the same two modules;
eager PyTorch runs what a user writes without a compiler (the cache grown with ``torch.cat``,
SDPA). Every runtime gets the same thread count.

Printed per batch size: tokens/s (generated tokens, all sequences, per second of decoding after
the prompt; median of ``--repeat`` runs), the prompt's latency, the one-off compile time, and
whether kiln's and torch.compile's tokens equal eager's exactly. "first s" is the first
generation's seconds, compiles included (kiln's disk cache makes a second process's first run
a load).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

DEFAULT_THREADS = 2
FIRST_CAPACITY = 64


def _early_threads(argv: list[str]) -> int:
    """``--threads`` read before torch loads, so every runtime sees the same count."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    return p.parse_known_args(argv)[0].threads


if __name__ == "__main__":
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(_early_threads(sys.argv[1:]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kiln  # noqa: E402
from kiln.zoo.gpt2_decoder import (  # noqa: E402
    GPT2_SMALL,
    TINY,
    DecoderConfig,
    DecodeStep,
    EagerGenerator,
    GPT2Decoder,
    Prefill,
    build_decoder,
)

CONFIGS = {"small": GPT2_SMALL, "tiny": TINY}


def capacity_for(length: int, limit: int) -> int:
    """The cache capacity for ``length`` tokens: the smallest power of two from 64 that holds
    them, capped at the model's position table."""
    cap = FIRST_CAPACITY
    while cap < length:
        cap *= 2
    return min(cap, limit)


class CachedGenerator:
    """Greedy decoding through a compiled prefill and decode step (kiln or torch.compile).

    ``compile_fn(module, example_inputs, dynamic)`` compiles a module; ``dynamic`` names the
    inputs' dimensions that vary (the prompt length; the cache capacity), for compilers that
    take it. Caches and the mask live here as NumPy arrays; each step writes one slot.
    """

    def __init__(self, decoder: GPT2Decoder, compile_fn: Callable, *, numpy_io: bool) -> None:
        self.cfg: DecoderConfig = decoder.cfg
        self.numpy_io = numpy_io
        self._compile_fn = compile_fn
        self._prefill_module = Prefill(decoder).eval()
        self._step_module = DecodeStep(decoder).eval()
        self._prefill = None
        self._step = None

    def _io(self, a: np.ndarray):
        return a if self.numpy_io else torch.from_numpy(a)

    def _run_prefill(self, prompt: np.ndarray):
        b, t = prompt.shape
        positions = np.tile(np.arange(t, dtype=np.int64), (b, 1))
        args = (self._io(prompt), self._io(positions))
        if self._prefill is None:
            self._prefill = self._compile_fn(self._prefill_module, args,
                                             {0: {1: "seq"}, 1: {1: "seq"}})
        return [np.asarray(o) for o in self._prefill(*args)]

    def _run_step(self, tokens, positions, mask, caches):
        args = (self._io(tokens), self._io(positions), self._io(mask), self._io(caches))
        if self._step is None:
            self._step = self._compile_fn(self._step_module, args, {2: {3: "ctx"}, 3: {3: "ctx"}})
        return [np.asarray(o) for o in self._step(*args)]

    def generate(self, prompt: np.ndarray, steps: int) -> tuple[np.ndarray, float]:
        """Greedy tokens ``(B, steps)`` after ``prompt``, and the prompt's seconds."""
        cfg = self.cfg
        b, t = prompt.shape
        if t + steps > cfg.n_positions:
            raise kiln.KilnError(f"prompt {t} + {steps} steps exceeds the model's "
                                 f"{cfg.n_positions} positions")
        t0 = time.perf_counter()
        logits, keys, values = self._run_prefill(prompt)
        prompt_s = time.perf_counter() - t0
        cap = capacity_for(t + 1, cfg.n_positions)
        caches = np.zeros((2 * cfg.n_layer, b, cfg.n_head, cap, cfg.d_head), np.float32)
        caches[0::2, :, :, :t] = keys
        caches[1::2, :, :, :t] = values
        mask = np.full((b, 1, 1, cap), np.finfo(np.float32).min, np.float32)
        mask[..., :t] = 0.0
        out = np.empty((b, steps), np.int64)
        for s in range(steps):
            tok = logits.argmax(-1).astype(np.int64)
            out[:, s] = tok
            if s + 1 == steps:
                break
            pos = t + s                      # the token being fed now sits at this position
            if pos >= cap:                   # caches full: double the capacity
                cap2 = capacity_for(pos + 1, cfg.n_positions)
                grown = np.zeros(caches.shape[:3] + (cap2, cfg.d_head), np.float32)
                grown[:, :, :, :cap] = caches
                caches = grown
                mask = np.concatenate(
                    [mask, np.full((b, 1, 1, cap2 - cap), np.finfo(np.float32).min, np.float32)],
                    axis=-1)
                cap = cap2
            logits, new_k, new_v = self._run_step(
                tok[:, None], np.full((b, 1), pos, np.int64), mask, caches)
            caches[0::2, :, :, pos] = new_k[:, :, :, 0]
            caches[1::2, :, :, pos] = new_v[:, :, :, 0]
            mask[..., pos] = 0.0
        return out, prompt_s


def kiln_compile(threads: int) -> Callable:
    """kiln.compile with the varying dimensions declared dynamic (one program per size)."""
    def compile_fn(module, args, dynamic):
        return kiln.compile(module, args, dynamic=dynamic, threads=threads)
    return compile_fn


def torch_compile(module, args, dynamic):
    """torch.compile (inductor) of the same module; shapes marked dynamic after a change."""
    compiled = torch.compile(module)

    def run(*a):
        with torch.no_grad():
            return compiled(*a)
    return run


def eager_generate(decoder: GPT2Decoder, prompt: np.ndarray, steps: int):
    """Eager PyTorch greedy decoding; the tokens and the prompt's seconds."""
    gen = EagerGenerator(decoder)
    t0 = time.perf_counter()
    with torch.no_grad():
        gen.step(decoder.wte(torch.from_numpy(prompt)) + decoder.wpe(
            torch.arange(prompt.shape[1])), [], causal=True)
    prompt_s = time.perf_counter() - t0
    return gen.generate(torch.from_numpy(prompt), steps).numpy(), prompt_s


def measure(run: Callable[[], tuple[np.ndarray, float]], repeat: int, steps: int, batch: int):
    """(tokens, tokens/s median, prompt ms median) over ``repeat`` timed runs."""
    rates, prompts, tokens = [], [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        tokens, prompt_s = run()
        total = time.perf_counter() - t0
        rates.append(batch * (steps - 1) / max(total - prompt_s, 1e-9))
        prompts.append(prompt_s * 1e3)
    return tokens, statistics.median(rates), statistics.median(prompts)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns 1 when kiln's tokens differ from eager's."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=16, help="prompt length")
    ap.add_argument("--steps", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--skip", nargs="*", default=[], choices=["torch.compile", "eager"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    if args.prompt < 1 or args.steps < 2 or args.prompt + args.steps > cfg.n_positions:
        ap.error(f"need prompt >= 1, steps >= 2 and prompt + steps <= {cfg.n_positions} "
                 f"(the {args.config} model's positions)")
    decoder = build_decoder(cfg, seed=args.seed)
    n_params = sum(p.numel() for p in decoder.parameters())
    print(f"decoder {args.config}: {cfg.n_layer} layers, d={cfg.d_model}, {cfg.n_head} heads, "
          f"vocabulary {cfg.vocab_size}, {n_params / 1e6:.1f}M parameters; prompt "
          f"{args.prompt}, {args.steps} greedy steps, {args.threads} threads, median of "
          f"{args.repeat}")
    rng = np.random.default_rng(args.seed)
    status = 0
    header = (f"{'batch':>5}  {'runtime':<14}{'tokens/s':>10}{'vs eager':>10}{'prompt ms':>11}"
              f"{'first s':>9}  tokens")
    print(header)
    for batch in args.batches:
        prompt = rng.integers(0, cfg.vocab_size, (batch, args.prompt), dtype=np.int64)
        rows = []
        eager_tokens, eager_rate = None, None
        if "eager" not in args.skip:
            eager_generate(decoder, prompt, 2)                   # warm-up
            eager_tokens, eager_rate, eager_prompt = measure(
                lambda p=prompt: eager_generate(decoder, p, args.steps), args.repeat, args.steps,
                batch)
            rows.append(("eager", eager_rate, eager_prompt, 0.0, "reference"))
        runtimes = [("kiln", CachedGenerator(decoder, kiln_compile(args.threads),
                                             numpy_io=True))]
        if "torch.compile" not in args.skip:
            runtimes.append(("torch.compile",
                             CachedGenerator(decoder, torch_compile, numpy_io=False)))
        for name, gen in runtimes:
            t0 = time.perf_counter()
            gen.generate(prompt, args.steps)          # compiles every capacity this run uses
            compile_s = time.perf_counter() - t0
            tokens, rate, prompt_ms = measure(lambda g=gen, p=prompt: g.generate(p, args.steps),
                                              args.repeat, args.steps, batch)
            if eager_tokens is None:
                same = "n/a"
            elif np.array_equal(tokens, eager_tokens):
                same = "same as eager"
            else:
                diff = np.argwhere(tokens != eager_tokens)[0]
                same = f"DIFFER from eager (sequence {diff[0]}, step {diff[1]})"
                if name == "kiln":
                    status = 1
            rows.append((name, rate, prompt_ms, compile_s, same))
        for name, rate, prompt_ms, compile_s, same in rows:
            ratio = f"{rate / eager_rate:.2f}x" if eager_rate else "n/a"
            print(f"{batch:>5}  {name:<14}{rate:>10.1f}{ratio:>10}{prompt_ms:>11.1f}"
                  f"{compile_s:>9.1f}  {same}")
    return status


if __name__ == "__main__":
    sys.exit(main())
