"""kiln Graph -> torch.fx.GraphModule: run any graph in eager PyTorch, or train it.

``TORCH_IMPL`` maps every registered op to a function of torch tensors and the node's attributes
(as keyword arguments), written with standard torch / torch.nn.functional calls. It is the
PyTorch twin of each op's NumPy reference, so the two can judge each other, and it is how a
compressed graph becomes a trainable module again (floating constants become parameters).

This module imports nothing else from kiln.frontend: it must load while the importers are built.
"""

from __future__ import annotations

import keyword
import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from kiln.backends.reference import check_inputs
from kiln.ir import DType, Graph, UnsupportedOpError, get_op

TORCH_DTYPE: dict[DType, torch.dtype] = {
    DType.f32: torch.float32,
    DType.f16: torch.float16,
    DType.i8: torch.int8,
    DType.u8: torch.uint8,
    DType.i32: torch.int32,
    DType.i64: torch.int64,
    DType.bool: torch.bool,
}


def _ntuple(value, n: int) -> tuple[int, ...]:
    """An int or a 1- or n-entry sequence as an n-tuple (kiln attrs allow all three)."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    return value * n if len(value) == 1 else value


def _by_rank(fns: Sequence[Callable], nd: int, op: str) -> Callable:
    """The 1-, 2- or 3-d variant of a torch function for ``nd`` spatial dimensions."""
    if not 1 <= nd <= len(fns):
        raise UnsupportedOpError(f"PyTorch has no {nd}-d {op}", op=op,
                                 hint="only 1-, 2- and 3-d windows run in eager PyTorch")
    return fns[nd - 1]


# ---- dense -----------------------------------------------------------------------------------
def _conv(x, weight, bias=None, *, stride, padding, dilation, groups):
    nd = weight.dim() - 2
    fn = _by_rank((F.conv1d, F.conv2d, F.conv3d), nd, "conv")
    return fn(x, weight, bias, _ntuple(stride, nd), _ntuple(padding, nd), _ntuple(dilation, nd),
              groups)


def _conv_transpose(x, weight, bias=None, *, stride, padding, dilation, groups, output_padding):
    nd = weight.dim() - 2
    fn = _by_rank((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), nd,
                  "conv_transpose")
    return fn(x, weight, bias, _ntuple(stride, nd), _ntuple(padding, nd),
              _ntuple(output_padding, nd), groups, _ntuple(dilation, nd))


def _attention(q, k, v, mask=None, *, causal, scale):
    # kiln broadcasts the batch dimensions of q, k and v; not every SDPA kernel does.
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q, k, v = (t.expand(*batch, *t.shape[-2:]) for t in (q, k, v))
    if causal and mask is not None:
        # SDPA refuses is_causal together with a mask: fold the triangle into the mask.
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


# ---- elementwise -----------------------------------------------------------------------------
def _clamp(x, *, min, max):
    if min is None and max is None:
        return x
    # An integer tensor with a float bound would promote to float; kiln keeps the dtype.
    return torch.clamp(x, min, max).to(x.dtype)


def _cast(x, *, dtype):
    # Tensor.to truncates toward zero from float to int, like the reference.
    return x.to(TORCH_DTYPE[DType(dtype)])


# ---- normalization ---------------------------------------------------------------------------
def _softmax(x, *, axis):
    return torch.softmax(x, dim=axis)


def _log_softmax(x, *, axis):
    return torch.log_softmax(x, dim=axis)


def _batch_norm(x, mean, var, weight, bias, *, eps):
    return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)


def _layer_norm(x, weight=None, bias=None, *, normalized_ndim, eps):
    return F.layer_norm(x, x.shape[x.dim() - normalized_ndim:], weight, bias, eps)


def _group_norm(x, weight=None, bias=None, *, groups, eps):
    # The aten op: F.group_norm refuses N * spatial == 1 (a training-mode check), which is a
    # fine inference input when each group holds several channels.
    return torch.group_norm(x, groups, weight, bias, eps)


# ---- pooling ---------------------------------------------------------------------------------
def _max_pool(x, *, kernel, stride, padding, dilation, ceil_mode):
    nd = len(kernel)
    fn = _by_rank((F.max_pool1d, F.max_pool2d, F.max_pool3d), nd, "max_pool")
    stride = _ntuple(kernel if stride is None else stride, nd)
    return fn(x, tuple(kernel), stride, _ntuple(padding, nd), _ntuple(dilation, nd),
              ceil_mode=ceil_mode)


def _avg_pool(x, *, kernel, stride, padding, ceil_mode, count_include_pad):
    nd = len(kernel)
    fn = _by_rank((F.avg_pool1d, F.avg_pool2d, F.avg_pool3d), nd, "avg_pool")
    stride = _ntuple(kernel if stride is None else stride, nd)
    padding = _ntuple(padding, nd)
    if nd == 3 and any(n < k for n, k in zip(x.shape[2:], kernel)):
        # avg_pool3d refuses an input smaller than the kernel even when padding makes the
        # window fit. A box mean is separable (the divisor is a product of per-axis counts):
        # pool the last two axes in 2-d, then the first in 1-d.
        n, c, t = x.shape[:3]
        y = F.avg_pool2d(x.reshape(n, c * t, *x.shape[3:]), tuple(kernel[1:]), stride[1:],
                         padding[1:], ceil_mode, count_include_pad)
        h, w = y.shape[2:]
        y = y.reshape(n, c, t, h * w).transpose(2, 3).reshape(n, c * h * w, t)
        y = F.avg_pool1d(y, kernel[:1], stride[:1], padding[:1], ceil_mode, count_include_pad)
        return y.reshape(n, c, h * w, -1).transpose(2, 3).reshape(n, c, -1, h, w)
    return fn(x, tuple(kernel), stride, padding, ceil_mode, count_include_pad)


def _adaptive_avg_pool(x, *, output_size):
    fn = _by_rank((F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d),
                  len(output_size), "adaptive_avg_pool")
    return fn(x, tuple(output_size))


# ---- reductions ------------------------------------------------------------------------------
def _dims(x, axes) -> tuple[int, ...]:
    """kiln's reduction axes as torch dims: spelled out, deduplicated, none for a scalar."""
    # torch reads dim=() as "every axis" in some functions, and refuses repeated dims.
    if axes is None or x.dim() == 0:
        return tuple(range(x.dim()))
    return tuple(sorted({a % x.dim() for a in axes}))


