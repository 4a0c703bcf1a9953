"""The verifier: SSA, topological order, known ops, operand counts and types."""

from __future__ import annotations

from kiln.ir.errors import KilnError, VerificationError
from kiln.ir.graph import Graph
from kiln.ir.registry import get_op, infer_types
from kiln.ir.sizes import SymDim
from kiln.ir.types import TensorType


def _check_sizes(g: Graph, where: str, value, node: str | None = None,
                 op: str | None = None) -> None:
    """Every size a type or attribute uses is declared by the graph, with the same bounds."""
    dims = value.shape if isinstance(value, TensorType) else _attr_dims(value)
    for d in dims:
        if not isinstance(d, SymDim):
            continue
        for name, bounds in d.bounds.items():
            if name not in g.sizes:
                raise VerificationError(f"{where} uses size {name}, which the graph does not "
                                        "declare", node=node, op=op,
                                        hint="declare it in Graph.sizes ('size NAME in LO..HI')")
            if tuple(g.sizes[name]) != tuple(bounds):
                raise VerificationError(f"{where} uses size {name} with bounds {list(bounds)}; "
                                        f"the graph declares {list(g.sizes[name])}",
                                        node=node, op=op)


def _attr_dims(value) -> list:
    if isinstance(value, (tuple, list)):
        return [d for v in value for d in _attr_dims(v)]
    return [value] if isinstance(value, SymDim) else []


def verify(g: Graph) -> None:
    """Raise VerificationError naming the first node that breaks an invariant."""
    defined: set[str] = set()
    for name, (lo, hi) in g.sizes.items():
        if not (isinstance(name, str) and name.isidentifier() and 1 <= lo <= hi):
            raise VerificationError(f"size {name!r} has bounds [{lo}, {hi}]",
                                    hint="a size is named by an identifier, 1 <= min <= max")
    for name, t in g.types.items():
        _check_sizes(g, f"value %{name}", t)

    def define(name: str, what: str, node: str | None = None) -> None:
        if name in defined:
            raise VerificationError(f"value %{name} is defined twice ({what})", node=node)
        if name not in g.types:
            raise VerificationError(f"value %{name} has no type", node=node)
        defined.add(name)

    for name in g.inputs:
        define(name, "graph input")
    for name, arr in g.constants.items():
        define(name, "constant")
        if TensorType.of(arr) != g.types[name]:
            raise VerificationError(f"constant %{name} holds {TensorType.of(arr)} but is typed "
                                    f"{g.types[name]}")
    for n in g.nodes:
        for i in n.inputs:
            if i not in defined:
                raise VerificationError(
                    f"operand %{i} is used before it is defined", node=n.name, op=n.op,
                    source=n.source)
        opdef = get_op(n.op)
        try:
            attrs = opdef.normalize_attrs(n.attrs, node=n.name)
        except KilnError as e:
            raise VerificationError(e.message, node=n.name, op=n.op, source=n.source,
                                    hint=e.hint) from None
        for key, value in attrs.items():
            _check_sizes(g, f"attribute {key}", value, node=n.name, op=n.op)
        if attrs != dict(n.attrs):
            raise VerificationError(f"attributes {dict(n.attrs)} are not normalized "
                                    f"(expected {attrs})", node=n.name, op=n.op)
        try:
            expected = infer_types(n.op, [g.types[i] for i in n.inputs], attrs, node=n.name)
        except KilnError as e:
            raise VerificationError(f"type rule fails: {e.message}", node=n.name, op=n.op,
                                    source=n.source) from None
        if len(expected) != len(n.outputs):
            raise VerificationError(f"{n.op} makes {len(expected)} outputs, node has "
                                    f"{len(n.outputs)}", node=n.name, op=n.op)
        for out, t in zip(n.outputs, expected):
            define(out, "node output", n.name)
            if g.types[out] != t:
                raise VerificationError(f"output %{out} is typed {g.types[out]} but {n.op} "
                                        f"makes {t}", node=n.name, op=n.op, source=n.source)
    for o in g.outputs:
        if o not in defined:
            raise VerificationError(f"graph output %{o} is never defined")
    extra = set(g.types) - defined
    if extra:
        raise VerificationError(f"types recorded for values that do not exist: {sorted(extra)}")
