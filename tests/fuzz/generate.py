"""Random valid kiln graphs for differential testing (NNSmith-style, small).

``generate_graph(seed)`` grows a graph op by op. Each step picks a registered op (common ones
more often), asks that op's proposer for operands from the pool of values built so far (plus
fresh constants for weights and second operands) and random attributes, and keeps the node only
if the op's own type rule accepts it (``kiln.ir.infer_types``), every output holds at most
``MAX_ELEMENTS`` elements, and the NumPy reference gives finite values of sane magnitude. The
generator knows every value (it runs the reference as it goes), so it only inserts the
``abs(x) + 0.5`` guard in front of log/sqrt/rsqrt/reciprocal/pow/div when the operand is not
already safely positive. A finished graph whose outputs move by more than 10x a tiny relative
perturbation of its inputs and constants (a comparison near a tie, a float->int cast near an
integer, layer_norm of a nearly constant row) is ill-conditioned: it is thrown away and the
seed tries again, so that a mismatch between backends always means a bug.

``BACKENDS`` lists (name, run) pairs; the first, the reference interpreter, is the oracle that
``assert_outputs_close`` judges the others by. A new backend plugs in by appending a pair.

For a longer campaign than CI's: ``python tests/fuzz/generate.py FIRST_SEED COUNT``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kiln.backends.reference import run_graph
from kiln.interop.to_torch import run_torch
from kiln.ir import DType, Graph, GraphBuilder, KilnError, TensorType, get_op, infer_types
from kiln.ir import run_reference as reference_op

MAX_NODES = 8
MAX_ELEMENTS = 65536
MAX_INPUT_ELEMENTS = 4096
MAX_MAGNITUDE = 1e4
RTOL = 1e-4
PERTURBATION = 1e-6
SENSITIVITY = 10 * PERTURBATION

Runner = Callable[[Graph, Sequence[np.ndarray]], list[np.ndarray]]
BACKENDS: list[tuple[str, Runner]] = [("reference", run_graph), ("torch", run_torch)]
"""(name, run(graph, inputs) -> outputs); the first is the oracle."""


def assert_outputs_close(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray],
                         what: str = "") -> None:
    """Same count, shapes and dtypes; floats within RTOL of the magnitude, the rest exact."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, want {len(expected)}"
    for k, (e, a) in enumerate(zip(expected, actual)):
        msg = f"{what}: output {k}"
        assert (a.shape, a.dtype) == (e.shape, e.dtype), \
            f"{msg} is {a.dtype}{list(a.shape)}, want {e.dtype}{list(e.shape)}"
        if e.dtype.kind == "f":
            scale = max(1.0, float(np.abs(e).max(initial=0.0)))
            np.testing.assert_allclose(a, e, rtol=RTOL, atol=RTOL * scale, err_msg=msg)
        else:
            np.testing.assert_array_equal(a, e, err_msg=msg)


# ---- the generator ---------------------------------------------------------------------------
class NoOperand(Exception):
    """The pool holds no value the op being proposed can take."""


@dataclass
class Proposal:
    """One candidate node: operands are pool value names or fresh arrays (new constants);
    ``positive`` lists the operands that must hold positive values (guarded if they do not)."""

    operands: list[str | np.ndarray]
    attrs: dict = field(default_factory=dict)
    positive: tuple[int, ...] = ()


