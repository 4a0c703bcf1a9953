"""The PassManager: runs passes in order and calls its instruments around each one."""

from __future__ import annotations

from collections.abc import Sequence

from kiln.ir import Graph
from kiln.passes.base import Pass, PassContext, PassResult, get_pass


class Instrument:
    """Hooks around a pipeline run. Each hook does nothing unless a subclass overrides it;
    an instrument stops the run by raising."""

    def begin(self, graph: Graph) -> None:
        """Called once with the pipeline's input graph."""

    def before_pass(self, pass_: Pass, graph: Graph, index: int) -> None:
        """Called before pass number ``index`` (0-based) runs on ``graph``."""

    def after_pass(self, pass_: Pass, before: Graph, after: Graph, result: PassResult,
                   index: int, seconds: float) -> None:
        """Called after pass ``index`` turned ``before`` into ``after`` in ``seconds``."""

    def after_stage(self, stage, before, after, index: int, seconds: float) -> None:
        """Called after a stage that is not a graph pass (fusion, lowering, a schedule, the
        memory plan, codegen: ``kiln.passes.compile``) turned Compilation ``before`` into
        ``after``."""

    def end(self, graph: Graph) -> None:
        """Called once with the pipeline's final graph."""


class PassManager:
    """Runs a flat list of passes (instances or registered names) with instruments."""

    def __init__(self, passes: Sequence[Pass | str], instruments: Sequence[Instrument] = ()
                 ) -> None:
        self.passes: list[Pass] = [get_pass(p) if isinstance(p, str) else p for p in passes]
        self.instruments: list[Instrument] = list(instruments)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        """Run every pass in order on ``graph`` (left untouched); return the final graph. The
        driver is ``kiln.passes.compile.run_stages``, the one every pipeline uses."""
        from kiln.passes.compile import Compilation, GraphPassStage, run_stages

        ctx = ctx if ctx is not None else PassContext()
        stages = [GraphPassStage(p, ctx) for p in self.passes]
        return run_stages(Compilation(graph), stages, self.instruments).graph

    def __repr__(self) -> str:
        return f"PassManager([{', '.join(p.name for p in self.passes)}])"
