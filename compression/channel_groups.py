"""Channel dependency analysis: which output channels of which layers must be pruned together.

A *source* is a node whose output channels can be removed by deleting filters: a conv or
transposed conv with ``groups=1``, a linear, or an embedding (its table's columns), whose
weights are constants. Each output channel of each source is an *element*. A forward walk in
topological order records, for every value that carries source channels, its *layout*: the axis
they lie on and, for each position along that axis, the element found there (-1 for a position
no source owns). Ops move layouts along: activations and per-channel affine ops keep them,
permute moves the axis, concat places inputs side by side, flatten repeats each channel over
the block of features it becomes, a reshape that splits the channel axis into (heads, head_dim)
makes each head one indivisible chunk.

Wherever two layouts meet position by position (a residual ``add``, the batch axes of a matmul
or an attention), their elements are coupled with a union-find: coupled elements are kept or
removed together. After the walk, each union-find class is a *unit* (one channel of a residual
stage, one attention head across q, k and v), and sources that share units form a *group*,
which is pruned as a whole: a kept unit keeps all of its elements everywhere.

Every place the walk meets a group's channels is recorded as a ``Member``: the producers'
filters, per-channel constants (batch-norm statistics, bias adds, depthwise filters), the input
channels of consumers (conv and linear weight columns), the values that carry them and the
attributes that count them (reshape, split, slice, expand, conv groups). Whatever the walk does
not understand (a channel reaching a graph output, a reduction or normalization over the channel
axis, a reshape mixing channels with other axes, an op with no rule) marks the groups involved
as unprunable with a recorded reason: the pass prunes nothing it cannot rewrite exactly.

One exception, asked for with ``norms=True``: a layer norm over the channel axis (a
transformer's residual stream, the hidden size shared by the embeddings, every block's input and
output projections, every norm and the head) keeps its weight and bias for the kept channels and
normalizes over those. That is not the same function with channels removed (the mean and
variance are taken over fewer channels), so it is for one-shot pruning followed by a fine-tune;
a group that needs it records it in ``ChannelGroup.approximate``, and AGP's masking (which
relies on removal changing nothing) leaves such groups alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kiln.ir import Graph, Node, get_op
from kiln.ir.ops._rules import norm_axes, norm_axis

ROLES = ("filters", "param", "input", "value", "attr")
"""What a member is: a source's filters (weight rows and bias), a per-channel constant, a
consumer's input channels (weight columns), a tensor carrying the channels, or a node attribute
that counts them."""


@dataclass(frozen=True)
class Source:
    """A node whose output channels a group removes.

    ``weight`` is its weight constant and ``weight_axis`` the axis of one output channel's filter
    index in it (0 for conv and linear, 1 for conv_transpose); ``axis`` is the channel axis of the
    output ``value``.
    """

    node: str
    op: str
    value: str
    axis: int
    channels: int
    weight: str
    weight_axis: int


@dataclass(frozen=True)
class Member:
    """One place where a group's channels appear.

    ``target`` is a constant name (roles ``filters``, ``param``, ``input``) or a value name
    (``value``, ``attr``: the value whose shape the attribute of ``node`` describes); ``axis``
    is the axis of ``target`` the channels lie on; ``units[p]`` is the group's unit at position
    ``p`` of that axis, or -1 where the position belongs to no unit of this group.
    """

    role: str
    node: str
    target: str
    axis: int
    units: np.ndarray = field(compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.role:<7} {self.node}: %{self.target} axis {self.axis} " \
               f"({int((self.units >= 0).sum())} of {len(self.units)} positions)"


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are pruned together, in ``num_units`` indivisible units.

    ``unit_of[source node][c]`` is the unit of the source's output channel ``c``. A group is
    prunable when ``reasons`` is empty.
    """

    id: int
    sources: tuple[Source, ...]
    num_units: int
    unit_of: dict[str, np.ndarray] = field(repr=False)
    members: tuple[Member, ...] = field(repr=False)
    reasons: tuple[str, ...] = ()
    approximate: tuple[str, ...] = ()
    """Where removing this group's channels changes more than their contribution (a layer
    norm normalizing over them: ``norms=True``)."""

    @property
    def prunable(self) -> bool:
        """Whether the pass may remove units of this group."""
        return not self.reasons

    @property
    def unit_width(self) -> int:
        """The fewest output channels a unit holds in any one source (1 for plain channels,
        the head size for attention heads)."""
        # A source need not reach every unit (a residual add may couple only some of its
        # channels), so units it does not have are not counted.
        return min(int(np.bincount(u)[np.unique(u)].min()) for u in self.unit_of.values())

    def names(self) -> set[str]:
        """Every node, value and constant name this group touches."""
        out = {s.node for s in self.sources} | {s.value for s in self.sources}
        for m in self.members:
            out.update((m.node, m.target))
        return out

    def describe(self) -> str:
        """A few lines for logs and the debugger."""
        head = (f"group {self.id}: {self.num_units} units x {self.unit_width} channels, "
                f"sources {', '.join(s.node for s in self.sources)}")
        lines = [head]
        lines += [f"  {m}" for m in self.members]
        lines += [f"  unprunable: {r}" for r in self.reasons]
        lines += [f"  approximate: {r}" for r in self.approximate]
        return "\n".join(lines)


