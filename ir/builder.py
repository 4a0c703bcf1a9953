"""GraphBuilder: adds nodes with their types inferred by the op registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.ir.graph import Graph, Node
from kiln.ir.registry import get_op, infer_types
from kiln.ir.types import TensorType
from kiln.ir.verify import verify


class GraphBuilder:
    """Builds a Graph node by node. Extends a copy of ``base`` when one is given."""

    def __init__(self, name: str = "graph", base: Graph | None = None) -> None:
        self.graph = base.copy() if base is not None else Graph(name)
        if base is not None:
            self.graph.nodes = []

    def input(self, name: str, t: TensorType) -> str:
        """Declare a graph input."""
        name = self.graph.fresh_name(name)
        self.graph.inputs.append(name)
        self.graph.types[name] = t
        return name

    def constant(self, array: np.ndarray, hint: str = "const") -> str:
        """Add a constant; returns its value name."""
        return self.graph.add_constant(array, hint)

    def type_of(self, value: str) -> TensorType:
        return self.graph.type_of(value)

    def op(self, op: str, inputs: Sequence[str], attrs: dict[str, Any] | None = None, *,
           name: str | None = None, source: str | None = None) -> str:
        """Add a single-output node and return its output value name."""
        outs = self.op_multi(op, inputs, attrs, name=name, source=source)
        assert len(outs) == 1, f"{op} has {len(outs)} outputs; use op_multi"
        return outs[0]

    def op_multi(self, op: str, inputs: Sequence[str], attrs: dict[str, Any] | None = None, *,
                 name: str | None = None, source: str | None = None) -> list[str]:
        """Add a node and return all its output value names."""
        opdef = get_op(op)
        hint = name or op
        attrs = opdef.normalize_attrs(attrs, node=hint)
        types = infer_types(op, [self.graph.type_of(i) for i in inputs], attrs, node=hint)
        outs = []
        for k, t in enumerate(types):
            out = self.graph.fresh_name(hint if k == 0 else f"{hint}.{k}")
            self.graph.types[out] = t
            outs.append(out)
        self.graph.nodes.append(Node(op, tuple(inputs), tuple(outs), attrs, source))
        return outs

    def add_node(self, node: Node, types: Sequence[TensorType]) -> None:
        """Append an already-built node with its output types."""
        for out, t in zip(node.outputs, types):
            self.graph.types[out] = t
        self.graph.nodes.append(node)

    def output(self, *values: str) -> None:
        self.graph.outputs.extend(values)

    def build(self, check: bool = True) -> Graph:
        """The finished graph (stale types pruned), verified unless ``check`` is False."""
        g = self.graph
        defined = set(g.inputs) | set(g.constants) | {o for n in g.nodes for o in n.outputs}
        g.types = {k: v for k, v in g.types.items() if k in defined}
        if check:
            verify(g)
        return g
