"""Elementwise ops: unary activations and math, broadcasting binary ops, comparisons, where.

References compute transcendental functions in float64 and round once, so they are at least as
accurate as any backend they judge. Composite activations are declared by their decomposition
(kiln.ir.decompose), which is also their reference, lowering and ONNX export."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from kiln.ir.decompose import apply, maximum, minimum, where
from kiln.ir.errors import ShapeError
from kiln.ir.ops._rules import broadcast, same_dtype, want_float
from kiln.ir.registry import REQUIRED, register
from kiln.ir.types import DType, TensorType


def _in64(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Run ``fn`` in float64 and round the result to the operand's dtype."""

    def run(x: np.ndarray, **attrs) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.asarray(fn(x.astype(np.float64), **attrs)).astype(x.dtype)

    return run


def _numeric_same_type(ins, attrs):
    # Like binary arithmetic, these make no sense on bool (PyTorch rejects them too).
    if ins[0].dtype == DType.bool:
        raise ShapeError("arithmetic on bool tensors", hint="cast to f32 or i64 first")
    return [ins[0]]


def _float_same_type(ins, attrs):
    want_float(ins[0])
    return [ins[0]]


def _unary(name: str, ref, description: str, *, float_only: bool = True, attrs=None,
           flops_per_element: int = 1, decomposition=None, decomposition_cases=({},)) -> None:
    """Declare a unary op by its NumPy reference ``ref`` or, for a composite op, by its
    ``decomposition`` (then ``ref`` is None)."""
    register(
        name,
        ["x"],
        infer=_float_same_type if float_only else _numeric_same_type,
        reference=ref,
        decomposition=decomposition,
        decomposition_cases=decomposition_cases,
        kind="elementwise",
        description=description,
        attrs=attrs,
        flops=lambda ins, outs, a: outs[0].numel * flops_per_element,
    )


def _erf(x: np.ndarray) -> np.ndarray:
    # SciPy is imported on first use: loading a compiled artifact needs only NumPy.
    from scipy import special

    return special.erf(x)


def _check_gelu(ins, attrs):
    if attrs["approximate"] not in ("none", "tanh"):
        raise ShapeError(f"gelu approximate={attrs['approximate']!r} must be 'none' or 'tanh'")
    return _float_same_type(ins, attrs)


def _clamp_ref(x, min, max):
    out = x
    if min is not None:
        out = np.where(out < min, np.asarray(min, x.dtype), out)
    if max is not None:
        out = np.where(out > max, np.asarray(max, x.dtype), out)
    return out.astype(x.dtype)


# ---- composite ops: one formula each, which the reference, lowering and ONNX export share ----
# The operand order of each product and sum is the kernel expression's (and so the generated
# code's): keep it when editing a formula.
def _leaky_relu(x, negative_slope):
    return where(x > 0.0, x, x * negative_slope)


def _gelu(x, approximate):
    if approximate == "tanh":
        inner = (x + x * x * x * 0.044715) * math.sqrt(2 / math.pi)
        return 0.5 * x * (1.0 + apply("tanh", inner))
    return 0.5 * x * (1.0 + apply("erf", x * (1 / math.sqrt(2))))


def _sigmoid(x):
    return 1.0 / (1.0 + apply("exp", -x))


def _silu(x):
    return x * apply("sigmoid", x)


def _hardsigmoid(x):
    return minimum(maximum(x + 3.0, 0.0), 6.0) / 6.0


def _hardswish(x):
    return x * minimum(maximum(x + 3.0, 0.0), 6.0) / 6.0


def _rsqrt(x):
    return apply("reciprocal", apply("sqrt", x))


def _reciprocal(x):
    return 1.0 / x


def _softsign(x):
    return x / (1.0 + apply("abs", x))


_unary("relu", lambda x: np.maximum(x, np.zeros((), x.dtype)), "max(x, 0); NaN stays NaN",
       float_only=False)
_unary("clamp", _clamp_ref, "min(max(x, min), max); either bound may be null (ReLU6, hardtanh)",
       float_only=False, attrs={"min": None, "max": None})
_unary("leaky_relu", None, "x if x > 0 else negative_slope * x",
       attrs={"negative_slope": 0.01}, decomposition=_leaky_relu)
register("gelu", ["x"], infer=_check_gelu, decomposition=_gelu,
         decomposition_cases=[{"approximate": "none"}, {"approximate": "tanh"}],
         kind="elementwise",
         description="Gaussian error linear unit, exact (erf) or tanh approximation",
         attrs={"approximate": "none"}, flops=lambda i, o, a: o[0].numel * 8)
_unary("silu", None, "x * sigmoid(x)", flops_per_element=4, decomposition=_silu)
_unary("sigmoid", None, "1 / (1 + exp(-x))", flops_per_element=4, decomposition=_sigmoid)
_unary("tanh", _in64(np.tanh), "hyperbolic tangent", flops_per_element=4)
_unary("hardswish", None, "x * relu6(x + 3) / 6", flops_per_element=4,
       decomposition=_hardswish)
