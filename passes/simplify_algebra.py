"""Algebraic simplification: identities that remove or merge shape and arithmetic ops.

Every rule keeps the value's type: an op is only dropped when its output has exactly the type of
the operand that replaces it, so an ``x * ones`` that broadcasts ``x`` to a bigger shape stays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiln.ir import Graph, Node
from kiln.passes.base import Pass, PassContext, PassResult, register_pass
from kiln.passes.rewrite import Rewriter, RuleTable, rewrite_graph

RULES = RuleTable("simplify_algebra")


def _same_type(rw: Rewriter, value: str, node: Node) -> bool:
    return rw.type_of(value) == rw.type_of(node.outputs[0])


@RULES.rule("reshape", "expand", "slice", "cast", "pad", "concat")
def drop_identity_shape_op(node: Node, rw: Rewriter) -> Sequence[str] | None:
    """reshape/expand to the shape it has, a slice over a whole axis, a cast to the dtype it
    has, padding by nothing, concat of one tensor: all return their operand unchanged."""
    if len(node.inputs) != 1 or not _same_type(rw, node.inputs[0], node):
        return None
    if node.op == "pad" and any(node.attrs["pads"]):
        return None  # pads of +1 and -1 on one axis keep the shape but shift the data
    return [node.inputs[0]]


@RULES.rule("reshape")
def collapse_reshape_chain(node: Node, rw: Rewriter) -> Sequence[str] | None:
    """reshape(reshape(x)) is one reshape of x: both keep the row-major element order."""
    inner = rw.producer(node.inputs[0])
    if inner is None or inner.op != "reshape":
        return None
    return [rw.emit("reshape", [inner.inputs[0]], dict(node.attrs), name=node.outputs[0])]


@RULES.rule("permute")
def drop_identity_permute(node: Node, rw: Rewriter) -> Sequence[str] | None:
    """A permutation that keeps every axis in place."""
    if tuple(node.attrs["perm"]) != tuple(range(len(node.attrs["perm"]))):
        return None
    return [node.inputs[0]]


@RULES.rule("permute")
def compose_permutes(node: Node, rw: Rewriter) -> Sequence[str] | None:
    """permute(permute(x, a), b) == permute(x, [a[i] for i in b])."""
    inner = rw.producer(node.inputs[0])
    if inner is None or inner.op != "permute":
        return None
    first, second = inner.attrs["perm"], node.attrs["perm"]
    perm = [first[i] for i in second]
    return [rw.emit("permute", [inner.inputs[0]], {"perm": perm}, name=node.outputs[0])]


def _constant_is(rw: Rewriter, value: str, fill: int) -> bool:
    arr = rw.constant(value)
    return arr is not None and bool(np.all(arr == fill))


# (op, operand slot holding the neutral constant, its value). Adding +0.0 turns -0.0 into
# +0.0, which compares equal: the pass is "exact" in the IEEE-equality sense.
_NEUTRAL = [("mul", 1, 1), ("mul", 0, 1), ("add", 1, 0), ("add", 0, 0), ("sub", 1, 0),
            ("div", 1, 1)]


@RULES.rule("mul", "add", "sub", "div")
def drop_neutral_operand(node: Node, rw: Rewriter) -> Sequence[str] | None:
    """x*1, 1*x, x+0, 0+x, x-0, x/1 are x when the constant does not broadcast x."""
    for op, slot, fill in _NEUTRAL:
        if node.op != op:
            continue
        other = node.inputs[1 - slot]
        if _constant_is(rw, node.inputs[slot], fill) and _same_type(rw, other, node):
            return [other]
    return None


@register_pass
class SimplifyAlgebra(Pass):
    """Remove identity ops and merge chains of reshapes and of permutes."""

    name = "simplify_algebra"
    description = "drop identity ops (x*1, x+0, same-shape reshape, ...) and merge shape chains"

    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        out, fired = rewrite_graph(graph, RULES)
        if fired:
            ctx.logger.debug("simplify_algebra: %s", dict(fired))
        return PassResult(out, bool(fired))
