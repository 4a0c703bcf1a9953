"""``kiln bisect`` and ``kiln minify`` against a deliberately wrong pass planted in a pipeline:
one that flips the sign of the first conv/linear bias it finds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kiln.debug import bisect, check_failure, load_model, minify, write_repro
from kiln.debug.cli import main
from kiln.frontend.trace import trace_module
from kiln.ir import Graph
from kiln.passes import Pass, PassContext, PassResult, all_passes, register_pass


class FlipBiasSign(Pass):
    """The planted bug: negate the bias of the first conv or linear with a constant bias."""

    name = "test_flip_bias_sign"
    description = "negate the first conv/linear bias (a deliberately wrong pass for tests)"

    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        for i, node in enumerate(graph.nodes):
            if node.op in ("conv", "linear") and len(node.inputs) == 3 \
                    and graph.is_constant(node.inputs[2]):
                out = graph.copy()
                bias = out.add_constant(-graph.constants[node.inputs[2]], hint="flipped")
                out.nodes[i] = node.with_(inputs=(*node.inputs[:2], bias))
                return PassResult(out, True)
        return PassResult(graph, False)


class CrashOnGelu(Pass):
    """A pass that raises on any graph with a gelu node."""

    name = "test_crash_on_gelu"
    description = "raise on gelu (a deliberately crashing pass for tests)"

    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        if any(node.op == "gelu" for node in graph.nodes):
            raise RuntimeError("gelu is not supported")
        return PassResult(graph, False)


if FlipBiasSign.name not in all_passes():
    register_pass(FlipBiasSign)

CORRECT = ["fold_constants", "simplify_algebra", "dce", "fold_batchnorm"]
PLANTED = [*CORRECT, FlipBiasSign(), "cse", "dce"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``kiln argv...`` in-process; returns (status, stdout, stderr)."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("model", ["mlp", "resnet18_cifar"])
def test_bisect_names_the_planted_pass(model):
    result = bisect(model, passes=PLANTED)
    assert result.failed
    assert (result.pass_name, result.index) == (FlipBiasSign.name, len(CORRECT))
    assert result.max_diff > 1e-3
    # The node reading the flipped bias is the first whose value moved.
    assert result.node is not None
    assert any(f"%{result.node}:" in text and "flipped" in text for text in result.changed_nodes)
    assert [s.ok for s in result.stages] == [True] * (len(CORRECT) + 1) + [False]


def test_bisect_accepts_a_module_and_reports_no_failure_for_correct_passes():
    module, inputs, _ = load_model("mlp")
    result = bisect((module, inputs), pipeline="O1")
    assert not result.failed and result.pass_name is None
    assert len(result.stages) == 7 and all(s.ok for s in result.stages)
    assert "all stages match" in result.report()


def test_bisect_cli(capsys):
    status, out, _ = run(capsys, "bisect", "mlp", "--passes",
                         ",".join([*CORRECT, FlipBiasSign.name]))
    assert status == 1
    assert f"first failing stage: pass {FlipBiasSign.name} (#4)" in out
    assert "smallest offending node: %fc1" in out
    status, out, _ = run(capsys, "bisect", "mlp")
    assert status == 0 and "all stages match eager PyTorch" in out


def test_a_crashing_pass_is_bisected_and_minified():
    passes = ["fold_constants", CrashOnGelu()]
    result = bisect("mlp", passes=passes)
    assert (result.pass_name, result.index) == (CrashOnGelu.name, 1)
    assert result.error == "RuntimeError: gelu is not supported"
    module, inputs, _ = load_model("mlp")
    graph, _ = trace_module(module, inputs)
    small = minify(graph, passes)
    assert [node.op for node in small.nodes] == ["gelu"]
    assert check_failure(small, passes).kind == f"RuntimeError in {CrashOnGelu.name}"


@pytest.mark.parametrize("model", ["mlp", "resnet18_cifar"])
def test_minify_shrinks_to_a_failing_graph_with_a_runnable_repro(tmp_path, model):
    module, inputs, _ = load_model(model)
    graph, _ = trace_module(module, inputs)
    small = minify(graph, PLANTED)
    assert 1 <= len(small.nodes) <= 3
    failure = check_failure(small, PLANTED)
    assert failure is not None and failure.kind == "mismatch"
    repro = write_repro(small, PLANTED, tmp_path)
    with np.load(tmp_path / "constants.npz", allow_pickle=False) as data:
        assert {name[2:] for name in data.files} == set(small.constants)
    done = subprocess.run([sys.executable, repro.name], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "still fails (mismatch)" in done.stdout


def test_minify_cli(capsys, tmp_path):
    status, out, _ = run(capsys, "minify", "mlp", "-o", str(tmp_path), "--passes",
                         ",".join([*CORRECT, FlipBiasSign.name]))
    assert status == 1
    assert "minified 5 -> 1 nodes" in out
    assert {p.name for p in tmp_path.iterdir()} == {"minified.txt", "constants.npz", "repro.py"}
    status, out, _ = run(capsys, "minify", "mlp", "-o", str(tmp_path / "none"))
    assert status == 0 and "no failure" in out


@pytest.mark.parametrize("command", ["bisect", "minify"])
def test_help_and_bad_model(capsys, command, tmp_path):
    status, out, _ = run(capsys, command, "--help")
    assert status == 0 and f"usage: kiln {command}" in out
    extra = ["-o", str(tmp_path)] if command == "minify" else []
    status, _, err = run(capsys, command, "no_such_model", *extra)
    assert status == 2
    assert "kiln: error: unknown model 'no_such_model'" in err
    status, _, err = run(capsys, command, "mlp", "--passes", "no_such_pass", *extra)
    assert status == 2 and "no pass named 'no_such_pass'" in err