@dataclass
class Layout:
    """Where a value carries source channels: ``elem[p]`` is the element at position ``p``
    of ``axis`` (-1: none)."""

    axis: int
    elem: np.ndarray


@dataclass(frozen=True)
class ConstEdit:
    """Positions of constant operand ``index`` of node ``node`` (along ``axis``) that follow
    the elements ``elem``."""

    node: int
    index: int
    axis: int
    elem: np.ndarray = field(compare=False, repr=False)
    role: str = "param"


class ChannelAnalysis:
    """The result of ``find_channel_groups``: groups, members and the walk's raw tables.

    ``layouts`` (value -> Layout), ``const_edits`` and ``element_root`` (the union-find class of
    each element) are what a rewrite needs; ``groups`` is the readable summary.
    """

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.layouts: dict[str, Layout] = {}
        self.const_edits: list[ConstEdit] = []
        self.attr_nodes: list[tuple[int, str, int]] = []  # (node index, value, axis)
        self.sources: list[Source] = []
        self.source_base: list[int] = []
        self.element_root = np.zeros(0, np.int64)
        self.element_group = np.zeros(0, np.int64)
        self.element_unit = np.zeros(0, np.int64)
        self.groups: list[ChannelGroup] = []
        self._parent: list[int] = []
        self._refusals: list[tuple[np.ndarray, str]] = []
        self._approximations: list[tuple[np.ndarray, str]] = []

    # ---- public queries ------------------------------------------------------------------
    def prunable(self) -> list[ChannelGroup]:
        """Groups the pass may prune."""
        return [g for g in self.groups if g.prunable]

    def skipped(self) -> list[ChannelGroup]:
        """Groups left alone, each with its reasons."""
        return [g for g in self.groups if not g.prunable]

    def groups_touching(self, name: str) -> list[ChannelGroup]:
        """Groups with a source, member node, value or constant called ``name``."""
        return [g for g in self.groups if name in g.names()]

    def summary(self) -> str:
        """Every group, prunable ones first."""
        return "\n".join(g.describe() for g in self.prunable() + self.skipped())

    # ---- union-find over elements --------------------------------------------------------
    def _new_elements(self, count: int) -> np.ndarray:
        base = len(self._parent)
        self._parent.extend(range(base, base + count))
        return np.arange(base, base + count, dtype=np.int64)

    def _find(self, e: int) -> int:
        parent = self._parent
        while parent[e] != e:
            parent[e] = parent[parent[e]]
            e = parent[e]
        return e

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            # The smaller id stays the root, so units are numbered in graph order.
            self._parent[max(ra, rb)] = min(ra, rb)

    def refuse(self, elem: np.ndarray, reason: str) -> None:
        """Mark the groups owning these elements unprunable."""
        elem = np.asarray(elem)
        elem = elem[elem >= 0]
        if elem.size:
            self._refusals.append((elem, reason))

    def approximate(self, elem: np.ndarray, reason: str) -> None:
        """Record that removing these elements changes more than their contribution."""
        elem = np.asarray(elem)
        elem = elem[elem >= 0]
        if elem.size:
            self._approximations.append((elem, reason))

    def couple(self, a: np.ndarray, b: np.ndarray, where: str) -> np.ndarray:
        """Tie position p of ``a`` to position p of ``b``; returns the merged layout elements.
        A channel that meets a position no source owns cannot be removed there."""
        both = (a >= 0) & (b >= 0)
        for x, y in zip(a[both].tolist(), b[both].tolist()):
            self._union(x, y)
        lone = (a >= 0) != (b >= 0)
        if lone.any():
            self.refuse(np.where(a >= 0, a, b)[lone],
                        f"channels meet values that carry no prunable channels at {where}")
        return np.where(a >= 0, a, b)

    def chunk(self, elem: np.ndarray, size: int, where: str) -> np.ndarray:
        """Make each run of ``size`` positions one indivisible unit; one element per run."""
        runs = elem.reshape(-1, size)
        out = np.full(len(runs), -1, np.int64)
        for k, run in enumerate(runs):
            owned = run[run >= 0]
            if owned.size == 0:
                continue
            if owned.size != size:
                self.refuse(owned, f"a chunk of {size} channels mixes prunable and other "
                                   f"positions at {where}")
            for e in owned[1:].tolist():
                self._union(int(owned[0]), e)
            out[k] = owned[0]
        return out


