"""The one-kernel lowering of lstm_seq and gru_seq (passes/lower/recurrent.py): the kernel's
shape (a serial step loop, a vectorized recurrent product, no per-step kernels), the kernel
interpreter and LLVM against the NumPy reference, the ONNX export against ONNX Runtime, and
a torch LSTM / GRU compiling to one recurrent kernel per direction of a layer."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kiln.backends.llvm import compile_graph
from kiln.backends.reference import run_graph
from kiln.interop.to_onnx import graph_to_onnx
from kiln.ir import GraphBuilder, TensorType
from kiln.ir import kernel as K
from kiln.passes.lower import lower_graph, run_lowered

GATES = {"lstm_seq": "ifgo", "gru_seq": "zrn"}


def recurrent_graph(op: str, steps: int = 6, batch: int = 2, hidden: int = 9,
                    reverse: bool = False, const_weight: bool = True):
    """A one-node graph of ``op`` and its input arrays (the weight a constant or an input)."""
    rng = np.random.default_rng(3)
    g = 4 if op == "lstm_seq" else 3
    xproj = rng.standard_normal((steps, batch, g * hidden)).astype(np.float32)
    w = (rng.standard_normal((g * hidden, hidden)) * 0.4).astype(np.float32)
    h0 = rng.standard_normal((1, batch, hidden)).astype(np.float32)
    second = (rng.standard_normal((1, batch, hidden)) if op == "lstm_seq"
              else rng.standard_normal(g * hidden)).astype(np.float32)
    b = GraphBuilder(op)
    arrays = [xproj]
    names = [b.input("xproj", TensorType.of(xproj))]
    if const_weight:
        names.append(b.constant(w, "w_hh"))
    else:
        names.append(b.input("w_hh", TensorType.of(w)))
        arrays.append(w)
    rest = [("h0", h0), ("c0", second)] if op == "lstm_seq" else [("b_hh", second), ("h0", h0)]
    for name, a in rest:
        names.append(b.input(name, TensorType.of(a)))
        arrays.append(a)
    b.output(b.op(op, names, {"gates": GATES[op], "reverse": reverse}))
    return b.build(), arrays


@pytest.mark.parametrize("op", ["lstm_seq", "gru_seq"])
def test_one_kernel_with_a_serial_step_loop(op):
    g, _ = recurrent_graph(op)
    lowered = lower_graph(g, width=8)
    assert len(lowered.steps) == 1
    kernel = lowered.steps[0].kernel
    steps = [s for s in kernel.body if isinstance(s, K.For) and s.extent == K.Const(6, K.INDEX)]
    assert len(steps) == 1 and steps[0].kind == "serial"
    kinds = [s.kind for s in K.walk_stmts(steps[0].body) if isinstance(s, K.For)]
    assert kinds.count("vectorized") == 2  # the product's dot and the gate update
    assert lowered.steps[0].temps  # the states live in workspaces


@pytest.mark.parametrize("op", ["lstm_seq", "gru_seq"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("const_weight", [True, False])
def test_interpreter_and_llvm_match_the_reference(op, reverse, const_weight):
    g, arrays = recurrent_graph(op, reverse=reverse, const_weight=const_weight)
    want = run_graph(g, arrays)[0]
    np.testing.assert_allclose(run_lowered(lower_graph(g), arrays)[0], want,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(compile_graph(g, cache=False)(arrays)[0], want,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["lstm_seq", "gru_seq"])
@pytest.mark.parametrize("const_weight", [True, False])
def test_onnx_export_matches_the_reference(op, const_weight):
    g, arrays = recurrent_graph(op, reverse=True, const_weight=const_weight)
    model = graph_to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: a for i, a in zip(model.graph.input, arrays)})[0]
    np.testing.assert_allclose(got, run_graph(g, arrays)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls, op", [(torch.nn.LSTM, "lstm_seq"), (torch.nn.GRU, "gru_seq")])
def test_torch_layers_become_one_recurrent_kernel_per_direction(cls, op):
    import kiln

    torch.manual_seed(0)
    model = cls(5, 7, num_layers=2, bidirectional=True).eval()
    x = torch.randn(9, 2, 5)
    compiled = kiln.compile(model, (x,), backend="llvm")
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(model(x))
    got = torch.utils._pytree.tree_leaves(compiled(x))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(torch.as_tensor(np.asarray(a)), b, rtol=1e-4, atol=1e-5)
    ops = [n.op for n in compiled.graph.nodes]
    assert ops.count(op) == 4 and "sigmoid" not in ops
