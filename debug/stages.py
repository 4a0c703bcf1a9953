"""``kiln show``: a model's IR text at one stage of the pipeline, from the imported graph
through the graph passes, fusion, lowering, each kernel schedule and the memory plan, to the
backend's code (LLVM IR, assembly, CUDA source)."""

from __future__ import annotations

from kiln.debug.model_arg import load_graph
from kiln.ir import Graph, KilnError, print_graph
from kiln.passes import PIPELINES, PassManager, Verify, get_pipeline

INPUT_STAGE = "input"


def stage_names(pipeline: str, backend: str | None = None) -> list[str]:
    """The stages of ``pipeline`` that ``--after`` accepts: ``input``, then one per pass; a
    pass that occurs again is ``name#2``, ``name#3``...; with a ``backend`` (llvm, cuda), then
    the shared kernel stages and the backend's codegen stages."""
    if pipeline not in PIPELINES:
        get_pipeline(pipeline)  # raises the KilnError that lists the valid pipelines
    names = [INPUT_STAGE]
    seen: dict[str, int] = {}
    for name in PIPELINES[pipeline]:
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    if backend is not None:
        from kiln.debug.kernels import backend_stage_names

        names += backend_stage_names(backend)
    return names


def pass_count(pipeline: str, after: str | None, backend: str | None = None) -> int:
    """How many passes of ``pipeline`` run to reach stage ``after`` (None: all of them).

    ``name`` means its first occurrence and ``name#1`` is accepted for it too.
    """
    names = stage_names(pipeline, backend)
    if after is None:
        return len(names) - 1
    if after.endswith("#1"):
        after = after[:-2]
    if after not in names:
        raise KilnError(f"no stage {after!r} in pipeline {pipeline}",
                        hint=f"--after takes one of: {', '.join(names)}")
    return names.index(after)


def graph_after(spec: str, after: str | None = None, pipeline: str = "O1",
                frontend: str = "fx") -> Graph:
    """The graph of model ``spec`` after stage ``after`` of ``pipeline`` (see ``pass_count``)."""
    count = pass_count(pipeline, after)
    graph, _, _ = load_graph(spec, frontend=frontend)
    passes = get_pipeline(pipeline)[:count]
    return PassManager(passes, [Verify()]).run(graph)


def show(spec: str, after: str | None = None, pipeline: str = "O1",
         frontend: str = "fx", backend: str = "llvm") -> str:
    """The IR text of model ``spec`` after stage ``after``.

    ``after`` is ``"input"`` (the imported graph), a pass name of the pipeline (its first
    occurrence), ``"name#k"`` (its k-th occurrence), None (the whole graph pipeline), or a
    stage after the graph passes on ``backend``: ``fuse`` (the fusion plan), ``lower``,
    ``parallel``, ``unroll``, ``vectorize`` (kernel IR), ``memory_plan``, and the backend's
    code: ``llvm_ir``, ``llvm_opt`` (optimized LLVM IR), ``object`` (assembly), or
    ``cuda_source``.
    """
    graph_stages = stage_names(pipeline)
    if after == "codegen":  # the backend's first code stage: LLVM IR, or CUDA source
        after = "cuda_source" if backend == "cuda" else "llvm_ir"
    if after is None or after in graph_stages or after.endswith("#1"):
        return print_graph(graph_after(spec, after, pipeline, frontend))
    from kiln.debug.kernels import compile_stages
    from kiln.passes.compile import get_stage

    pass_count(pipeline, after, backend)  # a KilnError listing every stage for a bad name
    graph = graph_after(spec, None, pipeline, frontend)
    c = compile_stages(graph, backend, until=after)
    stage = get_stage(after)
    return stage.text(c)
