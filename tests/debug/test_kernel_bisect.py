"""Bisect and minify below the graph: planted bugs in a lowering rule, in the vectorizer's tail
and in the LLVM code generator are each named (kernel, graph nodes, stage) by the kernel
bisection and shrunk to at most 3 graph nodes by minify on the llvm backend."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import kiln.backends.llvm.codegen as llvm_codegen
import kiln.passes.compile as pipeline
import kiln.passes.vectorize as vectorizer
from kiln.debug.cli import main
from kiln.debug.kernels import bisect_kernels, check_kernels, compile_stages, native_runner
from kiln.debug.minify import kernel_failure_predicate, minify, random_inputs
from kiln.ir import GraphBuilder, TensorType
from kiln.ir import kernel as K


def model_graph():
    """conv with an epilogue (add a side input, relu, sub, tanh), then a softmax over rows of 81:
    kernels whose loops have tails on every vector width."""
    rng = np.random.default_rng(0)
    b = GraphBuilder()
    x = b.input("x", TensorType((1, 3, 9, 9)))
    y = b.input("y", TensorType((1, 5, 9, 9)))
    w = b.constant(rng.standard_normal((5, 3, 3, 3)).astype(np.float32), "w")
    conv = b.op("conv", [x, w], {"padding": 1})
    a = b.op("add", [conv, y])
    r = b.op("relu", [a])
    s = b.op("sub", [r, y])
    t = b.op("tanh", [s])
    flat = b.op("reshape", [t], {"shape": (5, 81)})
    b.output(b.op("softmax", [flat], {"axis": -1}))
    return b.build()


def _shrink_first_loop(kernel: K.Kernel) -> K.Kernel:
    """An off-by-one: the kernel's first loop stops one iteration early."""
    body = list(kernel.body)
    for i, s in enumerate(body):
        if isinstance(s, K.For) and isinstance(s.extent, K.Const):
            body[i] = dataclasses.replace(s, extent=K.Const(s.extent.value - s.step, K.INDEX))
            return kernel.with_body(body)
    raise AssertionError("no loop with a constant extent")


@pytest.fixture
def lowering_bug(monkeypatch):
    """The softmax lowering rule misses the last iteration of its first loop."""
    original = pipeline.lower_graph

    def buggy(graph, plan=None, **kw):
        lowered = original(graph, plan, **kw)
        steps = [dataclasses.replace(s, kernel=_shrink_first_loop(s.kernel))
                 if s.kernel.meta.get("op") == "softmax" else s for s in lowered.steps]
        return dataclasses.replace(lowered, steps=steps)

    monkeypatch.setattr(pipeline, "lower_graph", buggy)


class _OffByOneBorder:
    """kiln.ir.kernel as the depthwise lowering sees it, but its bounds test ``ih < H`` reads
    ``ih <= H``: the last row's taps take a clamped pixel instead of the zero padding."""

    def __getattr__(self, name):
        return getattr(K, name)

    @staticmethod
    def cmp(op, a, b):
        return K.cmp("le" if op == "lt" else op, a, b)


@pytest.fixture
def depthwise_border_bug(monkeypatch):
    """An off-by-one in a real lowering rule: the depthwise convolution's border test."""
    import kiln.passes.lower.depthwise as depthwise

    monkeypatch.setattr(depthwise, "K", _OffByOneBorder())


def depthwise_graph():
    """A depthwise 3x3 convolution over a 65x65 map (large: read in place, with a border of
    bounds-tested rows and columns), then an add and a relu."""
    rng = np.random.default_rng(1)
    b = GraphBuilder()
    x = b.input("x", TensorType((1, 2, 65, 65)))
    w = b.constant(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "w")
    conv = b.op("conv", [x, w], {"padding": 1, "groups": 2})
    b.output(b.op("relu", [b.op("add", [conv, x])]))
    return b.build()


@pytest.mark.heavy  # about a minute: the interpreter runs each version of a 65x65 map's kernel
def test_off_by_one_in_the_depthwise_border_is_named_and_minified(depthwise_border_bug):
    g = depthwise_graph()
    result = bisect_kernels(g, random_inputs(g))
    assert result.failed and result.stage == "lower", result.report()
    assert result.kernel.op == "conv" and "conv" in result.kernel.nodes
    assert "lowering rule" in result.report()
    predicate, failure = kernel_failure_predicate(g)
    assert failure == "lower"
    small = minify(g, predicate=predicate)
    assert 1 <= len(small.nodes) <= 3 and any(n.op == "conv" for n in small.nodes)


