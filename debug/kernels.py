"""The debugger below the graph: kernels checked one by one, and a kernel's bug traced to the
stage of the pipeline that made it.

Every kernel of a compiled model covers some graph nodes (its fusion group). Its inputs are
graph values, so it can be run alone on the reference interpreter's values of those inputs
and its outputs compared with the reference values of the nodes it computes: a wrong kernel
shows itself even when the error would be hidden (or blown up) further down the model. The
same kernel exists at every kernel stage (lowered, parallel, unrolled, vectorized) and then as
machine code; running each version on the same buffers names the first stage whose version is
wrong: the lowering rule, a schedule, or codegen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.backends.reference import run_graph
from kiln.ir import Graph, KilnError
from kiln.ir import kernel as K
from kiln.passes.compile import CODE, KERNEL, Compilation, Stage, kernel_stages, run_stages
from kiln.passes.fusion import covered_nodes
from kiln.passes.instruments import KERNEL_CHECK_LIMIT, KERNEL_TOLERANCE, compare_arrays
from kiln.passes.lower import KernelStep
from kiln.passes.manager import Instrument

# A kernel against the reference: NumericCheck's tolerance for kernel stages (a kernel
# reassociates sums: vector lanes, blocked reductions, FMA), and the work above which a kernel
# version runs natively instead of on the tree-walking kernel-IR interpreter.
KERNEL_RTOL = KERNEL_TOLERANCE
INTERPRETER_LIMIT = KERNEL_CHECK_LIMIT

Runner = Callable[[K.Kernel, dict[str, np.ndarray]], None]


# ---- backends' code stages -------------------------------------------------------------------
def code_stages(backend: str) -> list[Stage | str]:
    """The codegen stages ``backend`` runs after the shared kernel pipeline."""
    if backend == "llvm":
        from kiln.backends.llvm.compiler import CODEGEN

        return list(CODEGEN)
    if backend == "cuda":
        from kiln.backends.cuda.program import CudaSource

        return [CudaSource()]
    raise KilnError(f"backend {backend!r} has no kernel stages",
                    hint="kernel-level debugging takes --backend llvm or cuda")


def backend_stage_names(backend: str) -> list[str]:
    """The names of the stages after the graph passes: the shared kernel stages, then
    ``backend``'s codegen stages."""
    schedule = backend != "cuda"
    return [*kernel_stages(schedule),
            *(s if isinstance(s, str) else s.name for s in code_stages(backend))]


def compile_stages(graph: Graph, backend: str = "llvm", target: Any = None,
                   instruments: Sequence[Instrument] = (), until: str | None = None
                   ) -> Compilation:
    """Run the shared pipeline and ``backend``'s codegen on ``graph`` (graph passes already
    run), stopping after stage ``until`` when given."""
    stages: list[Stage | str] = [*kernel_stages(backend != "cuda"), *code_stages(backend)]
    if backend == "llvm":
        from kiln.backends.llvm.compiler import default_target

        target = target or default_target()
        width = target.f32_lanes
    else:
        width = 1
    if until is not None:
        names = [s if isinstance(s, str) else s.name for s in stages]
        stages = stages[:names.index(until) + 1]
    return run_stages(Compilation(graph, width=width, target=target), stages, instruments)


class KeepStages(Instrument):
    """Keeps the Compilation after every kernel and code stage, by stage name."""

    def __init__(self) -> None:
        self.after: dict[str, Compilation] = {}
        self.order: list[str] = []

    def after_stage(self, stage, before, after, index: int, seconds: float) -> None:
        """Keep the stage's output."""
        self.after[stage.name] = after
        self.order.append(stage.name)