def _where(node: Node) -> str:
    return f"%{node.name} ({node.op})"


# ---- the walk ------------------------------------------------------------------------------
Rule = Callable[["_Walk", int, Node, list[tuple[int, Layout]]], None]
_RULES: dict[str, Rule] = {}


def _rule(*ops: str) -> Callable[[Rule], Rule]:
    def declare(fn: Rule) -> Rule:
        for op in ops:
            get_op(op)  # a misspelt op name fails at import
            _RULES[op] = fn
        return fn

    return declare


class _Walk:
    """One forward pass over the graph filling a ChannelAnalysis."""

    def __init__(self, graph: Graph, norms: bool = False) -> None:
        self.g = graph
        self.a = ChannelAnalysis(graph)
        self.norms = norms

    # helpers shared by the rules
    def shape(self, v: str) -> tuple[int, ...]:
        return self.g.types[v].shape

    def const(self, v: str) -> bool:
        return v in self.g.constants

    def set_layout(self, v: str, axis: int, elem: np.ndarray) -> None:
        if (elem >= 0).any():
            self.a.layouts[v] = Layout(axis, np.asarray(elem, np.int64))

    def refuse_all(self, tracked: list[tuple[int, Layout]], reason: str) -> None:
        for _, lay in tracked:
            self.a.refuse(lay.elem, reason)

    def run(self) -> ChannelAnalysis:
        for idx, node in enumerate(self.g.nodes):
            tracked = [(i, self.a.layouts[v]) for i, v in enumerate(node.inputs)
                       if v in self.a.layouts]
            if tracked:
                rule = _RULES.get(node.op)
                # An elementwise op is per position, unless an attribute holds per-channel
                # data (a sequence) that no rule knows how to cut.
                if rule is None and get_op(node.op).kind == "elementwise" and not any(
                        isinstance(v, tuple) for v in node.attrs.values()):
                    rule = _broadcast_rule
                if rule is None:
                    self.refuse_all(tracked, f"no channel rule for op {node.op} at "
                                             f"{_where(node)}")
                else:
                    rule(self, idx, node, tracked)
            self._maybe_source(idx, node)
        for out in self.g.outputs:
            if out in self.a.layouts:
                self.a.refuse(self.a.layouts[out].elem, f"channels reach graph output %{out}")
        _finish(self.a)
        return self.a

    def _maybe_source(self, idx: int, node: Node) -> None:
        spec = _source_spec(self.g, node)
        if spec is None:
            return
        axis, channels, weight_axis, edits = spec
        out = node.outputs[0]
        if out in self.a.layouts:
            # A linear over another axis passed its input's channels through: one value cannot
            # carry two channel axes, so those stay.
            self.a.refuse(self.a.layouts[out].elem,
                          f"channels pass through {_where(node)}, which makes its own channels")
        elem = self.a._new_elements(channels)
        self.a.sources.append(Source(node.name, node.op, out, axis, channels, node.inputs[1],
                                     weight_axis))
        self.a.source_base.append(int(elem[0]))
        self.a.layouts[out] = Layout(axis, elem)
        for index, const_axis in edits:
            self.a.const_edits.append(ConstEdit(idx, index, const_axis, elem, "filters"))


