"""``kiln profile``: per-kernel time of a compiled model, and whether each kernel is bound by
compute or by memory bandwidth on this machine."""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import kiln
from kiln.api import optimize
from kiln.debug.model_arg import load_graph
from kiln.ir import DType
from kiln.runtime import Executable

GEMM_SIZE = 1024
COPY_BYTES = 256 * 2**20
PEAK_RUNS = 5


@dataclass(frozen=True)
class Peaks:
    """Measured peaks of this machine at one thread count."""

    gflops: float       # a 1024x1024 fp32 GEMM compiled by kiln
    gbytes: float       # a large NumPy copy (bytes read + bytes written per second)

    @property
    def balance(self) -> float:
        """FLOPs per byte above which a kernel is compute-bound (the roofline's ridge)."""
        return self.gflops / self.gbytes


def _median_seconds(fn: Any, runs: int) -> float:
    fn()  # warm up: page faults, caches, thread start
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@functools.cache
def measure_peaks(threads: int = 0) -> Peaks:
    """Peak GFLOP/s (kiln's own GEMM at ``threads``) and GB/s (NumPy copy); measured once per
    thread count in a process."""
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(GEMM_SIZE, GEMM_SIZE, bias=False).eval()
    x = torch.randn(GEMM_SIZE, GEMM_SIZE, generator=gen)
    program = kiln.compile(linear, (x,), backend="llvm", threads=threads).executable.program
    a = [x.numpy()]
    gemm_s = _median_seconds(lambda: program.run(a), PEAK_RUNS)
    src = np.ones(COPY_BYTES // 8)
    dst = np.empty_like(src)
    copy_s = _median_seconds(lambda: np.copyto(dst, src), PEAK_RUNS)
    return Peaks(gflops=2 * GEMM_SIZE**3 / gemm_s / 1e9, gbytes=2 * COPY_BYTES / copy_s / 1e9)


def profile(spec: str, threads: int = 0, repeat: int = 10,
            batch: int | None = None) -> list[dict[str, Any]]:
    """Compile model ``spec`` with the llvm backend and profile it, slowest kernel first.

    Each row has ``kernel``, ``op``, ``ms`` (median over ``repeat`` runs), ``share`` (% of the
    kernels' total), ``flops``, ``bytes``, ``gflops``, ``gbytes`` (GB/s), ``intensity``
    (FLOPs per byte) and ``bound``: ``"compute"`` when the intensity is above the machine
    balance of ``measure_peaks(threads)``, else ``"memory"``.
    """
    if spec.endswith(".kiln"):
        # An exported artifact: its own code, on seeded inputs of its signature.
        loaded = kiln.load(spec, threads=threads)
        program = loaded.program
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f"
                  else np.zeros(shape, dtype) for _, dtype, shape in
                  ((n, DType(dt).numpy, s) for n, dt, s in program.image.inputs)]
    else:
        graph, arrays, _ = load_graph(spec, batch)
        graph, _ = optimize(graph, "O1")
        program = Executable(graph, "llvm", threads).program
    kernels = program.profile(arrays, repeat)
    balance = measure_peaks(threads).balance
    total = sum(k.seconds for k in kernels)
    rows = []
    for k in kernels:
        intensity = k.flops / k.bytes if k.bytes else float("inf")
        rows.append({
            "kernel": k.kernel, "op": k.op, "ms": k.seconds * 1e3,
            "share": 100 * k.seconds / total if total > 0 else 0.0,
            "flops": k.flops, "bytes": k.bytes, "gflops": k.gflops, "gbytes": k.gbytes,
            "intensity": intensity, "bound": "compute" if intensity > balance else "memory",
        })
    return rows


def format_table(rows: list[dict[str, Any]], peaks: Peaks) -> str:
    """The rows as a text table, then the totals and the measured peaks."""
    width = max([len(r["kernel"]) for r in rows] + [6])
    op_width = max([len(r["op"]) for r in rows] + [2])
    lines = [f"{'kernel':<{width}}  {'op':<{op_width}}  {'time ms':>9}  {'share %':>7}  "
             f"{'GFLOP/s':>8}  {'GB/s':>8}  bound"]
    for r in rows:
        lines.append(f"{r['kernel']:<{width}}  {r['op']:<{op_width}}  {r['ms']:>9.4f}  "
                     f"{r['share']:>7.1f}  {r['gflops']:>8.2f}  {r['gbytes']:>8.2f}  "
                     f"{r['bound']}")
    seconds = sum(r["ms"] for r in rows) / 1e3
    flops = sum(r["flops"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    rate = flops / seconds / 1e9 if seconds > 0 else 0.0
    bandwidth = nbytes / seconds / 1e9 if seconds > 0 else 0.0
    lines.append(f"{'total':<{width}}  {'':<{op_width}}  {seconds * 1e3:>9.4f}  {100.0:>7.1f}  "
                 f"{rate:>8.2f}  {bandwidth:>8.2f}")
    lines.append(f"{len(rows)} kernels, {flops / 1e6:.2f} MFLOP, {nbytes / 1e6:.2f} MB")
    lines.append(f"peaks: {peaks.gflops:.1f} GFLOP/s ({GEMM_SIZE}x{GEMM_SIZE} fp32 GEMM), "
                 f"{peaks.gbytes:.1f} GB/s (NumPy copy); compute-bound above "
                 f"{peaks.balance:.2f} FLOP/byte")
    if any(r["op"].endswith("/winograd") for r in rows):
        lines.append("conv/winograd: FLOPs and GFLOP/s are the direct convolution's (Winograd "
                     "F(4,3) does half its multiply-adds), so they can exceed the GEMM peak")
    return "\n".join(lines)
