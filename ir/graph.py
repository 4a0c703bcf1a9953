"""The graph IR: SSA values named by strings, nodes in topological order, NumPy constants.

Nodes are immutable; a pass builds a new Graph (``Graph.copy`` is cheap: lists and dicts are
new, nodes and constant arrays are shared and never written to).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kiln.ir.errors import KilnError
from kiln.ir.types import TensorType


def freeze_attr(value: Any) -> Any:
    """Attribute values are ints, floats, bools, strings, None or tuples of those."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze_attr(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass(frozen=True)
class Node:
    """One operation: ``outputs = op(inputs) {attrs}``; ``source`` is the user's source line."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "attrs", {k: freeze_attr(v) for k, v in self.attrs.items()})
        # One line, no surrounding blanks: the text form prints it after '#' and reads it back.
        source = (self.source or "").replace("\r", " ").replace("\n", " ").strip()
        object.__setattr__(self, "source", source or None)

    @property
    def name(self) -> str:
        """A node is named after its first output."""
        return self.outputs[0]

    def with_(self, **changes: Any) -> Node:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    def attr_key(self) -> tuple:
        """A hashable form of the attributes (for CSE and comparisons)."""
        return tuple(sorted(self.attrs.items()))


class Graph:
    """A dataflow graph: inputs, nodes in topological order, outputs, types and constants."""

    def __init__(
        self,
        name: str = "graph",
        inputs: Iterable[str] = (),
        outputs: Iterable[str] = (),
        nodes: Iterable[Node] = (),
        types: Mapping[str, TensorType] | None = None,
        constants: Mapping[str, np.ndarray] | None = None,
        sizes: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        self.name = name
        self.inputs: list[str] = list(inputs)
        self.outputs: list[str] = list(outputs)
        self.nodes: list[Node] = list(nodes)
        self.types: dict[str, TensorType] = dict(types or {})
        self.constants: dict[str, np.ndarray] = dict(constants or {})
        # The named sizes its types may use, with their bounds (kiln.ir.sizes): {"batch": (1,
        # 4096)}. Empty for a static graph, whose every dimension is a number.
        self.sizes: dict[str, tuple[int, int]] = {
            k: (int(lo), int(hi)) for k, (lo, hi) in (sizes or {}).items()}

    def copy(self) -> Graph:
        """A new graph sharing the immutable nodes and the (read-only) constant arrays."""
        return Graph(self.name, self.inputs, self.outputs, self.nodes, self.types, self.constants,
                     self.sizes)

    @property
    def is_static(self) -> bool:
        """Whether every type holds numbers only (no named sizes)."""
        return not self.sizes and all(t.is_static for t in self.types.values())

    # ---- queries -------------------------------------------------------------------------
    def type_of(self, value: str) -> TensorType:
        try:
            return self.types[value]
        except KeyError:
            raise KilnError(f"value %{value} has no type in graph {self.name}") from None

    def is_constant(self, value: str) -> bool:
        return value in self.constants

    def producers(self) -> dict[str, Node]:
        """Map from each node output to the node that makes it."""
        return {out: n for n in self.nodes for out in n.outputs}

    def users(self) -> dict[str, list[Node]]:
        """Map from each value to the nodes that read it, in graph order."""
        result: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in dict.fromkeys(n.inputs):
                result.setdefault(i, []).append(n)
        return result

    def values(self) -> list[str]:
        """Every value: inputs, constants, then node outputs in order."""
        out = list(self.inputs) + list(self.constants)
        for n in self.nodes:
            out.extend(n.outputs)
        return out

    def fresh_name(self, hint: str = "v") -> str:
        """A value name not used in this graph."""
        hint = sanitize_name(hint)
        # Look the names up where they live: a set of all of them per call made building an
        # n-node graph cost n^2.
        if hint not in self.types and hint not in self.constants:
            return hint
        for i in itertools.count(1):
            cand = f"{hint}_{i}"
            if cand not in self.types and cand not in self.constants:
                return cand
        raise AssertionError("unreachable")

    def add_constant(self, array: np.ndarray, hint: str = "const") -> str:
        """Add a constant (frozen: never written again) and return its value name."""
        name = self.fresh_name(hint)
        arr = np.array(array, order="C", copy=True)
        arr.setflags(write=False)
        self.constants[name] = arr
        self.types[name] = TensorType.of(arr)
        return name

    def num_parameters(self) -> int:
        """Number of elements held in constants."""
        return int(sum(a.size for a in self.constants.values()))

    def __repr__(self) -> str:
        return (
            f"<Graph {self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes, "
            f"{len(self.constants)} constants>"
        )

    def __str__(self) -> str:
        from kiln.ir.text import print_graph

        return print_graph(self)


_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


def sanitize_name(name: str) -> str:
    """A value name that the text form can print and parse: letters, digits, '_' and '.'."""
    cleaned = "".join(c if c in _NAME_OK else "_" for c in name) or "v"
    return cleaned
