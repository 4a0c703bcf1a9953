"""Measured per-node times for the partition pass: the whole graph compiled once with the llvm
backend and run under its per-kernel profiler, each kernel's time spread over the graph nodes
it computes (``kiln.passes.partition.kernel_node_seconds``).

The profile is of the whole model on one worker at the stages' thread count; a stage compiled
alone fuses the same way except at its cut, so the measured times carry over to the stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.ir import Graph
from kiln.passes.partition import kernel_node_seconds


@dataclass(frozen=True)
class NodeProfile:
    """Seconds per node of one graph, and how they were measured (for the partition report)."""

    seconds: dict[str, float]
    kernels: int
    threads: int
    repeat: int

    @property
    def total_s(self) -> float:
        """The kernels' time for one inference."""
        return sum(self.seconds.values())

    def describe(self) -> str:
        """One line: where the times come from."""
        return (f"llvm kernel profile, {self.kernels} kernels, {self.threads or 'all'} "
                f"thread(s), median of {self.repeat} runs, {self.total_s * 1e3:.3f} ms in all")


def profile_nodes(graph: Graph, inputs: Sequence[Any], threads: int = 1,
                  repeat: int = 10) -> NodeProfile:
    """Compile ``graph`` (graph passes already run) with the llvm backend on ``threads``
    threads (0: every core), profile it on ``inputs`` (arrays or tensors) ``repeat`` times,
    and return each node's share of the kernel times."""
    from kiln.runtime import Executable

    arrays = [np.ascontiguousarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
              for x in inputs]
    program = Executable(graph, "llvm", threads).program
    kernels = program.profile(arrays, repeat)
    per_root: dict[str, float] = {}
    for k in kernels:
        per_root[k.root] = per_root.get(k.root, 0.0) + k.seconds
    return NodeProfile(kernel_node_seconds(graph, per_root), len(kernels), threads, repeat)
