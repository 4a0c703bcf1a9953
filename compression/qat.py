"""Quantization-aware training (QAT): ``kiln.compress(..., quantize={"mode": "qat"})``.

Static int8 (compression/quantize.py) rounds a trained model's weights and activations onto
int8 grids after the fact; QAT lets the weights learn to live on those grids first:

1. the float graph (after the O1 cleanups: batch norms are folded into the layers, exactly the
   graph the static pass quantizes) is calibrated with the static pass's observer
   (``compress.calibrate``: ``RangeObserver``, same method, percentile and batches), and the
   static pass is asked which layers it would make int8 (the same protect list, weight bound
   and target rules);
2. the student's torch module (``GraphRunner``, built by ``interop.to_torch.graph_to_module``)
   gets fake quantization where the int8 graph rounds: every input of an int8 layer is rounded
   to its u8 grid (``activation_qparams`` of its calibrated range: the quantize node, or the
   requantization of the layer that produces it as u8), each int8 layer's weights to their
   per-output-channel i8 grid (``weight_qparams``, recomputed from the current weights at every
   step, as the conversion does at the end) and its bias to the int32 accumulator's grid.
   Gradients go straight through the rounding (straight-through estimator), and are zero for
   activations clamped outside their range;
3. the distillation loop (compression/distill.py) fine-tunes the weights against the teacher;
4. the static pass converts the trained float graph to the int8 graph with the same ranges: the
   same qconv / qlinear ops and scales, so the int8 model computes what the fake-quant model
   computed, up to the float rounding of the requantization (tested).

Activation scales are **fixed** (calibrated once, before training), not learned: they are then
exactly the static pass's scales, so QAT starts from precisely the PTQ int8 model and only the
weights move; learned scales (LSQ) would need their own learning rate and gradient scaling,
and the observers would no longer say what the int8 model uses. Weight scales follow the
weights (the per-channel max, as at conversion).

Options (the ``quantize`` dict): the static ones (``method``, ``percentile``, ``max_batches``,
``protect``, ``weight_max``) and the fine-tune's, as in ``distill=``: ``epochs`` (default 3),
``lr`` (default 1e-4: the weights only need to move by a fraction of a grid step),
``temperature``, ``alpha``, ``batch_size``, ``seed``, ``progress``. QAT needs ``data`` (for
calibration and training); the teacher is the original model (the float graph itself when
there is none).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from kiln.compression.quantize import MODES, activation_qparams
from kiln.interop.to_torch import TORCH_IMPL
from kiln.ir import Graph, InternalError, KilnError
from kiln.passes import PassContext, get_pass
from kiln.passes.target import Target

log = logging.getLogger("kiln.qat")

QAT_TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 3, "lr": 1e-4, "temperature": 4.0,
                                      "alpha": 0.9, "batch_size": 32, "seed": 0,
                                      "progress": True}
"""The QAT fine-tune's settings (``kiln.compression.distill.distill`` arguments) and defaults."""

STATIC_KEYS = ("mode", "method", "percentile", "max_batches", "protect", "weight_max", "fp16")
"""The ``quantize=`` options of every mode (the others are QAT's own)."""

QUANTIZE_KEYS = STATIC_KEYS + tuple(QAT_TRAIN_DEFAULTS)
"""Every ``quantize=`` option ``kiln.compress`` knows."""


def check_quantize_options(options: Mapping[str, Any]) -> None:
    """KilnError for a ``quantize=`` option kiln does not know, or a QAT setting given to
    another mode."""
    unknown = sorted(str(k) for k in options if k not in QUANTIZE_KEYS)
    if unknown:
        raise KilnError(f"unknown quantize= option {unknown[0]!r}",
                        hint=f"the options are {', '.join(QUANTIZE_KEYS)}")
    mode = options.get("mode")
    if mode not in MODES + ("qat",):
        raise KilnError(f"unknown quantization mode {mode!r}",
                        hint=f"use one of {', '.join(MODES + ('qat',))}")
    if mode != "qat":
        training = sorted(k for k in options if k in QAT_TRAIN_DEFAULTS)
        if training:
            raise KilnError(f"quantize= option {training[0]!r} sets quantization-aware "
                            f"training, not mode {mode!r}",
                            hint='use quantize={"mode": "qat", ...}, or drop it')
        return
    from kiln.compression.distill import _check_settings

    s = train_options(options)
    try:
        _check_settings(s["epochs"], s["lr"], s["temperature"], s["alpha"], s["batch_size"],
                        "auto", 1.0)
    except KilnError as e:
        # The same rules as distill='s settings, named as the quantize= options they are.
        raise KilnError(e.message.replace("distill: ", "quantize= (qat) option ", 1),
                        hint=e.hint) from None


