"""What each PyTorch operation becomes in kiln IR.

One table covers torch.fx.symbolic_trace graphs (torch functions, Tensor methods, operator.*,
nn.Modules), torch.export graphs (ATen overloads, keyed by their overload packet) and Dynamo
graphs. Handlers get the importer, PyTorch's real result (shapes come from it) and the node's
arguments with PyTorch's own parameter names.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.frontend.importer import Importer, Traced, kiln_dtype
from kiln.ir import DType

aten = torch.ops.aten

HANDLERS: dict[Any, Callable[..., Any]] = {}
MODULE_HANDLERS: dict[type, Callable[..., Any]] = {}


def method(name: str) -> tuple[str, str]:
    """The table key of a Tensor method."""
    return ("method", name)


def on(*keys: Any) -> Callable:
    """Register a handler under several keys (functions, ATen packets, method keys)."""

    def deco(fn):
        for k in keys:
            HANDLERS[k] = fn
        return fn

    return deco


def on_module(*classes: type) -> Callable:
    def deco(fn):
        for c in classes:
            MODULE_HANDLERS[c] = fn
        return fn

    return deco


def target_key(node: torch.fx.Node) -> Any:
    """The handler-table key of an fx call node."""
    if node.op == "call_method":
        return method(node.target)
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket
    return t


def _ints(v: Any, n: int | None = None) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * (n or 1)
    v = tuple(int(x) for x in v)
    if n is not None and len(v) == 1:
        v = v * n
    return v


def _dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


# ---- identities and casts --------------------------------------------------------------------
def _identity(imp: Importer, real, x, *args, **kwargs):
    return imp.value(x)


for _k in [F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, torch.clone, torch.detach,
           aten.dropout, aten.clone, aten.alias, aten.detach, aten.contiguous, aten.lift_fresh_copy,
           method("contiguous"), method("clone"), method("detach")]:
    HANDLERS[_k] = _identity


@on_module(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
def _identity_module(imp, mod, real, x, *args, **kwargs):
    return imp.value(x)


@on(method("to"), method("type"), method("type_as"), method("float"), method("half"),
    method("double"), method("long"), method("int"), method("bool"), aten._to_copy, aten.to)
def _to(imp, real, x, *args, **kwargs):
    return imp.value(x, kiln_dtype(real.dtype))


@on(aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size)
def _assertion(imp, real, *args, **kwargs):
    return None  # torch.export's checks of static facts; shapes and dtypes are fixed here


# ---- shape queries (static) ------------------------------------------------------------------
@on(method("size"), method("dim"), method("numel"), method("__len__"), len)
def _static_query(imp, real, *args, **kwargs):
    return real


@on(getattr)
def _getattr(imp, real, obj, name, *default):
    if isinstance(obj, tuple):  # .values / .indices of max, min, topk, sort: traced fields
        return getattr(obj, name)
    return real


# ---- elementwise -----------------------------------------------------------------------------
def _unary(op: str, **fixed):
    def handler(imp, real, x, *args, **kwargs):
        return imp.op(op, [imp.value(x)], dict(fixed))

    return handler


for _op, _keys in {
    "relu": [F.relu, torch.relu, aten.relu, method("relu")],
    "silu": [F.silu, aten.silu],
    "sigmoid": [F.sigmoid, torch.sigmoid, aten.sigmoid, method("sigmoid")],
    "tanh": [F.tanh, torch.tanh, aten.tanh, method("tanh")],
    "hardswish": [F.hardswish, aten.hardswish],
    "hardsigmoid": [F.hardsigmoid, aten.hardsigmoid],
    "softsign": [F.softsign],
    "exp": [torch.exp, aten.exp, method("exp")],
    "log": [torch.log, aten.log, method("log")],
    "sqrt": [torch.sqrt, aten.sqrt, method("sqrt")],
    "rsqrt": [torch.rsqrt, aten.rsqrt, method("rsqrt")],
    "erf": [torch.erf, torch.special.erf, aten.erf, method("erf")],
    "reciprocal": [torch.reciprocal, aten.reciprocal, method("reciprocal")],
    "neg": [torch.neg, operator.neg, aten.neg, method("neg")],
    "abs": [torch.abs, aten.abs, method("abs")],
    "logical_not": [torch.logical_not, aten.logical_not, method("logical_not")],
    "sin": [torch.sin, aten.sin, method("sin")],
    "cos": [torch.cos, aten.cos, method("cos")],
    "atan": [torch.atan, torch.arctan, aten.atan, aten.arctan, method("atan"),
             method("arctan")],
}.items():
    on(*_keys)(_unary(_op))


@on(torch.round, aten.round, method("round"))
def _round(imp, real, x, *args, decimals=0, **kwargs):
    if args:
        decimals = args[0]
    if decimals != 0:
        raise imp.error(f"round to {decimals} decimals is not supported",
                        hint="write torch.round(x * 10**d) / 10**d")
    return imp.op("round", [imp.value(x)], {})

for _op, _classes in {"relu": [nn.ReLU], "silu": [nn.SiLU], "sigmoid": [nn.Sigmoid],
                      "tanh": [nn.Tanh], "hardswish": [nn.Hardswish],
                      "hardsigmoid": [nn.Hardsigmoid]}.items():
    on_module(*_classes)(lambda imp, mod, real, x, _op=_op: imp.op(_op, [imp.value(x)]))
on_module(nn.Softsign)(lambda imp, mod, real, x: imp.op("softsign", [imp.value(x)]))


@on(operator.invert, aten.bitwise_not, method("bitwise_not"))
def _invert(imp, real, x):
    if real.dtype != torch.bool:
        raise imp.error("bitwise not of an integer tensor is not supported")
    return imp.op("logical_not", [imp.value(x)])


@on(F.gelu, aten.gelu)
def _gelu(imp, real, input, approximate="none"):
    return imp.op("gelu", [imp.value(input)], {"approximate": approximate})


@on_module(nn.GELU)
def _gelu_mod(imp, mod, real, x):
    return imp.op("gelu", [imp.value(x)], {"approximate": mod.approximate})


@on(F.leaky_relu, aten.leaky_relu)
def _leaky(imp, real, input, negative_slope=0.01, inplace=False):
    return imp.op("leaky_relu", [imp.value(input)], {"negative_slope": float(negative_slope)})


@on_module(nn.LeakyReLU)
def _leaky_mod(imp, mod, real, x):
    return imp.op("leaky_relu", [imp.value(x)], {"negative_slope": float(mod.negative_slope)})


def _clamp(imp, x, lo, hi):
    num = float if x.dtype.is_floating_point else int
    return imp.op("clamp", [imp.value(x)], {"min": None if lo is None else num(lo),
                                             "max": None if hi is None else num(hi)})


@on(torch.clamp, torch.clip, aten.clamp, aten.clip, method("clamp"), method("clip"))
def _clamp_fn(imp, real, input, min=None, max=None):
    if isinstance(min, (Traced, torch.Tensor)) or isinstance(max, (Traced, torch.Tensor)):
        raise imp.error("clamp with tensor bounds is not supported",
                        hint="use torch.maximum / torch.minimum")
    return _clamp(imp, input, min, max)


@on(F.relu6)
def _relu6(imp, real, input, inplace=False):
    return _clamp(imp, input, 0.0, 6.0)


@on(F.hardtanh, aten.hardtanh)
def _hardtanh(imp, real, input, min_val=-1.0, max_val=1.0, inplace=False):
    return _clamp(imp, input, min_val, max_val)


@on_module(nn.ReLU6, nn.Hardtanh)
def _hardtanh_mod(imp, mod, real, x):
    return _clamp(imp, x, mod.min_val, mod.max_val)


def _operand_dtype(real: torch.Tensor, *operands) -> DType:
    """The dtype both operands of a binary op are computed in."""
    tensors = [o.real if isinstance(o, Traced) else o for o in operands]
    return kiln_dtype(torch.result_type(*tensors) if len(tensors) == 2 else real.dtype)


def _binary(op: str, reverse: bool = False):
    def handler(imp, real, a, b, *, alpha=1, **kwargs):
        if reverse:
            a, b = b, a
        if kwargs.get("rounding_mode") is not None:
            raise imp.error(f"division with rounding_mode={kwargs['rounding_mode']!r} is not "
                            "supported")
        dt = kiln_dtype(real.dtype)
        if op in ("div", "pow") and not dt.is_float:
            raise imp.error(f"{op} on integer tensors is not supported")
        va = imp.value(a, dt)
        vb = imp.value(b, dt)
        if alpha != 1:
            vb = imp.op("mul", [vb, imp.value(alpha, dt)])
        return imp.op(op, [va, vb])

    return handler


for _op, _keys in {
    "add": [operator.add, operator.iadd, torch.add, aten.add, method("add"), method("add_")],
    "sub": [operator.sub, operator.isub, torch.sub, torch.subtract, aten.sub, method("sub")],
    "mul": [operator.mul, operator.imul, torch.mul, torch.multiply, aten.mul, method("mul")],
    "div": [operator.truediv, torch.div, torch.true_divide, aten.div, method("div")],
    "pow": [operator.pow, torch.pow, aten.pow, method("pow")],
    "maximum": [torch.maximum, aten.maximum, method("maximum")],
    "minimum": [torch.minimum, aten.minimum, method("minimum")],
}.items():
    on(*_keys)(_binary(_op))
on(torch.rsub, aten.rsub)(_binary("sub", reverse=True))


def _compare(op: str):
    def handler(imp, real, a, b):
        dt = _operand_dtype(real, a, b)
        return imp.op(op, [imp.value(a, dt), imp.value(b, dt)])

    return handler


for _op, _keys in {
    "eq": [operator.eq, torch.eq, aten.eq, method("eq"), method("__eq__")],
    "ne": [operator.ne, torch.ne, aten.ne, method("ne"), method("__ne__")],
    "lt": [operator.lt, torch.lt, aten.lt, method("lt")],
    "le": [operator.le, torch.le, aten.le, method("le")],
    "gt": [operator.gt, torch.gt, aten.gt, method("gt")],
    "ge": [operator.ge, torch.ge, aten.ge, method("ge")],
}.items():
    on(*_keys)(_compare(_op))


@on(torch.where, aten.where)
def _where(imp, real, condition, input=None, other=None):
    if input is None:
        raise imp.error("torch.where(cond) with one argument gives data-dependent shapes")
    dt = kiln_dtype(real.dtype)
    return imp.op("where", [imp.value(condition, DType.bool), imp.value(input, dt),
                            imp.value(other, dt)])


@on(method("masked_fill"), aten.masked_fill, torch.masked_fill)
def _masked_fill(imp, real, input, mask, value):
    dt = kiln_dtype(real.dtype)
    return imp.op("where", [imp.value(mask, DType.bool), imp.value(value, dt),
                            imp.value(input, dt)])


@on(torch.max, torch.min, method("max"), method("min"), aten.max, aten.min)
def _max_min(imp, real, input, dim=None, keepdim=False, *, other=None):
    is_max = imp.node.target in (torch.max, "max") or getattr(
        imp.node.target, "overloadpacket", None) is aten.max
    if isinstance(dim, (Traced, torch.Tensor)):
        return _binary("maximum" if is_max else "minimum")(imp, real, input, dim)
    if dim is not None:
        from kiln.frontend.handlers_index import max_min_dim

        return max_min_dim(imp, input, dim, keepdim, is_max)
    return imp.op("reduce_max" if is_max else "reduce_min", [imp.value(input)],
                  {"axes": None, "keepdim": False})


# ---- dense -----------------------------------------------------------------------------------
@on(F.linear, aten.linear)
def _linear(imp, real, input, weight, bias=None):
    ins = [imp.value(input), imp.value(weight)]
    if bias is not None:
        ins.append(imp.value(bias))
    return imp.op("linear", ins)


@on_module(nn.Linear)
def _linear_mod(imp, mod, real, x):
    return _linear(imp, real, x, mod.weight, mod.bias)


def _as_matrix(imp, x, side):
    """Unsqueeze a vector operand of matmul; returns (value, squeeze_axis or None)."""
    v = imp.value(x)
    t = imp.type_of(v)
    if t.rank != 1:
        return v, None
    shape = (1, t.shape[0]) if side == "a" else (t.shape[0], 1)
    return imp.op("reshape", [v], {"shape": shape}), True


@on(operator.matmul, torch.matmul, torch.mm, torch.bmm, aten.matmul, aten.mm, aten.bmm,
    method("matmul"), method("mm"), method("bmm"))
def _matmul(imp, real, input, other):
    a, _ = _as_matrix(imp, input, "a")
    b, _ = _as_matrix(imp, other, "b")
    out = imp.op("matmul", [a, b])
    if imp.type_of(out).shape != tuple(real.shape):
        out = imp.op("reshape", [out], {"shape": tuple(real.shape)})
    return out


@on(torch.addmm, torch.baddbmm, aten.addmm, aten.baddbmm, method("addmm"), method("baddbmm"))
def _addmm(imp, real, input, mat1=None, mat2=None, *, beta=1, alpha=1, batch1=None,
           batch2=None):
    m1 = mat1 if mat1 is not None else batch1
    m2 = mat2 if mat2 is not None else batch2
    dt = kiln_dtype(real.dtype)
    prod = imp.op("matmul", [imp.value(m1), imp.value(m2)])
    if alpha != 1:
        prod = imp.op("mul", [prod, imp.value(float(alpha), dt)])
    if beta == 0:
        return prod
    base = imp.value(input)
    if beta != 1:
        base = imp.op("mul", [base, imp.value(float(beta), dt)])
    return imp.op("add", [base, prod])


def _padding(imp, padding, weight_shape, stride, dilation, nd):
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * nd
        # 'same' with stride 1: total padding dilation*(k-1) per dim, split evenly (an odd
        # total's extra row is padded by _pad_same before the conv).
        totals = [dilation[i] * (weight_shape[2 + i] - 1) for i in range(nd)]
        return tuple(t // 2 for t in totals)
    return _ints(padding, nd)


def _pad_same(imp, x, weight_shape, dilation, nd):
    """padding='same' with an odd total (an even kernel): PyTorch pads the extra row at the
    end, as this explicit pad does; the conv's own padding does the symmetric rest."""
    totals = [dilation[i] * (weight_shape[2 + i] - 1) for i in range(nd)]
    if not any(t % 2 for t in totals):
        return x
    v = imp.value(x)
    pads = [0, 0] * (imp.type_of(v).rank - nd) + [p for t in totals for p in (0, t % 2)]
    return imp.op("pad", [v], {"pads": tuple(pads), "value": 0.0})


