"""Lowering core: the element of any value at a multi-dimensional index, as a kernel-IR
expression, and helpers to build loop nests.

Values that a kernel reads from memory (graph inputs, constants, other kernels' outputs) become
``Load``s; values of nodes inlined into the kernel are computed from their operands' elements by
the per-op index rules in ``ELEMENT_RULES``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np

from kiln.ir import Graph, KilnError, Node
from kiln.ir import kernel as K
from kiln.ir.graph import sanitize_name
from kiln.ir.kernel import INDEX, Const, Expr, Var, as_expr, simplify
from kiln.passes.target import Target
from kiln.passes.tuning import DEFAULT as DEFAULT_TUNING
from kiln.passes.tuning import Tuning

_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def buffer_name(value: str) -> str:
    """A kernel-IR buffer name for a graph value (identifier characters only)."""
    return "v_" + "".join(c if c in _SAFE else "_" for c in sanitize_name(value))


def strides(shape: Sequence[int]) -> list[int]:
    """Row-major element strides."""
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def flat_index(idx: Sequence[Expr], shape: Sequence[int]) -> Expr:
    """The row-major flat index of ``idx`` in a tensor of ``shape``."""
    e: Expr = Const(0, INDEX)
    for i, d, s in zip(idx, shape, strides(shape)):
        if d != 1:  # a size-1 dimension's index is always 0
            e = e + i * s
    return simplify(e)


def unflatten(flat: Expr, shape: Sequence[int]) -> list[Expr]:
    """Multi-dimensional index of a flat index."""
    out = []
    for d, s in zip(shape, strides(shape)):
        out.append(simplify((flat // s) % d) if d > 1 else Const(0, INDEX))
    return out


class KernelNodes(AbstractSet[str]):
    """The names of the nodes one kernel computes: the plan's inline nodes (one set, shared by
    every kernel of the graph, never copied) and the kernel's own (its root, its epilogue)."""

    def __init__(self, shared: AbstractSet[str], own: Iterable[str] = ()) -> None:
        self.shared = shared
        self.own = frozenset(own) - shared

    def __contains__(self, name: object) -> bool:
        return name in self.own or name in self.shared

    def __iter__(self) -> Iterator[str]:
        yield from self.shared
        yield from self.own

    def __len__(self) -> int:
        return len(self.shared) + len(self.own)

    def __or__(self, other: Iterable[str]) -> KernelNodes:  # type: ignore[override]
        return KernelNodes(self.shared, self.own | set(other))


