"""The LLVM CPU backend: fused kernels compiled to native code with llvmlite.

compile_graph(graph) fuses and lowers the graph, schedules each kernel for the host (vector
width from LLVM's host CPU features), plans memory, emits one LLVM module with one entry point,
optimizes it at -O3 with LLVM's new pass manager and JIT-compiles it. Threads come from the
OpenMP runtime (libgomp).
"""

from __future__ import annotations

from kiln.backends.llvm.compiler import CompiledProgram, compile_graph, host_target

__all__ = ["CompiledProgram", "compile_graph", "host_target"]
