"""Which CUDA schedule each segment of a kernel gets, and their sizes.

A segment (``mapping``) is tried against the CUDA-specific schedules in order: the tiled GEMM
(``dense``), then one block per row (``reduce``); the first that recognizes its loop nest
renders it, and anything neither takes keeps the generic grid-stride mapping (``codegen``).
The choice is made on the kernel IR, so every lowering that produces the same nest shape (a
new dense op, an epilogue the fusion pass did not have before) gets the same schedule.

Sizes differ between a GPU and the simulator. The simulator runs one Python thread per CUDA
thread, one block after another, so its tuning uses small blocks that still exercise every
path of the schedules (several blocks, ragged tiles, several K steps, partial trees).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from kiln.backends.cuda.codegen import KernelSource, SegmentSchedule, render_kernel
from kiln.backends.cuda.dense import GemmTiling, render_tiled_gemm
from kiln.backends.cuda.reduce import RowTiling, render_block_reduce
from kiln.ir.kernel import Kernel


@dataclass(frozen=True)
class CudaTuning:
    """Sizes of the CUDA schedules; ``gemm`` or ``rows`` None turns that schedule off."""

    gemm: GemmTiling | None
    rows: RowTiling | None


# 16 x 16 threads with up to 4 x 4 outputs each: 64 x 64 tiles, K staged 16 at a time
# (8.3 KB of shared memory per block); 32..256 threads per row, combined by warp shuffles.
GPU_TUNING = CudaTuning(GemmTiling(threads_m=16, threads_n=16, max_micro=4, block_k=16,
                                   min_rows=16),
                        RowTiling(max_threads=256, min_threads=32, min_row=16,
                                  max_blocks=65535, warp=32))
# Every barrier costs the simulator about a millisecond and every block a set of Python
# threads, so it gets few threads with large micro-tiles (8 x 8 tiles of 2 x 2 threads) and
# long K steps; its row blocks of 8 threads run as two "warps" of 4 lanes (kiln emulates the
# shuffles in the simulator), so both stages of the shuffle combine are exercised.
SIM_TUNING = CudaTuning(GemmTiling(threads_m=2, threads_n=2, max_micro=4, block_k=16,
                                   min_rows=4),
                        RowTiling(max_threads=8, min_threads=8, min_row=16, max_blocks=2,
                                  warp=4))
GENERIC = CudaTuning(None, None)
"""No CUDA-specific schedule: every segment gets the generic mapping."""


def segment_schedules(tuning: CudaTuning) -> tuple[SegmentSchedule, ...]:
    """The schedules ``tuning`` turns on, in the order they are tried."""
    out: list[SegmentSchedule] = []
    if tuning.gemm is not None:
        out.append(functools.partial(render_tiled_gemm, tuning.gemm))
    if tuning.rows is not None:
        out.append(functools.partial(render_block_reduce, tuning.rows))
    return tuple(out)


def render_scheduled(kernel: Kernel, tuning: CudaTuning) -> KernelSource:
    """CUDA source of ``kernel`` with the schedules of ``tuning``."""
    return render_kernel(kernel, segment_schedules(tuning))
