"""More PyTorch operations as kiln IR: activations, statistics, norms, padding modes, adaptive max
pooling, einsum, attention modules and in-place variants.

Every operation here is a decomposition into ops kiln already has (elementwise chains fuse into
one kernel, so ELU or Mish cost one pass over the data, as a primitive op would). Importing this
module registers the handlers in ``kiln.frontend.handlers``' tables; ``kiln.frontend.trace``
imports it.
"""

from __future__ import annotations

import inspect
import math
import operator
import string
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kiln.frontend.handlers import (
    HANDLERS,
    MODULE_HANDLERS,
    method,
    on,
    on_module,
    permute,
    reshape_to,
)
from kiln.frontend.importer import Importer, Traced, has_traced, kiln_dtype
from kiln.ir import DType

aten = torch.ops.aten

# torch's SELU constants (torch/nn/modules/activation.py, Klambauer et al. 2017).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _shape(imp: Importer, v: str) -> tuple[int, ...]:
    return imp.type_of(v).shape


def _num(imp: Importer, v: str, x: float) -> str:
    """A scalar constant of ``v``'s dtype."""
    return imp.value(float(x), imp.type_of(v).dtype)


def _axes(dim: Any, rank: int) -> tuple[int, ...] | None:
    """Sorted non-negative axes of a dim argument (None or empty: all axes)."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(sorted({int(d) % rank for d in dims}))


# ---- activations -----------------------------------------------------------------------------
def elu_value(imp: Importer, x: Any, alpha: float = 1.0, scale: float = 1.0,
              input_scale: float = 1.0) -> str:
    """scale * (x if x > 0 else alpha * (exp(x * input_scale) - 1)): ELU, SELU and CELU."""
    v = imp.value(x)
    z = v if input_scale == 1.0 else imp.op("mul", [v, _num(imp, v, input_scale)])
    neg = imp.op("sub", [imp.op("exp", [z]), _num(imp, v, 1.0)])
    if alpha != 1.0:
        neg = imp.op("mul", [neg, _num(imp, v, alpha)])
    out = imp.op("where", [imp.op("gt", [v, _num(imp, v, 0.0)]), v, neg])
    if scale != 1.0:
        out = imp.op("mul", [out, _num(imp, v, scale)])
    return out


@on(F.elu, aten.elu)
def _elu(imp, real, input, alpha=1.0, *args, **kwargs):
    if imp.node.op == "call_function" and isinstance(imp.node.target, torch._ops.OpOverload):
        # aten.elu(self, alpha, scale, input_scale)
        scale = float(args[0]) if args else float(kwargs.get("scale", 1.0))
        input_scale = float(args[1]) if len(args) > 1 else float(kwargs.get("input_scale", 1.0))
        return elu_value(imp, input, float(alpha), scale, input_scale)
    return elu_value(imp, input, float(alpha))


@on(F.selu, torch.selu, aten.selu, method("selu"))
def _selu(imp, real, input, inplace=False):
    return elu_value(imp, input, SELU_ALPHA, SELU_SCALE)


@on(F.celu, torch.celu, aten.celu, method("celu"))
def _celu(imp, real, input, alpha=1.0, inplace=False):
    return elu_value(imp, input, float(alpha), 1.0, 1.0 / float(alpha))


@on_module(nn.ELU)
def _elu_mod(imp, mod, real, x):
    return elu_value(imp, x, float(mod.alpha))


@on_module(nn.SELU)
def _selu_mod(imp, mod, real, x):
    return elu_value(imp, x, SELU_ALPHA, SELU_SCALE)


@on_module(nn.CELU)
def _celu_mod(imp, mod, real, x):
    return elu_value(imp, x, float(mod.alpha), 1.0, 1.0 / float(mod.alpha))


@on(torch.nan_to_num, aten.nan_to_num, aten.nan_to_num.default, method("nan_to_num"))
def _nan_to_num(imp, real, input, nan=0.0, posinf=None, neginf=None):
    """NaN -> ``nan``, +inf -> ``posinf``, -inf -> ``neginf`` (default: the dtype's largest and
    smallest finite values, as torch); other values pass through. Integer tensors are
    unchanged."""
    v = imp.value(input)
    dtype = imp.type_of(v).dtype
    if not dtype.is_float:
        return v
    info = torch.finfo(real.dtype)
    hi = info.max if posinf is None else float(posinf)
    lo = info.min if neginf is None else float(neginf)
    out = imp.op("where", [imp.op("ne", [v, v]), _num(imp, v, 0.0 if nan is None else nan), v])
    out = imp.op("where", [imp.op("eq", [v, _num(imp, v, math.inf)]), _num(imp, v, hi), out])
    return imp.op("where", [imp.op("eq", [v, _num(imp, v, -math.inf)]), _num(imp, v, lo), out])


@on(F.prelu, torch.prelu, aten.prelu, aten._prelu_kernel, method("prelu"))
def _prelu(imp, real, input, weight):
    v = imp.value(input)
    rank = len(_shape(imp, v))
    w = weight.real if isinstance(weight, Traced) else weight
    # One slope per channel (dim 1), or one for all; PyTorch's rank-1 input has no channel dim.
    shape = (w.numel(),) + (1,) * (rank - 2) if w.numel() > 1 else ()
    wv = reshape_to(imp, imp.value(weight, imp.type_of(v).dtype), shape)
    return imp.op("where", [imp.op("gt", [v, _num(imp, v, 0.0)]), v, imp.op("mul", [v, wv])])


@on_module(nn.PReLU)
def _prelu_mod(imp, mod, real, x):
    return _prelu(imp, real, x, mod.weight)


def softplus_value(imp: Importer, x: Any, beta: float = 1.0, threshold: float = 20.0) -> str:
    """log(1 + exp(beta x)) / beta, and x itself where beta x > threshold (as PyTorch)."""
    v = imp.value(x)
    bx = v if beta == 1.0 else imp.op("mul", [v, _num(imp, v, beta)])
    soft = imp.op("log", [imp.op("add", [imp.op("exp", [bx]), _num(imp, v, 1.0)])])
    if beta != 1.0:
        soft = imp.op("div", [soft, _num(imp, v, beta)])
    # Comparing x (not beta x) keeps beta x single-use, so the chain stays one fused kernel.
    big = (imp.op("gt", [v, _num(imp, v, threshold / beta)]) if beta > 0
           else imp.op("gt", [imp.op("mul", [v, _num(imp, v, beta)]), _num(imp, v, threshold)]))
    return imp.op("where", [big, v, soft])


@on(F.softplus, aten.softplus)
def _softplus(imp, real, input, beta=1.0, threshold=20.0):
    return softplus_value(imp, input, float(beta), float(threshold))


@on_module(nn.Softplus)
def _softplus_mod(imp, mod, real, x):
    return softplus_value(imp, x, float(mod.beta), float(mod.threshold))


@on(F.mish, aten.mish)
def _mish(imp, real, input, inplace=False):
    v = imp.value(input)
    return imp.op("mul", [v, imp.op("tanh", [softplus_value(imp, v)])])


@on_module(nn.Mish)
def _mish_mod(imp, mod, real, x):
    return _mish(imp, real, x)


# ---- trigonometry beyond sin, cos and atan ---------------------------------------------------
def tan_value(imp: Importer, x: Any) -> str:
    """tan(x) = sin(x) / cos(x): both are accurate relative to their size (the reduction by
    pi/2 is exact to float32), so the quotient is too, next to the poles as well."""
    v = imp.value(x)
    return imp.op("div", [imp.op("sin", [v]), imp.op("cos", [v])])


def asin_value(imp: Importer, x: Any) -> str:
    """asin(x) = atan(x / sqrt((1 - x)(1 + x))): (1 - x)(1 + x) does not cancel as 1 - x^2
    does near |x| = 1, where the quotient is +-inf and atan gives +-pi/2; |x| > 1 is NaN."""
    v = imp.value(x)
    one = _num(imp, v, 1.0)
    rest = imp.op("mul", [imp.op("sub", [one, v]), imp.op("add", [one, v])])
    return imp.op("atan", [imp.op("div", [v, imp.op("sqrt", [rest])])])


def acos_value(imp: Importer, x: Any) -> str:
    """acos(x) = 2 atan(sqrt((1 - x) / (1 + x))): no pi/2 - asin(x), which would cancel to
    a large relative error near x = 1; x = -1 gives 2 atan(inf) = pi, |x| > 1 NaN."""
    v = imp.value(x)
    one = _num(imp, v, 1.0)
    ratio = imp.op("div", [imp.op("sub", [one, v]), imp.op("add", [one, v])])
    half = imp.op("atan", [imp.op("sqrt", [ratio])])
    return imp.op("mul", [half, _num(imp, v, 2.0)])


for _keys, _fn in [((torch.tan, aten.tan, method("tan")), tan_value),
                   ((torch.asin, torch.arcsin, aten.asin, aten.arcsin, method("asin"),
                     method("arcsin")), asin_value),
                   ((torch.acos, torch.arccos, aten.acos, aten.arccos, method("acos"),
                     method("arccos")), acos_value)]:
    on(*_keys)(lambda imp, real, x, _fn=_fn: _fn(imp, x))


# ---- in-place variants -----------------------------------------------------------------------
def _rebind(x: Any, out: Any, imp: Importer) -> None:
    if isinstance(x, Traced):
        x.value = imp.value(imp.value(out), kiln_dtype(x.dtype))


def _inplace(functional):
    """The handler of ``x.op_(...)``: the functional op's value, which from here on is also what
    ``x`` holds (later fx nodes that use ``x`` see the update, as they do in eager PyTorch)."""

    def handler(imp, real, x, *args, **kwargs):
        out = imp.value(functional(imp, real, x, *args, **kwargs))
        _rebind(x, out, imp)
        return out

    return handler


# x.relu_(), torch.relu_(x), aten.relu_ (torch.export without functionalization) ...
for _name in ["relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "neg", "abs",
              "reciprocal", "round", "add", "sub", "mul", "div", "pow", "clamp", "clip",
              "masked_fill", "selu", "celu", "elu", "silu", "hardswish", "hardsigmoid",
              "leaky_relu", "hardtanh", "mish", "sin", "cos", "tan", "asin", "acos", "atan",
              "arcsin", "arccos", "arctan"]:
    for _key, _inplace_key in [(method(_name), method(_name + "_")),
                               (getattr(torch, _name, None), getattr(torch, _name + "_", None)),
                               (getattr(aten, _name, None), getattr(aten, _name + "_", None))]:
        if _key in HANDLERS and _inplace_key is not None:
            HANDLERS[_inplace_key] = _inplace(HANDLERS[_key])
for _fn_key, _inplace_keys in [(F.relu, [F.relu_]), (F.silu, [torch._C._nn.silu_]),
                               (F.hardswish, [torch._C._nn.hardswish_]),
                               (F.hardsigmoid, [torch._C._nn.hardsigmoid_]),
                               (F.leaky_relu, [F.leaky_relu_]), (F.hardtanh, [F.hardtanh_]),
                               (F.elu, [F.elu_]), (F.selu, [F.selu_]), (F.celu, [F.celu_])]:
    for _k in _inplace_keys:
        HANDLERS[_k] = _inplace(HANDLERS[_fn_key])


def _inplace_flag(function, handler):
    """The handler of ``function(x, ..., inplace=...)`` (F.relu, F.silu ...): as ``handler``,
    and with ``inplace=True`` the result is also what ``x`` holds from here on."""
    signature = inspect.signature(function)

    def wrapped(imp, real, x, *args, **kwargs):
        out = handler(imp, real, x, *args, **kwargs)
        if signature.bind(x, *args, **kwargs).arguments.get("inplace", False):
            _rebind(x, out, imp)
        return out

    return wrapped


def _inplace_module(handler):
    """A module handler that, for a module built with ``inplace=True``, rebinds its input."""

    def wrapped(imp, mod, real, x, *args, **kwargs):
        out = handler(imp, mod, real, x, *args, **kwargs)
        if getattr(mod, "inplace", False):
            _rebind(x, out, imp)
        return out

    return wrapped


for _f in [F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.hardtanh,
           F.elu, F.selu, F.celu, F.mish]:
    if _f in HANDLERS:
        HANDLERS[_f] = _inplace_flag(_f, HANDLERS[_f])
for _cls in [nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
             nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish]:
    if _cls in MODULE_HANDLERS:
        MODULE_HANDLERS[_cls] = _inplace_module(MODULE_HANDLERS[_cls])


@on(torch.clamp_min, aten.clamp_min, method("clamp_min"))
def _clamp_min(imp, real, input, min):
    v = imp.value(input)
    return imp.op("maximum", [v, imp.value(min, imp.type_of(v).dtype)])


@on(torch.clamp_max, aten.clamp_max, method("clamp_max"))
def _clamp_max(imp, real, input, max):
    v = imp.value(input)
    return imp.op("minimum", [v, imp.value(max, imp.type_of(v).dtype)])


HANDLERS[method("clamp_min_")] = _inplace(_clamp_min)
HANDLERS[method("clamp_max_")] = _inplace(_clamp_max)


# ---- statistics and norms --------------------------------------------------------------------
def variance(imp: Importer, x: Any, dim: Any, correction: float, keepdim: bool) -> str:
    """sum((x - mean)^2) / (N - correction) over ``dim`` (None: all axes)."""
    v = imp.value(x)
    shape = _shape(imp, v)
    axes = _axes(dim, len(shape))
    n = math.prod(shape[a] for a in (axes if axes is not None else range(len(shape))))
    mean = imp.op("reduce_mean", [v], {"axes": axes, "keepdim": True})
    d = imp.op("sub", [v, mean])
    ss = imp.op("reduce_sum", [imp.op("mul", [d, d])], {"axes": axes, "keepdim": bool(keepdim)})
    return imp.op("div", [ss, _num(imp, v, max(n - correction, 0))])


def _var_args(args, kwargs) -> tuple[Any, float, bool]:
    """(dim, correction, keepdim) of torch.var / std in any of their signatures."""
    dim, unbiased, keepdim = None, True, kwargs.get("keepdim", False)
    rest = list(args)
    if rest and isinstance(rest[0], bool):  # var(input, unbiased)
        unbiased = rest.pop(0)
    elif rest:
        dim = rest.pop(0)
        if rest and (isinstance(rest[0], bool) or rest[0] is None):  # var(x, dim, unbiased, kd)
            unbiased = rest.pop(0) if rest[0] is not None else True
        if rest:
            keepdim = rest.pop(0)
    dim = kwargs.get("dim", dim)
    unbiased = kwargs.get("unbiased", unbiased)
    correction = kwargs.get("correction")
    if correction is None:
        correction = 1 if unbiased else 0
    return dim, float(correction), bool(keepdim)


@on(torch.var, aten.var, method("var"))
def _var(imp, real, input, *args, **kwargs):
    dim, correction, keepdim = _var_args(args, kwargs)
    return variance(imp, input, dim, correction, keepdim)


@on(torch.std, aten.std, method("std"))
def _std(imp, real, input, *args, **kwargs):
    dim, correction, keepdim = _var_args(args, kwargs)
    return imp.op("sqrt", [variance(imp, input, dim, correction, keepdim)])


def vector_norm(imp: Importer, x: Any, p: Any, dim: Any, keepdim: bool) -> str:
    """The p-norm of ``x`` over ``dim`` (None: all axes): p = 2, 1, inf, -inf, 0 or any other
    positive number."""
    v = imp.value(x)
    if not imp.type_of(v).dtype.is_float:
        v = imp.value(v, DType.f32)
    axes = _axes(dim, len(_shape(imp, v)))
    attrs = {"axes": axes, "keepdim": bool(keepdim)}
    p = 2.0 if p is None or p == "fro" else p
    if isinstance(p, str):
        raise imp.error(f"norm p={p!r} is not supported", hint="use p=2, 1 or inf")
    p = float(p)
    a = imp.op("abs", [v])
    if p == math.inf:
        return imp.op("reduce_max", [a], attrs)
    if p == -math.inf:
        return imp.op("reduce_min", [a], attrs)
    if p == 1.0:
        return imp.op("reduce_sum", [a], attrs)
    if p == 2.0:
        return imp.op("sqrt", [imp.op("reduce_sum", [imp.op("mul", [v, v])], attrs)])
    if p == 0.0:
        nz = imp.op("cast", [imp.op("ne", [v, _num(imp, v, 0.0)])],
                    {"dtype": imp.type_of(v).dtype.value})
        return imp.op("reduce_sum", [nz], attrs)
    if p < 0:
        raise imp.error(f"norm with p={p} is not supported", hint="use p=2, 1 or inf")
    s = imp.op("reduce_sum", [imp.op("pow", [a, _num(imp, v, p)])], attrs)
    return imp.op("pow", [s, _num(imp, v, 1.0 / p)])


@on(torch.linalg.vector_norm, aten.linalg_vector_norm)
def _vector_norm(imp, real, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    return vector_norm(imp, x, ord, dim, keepdim)


@on(torch.norm, method("norm"), aten.norm)
def _norm(imp, real, input, p="fro", dim=None, keepdim=False, dtype=None, **kwargs):
    return vector_norm(imp, input, p, dim, keepdim)


@on(F.normalize)
def _normalize(imp, real, input, p=2.0, dim=1, eps=1e-12, out=None):
    v = imp.value(input)
    norm = vector_norm(imp, v, p, dim, True)
    norm = imp.op("maximum", [norm, _num(imp, v, eps)])
    return imp.op("div", [v, norm])


def instance_norm(imp: Importer, x: Any, weight: Any, bias: Any, eps: float) -> str:
    """Instance norm with the input's own statistics: a group norm with one channel a group."""
    v = imp.value(x)
    c = _shape(imp, v)[1]
    ins = [v]
    if weight is not None or bias is not None:
        ins.append(imp.value(weight if weight is not None else torch.ones(c)))
        if bias is not None:
            ins.append(imp.value(bias))
    return imp.op("group_norm", ins, {"groups": c, "eps": float(eps)})


