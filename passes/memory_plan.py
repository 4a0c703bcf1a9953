"""Static memory planning for a lowered graph.

Every value a kernel writes lives in one of: the caller's output array (graph outputs), or the
activation arena at a fixed byte offset. Arena offsets come from liveness: a value occupies its
block from the kernel that writes it to the last kernel that reads it, and blocks of dead values
are reused (best fit). Constants, the graph's and the packed ones lowering made, are laid out
in one read-only blob.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kiln.passes.lower import LoweredGraph

ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Storage:
    """Where a value lives: kind is input, output, arena or const; ``index`` is the position
    (input/output) or the byte offset (arena/const)."""

    kind: str
    index: int


@dataclass
class MemoryPlan:
    storage: dict[str, Storage] = field(default_factory=dict)   # graph value / const binding
    arena_bytes: int = 0
    const_blob: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    # Graph outputs no kernel writes (an input or constant returned as is, or a value returned
    # twice): the runtime copies them from ``source``.
    output_copies: dict[int, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"arena {self.arena_bytes / 1e6:.2f} MB, constants "
                f"{self.const_blob.nbytes / 1e6:.2f} MB")


def plan_memory(lowered: LoweredGraph) -> MemoryPlan:
    """Assign storage to every value the kernels read or write."""
    g = lowered.graph
    plan = MemoryPlan()
    for i, name in enumerate(g.inputs):
        plan.storage[name] = Storage("input", i)
    written = {v for s in lowered.steps for v in s.writes.values()}
    for j, name in enumerate(g.outputs):
        if name in written and name not in plan.storage:
            plan.storage[name] = Storage("output", j)
        else:
            plan.output_copies[j] = name

    # Constants: one aligned blob holding everything kernels read that no kernel writes.
    chunks, offset = [], 0
    for step in lowered.steps:
        for b, v in step.reads.items():
            key = v if v in g.constants else b
            if key in plan.storage or (v not in g.constants and b not in lowered.constants):
                continue
            arr = np.ascontiguousarray(g.constants[v] if v in g.constants
                                       else lowered.constants[b])
            plan.storage[key] = Storage("const", offset)
            raw = arr.view(np.uint8).reshape(-1)
            pad = _align(raw.size) - raw.size
            chunks.append(raw)
            if pad:
                chunks.append(np.zeros(pad, np.uint8))
            offset += raw.size + pad
    # Constants returned as outputs are copied from the graph's arrays, not from the blob.
    plan.const_blob = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)

    # Arena: liveness over kernel steps.
    last_use: dict[str, int] = {}
    for t, step in enumerate(lowered.steps):
        for v in step.reads.values():
            last_use[v] = t
    free: list[tuple[int, int]] = []  # (offset, size)
    end = 0
    live: dict[str, tuple[int, int, int]] = {}  # value -> (offset, size, last use)
    def allocate(size: int) -> int:
        nonlocal free, end
        best = None
        for k, (_, sz) in enumerate(free):
            if sz >= size and (best is None or sz < free[best][1]):
                best = k
        if best is None:
            off = end
            end += size
            return off
        off, sz = free.pop(best)
        if sz > size:
            free.append((off + size, sz - size))
        return off

    for t, step in enumerate(lowered.steps):
        temps = []
        for b, nbytes in step.temps.items():
            off = allocate(_align(nbytes))
            plan.storage[f"{t}:{b}"] = Storage("arena", off)
            temps.append((off, _align(nbytes)))
        for v in step.writes.values():
            if v in plan.storage:
                continue
            size = _align(g.types[v].nbytes)
            off = allocate(size)
            plan.storage[v] = Storage("arena", off)
            live[v] = (off, size, last_use.get(v, t))
        # Workspaces and values whose last reader was this step give their blocks back.
        free.extend(temps)
        for v in [v for v, (_, _, lu) in live.items() if lu <= t]:
            off, size, _ = live.pop(v)
            free.append((off, size))
        free = _coalesce(free)
    plan.arena_bytes = end
    return plan


def _coalesce(blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    blocks = sorted(blocks)
    out: list[tuple[int, int]] = []
    for off, size in blocks:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + size)
        else:
            out.append((off, size))
    return out
