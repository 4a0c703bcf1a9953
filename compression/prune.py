"""Structured pruning: remove whole channels (and attention heads) so the graph gets smaller.

``find_channel_groups`` (kiln.compression.channel_groups) says which channels must go together; this
pass scores each group's units, decides how many to keep, and rewrites the graph with new,
smaller constants: the pruned filters, per-channel constants and consumer input columns are
gone, reshape/split/slice/expand/groups attributes count the kept channels, and every type is
re-inferred by the op registry. The graph's outputs keep their shapes.

Options (``ctx.option("prune_channels", key, default)``):

- ``ratio`` (0.3): fraction of each group's units removed, in [0, 1).
- ``global`` (False): rank the units of all groups together on scores normalized by each
  group's mean, and remove ``ratio`` of all units; groups with weak units lose more.
- ``flops_target`` (None): fraction of the graph's FLOPs to remove, in (0, 1); the pass picks
  the ratio (local or global) whose plan lands closest to it. Replaces ``ratio``.
- ``criterion`` ("l1"): ``l1`` / ``l2`` norm of the producer filters, ``bn_scale`` (|gamma| of the
  batch_norm right after the producer; l1 where there is none) or ``taylor`` (scores given in
  ``scores``).
- ``scores`` (None; also read from ``prune.scores``): {producer output value: per-channel
  scores}, e.g. from ``kiln.compression.prune_scores.taylor_scores``. Scores are summed over the
  members of a unit.
- ``protect`` (()): node, value or constant names whose channels must stay: every group
  touching one of them is left whole.
- ``multiple`` (8): kept channel counts are rounded up to a multiple of this (SIMD width),
  never below it, never above the original count.
- ``min_channels`` (1): no group keeps fewer channels than this.
- ``layers`` ({}): per-layer widths, ``{pattern: ratio}``: a group whose source layers
  (conv / linear node names) match a glob ``pattern`` loses ``ratio`` of its units instead
  (0: it stays whole). A module path matches too (``"layer3.*"`` is ``layer3_*``), ``a|b``
  matches either; where several patterns match a group, the last one wins, so
  ``{"layer*": 0.5, "layer4*": 0.8}`` refines. ``ratio`` / ``flops_target`` / ``global`` then
  apply to the other groups only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import numpy as np

from kiln.compression.channel_groups import ChannelAnalysis, ChannelGroup, find_channel_groups
from kiln.ir import Graph, KilnError, Node, graph_flops, infer_types
from kiln.passes.base import LOSSY, ErrorBudget, Pass, PassContext, PassResult, register_pass

PASS_NAME = "prune_channels"
CRITERIA = ("l1", "l2", "bn_scale", "taylor")


# ---- importance ----------------------------------------------------------------------------
def channel_scores(graph: Graph, group: ChannelGroup, criterion: str,
                   scores: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per output channel importance of each source of ``group`` (by source node name)."""
    users: dict[str, list[Node]] = graph.users()
    out: dict[str, np.ndarray] = {}
    for src in group.sources:
        if criterion == "taylor":
            given = (scores or {}).get(src.value)
            if given is None:
                raise KilnError(f"criterion 'taylor' needs scores for %{src.value}",
                                node=src.node, op=src.op,
                                hint="compute them with kiln.compression.prune_scores."
                                     "taylor_scores and pass them as option "
                                     "prune_channels.scores")
            out[src.node] = np.abs(np.asarray(given, np.float64))
            continue
        if criterion == "bn_scale":
            gamma = _following_bn_gamma(graph, users, src.value, src.axis)
            if gamma is not None:
                out[src.node] = np.abs(gamma)
                continue
        w = np.moveaxis(graph.constants[src.weight].astype(np.float64), src.weight_axis, 0)
        filters = w.reshape(src.channels, -1)
        if criterion == "l2":
            out[src.node] = np.sqrt((filters ** 2).sum(axis=1))
        else:
            out[src.node] = np.abs(filters).sum(axis=1)
    return out


def _following_bn_gamma(graph: Graph, users: Mapping[str, list[Node]], value: str,
                        axis: int) -> np.ndarray | None:
    if axis != 1:
        return None
    for n in users.get(value, []):
        if n.op == "batch_norm" and n.inputs[0] == value and n.inputs[3] in graph.constants:
            return graph.constants[n.inputs[3]].astype(np.float64)
    return None