class Grower:
    """The graph under construction, the reference value of each of its values, and the pool
    of values later nodes may use."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.builder = GraphBuilder("fuzz")
        self.values: dict[str, np.ndarray] = {}
        self.pool: list[str] = []
        self.uses: dict[str, int] = {}

    # ---- values ------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        """Nodes added so far (guards included)."""
        return len(self.builder.graph.nodes)

    def type(self, name: str) -> TensorType:
        """The type of a value of the graph under construction."""
        return self.builder.graph.types[name]

    def add_input(self) -> np.ndarray:
        """A new f32 graph input of rank 1-4 and small random dims."""
        shape: list[int] = []
        for _ in range(int(self.rng.integers(1, 5))):
            most = MAX_INPUT_ELEMENTS // max(1, math.prod(shape))
            shape.append(int(self.rng.integers(1, min(12, most) + 1)))
        array = self.rng.standard_normal(shape).astype(np.float32)
        self._track(self.builder.input("x", TensorType.of(array)), array)
        return array

    def _track(self, name: str, value: np.ndarray) -> None:
        self.values[name] = value
        self.pool.append(name)
        self.uses[name] = 0

    def pick(self, accept: Callable[[TensorType], bool] = lambda t: True) -> str:
        """A pool value whose type ``accept``s, preferring unused and recent ones."""
        found = [n for n in self.pool if accept(self.type(n))]
        if not found:
            raise NoOperand
        weights = np.array([(10.0 if self.uses[n] == 0 else 1.0) * (1 + k)
                            for k, n in enumerate(found)])
        return found[int(self.rng.choice(len(found), p=weights / weights.sum()))]

    # ---- fresh constants ---------------------------------------------------------------------
    def normal(self, shape, scale: float = 1.0) -> np.ndarray:
        """f32 normals times ``scale`` (weights use 1/sqrt(fan-in) to keep magnitudes sane)."""
        return np.asarray(self.rng.standard_normal(shape) * scale, dtype=np.float32)

    def positive(self, shape) -> np.ndarray:
        """f32 values in [0.5, 2): variances, divisors."""
        return np.asarray(self.rng.uniform(0.5, 2.0, shape), dtype=np.float32)

    def like(self, dtype: DType, shape) -> np.ndarray:
        """Random values of ``dtype``: normals, small integers or coin flips."""
        if dtype.is_float:
            return self.normal(shape)
        if dtype == DType.bool:
            return np.asarray(self.rng.random(shape) < 0.5)
        return np.asarray(self.rng.integers(-5, 6, shape), dtype=dtype.numpy)

    def partner_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """A shape that broadcasts into ``shape``: a suffix of it with some dims set to 1."""
        keep = int(self.rng.integers(0, len(shape) + 1))
        return tuple(1 if self.rng.random() < 0.3 else d for d in shape[len(shape) - keep:])

    def partner(self, a: str, dtype: DType | None = None, positive: bool = False
                ) -> str | np.ndarray:
        """A second operand for ``a``: a pool value it broadcasts with, or a fresh constant."""
        dtype = dtype or self.type(a).dtype
        shape = self.type(a).shape
        if self.rng.random() < 0.5:
            try:
                return self.pick(lambda t: t.dtype == dtype and _broadcasts(t.shape, shape))
            except NoOperand:
                pass
        fresh = self.partner_shape(shape)
        return self.positive(fresh) if positive else self.like(dtype, fresh)

    # ---- adding nodes ------------------------------------------------------------------------
    def try_add(self, op: str, proposal: Proposal) -> bool:
        """Add the proposed node if it is valid, small and numerically tame (a KilnError from
        the type rule propagates); False when it was turned down for size or values."""
        attrs = get_op(op).normalize_attrs(proposal.attrs)
        types = [TensorType.of(o) if isinstance(o, np.ndarray) else self.type(o)
                 for o in proposal.operands]
        out_types = infer_types(op, types, attrs)
        if any(t.numel > MAX_ELEMENTS for t in out_types):
            return False
        guards = [k for k in proposal.positive if isinstance(proposal.operands[k], str)
                  and not _safely_positive(self.values[proposal.operands[k]])]
        if self.num_nodes + 2 * len(guards) + 1 > MAX_NODES:
            return False
        arrays = [o if isinstance(o, np.ndarray) else self.values[o] for o in proposal.operands]
        for k in guards:
            arrays[k] = _guarded(arrays[k])
        operands = proposal.operands
        same = len(operands) > 1 and all(isinstance(o, str) for o in operands[:2]) \
            and operands[0] == operands[1]
        if not _clear_of_cliffs(op, arrays, attrs, same):
            return False
        try:
            results = reference_op(op, arrays, attrs)
        except KilnError:
            return False
        if not all(_tame(r) for r in results):
            return False
        names = []
        for k, o in enumerate(proposal.operands):
            if isinstance(o, np.ndarray):
                names.append(self.builder.constant(o, "c"))
            else:
                names.append(self._guard(o) if k in guards else o)
        self._commit(op, names, attrs, results)
        return True

    def _guard(self, name: str) -> str:
        """abs(name) + 0.5, added to the graph: safely positive."""
        a = self._commit("abs", [name], {}, reference_op("abs", [self.values[name]], {}))
        half = self.builder.constant(np.float32(0.5), "half")
        return self._commit("add", [a, half], {},
                            reference_op("add", [self.values[a], np.float32(0.5)], {}))

    def _commit(self, op: str, names: list[str], attrs: dict, results: list[np.ndarray]) -> str:
        for n in names:
            self.uses[n] = self.uses.get(n, 0) + 1
        outs = self.builder.op_multi(op, names, attrs)
        for out, r in zip(outs, results):
            self._track(out, r)
        return outs[0]

    def best_outputs(self) -> list[str]:
        """One or two node outputs that nothing reads, chosen to leave the least dead code."""
        producer = self.builder.graph.producers()
        reach: dict[str, frozenset[str]] = {}  # value -> the nodes it depends on
        for n in self.builder.graph.nodes:
            deps = frozenset({n.name}).union(*(reach.get(i, frozenset()) for i in n.inputs))
            for o in n.outputs:
                reach[o] = deps
        sinks = [o for o in producer if self.uses[o] == 0]
        choices = [[s] for s in sinks] + [[a, b] for a in sinks for b in sinks if a < b]
        if not choices:
            return []
        return max(choices, key=lambda c: (len(reach[c[0]].union(*(reach[o] for o in c))),
                                           -len(c)))


def _broadcasts(a: Sequence[int], b: Sequence[int]) -> bool:
    try:
        return math.prod(np.broadcast_shapes(tuple(a), tuple(b))) <= MAX_ELEMENTS
    except ValueError:
        return False


def _safely_positive(value: np.ndarray) -> bool:
    return value.dtype.kind == "f" and value.size > 0 and float(value.min()) > 1e-2


def _guarded(value: np.ndarray) -> np.ndarray:
    """The value of Grower._guard's abs(value) + 0.5."""
    return reference_op("add", [reference_op("abs", [value], {})[0], np.float32(0.5)], {})[0]


_COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge"}


def _clear_of_cliffs(op: str, arrays: list[np.ndarray], attrs: dict, same: bool) -> bool:
    """Whether the node keeps its float operands clear of the spots where a last-bit rounding
    difference changes its result wholesale: a float->int cast near an integer (trunc), a
    float->bool cast near 0, a round near a half-integer, a comparison near a tie (unless
    ``same``: both sides are one value), a normalization of a group whose values (nearly)
    agree (noise times 1/sqrt(eps)).

    well_conditioned's perturbation test finds most of these, but not where the value sits
    on a flat spot: erf saturated at exactly 1.0 and then cast to int, or a row of equal
    (expanded) values, stay put when the inputs move, yet differ by an ulp between backends.
    """
    x = arrays[0]
    if x.dtype.kind != "f" or x.size == 0:
        return True
    margin = 1e-3 + 1e-5 * np.abs(x)
    if op == "cast":
        gap = np.abs(x) if attrs["dtype"] == "bool" else np.abs(x - np.round(x))
        return attrs["dtype"] in ("f32", "f16") or bool(np.all(gap >= margin))
    if op == "round":  # jumps at every half-integer
        return bool(np.all(np.abs(np.abs(x - np.floor(x)) - 0.5) >= margin))
    if op in _COMPARISONS:
        # The same value on both sides ties in every backend alike.
        return same or bool(np.all(np.abs(x - arrays[1]) >= margin))
    if op in ("argmax", "argmin", "topk"):  # the picked index jumps at a near-tie
        axis = attrs["axis"]
        rows = x.reshape(-1) if axis is None else np.moveaxis(x, axis, -1)
        gaps = np.diff(np.sort(rows.astype(np.float64), axis=-1), axis=-1)
        return bool(np.all(gaps >= 1e-3 + 1e-5 * np.abs(np.sort(rows, axis=-1)[..., 1:])))
    if op in ("layer_norm", "group_norm"):
        if op == "layer_norm":
            groups = x.reshape(-1, math.prod(x.shape[x.ndim - attrs["normalized_ndim"]:]))
        else:
            groups = x.reshape(x.shape[0] * attrs["groups"], -1)
        spread = groups.std(axis=1, dtype=np.float64)
        return bool(np.all(spread >= 1e-2 * np.abs(groups).max(axis=1)))
    return True


def _tame(value: np.ndarray) -> bool:
    if value.dtype.kind != "f":
        return True
    return bool(np.all(np.isfinite(value))) and float(np.abs(value).max(initial=0.0)) \
        <= MAX_MAGNITUDE


# ---- per-op proposals ------------------------------------------------------------------------
# A proposer draws operands and attrs for its op from what the pool holds; it need not get
# every constraint right (kernel vs. input size, broadcasting of pool values...): the op's
# type rule has the last word, and try_add turns a KilnError into another try.
def _is_float(t: TensorType) -> bool:
    return t.dtype == DType.f32


def _is_numeric(t: TensorType) -> bool:
    return t.dtype != DType.bool


def _rank_at_least(n: int, accept: Callable[[TensorType], bool] = _is_float):
    return lambda t: t.rank >= n and accept(t)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _choice(g: Grower, options: Sequence):
    return options[int(g.rng.integers(len(options)))]


def _ints(g: Grower, lo: int, hi: int, n: int) -> list[int]:
    """``n`` random ints in [lo, hi]."""
    return [int(v) for v in g.rng.integers(lo, hi + 1, n)]


def _unary(accept=_is_float, positive: bool = False, attrs=lambda g: {}):
    def propose(g: Grower) -> Proposal:
        return Proposal([g.pick(accept)], attrs(g), positive=(0,) if positive else ())
    return propose


def _binary(accept=_is_numeric, positive_b: bool = False):
    def propose(g: Grower) -> Proposal:
        a = g.pick(accept)
        b = g.partner(a, positive=positive_b)
        if not positive_b and g.rng.random() < 0.2:
            a, b = b, a  # the fresh or smaller operand first, sometimes
        return Proposal([a, b], positive=(1,) if positive_b else ())
    return propose


def _propose_pow(g: Grower) -> Proposal:
    base = g.pick(_is_float)
    shape = g.partner_shape(g.type(base).shape)
    exponent = np.asarray(np.round(g.rng.uniform(-2, 3, shape) * 2) / 2, dtype=np.float32)
    return Proposal([base, exponent], positive=(0,))


