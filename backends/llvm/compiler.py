"""Graph -> native code: lowering, kernel schedules, memory plan, LLVM -O3, JIT."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from dataclasses import dataclass, field

import llvmlite.binding as llvm
import numpy as np

from kiln.backends.llvm.codegen import Binding, ModuleBuilder, emit_entry, emit_kernel
from kiln.ir import Graph, KilnError, verify
from kiln.passes.lower import LoweredGraph, lower_graph
from kiln.passes.memory_plan import MemoryPlan, plan_memory
from kiln.passes.vectorize import schedule_kernel


@dataclass(frozen=True)
class Target:
    """The host CPU as LLVM sees it, and the schedule parameters that follow from it."""

    triple: str
    cpu: str
    features: str
    vector_bits: int

    @property
    def f32_lanes(self) -> int:
        return self.vector_bits // 32


@functools.cache
def host_target() -> Target:
    """The machine kiln runs on: LLVM's host CPU name and features (AVX-512 -> 512-bit
    vectors, AVX2 -> 256, else 128)."""
    feats = llvm.get_host_cpu_features()
    if feats.get("avx512f"):
        bits = 512
    elif feats.get("avx2") and feats.get("fma"):
        bits = 256
    else:
        bits = 128
    return Target(llvm.get_process_triple(), llvm.get_host_cpu_name(), feats.flatten(), bits)


@functools.cache
def _init_llvm() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    gomp = ctypes.util.find_library("gomp") or "libgomp.so.1"
    try:
        llvm.load_library_permanently(gomp)
    except RuntimeError as e:
        raise KilnError(f"the OpenMP runtime ({gomp}) could not be loaded: {e}",
                        hint="install libgomp (it ships with gcc)") from None


def optimize_module(ir_text: str, target: Target) -> tuple[llvm.ModuleRef, llvm.TargetMachine]:
    """Parse, verify and optimize (-O3, new pass manager) an LLVM module for ``target``."""
    _init_llvm()
    try:
        mod = llvm.parse_assembly(ir_text)
        mod.verify()
    except RuntimeError as e:
        raise KilnError(f"internal: generated LLVM IR is invalid: {e}",
                        hint="this is a kiln bug; please report it") from None
    tm = llvm.Target.from_triple(target.triple).create_target_machine(
        cpu=target.cpu, features=target.features, opt=3, codemodel="jitdefault")
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    # kiln's schedules unroll what pays (the GEMM micro-kernel); LLVM's unroller on top of
    # them multiplies the code and the JIT time (ResNet-18: 9 s -> 3.5 s without it). Its
    # loop vectorizer still helps the scalar loops kiln leaves (padding copies, tails).
    pto.loop_unrolling = False
    pb = llvm.create_pass_builder(tm, pto)
    pm = pb.getModulePassManager()
    pm.run(mod, pb)
    return mod, tm


@functools.cache
def cycles_per_second() -> float:
    """The cycle counter's rate, measured once against the wall clock."""
    _init_llvm()
    mod = llvm.parse_assembly(
        "declare i64 @llvm.readcyclecounter()\n"
        "define i64 @now() {\n  %t = call i64 @llvm.readcyclecounter()\n  ret i64 %t\n}\n")
    tm = llvm.Target.from_default_triple().create_target_machine()
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    now = ctypes.CFUNCTYPE(ctypes.c_int64)(engine.get_function_address("now"))
    c0, t0 = now(), time.perf_counter()
    time.sleep(0.05)
    c1, t1 = now(), time.perf_counter()
    return (c1 - c0) / (t1 - t0)


