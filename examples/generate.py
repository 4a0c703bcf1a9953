"""Greedy autoregressive decoding with a KV cache: kiln against eager PyTorch and torch.compile.

    python examples/generate.py                       # GPT-2 small shape, batch 1 and 8
    python examples/generate.py --batches 1 --steps 64 --prompt 16 --skip torch.compile
    python examples/generate.py --config tiny --steps 8   # a few seconds: a smoke test
    python examples/generate.py --batches 1 --skip torch.compile --profile

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
the prompt; median of ``--repeat`` runs, the runtimes' runs interleaved so that a change in
the machine's load reaches them alike), the prompt's latency, the one-off compile time, and
whether kiln's and torch.compile's tokens equal eager's exactly. "first s" is the first
generation's seconds, compiles included (kiln's disk cache makes a second process's first run
a load). ``--profile`` adds where a kiln decode step's time goes: the generation loop's Python,
the runtime call, and the kernels by kind with the bandwidth they reach.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

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
        self._caches: dict[tuple[int, int], np.ndarray] = {}

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

    def _buffers(self, batch: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
        """The caches ``(2L, B, H, cap, Dh)`` and the mask ``(B, 1, 1, cap)`` for a generation,
        the mask all empty. The caches are kept from one generation to the next (at batch 8 a
        generation would otherwise allocate and fault in 110 MB of them): slots the mask hides
        may hold an earlier generation's keys and values, which get a softmax weight of exactly
        0, as zeros would."""
        cfg = self.cfg
        caches = self._caches.get((batch, cap))
        if caches is None:
            caches = np.zeros((2 * cfg.n_layer, batch, cfg.n_head, cap, cfg.d_head), np.float32)
            self._caches[(batch, cap)] = caches
        return caches, np.full((batch, 1, 1, cap), np.finfo(np.float32).min, np.float32)

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
        caches, mask = self._buffers(b, cap)
        caches[0::2, :, :, :t] = keys
        caches[1::2, :, :, :t] = values
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
                grown, mask = self._buffers(b, cap2)
                grown[:, :, :, :cap] = caches
                mask[..., :cap] = 0.0
                caches, cap = grown, cap2
            logits, new_k, new_v = self._run_step(
                tok[:, None], np.full((b, 1), pos, np.int64), mask, caches)
            caches[0::2, :, :, pos] = new_k[:, :, :, 0]
            caches[1::2, :, :, pos] = new_v[:, :, :, 0]
            mask[..., pos] = 0.0
        return out, prompt_s


def kiln_compile(threads: int, quantize: Any = None) -> Callable:
    """kiln.compile with the varying dimensions declared dynamic (one program per size);
    ``quantize``: kiln.compile's option (``{"mode": "fp16"}`` for --fp16)."""
    def compile_fn(module, args, dynamic):
        return kiln.compile(module, args, dynamic=dynamic, threads=threads, quantize=quantize)
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


def measure(runs: dict[str, Callable[[], tuple[np.ndarray, float]]], repeat: int, steps: int,
            batch: int) -> dict[str, tuple[np.ndarray, float, float]]:
    """{name: (tokens, tokens/s median, prompt ms median)} over ``repeat`` timed runs of each,
    interleaved (one run of every runtime per round, the order rotating each round) so that a
    change in the machine's load reaches every runtime alike."""
    names = list(runs)
    rates: dict[str, list[float]] = {n: [] for n in names}
    prompts: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, np.ndarray] = {}
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            tokens[name], prompt_s = runs[name]()
            total = time.perf_counter() - t0
            rates[name].append(batch * (steps - 1) / max(total - prompt_s, 1e-9))
            prompts[name].append(prompt_s * 1e3)
    return {n: (tokens[n], statistics.median(rates[n]), statistics.median(prompts[n]))
            for n in names}