def _instance_norm_stats(imp, x, running_mean, running_var, weight, bias, use_input_stats,
                         eps):
    if use_input_stats or running_mean is None:
        return instance_norm(imp, x, weight, bias, eps)
    c = x.shape[1]
    ins = [imp.value(x), imp.value(running_mean), imp.value(running_var),
           imp.value(weight if weight is not None else torch.ones(c)),
           imp.value(bias if bias is not None else torch.zeros(c))]
    return imp.op("batch_norm", ins, {"eps": float(eps)})


@on(F.instance_norm, aten.instance_norm)
def _instance_norm(imp, real, input, running_mean=None, running_var=None, weight=None,
                   bias=None, use_input_stats=True, momentum=0.1, eps=1e-5, *args, **kwargs):
    return _instance_norm_stats(imp, input, running_mean, running_var, weight, bias,
                                use_input_stats, eps)


@on_module(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _instance_norm_mod(imp, mod, real, x):
    use_input_stats = not mod.track_running_stats or mod.running_mean is None
    return _instance_norm_stats(imp, x, mod.running_mean, mod.running_var, mod.weight,
                                mod.bias, use_input_stats, mod.eps)


# ---- adaptive max pooling --------------------------------------------------------------------
def adaptive_max_pool(imp: Importer, x: Any, out_sizes: Sequence[int]) -> str:
    """Adaptive max pooling: a max_pool where every window has the same size, else (max being
    separable) one reduce_max per output row, then per output column."""
    v = imp.value(x)
    shape = _shape(imp, v)
    nd = len(out_sizes)
    ins = shape[-nd:]
    if all(i % o == 0 for i, o in zip(ins, out_sizes)):
        k = tuple(i // o for i, o in zip(ins, out_sizes))
        if len(shape) == nd + 2:
            return imp.op("max_pool", [v], {"kernel": k, "stride": k, "padding": (0,) * nd,
                                            "dilation": (1,) * nd, "ceil_mode": False})
    for j, (size, out) in enumerate(zip(ins, out_sizes)):
        axis = len(shape) - nd + j
        if size == out:
            continue
        parts = []
        for i in range(out):
            lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
            piece = imp.op("slice", [v], {"axis": axis, "start": lo, "end": hi, "step": 1})
            parts.append(imp.op("reduce_max", [piece], {"axes": (axis,), "keepdim": True}))
        v = parts[0] if len(parts) == 1 else imp.op("concat", parts, {"axis": axis})
    return v


def _adaptive_max_fn(imp, real, input, output_size, return_indices=False):
    if return_indices:
        raise imp.error("adaptive max pooling with return_indices is not supported")
    if not isinstance(real, tuple):
        return adaptive_max_pool(imp, input, tuple(real.shape[2:]))
    # The ATen op returns (values, indices); a graph that reads the indices is refused.
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in imp.node.users):
        raise imp.error("adaptive max pooling's indices are not supported")
    v = adaptive_max_pool(imp, input, tuple(real[0].shape[2:]))
    return (v, imp.value(real[1]))


on(F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.adaptive_max_pool1d,
   torch._C._nn.adaptive_max_pool2d, aten.adaptive_max_pool1d,
   aten.adaptive_max_pool2d)(_adaptive_max_fn)


@on_module(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
def _adaptive_max_mod(imp, mod, real, x):
    if mod.return_indices:
        raise imp.error("adaptive max pooling with return_indices is not supported")
    return adaptive_max_pool(imp, x, tuple(real.shape[2:]))


# ---- padding modes ---------------------------------------------------------------------------
def edge_pad(imp: Importer, x: Any, pads: Sequence[int], mode: str) -> str:
    """Reflect or replicate padding; ``pads`` is F.pad's list ((lo, hi) from the last dim).
    Each padded border is slices of the edge concatenated to the tensor."""
    v = imp.value(x)
    shape = _shape(imp, v)
    for j in range(len(pads) // 2):
        axis = len(shape) - 1 - j
        lo, hi = int(pads[2 * j]), int(pads[2 * j + 1])
        if lo < 0 or hi < 0:
            raise imp.error(f"{mode} padding by a negative amount is not supported")
        size = _shape(imp, v)[axis]
        if mode == "reflect" and max(lo, hi) >= size:
            raise imp.error(f"reflect padding {max(lo, hi)} must be smaller than the "
                            f"dimension's size {size}")

        def row(i, v=v, axis=axis):
            return imp.op("slice", [v], {"axis": axis, "start": i, "end": i + 1, "step": 1})

        if mode == "reflect":
            before = [row(i) for i in range(lo, 0, -1)]
            after = [row(size - 2 - i) for i in range(hi)]
        else:
            before = [row(0)] * lo
            after = [row(size - 1)] * hi
        if before or after:
            v = imp.op("concat", before + [v] + after, {"axis": axis})
    return v


_constant_pad = HANDLERS[F.pad]


@on(F.pad, aten.pad, torch._C._nn.pad)
def _pad(imp, real, input, pad, mode="constant", value=None):
    if mode in ("reflect", "replicate"):
        return edge_pad(imp, input, pad, mode)
    return _constant_pad(imp, real, input, pad, mode, value)


@on(aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d)
def _reflection_pad(imp, real, input, padding):
    return edge_pad(imp, input, padding, "reflect")


@on(aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d)
def _replication_pad(imp, real, input, padding):
    return edge_pad(imp, input, padding, "replicate")


@on_module(nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d)
def _reflection_pad_mod(imp, mod, real, x):
    return edge_pad(imp, x, mod.padding, "reflect")


@on_module(nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)
def _replication_pad_mod(imp, mod, real, x):
    return edge_pad(imp, x, mod.padding, "replicate")


# ---- shapes ----------------------------------------------------------------------------------
@on(torch.unflatten, aten.unflatten, method("unflatten"))
def _unflatten(imp, real, input, *args, **kwargs):
    return reshape_to(imp, input, real.shape)


def stochastic_depth(imp, real, input, p=0.5, mode="row", training=True):
    """torchvision.ops.stochastic_depth: the identity outside training."""
    if training and p > 0:
        raise imp.error("stochastic_depth with training=True drops rows at random",
                        hint="call model.eval() before compiling")
    return imp.value(input)


# Handlers of functions kiln cannot import (their packages are optional), by qualified name.
HANDLERS_BY_NAME = {"torchvision.ops.stochastic_depth.stochastic_depth": stochastic_depth}


# ---- einsum ----------------------------------------------------------------------------------
def _parse_einsum(imp, equation: str, n: int) -> tuple[list[str], str]:
    eq = equation.replace(" ", "")
    if "." in eq:
        raise imp.error("einsum with '...' is not supported", hint="name every dimension")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if not arrow:  # implicit output: the letters seen once, sorted
        letters = "".join(terms)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(terms) != n:
        raise imp.error(f"einsum {equation!r} names {len(terms)} operands, got {n}")
    for t in terms + [out]:
        if len(set(t)) != len(t) or not set(t) <= set(string.ascii_letters):
            raise imp.error(f"einsum {equation!r}: a letter repeated within one operand "
                            "(a diagonal or trace) is not supported",
                            hint="use torch.diagonal, or write the sum out")
    return terms, out


def _sum_out(imp, v: str, term: str, keep: set[str]) -> tuple[str, str]:
    """Sum ``v`` (labelled ``term``) over the letters not in ``keep``."""
    axes = tuple(i for i, c in enumerate(term) if c not in keep)
    if not axes:
        return v, term
    v = imp.op("reduce_sum", [v], {"axes": axes, "keepdim": False})
    return v, "".join(c for c in term if c in keep)


def einsum_value(imp: Importer, equation: str, operands: Sequence[Any]) -> str:
    """einsum of one or two operands as reduce_sum, permute, reshape and one batched matmul;
    more operands are contracted left to right."""
    terms, out = _parse_einsum(imp, equation, len(operands))
    values = [imp.value(o) for o in operands]
    sizes: dict[str, int] = {}
    for v, t in zip(values, terms):
        for c, s in zip(t, _shape(imp, v)):
            if sizes.setdefault(c, s) != s:
                raise imp.error(f"einsum {equation!r}: dimension {c!r} has sizes "
                                f"{sizes[c]} and {s} (broadcasting is not supported)")
    v, term = values[0], terms[0]
    for i in range(1, len(values)):
        later = set(out).union(*terms[i + 1:])
        v, term = _contract(imp, v, term, values[i], terms[i], later, sizes)
    v, term = _sum_out(imp, v, term, set(out))
    return permute(imp, v, [term.index(c) for c in out])


def _contract(imp, a: str, ta: str, b: str, tb: str, keep: set[str],
              sizes: dict[str, int]) -> tuple[str, str]:
    """a (labelled ta) times b (tb), summed over shared letters not in ``keep``."""
    a, ta = _sum_out(imp, a, ta, keep | set(tb))
    b, tb = _sum_out(imp, b, tb, keep | set(ta))
    batch = [c for c in ta if c in tb and c in keep]
    contracted = [c for c in ta if c in tb and c not in keep]
    left = [c for c in ta if c not in tb]
    right = [c for c in tb if c not in ta]

    def size(cs):
        return math.prod(sizes[c] for c in cs)

    a = permute(imp, a, [ta.index(c) for c in batch + left + contracted])
    b = permute(imp, b, [tb.index(c) for c in batch + contracted + right])
    a = reshape_to(imp, a, (size(batch), size(left), size(contracted)))
    b = reshape_to(imp, b, (size(batch), size(contracted), size(right)))
    prod = imp.op("matmul", [a, b])
    labels = batch + left + right
    return reshape_to(imp, prod, tuple(sizes[c] for c in labels)), "".join(labels)


@on(torch.einsum, aten.einsum)
def _einsum(imp, real, equation, *operands, path=None):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return einsum_value(imp, equation, operands)


# ---- attention modules -----------------------------------------------------------------------
def _linear(imp, v: str, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    ins = [v, imp.value(weight)] + ([imp.value(bias)] if bias is not None else [])
    return imp.op("linear", ins)


def _additive_mask(imp, mask: Any, dtype: DType, shape: tuple[int, ...]) -> str:
    """An MHA mask (bool True = do not attend, or a float added to the scores) as the float
    added to the scores, reshaped to ``shape``."""
    m = mask.real if isinstance(mask, Traced) else mask
    if m.dtype == torch.bool:
        v = imp.value(mask, DType.bool)
        v = imp.op("where", [v, imp.value(-math.inf, dtype), imp.value(0.0, dtype)])
    else:
        v = imp.value(mask, dtype)
    return reshape_to(imp, v, shape)


class AttentionWeights(NamedTuple):
    """The parameters of one nn.MultiheadAttention (the module's, or
    F.multi_head_attention_forward's arguments)."""

    num_heads: int
    proj: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q, k, v projection weights
    bias: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None

    @classmethod
    def of(cls, mod: nn.MultiheadAttention) -> AttentionWeights:
        """The weights of ``mod``."""
        e = mod.embed_dim
        if mod._qkv_same_embed_dim:
            w = mod.in_proj_weight.detach()
            proj = (w[:e], w[e:2 * e], w[2 * e:])
        else:
            proj = (mod.q_proj_weight.detach(), mod.k_proj_weight.detach(),
                    mod.v_proj_weight.detach())
        b = mod.in_proj_bias.detach() if mod.in_proj_bias is not None else None
        bias = (b[:e], b[e:2 * e], b[2 * e:]) if b is not None else (None,) * 3
        out_bias = mod.out_proj.bias.detach() if mod.out_proj.bias is not None else None
        return cls(mod.num_heads, proj, bias, mod.out_proj.weight.detach(), out_bias)


def multi_head_attention(imp: Importer, p: AttentionWeights, batch_first: bool, query: Any,
                         key: Any, value: Any, key_padding_mask: Any = None,
                         need_weights: bool = True, attn_mask: Any = None,
                         average_attn_weights: bool = True,
                         is_causal: bool = False) -> tuple[str, str | None]:
    """nn.MultiheadAttention in eval: projections, attention per head, output projection.
    Returns the output and (with ``need_weights``) the attention weights."""
    q, k, v = imp.value(query), imp.value(key), imp.value(value)
    dt = imp.type_of(q).dtype
    unbatched = len(_shape(imp, q)) == 2
    if unbatched:
        q, k, v = (reshape_to(imp, t, (1,) + _shape(imp, t)) for t in (q, k, v))
    elif not batch_first:
        q, k, v = (permute(imp, t, (1, 0, 2)) for t in (q, k, v))
    n, tgt, _ = _shape(imp, q)
    src = _shape(imp, k)[1]
    e = p.out_weight.shape[1]
    h = p.num_heads
    d = e // h
    heads = []
    for t, length, w, b in zip((q, k, v), (tgt, src, src), p.proj, p.bias):
        t = reshape_to(imp, _linear(imp, t, w, b), (n, length, h, d))
        heads.append(permute(imp, t, (0, 2, 1, 3)))
    qh, kh, vh = heads
    mask = None
    if attn_mask is not None:
        am = attn_mask.real if isinstance(attn_mask, Traced) else attn_mask
        shape = (1, 1, tgt, src) if am.ndim == 2 else (n, h, tgt, src)
        mask = _additive_mask(imp, attn_mask, dt, shape)
    elif is_causal:
        causal = torch.triu(torch.ones(tgt, src, dtype=torch.bool), 1)
        mask = _additive_mask(imp, causal, dt, (1, 1, tgt, src))
    if key_padding_mask is not None:
        kp = _additive_mask(imp, key_padding_mask, dt, (n, 1, 1, src))
        mask = kp if mask is None else imp.op("add", [mask, kp])
    weights = None
    if need_weights:
        scores = imp.op("matmul", [imp.op("mul", [qh, _num(imp, qh, 1.0 / math.sqrt(d))]),
                                   permute(imp, kh, (0, 1, 3, 2))])
        if mask is not None:
            scores = imp.op("add", [scores, mask])
        probs = imp.op("softmax", [scores], {"axis": 3})
        out = imp.op("matmul", [probs, vh])
        weights = probs
        if average_attn_weights:
            weights = imp.op("reduce_mean", [probs], {"axes": (1,), "keepdim": False})
        if unbatched:
            weights = reshape_to(imp, weights, _shape(imp, weights)[1:])
    else:
        out = imp.op("attention", [qh, kh, vh] + ([mask] if mask is not None else []),
                     {"causal": False, "scale": None})
    out = reshape_to(imp, permute(imp, out, (0, 2, 1, 3)), (n, tgt, e))
    out = _linear(imp, out, p.out_weight, p.out_bias)
    if unbatched:
        out = reshape_to(imp, out, (tgt, e))
    elif not batch_first:
        out = permute(imp, out, (1, 0, 2))
    return out, weights


@on_module(nn.MultiheadAttention)
def _mha_mod(imp, mod, real, query, key, value, key_padding_mask=None, need_weights=True,
             attn_mask=None, average_attn_weights=True, is_causal=False):
    if mod.bias_k is not None or mod.add_zero_attn:
        raise imp.error("MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    return multi_head_attention(imp, AttentionWeights.of(mod), mod.batch_first, query, key,
                                value, key_padding_mask, need_weights, attn_mask,
                                average_attn_weights, is_causal)


@on(F.multi_head_attention_forward)
def _mha_fn(imp, real, query, key, value, embed_dim_to_check, num_heads, in_proj_weight,
            in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight,
            out_proj_bias, training=True, key_padding_mask=None, need_weights=True,
            attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
            k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
            average_attn_weights=True, is_causal=False):
    if bias_k is not None or add_zero_attn or static_k is not None or static_v is not None:
        raise imp.error("multi-head attention with bias_k/bias_v, add_zero_attn or static "
                        "keys is not supported")
    if training and dropout_p > 0:
        raise imp.error("multi-head attention with dropout in training mode",
                        hint="call model.eval() before compiling")
    e = int(embed_dim_to_check)
    if use_separate_proj_weight:
        proj = (q_proj_weight, k_proj_weight, v_proj_weight)
    else:
        proj = (in_proj_weight[:e], in_proj_weight[e:2 * e], in_proj_weight[2 * e:])
    b = in_proj_bias
    bias = (b[:e], b[e:2 * e], b[2 * e:]) if b is not None else (None,) * 3
    weights = AttentionWeights(int(num_heads), proj, bias, out_proj_weight, out_proj_bias)
    return multi_head_attention(imp, weights, False, query, key, value, key_padding_mask,
                                need_weights, attn_mask, average_attn_weights, is_causal)


@on(torch.zeros_like, torch.ones_like, torch.full_like, aten.zeros_like, aten.ones_like,
    aten.full_like, method("new_zeros"), method("new_ones"), method("new_full"),
    aten.new_zeros, aten.new_ones, aten.new_full)
def _filled_like(imp, real, input, *args, **kwargs):
    if has_traced((args, kwargs)):
        raise imp.error("a tensor filled with a value computed from the inputs",
                        hint="write it as torch.zeros_like(input) + value")
    # Depends on the input's shape and dtype only, which are static: PyTorch's own tensor,
    # left untraced so that what is built from it (a mask filled slice by slice, in place)
    # is computed by PyTorch while importing, not by kiln at run time.
    return real


class Norm(NamedTuple):
    """A transformer layer's LayerNorm over the last dim."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, mod: nn.LayerNorm) -> Norm:
        """The parameters of ``mod``."""
        return cls(mod.weight, mod.bias, float(mod.eps))


def _layer_norm(imp, v: str, norm: Norm) -> str:
    ins = [v]
    if norm.weight is not None:
        ins.append(imp.value(norm.weight.detach()))
        if norm.bias is not None:
            ins.append(imp.value(norm.bias.detach()))
    return imp.op("layer_norm", ins, {"normalized_ndim": 1, "eps": float(norm.eps)})


def _activation_of(imp, layer: nn.Module) -> str:
    """'relu' or 'gelu': a transformer layer's activation."""
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    raise imp.error(f"{type(layer).__name__} with activation {act!r} is not supported",
                    hint="use activation='relu' or 'gelu'")


def _feed_forward(imp, activation: str, v: str, w1, b1, w2, b2) -> str:
    hidden = _linear(imp, v, w1.detach(), b1)
    hidden = imp.op(activation, [hidden], {"approximate": "none"} if activation == "gelu" else {})
    return _linear(imp, hidden, w2.detach(), b2)


def _layer_feed_forward(imp, layer, v: str) -> str:
    return _feed_forward(imp, _activation_of(imp, layer), v, layer.linear1.weight,
                         layer.linear1.bias, layer.linear2.weight, layer.linear2.bias)


def _attend(imp, mha: nn.MultiheadAttention, x: str, memory: str, key_padding_mask: Any,
            mask: Any, is_causal: bool) -> str:
    """A transformer layer's attention of ``x`` to ``memory`` (itself, for self-attention)."""
    return multi_head_attention(imp, AttentionWeights.of(mha), mha.batch_first, x, memory,
                                memory, key_padding_mask, False, mask, True,
                                bool(is_causal) and mask is None)[0]


def _block(imp, norm_first: bool, x: str, norm: Norm, body) -> str:
    """x + body(x) with the norm before (norm_first) or after the residual sum."""
    if norm_first:
        return imp.op("add", [x, body(_layer_norm(imp, x, norm))])
    return _layer_norm(imp, imp.op("add", [x, body(x)]), norm)


def encoder_layer(imp: Importer, layer: nn.TransformerEncoderLayer, src: Any, src_mask: Any,
                  src_key_padding_mask: Any, is_causal: bool) -> str:
    """nn.TransformerEncoderLayer in eval: self-attention block, then feed-forward block."""
    def attend(t):
        return _attend(imp, layer.self_attn, t, t, src_key_padding_mask, src_mask, is_causal)

    x = _block(imp, layer.norm_first, imp.value(src), Norm.of(layer.norm1), attend)
    return _block(imp, layer.norm_first, x, Norm.of(layer.norm2),
                  lambda t: _layer_feed_forward(imp, layer, t))


@on_module(nn.TransformerEncoderLayer)
def _encoder_layer_mod(imp, mod, real, src, src_mask=None, src_key_padding_mask=None,
                       is_causal=False):
    return encoder_layer(imp, mod, src, src_mask, src_key_padding_mask, is_causal)


@on(torch._transformer_encoder_layer_fwd, aten._transformer_encoder_layer_fwd)
def _encoder_layer_fast_path(imp, real, src, embed_dim, num_heads, qkv_weight, qkv_bias,
                             proj_weight, proj_bias, use_gelu, norm_first, eps, norm_weight_1,
                             norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1,
                             ffn_weight_2, ffn_bias_2, mask=None, mask_type=None):
    """The fused encoder layer that nn.TransformerEncoderLayer calls without autograd (as under
    Dynamo): batch first; mask_type 1 is a key padding mask, else an attention mask."""
    e = int(embed_dim)
    weights = AttentionWeights(int(num_heads), (qkv_weight[:e], qkv_weight[e:2 * e],
                                                qkv_weight[2 * e:]),
                               (qkv_bias[:e], qkv_bias[e:2 * e], qkv_bias[2 * e:]),
                               proj_weight, proj_bias)
    padding, attn = (mask, None) if mask_type == 1 else (None, mask)

    def attend(t):
        return multi_head_attention(imp, weights, True, t, t, t, padding, False, attn)[0]

    def feed_forward(t):
        return _feed_forward(imp, "gelu" if use_gelu else "relu", t, ffn_weight_1, ffn_bias_1,
                             ffn_weight_2, ffn_bias_2)

    x = _block(imp, norm_first, imp.value(src), Norm(norm_weight_1, norm_bias_1, eps), attend)
    return _block(imp, norm_first, x, Norm(norm_weight_2, norm_bias_2, eps), feed_forward)


@on_module(nn.TransformerDecoderLayer)
def _decoder_layer_mod(imp, mod, real, tgt, memory, tgt_mask=None, memory_mask=None,
                       tgt_key_padding_mask=None, memory_key_padding_mask=None,
                       tgt_is_causal=False, memory_is_causal=False):
    mem = imp.value(memory)

    def self_attend(t):
        return _attend(imp, mod.self_attn, t, t, tgt_key_padding_mask, tgt_mask,
                       tgt_is_causal)

    def cross_attend(t):
        return _attend(imp, mod.multihead_attn, t, mem, memory_key_padding_mask, memory_mask,
                       memory_is_causal)

    x = _block(imp, mod.norm_first, imp.value(tgt), Norm.of(mod.norm1), self_attend)
    x = _block(imp, mod.norm_first, x, Norm.of(mod.norm2), cross_attend)
    return _block(imp, mod.norm_first, x, Norm.of(mod.norm3),
                  lambda t: _layer_feed_forward(imp, mod, t))


@on_module(nn.TransformerEncoder)
def _encoder_mod(imp, mod, real, src, mask=None, src_key_padding_mask=None, is_causal=None):
    x = imp.value(src)
    for layer in mod.layers:
        x = encoder_layer(imp, layer, x, mask, src_key_padding_mask, bool(is_causal))
    return _layer_norm(imp, x, Norm.of(mod.norm)) if mod.norm is not None else x
