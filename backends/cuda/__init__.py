"""The CUDA backend: kiln's kernel IR rendered as numba.cuda kernels.

``compile_graph_cuda(graph)`` lowers the graph to scalar loop nests and renders every kernel as
Python source for ``numba.cuda.jit`` (``codegen``), and places every value in device memory by
the static memory plan (``program``). Each launch gets a schedule (``schedule``): dense nests
(linear, matmul, conv, the int8 GEMMs) run as shared-memory tiled GEMMs with register micro-tiles
(``dense``), row reductions (softmax, norms, reduce_*) with a thread block per row and a
shared-memory tree (``reduce``), and everything else as a grid-stride loop over its outermost
independent loops (``mapping``). It runs on an NVIDIA GPU, or on Numba's CUDA simulator when
``NUMBA_ENABLE_CUDASIM=1`` is set before numba is imported.

``kiln.runtime.artifact.cuda`` writes the kernels as PTX with their launch table and memory
plan, and runs such a file on a GPU without PyTorch.
"""

from __future__ import annotations

from kiln.backends.cuda.program import (
    CudaProgram,
    KernelProfile,
    LaunchInfo,
    compile_graph,
    compile_graph_cuda,
    compile_graph_ptx,
    run_kernel_cuda,
)
from kiln.backends.cuda.schedule import GENERIC, GPU_TUNING, SIM_TUNING, CudaTuning

__all__ = ["GENERIC", "GPU_TUNING", "SIM_TUNING", "CudaProgram",
           "CudaTuning", "KernelProfile", "LaunchInfo", "compile_graph", "compile_graph_cuda",
           "compile_graph_ptx", "run_kernel_cuda"]