_unary("hardsigmoid", None, "relu6(x + 3) / 6", flops_per_element=3,
       decomposition=_hardsigmoid)
_unary("softsign", None, "x / (1 + |x|)", flops_per_element=3, decomposition=_softsign)
_unary("exp", _in64(np.exp), "e ** x", flops_per_element=4)
_unary("log", _in64(np.log), "natural logarithm", flops_per_element=4)
_unary("sqrt", _in64(np.sqrt), "square root")
_unary("rsqrt", None, "1 / sqrt(x)", flops_per_element=2, decomposition=_rsqrt)
_unary("erf", _in64(_erf), "error function", flops_per_element=8)
_unary("reciprocal", None, "1 / x", decomposition=_reciprocal)
_unary("neg", np.negative, "-x", float_only=False)
_unary("abs", np.abs, "|x|", float_only=False)
_unary("round", np.rint, "nearest integer, halves to even (as torch.round and ONNX Round)")
_unary("sin", _in64(np.sin), "sine (radians)", flops_per_element=8)
_unary("cos", _in64(np.cos), "cosine (radians)", flops_per_element=8)
_unary("atan", _in64(np.arctan), "arc tangent, in (-pi/2, pi/2)", flops_per_element=8)


def _cast_infer(ins, attrs):
    if attrs["dtype"] not in {d.value for d in DType}:
        raise ShapeError(f"cast to unknown dtype {attrs['dtype']!r}",
                         hint=f"use one of {[d.value for d in DType]}")
    return [TensorType(ins[0].shape, DType(attrs["dtype"]))]


def _cast_ref(x, dtype):
    target = DType(dtype).numpy
    if target.kind in "iu" and x.dtype.kind == "f":
        # Match PyTorch: float -> int truncates toward zero.
        return np.trunc(x).astype(target)
    return x.astype(target)


register("cast", ["x"], infer=_cast_infer, reference=_cast_ref, kind="elementwise",
         description="convert to another dtype (float -> int truncates)",
         attrs={"dtype": REQUIRED})


# ---- binary ----------------------------------------------------------------------------------
def _binary_infer(float_only: bool):
    def infer(ins, attrs):
        dt = same_dtype(ins)
        if float_only:
            want_float(ins[0])
        if dt == DType.bool:
            raise ShapeError("arithmetic on bool tensors", hint="cast to f32 or i64 first")
        return [TensorType(broadcast(ins[0].shape, ins[1].shape), dt)]

    return infer


def _arith(fn):
    def run(a, b):
        with np.errstate(all="ignore"):
            return np.asarray(fn(a, b)).astype(np.result_type(a, b))

    return run


def _binary(name, ref, description, float_only=False):
    register(name, ["a", "b"], infer=_binary_infer(float_only), reference=ref,
             kind="elementwise", description=description)


_binary("add", _arith(np.add), "a + b with broadcasting")
_binary("sub", _arith(np.subtract), "a - b with broadcasting")
_binary("mul", _arith(np.multiply), "a * b with broadcasting")
_binary("div", _arith(np.divide), "a / b with broadcasting (true division)", float_only=True)
_binary("pow", lambda a, b: _in64(lambda x, e: np.power(x, e))(a, e=b.astype(np.float64)),
        "a ** b with broadcasting", float_only=True)
_binary("maximum", _arith(lambda a, b: np.where(np.isnan(a) | np.isnan(b), np.nan,
                                                 np.maximum(a, b)) if a.dtype.kind == "f"
                          else np.maximum(a, b)), "elementwise max (NaN propagates)")
_binary("minimum", _arith(lambda a, b: np.where(np.isnan(a) | np.isnan(b), np.nan,
                                                 np.minimum(a, b)) if a.dtype.kind == "f"
                          else np.minimum(a, b)), "elementwise min (NaN propagates)")


def _compare_infer(ins, attrs):
    same_dtype(ins)
    return [TensorType(broadcast(ins[0].shape, ins[1].shape), DType.bool)]


for _name, _fn in [("eq", np.equal), ("ne", np.not_equal), ("lt", np.less),
                   ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal)]:
    register(_name, ["a", "b"], infer=_compare_infer, reference=_fn, kind="elementwise",
             description=f"a {_name} b with broadcasting, giving bool")


def _where_infer(ins, attrs):
    cond, a, b = ins
    if cond.dtype != DType.bool:
        raise ShapeError(f"where's condition must be bool, got {cond.dtype}")
    dt = same_dtype([a, b])
    return [TensorType(broadcast(cond.shape, a.shape, b.shape), dt)]


register("where", ["cond", "a", "b"], infer=_where_infer,
         reference=lambda c, a, b: np.where(c, a, b).astype(np.result_type(a, b)),
         kind="elementwise", description="a where cond else b, with broadcasting")


def _not_infer(ins, attrs):
    if ins[0].dtype != DType.bool:
        raise ShapeError(f"logical_not wants bool, got {ins[0].dtype}")
    return [ins[0]]


register("logical_not", ["x"], infer=_not_infer, reference=np.logical_not, kind="elementwise",
         description="not x, for bool tensors")