def _reduce_sum(x, *, axes, keepdim):
    # dtype= keeps integer sums in the operand's dtype (torch would widen them to int64).
    return torch.sum(x, dim=_dims(x, axes), keepdim=keepdim, dtype=x.dtype)


def _reduce_mean(x, *, axes, keepdim):
    return torch.mean(x, dim=_dims(x, axes), keepdim=keepdim)


def _reduce_max(x, *, axes, keepdim):
    return torch.amax(x, dim=_dims(x, axes), keepdim=keepdim)


def _reduce_min(x, *, axes, keepdim):
    return torch.amin(x, dim=_dims(x, axes), keepdim=keepdim)


# ---- shape -----------------------------------------------------------------------------------
def _reshape(x, *, shape):
    return x.reshape(shape)


def _permute(x, *, perm):
    return x.permute(perm)


def _slice(x, *, axis, start, end, step):
    index = [slice(None)] * x.dim()
    index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _concat(*xs, axis):
    return torch.cat(xs, dim=axis)


def _split(x, *, axis, sizes):
    return tuple(torch.split(x, list(sizes), dim=axis))


def _expand(x, *, shape):
    return x.expand(shape)


def _pad(x, *, pads, value):
    # kiln lists (lo, hi) from the first axis; F.pad wants them from the last axis.
    torch_pads = [p for axis in reversed(range(x.dim())) for p in pads[2 * axis:2 * axis + 2]]
    return F.pad(x, torch_pads, value=value)


# ---- quantized ops (integer semantics of kiln.ir.ops.quant; not differentiable) ---------------
def _quantize(x, *, scale, zero_point, dtype):
    lo, hi = (0, 255) if dtype == "u8" else (-128, 127)
    q = torch.round(x.float() / torch.tensor(scale, dtype=torch.float32)) + zero_point
    q = torch.nan_to_num(q, nan=float(lo)).clamp(lo, hi)
    return q.to(torch.uint8 if dtype == "u8" else torch.int8)


