"""Index rules of the injective ops: each output element as an expression of input elements.

Composite elementwise ops (gelu, silu, hardswish ...) have no rule here: their kernel expression
is their registered decomposition evaluated over kernel-IR expressions (``KernelExprs``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from kiln.ir import all_ops, get_op
from kiln.ir import kernel as K
from kiln.ir.decompose import Evaluator
from kiln.ir.kernel import INDEX, Const, as_expr
from kiln.passes.lower.core import (
    Lowering,
    clamp_index,
    const_scalar,
    element_rule,
    f32,
    flat_index,
    unflatten,
)


def _x(low: Lowering, node, idx):
    return low.operand(node, 0, idx)


class KernelExprs(Evaluator):
    """Decompositions over kernel-IR expressions: the ops the kernel IR computes directly are
    its native forms; composite ops expand through their decomposition (kiln.ir.decompose)."""

    def const(self, value, like: K.Expr) -> K.Expr:
        return const_scalar(value, like.dtype)

    def native(self, op, operands, attrs):
        rule = NATIVE.get(op)
        return None if rule is None else rule(*operands, **attrs)


def _clamp(x: K.Expr, min, max) -> K.Expr:
    if min is not None:
        x = K.maximum(x, const_scalar(min, x.dtype))
    if max is not None:
        x = K.minimum(x, const_scalar(max, x.dtype))
    return x


BINARY = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "pow": "pow",
          "maximum": "max", "minimum": "min", "eq": "eq", "ne": "ne", "lt": "lt", "le": "le",
          "gt": "gt", "ge": "ge"}
# Op -> function(*operands, **attrs) giving its kernel expression, for the ops the kernel IR
# (and so every backend) computes directly.
NATIVE: dict[str, Callable[..., K.Expr]] = {
    "relu": lambda x: K.maximum(x, const_scalar(0, x.dtype)),
    "clamp": _clamp,
    "neg": lambda x: -x,
    "logical_not": lambda x: K.Unary("not", x),
    "where": K.Select,
    **{op: partial(K.call, op) for op in ("exp", "log", "sqrt", "rsqrt", "tanh", "erf", "abs",
                                          "round", "sin", "cos", "atan")},
    **{op: partial(K.Binary, kop) for op, kop in BINARY.items()},
}
KERNEL = KernelExprs()


def unary_math(op: str, x: K.Expr, attrs) -> K.Expr:
    """The expression of a unary op of the registry applied to ``x``."""
    return KERNEL.compute(op, [x], attrs)


# Elementwise ops lowered through their decomposition, and every unary op unary_math lowers.
COMPOSITE = tuple(name for name, opdef in all_ops().items()
                  if opdef.kind == "elementwise" and opdef.decomposition is not None
                  and name not in NATIVE)
UNARY = tuple(op for op in (*NATIVE, *COMPOSITE) if get_op(op).inputs == ("x",))


@element_rule(*UNARY)
def _unary(low, node, value, idx):
    return unary_math(node.op, _x(low, node, idx), node.attrs)


@element_rule(*(op for op in COMPOSITE if op not in UNARY))
def _composite(low, node, value, idx):
    operands = [low.operand(node, k, idx) for k in range(len(node.inputs))]
    return KERNEL.compute(node.op, operands, node.attrs)


@element_rule("cast")
def _cast(low, node, value, idx):
    x = _x(low, node, idx)
    if node.attrs["dtype"] == "bool":
        return K.cmp("ne", x, const_scalar(0, x.dtype))
    return K.Cast(x, node.attrs["dtype"])


@element_rule("quantize")
def _quantize(low, node, value, idx):
    # kiln.ir.ops.quant: clamp(rint(x / scale) + zero_point) in float32; NaN -> the low end.
    a = node.attrs
    lo, hi = (0, 255) if a["dtype"] == "u8" else (-128, 127)
    q = K.Unary("round", _x(low, node, idx) / f32(a["scale"])) + f32(float(a["zero_point"]))
    # q >= lo is false for NaN: one select is both the lower clamp and the NaN rule (q
    # appears twice, not four times: these expressions are trees, and a requantizing
    # epilogue nests several).
    q = K.Select(K.cmp("ge", q, f32(float(lo))), q, f32(float(lo)))
    return K.Cast(K.minimum(q, f32(float(hi))), a["dtype"])


@element_rule("dequantize")
def _dequantize(low, node, value, idx):
    a = node.attrs
    centered = K.Cast(_x(low, node, idx), "i32") - Const(a["zero_point"], "i32")
    return K.Cast(centered, "f32") * f32(a["scale"])


@element_rule(*BINARY)
def _binary(low, node, value, idx):
    return K.Binary(BINARY[node.op], low.operand(node, 0, idx), low.operand(node, 1, idx))


@element_rule("where")
def _where(low, node, value, idx):
    return K.Select(low.operand(node, 0, idx), low.operand(node, 1, idx),
                    low.operand(node, 2, idx))


@element_rule("batch_norm")
def _batch_norm(low, node, value, idx):
    x, mean, var, w, b = node.inputs
    arrays = [low.constant_value(v) for v in (mean, var, w, b)]
    c = idx[1]
    if all(a is not None for a in arrays):
        m, v, ww, bb = (a.astype(np.float64) for a in arrays)
        scale = ww / np.sqrt(v + node.attrs["eps"])
        shift = bb - m * scale
        dt = low.dtype(x)
        sc = low.constant(scale.astype(K.np_dtype(dt)), f"{node.name}_scale")
        sh = low.constant(shift.astype(K.np_dtype(dt)), f"{node.name}_shift")
        return (low.element(x, idx) * K.Load(sc, c, dt)) + K.Load(sh, c, dt)
    xe = low.element(x, idx)
    me, ve, we, be = (low.element(v, [c]) for v in (mean, var, w, b))
    return (xe - me) * (we / K.call("sqrt", ve + f32(node.attrs["eps"], xe.dtype))) + be


@element_rule("embedding")
def _embedding(low, node, value, idx):
    indices, weight = node.inputs
    rows, dim = low.shape(weight)
    row = K.Cast(low.element(indices, idx[:-1]), INDEX)
    # An index outside the table reads row 0 and yields NaN instead of reading out of bounds.
    safe = clamp_index(row, rows)
    ok = K.Binary("and", K.cmp("ge", row, as_expr(0)), K.cmp("lt", row, as_expr(rows)))
    dt = low.dtype(weight)
    return K.Select(ok, low.element_flat(weight, safe * dim + idx[-1]), f32(float("nan"), dt))


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list, list]]:
    """Runs of dims (size-1 dims left out) with equal products in two shapes of one element
    count: [1, 32, 768] -> [1, 32, 12, 64] gives ([1], [1]) and ([2], [2, 3])."""
    si = [i for i, d in enumerate(src) if d != 1]
    dj = [j for j, d in enumerate(dst) if d != 1]
    groups = []
    a = b = 0
    while a < len(si) or b < len(dj):
        gi, gj, pi, pj = [], [], 1, 1
        while True:
            if (pi <= pj and a < len(si)) or b >= len(dj):
                gi.append(si[a])
                pi *= src[si[a]]
                a += 1
            else:
                gj.append(dj[b])
                pj *= dst[dj[b]]
                b += 1
            if pi == pj:
                break
        groups.append((gi, gj))
    return groups


@element_rule("reshape")
def _reshape(low, node, value, idx):
    x = node.inputs[0]
    if not low.is_inline(x):
        return low.element_flat(x, flat_index(idx, low.shape(value)))
    # Map index runs without a flat detour where the reshape only splits or merges dims, so
    # the index stays affine (and vectorizable) through views like [B, T, C] -> [B, T, H, D].
    src, dst = low.shape(x), low.shape(value)
    in_idx: list = [Const(0, INDEX)] * len(src)
    for gi, gj in reshape_groups(src, dst):
        flat = flat_index([idx[j] for j in gj], [dst[j] for j in gj])
        if len(gi) == 1:
            in_idx[gi[0]] = flat
        else:
            for d, e in zip(gi, unflatten(flat, [src[d] for d in gi])):
                in_idx[d] = e
    return low.element(x, in_idx)


@element_rule("permute")
def _permute(low, node, value, idx):
    perm = node.attrs["perm"]
    src = [None] * len(perm)
    for k, p in enumerate(perm):
        src[p] = idx[k]
    return low.element(node.inputs[0], src)


@element_rule("slice")
def _slice(low, node, value, idx):
    a = node.attrs
    src = list(idx)
    src[a["axis"]] = idx[a["axis"]] * a["step"] + a["start"]
    return low.element(node.inputs[0], src)


@element_rule("split")
def _split(low, node, value, idx):
    a = node.attrs
    k = node.outputs.index(value)
    src = list(idx)
    src[a["axis"]] = idx[a["axis"]] + sum(a["sizes"][:k])
    return low.element(node.inputs[0], src)


@element_rule("expand")
def _expand(low, node, value, idx):
    return low.element(node.inputs[0], low.broadcast_index(node.inputs[0], idx))


@element_rule("pad")
def _pad(low, node, value, idx):
    x = node.inputs[0]
    shape = low.shape(x)
    pads = node.attrs["pads"]
    src, ok = [], None
    for k, d in enumerate(shape):
        lo = pads[2 * k]
        if lo <= 0 and pads[2 * k + 1] <= 0:  # cropping only: always inside
            src.append(idx[k] - lo)
            continue
        i = idx[k] - lo
        inside = K.Binary("and", K.cmp("ge", i, as_expr(0)), K.cmp("lt", i, as_expr(d)))
        ok = inside if ok is None else K.Binary("and", ok, inside)
        src.append(clamp_index(i, d))
    e = low.element(x, src)
    if ok is None:
        return e
    return K.Select(ok, e, const_scalar(node.attrs["value"], e.dtype))


@element_rule("concat")
def _concat(low, node, value, idx):
    axis = node.attrs["axis"]
    offset = 0
    pieces = []
    for v in node.inputs:
        n = low.shape(v)[axis]
        src = list(idx)
        src[axis] = clamp_index(idx[axis] - offset, n) if len(node.inputs) > 1 else idx[axis]
        pieces.append((offset + n, low.element(v, src)))
        offset += n
    e = pieces[-1][1]
    for end, piece in reversed(pieces[:-1]):
        e = K.Select(K.cmp("lt", idx[axis], as_expr(end)), piece, e)
    return e

