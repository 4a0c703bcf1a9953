"""The one pipeline from graph to machine code, and its driver.

A ``Compilation`` is what flows through the pipeline: the graph, then the fusion plan, the
kernels, the memory plan and whatever code a backend made. Each step is a registered ``Stage``
that takes a Compilation and returns a new one (never changing its input):

    graph passes (O1 ...)  ->  fuse  ->  lower  ->  parallel  ->  unroll  ->  vectorize
      ->  memory_plan  ->  the backend's codegen stages (llvm_ir, llvm_opt, object | cuda_source)

``run_stages`` is the driver every backend, export and the debugger use; the PassManager's
instruments (timing, IR dump, verify, numeric checks) see every stage: graph passes through
``before_pass``/``after_pass`` as always, the others through ``after_stage``. Backends add
their codegen stages to the registry (``register_stage``); this layer does not import them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kiln.ir import Graph, KilnError, print_graph
from kiln.ir import kernel as K
from kiln.ir.errors import InternalError
from kiln.ir.kernel_verify import verify_kernel
from kiln.passes.base import Pass, PassContext, PassResult
from kiln.passes.fusion import FusionPlan, plan_fusion
from kiln.passes.lower import KernelStep, LoweredGraph, lower_graph
from kiln.passes.memory_plan import MemoryPlan, plan_memory
from kiln.passes.target import Target
from kiln.passes.tuning import DEFAULT as DEFAULT_TUNING
from kiln.passes.tuning import Tuning
from kiln.passes.vectorize import place_parallel, unroll, vectorize

GRAPH, KERNEL, CODE = "graph", "kernel", "code"
"""Stage levels: what a stage changes and what its dump shows."""


@dataclass(frozen=True)
class Compilation:
    """One model on its way to machine code: each stage fills in or replaces a part.

    ``width`` is the target's f32 vector width (1: scalar kernels, as the GPU wants them);
    ``code`` holds the backend's products by name (LLVM IR text, object code, CUDA sources,
    PTX) and ``code_text`` the text the last code stage dumps."""

    graph: Graph
    width: int = 1
    target: Target | None = None
    tuning: Any = DEFAULT_TUNING
    fusion: FusionPlan | None = None
    lowered: LoweredGraph | None = None
    memory: MemoryPlan | None = None
    code: dict[str, Any] = field(default_factory=dict)
    code_text: str = ""

    def with_(self, **changes: Any) -> Compilation:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    def with_code(self, text: str = "", **products: Any) -> Compilation:
        """A copy with more backend products and the text a dump of this stage shows."""
        return replace(self, code={**self.code, **products}, code_text=text)

    def map_kernels(self, fn: Callable[[K.Kernel], K.Kernel]) -> Compilation:
        """A copy whose every kernel is ``fn(kernel)`` (the steps are new objects)."""
        if self.lowered is None:
            raise InternalError("a kernel stage ran before lowering")
        steps = [replace(s, kernel=fn(s.kernel)) for s in self.lowered.steps]
        return replace(self, lowered=replace(self.lowered, steps=steps))


class Stage:
    """One registered step of the pipeline. Subclasses set ``name``, ``description`` and
    ``level`` and implement ``apply``; ``text`` is what a dump after the stage shows."""

    name: str = ""
    description: str = ""
    level: str = KERNEL

    def apply(self, c: Compilation) -> Compilation:
        """Return the next Compilation; never change ``c``."""
        raise NotImplementedError

    def text(self, c: Compilation) -> str:
        """The stage's output as text: the graph, the fusion plan, the kernels, the memory
        plan, or the code."""
        return stage_text(c, self.level, self.name)

    def __repr__(self) -> str:
        return f"<stage {self.name} ({self.level})>"


class GraphPassStage(Stage):
    """A graph pass as a stage of the pipeline (its instruments see it as a pass)."""

    level = GRAPH

    def __init__(self, pass_: Pass, ctx: PassContext | None = None) -> None:
        self.pass_ = pass_
        self.ctx = ctx
        self.name = pass_.name
        self.description = pass_.description
        self.result: PassResult | None = None

    def apply(self, c: Compilation) -> Compilation:
        """Run the pass on the graph."""
        self.result = self.pass_.run(c.graph, self.ctx if self.ctx is not None
                                     else PassContext())
        return c.with_(graph=self.result.graph)


def stage_text(c: Compilation, level: str, name: str = "") -> str:
    """The dump of ``c`` at a stage of ``level`` (see ``Stage.text``)."""
    if level == GRAPH:
        return print_graph(c.graph)
    if level == CODE:
        return c.code_text
    if name == "fuse" and c.fusion is not None:
        return c.fusion.describe(c.graph)
    if name == "memory_plan" and c.memory is not None:
        return describe_memory(c)
    return c.lowered.text() if c.lowered is not None else ""


def describe_memory(c: Compilation) -> str:
    """The memory plan as text: arena and constant sizes, then where every value lives."""
    plan = c.memory
    lines = [f"# {plan.summary()}"]
    for name, st in plan.storage.items():
        lines.append(f"{name:<32} {st.kind:<7} {st.index}")
    for j, src in plan.output_copies.items():
        lines.append(f"output {j:<25} copy    {src}")
    return "\n".join(lines)


# ---- the registry ----------------------------------------------------------------------------
_STAGES: dict[str, Callable[..., Stage]] = {}


def register_stage(factory: Callable[..., Stage]) -> Callable[..., Stage]:
    """Register a stage class (or factory) under its ``name``; returns it (a decorator)."""
    name = factory.name
    if name in _STAGES and _STAGES[name] is not factory:
        raise InternalError(f"two stages are named {name!r}")
    _STAGES[name] = factory
    return factory


def get_stage(name: str, **options: Any) -> Stage:
    """A new instance of stage ``name``; KilnError listing the registered names."""
    try:
        factory = _STAGES[name]
    except KeyError:
        raise KilnError(f"no stage named {name!r}",
                        hint=f"registered stages: {', '.join(sorted(_STAGES))}") from None
    return factory(**options)


def stage_names() -> list[str]:
    """Every registered stage, in registration order."""
    return list(_STAGES)


# ---- kernel stages ---------------------------------------------------------------------------
@register_stage
class Fuse(Stage):
    """Group nodes into kernels: anchors with their epilogues, inlined elementwise chains."""

    name = "fuse"
    description = "group the graph's nodes into kernels (anchors, epilogues, inlined ops)"

    def apply(self, c: Compilation) -> Compilation:
        return c.with_(fusion=plan_fusion(c.graph))


@register_stage
class Lower(Stage):
    """Each fused group becomes one loop nest (the dense ops get their packed schedules)."""

    name = "lower"
    description = "lower every fused group to a kernel (loop nest over buffers)"

    def apply(self, c: Compilation) -> Compilation:
        return c.with_(lowered=lower_graph(c.graph, c.fusion, width=c.width, target=c.target,
                                           tuning=c.tuning))


@register_stage
class Parallel(Stage):
    """Keep ``parallel`` on each nest's outermost parallel loop only."""

    name = "parallel"
    description = "place the thread-parallel loop of each nest"

    def apply(self, c: Compilation) -> Compilation:
        return c.map_kernels(place_parallel)