def unit_scores(graph: Graph, group: ChannelGroup, criterion: str,
                scores: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Importance of each unit of ``group``: its channels' scores summed over all sources."""
    total = np.zeros(group.num_units)
    for node, per_channel in channel_scores(graph, group, criterion, scores).items():
        np.add.at(total, group.unit_of[node], per_channel)
    return total


# ---- how many units to keep ----------------------------------------------------------------
def kept_units(num_units: int, width: int, ratio: float, multiple: int = 8,
               min_channels: int = 1) -> int:
    """Units a group keeps after removing ``ratio`` of them: the count (times ``width``
    channels) rounded up to a multiple of ``multiple``, at least ``multiple`` and
    ``min_channels`` channels, at most all units."""
    keep = num_units - math.floor(ratio * num_units + 1e-9)
    return _round_up(keep, num_units, width, multiple, min_channels)


def _round_up(keep: int, num_units: int, width: int, multiple: int, min_channels: int) -> int:
    keep = max(keep, -(-max(multiple, min_channels) // width))
    while (keep * width) % multiple and keep < num_units:
        keep += 1
    return min(keep, num_units)


@dataclass(frozen=True)
class _Options:
    ratio: float
    global_: bool
    flops_target: float | None
    criterion: str
    protect: tuple[str, ...]
    multiple: int
    min_channels: int
    scores: Mapping[str, np.ndarray] | None
    layers: tuple[tuple[str, float], ...] = ()
    norms: bool = True


def name_matches(name: str, pattern: str) -> bool:
    """Whether node ``name`` matches the glob ``pattern``, read as a node name or as a module
    path (torch.fx names ``layer3.0.conv1``'s node ``layer3_0_conv1``); ``a|b`` matches
    either."""
    return any(fnmatchcase(name, p) or fnmatchcase(name, p.replace(".", "_"))
               for p in pattern.split("|"))


def read_layer_settings(value: Any, graph: Graph, what: str, accepts: str, check) -> tuple:
    """``{pattern: value}`` per-layer settings, validated: each value by ``check`` and each
    pattern against the graph's node names (one that matches no node is a typo)."""
    if not value:
        return ()
    if not isinstance(value, Mapping):
        raise KilnError(f"{what}.layers must be a dict of glob pattern -> {accepts}, got "
                        f"{type(value).__name__}", hint='e.g. {"layer3.*": 0.7}')
    names = [n.name for n in graph.nodes]
    out = []
    for pattern, v in value.items():
        if not isinstance(pattern, str) or not check(v):
            raise KilnError(f"{what}.layers[{pattern!r}] is {v!r}", hint=f"give {accepts}")
        if not any(name_matches(n, pattern) for n in names):
            raise KilnError(f"{what}.layers pattern {pattern!r} matches no node of graph "
                            f"{graph.name}", hint="patterns match node names (kiln show "
                            "MODEL prints them) or module paths, with * and ? wildcards")
        out.append((pattern, v))
    return tuple(out)


def group_ratios(groups: Sequence[ChannelGroup], layers: Sequence[tuple[str, float]]
                 ) -> dict[int, float]:
    """Group id -> ratio for the groups a ``layers`` pattern matches (the last match wins)."""
    out: dict[int, float] = {}
    for g in groups:
        for pattern, ratio in layers:
            if any(name_matches(s.node, pattern) for s in g.sources):
                out[g.id] = float(ratio)
    return out


def _read_options(ctx: PassContext, graph: Graph) -> _Options:
    def opt(key: str, default: Any) -> Any:
        return ctx.option(PASS_NAME, key, default)

    ratio = opt("ratio", 0.3)
    flops_target = opt("flops_target", None)
    if f"{PASS_NAME}.ratio" in ctx.options and flops_target is not None:
        raise KilnError("prune_channels: set either ratio or flops_target, not both",
                        hint="flops_target chooses the ratio itself")
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        zero = " (that would prune groups to zero channels)" if ratio == 1 else ""
        raise KilnError(f"prune_channels.ratio must be in [0, 1), got {ratio!r}{zero}",
                        hint="ratio is the fraction of each group's channels removed")
    if flops_target is not None and (not isinstance(flops_target, (int, float))
                                     or not 0.0 < flops_target < 1.0):
        raise KilnError(f"prune_channels.flops_target must be in (0, 1), got {flops_target!r}",
                        hint="it is the fraction of the graph's FLOPs to remove")
    criterion = opt("criterion", "l1")
    if criterion not in CRITERIA:
        raise KilnError(f"unknown pruning criterion {criterion!r}",
                        hint=f"choose one of {', '.join(CRITERIA)}")
    multiple, min_channels = opt("multiple", 8), opt("min_channels", 1)
    for key, v in (("multiple", multiple), ("min_channels", min_channels)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise KilnError(f"prune_channels.{key} must be an integer >= 1, got {v!r}",
                            hint="a group never keeps zero channels")
    protect = opt("protect", ())
    protect = (protect,) if isinstance(protect, str) else tuple(protect)
    known = set(graph.values()) | {n.name for n in graph.nodes}
    for name in protect:
        if name not in known:
            raise KilnError(f"prune_channels.protect names %{name}, which is not in graph "
                            f"{graph.name}", node=name,
                            hint="name a node, a value or a constant of the graph")
    scores = opt("scores", None)
    if scores is None:
        scores = ctx.options.get("prune.scores")
    if scores is not None:
        for value in scores:
            if value not in known:
                raise KilnError(f"pruning scores given for %{value}, which is not in graph "
                                f"{graph.name}", node=value,
                                hint="key the scores by the producer's output value name")
    layers = read_layer_settings(opt("layers", None), graph, PASS_NAME, "a ratio in [0, 1)",
                          lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                          and 0.0 <= v < 1.0)
    norms = opt("norms", True)
    if not isinstance(norms, bool):
        raise KilnError(f"prune_channels.norms must be True or False, got {norms!r}",
                        hint="True lets layer norms over pruned channels shrink with them "
                             "(a transformer's hidden size); False leaves those groups whole")
    return _Options(float(ratio), bool(opt("global", False)), flops_target, criterion,
                    protect, multiple, min_channels, scores, layers, norms)


# ---- the rewrite ---------------------------------------------------------------------------
def element_mask(analysis: ChannelAnalysis, keep: Mapping[int, np.ndarray]) -> np.ndarray:
    """Whether each element survives, given the kept unit indices per group id; one extra
    True at the end so that position -1 (no element) reads as kept."""
    n = len(analysis.element_root)
    mask = np.ones(n + 1, bool)
    for gid, units in keep.items():
        sel = analysis.element_group == gid
        mask[:n][sel] = np.isin(analysis.element_unit[sel], units)
    return mask


def _cuts(analysis: ChannelAnalysis, mask: np.ndarray) -> dict[tuple[int, int], dict[int, Any]]:
    """(node index, operand) -> {axis: kept positions} for every constant operand that
    shrinks."""
    cuts: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    for ed in analysis.const_edits:
        m = mask[ed.elem]
        if m.all():
            continue
        per_axis = cuts.setdefault((ed.node, ed.index), {})
        per_axis[ed.axis] = per_axis[ed.axis] & m if ed.axis in per_axis else m
    return cuts


def _new_attrs(node: Node, analysis: ChannelAnalysis, mask: np.ndarray,
               graph: Graph) -> dict:
    """The node's attributes recounted for the kept channels."""
    attrs = dict(node.attrs)
    lay_in = analysis.layouts.get(node.inputs[0]) if node.inputs else None
    lay_out = analysis.layouts.get(node.outputs[0])
    if node.op in ("reshape", "expand") and lay_out is not None:
        shape = list(attrs["shape"])
        shape[lay_out.axis] = int(mask[lay_out.elem].sum())
        attrs["shape"] = tuple(shape)
    elif node.op in ("split", "slice") and lay_in is not None:
        rank = graph.types[node.inputs[0]].rank
        if attrs["axis"] % rank == lay_in.axis:
            kept = mask[lay_in.elem]
            if node.op == "split":
                bounds = np.cumsum((0, *attrs["sizes"]))
                attrs["sizes"] = tuple(int(kept[a:b].sum()) for a, b in zip(bounds, bounds[1:]))
            else:
                start = int(kept[:attrs["start"]].sum())
                attrs["start"], attrs["end"] = start, start + int(
                    kept[attrs["start"]:attrs["end"]].sum())
    elif node.op == "conv" and attrs["groups"] > 1 and lay_in is not None:
        per_group = graph.types[node.inputs[1]].shape[1]
        attrs["groups"] = int(mask[lay_in.elem].sum()) // per_group
    return attrs


def _slicing_key(per_axis: Mapping[int, np.ndarray]) -> tuple:
    return tuple(sorted((a, m.tobytes()) for a, m in per_axis.items()))


def _unused_name(hint: str, before: Graph, after: Graph) -> str:
    name, k = hint, 0
    while name in before.types or name in after.types:
        k += 1
        name = f"{hint}_{k}"
    return name


def _take(array: np.ndarray, per_axis: Mapping[int, np.ndarray]) -> np.ndarray:
    for axis, keep in per_axis.items():
        array = np.compress(keep, array, axis=axis)
    return array


def rewrite(graph: Graph, analysis: ChannelAnalysis, keep: Mapping[int, np.ndarray],
            materialize: bool = True) -> Graph:
    """A new graph with only the kept units of each group in ``keep`` (group id -> kept unit
    indices). With ``materialize=False`` the constants are left as they were and only the
    types are new (enough to count FLOPs)."""
    mask = element_mask(analysis, keep)
    cuts = _cuts(analysis, mask)
    out = Graph(graph.name, graph.inputs, graph.outputs)
    out.types = {v: graph.types[v] for v in graph.inputs}
    # One new constant per distinct slicing of an old one. The first takes the old name when
    # no use needs the old array any more, so the IR keeps the weights' names.
    slicings: dict[str, dict[tuple, Mapping[int, np.ndarray]]] = {}
    for (k, i), per_axis in cuts.items():
        slicings.setdefault(graph.nodes[k].inputs[i], {})[_slicing_key(per_axis)] = per_axis
    uses_whole = {v for k, n in enumerate(graph.nodes) for i, v in enumerate(n.inputs)
                  if (k, i) not in cuts} | set(graph.outputs)
    renamed: dict[tuple[str, tuple], str] = {}
    for name, array in graph.constants.items():
        keep_whole = name in uses_whole or name not in slicings
        if keep_whole:
            out.constants[name] = array
            out.types[name] = graph.types[name]
        for j, (key, per_axis) in enumerate(slicings.get(name, {}).items()):
            new = name if j == 0 and not keep_whole else _unused_name(f"{name}.pruned", graph,
                                                                      out)
            renamed[(name, key)] = new
            shape = list(array.shape)
            for axis, m in per_axis.items():
                shape[axis] = int(m.sum())
            out.types[new] = graph.types[name].with_shape(tuple(shape))
            if materialize:
                arr = np.ascontiguousarray(_take(array, per_axis))
                arr.setflags(write=False)
                out.constants[new] = arr
            else:
                out.constants[new] = array
    for k, node in enumerate(graph.nodes):
        inputs = list(node.inputs)
        for i, v in enumerate(inputs):
            if (k, i) in cuts:
                inputs[i] = renamed[(v, _slicing_key(cuts[(k, i)]))]
        attrs = _new_attrs(node, analysis, mask, graph)
        types = infer_types(node.op, [out.types[v] for v in inputs], attrs, node=node.name)
        for o, t in zip(node.outputs, types):
            out.types[o] = t
        out.nodes.append(node.with_(inputs=tuple(inputs), attrs=attrs))
    _check(graph, out, analysis, mask)
    return out


def _check(before: Graph, after: Graph, analysis: ChannelAnalysis, mask: np.ndarray) -> None:
    """Every value carrying channels has exactly the kept ones; the outputs did not change."""
    for v, lay in analysis.layouts.items():
        want = int(mask[lay.elem].sum())
        if after.types[v].shape[lay.axis] != want:
            raise KilnError(f"pruning gave %{v} {after.types[v]}, expected {want} positions on "
                            f"axis {lay.axis}", node=v,
                            hint="this is a kiln bug: protect this layer and report it")
    for o in before.outputs:
        if after.types[o] != before.types[o]:
            raise KilnError(f"pruning changed graph output %{o} from {before.types[o]} to "
                            f"{after.types[o]}", node=o,
                            hint="this is a kiln bug: protect the layer feeding it")


# ---- choosing what to keep -----------------------------------------------------------------
def _keep_counts(groups: Sequence[ChannelGroup], scores: Mapping[int, np.ndarray], ratio: float,
                 global_: bool, multiple: int, min_channels: int,
                 fixed: Mapping[int, float] | None = None) -> dict[int, int]:
    """Units each group keeps; ``fixed`` (group id -> ratio) overrides the ratio, and keeps
    those groups out of the global ranking."""
    fixed = fixed or {}
    counts = {g.id: kept_units(g.num_units, g.unit_width, fixed[g.id], multiple, min_channels)
              for g in groups if g.id in fixed}
    groups = [g for g in groups if g.id not in fixed]
    if not global_:
        return {**counts, **{g.id: kept_units(g.num_units, g.unit_width, ratio, multiple,
                                              min_channels) for g in groups}}
    pooled = []
    for g in groups:
        s = scores[g.id]
        mean = s.mean()
        norm = s / mean if mean > 0 else np.ones_like(s)
        pooled += [(float(x), g.id) for x in norm]
    pooled.sort(key=lambda t: t[0])
    removed = dict.fromkeys((g.id for g in groups), 0)
    for _, gid in pooled[:math.floor(ratio * len(pooled) + 1e-9)]:
        removed[gid] += 1
    return {**counts, **{g.id: _round_up(g.num_units - removed[g.id], g.num_units,
                                         g.unit_width, multiple, min_channels)
                         for g in groups}}


def _select(groups: Sequence[ChannelGroup], scores: Mapping[int, np.ndarray],
            counts: Mapping[int, int]) -> dict[int, np.ndarray]:
    """The ``counts[g]`` highest-scoring units of each group (ties keep the earlier unit)."""
    keep = {}
    for g in groups:
        if counts[g.id] < g.num_units:
            order = np.argsort(-scores[g.id], kind="stable")
            keep[g.id] = np.sort(order[:counts[g.id]])
    return keep


def plan_pruning(graph: Graph, analysis: ChannelAnalysis | None = None,
                 ctx: PassContext | None = None) -> tuple[dict[int, np.ndarray], ChannelAnalysis]:
    """Which units of which groups the pass keeps (group id -> kept unit indices; groups
    left whole are absent), with the analysis it used."""
    ctx = ctx or PassContext()
    opts = _read_options(ctx, graph)
    analysis = analysis or find_channel_groups(graph, norms=opts.norms)
    protected = set()
    for name in opts.protect:
        protected.update(g.id for g in analysis.groups_touching(name))
    for src in analysis.sources:
        given = (opts.scores or {}).get(src.value)
        if given is not None and np.shape(given) != (src.channels,):
            raise KilnError(f"pruning scores for %{src.value} have shape {np.shape(given)}, "
                            f"expected ({src.channels},)", node=src.node, op=src.op,
                            hint="give one score per output channel")
    groups = [g for g in analysis.prunable() if g.id not in protected]
    scores = {g.id: unit_scores(graph, g, opts.criterion, opts.scores) for g in groups}
    fixed = group_ratios(groups, opts.layers)

    def counts_at(ratio: float) -> dict[int, int]:
        return _keep_counts(groups, scores, ratio, opts.global_, opts.multiple,
                            opts.min_channels, fixed)

    if opts.flops_target is None:
        return _select(groups, scores, counts_at(opts.ratio)), analysis
    counts = _counts_for_flops(graph, analysis, groups, scores, counts_at, opts, fixed, ctx)
    return _select(groups, scores, counts), analysis


FLOPS_TOLERANCE = 0.005   # the refinement stops this close to a FLOPs target
FINER_ABOVE = 0.01        # ... and rounds groups to finer multiples only past this miss


def _counts_for_flops(graph: Graph, analysis: ChannelAnalysis, groups: Sequence[ChannelGroup],
                      scores: Mapping[int, np.ndarray], counts_at, opts: _Options,
                      fixed: Mapping[int, float], ctx: PassContext) -> dict[int, int]:
    """Kept units per group whose FLOPs reduction lands near ``opts.flops_target``.

    Bisection on the common ratio first (the reduction only grows with it). With every group
    rounded up to ``multiple`` channels that alone can miss by several points (ResNet-18 on
    CIFAR: 0.3 asked, 0.226 removed); then each round moves groups one ``multiple`` step up or
    down, largest effect first, while that brings the reduction closer to the target. Where
    that still misses by more than ``FINER_ABOVE``, the steps (and the groups' rounding) go to
    half the multiple, down to single channels (never below ``multiple`` channels in all);
    the groups so rounded are noted in
    ``ctx.notes["prune_channels.rounding"]`` and logged."""
    target = opts.flops_target
    base = graph_flops(graph)
    cache: dict[tuple, float] = {}

    def removed(counts: Mapping[int, int]) -> float:
        key = tuple(sorted(counts.items()))
        if key not in cache:
            p = _select(groups, scores, counts)
            cache[key] = 1.0 - graph_flops(rewrite(graph, analysis, p, materialize=False)) / base
        return cache[key]

    hi_ratio = 1.0 - 1e-9
    most = removed(counts_at(hi_ratio))   # every group at its floor (see below)
    if most < target:
        raise KilnError(f"prune_channels can remove at most {most:.1%} of the FLOPs of "
                        f"{graph.name}, not {target:.1%}",
                        hint="lower flops_target, multiple or min_channels, or unprotect layers")
    lo, hi = 0.0, hi_ratio
    for _ in range(30):
        mid = (lo + hi) / 2
        if removed(counts_at(mid)) >= target:
            hi = mid
        else:
            lo = mid
    above, below = counts_at(hi), counts_at(lo)
    counts = dict(above if removed(above) - target <= target - removed(below) else below)
    free = [g for g in groups if g.id not in fixed]
    # Finer steps never take a group below ``multiple`` channels (nor min_channels), as
    # kept_units does not: a group cut to a channel or two would be a bottleneck.
    floor = {g.id: min(g.num_units, -(-max(opts.multiple, opts.min_channels) // g.unit_width))
             for g in free}
    m = opts.multiple
    while free:
        for _ in range(4):   # rounds at this step size
            err = removed(counts) - target
            if abs(err) <= FLOPS_TOLERANCE:
                break
            moves = []
            for g in free:
                step = math.lcm(m, g.unit_width) // g.unit_width
                c = counts[g.id]
                new = max(floor[g.id], c - step) if err < 0 else min(g.num_units, c + step)
                # Whole groups and the floor are always allowed; other counts on the step.
                aligned = (new * g.unit_width) % m == 0 or new in (g.num_units, floor[g.id])
                if new != c and aligned:
                    moves.append((removed({**counts, g.id: new}) - removed(counts), g.id, new))
            changed = False
            for delta, gid, new in sorted(moves, key=lambda t: -abs(t[0])):
                if abs(err + delta) < abs(err):
                    counts[gid] = new
                    err += delta
                    changed = True
            if not changed:
                break
        if abs(removed(counts) - target) <= FINER_ABOVE or m == 1:
            break
        m //= 2
    finer = {}
    for g in free:
        channels = counts[g.id] * g.unit_width
        if channels % opts.multiple and counts[g.id] < g.num_units:
            finer[", ".join(s.node for s in g.sources)] = math.gcd(channels, opts.multiple)
    ctx.notes[f"{PASS_NAME}.rounding"] = finer
    ctx.logger.info("%s: flops_target %.3f: %.3f of the FLOPs removed%s", PASS_NAME, target,
                    removed(counts), "" if not finer else
                    f"; rounded to a finer multiple than {opts.multiple}: " +
                    ", ".join(f"{k} ({v})" for k, v in finer.items()))
    return counts


# ---- the pass ------------------------------------------------------------------------------
@register_pass
class PruneChannels(Pass):
    """Remove the least important channels (conv filters, linear features, attention heads)
    of every prunable channel group, physically shrinking weights and activations.

    Pruning without fine-tuning moves the outputs a lot: removing 30% of the channels of a
    zoo model moves its outputs by 0.1x (GPT-2 block) to 0.9x (LeNet-5) of their largest
    magnitude. The error budget below (|new - old| <= 2 max|old| + |old|) is therefore a loose
    bound meaning "outputs of the same order as before", checked on the zoo at 30% by the
    tests; larger ratios can exceed it. It is no accuracy promise: fine-tune the pruned graph
    (``kiln.interop.to_torch.graph_to_module``) to recover accuracy. Options are described in
    this module's docstring.
    """

    name = PASS_NAME
    description = "structured pruning: remove whole channels and attention heads"
    numerics = LOSSY
    error_budget = ErrorBudget(rtol=1.0, atol=2.0)

    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        keep, analysis = plan_pruning(graph, None, ctx)
        for g in analysis.skipped():
            ctx.logger.debug("%s: group %d (%s) left whole: %s", PASS_NAME, g.id,
                             ", ".join(s.node for s in g.sources), "; ".join(g.reasons))
        if not keep:
            return PassResult(graph, False)
        for gid, units in keep.items():
            g = analysis.groups[gid]
            ctx.logger.info("%s: group %d (%s): kept %d/%d units of %d channel(s)", PASS_NAME,
                            gid, ", ".join(s.node for s in g.sources), len(units), g.num_units,
                            g.unit_width)
        return PassResult(rewrite(graph, analysis, keep), True)