# ---- the plan: what the static pass would round, and where ----------------------------------
@dataclass
class QatPlan:
    """Where the int8 graph rounds: ``activations`` (value -> u8 scale and zero point) for
    every input of an int8 layer, ``layers`` (layer node name -> the scale of its input) and
    the weight bound ``weight_max``."""

    activations: dict[str, tuple[float, int]] = field(default_factory=dict)
    layers: dict[str, float] = field(default_factory=dict)
    weight_max: int = 127


def static_pass_options(ranges: Mapping[str, tuple[float, float]], protect: Sequence[str] = (),
                        target: Target | None = None, weight_max: int | None = None
                        ) -> dict[str, Any]:
    """The ``quantize_int8`` options of the static pass QAT trains for and converts with."""
    options: dict[str, Any] = {"quantize_int8.mode": "static",
                               "quantize_int8.protect": tuple(protect),
                               "quantize_int8.target": target,
                               "quantize_int8.ranges": dict(ranges)}
    if weight_max is not None:
        options["quantize_int8.weight_max"] = weight_max
    return options


def plan_fake_quant(graph: Graph, options: Mapping[str, Any]) -> QatPlan:
    """The static pass's decisions on ``graph`` with ``options`` (``static_pass_options``):
    which layers become int8 (it is run, and its notes read) and the grids their inputs,
    weights and biases round to."""
    ctx = PassContext(options=dict(options))
    get_pass("quantize_int8").run(graph, ctx)
    decided = ctx.notes.get("quantize_int8.layers", {})
    target = options.get("quantize_int8.target")
    weight_max = options.get("quantize_int8.weight_max",
                             target.int8_weight_max if target is not None else 127)
    ranges = options["quantize_int8.ranges"]
    plan = QatPlan(weight_max=int(weight_max))
    for n in graph.nodes:
        if decided.get(n.name, ("fp32",))[0] != "int8":
            continue
        if n.op not in ("conv", "linear"):
            raise InternalError(f"quantize_int8 made {n.op} {n.name} int8; QAT knows conv and "
                                "linear layers only", node=n.name, op=n.op)
        x = n.inputs[0]
        plan.activations[x] = activation_qparams(*ranges[x], value=x)
        plan.layers[n.name] = plan.activations[x][0]
    return plan


# ---- fake quantization (straight-through estimator) -----------------------------------------
def _straight_through(x: torch.Tensor, rounded: torch.Tensor,
                      passes: torch.Tensor | None = None) -> torch.Tensor:
    """``rounded`` forward; the gradient of ``x`` backward (where ``passes``, else zero)."""
    xs = x if passes is None else x * passes
    # xs - xs.detach() is exactly 0 forward, so the value is exactly `rounded`.
    return xs - xs.detach() + rounded.detach()


def fake_quant_activation(x: torch.Tensor, *, scale: float, zero_point: int) -> torch.Tensor:
    """``x`` rounded to the u8 grid (scale, zero point) and back, as the quantize and dequantize
    ops compute it; the gradient passes where ``x`` is inside the grid's range."""
    s = torch.tensor(scale, dtype=torch.float32, device=x.device)
    q = torch.round(x.float() / s) + zero_point
    inside = (q >= 0) & (q <= 255)
    y = (q.clamp(0, 255) - zero_point) * s
    return _straight_through(x, y.to(x.dtype), inside.to(x.dtype))


