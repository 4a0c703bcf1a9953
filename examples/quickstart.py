"""Compile a zoo model with kiln and compare it with eager PyTorch: speed-up and accuracy.

    python examples/quickstart.py [--model resnet18_cifar] [--backend reference]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import kiln
from kiln.backends import backend_names
from kiln.zoo import ZOO, get_model


def median_ms(fn, inputs, repeat: int) -> float:
    """Median wall time of ``fn(*inputs)`` in milliseconds, after one warm-up call."""
    fn(*inputs)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_cifar", choices=sorted(ZOO))
    parser.add_argument("--backend", default="llvm", choices=backend_names())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, inputs = get_model(args.model, batch=args.batch)
    t0 = time.perf_counter()
    compiled = kiln.compile(model, inputs, backend=args.backend, threads=args.threads)
    compile_s = time.perf_counter() - t0

    with torch.no_grad():
        expected = model(*inputs)
        got = compiled(*inputs)
        eager_ms = median_ms(model, inputs, args.repeat)
    kiln_ms = median_ms(compiled, inputs, args.repeat)

    err = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item() if got.ndim == 2 else 1.0
    print(f"model          {args.model} (batch {args.batch}), "
          f"{len(compiled.source_graph.nodes)} -> {len(compiled.graph.nodes)} nodes")
    print(f"backend        {args.backend}, compiled in {compile_s:.2f} s")
    print(f"eager PyTorch  {eager_ms:8.2f} ms (median of {args.repeat})")
    print(f"kiln           {kiln_ms:8.2f} ms (median of {args.repeat})")
    print(f"speed-up       {eager_ms / kiln_ms:8.2f}x")
    print(f"max error      {err:.2e} of the output's max; top-1 agreement {agree:.0%}")
    ok = np.isfinite(err) and err < 1e-4
    print("accuracy       " + ("matches eager PyTorch" if ok else "MISMATCH"))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
