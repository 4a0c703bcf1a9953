"""Post-training static int8 quantization: conv / linear -> qconv / qlinear.

Needs calibrated activation ranges (``quantize_int8.ranges``: value name -> (min, max), made
by ``kiln.compression.calibration`` from data the user passes to ``kiln.compress``). For every 2-d
conv (one group, 1-d or 2-d) and linear with constant weights whose input has a range:

- weights become i8, symmetric, one scale per output channel (max |w| -> ``weight_max``:
  127, or 64 for CPUs whose int8 dot product (pmaddubsw, without VNNI) saturates pairs of
  products at 16 bits; the compiler sets it from the target, and ONNX Runtime needs the same
  on those CPUs);
- the input is quantized to u8 with the range's scale and zero point (per tensor,
  asymmetric), once per value however many layers read it; a convolution's input goes
  channels-last first (qconv is NHWC), the permutes are left for ``sink_permutes``; a 1-d
  convolution runs as a 2-d one of height 1 ([N, C, L] -> [N, 1, L, C]);
- the bias becomes i32 in the accumulator's scale;
- a relu right after the layer fuses into it (the requantization clamp);
- the output stays u8 (requantized in the layer's epilogue) when every reader is another
  quantized layer of the same kind, else it is produced as f32 by the layer itself;
- float readers of a value that also has a u8 version read the dequantized u8 version, so the
  float value is only an intermediate of the quantize that follows it (fused into the
  producer's store): between two quantized layers only u8 tensors reach memory;
- quantized linear layers that read the same input with the same attributes (attention's
  query, key and value) become one wider layer whose output is sliced (merge_qlinear.py).

Grouped and depthwise convolutions, the convs right next to them (their layout changes would
cost more than int8 saves), layers whose input has no range and protected layers stay in
float.

Option ``mode``: ``static`` (the above, default), ``dynamic`` (linear layers only, no
calibration: dynamic_qlinear quantizes x on every call), ``weight_only`` (linear layers
only: linear_w8 keeps float activations and stores i8 weights, a quarter of the bytes) or
``fp16`` (linear layers only: f16 weights, float32 activations; see ``fp16_weights``).

The error budget is stated for ranges calibrated on representative data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiln.compression.merge_qlinear import merge_sibling_qlinears
from kiln.ir import DType, Graph, KilnError, Node, get_op, infer_types
from kiln.ir.ops._rules import as_tuple
from kiln.passes.base import LOSSY, ErrorBudget, Pass, PassContext, PassResult, register_pass
from kiln.passes.dce import remove_dead
from kiln.passes.target import Target

NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)
# sum_k |x - zx| |w| <= 255 * 127 * K must stay inside int32.
MAX_REDUCTION = (2 ** 31 - 1) // (255 * 127)


def activation_qparams(lo: float, hi: float, value: str = "?") -> tuple[float, int]:
    """u8 scale (float32-exact) and zero point of the range [lo, hi], widened to hold 0."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise KilnError(f"calibrated range [{lo}, {hi}] of %{value} is not a finite interval",
                        hint="calibrate on data without NaN/Inf")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    span = hi - lo
    if span <= 0.0:
        span = 1.0  # an all-zero tensor: any scale represents it exactly
    scale = float(np.float32(span / 255.0))
    if not (np.isfinite(scale) and scale > 0):
        raise KilnError(f"range [{lo}, {hi}] of %{value} gives no usable int8 scale",
                        hint="check the calibration data of this layer's input")
    zero_point = int(np.clip(np.rint(-lo / scale), 0, 255))
    return scale, zero_point