def _source_spec(g: Graph, node: Node):
    """(output axis, channel count, filter axis of the weight, [(operand, axis)...]) for a
    node whose output channels can be removed, else None."""
    if node.op == "embedding":
        # The table's columns are the output channels (a transformer's hidden size).
        if node.inputs[1] not in g.constants:
            return None
        return g.types[node.outputs[0]].rank - 1, g.types[node.inputs[1]].shape[1], 1, [(1, 1)]
    if node.op not in ("conv", "conv_transpose", "linear"):
        return None
    if any(v not in g.constants for v in node.inputs[1:]):
        return None
    w = g.types[node.inputs[1]].shape
    bias = [(2, 0)] if len(node.inputs) == 3 else []
    if node.op == "linear":
        return g.types[node.outputs[0]].rank - 1, w[0], 0, [(1, 0), *bias]
    if node.attrs["groups"] != 1:
        return None
    if node.op == "conv":
        return 1, w[0], 0, [(1, 0), *bias]
    return 1, w[1], 1, [(1, 1), *bias]


def _couple_on_axis(w: _Walk, idx: int, node: Node, tracked, out_axis: int,
                    operands: Sequence[int], out_rank: int) -> np.ndarray | None:
    """Couple every operand in ``operands`` (right-aligned to rank ``out_rank``) along output
    axis ``out_axis``: tracked operands are tied position by position, constants with that
    axis get sliced with it, other values must broadcast along it. Returns the elements."""
    layouts = dict(tracked)
    size = w.shape(node.outputs[0])[out_axis]
    merged = None
    for i in operands:
        if i not in layouts:
            continue
        e = layouts[i].elem
        if len(e) != size:
            # A single channel stretched over the axis by broadcasting stands for all of them.
            w.a.refuse(e, f"channels broadcast over a larger axis at {_where(node)}")
            continue
        merged = e if merged is None else w.a.couple(merged, e, _where(node))
    if merged is None:
        return None
    for i in operands:
        if i in layouts:
            continue
        v = node.inputs[i]
        t = w.g.types[v]
        ax = out_axis - (out_rank - t.rank)
        if ax < 0 or t.shape[ax] == 1:
            continue
        if w.const(v):
            w.a.const_edits.append(ConstEdit(idx, i, ax, merged, "param"))
        else:
            w.a.refuse(merged, f"channels meet %{v}, which carries no prunable channels, at "
                               f"{_where(node)}")
    return merged


def _broadcast_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    """Elementwise ops with NumPy broadcasting: one output axis carries the channels."""
    out_rank = w.g.types[node.outputs[0]].rank
    axes = {lay.axis + out_rank - w.g.types[node.inputs[i]].rank for i, lay in tracked}
    if len(axes) != 1:
        w.refuse_all(tracked, f"channels on different axes meet at {_where(node)}")
        return
    axis = axes.pop()
    elem = _couple_on_axis(w, idx, node, tracked, axis, range(len(node.inputs)), out_rank)
    if elem is not None:
        for out in node.outputs:
            w.set_layout(out, axis, elem)


def _only_x(w: _Walk, node: Node, tracked) -> Layout | None:
    """The layout of operand 0, refusing channels that reach any other operand."""
    for i, lay in tracked:
        if i != 0:
            w.a.refuse(lay.elem, f"channels reach operand {i} of {_where(node)}")
    return dict(tracked).get(0)


def _passthrough(w: _Walk, node: Node, lay: Layout, axis: int | None = None) -> None:
    w.set_layout(node.outputs[0], lay.axis if axis is None else axis, lay.elem)


