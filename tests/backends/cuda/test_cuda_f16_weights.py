"""A float32 linear layer with half-precision weights (quantize={"mode": "fp16"}) on the CUDA
backend (simulator) against the reference interpreter."""

from __future__ import annotations

import numpy as np

from kiln.backends.cuda import compile_graph_cuda
from kiln.backends.reference import run_graph
from kiln.ir import GraphBuilder, TensorType


def test_f16_weight_linear_matches_the_reference():
    rng = np.random.default_rng(0)
    b = GraphBuilder("mixed")
    x = b.input("x", TensorType((3, 24)))
    w = b.constant(rng.standard_normal((8, 24)).astype(np.float16), "w")
    bias = b.constant(rng.standard_normal(8).astype(np.float32), "b")
    b.output(b.op("linear", [x, w, bias]))
    g = b.build()
    xv = rng.standard_normal((3, 24)).astype(np.float32)
    want = run_graph(g, [xv])[0]
    got = np.asarray(compile_graph_cuda(g).run(xv)[0])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