def _propose_clamp(g: Grower) -> Proposal:
    x = g.pick(_is_numeric)
    if g.type(x).dtype.is_float:
        lo, hi = sorted(round(float(v), 2) for v in g.rng.uniform(-2, 2, 2))
    else:
        lo, hi = sorted(_ints(g, -4, 4, 2))
    which = _choice(g, ["both", "min", "max"])
    return Proposal([x], {"min": lo if which != "max" else None,
                          "max": hi if which != "min" else None})


# float -> i8/u8 overflows (undefined), so casts stay within these.
_CAST_TARGETS = {DType.f32: ["i32", "i64", "bool"], DType.i32: ["f32", "i64", "bool"],
                 DType.i64: ["f32", "i32", "bool"], DType.bool: ["f32", "i32", "i64"],
                 DType.u8: ["f32", "i32", "i64"], DType.i8: ["f32", "i32", "i64"]}


def _propose_cast(g: Grower) -> Proposal:
    x = g.pick()
    return Proposal([x], {"dtype": _choice(g, _CAST_TARGETS[g.type(x).dtype])})


def _propose_compare(g: Grower) -> Proposal:
    a = g.pick()
    return Proposal([a, g.partner(a)])


def _propose_where(g: Grower) -> Proposal:
    a = g.pick()
    b = g.partner(a)
    cond = g.partner(a, dtype=DType.bool)
    return Proposal([cond, a, b])


def _propose_softmax(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1))
    rank = g.type(x).rank
    return Proposal([x], {"axis": int(g.rng.integers(-rank, rank))})


def _propose_batch_norm(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(2))
    c = g.type(x).shape[1]
    return Proposal([x, g.normal(c), g.positive(c), g.normal(c), g.normal(c)],
                    {"eps": _choice(g, [1e-5, 1e-3])})


def _propose_layer_norm(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1))
    shape = g.type(x).shape
    k = int(g.rng.integers(1, min(2, len(shape)) + 1))
    affine = [g.normal(shape[-k:]) for _ in range(int(g.rng.integers(0, 3)))]
    return Proposal([x, *affine], {"normalized_ndim": k})


def _propose_group_norm(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(2))
    c = g.type(x).shape[1]
    affine = [g.normal(c) for _ in range(int(g.rng.integers(0, 3)))]
    return Proposal([x, *affine], {"groups": _choice(g, _divisors(c))})


def _spatial(g: Grower, lo_rank: int = 3, hi_rank: int = 5) -> str:
    return g.pick(lambda t: _is_float(t) and lo_rank <= t.rank <= hi_rank)


def _window_attrs(g: Grower, nd: int) -> dict:
    kernel = _ints(g, 1, 3, nd)
    stride = None if g.rng.random() < 0.3 else _ints(g, 1, 3, nd)
    padding = [int(g.rng.integers(0, k // 2 + 1)) for k in kernel]
    return {"kernel": kernel, "stride": stride, "padding": padding,
            "ceil_mode": bool(g.rng.random() < 0.5)}


def _propose_max_pool(g: Grower) -> Proposal:
    x = _spatial(g)
    nd = g.type(x).rank - 2
    return Proposal([x], {**_window_attrs(g, nd), "dilation": _ints(g, 1, 2, nd)})


def _propose_avg_pool(g: Grower) -> Proposal:
    x = _spatial(g)
    return Proposal([x], {**_window_attrs(g, g.type(x).rank - 2),
                          "count_include_pad": bool(g.rng.random() < 0.5)})


def _propose_adaptive_avg_pool(g: Grower) -> Proposal:
    x = _spatial(g)
    return Proposal([x], {"output_size": [int(g.rng.integers(1, n + 1))
                                          for n in g.type(x).shape[2:]]})


def _reduction(accept):
    def propose(g: Grower) -> Proposal:
        x = g.pick(_rank_at_least(1, accept))
        rank = g.type(x).rank
        axes = None
        if g.rng.random() < 0.7:
            count = int(g.rng.integers(1, rank + 1))
            axes = [int(a) - (rank if g.rng.random() < 0.3 else 0)
                    for a in g.rng.choice(rank, count, replace=False)]
        return Proposal([x], {"axes": axes, "keepdim": bool(g.rng.random() < 0.5)})
    return propose


def _propose_reshape(g: Grower) -> Proposal:
    x = g.pick()
    rest, shape = g.type(x).numel, []
    for _ in range(int(g.rng.integers(0, 3))):
        d = _choice(g, _divisors(rest)) if rest else 0
        shape.append(d)
        rest = rest // d if d else 0
    shape.append(rest)
    return Proposal([x], {"shape": [int(d) for d in g.rng.permutation(shape)]})


def _propose_permute(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1, lambda t: True))
    return Proposal([x], {"perm": [int(p) for p in g.rng.permutation(g.type(x).rank)]})


def _propose_slice(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1, lambda t: t.numel > 0))
    shape = g.type(x).shape
    axis = int(g.rng.integers(-len(shape), len(shape)))
    size = shape[axis]
    start = int(g.rng.integers(0, size))
    end = int(g.rng.integers(start + 1, size + 1))
    return Proposal([x], {"axis": axis, "start": start, "end": end,
                          "step": int(g.rng.integers(1, 4))})


def _propose_concat(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1, lambda t: True))
    t = g.type(x)
    axis = int(g.rng.integers(0, t.rank))

    def fits(u: TensorType) -> bool:
        return u.dtype == t.dtype and u.rank == t.rank and all(
            u.shape[i] == t.shape[i] for i in range(t.rank) if i != axis)

    operands: list[str | np.ndarray] = [x]
    for _ in range(int(g.rng.integers(1, 3))):
        if g.rng.random() < 0.5:
            operands.append(g.pick(fits))
        else:
            shape = list(t.shape)
            shape[axis] = int(g.rng.integers(1, 5))
            operands.append(g.like(t.dtype, shape))
    return Proposal([operands[i] for i in g.rng.permutation(len(operands))],
                    {"axis": axis - (t.rank if g.rng.random() < 0.3 else 0)})


