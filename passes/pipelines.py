"""Named pipelines: flat lists of registered pass names."""

from __future__ import annotations

from collections.abc import Sequence

from kiln.ir import Graph, KilnError
from kiln.passes.base import Pass, PassContext, get_pass
from kiln.passes.manager import Instrument, PassManager

PIPELINES: dict[str, list[str]] = {
    # The graph as imported: the reference every other pipeline is checked against.
    "O0": [],
    # Cleanups. Folding first turns constant subgraphs into the constants the other rules
    # match; simplification then removes identity ops that may sit between a conv and its
    # batch_norm; dce before fold_batchnorm drops dead readers that would make a conv's output
    # look shared; cse after it, so two identical convs each keep their own batch_norm fold;
    # a last dce drops what cse and folding orphaned.
    "O1": ["fold_constants", "simplify_algebra", "dce", "fold_batchnorm", "cse", "dce"],
}


def get_pipeline(name: str) -> list[Pass]:
    """New instances of the passes of pipeline ``name``; KilnError listing the valid names."""
    try:
        names = PIPELINES[name]
    except KeyError:
        raise KilnError(f"no pipeline named {name!r}",
                        hint=f"valid pipelines: {', '.join(PIPELINES)}") from None
    return [get_pass(n) for n in names]


def run_pipeline(graph: Graph, pipeline: str | Sequence[Pass | str],
                 instruments: Sequence[Instrument] = (), ctx: PassContext | None = None
                 ) -> Graph:
    """Run a named pipeline, or a list of passes or pass names, on ``graph``."""
    passes = get_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    return PassManager(passes, instruments).run(graph, ctx)
