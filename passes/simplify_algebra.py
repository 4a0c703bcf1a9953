"""Algebraic simplification: identities that remove or merge shape and arithmetic ops.

Every rule keeps the value's type: an op is only dropped when its output has exactly the type of
the operand that replaces it, so an ``x * ones`` that broadcasts ``x`` to a bigger shape stays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiln.ir import Graph, Node
from kiln.ir.ops._rules import as_tuple
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


def _live_taps(size: int, out: int, k: int, stride: int, pad: int, dil: int
               ) -> tuple[int, int] | None:
    """The first and last kernel tap along one axis that reads the input (not the zero
    padding) for some output position, or None when none does."""
    live = [t for t in range(k)
            if any(0 <= y * stride + t * dil - pad < size for y in range(out))]
    return (live[0], live[-1]) if live else None


@RULES.rule("conv")
def drop_dead_conv_taps(node: Node, rw: Rewriter) -> Sequence[str] | None:
    """Kernel taps that read only zero padding for every output position add nothing: a
    dilated convolution wider than its input (DeepLabV3's ASPP: dilation 36 on a 28x28 map)
    keeps only its live taps, as a smaller kernel with the padding reduced to match (a 3x3
    conv of dilation 36 becomes a 1x1 one). Only where the live taps sit symmetrically, so
    the padding stays symmetric and the output size the same."""
    w = rw.constant(node.inputs[1])
    if w is None:
        return None
    x_t, out_t = rw.type_of(node.inputs[0]), rw.type_of(node.outputs[0])
    nd = w.ndim - 2
    if not (x_t.is_static and out_t.is_static):
        return None
    a = node.attrs
    stride, pad, dil = (as_tuple(a[key], nd, key) for key in ("stride", "padding", "dilation"))
    spans, new_pad, new_dil = [], [], []
    for i in range(nd):
        k = w.shape[2 + i]
        live = _live_taps(x_t.shape[2 + i], out_t.shape[2 + i], k, stride[i], pad[i], dil[i])
        if live is None:
            return None   # a conv of padding alone: left for constant folding to see
        t0, t1 = live
        p = pad[i] - t0 * dil[i]
        if t0 != k - 1 - t1 or p < 0:
            return None
        spans.append(slice(t0, t1 + 1))
        new_pad.append(p)
        new_dil.append(dil[i] if t1 > t0 else 1)
    if all(s_.stop - s_.start == w.shape[2 + i] for i, s_ in enumerate(spans)):
        return None
    weight = rw.add_constant(w[(slice(None), slice(None), *spans)], hint=f"{node.name}.live")
    attrs = {**a, "padding": new_pad, "dilation": new_dil}
    # Symmetric live taps keep the output size: H + 2p' - d(k'-1) = H + 2p - d(k-1).
    return [rw.emit("conv", [node.inputs[0], weight, *node.inputs[2:]], attrs,
                    name=node.outputs[0])]


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