def _dequantize(q, *, scale, zero_point):
    return (q.to(torch.int32) - zero_point).to(torch.float32) * torch.tensor(scale,
                                                                             dtype=torch.float32)


def _requantize(acc, scale, out_dtype, out_zero_point, relu):
    y = acc.to(torch.int32).to(torch.float32) * scale.to(torch.float32)
    if out_dtype == "f32":
        return torch.relu(y) if relu else y
    q = torch.round(y) + out_zero_point
    return q.clamp(out_zero_point if relu else 0, 255).to(torch.uint8)


def _qlinear(x, weight, bias, scale, *, x_zero_point, out_zero_point, out_dtype, relu):
    xs = x.to(torch.float64) - x_zero_point
    acc = torch.round(xs @ weight.to(torch.float64).T).to(torch.int64) + bias.to(torch.int64)
    return _requantize(acc, scale, out_dtype, out_zero_point, relu)


def _qconv(x, weight, bias, scale, *, stride, padding, dilation, x_zero_point, out_zero_point,
           out_dtype, relu):
    xs = (x.to(torch.float64) - x_zero_point).permute(0, 3, 1, 2)
    w = weight.to(torch.float64).permute(0, 3, 1, 2)
    acc = F.conv2d(xs, w, None, _ntuple(stride, 2), _ntuple(padding, 2), _ntuple(dilation, 2))
    acc = torch.round(acc.permute(0, 2, 3, 1)).to(torch.int64) + bias.to(torch.int64)
    return _requantize(acc, scale, out_dtype, out_zero_point, relu)


def _linear(x, weight, bias=None):
    # Half-precision storage of a float32 layer's weights computes in the input's precision.
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def _linear_w8(x, weight, scale, bias=None):
    y = (x.to(torch.float64) @ weight.to(torch.float64).T) * scale.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(torch.float32)


def _dynamic_qlinear(x, weight, scale, bias=None):
    amax = x.float().abs().max()
    s = torch.where(amax == 0, torch.ones_like(amax), amax / 127.0)
    xq = torch.nan_to_num(torch.clamp(torch.round(x.float() / s), -127, 127))
    acc = torch.round(xq.to(torch.float64) @ weight.to(torch.float64).T).to(torch.int64)
    y = acc.to(torch.int32).to(torch.float32) * (s * scale.to(torch.float32))
    return y + bias.to(torch.float32) if bias is not None else y


# ---- indexing (kiln.ir.ops.index) ------------------------------------------------------------
def _positions(idx, n: int, wrap: bool):
    """Index tensor ``idx`` as non-negative int64 positions in an axis of ``n``; an IndexError
    for one outside [-n, n) (``wrap``) or [0, n), as PyTorch raises."""
    idx = idx.long()
    lo = -n if wrap else 0
    if bool(((idx < lo) | (idx >= n)).any()):
        raise IndexError(f"index out of range [{lo}, {n})")
    return torch.where(idx < 0, idx + n, idx)


def _take(x, *inds, axis, wrap):
    axis = axis % x.dim()
    pos = [_positions(i, x.shape[axis + k], wrap) for k, i in enumerate(inds)]
    return x[(slice(None),) * axis + tuple(pos)]


def _gather_elements(x, idx, *, axis, wrap):
    if x.dim() == 0:
        _positions(idx, 1, wrap)
        return x.clone()
    axis = axis % x.dim()
    return torch.gather(x, axis, _positions(idx, x.shape[axis], wrap))


def _arg(fn):
    def impl(x, *, axis, keepdim):
        if axis is None:
            out = fn(x.reshape(-1))
            return out.reshape((1,) * x.dim()) if keepdim else out
        return fn(x, dim=axis, keepdim=keepdim)

    return impl


def _topk(x, *, k, axis, largest):
    order = torch.sort(x, dim=axis, descending=largest, stable=True).indices
    return order.narrow(axis % x.dim(), 0, k)


