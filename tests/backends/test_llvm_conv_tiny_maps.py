"""Convolutions whose output maps have fewer pixels than a vector (ResNet-50's last stage at a
64x64 input: 2x2) run the transposed direct schedule, pixels as the GEMM's rows and output
channels as its vector columns; they fell to the scalar loop nest before (7 ms for one 3x3
conv of 512 channels). Checked against PyTorch on the host and the AVX2 target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kiln.backends.llvm import compile_graph
from kiln.backends.llvm.compiler import default_target
from kiln.frontend.trace import trace_module
from kiln.passes import run_pipeline
from kiln.passes.compile import compile_kernels
from kiln.passes.target import named_target


def _targets():
    host = default_target()
    return ["host"] + (["avx2"] if host.vector_bits > 256 and host.has("avx2") else [])


CASES = [  # (batch, in channels, out channels, size, kernel, stride, padding)
    (1, 32, 48, 2, 3, 1, 1),
    (1, 32, 40, 2, 1, 1, 0),
    (3, 16, 24, 3, 3, 1, 1),
    (2, 16, 32, 4, 3, 2, 1),
    (1, 24, 16, 1, 1, 1, 0),
    (1, 8, 20, 3, 3, 1, 0),     # a single output pixel
]


@pytest.mark.parametrize("target", _targets())
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_conv_on_tiny_maps(case, target):
    n, cin, cout, size, k, s, p = case
    torch.manual_seed(sum(case))
    model = nn.Sequential(nn.Conv2d(cin, cout, k, stride=s, padding=p), nn.ReLU()).eval()
    x = torch.randn(n, cin, size, size)
    graph = run_pipeline(trace_module(model, (x,))[0], "O1")
    host = default_target()
    tgt = host if target == "host" else named_target(target, host)
    steps = compile_kernels(graph, width=tgt.f32_lanes, target=tgt).lowered.steps
    conv = [st for st in steps if st.kernel.meta.get("op") == "conv"]
    assert conv and all(st.kernel.meta.get("schedule") == "direct_t" for st in conv)
    with torch.no_grad():
        want = model(x).numpy()
    prog = compile_graph(graph, target=tgt, cache=False)
    for threads in (1, 2):
        prog.threads(threads, adaptive=False)
        got = prog([x.numpy()])[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
