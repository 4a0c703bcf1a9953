"""Reference backend: the NumPy interpreter, the oracle every other backend is judged by."""

from __future__ import annotations

from kiln.backends.reference.interpreter import check_inputs, run_graph
from kiln.ir import Graph, verify


def compile_graph(graph: Graph, threads: int = 0):
    """A function running ``graph`` on NumPy inputs with the interpreter (single-threaded:
    ``threads`` is accepted for a uniform backend interface)."""
    verify(graph)

    def run(inputs):
        return run_graph(graph, inputs)

    return run


__all__ = ["check_inputs", "compile_graph", "run_graph"]