def _weight_scale(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-output-channel float32 scales of ``w`` as ``weight_qparams`` makes them."""
    amax = w.detach().reshape(w.shape[0], -1).double().abs().amax(dim=1)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).float()


def fake_quant_weight(w: torch.Tensor, *, qmax: int) -> torch.Tensor:
    """``w`` rounded per output channel to symmetric i8 in [-qmax, qmax] and back
    (``weight_qparams``); the gradient passes unchanged (the max sits on the grid: nothing
    clamps)."""
    scale = _weight_scale(w, qmax).double().reshape(-1, *([1] * (w.dim() - 1)))
    q = torch.clamp(torch.round(w.detach().double() / scale), -qmax, qmax)
    return _straight_through(w, (q * scale).to(w.dtype))


def fake_quant_bias(b: torch.Tensor, w: torch.Tensor, *, x_scale: float, qmax: int
                    ) -> torch.Tensor:
    """``b`` rounded to the int32 accumulator's grid (input scale x weight scale per channel),
    as the static pass stores it."""
    acc = x_scale * _weight_scale(w, qmax).double()
    q = torch.round(b.detach().double() / acc)
    return _straight_through(b, (q * acc).to(b.dtype))


def _fx_values(module: torch.fx.GraphModule, graph: Graph) -> dict[str, torch.fx.Node]:
    """kiln value name -> the fx node computing it in ``graph_to_module(graph)``: its
    placeholders follow the graph's inputs, its get_attr nodes the constants, and its calls the
    graph's nodes in order (a multi-output node's call is followed by one getitem per output)."""
    fx_nodes = list(module.graph.nodes)
    attrs = {attr: name for name, attr in module.meta["kiln_constants"].items()}
    values: dict[str, torch.fx.Node] = {}
    placeholders = [n for n in fx_nodes if n.op == "placeholder"]
    values.update(zip(graph.inputs, placeholders))
    for n in fx_nodes:
        if n.op == "get_attr":
            values[attrs[n.target]] = n
    calls = iter(n for n in fx_nodes if n.op == "call_function")
    for node in graph.nodes:
        call = next(calls, None)
        if call is None or call.target is not TORCH_IMPL[node.op]:
            raise InternalError(f"the torch module of {graph.name} does not follow its graph "
                                f"at {node.name}", node=node.name, op=node.op)
        if len(node.outputs) == 1:
            values[node.outputs[0]] = call
            continue
        for out in node.outputs:
            item = next(calls, None)
            if item is None or item.target is not operator.getitem:
                raise InternalError(f"the torch module of {graph.name} does not follow its "
                                    f"graph at {node.name}", node=node.name, op=node.op)
            values[out] = item
    return values


def insert_fake_quant(module: torch.fx.GraphModule, graph: Graph, plan: QatPlan
                      ) -> torch.fx.GraphModule:
    """``module`` (``graph_to_module(graph)``) with the plan's fake quantization inserted, in
    place: every node reading a planned activation reads it rounded (the graph's outputs keep
    the value itself, as in the int8 graph), and each planned layer reads its weights and bias
    rounded. Returned recompiled."""
    values = _fx_values(module, graph)
    fx = module.graph
    for value, (scale, zp) in plan.activations.items():
        node = values[value]
        with fx.inserting_after(node):
            fq = fx.call_function(fake_quant_activation, (node,),
                                  {"scale": scale, "zero_point": zp})
        node.replace_all_uses_with(fq, delete_user_cb=lambda u, fq=fq: u is not fq
                                   and u.op != "output")
    for n in graph.nodes:
        if n.name not in plan.layers:
            continue
        layer = values[n.outputs[0]]
        weight = layer.args[1]
        with fx.inserting_before(layer):
            fq_w = fx.call_function(fake_quant_weight, (weight,), {"qmax": plan.weight_max})
            layer.update_arg(1, fq_w)
            if len(layer.args) > 2 and layer.args[2] is not None:
                fq_b = fx.call_function(fake_quant_bias, (layer.args[2], weight),
                                        {"x_scale": plan.layers[n.name],
                                         "qmax": plan.weight_max})
                layer.update_arg(2, fq_b)
    fx.lint()
    module.recompile()
    return module


def fake_quant_module(graph: Graph, plan: QatPlan, trainable: bool = False
                      ) -> torch.fx.GraphModule:
    """``graph`` as a torch module with the plan's fake quantization (for inspection and
    tests; training builds it through ``GraphRunner``)."""
    from kiln.interop.to_torch import graph_to_module

    return insert_fake_quant(graph_to_module(graph, trainable=trainable), graph, plan)


# ---- the stage -------------------------------------------------------------------------------
def train_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The fine-tune's settings in ``options`` (a ``quantize`` dict), defaults filled in."""
    return {k: options.get(k, v) for k, v in QAT_TRAIN_DEFAULTS.items()}


def quantization_aware_training(graph: Graph, teacher: Any, data: Any, *,
                                pass_options: Mapping[str, Any], labels: Any = None,
                                **settings: Any) -> Graph:
    """Fine-tune ``graph`` (float, after O1) with fake quantization at the grids the static
    pass uses with ``pass_options`` (its ``quantize_int8.*`` options, the calibrated ranges
    included: ``static_pass_options``), by distillation against ``teacher`` (an nn.Module or a
    Graph; None: ``graph`` itself) on ``data``; ``settings``: ``distill`` arguments
    (``epochs``, ``lr`` ...). Returns the trained float graph: the static pass with the same
    options turns it into the int8 graph the training simulated."""
    from kiln.compression.distill import distill

    if data is None:
        raise KilnError("quantization-aware training needs data",
                        hint="pass data=... (training batches, also used to calibrate)")
    plan = plan_fake_quant(graph, pass_options)
    if not plan.layers:
        log.info("qat: no layer would be int8; nothing to train")
        return graph
    log.info("qat: %d int8 layers, %d fake-quantized activations", len(plan.layers),
             len(plan.activations))
    return distill(graph, graph if teacher is None else teacher, data, labels=labels,
                   student_transform=lambda m: insert_fake_quant(m, graph, plan),
                   **settings)

