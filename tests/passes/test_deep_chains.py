"""Long elementwise chains: the compile path (import, O1, fusion, lowering, kernel passes,
memory plan, LLVM codegen, the reference backend) holds no recursion as deep as the graph, and
fusion bounds the expressions of the kernels it makes.

Every test runs under Python's default recursion limit (checked, never changed)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import kiln
from kiln.backends.llvm import compile_graph as compile_llvm
from kiln.backends.reference import compile_graph as compile_reference
from kiln.backends.reference import run_graph
from kiln.ir import GraphBuilder, TensorType, parse_graph, print_graph, verify
from kiln.ir import kernel as K
from kiln.passes import (
    CommonSubexpressionElimination,
    DeadCodeElimination,
    FoldConstants,
    PassManager,
    SimplifyAlgebra,
    Verify,
    get_pipeline,
)
from kiln.passes.fusion import MAX_FUSED_OPS, OPERAND_REPEATS, plan_fusion
from kiln.passes.lower import lower_graph
from kiln.passes.lower.elementwise import UNARY, unary_math


@pytest.fixture(autouse=True)
def default_recursion_limit(monkeypatch):
    """The fixes are not a raised limit: every test here sees Python's default."""
    assert sys.getrecursionlimit() == 1000
    monkeypatch.setenv("KILN_CACHE", "0")  # compile for real, every time


