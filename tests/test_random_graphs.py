"""Random valid graphs (tests/fuzz/generate.py): every backend agrees with the reference
interpreter, and the text form round-trips."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from kiln.ir import GraphBuilder, TensorType, all_ops, parse_graph, print_graph, verify

_spec = importlib.util.spec_from_file_location(
    "kiln_tests_fuzz_generate", Path(__file__).parent / "fuzz" / "generate.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fuzz  # dataclasses look their module up there
_spec.loader.exec_module(fuzz)

SEEDS = range(1000)


@cache
def graph_for(seed: int):
    """The fuzz graph and inputs of ``seed`` (generated once per test session)."""
    return fuzz.generate_graph(seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_backends_agree(seed):
    graph, inputs = graph_for(seed)
    (_, oracle), *others = fuzz.BACKENDS
    expected = oracle(graph, inputs)
    for name, run in others:
        fuzz.assert_outputs_close(expected, run(graph, inputs), f"seed {seed}, {name}")


LLVM_SEEDS = range(300)


@pytest.mark.parametrize("seed", LLVM_SEEDS)
def test_llvm_backend_agrees_with_reference(seed):
    """The first 300 graphs also through the LLVM backend (native code; compiling every graph
    is what limits the count)."""
    from kiln.backends.llvm import compile_graph
    from kiln.backends.reference import run_graph

    graph, inputs = graph_for(seed)
    fuzz.assert_outputs_close(run_graph(graph, inputs), compile_graph(graph)(inputs),
                              f"seed {seed}, llvm")


# 229: a grouped conv with three input channels per group once took the depthwise schedule
# and wrote past its output.
KERNEL_SEEDS = [*range(150), 229]


@pytest.mark.parametrize("seed", KERNEL_SEEDS)
def test_scheduled_kernels_stay_in_bounds(seed):
    """The LLVM backend's kernels (lowered and scheduled for 16-lane vectors), run by the
    kernel-IR interpreter, which refuses any load or store outside its buffer: native code
    would not notice such an access, and the outputs could still look right."""
    from kiln.backends.reference import run_graph
    from kiln.passes.lower import lower_graph, run_lowered
    from kiln.passes.vectorize import schedule_kernel

    graph, inputs = graph_for(seed)
    lowered = lower_graph(graph, width=16)
    for step in lowered.steps:
        step.kernel = schedule_kernel(step.kernel, 16)
    fuzz.assert_outputs_close(run_graph(graph, inputs), run_lowered(lowered, inputs),
                              f"seed {seed}, kernel interpreter")


@pytest.mark.parametrize("seed", SEEDS)
def test_text_round_trips(seed):
    graph, _ = graph_for(seed)
    text = print_graph(graph)
    parsed = parse_graph(text, constants=graph.constants)
    verify(parsed)
    assert print_graph(parsed) == text
    assert parsed.nodes == graph.nodes
    assert parsed.types == graph.types
    assert all(np.array_equal(parsed.constants[k], v) for k, v in graph.constants.items())


def test_graphs_respect_the_limits():
    for seed in SEEDS:
        graph, inputs = graph_for(seed)
        verify(graph)
        assert 1 <= len(graph.nodes) <= fuzz.MAX_NODES
        assert 1 <= len(graph.inputs) <= 2 and 1 <= len(graph.outputs) <= 2
        assert max(t.numel for t in graph.types.values()) <= fuzz.MAX_ELEMENTS
        users = graph.users()
        assert not any(out in users for out in graph.outputs)
        assert [a.shape for a in inputs] == [graph.types[i].shape for i in graph.inputs]


def test_generation_is_deterministic():
    for seed in (0, 7, 123):
        g1, in1 = fuzz.generate_graph(seed)
        g2, in2 = fuzz.generate_graph(seed)
        assert print_graph(g1) == print_graph(g2)
        assert all(np.array_equal(a, b) for a, b in zip(in1, in2))


def test_every_op_has_a_proposer_and_most_get_used():
    assert set(fuzz.PROPOSERS) == set(all_ops())
    used = Counter(n.op for seed in SEEDS for n in graph_for(seed)[0].nodes)
    missing = set(all_ops()) - set(used)
    assert len(missing) <= 3, f"ops the fuzzer never generated in {len(SEEDS)} graphs: {missing}"


@pytest.mark.parametrize(("offset", "expected"), [(0.0, False), (0.5, True)])
def test_ill_conditioned_graphs_are_rejected(offset, expected):
    # x < c with c == x is a tie that any rounding difference breaks; c == x + 0.5 is not.
    x = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    b = GraphBuilder()
    b.output(b.op("lt", [b.input("x", TensorType(x.shape)), b.constant(x + np.float32(offset))]))
    assert fuzz.well_conditioned(b.build(), [x], np.random.default_rng(0)) is expected
