"""Executable: a compiled graph plus its input/output signature, callable on NumPy arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.backends import compile_for_backend
from kiln.backends.reference import check_inputs
from kiln.ir import Graph, TensorType


class Executable:
    """Runs a graph compiled by one backend. Inputs are checked against the signature."""

    def __init__(self, graph: Graph, backend: str = "reference", threads: int = 0,
                 target: Any = None, tuning: Any = None) -> None:
        self.graph = graph
        self.backend = backend
        self.input_types: list[TensorType] = [graph.types[i] for i in graph.inputs]
        self.output_types: list[TensorType] = [graph.types[o] for o in graph.outputs]
        # ``target`` (a kiln.passes.target.Target) and ``tuning`` (kiln.passes.tuning.Tuning)
        # are the llvm backend's CPU and schedule choices.
        options: dict[str, Any] = {"threads": threads}
        if target is not None:
            options["target"] = target
        if tuning is not None:
            options["tuning"] = tuning
        self._run = compile_for_backend(graph, backend, **options)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs for ``inputs`` (a KilnError when their count, shapes or dtypes are off)."""
        return self._run(check_inputs(self.graph, inputs))

    @property
    def program(self):
        """The backend's compiled program (for profiling and inspection)."""
        return self._run

    def check(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``inputs`` as arrays, after checking count, shapes and dtypes (KilnError if off)."""
        return check_inputs(self.graph, inputs)

    def run_checked(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``run`` for inputs the caller has already matched against ``input_types``."""
        return self._run(inputs)

    __call__ = run

    def __repr__(self) -> str:
        sig = ", ".join(str(t) for t in self.input_types)
        return f"<Executable {self.graph.name}({sig}) on {self.backend}>"