def _propose_split(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1, lambda t: max(t.shape) >= 2))
    shape = g.type(x).shape
    axis = _choice(g, [i for i, d in enumerate(shape) if d >= 2])
    cuts = sorted({int(c) for c in g.rng.integers(1, shape[axis], int(g.rng.integers(1, 3)))})
    return Proposal([x], {"axis": axis, "sizes": np.diff([0, *cuts, shape[axis]]).tolist()})


def _propose_expand(g: Grower) -> Proposal:
    x = g.pick()
    shape = [int(g.rng.integers(1, 5)) if d == 1 else d for d in g.type(x).shape]
    lead = _ints(g, 1, 3, int(g.rng.integers(0, 2)))
    return Proposal([x], {"shape": lead + shape})


def _propose_pad(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1, lambda t: True))
    pads = []
    for d in g.type(x).shape:
        lo = int(g.rng.integers(-1 if d > 1 else 0, 3))
        hi = int(g.rng.integers(-1 if d + min(lo, 0) > 1 else 0, 3))
        pads += [lo, hi]
    dtype = g.type(x).dtype
    value = _choice(g, [0.0, 1.0] if dtype in (DType.bool, DType.u8) else [0.0, 1.0, -2.0])
    return Proposal([x], {"pads": pads, "value": value})


def _propose_embedding(g: Grower) -> Proposal:
    try:
        table: str | np.ndarray = g.pick(lambda t: _is_float(t) and t.rank == 2 and t.shape[0])
    except NoOperand:
        table = g.normal((int(g.rng.integers(1, 11)), int(g.rng.integers(1, 17))))
    num = table.shape[0] if isinstance(table, np.ndarray) else g.type(table).shape[0]
    shape = _ints(g, 1, 6, int(g.rng.integers(1, 3)))
    indices = g.rng.integers(0, num, shape).astype(_choice(g, [np.int32, np.int64]))
    return Proposal([indices, table])


# ---- indexing (kiln.ir.ops.index) ------------------------------------------------------------
def _propose_take(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1, lambda t: t.numel > 0))
    rank = g.type(x).rank
    axis = int(g.rng.integers(0, rank))
    n = g.type(x).shape[axis]
    idx = g.rng.integers(-n, n, _ints(g, 1, 4, int(g.rng.integers(0, 3))))
    return Proposal([x, idx.astype(np.int64)], {"axis": axis - (rank if g.rng.random() < 0.3
                                                                 else 0)})


def _propose_gather_elements(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1, lambda t: t.numel > 0))
    shape = g.type(x).shape
    axis = int(g.rng.integers(0, len(shape)))
    idx_shape = [int(g.rng.integers(1, d + 1)) if k != axis else int(g.rng.integers(1, 5))
                 for k, d in enumerate(shape)]
    idx = g.rng.integers(-shape[axis], shape[axis], idx_shape).astype(np.int64)
    return Proposal([x, idx], {"axis": axis})


def _propose_arg(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1))
    rank = g.type(x).rank
    axis = None if g.rng.random() < 0.3 else int(g.rng.integers(-rank, rank))
    return Proposal([x], {"axis": axis, "keepdim": bool(g.rng.random() < 0.5)})


def _propose_topk(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1, lambda t: _is_float(t) and t.numel > 0))
    shape = g.type(x).shape
    axis = int(g.rng.integers(0, len(shape)))
    return Proposal([x], {"k": int(g.rng.integers(1, min(shape[axis], 4) + 1)), "axis": axis,
                          "largest": bool(g.rng.random() < 0.5)})


def _propose_cumsum(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1))
    return Proposal([x], {"axis": int(g.rng.integers(0, g.type(x).rank)),
                          "exclusive": bool(g.rng.random() < 0.3),
                          "reverse": bool(g.rng.random() < 0.3)})


def _propose_resize(g: Grower) -> Proposal:
    x = _spatial(g)
    nd = g.type(x).rank - 2
    return Proposal([x], {"sizes": _ints(g, 1, 7, nd),
                          "mode": _choice(g, ["nearest", "linear", "cubic"]),
                          "coordinate": _choice(g, ["half_pixel", "align_corners",
                                                    "asymmetric"])})