def _conv(imp, x, weight, bias, stride, padding, dilation, groups):
    w = weight.real if isinstance(weight, Traced) else weight
    nd = w.ndim - 2
    stride, dilation = _ints(stride, nd), _ints(dilation, nd)
    if padding == "same":
        x = _pad_same(imp, x, tuple(w.shape), dilation, nd)
    padding = _padding(imp, padding, tuple(w.shape), stride, dilation, nd)
    ins = [imp.value(x), imp.value(weight)] + ([imp.value(bias)] if bias is not None else [])
    return imp.op("conv", ins, {"stride": stride, "padding": padding, "dilation": dilation,
                                "groups": int(groups)})


@on(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, aten.conv1d, aten.conv2d,
    aten.conv3d)
def _conv_fn(imp, real, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _conv(imp, input, weight, bias, stride, padding, dilation, groups)


@on_module(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_mod(imp, mod, real, x):
    if mod.padding_mode != "zeros":
        raise imp.error(f"padding_mode={mod.padding_mode!r} is not supported",
                        hint="use zero padding, or pad explicitly with F.pad")
    return _conv(imp, x, mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation,
                 mod.groups)


def _conv_t(imp, x, weight, bias, stride, padding, output_padding, groups, dilation):
    w = weight.real if isinstance(weight, Traced) else weight
    nd = w.ndim - 2
    ins = [imp.value(x), imp.value(weight)] + ([imp.value(bias)] if bias is not None else [])
    return imp.op("conv_transpose", ins, {
        "stride": _ints(stride, nd), "padding": _ints(padding, nd),
        "output_padding": _ints(output_padding, nd), "dilation": _ints(dilation, nd),
        "groups": int(groups)})


@on(F.conv_transpose1d, F.conv_transpose2d, aten.conv_transpose1d, aten.conv_transpose2d)
def _conv_t_fn(imp, real, input, weight, bias=None, stride=1, padding=0, output_padding=0,
               groups=1, dilation=1):
    return _conv_t(imp, input, weight, bias, stride, padding, output_padding, groups, dilation)


@on_module(nn.ConvTranspose1d, nn.ConvTranspose2d)
def _conv_t_mod(imp, mod, real, x, output_size=None):
    nd = mod.weight.ndim - 2
    out_pad = mod._output_padding(x.real, output_size, list(mod.stride), list(mod.padding),
                                  list(mod.kernel_size), nd, list(mod.dilation))
    return _conv_t(imp, x, mod.weight, mod.bias, mod.stride, mod.padding, out_pad, mod.groups,
                   mod.dilation)


@on(aten.convolution)
def _convolution(imp, real, input, weight, bias, stride, padding, dilation, transposed,
                 output_padding, groups):
    if transposed:
        return _conv_t(imp, input, weight, bias, stride, padding, output_padding, groups,
                       dilation)
    return _conv(imp, input, weight, bias, stride, padding, dilation, groups)


@on(F.scaled_dot_product_attention, aten.scaled_dot_product_attention)
def _sdpa(imp, real, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
          scale=None, enable_gqa=False):
    if enable_gqa:
        raise imp.error("grouped-query attention (enable_gqa=True) is not supported")
    ins = [imp.value(query), imp.value(key), imp.value(value)]
    if attn_mask is not None:
        m = attn_mask.real if isinstance(attn_mask, Traced) else attn_mask
        ins.append(imp.value(attn_mask, DType.bool if m.dtype == torch.bool
                             else kiln_dtype(real.dtype)))
    return imp.op("attention", ins, {"causal": bool(is_causal),
                                     "scale": None if scale is None else float(scale)})


# ---- normalization ---------------------------------------------------------------------------
def _batch_norm(imp, x, mean, var, weight, bias, eps):
    c = x.shape[1]
    ones = torch.ones(c, dtype=x.dtype)
    zeros = torch.zeros(c, dtype=x.dtype)
    ins = [imp.value(x), imp.value(mean), imp.value(var),
           imp.value(weight if weight is not None else ones),
           imp.value(bias if bias is not None else zeros)]
    return imp.op("batch_norm", ins, {"eps": float(eps)})


@on(F.batch_norm)
def _bn_fn(imp, real, input, running_mean, running_var, weight=None, bias=None, training=False,
           momentum=0.1, eps=1e-5):
    if training or running_mean is None:
        raise imp.error("batch norm in training mode", hint="call model.eval() before compiling")
    return _batch_norm(imp, input, running_mean, running_var, weight, bias, eps)


@on(aten.batch_norm)
def _bn_aten(imp, real, input, weight, bias, running_mean, running_var, training, momentum, eps,
             cudnn_enabled=True):
    return _bn_fn(imp, real, input, running_mean, running_var, weight, bias, training,
                  momentum, eps)


@on(aten._native_batch_norm_legit_no_training)
def _bn_legit(imp, real, input, weight, bias, running_mean, running_var, momentum, eps):
    out = _batch_norm(imp, input, running_mean, running_var, weight, bias, eps)
    # Outside training the saved mean and inverse std are empty tensors: constants.
    return (out, imp.value(real[1]), imp.value(real[2]))


@on_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _bn_mod(imp, mod, real, x):
    if mod.training or mod.running_mean is None:
        raise imp.error("batch norm in training mode (or without running statistics)",
                        hint="call model.eval() before compiling")
    return _batch_norm(imp, x, mod.running_mean, mod.running_var, mod.weight, mod.bias, mod.eps)


def _layer_norm(imp, x, normalized_shape, weight, bias, eps):
    ins = [imp.value(x)]
    k = len(_ints(normalized_shape))
    if weight is not None or bias is not None:
        shape = tuple(x.shape[-k:])
        ins.append(imp.value(weight if weight is not None else torch.ones(shape)))
        if bias is not None:
            ins.append(imp.value(bias))
    return imp.op("layer_norm", ins, {"normalized_ndim": k, "eps": float(eps)})


@on(F.layer_norm, aten.layer_norm)
def _ln_fn(imp, real, input, normalized_shape, weight=None, bias=None, eps=1e-5,
           cudnn_enable=True):
    return _layer_norm(imp, input, normalized_shape, weight, bias, eps)


@on_module(nn.LayerNorm)
def _ln_mod(imp, mod, real, x):
    return _layer_norm(imp, x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def _group_norm(imp, x, groups, weight, bias, eps):
    ins = [imp.value(x)]
    if weight is not None or bias is not None:
        ins.append(imp.value(weight if weight is not None else torch.ones(x.shape[1])))
        if bias is not None:
            ins.append(imp.value(bias))
    return imp.op("group_norm", ins, {"groups": int(groups), "eps": float(eps)})


@on(F.group_norm, aten.group_norm)
def _gn_fn(imp, real, input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return _group_norm(imp, input, num_groups, weight, bias, eps)


@on_module(nn.GroupNorm)
def _gn_mod(imp, mod, real, x):
    return _group_norm(imp, x, mod.num_groups, mod.weight, mod.bias, mod.eps)


def _softmax(op: str):
    def handler(imp, real, input, dim=None, *args, dtype=None, **kwargs):
        if dim is None:
            raise imp.error(f"{op} without dim", hint="pass dim explicitly")
        x = imp.value(input, kiln_dtype(real.dtype))
        return imp.op(op, [x], {"axis": _dim(dim, real.ndim)})

    return handler


on(F.softmax, torch.softmax, aten.softmax, aten._softmax, method("softmax"))(_softmax("softmax"))
on(F.log_softmax, torch.log_softmax, aten.log_softmax, aten._log_softmax,
   method("log_softmax"))(_softmax("log_softmax"))


@on_module(nn.Softmax, nn.LogSoftmax)
def _softmax_mod(imp, mod, real, x):
    op = "softmax" if isinstance(mod, nn.Softmax) else "log_softmax"
    return _softmax(op)(imp, real, x, mod.dim)


@on(F.embedding, aten.embedding)
def _embedding(imp, real, *args, **kwargs):
    if imp.node.op == "call_function" and isinstance(imp.node.target, torch._ops.OpOverload):
        weight, indices = args[:2]
    else:
        indices, weight = args[:2]
        if kwargs.get("max_norm") is not None:
            raise imp.error("embedding with max_norm renormalizes weights; not supported")
    return imp.op("embedding", [imp.value(indices), imp.value(weight)])


@on_module(nn.Embedding)
def _embedding_mod(imp, mod, real, x):
    if mod.max_norm is not None:
        raise imp.error("embedding with max_norm renormalizes weights; not supported")
    return imp.op("embedding", [imp.value(x), imp.value(mod.weight)])


# ---- pooling ---------------------------------------------------------------------------------
def _pool_nd(x) -> int:
    return x.ndim - 2


def _max_pool(imp, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=False):
    if return_indices:
        raise imp.error("max pooling with return_indices is not supported")
    nd = _pool_nd(x)
    k = _ints(kernel_size, nd)
    s = _ints(stride, nd) if stride not in (None, [], ()) else k
    return imp.op("max_pool", [imp.value(x)], {
        "kernel": k, "stride": s, "padding": _ints(padding, nd),
        "dilation": _ints(dilation, nd), "ceil_mode": bool(ceil_mode)})


@on(F.max_pool1d, F.max_pool2d, aten.max_pool1d, aten.max_pool2d, torch.max_pool1d,
    torch.max_pool2d)
def _max_pool_fn(imp, real, input, kernel_size, stride=None, padding=0, dilation=1,
                 ceil_mode=False, return_indices=False):
    return _max_pool(imp, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices)


@on_module(nn.MaxPool1d, nn.MaxPool2d)
def _max_pool_mod(imp, mod, real, x):
    return _max_pool(imp, x, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                     mod.ceil_mode, mod.return_indices)


def _avg_pool(imp, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
              divisor_override=None):
    if divisor_override is not None:
        raise imp.error("avg pooling with divisor_override is not supported")
    nd = _pool_nd(x)
    k = _ints(kernel_size, nd)
    s = _ints(stride, nd) if stride not in (None, [], ()) else k
    return imp.op("avg_pool", [imp.value(x)], {
        "kernel": k, "stride": s, "padding": _ints(padding, nd), "ceil_mode": bool(ceil_mode),
        "count_include_pad": bool(count_include_pad)})


@on(F.avg_pool1d, F.avg_pool2d, aten.avg_pool1d, aten.avg_pool2d)
def _avg_pool_fn(imp, real, input, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
    return _avg_pool(imp, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


@on_module(nn.AvgPool1d, nn.AvgPool2d)
def _avg_pool_mod(imp, mod, real, x):
    return _avg_pool(imp, x, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                     mod.count_include_pad, getattr(mod, "divisor_override", None))


@on(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, aten.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d)
def _adaptive_fn(imp, real, input, output_size=None):
    return imp.op("adaptive_avg_pool", [imp.value(input)],
                  {"output_size": tuple(real.shape[2:])})


@on_module(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
def _adaptive_mod(imp, mod, real, x):
    return _adaptive_fn(imp, real, x)


# ---- reductions ------------------------------------------------------------------------------
def _reduce(op: str):
    def handler(imp, real, input, dim=None, keepdim=False, *, dtype=None, **kwargs):
        x = imp.value(input, kiln_dtype(real.dtype))
        rank = imp.type_of(x).rank
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            axes = None
        else:
            axes = tuple(sorted({_dim(d, rank) for d in _ints(dim)}))
        if rank == 0:
            return x
        return imp.op(op, [x], {"axes": axes, "keepdim": bool(keepdim)})

    return handler


on(torch.mean, aten.mean, method("mean"))(_reduce("reduce_mean"))
on(torch.sum, aten.sum, method("sum"))(_reduce("reduce_sum"))
on(torch.amax, aten.amax, method("amax"))(_reduce("reduce_max"))
on(torch.amin, aten.amin, method("amin"))(_reduce("reduce_min"))


# ---- shape ops -------------------------------------------------------------------------------
def reshape_to(imp: Importer, x: Any, shape: Sequence[int]) -> str:
    """``x`` reshaped to ``shape`` (no node when it already has that shape)."""
    v = imp.value(x)
    if imp.type_of(v).shape == tuple(shape):
        return v
    return imp.op("reshape", [v], {"shape": tuple(shape)})


def _reshape_like_result(imp, real, x, *args, **kwargs):
    return reshape_to(imp, x, real.shape)


for _k in [torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.ravel,
           aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.squeeze,
           aten.unsqueeze, method("view"), method("reshape"), method("flatten"),
           method("squeeze"), method("unsqueeze"), method("view_as"), method("reshape_as"),
           method("ravel")]:
    HANDLERS[_k] = _reshape_like_result


@on_module(nn.Flatten, nn.Unflatten)
def _flatten_mod(imp, mod, real, x):
    return reshape_to(imp, x, real.shape)


def permute(imp, x, perm):
    v = imp.value(x)
    perm = tuple(perm)
    if perm == tuple(range(len(perm))):
        return v
    return imp.op("permute", [v], {"perm": perm})


@on(torch.permute, aten.permute, method("permute"))
def _permute(imp, real, input, *dims, **kwargs):
    dims = kwargs.get("dims", dims)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return permute(imp, input, [_dim(d, real.ndim) for d in dims])


@on(torch.transpose, torch.swapaxes, aten.transpose, method("transpose"), method("swapaxes"))
def _transpose(imp, real, input, dim0, dim1):
    perm = list(range(real.ndim))
    a, b = _dim(dim0, real.ndim), _dim(dim1, real.ndim)
    perm[a], perm[b] = perm[b], perm[a]
    return permute(imp, input, perm)


@on(torch.t, aten.t, method("t"))
def _t(imp, real, input):
    return permute(imp, input, list(range(real.ndim))[::-1])


@on(method("expand"), method("expand_as"), aten.expand, aten.expand_as, torch.broadcast_to,
    method("broadcast_to"))
def _expand(imp, real, input, *args, **kwargs):
    v = imp.value(input)
    if imp.type_of(v).shape == tuple(real.shape):
        return v
    return imp.op("expand", [v], {"shape": tuple(real.shape)})


@on(torch.cat, torch.concat, torch.concatenate, aten.cat, aten.concat)
def _cat(imp, real, tensors, dim=0, *, axis=None):
    dim = axis if axis is not None else dim
    # PyTorch skips empty 1-d tensors in cat (a legacy rule); so do we.
    parts = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0 and real.ndim != 1)]
    dt = kiln_dtype(real.dtype)
    values = [imp.value(t, dt) for t in parts]
    if len(values) == 1:
        return values[0]
    return imp.op("concat", values, {"axis": _dim(dim, real.ndim)})


@on(torch.stack, aten.stack)
def _stack(imp, real, tensors, dim=0):
    d = _dim(dim, real.ndim)
    dt = kiln_dtype(real.dtype)
    parts = []
    for t in tensors:
        shape = list(t.shape)
        shape.insert(d, 1)
        parts.append(reshape_to(imp, imp.value(t, dt) if not isinstance(t, Traced)
                                else imp.value(t, dt), shape))
    if len(parts) == 1:
        return parts[0]
    return imp.op("concat", parts, {"axis": d})


def _split_like(imp, real, input, dim):
    """Split ``input`` into pieces shaped like PyTorch's real outputs."""
    d = _dim(dim, input.ndim)
    sizes = tuple(int(r.shape[d]) for r in real)
    outs = imp.op_multi("split", [imp.value(input)], {"axis": d, "sizes": sizes})
    return type(real)(outs)


@on(torch.split, aten.split, aten.split_with_sizes, method("split"), method("split_with_sizes"))
def _split(imp, real, tensor, split_size_or_sections=None, dim=0, *, split_size=None,
           split_sizes=None):
    return _split_like(imp, real, tensor, dim)


@on(torch.chunk, aten.chunk, method("chunk"))
def _chunk(imp, real, input, chunks, dim=0):
    return _split_like(imp, real, input, dim)


@on(torch.unbind, aten.unbind, method("unbind"))
def _unbind(imp, real, input, dim=0):
    d = _dim(dim, input.ndim)
    pieces = imp.op_multi("split", [imp.value(input)],
                          {"axis": d, "sizes": (1,) * input.shape[d]})
    return type(real)(reshape_to(imp, p, r.shape) for p, r in zip(pieces, real))


def slice_axis(imp, v: str, axis: int, start: int, end: int, step: int = 1) -> str:
    """``v[start:end:step]`` along ``axis``, with PyTorch's clamping of the bounds."""
    size = imp.type_of(v).shape[axis]
    start, end, step = slice(start, end, step).indices(size)
    end = max(end, start)
    if (start, end, step) == (0, size, 1):
        return v
    return imp.op("slice", [v], {"axis": axis, "start": start, "end": end, "step": step})


@on(torch.narrow, aten.narrow, method("narrow"))
def _narrow(imp, real, input, dim, start, length):
    d = _dim(dim, input.ndim)
    return slice_axis(imp, imp.value(input), d, int(start), int(start) + int(length))


@on(aten.slice)
def _aten_slice(imp, real, input, dim=0, start=None, end=None, step=1):
    d = _dim(dim, input.ndim)
    return slice_axis(imp, imp.value(input), d, start if start is not None else 0,
                      end if end is not None else input.shape[d], step)


@on(torch.select, aten.select, method("select"))
def _select(imp, real, input, dim, index):
    d = _dim(dim, input.ndim)
    i = int(index) % input.shape[d]
    return reshape_to(imp, slice_axis(imp, imp.value(input), d, i, i + 1), real.shape)


@on(operator.getitem)
def _getitem(imp, real, obj, index):
    if not isinstance(obj, Traced):
        return obj[index]  # an element of a tuple of values (split, chunk, batch norm)
    idx = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (Traced, torch.Tensor, list)) for i in idx):
        from kiln.frontend.handlers_index import tensor_getitem

        return tensor_getitem(imp, real, obj, idx)
    n_specified = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (obj.ndim - n_specified) + idx[e + 1:]
    v = imp.value(obj)
    axis = 0
    for i in idx:
        if i is None:
            continue
        if isinstance(i, int):
            i = i % obj.shape[axis]
            v = slice_axis(imp, v, axis, i, i + 1)
        elif isinstance(i, slice):
            if i.step is not None and i.step < 1:
                raise imp.error("slices with a negative step are not supported")
            v = slice_axis(imp, v, axis, i.start if i.start is not None else 0,
                           i.stop if i.stop is not None else obj.shape[axis], i.step or 1)
        else:
            raise imp.error(f"index of type {type(i).__name__} is not supported")
        axis += 1
    return reshape_to(imp, v, real.shape)


@on(F.pad, aten.constant_pad_nd, aten.pad)
def _pad(imp, real, input, pad, mode="constant", value=None):
    if mode != "constant":
        raise imp.error(f"pad mode {mode!r} is not supported", hint="use mode='constant'")
    ndim = input.ndim
    pads = [0] * (2 * ndim)
    # F.pad lists (lo, hi) pairs starting from the last dimension.
    for j in range(len(pad) // 2):
        axis = ndim - 1 - j
        pads[2 * axis], pads[2 * axis + 1] = int(pad[2 * j]), int(pad[2 * j + 1])
    return imp.op("pad", [imp.value(input)], {"pads": tuple(pads),
                                              "value": float(value or 0.0)})


# The indexing ops' handlers register themselves in these tables.
# So do nn.LSTM's and nn.GRU's (handlers_recurrent), and prod, cumprod, det and the scatters
# (handlers_more).
from kiln.frontend import handlers_index, handlers_more, handlers_recurrent  # noqa: E402,F401