@register_stage
class Unroll(Stage):
    """Unroll the loops lowering marked ``unrolled``."""

    name = "unroll"
    description = "unroll loops marked unrolled (constant trip counts)"

    def apply(self, c: Compilation) -> Compilation:
        return c.map_kernels(unroll)


@register_stage
class Vectorize(Stage):
    """Turn innermost contiguous loops into vector operations of the target's width."""

    name = "vectorize"
    description = "vectorize innermost loops to the target's f32 width (tails included)"

    def apply(self, c: Compilation) -> Compilation:
        return c.map_kernels(lambda k: vectorize(k, c.width, c.tuning))


@register_stage
class PlanMemory(Stage):
    """Arena offsets from liveness, the constant blob, output copies."""

    name = "memory_plan"
    description = "place every value: inputs, outputs, the arena (by liveness), constants"

    def apply(self, c: Compilation) -> Compilation:
        return c.with_(memory=plan_memory(c.lowered))


LOWERING = ("fuse", "lower")
SCHEDULING = ("parallel", "unroll", "vectorize")


def kernel_stages(schedule: bool = True) -> list[str]:
    """The stages from graph to planned kernels; ``schedule`` False leaves the kernels as
    lowered (scalar loop nests, which the CUDA backend maps to threads itself)."""
    return [*LOWERING, *(SCHEDULING if schedule else ()), "memory_plan"]


# ---- the driver ------------------------------------------------------------------------------
def run_stages(c: Compilation, stages: Sequence[Stage | str], instruments: Sequence[Any] = ()
               ) -> Compilation:
    """Run ``stages`` (instances or registered names) in order on ``c`` with
    ``instruments`` (PassManager instruments): the one driver of every pipeline.

    Graph-pass stages call the instruments' ``before_pass``/``after_pass``; every other stage
    calls ``after_stage(stage, before, after, index, seconds)`` where an instrument has it."""
    stages = [get_stage(s) if isinstance(s, str) else s for s in stages]
    for inst in instruments:
        inst.begin(c.graph)
    for index, stage in enumerate(stages):
        graph_pass = isinstance(stage, GraphPassStage)
        if graph_pass:
            for inst in instruments:
                inst.before_pass(stage.pass_, c.graph, index)
        start = time.perf_counter()
        after = stage.apply(c)
        seconds = time.perf_counter() - start
        for inst in instruments:
            if graph_pass:
                inst.after_pass(stage.pass_, c.graph, after.graph, stage.result, index, seconds)
            else:
                hook = getattr(inst, "after_stage", None)
                if hook is not None:
                    hook(stage, c, after, index, seconds)
        c = after
    for inst in instruments:
        inst.end(c.graph)
    return c


def verify_kernels(c: Compilation) -> None:
    """Run the kernel verifier on every kernel of ``c`` (InternalError on the first bad one)."""
    if c.lowered is not None:
        for step in c.lowered.steps:
            verify_kernel(step.kernel)


def compile_kernels(graph: Graph, *, width: int = 1, target: Target | None = None,
                    tuning: Tuning | Any = DEFAULT_TUNING, schedule: bool = True,
                    code_stages: Sequence[Stage | str] = (),
                    instruments: Sequence[Any] = ()) -> Compilation:
    """Run the pipeline from ``graph`` (already optimized) to planned kernels and then the
    backend's ``code_stages``: what every backend and exporter calls."""
    c = Compilation(graph, width=width, target=target, tuning=tuning)
    return run_stages(c, [*kernel_stages(schedule), *code_stages], instruments)


__all__ = ["CODE", "GRAPH", "KERNEL", "Compilation", "GraphPassStage", "KernelStep",
           "Stage", "compile_kernels", "get_stage", "kernel_stages", "register_stage",
           "run_stages", "stage_names", "stage_text", "verify_kernels"]