# ---- one kernel on reference values ----------------------------------------------------------
def reference_values(graph: Graph, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Every value of ``graph`` (inputs, constants, node outputs) on the reference backend."""
    values = {name: np.asarray(a) for name, a in zip(graph.inputs, inputs)}
    values.update({k: np.asarray(v) for k, v in graph.constants.items()})
    run_graph(graph, list(inputs), observe=lambda name, arr: values.__setitem__(name, arr))
    return values


def kernel_buffers(step: KernelStep, graph: Graph, constants: dict[str, np.ndarray],
                   values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat buffers for one call of ``step``'s kernel: its inputs from ``values``, lowering's
    own constants (packed weights), zeroed outputs and workspaces."""
    bufs: dict[str, np.ndarray] = {}
    for b in step.kernel.params:
        dtype = np.dtype(K.np_dtype(b.dtype))
        if b.name in step.reads:
            v = step.reads[b.name]
            src = values[v] if v in values else constants[b.name]
            bufs[b.name] = np.ascontiguousarray(src, dtype=dtype).reshape(-1).copy()
        else:
            bufs[b.name] = np.zeros(b.size, dtype)
    return bufs


def compare(got: np.ndarray, want: np.ndarray, rtol: float = KERNEL_RTOL) -> tuple[float, bool]:
    """The largest |got - want| and whether it is within tolerance (``rtol`` relative and
    x max(1, max|want|) absolute; NaN must match NaN)."""
    g = np.asarray(got).reshape(-1)
    w = np.asarray(want).reshape(-1)
    if g.shape != w.shape:
        return float("inf"), False
    return compare_arrays(w, g, rtol, rtol)


def run_step(step: KernelStep, kernel: K.Kernel, graph: Graph, constants: dict[str, np.ndarray],
             values: dict[str, np.ndarray], runner: Runner) -> tuple[float, bool]:
    """Run ``kernel`` (a version of ``step``'s kernel) with ``runner`` on reference inputs and
    compare what it writes with the reference values."""
    bufs = kernel_buffers(step, graph, constants, values)
    runner(kernel, bufs)
    worst, ok = 0.0, True
    for b, v in step.writes.items():
        diff, good = compare(bufs[b], values[v])
        worst, ok = max(worst, diff), ok and good
    return worst, ok


def interpreter_fits(kernel: K.Kernel) -> bool:
    """Whether the kernel-IR interpreter runs ``kernel`` in reasonable time."""
    return max(kernel.flops, sum(b.size for b in kernel.params)) <= INTERPRETER_LIMIT


def native_runner(target: Any = None) -> Runner:
    """Runs a kernel as native code on the LLVM backend (one thread)."""
    from kiln.backends.llvm.compiler import run_kernel_llvm

    return lambda kernel, bufs: run_kernel_llvm(kernel, bufs, target)


# ---- the check of every kernel ---------------------------------------------------------------
@dataclass(frozen=True)
class KernelCheck:
    """One kernel of a compiled model against the reference values of the nodes it covers."""

    index: int
    kernel: str
    root: str
    op: str
    nodes: tuple[str, ...]
    schedule: str
    max_diff: float
    ok: bool


def describe_schedule(kernel: K.Kernel, width: int) -> str:
    """What schedule a kernel got: algorithm, schedule note, vector width, parallel loop."""
    meta = kernel.meta
    parts = list(dict.fromkeys([meta.get("algorithm", ""), meta.get("schedule", "")]))
    lanes = max((e.lanes for s in K.walk_stmts(kernel.body) for e in K.stmt_exprs(s)),
                default=1)
    parts.append(f"vector x{lanes}" if lanes > 1 else "scalar")
    parallel = any(isinstance(s, K.For) and s.kind == "parallel"
                   for s in K.walk_stmts(kernel.body))
    parts.append("parallel" if parallel else "one thread")
    return ", ".join(p for p in parts if p)


def check_kernels(c: Compilation, inputs: Sequence[np.ndarray], runner: Runner,
                  values: dict[str, np.ndarray] | None = None, stop_at_first: bool = False
                  ) -> list[KernelCheck]:
    """Run every kernel of ``c`` alone with ``runner`` on reference inputs and compare its
    outputs with the reference values of the nodes it covers."""
    values = values if values is not None else reference_values(c.graph, inputs)
    covered = covered_nodes(c.graph, c.fusion)
    checks = []
    for t, step in enumerate(c.lowered.steps):
        diff, ok = run_step(step, step.kernel, c.graph, c.lowered.constants, values, runner)
        checks.append(KernelCheck(t, step.kernel.name, step.root,
                                  str(step.kernel.meta.get("op", "")), covered.get(step.root, ()),
                                  describe_schedule(step.kernel, c.width), diff, ok))
        if stop_at_first and not ok:
            break
    return checks


# ---- bisect to the kernel --------------------------------------------------------------------
@dataclass(frozen=True)
class KernelBisectResult:
    """What ``bisect_kernels`` found: ``kernel`` is the first kernel whose output leaves
    tolerance (None: every kernel matches), ``stage`` the pipeline stage whose version of that
    kernel is first wrong, ``versions`` each stage's verdict on it."""

    checks: tuple[KernelCheck, ...]
    kernel: KernelCheck | None = None
    stage: str | None = None
    stage_description: str = ""
    versions: tuple[tuple[str, float, bool, str], ...] = ()
    kernel_text: str = ""
    error: str | None = None
    stages_run: tuple[str, ...] = field(default=())

    @property
    def failed(self) -> bool:
        """Whether a kernel (or the pipeline) broke."""
        return self.kernel is not None or self.error is not None

    def report(self) -> str:
        """A human-readable summary: each kernel checked, then the verdict."""
        lines = [f"{k.index:>3}  {k.kernel:<32} {k.op:<16} max|diff| {k.max_diff:.3g}  "
                 f"{'ok' if k.ok else 'OUT OF TOLERANCE'}" for k in self.checks]
        if self.error is not None:
            lines.append(f"the pipeline failed: {self.error}")
            return "\n".join(lines)
        if self.kernel is None:
            lines.append(f"every kernel matches the reference "
                         f"(stages: {' -> '.join(self.stages_run)})")
            return "\n".join(lines)
        k = self.kernel
        lines += [f"first wrong kernel: {k.kernel} (#{k.index}, op {k.op}), "
                  f"max|diff| {k.max_diff:.3g}",
                  f"  graph nodes: {', '.join('%' + n for n in k.nodes)}",
                  f"  schedule: {k.schedule}",
                  f"  stage that made it wrong: {self.stage} ({self.stage_description})",
                  "  its version after each stage:"]
        lines += [f"    {name:<12} max|diff| {diff:.3g}  {'ok' if ok else 'WRONG'}  ({how})"
                  for name, diff, ok, how in self.versions]
        return "\n".join(lines)


STAGE_BLAME = {
    "lower": "the lowering rule of the kernel's op",
    "parallel": "the parallel-loop placement",
    "unroll": "the unroller",
    "vectorize": "the vectorizer",
    "llvm_ir": "the LLVM code generator (kernel IR -> LLVM IR)",
    "llvm_opt": "LLVM's optimizer",
    "object": "LLVM's machine-code emission",
}


def blame_stage(kept: KeepStages, step_index: int, values: dict[str, np.ndarray],
                target: Any = None) -> tuple[str, tuple[tuple[str, float, bool, str], ...]]:
    """The first stage whose version of kernel ``step_index`` is wrong, and every version's
    verdict. Kernel stages run on the interpreter where the kernel is small enough (so the
    kernel IR's own meaning is checked), natively otherwise; the code stage runs natively."""
    native = native_runner(target)
    versions = []
    blamed = None
    for name in kept.order:
        c = kept.after[name]
        if c.lowered is None or name in ("memory_plan", "llvm_opt", "object"):
            continue
        stage_kind = CODE if name == "llvm_ir" else KERNEL
        step = c.lowered.steps[step_index]
        if stage_kind == KERNEL and interpreter_fits(step.kernel):
            runner, how = K.run_kernel, "kernel-IR interpreter"
        else:
            runner, how = native, "native code"
        diff, ok = run_step(step, step.kernel, c.graph, c.lowered.constants, values, runner)
        versions.append((name, diff, ok, how))
        if not ok and blamed is None:
            blamed = name
    # Every kernel-IR version right but the whole-model check wrong: the code generator's.
    return blamed or "llvm_ir", tuple(versions)


def bisect_kernels(graph: Graph, inputs: Sequence[np.ndarray], backend: str = "llvm",
                   target: Any = None) -> KernelBisectResult:
    """Compile ``graph`` (graph passes already run) through the pipeline and ``backend``'s
    codegen, check every kernel natively against the reference, and trace the first wrong
    kernel to the stage that made it wrong."""
    if backend != "llvm":
        raise KilnError(f"kernel bisection runs native kernels on the llvm backend, not "
                        f"{backend!r}", hint="use --backend llvm")
    kept = KeepStages()
    try:
        c = compile_stages(graph, backend, target, [kept], until="llvm_ir")
    except Exception as e:  # a crashing stage is the finding
        last = kept.order[-1] if kept.order else "fuse"
        return KernelBisectResult((), error=f"{type(e).__name__} after stage {last}: {e}",
                                  stages_run=tuple(kept.order))
    values = reference_values(graph, inputs)
    checks = check_kernels(c, inputs, native_runner(c.target), values, stop_at_first=True)
    bad = next((k for k in checks if not k.ok), None)
    if bad is None:
        return KernelBisectResult(tuple(checks), stages_run=tuple(kept.order))
    stage, versions = blame_stage(kept, bad.index, values, c.target)
    return KernelBisectResult(tuple(checks), bad, stage, STAGE_BLAME.get(stage, stage), versions,
                              K.print_kernel(c.lowered.steps[bad.index].kernel),
                              stages_run=tuple(kept.order))


def kernel_failure(graph: Graph, inputs: Sequence[np.ndarray], target: Any = None
                   ) -> str | None:
    """How the llvm pipeline fails on ``graph``: ``"<stage>"`` for the stage that made the
    first wrong kernel, ``"<Error> after <stage>"`` for a crash; None when every kernel
    matches (the predicate ``kiln minify --backend llvm`` keeps while shrinking)."""
    result = bisect_kernels(graph, inputs, "llvm", target)
    if result.error is not None:
        return result.error.split(":")[0]
    return result.stage if result.kernel is not None else None


__all__ = ["KERNEL_RTOL", "KeepStages", "KernelBisectResult", "KernelCheck", "backend_stage_names",
           "bisect_kernels", "check_kernels", "code_stages", "compile_stages", "covered_nodes",
           "describe_schedule", "kernel_failure", "native_runner", "reference_values"]