@_rule("reshape")
def _reshape_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    src, dst = w.shape(node.inputs[0]), w.shape(node.outputs[0])
    mapped = _map_reshape(src, dst, lay.axis)
    if mapped is None:
        w.a.refuse(lay.elem, f"reshape {list(src)} -> {list(dst)} mixes the channel axis with "
                             f"others at {_where(node)}")
        return
    kind, out_axis, factor = mapped
    if kind == "merge":
        outer, inner = factor
        elem = np.tile(np.repeat(lay.elem, inner), outer)
    else:
        elem = w.a.chunk(lay.elem, factor, _where(node)) if factor > 1 else lay.elem
    w.set_layout(node.outputs[0], out_axis, elem)
    w.a.attr_nodes.append((idx, node.outputs[0], out_axis))


def _map_reshape(src: Sequence[int], dst: Sequence[int], axis: int):
    """How reshape ``src`` -> ``dst`` moves axis ``axis``: ("merge", new axis, (outer, inner))
    when the axis joins neighbours into one axis, ("split", new axis, chunk) when it becomes
    (n, chunk, ...) with the channel index on the first axis longer than 1, None when channel
    boundaries do not survive."""
    if src[axis] <= 1:
        return None
    cs = [math.prod(src[:k]) for k in range(len(src) + 1)]
    cd = [math.prod(dst[:k]) for k in range(len(dst) + 1)]
    i0 = max(k for k in range(axis + 1) if cs[k] in cd)
    i1 = min(k for k in range(axis + 1, len(src) + 1) if cs[k] in cd)
    j0 = max(k for k in range(len(cd)) if cd[k] == cs[i0])
    j1 = min(k for k in range(len(cd)) if cd[k] == cs[i1])
    real = [j for j in range(j0, j1) if dst[j] > 1]
    if len(real) == 1:
        outer, inner = math.prod(src[i0:axis]), math.prod(src[axis + 1:i1])
        return "merge", real[0], (outer, inner)
    if i1 - i0 == 1 and real:
        return "split", real[0], math.prod(dst[real[0] + 1:j1])
    return None


@_rule("permute")
def _permute_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is not None:
        _passthrough(w, node, lay, list(node.attrs["perm"]).index(lay.axis))


@_rule("slice")
def _slice_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    axis = norm_axis(node.attrs["axis"], w.g.types[node.inputs[0]].rank)
    if axis != lay.axis:
        _passthrough(w, node, lay)
        return
    if node.attrs["step"] != 1:
        w.a.refuse(lay.elem, f"strided slice of the channel axis at {_where(node)}")
        return
    w.set_layout(node.outputs[0], axis, lay.elem[node.attrs["start"]:node.attrs["end"]])
    w.a.attr_nodes.append((idx, node.inputs[0], axis))


@_rule("split")
def _split_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    axis = norm_axis(node.attrs["axis"], w.g.types[node.inputs[0]].rank)
    start = 0
    for out, size in zip(node.outputs, node.attrs["sizes"]):
        if axis == lay.axis:
            w.set_layout(out, axis, lay.elem[start:start + size])
        else:
            w.set_layout(out, lay.axis, lay.elem)
        start += size
    if axis == lay.axis:
        w.a.attr_nodes.append((idx, node.inputs[0], axis))


@_rule("concat")
def _concat_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    rank = w.g.types[node.outputs[0]].rank
    axes = {lay.axis for _, lay in tracked}
    cat = norm_axis(node.attrs["axis"], rank)
    if len(axes) != 1:
        w.refuse_all(tracked, f"channels on different axes meet at {_where(node)}")
        return
    axis = axes.pop()
    if axis != cat:
        elem = _couple_on_axis(w, idx, node, tracked, axis, range(len(node.inputs)), rank)
        if elem is not None:
            w.set_layout(node.outputs[0], axis, elem)
        return
    layouts = dict(tracked)
    parts = [layouts[i].elem if i in layouts else np.full(w.shape(v)[axis], -1, np.int64)
             for i, v in enumerate(node.inputs)]
    w.set_layout(node.outputs[0], axis, np.concatenate(parts))


@_rule("expand")
def _expand_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    src, dst = w.shape(node.inputs[0]), w.shape(node.outputs[0])
    out_axis = lay.axis + len(dst) - len(src)
    if src[lay.axis] != dst[out_axis]:
        w.a.refuse(lay.elem, f"channels broadcast at {_where(node)}")
        return
    _passthrough(w, node, lay, out_axis)
    w.a.attr_nodes.append((idx, node.outputs[0], out_axis))