def _propose_matmul(g: Grower) -> Proposal:
    a = g.pick(_rank_at_least(2))
    shape = g.type(a).shape
    k = shape[-1]
    if g.rng.random() < 0.3:
        try:
            return Proposal([a, g.pick(lambda t: _is_float(t) and t.rank >= 2
                                       and t.shape[-2] == k)])
        except NoOperand:
            pass
    batch = g.partner_shape(shape[:-2])
    return Proposal([a, g.normal((*batch, k, int(g.rng.integers(1, 17))), k ** -0.5)])


def _propose_linear(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1))
    k, n = g.type(x).shape[-1], int(g.rng.integers(1, 17))
    operands: list[str | np.ndarray] = [x, g.normal((n, k), k ** -0.5)]
    if g.rng.random() < 0.5:
        operands.append(g.normal(n))
    return Proposal(operands)


def _recurrent_seq(gates: str) -> Callable[[Grower], Proposal]:
    """lstm_seq / gru_seq over a rank-3 value whose last dimension holds the gates."""

    def propose(g: Grower) -> Proposal:
        n = len(gates)
        x = g.pick(lambda t: _is_float(t) and t.rank == 3 and t.shape[2] % n == 0)
        _, batch, width = g.type(x).shape
        hidden = width // n
        state = [g.normal((1, batch, hidden))]
        rest = state * 2 if n == 4 else [g.normal(width), *state]
        order = "".join(g.rng.permutation(list(gates)))
        return Proposal([x, g.normal((width, hidden), hidden ** -0.5), *rest],
                        {"gates": order, "reverse": bool(g.rng.random() < 0.5)})

    return propose


def _conv_attrs(g: Grower, nd: int, transpose: bool) -> dict:
    stride, dilation = _ints(g, 1, 2, nd), _ints(g, 1, 2, nd)
    attrs = {"stride": stride, "padding": _ints(g, 0, 2 if not transpose else 1, nd),
             "dilation": dilation}
    if transpose:
        attrs["output_padding"] = [int(g.rng.integers(0, max(s, d)))
                                   for s, d in zip(stride, dilation)]
    return attrs


