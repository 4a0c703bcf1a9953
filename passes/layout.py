"""Layout cleanup: move permutes past elementwise ops and cancel the pairs that meet.

Quantization works channels-last (``qconv``), the rest of an imported graph channels-first,
so it leaves permutes at every boundary: op(permute(a, P), permute(b, P)) becomes
permute(op(a, b), P), and permute(permute(x, P), Q) becomes one permute (or x itself when
they cancel). Elementwise chains between two channels-last anchors then run channels-last
with no permute left at all.
"""

from __future__ import annotations

from collections.abc import Sequence

from kiln.ir import Graph, Node
from kiln.passes.base import Pass, PassContext, PassResult, register_pass
from kiln.passes.fusion import is_injective, is_shape_op
from kiln.passes.rewrite import ANY_OP, Rewriter, RuleTable, rewrite_graph

RULES = RuleTable("sink_permutes")


@RULES.rule("permute")
def merge_permutes(node: Node, rw: Rewriter) -> Sequence[str] | None:
    """permute(permute(x, P), Q) -> permute(x, P[Q]), or x when that is the identity."""
    prod = rw.producer(node.inputs[0])
    if prod is None or prod.op != "permute":
        return None
    p, q = prod.attrs["perm"], node.attrs["perm"]
    perm = tuple(p[i] for i in q)
    if perm == tuple(range(len(perm))):
        return [prod.inputs[0]]
    return [rw.emit("permute", [prod.inputs[0]], {"perm": perm}, name=node.outputs[0],
                    source=node.source)]


@RULES.rule(ANY_OP)
def sink_through_elementwise(node: Node, rw: Rewriter) -> Sequence[str] | None:
    """op(permute(a, P), permute(b, P), scalar...) -> permute(op(a, b, scalar...), P)."""
    if not is_injective(node.op) or is_shape_op(node.op) or len(node.outputs) != 1:
        return None
    if node.op in ("batch_norm", "embedding"):
        return None
    out_t = rw.type_of(node.outputs[0])
    perm, inputs = None, []
    for v in node.inputs:
        t = rw.type_of(v)
        prod = rw.producer(v)
        if t.numel == 1 and t.rank <= out_t.rank:
            inputs.append(v)  # a scalar broadcasts the same in any layout
            continue
        if prod is None or prod.op != "permute" or t.shape != out_t.shape:
            return None
        if perm is not None and prod.attrs["perm"] != perm:
            return None
        perm = prod.attrs["perm"]
        inputs.append(prod.inputs[0])
    if perm is None:
        return None
    inner = rw.emit(node.op, inputs, dict(node.attrs), source=node.source)
    return [rw.emit("permute", [inner], {"perm": perm}, name=node.outputs[0],
                    source=node.source)]


@register_pass
class SinkPermutes(Pass):
    """Move permutes past elementwise ops and cancel permute pairs."""

    name = "sink_permutes"
    description = "move permutes past elementwise ops and fold permute pairs (layout cleanup)"

    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        out, fired = rewrite_graph(graph, RULES)
        if fired:
            ctx.logger.debug("sink_permutes: %s", dict(fired))
        return PassResult(out, bool(fired))