def weight_qparams(w: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric i8 weights in [-qmax, qmax] and their float32 scales
    (w ~ q * scale)."""
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    amax = np.abs(flat).max(axis=1)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(flat / scale.astype(np.float64)[:, None]), -qmax, qmax).astype(np.int8)
    return q.reshape(w.shape), scale


def calibration_values(graph: Graph) -> list[str]:
    """The float values whose calibrated ranges this pass reads: the inputs of conv and linear
    layers, their outputs, and the output of a relu right after one."""
    users = graph.users()
    wanted: list[str] = []
    for n in graph.nodes:
        if n.op in ("conv", "linear"):
            wanted += [n.inputs[0], n.outputs[0]]
            after = users.get(n.outputs[0], [])
            if len(after) == 1 and after[0].op == "relu":
                wanted.append(after[0].outputs[0])
    return [v for v in dict.fromkeys(wanted) if graph.types[v].dtype == DType.f32]


def int8_slower_reason(target: Target | None, weight_max: int) -> str | None:
    """Why int8 layers would be slower than fp32 on ``target`` (None: they are faster).

    On x86, int8 pays where the CPU has a fast u8 x i8 dot product: VNNI's vpdpbusd does four
    times the multiply-adds of an fp32 FMA per instruction; pmaddubsw + pmaddwd (AVX2 and
    SSSE3, exact for weights within +-64) do four times as many in three instructions; and the
    operands are a quarter of the bytes. Without either, each product is widened to 16 bits
    first (about eight instructions per vector of four-term dot products), slower than fp32
    FMAs on every layer kiln measured (ResNet-18 CIFAR for SSE2: see the README). ``None``
    target: not a CPU (the CUDA backend's dp4a is exact and fast)."""
    if target is None:
        return None
    dot = target.dot4_instruction(target.f32_lanes, weight_max)
    if dot == "widen":
        why = ("has neither VNNI nor pmaddubsw"
               if target.dot4_instruction(target.f32_lanes, 64) == "widen" else
               f"has no VNNI and weights of +-{weight_max} exceed pmaddubsw's +-64")
        return (f"int8 would be slower than fp32: this target ({target.name}, {target.cpu}) "
                f"{why}, so its int8 dot products widen to 16 bits")
    return None


def _quantizable(node: Node, graph: Graph, ranges: dict, protect: set[str]) -> str | None:
    """Why ``node`` stays float (None: it is quantized)."""
    if node.op not in ("conv", "linear"):
        return "not a conv or linear"
    if node.name in protect:
        return "protected"
    if any(v not in graph.constants for v in node.inputs[1:]):
        return "weights or bias are not constants"
    x = node.inputs[0]
    if graph.types[x].dtype != DType.f32:
        return "input is not f32"
    if x not in ranges:
        return "its input has no calibrated range"
    w = graph.constants[node.inputs[1]]
    if node.op == "conv":
        if w.ndim not in (3, 4):
            return "a 3-d convolution (int8 takes 1-d and 2-d ones)"
        if node.attrs["groups"] != 1:
            return "grouped / depthwise convolution"
    elif w.ndim != 2:
        return "weight is not 2-d"
    if int(np.prod(w.shape[1:])) > MAX_REDUCTION:
        return "too many products per output for an int32 accumulator"
    return None


MODES = ("static", "dynamic", "weight_only", "fp16")
F16_MAX = 65504.0


def fp16_weights(graph: Graph, names: set[str] | None = None, protect: set[str] = frozenset()
                 ) -> tuple[Graph, dict[str, tuple[str, str]]]:
    """``graph`` with the weights of its float32 linear layers (``names``, or all) stored in
    half precision, and each layer's (precision, why). The layer still computes in float32:
    its packed weight panels hold f16 and widen as they are loaded (passes/lower/matmul.py),
    half the bytes to keep and to stream, which is what bounds a linear layer at small batch
    (a 4096 x 4096 one-row linear: 2.54 -> 1.20 ms). The rounding moves each weight by at
    most 2^-11 of itself. The bias stays float32."""
    g = graph.copy()
    g.nodes = list(g.nodes)
    layers: dict[str, tuple[str, str]] = {}
    for i, n in enumerate(g.nodes):
        if n.op != "linear" or (names is not None and n.name not in names):
            continue
        w = n.inputs[1]
        why = None
        if n.name in protect:
            why = "protected"
        elif w not in g.constants:
            why = "weights are not constants"
        elif g.types[w].dtype != DType.f32 or g.types[n.inputs[0]].dtype != DType.f32:
            why = "not a float32 layer"
        elif not np.all(np.abs(g.constants[w]) <= F16_MAX):
            why = "weights beyond float16's range (or not finite)"
        if why is not None:
            layers[n.name] = ("fp32", why)
            continue
        half = g.add_constant(g.constants[w].astype(np.float16), f"{w}.f16")
        g.nodes[i] = n.with_(inputs=(n.inputs[0], half, *n.inputs[2:]))
        layers[n.name] = ("fp16", "f16 weights, f32 activations and bias")
    return remove_dead(g), layers


def _int8_weight_linears(graph: Graph, ctx: PassContext, mode: str, protect: set[str],
                         weight_max: int) -> PassResult:
    """Modes without calibration, for linear layers: ``dynamic`` (dynamic_qlinear: x
    quantized on every call) and ``weight_only`` (linear_w8: float activations)."""
    op = "dynamic_qlinear" if mode == "dynamic" else "linear_w8"
    layers = ctx.notes.setdefault("quantize_int8.layers", {})
    g = graph.copy()
    g.nodes = []
    count = 0
    for n in graph.nodes:
        w = graph.constants.get(n.inputs[1]) if n.op == "linear" else None
        bias_ok = len(n.inputs) < 3 or n.inputs[2] in graph.constants
        if (w is None or w.ndim != 2 or not bias_ok or n.name in protect
                or graph.types[n.inputs[0]].dtype != DType.f32
                or (mode == "dynamic" and w.shape[1] > MAX_REDUCTION)):
            g.nodes.append(n)
            if n.op in ("conv", "linear"):
                layers[n.name] = ("fp32", f"{mode} int8 takes linear layers with constant "
                                          "weights only" if n.name not in protect
                                  else "protected")
            continue
        layers[n.name] = ("int8", "i8 weights, float activations (linear_w8)"
                          if mode == "weight_only" else
                          f"i8 weights (|w| <= {weight_max}), input quantized per call")
        # linear_w8 widens its weights to float: only dynamic_qlinear's dot products need the
        # target's bound.
        wq, sw = weight_qparams(w.astype(np.float32), weight_max if mode == "dynamic" else 127)
        inputs = [n.inputs[0], g.add_constant(wq, f"{n.inputs[1]}.i8"),
                  g.add_constant(sw, f"{n.inputs[1]}.scale")]
        if len(n.inputs) > 2:
            inputs.append(n.inputs[2])
        g.nodes.append(Node(op, tuple(inputs), n.outputs, {}, n.source))
        count += 1
    ctx.logger.info("quantize_int8 (%s): %d linear layers to %s", mode, count, op)
    return PassResult(remove_dead(g), count > 0)


def _near_float_conv(node: Node, users: dict, producers: dict, float_convs: set[str],
                     depth: int = 4) -> bool:
    """Whether a float conv reads ``node``'s result or makes its input, through at most
    ``depth`` elementwise ops (relu6, bias adds...)."""
    frontier = [node.outputs[0]]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for u in users.get(v, []):
                if u.name in float_convs:
                    return True
                if get_op(u.op).kind == "elementwise" and len(u.outputs) == 1:
                    nxt.append(u.outputs[0])
        frontier = nxt
    v = node.inputs[0]
    for _ in range(depth + 1):
        p = producers.get(v)
        if p is None:
            return False
        if p.name in float_convs:
            return True
        if get_op(p.op).kind != "elementwise":
            return False
        v = p.inputs[0]
    return False


def _layout(node: Node, graph: Graph) -> str:
    """How a layer reads its quantized input: ``plain`` (linear), ``nhwc`` (2-d conv:
    channels last) or ``nlc`` (1-d conv: [N, 1, L, C], channels last at height 1, so that
    qconv's 2-d kernels run it)."""
    if node.op != "conv":
        return "plain"
    return "nlc" if graph.types[node.inputs[0]].rank == 3 else "nhwc"


def _to_layout(b: _Builder, v: str, layout: str) -> str:
    """Float value ``v`` (NCHW / NCL) in ``layout``."""
    if layout == "nhwc":
        return b.emit("permute", [v], {"perm": NCHW_TO_NHWC}, hint=f"{v}.nhwc")
    if layout == "nlc":
        n, c, length = b.g.types[v].shape
        t = b.emit("permute", [v], {"perm": (0, 2, 1)}, hint=f"{v}.nlc")
        return b.emit("reshape", [t], {"shape": (n, 1, length, c)}, hint=f"{v}.nlc")
    return v


def _from_layout(b: _Builder, v: str, layout: str, hint: str, name: str | None = None,
                 source: str | None = None) -> str:
    """``v`` in ``layout`` back in the model's own (NCHW / NCL): the inverse of _to_layout."""
    if layout == "nhwc":
        return b.emit("permute", [v], {"perm": NHWC_TO_NCHW}, name=name, hint=hint,
                      source=source)
    if layout == "nlc":
        n, _, length, c = b.g.types[v].shape
        t = b.emit("reshape", [v], {"shape": (n, length, c)}, hint=hint, source=source)
        return b.emit("permute", [t], {"perm": (0, 2, 1)}, name=name, hint=hint,
                      source=source)
    return v


class _Builder:
    """Appends typed nodes to a new graph."""

    def __init__(self, graph: Graph) -> None:
        self.g = graph.copy()
        self.g.nodes = []

    def emit(self, op: str, inputs: Sequence[str], attrs: dict, *, name: str | None = None,
             hint: str = "q", source: str | None = None) -> str:
        attrs = get_op(op).normalize_attrs(attrs)
        (t,) = infer_types(op, [self.g.types[i] for i in inputs], attrs, node=name or hint)
        out = name or self.g.fresh_name(hint)
        self.g.types[out] = t
        self.g.nodes.append(Node(op, tuple(inputs), (out,), attrs, source))
        return out

    def keep(self, node: Node, rename: dict[str, str]) -> None:
        self.g.nodes.append(node.with_(inputs=tuple(rename.get(i, i) for i in node.inputs)))


@register_pass
class QuantizeInt8(Pass):
    """Static int8 quantization of conv / linear layers from calibrated activation ranges."""

    name = "quantize_int8"
    description = "int8 conv/linear (per-channel weights, calibrated u8 activations)"
    numerics = LOSSY
    # Each layer adds about half a quantization step of its input and weights; through a deep
    # network the output moves by a few percent of its largest magnitude.
    error_budget = ErrorBudget(rtol=0.0, atol=0.1)

    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        mode = ctx.option(self.name, "mode", "static")
        if mode not in MODES:
            raise KilnError(f"unknown quantization mode {mode!r}",
                            hint=f"use one of {', '.join(MODES)}")
        protect = set(ctx.option(self.name, "protect", ()))
        known = {n.name for n in graph.nodes} | set(graph.types)
        unknown = sorted(protect - known)
        if unknown:
            raise KilnError(f"quantize_int8.protect names nothing in the graph: {unknown}",
                            hint="use node names as `kiln show MODEL` prints them")
        target = ctx.option(self.name, "target", None)
        # The weight bound follows from the target unless set: 64 where its int8 dot product
        # is pmaddubsw, else the full range.
        weight_max = ctx.option(self.name, "weight_max",
                                target.int8_weight_max if target is not None else 127)
        if not (isinstance(weight_max, int) and 1 <= weight_max <= 127):
            raise KilnError(f"quantize_int8.weight_max must be an integer in 1..127, got "
                            f"{weight_max!r}", hint="64 keeps pmaddubsw exact (CPUs without "
                                                    "VNNI); 127 is the full int8 range")
        layers = ctx.notes.setdefault(f"{self.name}.layers", {})
        slow = int8_slower_reason(target, weight_max)
        if slow is not None and mode not in ("weight_only", "fp16"):
            for n in graph.nodes:
                if n.op in ("conv", "linear"):
                    layers[n.name] = ("fp32", slow)
            ctx.logger.info("quantize_int8: every layer stays float: %s", slow)
            return PassResult(graph, False)
        if mode == "fp16":
            g, decided = fp16_weights(graph, None, protect)
            layers.update(decided)
            return PassResult(g, any(p == "fp16" for p, _ in decided.values()))
        if mode != "static":
            return _int8_weight_linears(graph, ctx, mode, protect, weight_max)
        ranges = ctx.option(self.name, "ranges", None)
        if ranges is None:
            raise KilnError("quantize_int8 needs calibrated activation ranges",
                            hint="pass calibration data: kiln.compress(model, data, "
                                 "quantize=True) (or set the option quantize_int8.ranges)")
        users = graph.users()
        outputs = set(graph.outputs)
        cands: dict[str, Node] = {}
        for n in graph.nodes:
            why = _quantizable(n, graph, ranges, protect)
            if why is None:
                cands[n.name] = n
            elif n.op in ("conv", "linear"):
                layers[n.name] = ("fp32", why)
                ctx.logger.info("quantize_int8: %s stays float: %s", n.name, why)
        # A conv next to a grouped convolution (which stays float, e.g. a depthwise one) would
        # put a layout change (channels-last <-> channels-first transposes) on each side of
        # that float conv, which costs more than int8 saves on such memory-bound layers.
        producers = graph.producers()
        float_convs = {n.name for n in graph.nodes
                       if n.op == "conv" and n.attrs["groups"] > 1 and n.name not in cands}
        for name in [c for c, n in cands.items() if n.op == "conv"]:
            n = cands[name]
            if _near_float_conv(n, users, producers, float_convs):
                del cands[name]
                layers[name] = ("fp32", "next to a float (grouped or depthwise) convolution: "
                                        "the layout changes around it would cost more than "
                                        "int8 saves")
                ctx.logger.info("quantize_int8: %s stays float: next to a float (grouped or "
                                "depthwise) convolution", name)
        if not cands:
            return PassResult(graph, False)

        # Where each layer's result goes: through a fused relu, and as u8 or f32.
        result: dict[str, tuple[str, bool, bool]] = {}   # node -> (value, relu, u8 output)
        absorbed: set[str] = set()
        for name, n in cands.items():
            out = n.outputs[0]
            us = users.get(out, [])
            relu = len(us) == 1 and us[0].op == "relu" and out not in outputs
            value = us[0].outputs[0] if relu else out
            readers = users.get(value, [])
            u8 = (value not in outputs and value in ranges and bool(readers)
                  and all(r.name in cands and r.op == n.op and r.inputs[0] == value
                          for r in readers))
            result[name] = (value, relu, u8)
            if relu:
                absorbed.add(us[0].name)
        u8_values = {result[n][0]: n for n in cands if result[n][2]}

        # Values quantized by a quantize node (not already u8 from a layer), per layout.
        wanted: dict[str, set[str]] = {}
        for n in cands.values():
            x = n.inputs[0]
            if x not in u8_values:
                wanted.setdefault(x, set()).add(_layout(n, graph))

        b = _Builder(graph)
        quantized: dict[tuple[str, str], tuple[str, float, int]] = {}
        rename: dict[str, str] = {}

        def quantize_value(v: str) -> None:
            scale, zp = activation_qparams(*ranges[v], value=v)
            float_readers = [u for u in users.get(v, []) if u.name not in cands
                             or u.inputs[0] != v] + ([None] if v in outputs else [])
            deq = None
            for layout in sorted(wanted[v]):
                src = _to_layout(b, v, layout)
                q = b.emit("quantize", [src], {"scale": scale, "zero_point": zp},
                           hint=f"{v}.q")
                quantized[(v, layout)] = (q, scale, zp)
                if deq is None and any(r is not None for r in float_readers):
                    deq = b.emit("dequantize", [q], {"scale": scale, "zero_point": zp},
                                 hint=f"{v}.dq")
                    deq = _from_layout(b, deq, layout, f"{v}.dq")
            if deq is not None:
                rename[v] = deq

        for v in graph.inputs:
            if v in wanted:
                quantize_value(v)
        for n in graph.nodes:
            if n.name in absorbed:
                continue
            if n.name in cands:
                self._emit_layer(b, n, graph, ranges, result[n.name], quantized, weight_max)
                produced = result[n.name][0]
            else:
                b.keep(n, rename)
                produced = n.outputs[0]
            for v in ([produced] if n.name in cands else n.outputs):
                if v in wanted:
                    quantize_value(v)
        g = b.g
        g.outputs = list(graph.outputs)
        g, merged = merge_sibling_qlinears(g)
        for name in cands:
            out = "u8" if result[name][2] else "f32"
            layers[name] = ("int8", f"i8 weights (|w| <= {weight_max}), u8 input, {out} output")
        ctx.logger.info("quantize_int8: %d layers to int8 (%d with u8 outputs), %d groups of "
                        "sibling linears merged", len(cands), len(u8_values), merged)
        return PassResult(remove_dead(g), True)

    @staticmethod
    def _emit_layer(b: _Builder, n: Node, graph: Graph, ranges: dict,
                    result: tuple[str, bool, bool], quantized: dict, weight_max: int) -> None:
        value, relu, u8 = result
        x = n.inputs[0]
        conv = n.op == "conv"
        layout = _layout(n, graph)
        xq, sx, zx = quantized[(x, layout)]
        w = graph.constants[n.inputs[1]].astype(np.float32)
        if layout == "nlc":   # a 1-d conv runs as a 2-d one of height 1: [Cout, 1, k, Cin]
            w = w.transpose(0, 2, 1)[:, None]
        elif conv:
            w = w.transpose(0, 2, 3, 1)
        wq, sw = weight_qparams(w, weight_max)
        acc_scale = sx * sw.astype(np.float64)
        bias = graph.constants[n.inputs[2]] if len(n.inputs) > 2 else np.zeros(w.shape[0])
        bq = np.rint(bias.astype(np.float64) / acc_scale)
        if np.abs(bq).max(initial=0) >= 2 ** 31:
            raise KilnError("a bias does not fit the int32 accumulator's scale", node=n.name,
                            op=n.op, hint="protect this layer (quantize_int8.protect)")
        attrs = {"x_zero_point": zx, "relu": relu}
        if u8:
            so, zo = activation_qparams(*ranges[value], value=value)
            scale = (acc_scale / so).astype(np.float32)
            attrs.update(out_dtype="u8", out_zero_point=zo)
        else:
            scale = acc_scale.astype(np.float32)
            attrs.update(out_dtype="f32")
        if conv:
            a = n.attrs
            if layout == "nlc":
                attrs.update(stride=(1, *as_tuple(a["stride"], 1, "stride")),
                             padding=(0, *as_tuple(a["padding"], 1, "padding")),
                             dilation=(1, *as_tuple(a["dilation"], 1, "dilation")))
            else:
                attrs.update(stride=as_tuple(a["stride"], 2, "stride"),
                             padding=as_tuple(a["padding"], 2, "padding"),
                             dilation=as_tuple(a["dilation"], 2, "dilation"))
        g = b.g
        consts = [g.add_constant(wq, f"{n.inputs[1]}.i8"),
                  g.add_constant(bq.astype(np.int32), f"{n.name}.bias_i32"),
                  g.add_constant(scale, f"{n.name}.requant")]
        op = "qconv" if conv else "qlinear"
        if u8:
            q = b.emit(op, [xq, *consts], attrs, hint=f"{value}.u8", source=n.source)
            quantized[(value, layout)] = (q, so, zo)
        elif conv:
            y = b.emit(op, [xq, *consts], attrs, hint=f"{value}.{layout}", source=n.source)
            _from_layout(b, y, layout, value, name=value, source=n.source)
        else:
            b.emit(op, [xq, *consts], attrs, name=value, source=n.source)
