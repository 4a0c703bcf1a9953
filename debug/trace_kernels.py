"""``kiln trace`` below the graph: the stages of the one pipeline after the graph passes
(fusion, lowering, each schedule, the memory plan, LLVM IR, optimized LLVM IR, machine code),
and one row per fused kernel: its graph nodes, its schedule, its time and GFLOP/s with its
roofline class, and a numeric check of its output against the reference values of the nodes
it covers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.debug.bisect import EXACT_BUDGET, max_violation
from kiln.debug.kernels import KeepStages, check_kernels, describe_schedule
from kiln.ir import Graph
from kiln.ir import kernel as K
from kiln.passes import DumpIR, Timing
from kiln.passes.compile import Compilation
from kiln.passes.fusion import covered_nodes


@dataclass(frozen=True)
class CodeStage:
    """A stage after the graph passes: its number, name, level and the diff of its text
    against the previous stage's."""

    index: int
    name: str
    level: str
    diff: str


class _Offset(DumpIR):
    """DumpIR whose stage numbers continue after the graph stages."""

    def __init__(self, directory: Path, first: int) -> None:
        super().__init__(directory)
        self.first = first
        self.texts: list[tuple[str, str]] = []

    def begin(self, graph: Graph) -> None:
        """Nothing to dump: the graph stages are already written."""
        self.files = []

    def after_stage(self, stage, before, after, index: int, seconds: float) -> None:
        """Write ``NNN_<stage>.txt`` numbered after the graph stages."""
        text = stage.text(after)
        self.texts.append((stage.name, text))
        self._write(f"{self.first + index:03d}_{stage.name}.txt", text)


def trace_backend(graph: Graph, arrays: Sequence[np.ndarray], expected: Sequence[np.ndarray],
                  out: Path, first: int, threads: int = 0, repeat: int = 10
                  ) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]],
                             list[dict[str, Any]]]:
    """Compile ``graph`` (after the graph passes) with the llvm backend through the pipeline,
    dumping each stage as ``NNN_<stage>.txt`` from number ``first``.

    Returns the table rows of those stages, ``(name, level, text)`` per stage, and one row per
    kernel (``KERNEL_COLUMNS``)."""
    from kiln.backends.llvm.compiler import CompiledProgram, build_image, default_target
    from kiln.debug.kernels import native_runner
    from kiln.debug.profiling import measure_peaks
    from kiln.passes.compile import get_stage
    from kiln.passes.tuning import DEFAULT

    target = default_target()
    dump, timing, kept = _Offset(out, first), Timing(), KeepStages()
    image, lowered, _, _ = build_image(graph, target, DEFAULT, instruments=[dump, timing, kept])
    program = CompiledProgram(image)
    program.threads(threads)
    actual = program.run([np.ascontiguousarray(a) for a in arrays])
    diff, ok = max_violation(expected, actual, EXACT_BUDGET)
    n = len(graph.nodes)
    params = graph.num_parameters()
    seconds = {r.name: r.seconds for r in timing.records}
    rows, stages = [], []
    for k, (name, text) in enumerate(dump.texts):
        last = k == len(dump.texts) - 1
        rows.append({"stage": first + k, "pass": name, "seconds": seconds.get(name, 0.0),
                     "nodes": n, "parameters": params, "flops": int(sum(
                         s.kernel.flops for s in lowered.steps)),
                     "bytes": int(sum(s["bytes"] for s in image.steps)),
                     "max_diff": diff if last else math.nan, "ok": ok if last else True})
        stages.append((name, get_stage(name).level, text))
    c: Compilation = kept.after["memory_plan"]
    kernels = kernel_rows(c, arrays, program, native_runner(target), threads, repeat,
                          measure_peaks(threads).balance)
    return rows, stages, kernels


KERNEL_COLUMNS = ("index", "kernel", "op", "nodes", "schedule", "ms", "gflops", "gbytes",
                  "bound", "max_diff", "ok", "ir")


def kernel_rows(c: Compilation, arrays: Sequence[np.ndarray], program: Any, runner: Any,
                threads: int, repeat: int, balance: float) -> list[dict[str, Any]]:
    """One row per kernel of ``c`` (see ``KERNEL_COLUMNS``), in execution order: measured time
    from ``program``'s profiler, roofline class against the machine ``balance`` (FLOP/byte),
    and the kernel run alone on reference inputs by ``runner``."""
    profile = {p.kernel: p for p in program.profile([np.ascontiguousarray(a) for a in arrays],
                                                    repeat)}
    checks = check_kernels(c, arrays, runner)
    covered = covered_nodes(c.graph, c.fusion)
    rows = []
    for step, check in zip(c.lowered.steps, checks):
        p = profile.get(step.kernel.name)
        ms = p.seconds * 1e3 if p else math.nan
        intensity = p.flops / p.bytes if p and p.bytes else math.inf
        rows.append({"index": check.index, "kernel": step.kernel.name, "op": check.op,
                     "nodes": covered.get(step.root, ()),
                     "schedule": describe_schedule(step.kernel, c.width),
                     "ms": ms, "gflops": p.gflops if p else math.nan,
                     "gbytes": p.gbytes if p else math.nan,
                     "bound": "compute" if intensity > balance else "memory",
                     "max_diff": check.max_diff, "ok": check.ok,
                     "ir": K.print_kernel(step.kernel)})
    return rows


def format_kernels(rows: Sequence[dict[str, Any]]) -> str:
    """The kernel rows as a text table."""
    width = max([len(r["kernel"]) for r in rows] + [6])
    lines = [f"{'#':>3}  {'kernel':<{width}}  {'op':<14}  {'ms':>8}  {'GFLOP/s':>8}  "
             f"{'bound':<7}  {'max|diff|':>9}  ok  schedule"]
    for r in rows:
        lines.append(f"{r['index']:>3}  {r['kernel']:<{width}}  {r['op'][:14]:<14}  "
                     f"{r['ms']:>8.4f}  {r['gflops']:>8.2f}  {r['bound']:<7}  "
                     f"{r['max_diff']:>9.2g}  {'ok' if r['ok'] else 'NO'}  {r['schedule']}")
    return "\n".join(lines)


__all__ = ["KERNEL_COLUMNS", "CodeStage", "format_kernels", "kernel_rows", "trace_backend"]
