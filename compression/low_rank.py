"""Low-rank factorization: a dense layer becomes two smaller dense layers (truncated SVD).

A ``linear`` with a constant weight W [out, in] is replaced by

    linear(linear(x, sqrt(S_r) V_r^T), U_r sqrt(S_r), bias)      # [r, in] then [out, r]

where W = U S V^T in float64 and r keeps the largest singular values. A ``conv`` with a
constant weight and ``groups == 1`` gets the channel decomposition of W reshaped to
[Cout, Cin * k...]: a conv with the original kernel, stride, padding and dilation and r output
channels, then a 1x1 conv to Cout channels that carries the bias (a 1x1 conv is the case
k = 1). Both halves cost ``r * (in + out)`` parameters and multiply-adds per output position
against ``in * out`` before, so a layer is factorized only where ``r * (in + out) < in * out``;
otherwise it stays as it is and the log says why. The new layers carry the original node's
``source``; the second one keeps its output name, so graph outputs keep theirs.

Options (``PassContext.options["low_rank.<key>"]``); at most one of the first three:

``energy`` (default 0.9)
    keep, in each layer, the smallest r whose squared singular values reach this fraction of
    the total (the weight's relative Frobenius error is then at most ``sqrt(1 - energy)``);
    r is rounded *up* to ``multiple`` so at least that energy is kept.
``param_ratio``
    a fraction in (0, 1): each layer keeps at most this fraction of its weight's parameters;
    r is rounded *down* to ``multiple`` (never below 1) so the budget holds.
``flops_target``
    a fraction in (0, 1] of the whole graph's FLOPs (every node's, by the op registry's cost
    rules) to reach: one energy fraction shared by every eligible layer, the largest that
    meets the target. A target the eligible layers cannot reach is a KilnError.
``protect`` (default none)
    node names (a name or a collection of names) left alone.
``layers`` (default none)
    per layer group settings, ``{pattern: value}``: layers whose node name (or module path,
    ``"encoder.*"`` for ``encoder_*``) matches the glob pattern keep ``value`` of the energy
    (with ``energy``) or of their parameters (with ``param_ratio``) instead; ``False`` (or
    None) leaves them alone. Where several patterns match, the last one wins. Not with
    ``flops_target``, which shares one energy among all layers.
``min_size`` (default 4096)
    layers whose weight has fewer elements are left alone: they gain little.
``multiple`` (default 8)
    r is a multiple of this (capped at the full rank), so the halves map onto whole vectors.

A weight read by more than one node is left alone: factorizing one reader would keep the
original weight alive and make the graph larger.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np

from kiln.compression.prune import name_matches, read_layer_settings
from kiln.ir import Graph, KilnError, Node, get_op, graph_flops, infer_types
from kiln.passes.base import LOSSY, ErrorBudget, Pass, PassContext, PassResult, register_pass
from kiln.passes.dce import live_values, remove_dead

PASS_NAME = "low_rank"
DEFAULT_ENERGY = 0.9
DEFAULT_MIN_SIZE = 4096
DEFAULT_MULTIPLE = 8

# A cumulative energy that misses the requested fraction by rounding alone still counts.
_ENERGY_SLACK = 1e-12


@dataclass(frozen=True)
class LowRankOptions:
    """The pass's options after validation. Exactly one of ``energy``, ``param_ratio`` and
    ``flops_target`` is set."""

    energy: float | None = DEFAULT_ENERGY
    param_ratio: float | None = None
    flops_target: float | None = None
    protect: frozenset[str] = frozenset()
    layers: tuple[tuple[str, Any], ...] = ()
    min_size: int = DEFAULT_MIN_SIZE
    multiple: int = DEFAULT_MULTIPLE


@dataclass(frozen=True)
class Layer:
    """A factorizable layer: its node, the SVD of its weight as a matrix [out, fan_in] in
    float64 (signs fixed so the largest entry of each left singular vector is positive), and
    how many output positions (rows of a linear, N * spatial of a conv) it computes."""

    node: Node
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    positions: int

    @property
    def out_features(self) -> int:
        return self.u.shape[0]

    @property
    def fan_in(self) -> int:
        return self.vt.shape[1]

    @property
    def full_rank(self) -> int:
        return len(self.s)

    @property
    def params(self) -> int:
        """Weight parameters as the layer stands."""
        return self.out_features * self.fan_in

    def factored_params(self, rank: int) -> int:
        """Weight parameters of the two halves at ``rank``."""
        return rank * (self.out_features + self.fan_in)

    def saves(self, rank: int) -> bool:
        """Whether factorizing at ``rank`` reduces FLOPs and parameters (the same condition)."""
        return self.factored_params(rank) < self.params

    def flops(self, rank: int | None) -> int:
        """FLOPs of the layer at ``rank`` (None: unfactorized), as the registry counts them."""
        per_position = self.params if rank is None else self.factored_params(rank)
        return 2 * self.positions * per_position

    def cumulative_energy(self) -> np.ndarray:
        """Fraction of the squared singular values kept by ranks 1..full_rank."""
        sq = np.cumsum(self.s**2)
        return sq / sq[-1]


# ---- options ---------------------------------------------------------------------------------
def _fraction(ctx: PassContext, key: str, *, closed_top: bool) -> float | None:
    value = ctx.option(PASS_NAME, key, None)
    if value is None:
        return None
    top = "]" if closed_top else ")"
    ok = isinstance(value, Real) and not isinstance(value, bool) and (
        0.0 < float(value) <= 1.0 if closed_top else 0.0 < float(value) < 1.0)
    if not ok:
        raise KilnError(f"option {PASS_NAME}.{key} is {value!r}",
                        hint=f"{PASS_NAME}.{key} must be a number in (0, 1{top}")
    return float(value)


def _count(ctx: PassContext, key: str, default: int, lowest: int) -> int:
    value = ctx.option(PASS_NAME, key, default)
    if not isinstance(value, Integral) or isinstance(value, bool) or value < lowest:
        raise KilnError(f"option {PASS_NAME}.{key} is {value!r}",
                        hint=f"{PASS_NAME}.{key} must be an integer >= {lowest}")
    return int(value)


def read_options(ctx: PassContext, graph: Graph) -> LowRankOptions:
    """The pass's options from ``ctx``, validated against ``graph`` (KilnError naming the
    option and what it accepts)."""
    energy = _fraction(ctx, "energy", closed_top=True)
    param_ratio = _fraction(ctx, "param_ratio", closed_top=False)
    flops_target = _fraction(ctx, "flops_target", closed_top=True)
    chosen = [k for k, v in [("energy", energy), ("param_ratio", param_ratio),
                             ("flops_target", flops_target)] if v is not None]
    if len(chosen) > 1:
        raise KilnError(f"options {', '.join(f'{PASS_NAME}.{k}' for k in chosen)} are all set",
                        hint="set one of energy, param_ratio and flops_target: each one "
                             "chooses the ranks on its own")
    if not chosen:
        energy = DEFAULT_ENERGY

    protect = ctx.option(PASS_NAME, "protect", ())
    if isinstance(protect, str):
        protect = (protect,)
    if not isinstance(protect, Iterable) or not all(isinstance(p, str) for p in protect):
        raise KilnError(f"option {PASS_NAME}.protect is {protect!r}",
                        hint="give a node name or a list of node names")
    names = {n.name for n in graph.nodes}
    unknown = sorted(set(protect) - names)
    if unknown:
        layers = sorted(n.name for n in graph.nodes if n.op in ("linear", "conv"))
        raise KilnError(f"option {PASS_NAME}.protect names {unknown}, not nodes of graph "
                        f"{graph.name}",
                        hint=f"its linear and conv nodes are {layers[:20]}"
                             + (" ..." if len(layers) > 20 else ""))
    top = 1.0 if param_ratio is None else 1.0 - 1e-12
    layers = read_layer_settings(ctx.option(PASS_NAME, "layers", None), graph, PASS_NAME,
                          "a fraction in (0, 1] (the energy, or of the parameters), or False",
                          lambda v: v is None or v is False or (
                              isinstance(v, Real) and not isinstance(v, bool)
                              and 0.0 < float(v) <= top))
    if layers and flops_target is not None:
        raise KilnError(f"options {PASS_NAME}.layers and {PASS_NAME}.flops_target are both set",
                        hint="flops_target shares one energy among all layers: use energy= "
                             "or param_ratio= with per-layer values")
    return LowRankOptions(
        energy=energy, param_ratio=param_ratio, flops_target=flops_target,
        protect=frozenset(protect), layers=layers,
        min_size=_count(ctx, "min_size", DEFAULT_MIN_SIZE, 0),
        multiple=_count(ctx, "multiple", DEFAULT_MULTIPLE, 1))


# ---- which layers, and their SVDs ------------------------------------------------------------
def _skip_reason(node: Node, graph: Graph, users: dict[str, list[Node]],
                 opts: LowRankOptions) -> str | None:
    """Why ``node`` (a linear or conv) cannot be factorized, or None if it can."""
    if node.name in opts.protect:
        return "protected by option low_rank.protect"
    if _layer_setting(node.name, opts) is False:
        return "left alone by option low_rank.layers"
    if node.op == "conv" and node.attrs["groups"] != 1:
        return f"grouped conv (groups={node.attrs['groups']}): its channels are not one matrix"
    weight = node.inputs[1]
    if not graph.is_constant(weight):
        return f"weight %{weight} is not a constant"
    if len(users.get(weight, ())) > 1 or weight in graph.outputs:
        return f"weight %{weight} is also read elsewhere: factorizing would not free it"
    size = graph.constants[weight].size
    if size < opts.min_size:
        return f"weight has {size} elements, below low_rank.min_size={opts.min_size}"
    if not np.all(np.isfinite(graph.constants[weight])):
        return f"weight %{weight} holds NaN or infinity"
    return None


def _svd(node: Node, graph: Graph) -> Layer | None:
    w = graph.constants[node.inputs[1]].astype(np.float64)
    matrix = w.reshape(w.shape[0], -1)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    if s[0] == 0.0:
        return None
    # LAPACK may return either sign for each singular pair; fixing it makes the factors (and
    # so golden IR and compile caches) the same on every machine.
    pivot = np.argmax(np.abs(u), axis=0)
    signs = np.where(u[pivot, np.arange(u.shape[1])] < 0, -1.0, 1.0)
    # (+ 0.0 turns the -0.0 a flipped zero becomes back into 0.0 for the printed weights.)
    u, vt = u * signs + 0.0, vt * signs[:, None] + 0.0
    out_type = graph.type_of(node.outputs[0])
    channel_axis = -1 if node.op == "linear" else 1
    positions = out_type.numel // out_type.shape[channel_axis]
    return Layer(node, u, s, vt, positions)


def find_layers(graph: Graph, opts: LowRankOptions, ctx: PassContext) -> list[Layer]:
    """Every linear and conv that may be factorized, with its SVD; logs why the others are
    left alone."""
    users = graph.users()
    layers = []
    for node in graph.nodes:
        if node.op not in ("linear", "conv"):
            continue
        reason = _skip_reason(node, graph, users, opts)
        layer = _svd(node, graph) if reason is None else None
        if reason is None and layer is None:
            reason = "weight is all zeros"
        if reason is not None:
            ctx.logger.info("low_rank: %s (%s) left alone: %s", node.name, node.op, reason)
            continue
        layers.append(layer)
    return layers


def _layer_setting(name: str, opts: LowRankOptions) -> Any:
    """The ``layers`` value of the last pattern matching node ``name`` (None: no pattern
    matches); False for a layer left alone."""
    setting = None
    for pattern, value in opts.layers:
        if name_matches(name, pattern):
            setting = False if value is None else value
    return setting


# ---- ranks -----------------------------------------------------------------------------------
def rank_for_energy(layer: Layer, energy: float, multiple: int) -> int:
    """The smallest rank keeping ``energy`` of the squared singular values, rounded up to
    ``multiple`` and capped at the full rank."""
    r = int(np.searchsorted(layer.cumulative_energy(), energy - _ENERGY_SLACK)) + 1
    return min(math.ceil(r / multiple) * multiple, layer.full_rank)


def rank_for_param_ratio(layer: Layer, ratio: float, multiple: int) -> int:
    """The largest rank whose halves hold at most ``ratio`` of the weight's parameters,
    rounded down to ``multiple`` where that leaves at least one multiple, and at least 1."""
    r = int(ratio * layer.params) // (layer.out_features + layer.fan_in)
    if r >= multiple:
        r -= r % multiple
    return max(r, 1)


def _ranks_for_flops(layers: list[Layer], graph: Graph, target: float, multiple: int
                     ) -> dict[str, int]:
    """One energy fraction for every layer: the largest whose graph FLOPs meet ``target`` (a
    fraction of the graph's FLOPs now)."""
    total = graph_flops(graph)
    fixed = total - sum(layer.flops(None) for layer in layers)

    def ranks_at(energy: float) -> dict[str, int]:
        return {layer.node.name: rank_for_energy(layer, energy, multiple) for layer in layers}

    def flops_at(ranks: dict[str, int]) -> int:
        return fixed + sum(layer.flops(ranks[layer.node.name])
                           if layer.saves(ranks[layer.node.name]) else layer.flops(None)
                           for layer in layers)

    # Ranks change only where some layer's cumulative energy is crossed, and a layer's FLOPs
    # never fall as its rank grows (it stays whole once halves would cost more), so the
    # candidate energies can be searched by bisection.
    candidates = np.unique(np.concatenate([layer.cumulative_energy() for layer in layers]))
    best = ranks_at(float(candidates[0]))
    if flops_at(best) > target * total:
        reachable = flops_at(best) / total if total else 1.0
        raise KilnError(
            f"option {PASS_NAME}.flops_target={target:g} cannot be reached on graph "
            f"{graph.name}: factorizing every eligible layer to its smallest rank leaves "
            f"{reachable:.3f} of its FLOPs",
            hint=f"set low_rank.flops_target >= {reachable:.3f}, or lower low_rank.multiple or "
                 "low_rank.min_size, or protect fewer layers")
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ranks = ranks_at(float(candidates[mid]))
        if flops_at(ranks) <= target * total:
            lo, best = mid, ranks
        else:
            hi = mid - 1
    return best


def choose_ranks(layers: list[Layer], graph: Graph, opts: LowRankOptions) -> dict[str, int]:
    """The rank each layer would get under ``opts`` (before the does-it-save check)."""
    if not layers:
        return {}
    if opts.flops_target is not None:
        return _ranks_for_flops(layers, graph, opts.flops_target, opts.multiple)
    out = {}
    for layer in layers:
        own = _layer_setting(layer.node.name, opts)
        if opts.param_ratio is not None:
            ratio = opts.param_ratio if own is None else float(own)
            out[layer.node.name] = rank_for_param_ratio(layer, ratio, opts.multiple)
        else:
            energy = opts.energy if own is None else float(own)
            out[layer.node.name] = rank_for_energy(layer, energy, opts.multiple)
    return out


# ---- the rewrite -----------------------------------------------------------------------------
def factor_weights(layer: Layer, rank: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The two halves' weights at ``rank``: the first [rank, in] (or [rank, Cin, *k]), the
    second [out, rank] (or [out, rank, 1, ...]), rounded once to ``dtype``."""
    root = np.sqrt(layer.s[:rank])
    first = root[:, None] * layer.vt[:rank]
    second = layer.u[:, :rank] * root
    return first.astype(dtype), second.astype(dtype)


def _emit(graph: Graph, op: str, inputs: list[str], attrs: dict[str, Any], name: str,
          source: str | None) -> Node:
    attrs = get_op(op).normalize_attrs(attrs, node=name)
    (t,) = infer_types(op, [graph.types[i] for i in inputs], attrs, node=name)
    graph.types[name] = t
    node = Node(op, tuple(inputs), (name,), attrs, source)
    graph.nodes.append(node)
    return node


def _factorize(out: Graph, layer: Layer, rank: int) -> None:
    """Append the two halves replacing ``layer`` to ``out``."""
    node = layer.node
    x, w_name = node.inputs[0], node.inputs[1]
    w = out.constants[w_name]
    first, second = factor_weights(layer, rank, w.dtype)
    if node.op == "conv":
        first = first.reshape((rank,) + w.shape[1:])
        second = second.reshape((w.shape[0], rank) + (1,) * (w.ndim - 2))
    first_w = out.add_constant(first, f"{w_name}.low_rank_in")
    second_w = out.add_constant(second, f"{w_name}.low_rank_out")
    mid = out.fresh_name(f"{node.name}.low_rank")
    bias = list(node.inputs[2:])
    if node.op == "linear":
        _emit(out, "linear", [x, first_w], {}, mid, node.source)
        _emit(out, "linear", [mid, second_w, *bias], {}, node.outputs[0], node.source)
    else:
        _emit(out, "conv", [x, first_w], dict(node.attrs), mid, node.source)
        _emit(out, "conv", [mid, second_w, *bias], {}, node.outputs[0], node.source)


def low_rank_graph(graph: Graph, opts: LowRankOptions, ctx: PassContext) -> tuple[Graph, int]:
    """``graph`` with its eligible layers factorized under ``opts``, and how many were."""
    layers = find_layers(graph, opts, ctx)
    ranks = choose_ranks(layers, graph, opts)
    chosen: dict[str, tuple[Layer, int]] = {}
    for layer in layers:
        name, r = layer.node.name, ranks[layer.node.name]
        if not layer.saves(r):
            ctx.logger.info(
                "low_rank: %s (%s) left alone: rank %d of %d would not reduce FLOPs and "
                "parameters (%d * (%d + %d) >= %d * %d)", name, layer.node.op, r,
                layer.full_rank, r, layer.fan_in, layer.out_features, layer.fan_in,
                layer.out_features)
            continue
        kept = float(layer.cumulative_energy()[r - 1])
        ctx.logger.info("low_rank: %s (%s) rank %d of %d keeps %.4f of the energy; weight "
                        "parameters %d -> %d", name, layer.node.op, r, layer.full_rank, kept,
                        layer.params, layer.factored_params(r))
        chosen[name] = (layer, r)
    if not chosen:
        return graph, 0

    out = graph.copy()
    out.nodes = []
    for node in graph.nodes:
        if node.name in chosen:
            _factorize(out, *chosen[node.name])
        else:
            out.nodes.append(node)
    # Drop the replaced weights, but no dead code that was there before: that is DCE's call.
    already_dead = set(graph.values()) - live_values(graph)
    return remove_dead(out, keep=already_dead), len(chosen)


@register_pass
class LowRank(Pass):
    """Factorize constant-weight linear and groups-1 conv layers by truncated SVD.

    Lossy and opt-in. The error budget is what the default ``energy`` of 0.9 keeps: each
    factorized weight moves by at most sqrt(1 - 0.9) ~ 0.32 of its Frobenius norm, so one
    factorized layer moves its outputs by about that fraction of their largest magnitude
    (``atol``). Errors of stacked factorized layers add up: on the zoo's randomly initialized
    models (flat spectra, the worst case for SVD) the default moved the outputs by up to 0.3 (BERT,
    GPT-2 block) and 0.4 to 0.74 (MobileNetV2, ResNet-18), which a NumericCheck reports as over
    budget. Trained weights have faster-falling spectra; either way, check the result
    (``kiln.optimize`` with ``check_inputs``) and fine-tune it where needed
    (``kiln.compression.distill``).
    """

    name = PASS_NAME
    description = "factorize constant-weight linear and conv layers into two smaller ones (SVD)"
    numerics = LOSSY
    error_budget = ErrorBudget(rtol=0.0, atol=math.sqrt(1.0 - DEFAULT_ENERGY))

    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        opts = read_options(ctx, graph)
        out, count = low_rank_graph(graph, opts, ctx)
        if count:
            ctx.logger.info("low_rank: factorized %d layers; parameters %d -> %d", count,
                            graph.num_parameters(), out.num_parameters())
        return PassResult(out, bool(count))