def _cumsum(x, *, axis, exclusive, reverse):
    if x.dim() == 0:
        return torch.zeros_like(x) if exclusive else x.clone()
    y = x.flip(axis) if reverse else x
    s = torch.cumsum(y, axis, dtype=x.dtype)
    s = s - y if exclusive else s
    return s.flip(axis) if reverse else s


def _resize(x, *, sizes, scales, mode, coordinate, nearest, cubic_a):
    resize_taps = get_op("resize").extra["taps"]
    lead = x.dim() - len(sizes)
    y = x
    for k, n_out in enumerate(sizes):
        axis = lead + k
        idx, w = resize_taps(y.shape[axis], n_out, None if scales is None else scales[k], mode,
                             coordinate, nearest, cubic_a)
        picked = y.index_select(axis, torch.from_numpy(idx.reshape(-1)))
        picked = picked.reshape(y.shape[:axis] + idx.shape + y.shape[axis + 1:])
        weights = torch.from_numpy(w).to(x.dtype).reshape(
            (1,) * axis + w.shape + (1,) * (y.dim() - axis - 1))
        y = (picked * weights).sum(axis + 1)
    return y


def _gate_rows(gates: str, order: str, hidden: int) -> torch.Tensor:
    """Row indices that put the gate blocks of ``gates`` order into ``order``."""
    return torch.cat([torch.arange(hidden) + gates.index(q) * hidden for q in order])


def _lstm_seq(xproj, w_hh, h0, c0, gates="ifgo", reverse=False):
    # torch.lstm_cell with an identity input weight takes xproj as its input projection.
    hidden = w_hh.shape[1]
    perm = _gate_rows(gates, "ifgo", hidden)
    x, w = xproj.to(torch.float64)[..., perm], w_hh.to(torch.float64)[perm]
    eye = torch.eye(4 * hidden, dtype=torch.float64)
    h, c = h0[0].to(torch.float64), c0[0].to(torch.float64)
    out = [None] * x.shape[0]
    for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
        h, c = torch.lstm_cell(x[t], (h, c), eye, w)
        out[t] = torch.cat([h, c], dim=-1)
    return torch.stack(out).to(xproj.dtype)


def _gru_seq(xproj, w_hh, b_hh, h0, gates="rzn", reverse=False):
    # torch.gru_cell with an identity input weight takes xproj as its input projection.
    hidden = w_hh.shape[1]
    perm = _gate_rows(gates, "rzn", hidden)
    x, w = xproj.to(torch.float64)[..., perm], w_hh.to(torch.float64)[perm]
    eye = torch.eye(3 * hidden, dtype=torch.float64)
    h = h0[0].to(torch.float64)
    out = [None] * x.shape[0]
    for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
        h = torch.gru_cell(x[t], h, eye, w, None, b_hh.to(torch.float64)[perm])
        out[t] = h
    return torch.stack(out).to(xproj.dtype)


TORCH_IMPL: dict[str, Callable] = {
    "lstm_seq": _lstm_seq,
    "gru_seq": _gru_seq,
    "take": _take,
    "gather_elements": _gather_elements,
    "argmax": _arg(torch.argmax),
    "argmin": _arg(torch.argmin),
    "topk": _topk,
    "cumsum": _cumsum,
    "resize": _resize,
    "embedding": F.embedding,
    "matmul": torch.matmul,
    "linear": _linear,
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "attention": _attention,
    "relu": torch.relu,
    "clamp": _clamp,
    "leaky_relu": F.leaky_relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "softsign": F.softsign,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "erf": torch.erf,
    "reciprocal": torch.reciprocal,
    "neg": torch.neg,
    "abs": torch.abs,
    "round": torch.round,
    "sin": torch.sin,
    "cos": torch.cos,
    "atan": torch.atan,
    "cast": _cast,
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "eq": torch.eq,
    "ne": torch.ne,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "where": torch.where,
    "logical_not": torch.logical_not,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "group_norm": _group_norm,
    "max_pool": _max_pool,
    "avg_pool": _avg_pool,
    "adaptive_avg_pool": _adaptive_avg_pool,
    "reduce_sum": _reduce_sum,
    "reduce_mean": _reduce_mean,
    "reduce_max": _reduce_max,
    "reduce_min": _reduce_min,
    "reshape": _reshape,
    "permute": _permute,
    "slice": _slice,
    "concat": _concat,
    "split": _split,
    "expand": _expand,
    "pad": _pad,
    "quantize": _quantize,
    "dequantize": _dequantize,
    "qlinear": _qlinear,
    "qconv": _qconv,
    "linear_w8": _linear_w8,
    "dynamic_qlinear": _dynamic_qlinear,
}
"""Op name -> function(*tensors, **attrs) returning a tensor (a tuple for multi-output ops)."""


