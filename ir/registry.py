"""The op registry: every op is declared once with its schema, type rule, NumPy reference and
cost, and a composite op with its decomposition (kiln.ir.decompose), from which its reference,
its lowering and its ONNX export all follow. Lowerings, fusion classes and importance rules are
other tables keyed by op name; CONTRIBUTING.md lists them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.ir.errors import KilnError, ShapeError, UnsupportedOpError
from kiln.ir.graph import Graph, Node, freeze_attr
from kiln.ir.types import TensorType

REQUIRED = object()
"""Marks an attribute that has no default."""

InferFn = Callable[[Sequence[TensorType], dict], list[TensorType]]
ReferenceFn = Callable[..., Any]
CostFn = Callable[[Sequence[TensorType], Sequence[TensorType], dict], int]
DecompositionFn = Callable[..., Any]


def elementwise_flops(ins: Sequence[TensorType], outs: Sequence[TensorType], attrs: dict) -> int:
    """One operation per output element."""
    return sum(o.numel for o in outs)


def no_flops(ins: Sequence[TensorType], outs: Sequence[TensorType], attrs: dict) -> int:
    return 0


@dataclass(frozen=True)
class OpDef:
    """The declaration of one op.

    ``inputs`` names the operands; a trailing ``?`` marks an optional operand (optional operands
    come last and are simply left out). ``variadic`` ops take any number (>= 1) of operands.
    ``kind`` is the op's class: elementwise, reduction, dense, norm, pool, shape, data.
    ``reference`` gets NumPy arrays and the attributes as keyword arguments and returns an array
    (or a tuple of arrays for multi-output ops).
    ``decomposition``, for a composite op, computes it from other ops: it gets ``Term``s and the
    attributes as keyword arguments (see kiln.ir.decompose). ``decomposition_cases`` are the
    attributes to evaluate it under when no node gives them, one per formula (gelu's erf and
    tanh forms), required attributes set: fusion bounds the operand uses of each, and the op
    checklist test exports each.
    """

    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any]
    infer: InferFn
    reference: ReferenceFn
    kind: str
    description: str
    flops: CostFn = elementwise_flops
    variadic: bool = False
    decomposition: DecompositionFn | None = None
    decomposition_cases: tuple[dict[str, Any], ...] = ({},)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def min_inputs(self) -> int:
        return sum(1 for i in self.inputs if not i.endswith("?")) if not self.variadic else 1

    @property
    def max_inputs(self) -> int | None:
        return None if self.variadic else len(self.inputs)

    def bytes_moved(self, ins: Sequence[TensorType], outs: Sequence[TensorType]) -> int:
        """Bytes read and written if every operand is touched once."""
        return sum(t.nbytes for t in ins) + sum(t.nbytes for t in outs)

    def normalize_attrs(self, attrs: dict | None, *, node: str | None = None) -> dict:
        """Fill defaults, reject unknown or missing attributes, freeze lists into tuples."""
        attrs = dict(attrs or {})
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise KilnError(
                f"unknown attribute(s) {sorted(unknown)} for op {self.name}",
                node=node,
                op=self.name,
                hint=f"{self.name} takes {sorted(self.attrs)}",
            )
        out = {}
        for key, default in self.attrs.items():
            if key in attrs:
                out[key] = freeze_attr(attrs[key])
            elif default is REQUIRED:
                raise KilnError(f"missing attribute {key!r}", node=node, op=self.name)
            else:
                out[key] = default
        return out

    def check_arity(self, n: int, *, node: str | None = None) -> None:
        hi = self.max_inputs
        if n < self.min_inputs or (hi is not None and n > hi):
            want = f"{self.min_inputs}..{hi}" if hi != self.min_inputs else str(hi)
            raise ShapeError(
                f"{self.name} takes {want} operands ({', '.join(self.inputs)}), got {n}",
                node=node,
                op=self.name,
            )


REGISTRY: dict[str, OpDef] = {}


def register(
    name: str,
    inputs: Sequence[str],
    *,
    infer: InferFn,
    kind: str,
    description: str,
    reference: ReferenceFn | None = None,
    decomposition: DecompositionFn | None = None,
    decomposition_cases: Sequence[dict[str, Any]] = ({},),
    attrs: dict[str, Any] | None = None,
    flops: CostFn = elementwise_flops,
    variadic: bool = False,
    **extra: Any,
) -> OpDef:
    """Declare an op. Each op is registered exactly once.

    An op gives its NumPy ``reference``, or a ``decomposition`` from which its reference is
    made (kiln.ir.decompose.decomposed_reference); a composite op with a reference of its own
    would have its formula written twice.
    """
    if name in REGISTRY:
        raise KilnError(f"op {name} is registered twice")
    if (reference is None) == (decomposition is None):
        raise KilnError(f"op {name} must declare exactly one of reference and decomposition")
    if reference is None:
        from kiln.ir.decompose import decomposed_reference  # it imports this module

        reference = decomposed_reference(name)
    op = OpDef(
        name=name,
        inputs=tuple(inputs),
        attrs={k: (freeze_attr(v) if v is not REQUIRED else v) for k, v in (attrs or {}).items()},
        infer=infer,
        reference=reference,
        kind=kind,
        description=description,
        flops=flops,
        variadic=variadic,
        decomposition=decomposition,
        decomposition_cases=tuple(dict(c) for c in decomposition_cases),
        extra=dict(extra),
    )
    REGISTRY[name] = op
    return op


def get_op(name: str) -> OpDef:
    """The declaration of ``name``; an UnsupportedOpError if kiln has no such op."""
    _ensure_loaded()
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnsupportedOpError(f"kiln has no op named {name!r}", op=name) from None


def all_ops() -> dict[str, OpDef]:
    """Every registered op by name."""
    _ensure_loaded()
    return dict(REGISTRY)


def infer_types(op: str, in_types: Sequence[TensorType], attrs: dict, *,
                node: str | None = None) -> list[TensorType]:
    """Apply the op's type rule, turning a rule's complaint into a ShapeError naming the node."""
    opdef = get_op(op)
    opdef.check_arity(len(in_types), node=node)
    try:
        return list(opdef.infer(list(in_types), attrs))
    except KilnError as e:
        if e.node is None:
            e.node = node
            e.op = op
            e.args = (e._format(),)
        raise


def run_reference(op: str, arrays: Sequence[np.ndarray], attrs: dict) -> list[np.ndarray]:
    """Run the op's NumPy reference; always returns a list of outputs."""
    result = get_op(op).reference(*arrays, **attrs)
    if isinstance(result, tuple):
        return [np.asarray(r) for r in result]
    return [np.asarray(result)]


def node_flops(node: Node, types: Mapping[str, TensorType]) -> int:
    """The FLOPs of one node by its op's declared cost, with value types from ``types``."""
    return int(get_op(node.op).flops([types[i] for i in node.inputs],
                                     [types[o] for o in node.outputs], dict(node.attrs)))


def graph_flops(graph: Graph, types: Mapping[str, TensorType] | None = None) -> int:
    """The FLOPs of one run of ``graph``: every node's declared cost, summed (``types``
    overrides the graph's value types)."""
    types = graph.types if types is None else types
    return sum(node_flops(n, types) for n in graph.nodes)


def _ensure_loaded() -> None:
    # The op declarations live in kiln.ir.ops; importing it registers them.
    import kiln.ir.ops  # noqa: F401