@_rule("pad")
def _pad_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    pads = node.attrs["pads"]
    if pads[2 * lay.axis] or pads[2 * lay.axis + 1]:
        w.a.refuse(lay.elem, f"padding along the channel axis at {_where(node)}")
    else:
        _passthrough(w, node, lay)


@_rule("batch_norm")
def _batch_norm_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    if lay.axis == 1:
        if not all(w.const(v) for v in node.inputs[1:]):
            w.a.refuse(lay.elem, f"batch-norm statistics are not constants at {_where(node)}")
            return
        for i in range(1, 5):
            w.a.const_edits.append(ConstEdit(idx, i, 0, lay.elem, "param"))
    _passthrough(w, node, lay)


@_rule("layer_norm")
def _layer_norm_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    rank = w.g.types[node.inputs[0]].rank
    first = rank - node.attrs["normalized_ndim"]
    if lay.axis < first:
        _passthrough(w, node, lay)
    elif not w.norms:
        w.a.refuse(lay.elem, f"layer_norm normalizes over the channel axis at {_where(node)} "
                             "(pruned one-shot only: norms=True)")
    elif any(not w.const(v) for v in node.inputs[1:]):
        w.a.refuse(lay.elem, f"layer_norm weight or bias is not a constant at {_where(node)}")
    else:
        # Its weight and bias (shaped like the normalized dims) keep the kept channels, and
        # the statistics are then taken over those: approximate (module docstring).
        for i in range(1, len(node.inputs)):
            w.a.const_edits.append(ConstEdit(idx, i, lay.axis - first, lay.elem, "param"))
        w.a.approximate(lay.elem, f"layer_norm at {_where(node)} normalizes over the kept "
                                  "channels only")
        _passthrough(w, node, lay)


@_rule("group_norm")
def _group_norm_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    if lay.axis >= 1:
        w.a.refuse(lay.elem, f"group_norm normalizes over the channel axis at {_where(node)}")
    else:
        _passthrough(w, node, lay)


@_rule("softmax", "log_softmax")
def _softmax_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    if norm_axis(node.attrs["axis"], w.g.types[node.inputs[0]].rank) == lay.axis:
        w.a.refuse(lay.elem, f"{node.op} over the channel axis at {_where(node)}")
    else:
        _passthrough(w, node, lay)


@_rule("max_pool", "avg_pool", "adaptive_avg_pool")
def _pool_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    if lay.axis >= 2:
        w.a.refuse(lay.elem, f"pooling over the channel axis at {_where(node)}")
    else:
        _passthrough(w, node, lay)


@_rule("reduce_sum", "reduce_mean", "reduce_max", "reduce_min")
def _reduce_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    axes = norm_axes(node.attrs["axes"], w.g.types[node.inputs[0]].rank)
    if lay.axis in axes:
        w.a.refuse(lay.elem, f"reduction over the channel axis at {_where(node)}")
        return
    out_axis = lay.axis if node.attrs["keepdim"] else lay.axis - sum(a < lay.axis for a in axes)
    _passthrough(w, node, lay, out_axis)


@_rule("conv")
def _conv_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    if lay.axis != 1:
        w.a.refuse(lay.elem, f"conv over the channel axis at {_where(node)}")
        return
    if any(not w.const(v) for v in node.inputs[1:]):
        w.a.refuse(lay.elem, f"conv weights are not constants at {_where(node)}")
        return
    groups = node.attrs["groups"]
    if groups == 1:
        w.a.const_edits.append(ConstEdit(idx, 1, 1, lay.elem, "input"))
        return
    # Grouped (and depthwise) conv: each group of input channels feeds its own output
    # channels, so a group is removed whole, with its filters; the output carries the
    # input's channels on.
    cg = w.shape(node.inputs[1])[1]
    og = w.shape(node.inputs[1])[0] // groups
    heads = w.a.chunk(lay.elem, cg, _where(node)) if cg > 1 else lay.elem
    out_elem = np.repeat(heads, og)
    for i in range(1, len(node.inputs)):
        w.a.const_edits.append(ConstEdit(idx, i, 0, out_elem, "param"))
    w.set_layout(node.outputs[0], 1, out_elem)
    w.a.attr_nodes.append((idx, node.inputs[0], 1))


