"""Data-parallel serving of a kiln-compiled zoo model on Ray: replicas of the whole model
behind one callable, each request sent to the least-loaded replica.

    python examples/serve.py [--model resnet18_cifar] [--replicas 2] [--requests 64]

The replicas are ``kiln.pipeline(model, x, stages=1, replicas=N)``: N Ray actors, each holding
the model compiled by kiln (llvm, one thread). The example sends requests one at a time (the
latency of a single request) and then as a stream (throughput, requests overlapped across the
replicas, a few per actor call: the batch column), for one replica and for N, checks every
answer against eager PyTorch, and prints the table. This is plain Ray; Ray Serve
(``pip install 'ray[serve]'``) would put HTTP ingress and autoscaling in front of the same
compiled model, and is not needed here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import kiln
from kiln.zoo import ZOO, get_model


def _requests(example: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``count`` seeded random inputs shaped like ``example``."""
    return [torch.randn(example.shape, generator=torch.Generator().manual_seed(i))
            for i in range(count)]


def serve(model: torch.nn.Module, example: torch.Tensor, replicas: int,
          requests: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Serve ``requests`` on ``replicas`` replicas: one at a time, then streamed. Returns the
    latencies (ms), the streamed throughput and the largest difference from eager."""
    with torch.no_grad():
        expected = [model(x).numpy() for x in requests]
    t0 = time.perf_counter()
    with kiln.pipeline(model, (example,), stages=1, replicas=replicas,
                       threads_per_stage=1) as pipe:
        start_s = time.perf_counter() - t0
        pipe(example)                                     # warm every code path once
        latencies, diffs = [], []
        for x, want in zip(requests, expected):
            t = time.perf_counter()
            got = pipe(x)
            latencies.append((time.perf_counter() - t) * 1e3)
            diffs.append(float(np.abs(got - want).max()))
        batch = pipe.batch_size(len(requests))            # what map sends per actor call
        t = time.perf_counter()
        streamed = list(pipe.map(requests))
        seconds = time.perf_counter() - t
    diffs += [float(np.abs(got - want).max()) for got, want in zip(streamed, expected)]
    latencies.sort()
    return {"replicas": replicas, "start_s": start_s,
            "p50_ms": statistics.median(latencies),
            "p95_ms": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "throughput": len(streamed) / seconds, "answered": len(streamed), "batch": batch,
            "max_diff": max(diffs)}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the example (``argv``: the command line without the program name); returns one
    row per replica count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_cifar", choices=sorted(ZOO))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--address", default=None,
                        help="a Ray cluster to join (default: start a local one)")
    args = parser.parse_args(argv)

    import ray

    torch.set_num_threads(1)
    model, (example,) = get_model(args.model)
    requests = _requests(example, args.requests)
    # One Ray session for both runs (kiln.pipeline would start and stop one per pipeline).
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster: loopback only
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    try:
        rows = [serve(model, example, n, requests) for n in sorted({1, args.replicas})]
    finally:
        if started:
            ray.shutdown()
    print(f"{args.model}: {args.requests} requests, kiln llvm, one thread per replica")
    print(f"{'replicas':>8} {'start s':>8} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>8} "
          f"{'batch':>6} {'max|diff|':>10}")
    for r in rows:
        print(f"{r['replicas']:>8} {r['start_s']:>8.2f} {r['p50_ms']:>8.3f} {r['p95_ms']:>8.3f} "
              f"{r['throughput']:>8.1f} {r['batch']:>6} {r['max_diff']:>10.2e}")
    if len(rows) > 1:
        gain = rows[-1]["throughput"] / rows[0]["throughput"]
        print(f"{rows[-1]['replicas']} replicas serve {gain:.2f}x the requests per second of one")
    bad = [r for r in rows if not r["max_diff"] <= 1e-4 or r["answered"] != args.requests]
    if bad:
        raise SystemExit(f"answers differ from eager PyTorch: {bad}")
    return rows


if __name__ == "__main__":
    main()