def profile_decode(gen: CachedGenerator, prompt: np.ndarray, steps: int,
                   repeat: int = 10) -> list[str]:
    """Where one kiln decode step's time goes, as printable lines. Each step of one generation
    is split three ways: the kernels (the program's own cycle counters, read around that very
    call), the rest of the runtime call (argument checks, output arrays, handing the call to
    the thread pool), and the generation loop outside the call (argmax, cache writes, Python);
    medians over the steps. Then kiln's per-kernel profile of the step program (at the last
    step's capacity), grouped by what the kernels do, with the bandwidth each group reaches."""
    from kiln.backends.llvm.compiler import cycles_per_second

    per_cycle = 1.0 / cycles_per_second()
    if gen._step is None:
        gen.generate(prompt, steps)    # compiles the programs: not part of a step's time
    calls: list[tuple[float, float]] = []   # (call seconds, kernel seconds)
    last: list = []
    run_step = gen._run_step

    def timed(*args):
        last[:] = args
        counters = gen._step.specialize(*args).executable.program._cycles()
        c0 = int(counters.sum())
        t0 = time.perf_counter()
        out = run_step(*args)
        calls.append((time.perf_counter() - t0, (int(counters.sum()) - c0) * per_cycle))
        return out

    gen._run_step = timed
    try:
        t0 = time.perf_counter()
        _, prompt_s = gen.generate(prompt, steps)
        loop_s = (time.perf_counter() - t0 - prompt_s) / (steps - 1)
    finally:
        del gen._run_step
    call_s = statistics.median(c for c, _ in calls)
    kernel_s = statistics.median(k for _, k in calls)
    handoff_s = statistics.median(c - k for c, k in calls)
    outside_s = loop_s - statistics.mean(c for c, _ in calls)
    kernels = gen._step.specialize(*last).profile(*last, repeat=repeat)
    groups: dict[str, list] = {}
    for k in kernels:
        if k.op == "linear":
            what = "lm head" if k.bytes >= 50e6 else "block linears"
        else:
            what = {"matmul": "attention matmuls"}.get(k.op, "other kernels")
        groups.setdefault(what, []).append(k)
    total = sum(k.seconds for k in kernels)
    lines = [f"decode step: {loop_s * 1e3:.2f} ms per step in the loop (mean); medians per "
             f"call: runtime call {call_s * 1e3:.2f} ms, its kernels {kernel_s * 1e3:.2f} ms",
             f"  inside the call, outside the kernels (checks, outputs, thread handoff): "
             f"{handoff_s * 1e3:.3f} ms",
             f"  outside the call (argmax, cache writes, Python; mean): {outside_s * 1e3:.3f} ms",
             f"  kernels at capacity {last[3].shape[3]} ({len(kernels)}, median of {repeat} "
             f"runs: {total * 1e3:.2f} ms):"]
    for what, ks in sorted(groups.items(), key=lambda kv: -sum(k.seconds for k in kv[1])):
        sec = sum(k.seconds for k in ks)
        line = (f"    {what:<18}{len(ks):>4} kernels {sec * 1e3:8.2f} ms "
                f"{100 * sec / max(total, 1e-12):5.1f}%")
        if what in ("lm head", "block linears"):
            # A linear reads its weight once: bytes over time is the bandwidth it reaches
            # (other kernels' byte counts take whole inputs, the caches, for each).
            mb = sum(k.bytes for k in ks) / 1e6
            line += f" {mb:8.1f} MB {mb / 1e3 / max(sec, 1e-12):6.1f} GB/s"
        lines.append(line)
    return lines


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
    ap.add_argument("--fp16", action="store_true",
                    help="also run kiln with half-precision weights (quantize={'mode': 'fp16'}:"
                         " half the bytes a step streams; lossy, so its tokens may part from "
                         "eager's: the table says after how many steps)")
    ap.add_argument("--profile", action="store_true",
                    help="also print where a kiln decode step's time goes")
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
        runs: dict[str, Callable[[], tuple[np.ndarray, float]]] = {}
        first_s: dict[str, float] = {}
        if "eager" not in args.skip:
            eager_generate(decoder, prompt, 2)                   # warm-up
            runs["eager"] = lambda p=prompt: eager_generate(decoder, p, args.steps)
            first_s["eager"] = 0.0
        gens = {"kiln": CachedGenerator(decoder, kiln_compile(args.threads), numpy_io=True)}
        if args.fp16:
            gens["kiln fp16"] = CachedGenerator(
                decoder, kiln_compile(args.threads, {"mode": "fp16"}), numpy_io=True)
        if "torch.compile" not in args.skip:
            gens["torch.compile"] = CachedGenerator(decoder, torch_compile, numpy_io=False)
        for name, gen in gens.items():
            t0 = time.perf_counter()
            gen.generate(prompt, args.steps)          # compiles every capacity this run uses
            first_s[name] = time.perf_counter() - t0
            runs[name] = lambda g=gen, p=prompt: g.generate(p, args.steps)
        results = measure(runs, args.repeat, args.steps, batch)
        eager_tokens, eager_rate = results.get("eager", (None, None, None))[:2]
        for name, (tokens, rate, prompt_ms) in results.items():
            if name == "eager":
                same = "reference"
            elif eager_tokens is None:
                same = "n/a"
            elif np.array_equal(tokens, eager_tokens):
                same = "same as eager"
            elif name == "kiln fp16":   # lossy by request: how far it follows eager
                steps = (tokens != eager_tokens).argmax(axis=1)
                steps[(tokens == eager_tokens).all(axis=1)] = tokens.shape[1]
                same = (f"same as eager for the first {int(steps.min())} of {tokens.shape[1]} "
                        f"tokens (fp16 weights)")
            else:
                diff = np.argwhere(tokens != eager_tokens)[0]
                same = f"DIFFER from eager (sequence {diff[0]}, step {diff[1]})"
                if name == "kiln":
                    status = 1
            ratio = f"{rate / eager_rate:.2f}x" if eager_rate else "n/a"
            print(f"{batch:>5}  {name:<14}{rate:>10.1f}{ratio:>10}{prompt_ms:>11.1f}"
                  f"{first_s[name]:>9.1f}  {same}")
        if args.profile:
            for line in profile_decode(gens["kiln"], prompt, args.steps):
                print(f"{batch:>5}  {line}")
        print(f"       (load average {os.getloadavg()[0]:.2f})")
    return status


if __name__ == "__main__":
    sys.exit(main())
