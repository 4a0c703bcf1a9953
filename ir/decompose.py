"""Decompositions: a composite op written once and evaluated three ways.

A composite op (gelu, silu, hardswish ...) is declared in kiln.ir.ops with a decomposition: a
function of its operands and attributes that computes it from other registered ops, written
with Python arithmetic on ``Term`` values and ``apply`` for everything else::

    def _silu(x):
        return x * apply("sigmoid", x)

An ``Evaluator`` says what a Term holds and which ops it computes directly (its native forms);
every other op expands through its own decomposition. So the one formula is

- the op's NumPy reference (``NumpyEvaluator``, in float64 and rounded once),
- its kernel-IR expression (``KernelExprs`` in kiln.passes.lower.elementwise; elementwise
  ops only: an anchor's loop nest is its lowering), and
- its ONNX nodes (kiln.interop.to_onnx),

and an evaluator that has a native form for a whole composite (ONNX's Sigmoid and HardSwish,
the kernel IR's rsqrt) uses that instead. Transcendental functions stay primitives (exp, tanh,
erf ...): how to compute those is each backend's business (backends/llvm/vmath.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kiln.ir.errors import InternalError
from kiln.ir.registry import all_ops, get_op, run_reference
from kiln.ir.types import TensorType


class Term:
    """A value inside a decomposition, holding what its evaluator computes with (a NumPy array,
    a kernel-IR expression, an ONNX value name).

    Arithmetic and comparisons apply the registered ops add, sub, mul, div, neg, gt, lt, ge and
    le; a Python number operand becomes a constant of the dtype of the last Term operand
    (``where(x > 0.0, x, 0.0)``: 0.0 takes x's dtype, not the condition's).
    """

    __slots__ = ("evaluator", "value")
    __array_ufunc__ = None  # a NumPy scalar on the left defers to the Term's operators

    def __init__(self, evaluator: Evaluator, value: Any) -> None:
        self.evaluator = evaluator
        self.value = value

    def __add__(self, o): return self.evaluator.apply("add", self, o)
    def __radd__(self, o): return self.evaluator.apply("add", o, self)
    def __sub__(self, o): return self.evaluator.apply("sub", self, o)
    def __rsub__(self, o): return self.evaluator.apply("sub", o, self)
    def __mul__(self, o): return self.evaluator.apply("mul", self, o)
    def __rmul__(self, o): return self.evaluator.apply("mul", o, self)
    def __truediv__(self, o): return self.evaluator.apply("div", self, o)
    def __rtruediv__(self, o): return self.evaluator.apply("div", o, self)
    def __neg__(self): return self.evaluator.apply("neg", self)
    def __gt__(self, o): return self.evaluator.apply("gt", self, o)
    def __lt__(self, o): return self.evaluator.apply("lt", self, o)
    def __ge__(self, o): return self.evaluator.apply("ge", self, o)
    def __le__(self, o): return self.evaluator.apply("le", self, o)

    @property
    def shape(self) -> tuple[int, ...]:
        """The static shape (for decompositions that reshape; not over kernel expressions, which
        are scalars)."""
        return self.evaluator.shape_of(self.value)

    def __bool__(self) -> bool:
        # A decomposition is one formula for every element; Python branches would pick one.
        raise TypeError("a decomposition cannot branch on a value: use where(cond, a, b)")


def apply(op: str, *operands: Term | float, **attrs: Any) -> Term:
    """The registered op ``op`` applied to ``operands`` inside a decomposition."""
    evaluator = next((o.evaluator for o in operands if isinstance(o, Term)), None)
    if evaluator is None:
        raise TypeError(f"{op} of numbers only: fold it into one number")
    return evaluator.apply(op, *operands, **attrs)


def where(cond: Term, a: Term | float, b: Term | float) -> Term:
    """``a`` where ``cond`` else ``b``."""
    return apply("where", cond, a, b)


def maximum(a: Term, b: Term | float) -> Term:
    """Elementwise max (NaN propagates)."""
    return apply("maximum", a, b)


def minimum(a: Term, b: Term | float) -> Term:
    """Elementwise min (NaN propagates)."""
    return apply("minimum", a, b)


class Evaluator:
    """How decompositions are computed over one kind of value; subclasses give ``const`` and
    ``native``."""

    def const(self, value: float, like: Any) -> Any:
        """A scalar ``value`` of the dtype of ``like`` (an evaluator value)."""
        raise NotImplementedError

    def native(self, op: str, operands: Sequence[Any], attrs: Mapping[str, Any]) -> Any | None:
        """``op`` computed directly, or None where it expands through its decomposition."""
        raise NotImplementedError

    def shape_of(self, value: Any) -> tuple[int, ...]:
        """The static shape of a value, where this evaluator's values have one."""
        raise InternalError(f"{type(self).__name__} values have no shape")

    def compute(self, op: str, operands: Sequence[Any], attrs: Mapping[str, Any]) -> Any:
        """``op`` (with complete attributes, as a node carries them) on evaluator values: its
        native form where this evaluator has one, else its decomposition."""
        out = self.native(op, operands, attrs)
        return self.expand(op, operands, attrs) if out is None else out

    def expand(self, op: str, operands: Sequence[Any], attrs: Mapping[str, Any]) -> Any:
        """``op`` through its decomposition, even where a native form exists."""
        fn = get_op(op).decomposition
        if fn is None:
            raise InternalError(f"{type(self).__name__} has no form of op {op}, and {op} has "
                                "no decomposition", op=op)
        result = fn(*[Term(self, v) for v in operands], **attrs)
        if not isinstance(result, Term) or result.evaluator is not self:
            raise InternalError(f"the decomposition of {op} does not return a value computed "
                                "from its operands", op=op)
        return result.value

    def apply(self, op: str, *operands: Term | float, **attrs: Any) -> Term:
        """``op`` on Terms and Python numbers; missing attributes take their defaults."""
        like = next((o.value for o in reversed(operands) if isinstance(o, Term)), None)
        if like is None:
            raise TypeError(f"{op} of numbers only: fold it into one number")
        values = [o.value if isinstance(o, Term) else self.const(o, like) for o in operands]
        return Term(self, self.compute(op, values, get_op(op).normalize_attrs(attrs)))


