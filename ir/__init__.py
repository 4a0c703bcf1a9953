"""kiln's graph IR: types, graph, op registry, text form, verifier."""

from kiln.ir.builder import GraphBuilder
from kiln.ir.errors import (
    InternalError,
    KilnError,
    NumericsError,
    ParseError,
    ShapeError,
    UnsupportedOpError,
    VerificationError,
)
from kiln.ir.graph import Graph, Node
from kiln.ir.registry import (
    OpDef,
    all_ops,
    get_op,
    graph_flops,
    infer_types,
    node_flops,
    run_reference,
)
from kiln.ir.sizes import SymDim
from kiln.ir.symbolic import bind_sizes, specialize
from kiln.ir.text import parse_graph, print_graph
from kiln.ir.types import DType, TensorType
from kiln.ir.verify import verify

__all__ = [
    "DType", "Graph", "GraphBuilder", "InternalError", "KilnError", "Node", "NumericsError",
    "OpDef", "ParseError", "ShapeError", "SymDim", "TensorType", "UnsupportedOpError",
    "VerificationError", "all_ops", "bind_sizes", "get_op", "graph_flops", "infer_types",
    "node_flops", "parse_graph", "print_graph", "run_reference", "specialize", "verify",
]
