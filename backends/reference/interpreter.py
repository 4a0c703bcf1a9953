"""The reference backend: a NumPy interpreter of the graph IR, the oracle for every backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from kiln.ir.errors import KilnError
from kiln.ir.graph import Graph
from kiln.ir.registry import get_op


def check_inputs(g: Graph, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Arrays matching the graph's inputs in count, shape and dtype (else a KilnError)."""
    if len(arrays) != len(g.inputs):
        raise KilnError(f"{g.name} takes {len(g.inputs)} inputs "
                        f"({', '.join(g.inputs)}), got {len(arrays)}")
    out = []
    for name, a in zip(g.inputs, arrays):
        a = np.asarray(a)
        want = g.types[name]
        if a.dtype != want.dtype.numpy or a.shape != want.shape:
            raise KilnError(
                f"input %{name} expects {want}, got {a.dtype}{list(a.shape)}",
                hint="kiln compiles for the example inputs' shapes and dtypes; compile again "
                     "with an example of this shape",
            )
        out.append(a)
    return out


def run_graph(
    g: Graph,
    inputs: Sequence[np.ndarray],
    *,
    observe: Callable[[str, np.ndarray], None] | None = None,
) -> list[np.ndarray]:
    """Run ``g`` on NumPy inputs and return its outputs.

    ``observe(value_name, array)`` is called for every node output (for numeric checks and the
    debugger); the interpreter frees intermediates after their last use otherwise.
    """
    env: dict[str, np.ndarray] = dict(zip(g.inputs, check_inputs(g, inputs)))
    env.update(g.constants)
    last_use: dict[str, int] = {}
    for idx, n in enumerate(g.nodes):
        for i in n.inputs:
            last_use[i] = idx
    keep = set(g.outputs) | set(g.constants) | set(g.inputs)
    for idx, n in enumerate(g.nodes):
        opdef = get_op(n.op)
        try:
            result = opdef.reference(*[env[i] for i in n.inputs], **n.attrs)
        except KilnError as e:
            if e.node is None:
                e.node, e.op, e.source = n.name, n.op, n.source
                e.args = (e._format(),)
            raise
        results = result if isinstance(result, tuple) else (result,)
        for out, r in zip(n.outputs, results):
            arr = np.asarray(r)
            want = g.types[out]
            if arr.shape != want.shape or arr.dtype != want.dtype.numpy:
                raise KilnError(f"reference of {n.op} made {arr.dtype}{list(arr.shape)}, "
                                f"type rule says {want}", node=n.name, op=n.op)
            env[out] = arr
            if observe is not None:
                observe(out, arr)
        for i in dict.fromkeys(n.inputs):
            if last_use.get(i) == idx and i not in keep:
                del env[i]
    return [env[o] for o in g.outputs]