class NumpyEvaluator(Evaluator):
    """Decompositions over NumPy arrays: each op without a decomposition runs its reference."""

    def const(self, value: float, like: Any) -> np.ndarray:
        return np.asarray(value, dtype=np.asarray(like).dtype)

    def native(self, op, operands, attrs):
        if get_op(op).decomposition is not None:
            return None
        (out,) = run_reference(op, operands, dict(attrs))
        return out

    def shape_of(self, value):
        return np.shape(value)


def decomposed_reference(op: str):
    """The NumPy reference of a composite op: its decomposition over float64 copies of the float
    operands, rounded once to the dtype its type rule gives."""

    def reference(*arrays: np.ndarray, **attrs: Any) -> np.ndarray:
        opdef = get_op(op)
        (out_type,) = opdef.infer([TensorType.of(np.asarray(a)) for a in arrays], attrs)
        wide = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in map(np.asarray, arrays)]
        with np.errstate(all="ignore"):
            out = NumpyEvaluator().expand(op, wide, attrs)
        return np.asarray(out).astype(out_type.dtype.numpy)

    return reference


class _UseCounter(Evaluator):
    """Values are, per operand of the op being counted, how many times an expression tree holds
    it; an op without a decomposition holds each of its operands once."""

    def const(self, value, like):
        return (0,) * len(like)

    def native(self, op, operands, attrs):
        if get_op(op).decomposition is not None:
            return None
        return tuple(sum(uses) for uses in zip(*operands))


def operand_uses(op: str, attrs: Mapping[str, Any] | None = None) -> int:
    """How many times the expression tree of composite op ``op`` holds its most used operand.

    Kernel expressions are trees, so an operand used twice (x * sigmoid(x)) is a subtree
    written twice; fusion bounds fused expressions with this count.
    """
    opdef = get_op(op)
    n = len(opdef.inputs)
    units = [tuple(int(i == k) for i in range(n)) for k in range(n)]
    return max(_UseCounter().expand(op, units, opdef.normalize_attrs(attrs)))


def decomposition_repeats() -> dict[str, int]:
    """Composite elementwise op -> most uses of one operand over its ``decomposition_cases``,
    where more than one (only those are fused as expressions)."""
    repeats = {}
    for name, opdef in all_ops().items():
        if opdef.decomposition is None or opdef.kind != "elementwise":
            continue
        uses = max(operand_uses(name, case) for case in opdef.decomposition_cases)
        if uses > 1:
            repeats[name] = uses
    return repeats
