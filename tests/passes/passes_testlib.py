"""Checks every pass test makes: the input is untouched, the result verifies, and the pass does
not change what the graph computes (run by the reference backend)."""

from __future__ import annotations

import hashlib

import numpy as np

from kiln.backends.reference import run_graph
from kiln.ir import Graph, print_graph, verify
from kiln.passes import Pass, PassContext, PassResult


def fingerprint(graph: Graph) -> str:
    """A hash of the graph's text and of every constant's name, dtype, shape and bytes."""
    h = hashlib.sha256(print_graph(graph).encode())
    for name, arr in graph.constants.items():
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def random_inputs(graph: Graph, seed: int = 0) -> list[np.ndarray]:
    """Standard-normal floats (small ints, random bools) of the graph's input types."""
    rng = np.random.default_rng(seed)
    arrays = []
    for name in graph.inputs:
        t = graph.types[name]
        if t.dtype.is_float:
            arrays.append(rng.standard_normal(t.shape).astype(t.dtype.numpy))
        elif t.dtype.value == "bool":
            arrays.append(rng.random(t.shape) < 0.5)
        else:
            arrays.append(rng.integers(0, 4, t.shape).astype(t.dtype.numpy))
    return arrays


def assert_same_outputs(before: Graph, after: Graph, seed: int = 0, rtol: float = 1e-5,
                        atol: float = 1e-5) -> None:
    """Both graphs compute the same outputs (same dtypes and shapes) on random inputs."""
    inputs = random_inputs(before, seed)
    want = run_graph(before, inputs)
    got = run_graph(after, inputs)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def run_pass(pass_: Pass, graph: Graph, ctx: PassContext | None = None) -> PassResult:
    """Run ``pass_`` checking that it leaves ``graph`` untouched and returns a valid graph that
    computes the same outputs."""
    verify(graph)
    before = fingerprint(graph)
    result = pass_.run(graph, ctx)
    assert fingerprint(graph) == before, f"{pass_.name} modified its input"
    verify(result.graph)
    assert all(not a.flags.writeable for a in result.graph.constants.values())
    assert_same_outputs(graph, result.graph)
    return result