@_rule("conv_transpose")
def _conv_transpose_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    if lay.axis != 1 or node.attrs["groups"] != 1:
        w.a.refuse(lay.elem, f"only ungrouped conv_transpose takes pruned input channels, at "
                             f"{_where(node)}")
    elif any(not w.const(v) for v in node.inputs[1:]):
        w.a.refuse(lay.elem, f"conv_transpose weights are not constants at {_where(node)}")
    else:
        w.a.const_edits.append(ConstEdit(idx, 1, 0, lay.elem, "input"))


@_rule("linear")
def _linear_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    lay = _only_x(w, node, tracked)
    if lay is None:
        return
    rank = w.g.types[node.inputs[0]].rank
    if lay.axis != rank - 1:
        _passthrough(w, node, lay)
    elif not w.const(node.inputs[1]):
        w.a.refuse(lay.elem, f"linear weight is not a constant at {_where(node)}")
    else:
        w.a.const_edits.append(ConstEdit(idx, 1, 1, lay.elem, "input"))


@_rule("matmul")
def _matmul_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    ra, rb = (w.g.types[v].rank for v in node.inputs)
    r = w.g.types[node.outputs[0]].rank
    claims: dict[int, list[int]] = {}
    for i, lay in tracked:
        rank = ra if i == 0 else rb
        contracted = rank - 1 if i == 0 else rank - 2
        if lay.axis == contracted:
            other = node.inputs[1 - i]
            if not w.const(other) or (1 - i) in dict(tracked):
                w.a.refuse(lay.elem, f"matmul contracts the channel axis at {_where(node)}")
                return
            # x @ W with a constant W: the channels pick W's rows, like a linear's columns.
            other_axis = rb - 2 if i == 0 else ra - 1
            w.a.const_edits.append(ConstEdit(idx, 1 - i, other_axis, lay.elem, "input"))
            return
        claims.setdefault(lay.axis + r - rank, []).append(i)
    if len(claims) != 1:
        w.refuse_all(tracked, f"channels on different axes meet at {_where(node)}")
        return
    axis = next(iter(claims))
    operands = [0, 1] if axis < r - 2 else claims[axis]
    elem = _couple_on_axis(w, idx, node, tracked, axis, operands, r)
    if elem is not None:
        w.set_layout(node.outputs[0], axis, elem)


@_rule("attention")
def _attention_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    ranks = [w.g.types[v].rank for v in node.inputs]
    r = w.g.types[node.outputs[0]].rank
    claims: dict[int, list[int]] = {}
    for i, lay in tracked:
        rank = ranks[i]
        if i < 3 and lay.axis < rank - 2:
            claims.setdefault(lay.axis + r - rank, []).append(i)
        elif i == 0 and lay.axis == rank - 2:
            claims.setdefault(r - 2, []).append(i)
        elif i == 2 and lay.axis == rank - 1:
            claims.setdefault(r - 1, []).append(i)
        else:
            # q/k feature axes set the softmax scale and the scores; the mask is data.
            w.refuse_all(tracked, f"attention mixes the channel axis of operand {i} at "
                                  f"{_where(node)}")
            return
    if len(claims) != 1:
        w.refuse_all(tracked, f"channels on different axes meet at {_where(node)}")
        return
    axis = next(iter(claims))
    # A batch axis (heads) is shared by q, k, v and the mask; L and Ev belong to one operand.
    operands = list(range(len(node.inputs))) if axis < r - 2 else claims[axis]
    if axis == r - 2 and len(node.inputs) == 4:
        operands = [0, 3]
    elem = _couple_on_axis(w, idx, node, tracked, axis, operands, r)
    if elem is not None:
        w.set_layout(node.outputs[0], axis, elem)


@_rule("embedding")
def _embedding_rule(w: _Walk, idx: int, node: Node, tracked) -> None:
    w.refuse_all(tracked, f"channels index an embedding table at {_where(node)}")


