"""Dead-code elimination: drop nodes and constants that no graph output depends on."""

from __future__ import annotations

from collections.abc import Collection

from kiln.ir import Graph
from kiln.passes.base import Pass, PassContext, PassResult, register_pass


def live_values(graph: Graph) -> set[str]:
    """Every value some graph output depends on (graph outputs included)."""
    live = set(graph.outputs)
    for node in reversed(graph.nodes):
        if any(out in live for out in node.outputs):
            live.update(node.inputs)
    return live


def remove_dead(graph: Graph, *, keep: Collection[str] = ()) -> Graph:
    """A copy of ``graph`` without dead nodes and constants.

    A multi-output node stays while any of its outputs is live. Values in ``keep`` stay even
    when dead (the rewrite driver spares dead code it did not create). Graph inputs always stay:
    they are the caller's signature.
    """
    live = live_values(graph)
    live.update(keep)
    out = graph.copy()
    out.nodes = [n for n in graph.nodes if any(o in live for o in n.outputs)]
    out.constants = {k: v for k, v in graph.constants.items() if k in live}
    defined = set(out.inputs) | set(out.constants) | {o for n in out.nodes for o in n.outputs}
    out.types = {k: t for k, t in graph.types.items() if k in defined}
    return out


@register_pass
class DeadCodeElimination(Pass):
    """Remove nodes whose outputs are unused and constants no node reads."""

    name = "dce"
    description = "drop nodes and constants that no graph output depends on"

    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        out = remove_dead(graph)
        dropped_nodes = len(graph.nodes) - len(out.nodes)
        dropped_consts = len(graph.constants) - len(out.constants)
        if dropped_nodes or dropped_consts:
            ctx.logger.debug("dce: dropped %d nodes, %d constants", dropped_nodes,
                             dropped_consts)
        return PassResult(out, bool(dropped_nodes or dropped_consts))