@dataclass
class Lowering:
    """State for lowering one fused group of ``graph`` to one kernel."""

    graph: Graph
    inline: AbstractSet[str]             # node names computed inside this kernel
    producers: dict[str, Node]
    new_constants: dict[str, np.ndarray] = field(default_factory=dict)
    reads: dict[str, str] = field(default_factory=dict)    # buffer name -> graph value
    overrides: dict[str, Callable[[Sequence[Expr]], Expr]] = field(default_factory=dict)
    scratch: list = field(default_factory=list)
    view_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # collapsed dims
    workspaces: list = field(default_factory=list)  # arena buffers private to this kernel
    # A schedule whose arithmetic differs from the op's definition (e.g. "winograd"): the
    # kernel's FLOP count stays the op's, and the profiler says so.
    algorithm: str = ""
    # The schedule a dense op took, where it has several (a convolution's algorithm); kept
    # in the kernel's meta for the profiler and the autotuner.
    schedule: str = ""
    target: Target | None = None      # the CPU (None: generic, no ISA-specific schedule)
    tuning: Tuning = DEFAULT_TUNING
    _counter: int = 0

    def fresh(self, prefix: str = "i", dtype: str = INDEX, lanes: int = 1) -> Var:
        self._counter += 1
        return Var(f"{prefix}{self._counter}", dtype, lanes)

    def shape(self, value: str) -> tuple[int, ...]:
        return self.view_shapes.get(value, self.graph.types[value].shape)

    def dtype(self, value: str) -> str:
        return self.graph.types[value].dtype.value

    def buffer(self, value: str) -> str:
        """The buffer holding a value read from memory (recorded as a kernel input)."""
        name = buffer_name(value)
        self.reads[name] = value
        return name

    def constant(self, array: np.ndarray, hint: str) -> str:
        """A new constant made at lowering time (e.g. packed weights); returns its buffer."""
        name = buffer_name(f"{hint}_{len(self.new_constants)}")
        while name in self.new_constants or name in self.reads:
            name += "_"
        arr = np.ascontiguousarray(array)
        self.new_constants[name] = arr
        self.reads[name] = name
        return name

    def workspace(self, hint: str, dtype: str, size: int) -> str:
        """A scratch buffer of ``size`` elements in the arena, live during this kernel only."""
        name = buffer_name(f"ws_{hint}_{len(self.workspaces)}")
        self.workspaces.append(K.Buffer(name, dtype, size))
        return name

    def store_at(self, final: str, idx: Sequence[Expr], value: Expr, anchor_out: str) -> K.Store:
        """Store the group output ``final`` at ``idx``, where the anchor's output is ``value``
        (scalar, or a vector of consecutive elements along the last index)."""
        from kiln.passes.vectorize import vectorize_expr

        shape = self.shape(final)
        if value.lanes == 1:
            self.overrides[anchor_out] = lambda _idx: value
            try:
                return K.Store(buffer_name(final), flat_index(idx, shape),
                               self.element(final, idx))
            finally:
                del self.overrides[anchor_out]
        # Build the epilogue for one scalar lane, then vectorize it along the last index; the
        # anchor's value enters as a placeholder that becomes the vector ``value``.
        acc = self.fresh("acc_lane", value.dtype)
        self.overrides[anchor_out] = lambda _idx: acc
        try:
            lane = self.fresh("lane")
            lidx = list(idx[:-1]) + [lane]
            vec = vectorize_expr(self.element(final, lidx), lane, value.lanes, [acc.name],
                                 self.tuning)
        finally:
            del self.overrides[anchor_out]
        store = K.Store(buffer_name(final), flat_index(lidx, shape), vec)
        col = idx[-1]

        def fill(e: Expr) -> Expr | None:
            if isinstance(e, Var) and e.name == lane.name:
                return col
            if isinstance(e, Var) and e.name == acc.name:
                return value
            return None

        return K.map_stmts([store], fill)[0]

    def constant_value(self, value: str) -> np.ndarray | None:
        return self.graph.constants.get(value)

    # ---- elements ----------------------------------------------------------------------------
    def is_inline(self, value: str) -> bool:
        """Whether ``value`` is computed inside this kernel rather than read from memory."""
        node = self.producers.get(value)
        return value in self.overrides or (node is not None and node.name in self.inline)

    def stored_view(self, value: str) -> str | None:
        """The value read from memory whose buffer holds ``value`` in ``value``'s own row-major
        layout: ``value`` itself when it is stored, the input of the reshapes it is inlined
        through otherwise (a reshape moves no data); None when the kernel computes it."""
        while value not in self.overrides:
            node = self.producers.get(value)
            if node is None or node.name not in self.inline:
                return value
            if node.op != "reshape":
                return None
            value = node.inputs[0]
        return None

    def load(self, value: str, flat: Expr) -> Expr:
        return K.Load(self.buffer(value), simplify(flat), self.dtype(value))

    def element(self, value: str, idx: Sequence[Expr]) -> Expr:
        """The element of ``value`` at ``idx`` (one expression per dimension)."""
        if value in self.overrides:
            return self.overrides[value](idx)
        node = self.producers.get(value)
        if node is None or node.name not in self.inline:
            return self.load(value, flat_index(idx, self.shape(value)))
        rule = ELEMENT_RULES.get(node.op)
        if rule is None:
            raise KilnError(f"lowering: no element rule for {node.op}", node=node.name,
                            op=node.op)
        return rule(self, node, value, list(idx))

    def element_flat(self, value: str, flat: Expr) -> Expr:
        """The element of ``value`` at a flat index (loads it directly when stored)."""
        node = self.producers.get(value)
        if value not in self.overrides and (node is None or node.name not in self.inline):
            return self.load(value, flat)
        return self.element(value, unflatten(flat, self.shape(value)))

    def broadcast_index(self, value: str, idx: Sequence[Expr]) -> list[Expr]:
        """The index into ``value`` that broadcasting maps the output index ``idx`` to."""
        shape = self.shape(value)
        lead = len(idx) - len(shape)
        return [Const(0, INDEX) if d == 1 else idx[lead + k] for k, d in enumerate(shape)]

    def operand(self, node: Node, k: int, idx: Sequence[Expr]) -> Expr:
        """Operand ``k`` of an elementwise node at output index ``idx``, with broadcasting."""
        v = node.inputs[k]
        return self.element(v, self.broadcast_index(v, idx))


def loop_nest(low: Lowering, shape: Sequence[int], body: Callable[[list[Expr]], list],
              kinds: Sequence[str] | None = None) -> list:
    """Loops over ``shape`` (outermost first) around ``body(index)``."""
    vars_ = [low.fresh("i") for _ in shape]
    stmts = body(list(vars_))
    kinds = list(kinds or ["serial"] * len(shape))
    for v, n, kind in reversed(list(zip(vars_, shape, kinds))):
        stmts = [K.For(v, Const(0, INDEX), Const(int(n), INDEX), tuple(stmts), kind)]
    return stmts


def default_kinds(shape: Sequence[int], innermost_vector: bool = True,
                  parallel_min: int = 1 << 16) -> list[str]:
    """Loop kinds for a nest over ``shape``: outermost parallel when there is enough work,
    innermost vectorized."""
    kinds = ["serial"] * len(shape)
    if not shape:
        return kinds
    if innermost_vector and shape[-1] > 1:
        kinds[-1] = "vectorized"
    if math.prod(shape) >= parallel_min and shape[0] > 1:
        kinds[0] = "parallel" if kinds[0] == "serial" else kinds[0]
    return kinds


def f32(v: float, dtype: str = "f32") -> Expr:
    return Const(float(v), dtype)


ElementRule = Callable[[Lowering, Node, str, list], Expr]
ELEMENT_RULES: dict[str, ElementRule] = {}


def element_rule(*ops: str):
    """Register the index rule of ops inlined into kernels."""

    def deco(fn: ElementRule) -> ElementRule:
        for op in ops:
            ELEMENT_RULES[op] = fn
        return fn

    return deco


def const_scalar(v, dtype: str) -> Expr:
    return Const(bool(v) if dtype == "bool" else (int(v) if dtype in ("i8", "u8", "i32", "i64")
                                                 else float(v)), dtype)


def clamp_index(e: Expr, size: int) -> Expr:
    """``e`` clamped into [0, size) so a load guarded by a select never leaves its buffer."""
    return K.minimum(K.maximum(e, as_expr(0)), as_expr(size - 1))