@pytest.fixture
def tail_bug(monkeypatch):
    """The vectorizer's scalar tail starts one element late (skipping one)."""
    original = vectorizer.vectorize_loop

    def buggy(loop, width, tuning=vectorizer.DEFAULT_TUNING):
        stmts = original(loop, width, tuning)
        last = stmts[-1] if stmts else None
        if (len(stmts) > 1 and isinstance(last, K.For) and last.kind == "serial"
                and isinstance(last.extent, K.Const) and last.extent.value > 0):
            stmts[-1] = dataclasses.replace(
                last, start=K.simplify(last.start + 1),
                extent=K.Const(last.extent.value - 1, K.INDEX))
        return stmts

    monkeypatch.setattr(vectorizer, "vectorize_loop", buggy)


@pytest.fixture
def codegen_bug(monkeypatch):
    """The code generator swaps the operands of a float subtraction."""
    original = llvm_codegen._Fn.binary

    def buggy(self, e):
        if e.op == "sub" and e.a.dtype == "f32":
            e = K.Binary("sub", e.b, e.a)
        return original(self, e)

    monkeypatch.setattr(llvm_codegen._Fn, "binary", buggy)


def test_every_kernel_matches_without_a_bug():
    g = model_graph()
    inputs = random_inputs(g)
    result = bisect_kernels(g, inputs)
    assert not result.failed, result.report()
    assert len(result.checks) >= 2 and all(k.ok for k in result.checks)
    assert "every kernel matches" in result.report()
    # The stages the pipeline ran, graph to LLVM IR.
    assert result.stages_run == ("fuse", "lower", "parallel", "unroll", "vectorize",
                                 "memory_plan", "llvm_ir")


@pytest.mark.parametrize("bug, op, stage", [
    ("lowering_bug", "softmax", "lower"),
    ("tail_bug", None, "vectorize"),
    ("codegen_bug", "sub", "llvm_ir"),
])
def test_planted_bug_is_named_and_minified(bug, op, stage, request):
    request.getfixturevalue(bug)
    g = model_graph()
    inputs = random_inputs(g)
    result = bisect_kernels(g, inputs)
    assert result.failed and result.kernel is not None, result.report()
    assert result.stage == stage, result.report()
    if op is not None:
        assert op in result.kernel.op or any(op in n for n in result.kernel.nodes)
    report = result.report()
    assert result.kernel.kernel in report and "graph nodes: %" in report
    assert "schedule:" in report and f"stage that made it wrong: {stage}" in report
    # Every stage before the blamed one has a correct version of the kernel.
    names = [v[0] for v in result.versions]
    blamed = names.index(stage)
    assert all(ok for _, _, ok, _ in result.versions[:blamed])
    assert not result.versions[blamed][2]

    predicate, failure = kernel_failure_predicate(g)
    assert failure == stage
    small = minify(g, predicate=predicate)
    assert 1 <= len(small.nodes) <= 3, small
    assert bisect_kernels(small, random_inputs(small)).stage == stage


def test_the_bug_is_not_in_the_kernels_without_it(codegen_bug):
    """check_kernels isolates the wrong kernel: its neighbours still match, on their own
    reference inputs, even though the model's output is wrong from there on."""
    g = model_graph()
    c = compile_stages(g, "llvm", until="llvm_ir")
    checks = check_kernels(c, random_inputs(g), native_runner(c.target))
    wrong = [k for k in checks if not k.ok]
    assert len(wrong) == 1 and "sub" in wrong[0].nodes[-1] or any(
        "sub" in n for n in wrong[0].nodes)


def test_cli_bisect_and_minify_with_the_llvm_backend(codegen_bug, tmp_path, capsys):
    source = tmp_path / "m.py"
    source.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(12, 12)\n"
        "    def forward(self, x):\n"
        "        return torch.tanh(self.fc(x) - x).relu()\n"
        "def make(batch=1, seed=0):\n"
        "    torch.manual_seed(seed)\n"
        "    return M().eval(), (torch.randn(batch, 12),)\n")
    spec = f"{source}:make"
    assert main(["bisect", spec, "--backend", "llvm"]) == 1
    out = capsys.readouterr().out
    assert "first wrong kernel" in out and "stage that made it wrong: llvm_ir" in out
    assert main(["minify", spec, "--backend", "llvm", "--output", str(tmp_path / "repro")]) == 1
    out = capsys.readouterr().out
    assert "minified" in out and (tmp_path / "repro" / "minified.txt").exists()
    text = (tmp_path / "repro" / "minified.txt").read_text()
    assert text.count(" = ") <= 3
