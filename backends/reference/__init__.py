"""Reference backend: the NumPy interpreter."""

from kiln.backends.reference.interpreter import check_inputs, run_graph

__all__ = ["check_inputs", "run_graph"]
