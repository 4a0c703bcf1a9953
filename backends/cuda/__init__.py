"""The CUDA backend: kiln's kernel IR rendered as numba.cuda kernels.

``compile_graph_cuda(graph)`` lowers the graph to scalar loop nests, binds each kernel's
outermost independent loops to a grid-stride loop over GPU threads (``mapping``), renders every
kernel as Python source for ``numba.cuda.jit`` (``codegen``), and places every value in device
memory by the static memory plan (``program``). It runs on an NVIDIA GPU, or on Numba's CUDA
simulator when ``NUMBA_ENABLE_CUDASIM=1`` is set before numba is imported.
"""

from __future__ import annotations

from kiln.backends.cuda.program import (
    CudaProgram,
    KernelProfile,
    compile_graph,
    compile_graph_cuda,
    compile_graph_ptx,
    run_kernel_cuda,
)

__all__ = ["CudaProgram", "KernelProfile", "compile_graph", "compile_graph_cuda",
           "compile_graph_ptx", "run_kernel_cuda"]