@dataclass
class KernelProfile:
    """One kernel's share of an inference."""

    kernel: str
    root: str
    op: str
    seconds: float
    flops: int
    bytes: int

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def gbytes(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class CompiledProgram:
    """A JIT-compiled model: call ``run(list of arrays)``. Keeps the engine alive."""

    graph: Graph
    lowered: LoweredGraph
    plan: MemoryPlan
    ir_text: str
    engine: object
    entry: object
    set_threads: object
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        g = self.graph
        self._arena = np.zeros(max(self.plan.arena_bytes, 64) // 8 + 8, np.float64)
        self._consts = self.plan.const_blob
        self._in = (ctypes.c_void_p * max(len(g.inputs), 1))()
        self._out = (ctypes.c_void_p * max(len(g.outputs), 1))()
        self._out_types = [g.types[o] for o in g.outputs]
        self._out_written = [j not in self.plan.output_copies for j in range(len(g.outputs))]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Outputs for inputs already checked against the signature."""
        arrays = [np.ascontiguousarray(a) for a in inputs]
        for i, a in enumerate(arrays):
            self._in[i] = a.ctypes.data
        outs = [np.empty(t.shape, t.dtype.numpy) for t in self._out_types]
        for j, o in enumerate(outs):
            self._out[j] = o.ctypes.data
        self.entry(self._in, self._out, self._arena.ctypes.data, self._consts.ctypes.data)
        for j, src in self.plan.output_copies.items():
            if src in self.graph.inputs:
                outs[j][...] = arrays[self.graph.inputs.index(src)]
            elif src in self.graph.constants:
                outs[j][...] = self.graph.constants[src]
            else:
                outs[j][...] = outs[self.graph.outputs.index(src)]
        return outs

    __call__ = run

    def threads(self, n: int) -> None:
        """Use ``n`` threads (0: the OpenMP default)."""
        self.set_threads(int(n))

    def _cycles(self) -> np.ndarray:
        n = len(self.lowered.steps)
        addr = self.engine.get_global_value_address("kiln_cycles")
        return np.ctypeslib.as_array((ctypes.c_int64 * max(n, 1)).from_address(addr))[:n]

    def profile(self, inputs: list[np.ndarray], repeat: int = 10) -> list[KernelProfile]:
        """Per-kernel time (median over ``repeat`` runs), FLOPs and bytes, slowest first."""
        self.run(inputs)
        cycles = self._cycles()
        samples = []
        for _ in range(repeat):
            cycles[:] = 0
            self.run(inputs)
            samples.append(cycles.copy())
        per_run = np.median(np.stack(samples), axis=0) / cycles_per_second()
        out = []
        for step, seconds in zip(self.lowered.steps, per_run):
            k = step.kernel
            nbytes = sum(b.nbytes for b in k.params if b.name not in step.temps)
            out.append(KernelProfile(k.name, step.root, k.meta.get("op", ""), float(seconds),
                                     k.flops, nbytes))
        return sorted(out, key=lambda p: -p.seconds)


def _bindings(step, t: int, plan: MemoryPlan) -> list[Binding]:
    out = []
    for b in step.kernel.params:
        value = step.reads.get(b.name) or step.writes.get(b.name)
        if b.name in step.temps:
            key = f"{t}:{b.name}"
        else:
            key = value if value in plan.storage else b.name
        st = plan.storage[key]
        out.append(Binding(st.kind, st.index))
    return out


def compile_graph(graph: Graph, *, target: Target | None = None,
                  threads: int = 0) -> CompiledProgram:
    """Compile ``graph`` to native code for ``target`` (default: this machine)."""
    verify(graph)
    target = target or host_target()
    t0 = time.perf_counter()
    lowered = lower_graph(graph, width=target.f32_lanes)
    for step in lowered.steps:
        step.kernel = schedule_kernel(step.kernel, target.f32_lanes)
    plan = plan_memory(lowered)
    t1 = time.perf_counter()
    m = ModuleBuilder(target.triple, target.features)
    calls = []
    for t, step in enumerate(lowered.steps):
        emit_kernel(m, step.kernel)
        calls.append((step.kernel, _bindings(step, t, plan)))
    emit_entry(m, calls)
    ir_text = m.text()
    t2 = time.perf_counter()
    mod, tm = optimize_module(ir_text, target)
    t3 = time.perf_counter()
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    entry = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p)(engine.get_function_address("kiln_run"))
    set_threads = ctypes.CFUNCTYPE(None, ctypes.c_int32)(
        engine.get_function_address("kiln_set_threads"))
    t4 = time.perf_counter()
    prog = CompiledProgram(graph, lowered, plan, ir_text, engine, entry, set_threads,
                           {"lower": t1 - t0, "codegen": t2 - t1, "optimize": t3 - t2,
                            "jit": t4 - t3})
    if threads:
        prog.threads(threads)
    return prog