def _propose_conv(g: Grower) -> Proposal:
    x = _spatial(g)
    shape = g.type(x).shape
    nd, cin = len(shape) - 2, shape[1]
    groups = _choice(g, [1, 1, cin] + _divisors(cin))
    cout = groups * int(g.rng.integers(1, max(1, 16 // groups) + 1))
    kernel = _ints(g, 1, 3, nd)
    fan_in = cin // groups * math.prod(kernel)
    operands: list[str | np.ndarray] = [x, g.normal((cout, cin // groups, *kernel),
                                                    fan_in ** -0.5)]
    if g.rng.random() < 0.5:
        operands.append(g.normal(cout))
    return Proposal(operands, {**_conv_attrs(g, nd, transpose=False), "groups": groups})


def _propose_conv_transpose(g: Grower) -> Proposal:
    x = _spatial(g, 3, 4)
    shape = g.type(x).shape
    nd, cin = len(shape) - 2, shape[1]
    groups = _choice(g, [1, 1] + _divisors(cin))
    cout_g = int(g.rng.integers(1, 5))
    kernel = _ints(g, 1, 3, nd)
    operands: list[str | np.ndarray] = [x, g.normal((cin, cout_g, *kernel),
                                                    (cin // groups) ** -0.5)]
    if g.rng.random() < 0.5:
        operands.append(g.normal(cout_g * groups))
    return Proposal(operands, {**_conv_attrs(g, nd, transpose=True), "groups": groups})


def _propose_attention(g: Grower) -> Proposal:
    q = g.pick(_rank_at_least(2))
    shape = g.type(q).shape
    L, E = shape[-2:]
    if g.rng.random() < 0.3:
        k: str | np.ndarray = q
        v: str | np.ndarray = q
        S = L
    else:
        batch = shape[:-2] if g.rng.random() < 0.5 else ()
        S, Ev = int(g.rng.integers(1, 9)), int(g.rng.integers(1, 9))
        k, v = g.normal((*batch, S, E)), g.normal((*batch, S, Ev))
    operands = [q, k, v]
    mask = _choice(g, ["none", "bool", "float"])
    if mask == "bool":
        keep = g.rng.random((L, S)) < 0.7
        keep[:, 0] = True  # every row attends somewhere, causal or not
        operands.append(keep)
    elif mask == "float":
        operands.append(g.normal((L, S)))
    return Proposal(operands, {"causal": bool(g.rng.random() < 0.5),
                               "scale": _choice(g, [None, 0.5])})


def _slope(g: Grower) -> dict:
    return {"negative_slope": _choice(g, [0.01, 0.2])}


def _approximate(g: Grower) -> dict:
    return {"approximate": _choice(g, ["none", "tanh"])}


def _qscale(values: np.ndarray, steps: float) -> float:
    """A float32-exact scale that spreads ``values`` over about ``steps`` quantization steps."""
    span = float(np.abs(values).max(initial=0.0)) if values.size else 0.0
    return float(np.float32(max(span, 1e-3) / steps))


def _propose_quantize(g: Grower) -> Proposal:
    x = g.pick(_is_float)
    dtype = _choice(g, ["u8", "i8"])
    zp = int(g.rng.integers(0, 256)) - (128 if dtype == "i8" else 0)
    return Proposal([x], {"scale": _qscale(g.values[x], 100.0), "zero_point": zp,
                          "dtype": dtype})


def _propose_dequantize(g: Grower) -> Proposal:
    q = g.pick(lambda t: t.dtype in (DType.u8, DType.i8))
    zp = int(g.rng.integers(0, 256)) - (128 if g.type(q).dtype == DType.i8 else 0)
    return Proposal([q], {"scale": _choice(g, [0.01, 0.03125]), "zero_point": zp})


def _q_weights(g: Grower, shape, fan_in: int) -> list[np.ndarray]:
    cout = shape[0]
    w = g.rng.integers(-127, 128, shape).astype(np.int8)
    bias = g.rng.integers(-2000, 2000, cout).astype(np.int32)
    # About one output step per few accumulated products: the outputs use the u8 range.
    scale = (g.rng.uniform(0.5, 2.0, cout) / (fan_in ** 0.5 * 2000)).astype(np.float32)
    return [w, bias, scale]


def _q_attrs(g: Grower) -> dict:
    return {"x_zero_point": int(g.rng.integers(0, 256)),
            "out_zero_point": int(g.rng.integers(0, 256)),
            "out_dtype": _choice(g, ["u8", "f32"]), "relu": bool(g.rng.random() < 0.5)}


def _propose_qlinear(g: Grower) -> Proposal:
    x = g.pick(lambda t: t.dtype == DType.u8 and t.rank >= 1)
    k = g.type(x).shape[-1]
    n = int(g.rng.integers(1, 17))
    return Proposal([x, *_q_weights(g, (n, k), k)], _q_attrs(g))


def _propose_qconv(g: Grower) -> Proposal:
    x = g.pick(lambda t: t.dtype == DType.u8 and t.rank == 4)
    c = g.type(x).shape[3]
    kernel = _ints(g, 1, 3, 2)
    cout = int(g.rng.integers(1, 17))
    return Proposal([x, *_q_weights(g, (cout, *kernel, c), c * math.prod(kernel))],
                    {**_q_attrs(g), **_conv_attrs(g, 2, transpose=False)})


def _propose_w8(g: Grower) -> Proposal:
    x = g.pick(_rank_at_least(1))
    k = g.type(x).shape[-1]
    n = int(g.rng.integers(1, 17))
    w = g.rng.integers(-127, 128, (n, k)).astype(np.int8)
    scale = (g.rng.uniform(0.5, 2.0, n) / (127 * k ** 0.5)).astype(np.float32)
    operands: list[str | np.ndarray] = [x, w, scale]
    if g.rng.random() < 0.5:
        operands.append(g.normal(n))
    return Proposal(operands)


PROPOSERS: dict[str, tuple[float, Callable[[Grower], Proposal]]] = {
    "embedding": (1, _propose_embedding),
    "take": (0.5, _propose_take),
    "gather_elements": (0.5, _propose_gather_elements),
    "argmax": (0.5, _propose_arg),
    "argmin": (0.5, _propose_arg),
    "topk": (0.5, _propose_topk),
    "cumsum": (0.5, _propose_cumsum),
    "resize": (0.5, _propose_resize),
    "matmul": (2, _propose_matmul),
    "linear": (3, _propose_linear),
    "lstm_seq": (0.5, _recurrent_seq("ifgo")),
    "gru_seq": (0.5, _recurrent_seq("rzn")),
    "conv": (3, _propose_conv),
    "conv_transpose": (1, _propose_conv_transpose),
    "attention": (1.5, _propose_attention),
    "relu": (3, _unary(_is_numeric)),
    "clamp": (1, _propose_clamp),
    "leaky_relu": (1, _unary(attrs=_slope)),
    "gelu": (2, _unary(attrs=_approximate)),
    "silu": (1, _unary()),
    "sigmoid": (1, _unary()),
    "tanh": (1, _unary()),
    "hardswish": (1, _unary()),
    "hardsigmoid": (1, _unary()),
    "softsign": (0.5, _unary()),
    "exp": (1, _unary()),
    "log": (1, _unary(positive=True)),
    "sqrt": (1, _unary(positive=True)),
    "rsqrt": (1, _unary(positive=True)),
    "erf": (1, _unary()),
    "reciprocal": (1, _unary(positive=True)),
    "neg": (1, _unary(_is_numeric)),
    "abs": (1, _unary(_is_numeric)),
    "round": (0.5, _unary()),
    "sin": (0.5, _unary()),
    "cos": (0.5, _unary()),
    "atan": (0.5, _unary()),
    "cast": (1, _propose_cast),
    "add": (4, _binary()),
    "sub": (2, _binary()),
    "mul": (3, _binary()),
    "div": (1, _binary(_is_float, positive_b=True)),
    "pow": (1, _propose_pow),
    "maximum": (1, _binary()),
    "minimum": (1, _binary()),
    "eq": (0.5, _propose_compare),
    "ne": (0.5, _propose_compare),
    "lt": (0.5, _propose_compare),
    "le": (0.5, _propose_compare),
    "gt": (0.5, _propose_compare),
    "ge": (0.5, _propose_compare),
    "where": (1, _propose_where),
    "logical_not": (0.5, _unary(lambda t: t.dtype == DType.bool)),
    "softmax": (2, _propose_softmax),
    "log_softmax": (1, _propose_softmax),
    "batch_norm": (1.5, _propose_batch_norm),
    "layer_norm": (2, _propose_layer_norm),
    "group_norm": (1, _propose_group_norm),
    "max_pool": (1.5, _propose_max_pool),
    "avg_pool": (1, _propose_avg_pool),
    "adaptive_avg_pool": (1, _propose_adaptive_avg_pool),
    "reduce_sum": (1, _reduction(_is_numeric)),
    "reduce_mean": (1, _reduction(_is_float)),
    "reduce_max": (1, _reduction(_is_numeric)),
    "reduce_min": (1, _reduction(_is_numeric)),
    "reshape": (3, _propose_reshape),
    "permute": (2, _propose_permute),
    "slice": (2, _propose_slice),
    "concat": (2, _propose_concat),
    "split": (1, _propose_split),
    "expand": (1, _propose_expand),
    "pad": (1, _propose_pad),
    "quantize": (1.5, _propose_quantize),
    "dequantize": (1, _propose_dequantize),
    "qlinear": (2, _propose_qlinear),
    "qconv": (2, _propose_qconv),
    "linear_w8": (1, _propose_w8),
    "dynamic_qlinear": (1, _propose_w8),
}
"""Op name -> (how often to pick it, relative; its proposer)."""


def _grow(rng: np.random.Generator) -> tuple[Graph, list[np.ndarray]] | None:
    """One try at a graph; None when it ended up without nodes or ill-conditioned."""
    g = Grower(rng)
    inputs = [g.add_input() for _ in range(int(rng.integers(1, 3)))]
    names = sorted(PROPOSERS)
    weights = np.array([PROPOSERS[n][0] for n in names], dtype=float)
    target = int(rng.integers(1, MAX_NODES + 1))
    for _ in range(40 * target):
        if g.num_nodes >= target:
            break
        op = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        try:
            g.try_add(op, PROPOSERS[op][1](g))
        except (NoOperand, KilnError):
            continue
    outputs = g.best_outputs()
    if not outputs:
        return None
    g.builder.output(*outputs)
    graph = g.builder.build()
    return (graph, inputs) if well_conditioned(graph, inputs, rng) else None


def _perturbed(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if array.dtype.kind != "f":
        return array
    noise = 1.0 + PERTURBATION * rng.standard_normal(array.shape)
    return (array * noise).astype(array.dtype)


def well_conditioned(graph: Graph, inputs: Sequence[np.ndarray],
                     rng: np.random.Generator) -> bool:
    """Whether the outputs barely move (floats: within SENSITIVITY of their magnitude, _ints
    and bools: not at all) when every float input and constant moves by PERTURBATION."""
    base = run_graph(graph, inputs)
    for _ in range(2):
        moved = graph.copy()
        moved.constants = {k: _perturbed(v, rng) for k, v in graph.constants.items()}
        for b, m in zip(base, run_graph(moved, [_perturbed(a, rng) for a in inputs])):
            if b.dtype.kind != "f":
                if not np.array_equal(b, m):
                    return False
            elif np.abs(m - b).max(initial=0.0) > SENSITIVITY * max(
                    1.0, float(np.abs(b).max(initial=0.0))):
                return False
    return True


def generate_graph(seed: int) -> tuple[Graph, list[np.ndarray]]:
    """A random valid, well-conditioned graph (1-8 nodes, 1-2 f32 inputs, 1-2 outputs) and
    inputs for it; the same seed always gives the same graph."""
    for attempt in range(100):
        result = _grow(np.random.default_rng([seed, attempt]))
        if result is not None:
            return result
    raise RuntimeError(f"seed {seed}: no well-conditioned graph in 100 tries")


def main(argv: Sequence[str]) -> int:
    """Fuzz seeds FIRST..FIRST+COUNT-1 across BACKENDS; print each failing seed."""
    first, count = (int(a) for a in argv)
    failures = 0
    for seed in range(first, first + count):
        graph, inputs = generate_graph(seed)
        try:
            expected = BACKENDS[0][1](graph, inputs)
            for name, run in BACKENDS[1:]:
                assert_outputs_close(expected, run(graph, inputs), f"seed {seed}, {name}")
        except (AssertionError, KilnError, RuntimeError) as e:
            failures += 1
            print(f"--- seed {seed}: {type(e).__name__}: {str(e)[:500]}\n{graph}")
    print(f"{failures} of {count} seeds failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