# ---- graph -> GraphModule --------------------------------------------------------------------
def _identifier(name: str, taken: set[str]) -> str:
    """A Python identifier for ``name``, unused in ``taken`` (which it joins)."""
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "v"
    if base[0].isdigit() or keyword.iskeyword(base):
        base = "_" + base
    candidate, k = base, 0
    while candidate in taken:
        k += 1
        candidate = f"{base}_{k}"
    taken.add(candidate)
    return candidate


def graph_to_module(g: Graph, trainable: bool = True) -> torch.fx.GraphModule:
    """A torch.fx.GraphModule computing the same outputs as ``g``.

    Graph inputs become placeholders (in order). Floating-point constants become
    ``nn.Parameter``s (``requires_grad=trainable``), the others, and the running statistics of
    batch norms (which inference uses as they are, and F.batch_norm refuses to differentiate),
    buffers, registered under
    sanitized names; ``module.meta["kiln_constants"]`` maps each constant's kiln name to its
    attribute name. Every node calls its ``TORCH_IMPL`` entry with the node's attrs as keyword
    arguments. The module returns a tensor for a single output, else a tuple.
    """
    root = torch.nn.Module()
    # Attribute names must not shadow what every nn.Module already has (forward, training...).
    taken = set(dir(root))
    attr_names: dict[str, str] = {}
    statistics = {i for n in g.nodes if n.op == "batch_norm" for i in n.inputs[1:3]}
    for name, array in g.constants.items():
        attr = _identifier(name, taken)
        tensor = torch.from_numpy(np.array(array))
        if g.types[name].dtype.is_float and name not in statistics:
            root.register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=trainable))
        else:
            root.register_buffer(attr, tensor)
        attr_names[name] = attr

    fx = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    arg_names: set[str] = {"self"}
    for name in g.inputs:
        env[name] = fx.placeholder(_identifier(name, arg_names))
    used = {i for node in g.nodes for i in node.inputs} | set(g.outputs)
    for name, attr in attr_names.items():
        if name in used:
            env[name] = fx.get_attr(attr)
    for node in g.nodes:
        if node.op not in TORCH_IMPL:
            raise UnsupportedOpError(f"no PyTorch implementation of {node.op}", node=node.name,
                                     op=node.op, source=node.source)
        multi = len(node.outputs) > 1
        # fx names follow kiln's value names (sanitized); a tuple result gets its own name so
        # that its pieces can take the outputs' names.
        call = fx.create_node("call_function", TORCH_IMPL[node.op],
                              tuple(env[i] for i in node.inputs), dict(node.attrs),
                              name=f"{node.name}_outputs" if multi else node.name)
        if not multi:
            env[node.outputs[0]] = call
        else:
            for k, out in enumerate(node.outputs):
                env[out] = fx.create_node("call_function", operator.getitem, (call, k),
                                          name=out)
    results = [env[o] for o in g.outputs]
    fx.output(results[0] if len(results) == 1 else tuple(results))
    module = torch.fx.GraphModule(root, fx, class_name=_identifier(g.name, set()))
    module.meta["kiln_constants"] = attr_names
    return module


def run_torch(g: Graph, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run ``g`` in eager PyTorch (through ``graph_to_module``) on NumPy inputs.

    The inputs are checked against the graph's input types like the reference backend does;
    the outputs are fresh NumPy arrays, one per graph output.
    """
    module = graph_to_module(g, trainable=False)
    tensors = [torch.from_numpy(np.array(a)) for a in check_inputs(g, arrays)]
    with torch.no_grad():
        result = module(*tensors)
    results = result if isinstance(result, tuple) else (result,)
    return [t.detach().clone().numpy() for t in results]
