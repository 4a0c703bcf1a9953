"""graph_to_module and run_torch: parameters, buffers, names, outputs, gradients, errors.

(Per-op numerics live in test_ops.py.)
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln.interop.to_torch as to_torch
from kiln.interop.to_torch import graph_to_module, run_torch
from kiln.ir import GraphBuilder, KilnError, TensorType, UnsupportedOpError


def mlp():
    """relu(linear(x, w, b)), plus an i64 and a bool output computed from constants."""
    b = GraphBuilder("tiny.mlp")
    x = b.input("x.0", TensorType((2, 3)))
    w = b.constant(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "fc.weight")
    bias = b.constant(np.array([0.5, -0.5, 1.0, 0.0], np.float32), "fc.bias")
    steps = b.constant(np.array([1, 2, 3, 4], np.int64), "steps")
    mask = b.constant(np.array([True, False, True, True]), "mask")
    h = b.op("relu", [b.op("linear", [x, w, bias])])
    b.output(h, b.op("add", [steps, steps]), b.op("logical_not", [mask]))
    return b.build()


def test_constants_become_parameters_and_buffers():
    module = graph_to_module(mlp())
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    assert set(params) == {"fc_weight", "fc_bias"}
    assert set(buffers) == {"steps", "mask"}
    assert all(p.requires_grad for p in params.values())
    assert buffers["steps"].dtype == torch.int64 and buffers["mask"].dtype == torch.bool
    assert module.meta["kiln_constants"] == {"fc.weight": "fc_weight", "fc.bias": "fc_bias",
                                             "steps": "steps", "mask": "mask"}
    np.testing.assert_array_equal(params["fc_weight"].detach().numpy(),
                                  mlp().constants["fc.weight"])


def test_frozen_module():
    module = graph_to_module(mlp(), trainable=False)
    assert not any(p.requires_grad for p in module.parameters())


def test_parameters_do_not_alias_graph_constants():
    g = mlp()
    module = graph_to_module(g)
    with torch.no_grad():
        module.fc_weight.add_(1.0)
    assert g.constants["fc.weight"][0, 0] == 0.0


def test_gradients_flow_to_parameters():
    g = mlp()
    module = graph_to_module(g)
    x = torch.randn(2, 3)
    out, _, _ = module(x)
    out.sum().backward()
    w = torch.tensor(g.constants["fc.weight"], requires_grad=True)
    b = torch.tensor(g.constants["fc.bias"], requires_grad=True)
    torch.relu(torch.nn.functional.linear(x, w, b)).sum().backward()
    torch.testing.assert_close(module.fc_weight.grad, w.grad)
    torch.testing.assert_close(module.fc_bias.grad, b.grad)


def test_outputs_single_tensor_or_tuple():
    g = mlp()
    out = graph_to_module(g)(torch.ones(2, 3))
    assert isinstance(out, tuple) and len(out) == 3
    g.outputs = g.outputs[:1]
    assert isinstance(graph_to_module(g)(torch.ones(2, 3)), torch.Tensor)


def test_outputs_may_be_inputs_or_constants():
    g = mlp()
    g.outputs = ["x.0", "fc.bias", g.outputs[0]]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    got = run_torch(g, [x])
    np.testing.assert_array_equal(got[0], x)
    np.testing.assert_array_equal(got[1], g.constants["fc.bias"])


def test_names_are_sanitized_and_unique():
    b = GraphBuilder("1 weird-name")
    ins = [b.input(n, TensorType((2,))) for n in ("class", "a.b", "a_b", "self")]
    consts = [b.constant(np.ones(2, np.float32), n)
              for n in ("forward", "training", "0.w", "a.b", "lambda")]
    total = ins[0]
    for v in ins[1:] + consts:
        total = b.op("add", [total, v])
    b.output(total)
    g = b.build()
    module = graph_to_module(g)
    attrs = set(module.meta["kiln_constants"].values())
    assert len(attrs) == len(consts)
    assert all(a.isidentifier() for a in attrs)
    assert {"forward", "training"}.isdisjoint(attrs)
    assert module.training is True and callable(module.forward)
    args = [np.full(2, k, np.float32) for k in range(4)]
    np.testing.assert_array_equal(run_torch(g, args)[0], np.full(2, 6 + 5, np.float32))


def test_split_outputs_become_getitems():
    b = GraphBuilder()
    x = b.input("x", TensorType((5, 2)))
    first, rest = b.op_multi("split", [x], {"axis": 0, "sizes": [2, 3]})
    b.output(rest, first)
    module = graph_to_module(b.build())
    x = torch.arange(10.0).reshape(5, 2)
    rest_t, first_t = module(x)
    torch.testing.assert_close(first_t, x[:2])
    torch.testing.assert_close(rest_t, x[2:])
    # fx values are named after kiln's: %split -> split, %split.1 -> split_1.
    assert "split = split_outputs[0]" in module.code
    assert "split_1 = split_outputs[1]" in module.code


def test_module_is_copyable_and_keeps_a_state_dict():
    module = graph_to_module(mlp())
    clone = copy.deepcopy(module)
    x = torch.randn(2, 3)
    torch.testing.assert_close(clone(x)[0], module(x)[0])
    assert set(module.state_dict()) == {"fc_weight", "fc_bias", "steps", "mask"}


def test_run_torch_checks_inputs():
    with pytest.raises(KilnError, match="expects f32"):
        run_torch(mlp(), [np.zeros((3, 2), np.float32)])
    with pytest.raises(KilnError, match="takes 1 inputs"):
        run_torch(mlp(), [])


def test_run_torch_returns_fresh_writable_arrays():
    b = GraphBuilder()
    x = b.input("x", TensorType((3,)))
    b.output(b.op("expand", [x], {"shape": [2, 3]}))
    x_val = np.arange(3, dtype=np.float32)
    (out,) = run_torch(b.build(), [x_val])
    out[0, 0] = 7.0
    assert x_val[0] == 0.0 and out[1, 0] == 0.0


def test_unsupported_rank_raises_unsupported_op():
    b = GraphBuilder()
    x = b.input("x", TensorType((1, 1, 2, 2, 2, 2)))
    w = b.constant(np.ones((1, 1, 1, 1, 1, 1), np.float32))
    b.output(b.op("conv", [x, w]))
    with pytest.raises(UnsupportedOpError, match="4-d conv"):
        run_torch(b.build(), [np.ones((1, 1, 2, 2, 2, 2), np.float32)])


def test_to_torch_imports_only_the_ir_and_the_reference_backend():
    tree = ast.parse(Path(to_torch.__file__).read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for a in node.names}
    kiln_modules = {m for m in modules if m.startswith("kiln")}
    assert kiln_modules <= {"kiln.ir", "kiln.backends.reference"}