class TorchChain(torch.nn.Module):
    """``n`` chained elementwise ops with constants (about 360 were enough to overflow the
    stack while lowering)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n):
            k = i % 8
            if k == 0:
                x = x + 0.5
            elif k == 1:
                x = x * 0.75
            elif k == 2:
                x = torch.relu(x)
            elif k == 3:
                x = torch.sigmoid(x)
            elif k == 4:
                x = torch.tanh(x) - 0.25
            elif k == 5:
                x = 2.0 * x
            elif k == 6:
                x = torch.clamp(x, -1.5, 1.5)
            else:
                x = -x
        return x


def test_torch_chain_of_400_elementwise_ops_matches_eager():
    model = TorchChain(400).eval()
    x = torch.randn(3, 37, generator=torch.Generator().manual_seed(0))
    compiled = kiln.compile(model, (x,))
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(np.asarray(compiled(x)), want, rtol=1e-5, atol=1e-6)


# One block of the long chain: x -> |x| - 1, through ops whose results are exact in float32
# for inputs that are multiples of 1/8 (so any backend, FMA contraction or not, gives the same
# bits). Inputs in [-3, 3] reach [-1, 0] within four blocks and then alternate between x and
# -x - 1: the output still depends on the input after 20,000 ops.
_BLOCK = [("abs", None), ("add", 0.125), ("relu", None), ("sub", 1.125), ("neg", None),
          ("mul", -1.0), ("maximum", -8.0), ("minimum", 8.0)]
_NUMPY = {"abs": np.abs, "relu": lambda v: np.maximum(v, np.float32(0)), "neg": np.negative,
          "add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum,
          "minimum": np.minimum}


def _long_chain(n: int, shape=(64,)):
    b = GraphBuilder("long_chain")
    x = b.input("x", TensorType(shape))
    consts = {c: b.constant(np.array(c, np.float32), "c")
              for _, c in _BLOCK if c is not None}
    v = x
    for i in range(n):
        op, c = _BLOCK[i % len(_BLOCK)]
        v = b.op(op, [v] if c is None else [v, consts[c]], name=f"v{i}")
    b.output(v)
    return b.build()


def _numpy_chain(x: np.ndarray, n: int) -> np.ndarray:
    for i in range(n):
        op, c = _BLOCK[i % len(_BLOCK)]
        x = _NUMPY[op](x) if c is None else _NUMPY[op](x, np.float32(c))
    return x.astype(np.float32)


def test_20000_node_chain_compiles_on_llvm_and_reference():
    n = 20_000
    graph = PassManager(get_pipeline("O1"), [Verify()]).run(_long_chain(n))
    x = np.random.default_rng(0).integers(-24, 25, 64).astype(np.float32) / 8
    want = _numpy_chain(x, n)
    assert len(np.unique(want)) > 4  # the output still depends on the input
    np.testing.assert_array_equal(compile_reference(graph)([x])[0], want)
    np.testing.assert_array_equal(compile_llvm(graph, cache=False)([x])[0], want)


def _expr_depth(e: K.Expr) -> int:
    depth, stack = 0, [(e, 1)]
    while stack:
        x, d = stack.pop()
        depth = max(depth, d)
        stack.extend((c, d + 1) for c in K.expr_children(x))
    return depth


def test_fusion_splits_long_chains_into_shallow_kernels():
    graph = _long_chain(1000, (4, 5))
    plan = plan_fusion(graph)
    roots = [n for n, role in plan.roles.items() if role == "root"]
    # Each kernel inlines MAX_FUSED_OPS nodes into its root.
    assert len(roots) == -(-1000 // (MAX_FUSED_OPS + 1))
    assert f"more than {MAX_FUSED_OPS}" in plan.reasons[f"v{MAX_FUSED_OPS}"]
    lowered = lower_graph(graph)
    assert len(lowered.steps) == len(roots)
    depths = [_expr_depth(s.value) for step in lowered.steps
              for s in K.walk_stmts(step.kernel.body) if isinstance(s, K.Store)]
    assert max(depths) <= 2 * MAX_FUSED_OPS
    x = np.random.default_rng(1).integers(-24, 25, (4, 5)).astype(np.float32) / 8
    np.testing.assert_array_equal(run_graph(graph, [x])[0], _numpy_chain(x, 1000))


def test_long_epilogue_is_cut_and_the_rest_fused_after_it():
    b = GraphBuilder("epilogue")
    x = b.input("x", TensorType((2, 8)))
    w = b.constant(np.eye(8, dtype=np.float32), "w")
    half = b.constant(np.array(0.5, np.float32), "half")
    v = b.op("linear", [x, w], name="fc")
    for i in range(100):
        v = b.op("add" if i % 2 else "mul", [v, half], name=f"e{i}")
    b.output(b.op("reduce_sum", [v], {"axes": (1,), "keepdim": False}, name="total"))
    graph = b.build()
    plan = plan_fusion(graph)
    assert [n.name for n in plan.epilogues["fc"]] == [f"e{i}" for i in range(MAX_FUSED_OPS)]
    assert plan.group_outputs["fc"] == [f"e{MAX_FUSED_OPS - 1}"]
    assert "would make the fused expression too large" in plan.reasons["fc"]
    assert plan.roles[f"e{MAX_FUSED_OPS}"] == "root"
    assert plan.roles["e99"] == "inline"  # read by the reduction, as without the cut
    xv = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    want = run_graph(graph, [xv])[0]
    np.testing.assert_allclose(compile_llvm(graph, cache=False)([xv])[0], want, rtol=1e-5)


def _uses_of(x: K.Var, e: K.Expr) -> int:
    return sum(1 for s in K.walk_expr(e) if s == x)


@pytest.mark.parametrize("op", UNARY)
def test_operand_repeats_match_the_lowering(op):
    """Fusion's cost of an op (OPERAND_REPEATS) says how often its expression holds its
    operand."""
    x = K.Var("x", "f32")
    variants = {"clamp": [{"min": -1.0, "max": 1.0}],
                "leaky_relu": [{"negative_slope": 0.1}],
                "gelu": [{"approximate": "none"}, {"approximate": "tanh"}]}
    uses = max(_uses_of(x, unary_math(op, x, attrs)) for attrs in variants.get(op, [{}]))
    assert OPERAND_REPEATS.get(op, 1) == uses


def test_operand_repeats_of_quantize_and_embedding():
    b = GraphBuilder("q")
    x = b.input("x", TensorType((8,)))
    ids = b.input("ids", TensorType((3,), "i64"))
    table = b.constant(np.ones((5, 8), np.float32), "table")
    q = b.op("quantize", [x], {"scale": 0.5, "zero_point": 3, "dtype": "u8"}, name="q")
    e = b.op("embedding", [ids, table], name="e")
    b.output(q, e)
    lowered = lower_graph(b.build())
    operands = {"q": ("quantize", "v_x"), "e": ("embedding", "v_ids")}
    for step in lowered.steps:
        op, operand = operands[step.root]
        store = next(s for s in K.walk_stmts(step.kernel.body) if isinstance(s, K.Store))
        loads = sum(1 for s in K.walk_expr(store.value)
                    if isinstance(s, K.Load) and s.buffer == operand)
        assert OPERAND_REPEATS[op] == loads


def test_silu_chain_no_longer_grows_exponentially():
    """x * sigmoid(x) holds x twice: 16 chained silus made a 2^16-node kernel (46 s)."""
    b = GraphBuilder("silus")
    v = b.input("x", TensorType((4, 9)))
    for i in range(40):
        v = b.op("silu", [v], name=f"s{i}")
    b.output(v)
    graph = b.build()
    lowered = lower_graph(graph)
    sizes = [sum(1 for _ in K.walk_expr(s.value)) for step in lowered.steps
             for s in K.walk_stmts(step.kernel.body) if isinstance(s, K.Store)]
    # A root inlines at most MAX_FUSED_OPS op applications per operand; a silu is 9 nodes.
    assert max(sizes) <= 9 * (2 * MAX_FUSED_OPS + 1)
    xv = np.random.default_rng(3).standard_normal((4, 9)).astype(np.float32)
    np.testing.assert_allclose(compile_llvm(graph, cache=False)([xv])[0],
                               run_graph(graph, [xv])[0], rtol=1e-5, atol=1e-6)


def test_graph_passes_and_text_form_on_a_deep_graph():
    """The verifier, the text form, CSE, DCE, constant folding and algebraic simplification
    walk the nodes in order, with no recursion per node."""
    n = 5000  # five times the recursion limit, in each of four chains
    b = GraphBuilder("deep")
    x = b.input("x", TensorType((4,)))
    one = b.constant(np.array(1.0, np.float32), "one")
    folded = b.constant(np.array([1.0, 2.0, 3.0, 4.0], np.float32), "k")
    a = c = d = x
    for i in range(n):
        a = b.op("add", [a, one], name=f"a{i}")            # stays
        c = b.op("add", [c, one], name=f"c{i}")            # the same as a: CSE merges it
        d = b.op("neg", [d], name=f"d{i}")                 # read by nothing: DCE drops it
        folded = b.op("sub", [folded, one], name=f"k{i}")  # constant: folded
    b.output(a, c, b.op("add", [x, folded], name="f"))
    graph = b.build()
    verify(graph)
    assert print_graph(parse_graph(print_graph(graph), graph.constants)) == print_graph(graph)
    result = PassManager([FoldConstants(), SimplifyAlgebra(), CommonSubexpressionElimination(),
                          DeadCodeElimination()], [Verify()]).run(graph)
    assert sorted(node.name for node in result.nodes if node.name[0] != "a") == ["f"]
    assert len(result.nodes) == n + 1
    xv = np.arange(4, dtype=np.float32)
    got = run_graph(result, [xv])
    np.testing.assert_array_equal(got[0], xv + n)
    np.testing.assert_array_equal(got[1], xv + n)
    np.testing.assert_array_equal(got[2], xv + np.arange(1, 5) - n)