# ---- from elements to groups ---------------------------------------------------------------
def _finish(a: ChannelAnalysis) -> None:
    """Resolve the union-find into units and groups, and list every group's members."""
    n = len(a._parent)
    roots = np.array([a._find(e) for e in range(n)], np.int64)
    a.element_root = roots
    owner = np.zeros(n, np.int64)  # element -> source index
    for s, base in enumerate(a.source_base):
        owner[base:base + a.sources[s].channels] = s
    # Sources sharing a unit belong to one group.
    sgroup = list(range(len(a.sources)))

    def sfind(s: int) -> int:
        while sgroup[s] != s:
            sgroup[s] = sgroup[sgroup[s]]
            s = sgroup[s]
        return s

    first_owner: dict[int, int] = {}
    for e in range(n):
        r = int(roots[e])
        s = int(owner[e])
        if r in first_owner:
            x, y = sfind(first_owner[r]), sfind(s)
            if x != y:
                sgroup[max(x, y)] = min(x, y)
        else:
            first_owner[r] = s
    group_of_source = [sfind(s) for s in range(len(a.sources))]
    order = sorted(set(group_of_source))
    gid = {root: k for k, root in enumerate(order)}
    element_group = np.array([gid[group_of_source[s]] for s in owner.tolist()], np.int64)
    element_unit = np.full(n, -1, np.int64)
    unit_count = [0] * len(order)
    unit_index: dict[int, int] = {}
    for e in range(n):
        r = int(roots[e])
        if r not in unit_index:
            g = int(element_group[e])
            unit_index[r] = unit_count[g]
            unit_count[g] += 1
        element_unit[e] = unit_index[r]
    a.element_group, a.element_unit = element_group, element_unit

    reasons: list[list[str]] = [[] for _ in order]
    approximate: list[list[str]] = [[] for _ in order]
    for found, pairs in ((reasons, a._refusals), (approximate, a._approximations)):
        for elem, reason in pairs:
            for g in sorted(set(element_group[elem].tolist())):
                if reason not in found[g]:
                    found[g].append(reason)
    members: list[list[Member]] = [[] for _ in order]

    def add(role: str, node: str, target: str, axis: int, elem: np.ndarray) -> None:
        owned = elem >= 0
        groups = set(element_group[elem[owned]].tolist())
        for g in sorted(groups):
            units = np.full(len(elem), -1, np.int64)
            mine = owned.copy()
            mine[owned] = element_group[elem[owned]] == g
            units[mine] = element_unit[elem[mine]]
            members[g].append(Member(role, node, target, axis, units))

    nodes = a.graph.nodes
    for ed in a.const_edits:
        node = nodes[ed.node]
        add(ed.role, node.name, node.inputs[ed.index], ed.axis, ed.elem)
    producer = {o: node for node in nodes for o in node.outputs}
    for value, lay in a.layouts.items():
        add("value", producer[value].name if value in producer else value, value, lay.axis,
            lay.elem)
    for idx, value, axis in a.attr_nodes:
        add("attr", nodes[idx].name, value, axis, a.layouts[value].elem)

    for k in range(len(order)):
        srcs = [s for s in range(len(a.sources)) if group_of_source[s] == order[k]]
        unit_of = {}
        for s in srcs:
            base = a.source_base[s]
            unit_of[a.sources[s].node] = element_unit[base:base + a.sources[s].channels].copy()
        if unit_count[k] < 2:
            reasons[k].append("the group has a single unit")
        a.groups.append(ChannelGroup(k, tuple(a.sources[s] for s in srcs), unit_count[k],
                                     unit_of, tuple(members[k]), tuple(reasons[k]),
                                     tuple(approximate[k])))


def find_channel_groups(graph: Graph, norms: bool = False) -> ChannelAnalysis:
    """Find the groups of channels that must be pruned together in ``graph``.

    Returns a ChannelAnalysis: ``groups`` lists every group with its sources, units, members
    and, for the ones that cannot be pruned, the reasons; ``summary()`` prints them. With
    ``norms``, channels a layer norm normalizes over may be pruned too (approximately: see
    the module docstring). The graph is only read.
    """
    return _Walk(graph, norms).run()
