"""``kiln show``: a model's IR text at one stage of a pipeline."""

from __future__ import annotations

from kiln.debug.model_arg import load_graph
from kiln.ir import Graph, KilnError, print_graph
from kiln.passes import PIPELINES, PassManager, Verify, get_pipeline

INPUT_STAGE = "input"


def stage_names(pipeline: str) -> list[str]:
    """The stages of ``pipeline`` that ``--after`` accepts: ``input``, then one per pass; a
    pass that occurs again is ``name#2``, ``name#3``..."""
    if pipeline not in PIPELINES:
        get_pipeline(pipeline)  # raises the KilnError that lists the valid pipelines
    names = [INPUT_STAGE]
    seen: dict[str, int] = {}
    for name in PIPELINES[pipeline]:
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def pass_count(pipeline: str, after: str | None) -> int:
    """How many passes of ``pipeline`` run to reach stage ``after`` (None: all of them).

    ``name`` means its first occurrence and ``name#1`` is accepted for it too.
    """
    names = stage_names(pipeline)
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
         frontend: str = "fx") -> str:
    """The IR text of model ``spec`` after stage ``after`` of ``pipeline``.

    ``after`` is ``"input"`` (the imported graph), a pass name of the pipeline (its first
    occurrence), ``"name#k"`` (its k-th occurrence), or None (the whole pipeline).
    """
    return print_graph(graph_after(spec, after, pipeline, frontend))
