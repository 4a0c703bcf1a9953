"""Backends turn a graph into something that runs: ``compile_graph(graph) -> run``, where
``run(list of NumPy arrays) -> list of NumPy arrays``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from kiln.ir import Graph, KilnError

RunFn = Callable[[list[np.ndarray]], list[np.ndarray]]

# name -> module with compile_graph(graph) -> RunFn. Modules load on first use so that a
# backend's heavy dependencies (llvmlite, numba) are imported only when it is asked for.
_BACKENDS = {"reference": "kiln.backends.reference", "llvm": "kiln.backends.llvm",
             "cuda": "kiln.backends.cuda"}


def backend_names() -> list[str]:
    """Names of the backends kiln has."""
    return list(_BACKENDS)


def compile_for_backend(graph: Graph, backend: str, **options) -> RunFn:
    """Compile ``graph`` with the named backend (``options`` go to its compile_graph)."""
    try:
        module = _BACKENDS[backend]
    except KeyError:
        raise KilnError(f"unknown backend {backend!r}",
                        hint=f"choose one of {backend_names()}") from None
    return importlib.import_module(module).compile_graph(graph, **options)
