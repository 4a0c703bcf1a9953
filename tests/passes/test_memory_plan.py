"""Memory plan: liveness-based arena reuse, outputs in the caller's arrays, constants blob."""

from __future__ import annotations

import numpy as np

from kiln.ir import GraphBuilder, TensorType
from kiln.passes.lower import lower_graph
from kiln.passes.memory_plan import plan_memory


def _chain(n: int):
    b = GraphBuilder("chain")
    v = b.input("x", TensorType((1024,)))
    for i in range(n):
        # softmax is an anchor: each step is its own kernel writing a new buffer.
        v = b.op("softmax", [v], {"axis": 0}, name=f"s{i}")
    b.output(v)
    return b.build()


def test_dead_buffers_are_reused() -> None:
    plan = plan_memory(lower_graph(_chain(6)))
    # Five intermediates of 4 KB each, but at most two are alive at once.
    assert plan.arena_bytes == 2 * 4096
    assert plan.storage["s5"].kind == "output"
    offsets = {plan.storage[f"s{i}"].index for i in range(5)}
    assert offsets == {0, 4096}


def test_live_buffers_never_overlap() -> None:
    b = GraphBuilder("diamond")
    x = b.input("x", TensorType((256,)))
    a = b.op("softmax", [x], {"axis": 0}, name="a")
    c = b.op("softmax", [a], {"axis": 0}, name="c")
    d = b.op("softmax", [c], {"axis": 0}, name="d")
    b.output(b.op("add", [a, d], name="out"))
    g = b.build()
    plan = plan_memory(lower_graph(g))
    # a lives until the last kernel (d's kernel adds it in its epilogue), so c must not take
    # its block.
    assert "d" not in plan.storage and plan.storage["out"].kind == "output"
    assert plan.storage["a"].index != plan.storage["c"].index


def test_constants_are_aligned_in_one_blob() -> None:
    b = GraphBuilder("consts")
    x = b.input("x", TensorType((3,)))
    y = b.op("add", [x, b.constant(np.arange(3, dtype=np.float32), "k1")])
    b.output(b.op("mul", [y, b.constant(np.full(3, 2.0, np.float32), "k2")]))
    g = b.build()
    plan = plan_memory(lower_graph(g))
    assert [plan.storage[k].index % 64 for k in ("k1", "k2")] == [0, 0]
    assert plan.const_blob.nbytes >= 2 * 64
