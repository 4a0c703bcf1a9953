"""Common-subexpression elimination: one copy of each identical constant and computation."""

from __future__ import annotations

import numpy as np

from kiln.ir import Graph
from kiln.passes.base import Pass, PassContext, PassResult, register_pass
from kiln.passes.rewrite import restore_output_names

COMMUTATIVE = frozenset({"add", "mul", "maximum", "minimum", "eq", "ne"})
"""Ops whose two operands may be swapped without changing a single bit of the result."""


def _dedupe_constants(graph: Graph) -> dict[str, str]:
    """Map each constant that repeats an earlier one (dtype, shape and bytes) to that one.

    Bytes, not values: -0.0 and 0.0 stay apart, identical NaNs merge. Only constants of one
    dtype, shape and first 64 bytes are compared in full, so a model's distinct weights are
    not read whole (hashing all of GPT-2's 500 MB took a second).
    """
    groups: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    subst: dict[str, str] = {}
    for name, arr in graph.constants.items():
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        kept = groups.setdefault((arr.dtype.str, arr.shape, raw[:64].tobytes()), [])
        same = next((k for k, r in kept if np.array_equal(r, raw)), None)
        if same is not None:
            subst[name] = same
        else:
            kept.append((name, raw))
    return subst


@register_pass
class CommonSubexpressionElimination(Pass):
    """Merge identical constants, then nodes with the same op, operands and attributes."""

    name = "cse"
    description = "merge identical constants and nodes with the same op, operands and attrs"

    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        subst = _dedupe_constants(graph)
        merged_constants = len(subst)
        out = graph.copy()
        out.constants = {k: v for k, v in graph.constants.items() if k not in subst}
        out.nodes = []
        seen: dict[tuple, tuple[str, ...]] = {}
        merged_nodes = 0
        # One walk in topological order suffices: operands are renamed before a node is keyed,
        # so nodes that become identical because their operands merged merge too.
        for node in graph.nodes:
            inputs = tuple(subst.get(i, i) for i in node.inputs)
            operands = tuple(sorted(inputs)) if node.op in COMMUTATIVE else inputs
            key = (node.op, operands, node.attr_key())
            if key in seen:
                subst.update(zip(node.outputs, seen[key]))
                merged_nodes += 1
                continue
            seen[key] = node.outputs
            out.nodes.append(node if inputs == node.inputs else node.with_(inputs=inputs))
        if not subst:
            return PassResult(out, False)
        out.outputs = [subst.get(o, o) for o in graph.outputs]
        out.types = {k: t for k, t in graph.types.items() if k not in subst}
        ctx.logger.debug("cse: merged %d constants, %d nodes", merged_constants, merged_nodes)
        return PassResult(restore_output_names(out, graph.outputs), True)
