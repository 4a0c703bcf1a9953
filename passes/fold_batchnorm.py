"""Batch-norm folding: inference batch_norm is a per-channel affine map y = x * scale + shift.

When ``x`` comes from a conv, conv_transpose or linear with constant weights that nothing else
reads, the map goes into that op's weights and bias. Any other batch_norm with constant
statistics becomes ``mul`` + ``add`` by per-channel constants, so later passes and backends
see plain elementwise ops they can fuse instead of a norm op. Constants are computed in float64
and rounded once to the weights' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiln.ir import Graph, Node
from kiln.passes.base import Pass, PassContext, PassResult, register_pass
from kiln.passes.rewrite import Rewriter, RuleTable, rewrite_graph

RULES = RuleTable("fold_batchnorm")


def _scale_shift(node: Node, rw: Rewriter) -> tuple[np.ndarray, np.ndarray] | None:
    """The batch_norm's per-channel scale and shift in float64, if its statistics are
    constants."""
    params = [rw.constant(v) for v in node.inputs[1:]]
    if any(p is None for p in params):
        return None
    mean, var, weight, bias = (p.astype(np.float64) for p in params)
    scale = weight / np.sqrt(var + node.attrs["eps"])
    return scale, bias - mean * scale


def _scaled_weight(op: str, w: np.ndarray, scale: np.ndarray, groups: int) -> np.ndarray:
    """``w`` (float64) with each output channel's filter multiplied by its scale."""
    if op == "conv_transpose":
        # Weight is [Cin, Cout/groups, *k]; output channel g*(Cout/groups)+j is w[g-block, j].
        cog = w.shape[1]
        wg = w.reshape((groups, w.shape[0] // groups, cog) + w.shape[2:])
        wg = wg * scale.reshape((groups, 1, cog) + (1,) * (w.ndim - 2))
        return wg.reshape(w.shape)
    # conv weight [Cout, Cin/groups, *k] and linear weight [out, in]: output channel first.
    return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))


def _foldable_producer(node: Node, rw: Rewriter) -> Node | None:
    x = node.inputs[0]
    prod = rw.producer(x)
    if prod is None or prod.op not in ("conv", "conv_transpose", "linear"):
        return None
    # batch_norm normalizes axis 1; a linear's features are its last axis.
    if prod.op == "linear" and rw.type_of(x).rank != 2:
        return None
    # Another reader (or a graph output) still needs the unnormalized values.
    if rw.num_uses(x) != 1:
        return None
    if any(rw.constant(v) is None for v in prod.inputs[1:]):
        return None
    return prod


@RULES.rule("batch_norm")
def fold_into_producer(node: Node, rw: Rewriter) -> Sequence[str] | None:
    """batch_norm(conv(x, w, b)) -> conv(x, w * scale, b * scale + shift)."""
    prod = _foldable_producer(node, rw)
    affine = _scale_shift(node, rw)
    if prod is None or affine is None:
        return None
    scale, shift = affine
    w = rw.constant(prod.inputs[1])
    b = rw.constant(prod.inputs[2]) if len(prod.inputs) == 3 else None
    new_w = _scaled_weight(prod.op, w.astype(np.float64), scale, prod.attrs.get("groups", 1))
    new_b = shift if b is None else b.astype(np.float64) * scale + shift
    w_name = rw.add_constant(new_w.astype(w.dtype), hint=f"{prod.inputs[1]}.bn")
    b_hint = f"{prod.inputs[2]}.bn" if b is not None else f"{node.name}.bias"
    b_name = rw.add_constant(new_b.astype(w.dtype), hint=b_hint)
    return [rw.emit(prod.op, [prod.inputs[0], w_name, b_name], dict(prod.attrs),
                    name=node.outputs[0], source=prod.source)]


@RULES.rule("batch_norm")
def lower_to_scale_shift(node: Node, rw: Rewriter) -> Sequence[str] | None:
    """batch_norm(x) -> x * scale + shift with [C, 1, ...] constants (x is [N, C, ...])."""
    affine = _scale_shift(node, rw)
    if affine is None:
        return None
    dtype = rw.type_of(node.outputs[0]).dtype.numpy
    shape = (-1,) + (1,) * (rw.type_of(node.inputs[0]).rank - 2)
    scale, shift = (a.astype(dtype).reshape(shape) for a in affine)
    scaled = rw.emit("mul", [node.inputs[0], rw.add_constant(scale, hint=f"{node.name}.scale")])
    return [rw.emit("add", [scaled, rw.add_constant(shift, hint=f"{node.name}.shift")],
                    name=node.outputs[0])]


@register_pass
class FoldBatchNorm(Pass):
    """Fold inference batch_norm into the producing conv/linear, else into mul + add."""

    name = "fold_batchnorm"
    description = "fold batch_norm into the conv/linear before it, or lower it to mul + add"

    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        out, fired = rewrite_graph(graph, RULES)
        if fired:
            ctx.logger.debug("fold_batchnorm: %s", dict(fired))
        return PassResult(out, bool(fired))
