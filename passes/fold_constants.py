"""Constant folding: a node whose operands are all constants becomes a constant."""

from __future__ import annotations

from collections.abc import Sequence

from kiln.ir import Graph, KilnError, Node, run_reference
from kiln.passes.base import Pass, PassContext, PassResult, register_pass
from kiln.passes.rewrite import ANY_OP, Rewriter, RuleTable, rewrite_graph

DEFAULT_MAX_ELEMENTS = 65536
"""Folding may always produce this many elements, even from smaller operands."""


def folding_rules(max_elements: int) -> RuleTable:
    """The folding rule, with results capped at max(operands' size, ``max_elements``)."""
    table = RuleTable("fold_constants")

    @table.rule(ANY_OP)
    def fold(node: Node, rw: Rewriter) -> Sequence[str] | None:
        arrays = [rw.constant(i) for i in node.inputs]
        if any(a is None for a in arrays):
            return None
        # Folding must not turn a small weight into a big one (expand of a scalar to an
        # activation-sized tensor): the graph would carry the bytes instead of computing them.
        limit = max(sum(a.size for a in arrays), max_elements)
        if sum(rw.type_of(o).numel for o in node.outputs) > limit:
            return None
        try:
            results = run_reference(node.op, arrays, dict(node.attrs))
        except KilnError:
            # The op rejects these values (an embedding index out of range): leave the node so
            # the error surfaces where the model runs, with its source line.
            return None
        if any(r.dtype != rw.type_of(o).dtype.numpy or r.shape != rw.type_of(o).shape
               for o, r in zip(node.outputs, results)):
            return None
        return [rw.add_constant(r, name=o) for o, r in zip(node.outputs, results)]

    return table


@register_pass
class FoldConstants(Pass):
    """Evaluate constant subexpressions at compile time with the ops' NumPy references.

    Option ``fold_constants.max_elements`` (default 65536) sets the size a folded result may
    always reach; beyond it a result may not be larger than the operands it replaces.
    """

    name = "fold_constants"
    description = "evaluate nodes whose operands are all constants into constants"

    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        limit = int(ctx.option(self.name, "max_elements", DEFAULT_MAX_ELEMENTS))
        out, fired = rewrite_graph(graph, folding_rules(limit))
        if fired:
            ctx.logger.debug("fold_constants: folded %d nodes", sum(fired.values()))
        return PassResult(out, bool(fired))
