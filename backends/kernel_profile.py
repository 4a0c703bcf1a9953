"""The per-kernel profile record every backend with a profiler returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KernelProfile:
    """One kiln kernel's share of an inference (on the GPU: all its launches together)."""

    kernel: str
    root: str
    op: str
    seconds: float
    flops: int
    bytes: int

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def gbytes(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
