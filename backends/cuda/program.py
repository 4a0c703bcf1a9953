"""Graph -> CUDA program: lowering, memory plan on the device, kernel source, launches.

Device memory is allocated once per program: the activation arena of the memory plan (values
reuse the blocks of dead ones), the constant blob (weights, uploaded once), a staging buffer per
input and a buffer per output. Every kernel argument is a typed view into one of them, and every
launch configuration is fixed at compile time, so ``run`` only copies inputs in, launches, and
copies outputs out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from kiln.backends.cuda.codegen import KernelSource, Launch
from kiln.backends.cuda.device import (
    CudaDevice,
    cuda_device,
    load_source,
    ptx_entry,
    ptx_target,
    source_ptx,
)
from kiln.backends.cuda.launcher import LaunchPlan, PreparedLaunches
from kiln.backends.cuda.schedule import GPU_TUNING, SIM_TUNING, CudaTuning, render_scheduled
from kiln.backends.kernel_profile import KernelProfile
from kiln.ir import Graph, KilnError, verify
from kiln.ir import kernel as K
from kiln.passes.compile import CODE, Compilation, Stage, compile_kernels, register_stage
from kiln.passes.lower import KernelStep, LoweredGraph
from kiln.passes.memory_plan import MemoryPlan, Storage


class LaunchInfo(NamedTuple):
    """One CUDA launch as configured: its schedule (``tiled-gemm``, ``block-reduce``,
    ``grid-stride`` or ``serial``), grid and block dimensions, static shared memory per block,
    the work it covers (output elements, rows or grid-stride iterations) and the kernel-IR loop
    variables it binds to threads."""

    name: str
    work: int
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    bound: tuple[str, ...]
    schedule: str
    shared_bytes: int


def launch_shape(launch: Launch, device: CudaDevice) -> tuple[tuple[int, int, int],
                                                             tuple[int, int, int]]:
    """(grid, block) of ``launch``: its own for the CUDA schedules, the device's choice for a
    generic grid-stride loop."""
    if launch.grid is not None and launch.block is not None:
        return launch.grid, launch.block
    blocks, threads = device.launch_config(launch.work, launch.parallel)
    return (blocks, 1, 1), (threads, 1, 1)


@dataclass
class _Call:
    """One configured CUDA launch and where each of its arguments comes from: ("static",
    device array), ("input", i) or ("output", j)."""

    launch: Launch
    kernel: Any
    args: list[tuple[str, Any]]


@dataclass
class _Step:
    name: str
    root: str
    op: str
    flops: int
    bytes: int
    calls: list[_Call]


class CudaProgram:
    """A graph compiled to numba.cuda kernels with its device memory.

    ``run(*arrays)`` takes NumPy arrays (returns NumPy arrays) or device arrays — anything with
    ``__cuda_array_interface__``, such as CUDA torch tensors, or numba device arrays — and then
    returns numba device arrays. ``program([arrays])`` is the backend interface the Executable
    uses (a list in, a list of NumPy arrays out).
    """

    def __init__(self, graph: Graph, lowered: LoweredGraph, plan: MemoryPlan,
                 sources: list[KernelSource], device: CudaDevice,
                 timings: dict[str, float]) -> None:
        self.graph = graph
        self.lowered = lowered
        self.plan = plan
        self.sources = sources
        self.device = device
        self.timings = timings
        cuda = device.cuda
        g = graph
        self._in_specs = [(g.types[n].shape, g.types[n].dtype.numpy) for n in g.inputs]
        self._out_specs = [(g.types[n].shape, g.types[n].dtype.numpy) for n in g.outputs]
        self._arena = cuda.device_array(max(plan.arena_bytes, 8), np.uint8)
        blob = plan.const_blob if plan.const_blob.size else np.zeros(8, np.uint8)
        self._consts = cuda.to_device(blob)
        self._staging = [_device_empty(cuda, math.prod(s), d) for s, d in self._in_specs]
        self._outputs = [_device_empty(cuda, math.prod(s), d) for s, d in self._out_specs]
        # On a GPU the kernels are compiled to PTX and launched with prepared parameter
        # blocks (see ``launcher``); the simulator runs their Python source through numba.
        self._launcher: PreparedLaunches | None = None
        self._spans: list[tuple[int, int]] = []
        plans: list[LaunchPlan] = []
        cc = None if device.simulated else ptx_target(device.compute_capability)
        self._steps = [self._bind(t, step, src, cc, plans) for t, (step, src)
                       in enumerate(zip(lowered.steps, sources))]
        if cc is not None:
            self._launcher = PreparedLaunches(plans)

    # ---- compile-time binding --------------------------------------------------------------
    def _view(self, kind: str, offset: int, buf: K.Buffer):
        base = self._arena if kind == "arena" else self._consts
        nbytes = buf.nbytes
        if nbytes == 0:
            return _device_empty(self.device.cuda, 0, K.np_dtype(buf.dtype))
        return base[offset:offset + nbytes].view(K.np_dtype(buf.dtype))

    def _bind(self, t: int, step, src: KernelSource, cc: tuple[int, int] | None,
              plans: list[LaunchPlan]) -> _Step:
        where: dict[str, tuple[str, Any]] = {}
        buffers = {buf.name: buf for buf in step.kernel.params}
        for buf in step.kernel.params:
            st = param_storage(self.plan, t, step, buf)
            if st.kind in ("input", "output"):
                where[buf.name] = (st.kind, st.index)
            else:
                where[buf.name] = ("static", self._view(st.kind, st.index, buf))
        calls = []
        if cc is None:
            ns = load_source(src.text, src.kernel.name)
            for launch in src.launches:
                kernel = ns[launch.name][launch_shape(launch, self.device)]
                calls.append(_Call(launch, kernel, [where[p] for p in launch.params]))
        else:
            ptx = source_ptx(src.text, src.kernel.name, cc)
            first = len(plans)
            for launch in src.launches:
                calls.append(_Call(launch, None, [where[p] for p in launch.params]))
                if launch.work == 0:
                    continue
                grid, block = launch_shape(launch, self.device)
                args = tuple((kind, a, buffers[p].size, K.np_dtype(buffers[p].dtype).itemsize)
                             for p, (kind, a) in zip(launch.params,
                                                     (where[p] for p in launch.params)))
                plans.append(LaunchPlan(launch.name, ptx[launch.name],
                                        ptx_entry(ptx[launch.name], launch.name), grid, block,
                                        args))
            self._spans.append((first, len(plans)))
        k = step.kernel
        return _Step(k.name, step.root, k.meta.get("op", ""), int(k.flops),
                     int(sum(b.nbytes for b in k.params if b.name not in step.temps)), calls)

    # ---- running ---------------------------------------------------------------------------
    def _device_inputs(self, arrays: Sequence[Any]) -> list[Any]:
        """Inputs as flat device arrays: device arrays as they are, host arrays through the
        staging buffers."""
        g = self.graph
        if len(arrays) != len(g.inputs):
            raise KilnError(f"{g.name} takes {len(g.inputs)} inputs "
                            f"({', '.join(g.inputs)}), got {len(arrays)}")
        out = []
        for k, (a, (shape, dtype)) in enumerate(zip(arrays, self._in_specs)):
            if _is_device_array(a):
                d = self._as_device(a)
                if tuple(d.shape) != tuple(shape) or d.dtype != dtype:
                    raise KilnError(f"input %{g.inputs[k]} expects {g.types[g.inputs[k]]}, "
                                    f"got {d.dtype}{list(d.shape)} on the device",
                                    hint="kiln compiles for the example inputs' shapes and "
                                         "dtypes")
                if not d.is_c_contiguous():
                    raise KilnError(f"input %{g.inputs[k]} is not contiguous on the device",
                                    hint="pass a contiguous tensor (tensor.contiguous())")
                out.append(d.reshape(d.size) if d.size else self._staging[k])
            else:
                host = check_inputs_one(g, k, a)
                if host.size:
                    self._staging[k].copy_to_device(np.ascontiguousarray(host).reshape(-1))
                out.append(self._staging[k])
        return out

    def _as_device(self, a: Any):
        return self.device.as_device_array(a)

    def _launch_all(self, inputs: list[Any], outputs: list[Any], timed: bool = False
                    ) -> list[float]:
        with self.device.pacing():
            return self._launch_steps(inputs, outputs, timed)

    def _launch_steps(self, inputs: list[Any], outputs: list[Any], timed: bool) -> list[float]:
        times = []
        cuda = self.device.cuda
        if self._launcher is not None and not timed:
            self._launcher.launch(inputs, outputs)
            return times
        for t, step in enumerate(self._steps):
            if timed:
                if self.device.simulated:
                    t0 = time.perf_counter()
                else:
                    ev0, ev1 = cuda.event(), cuda.event()
                    ev0.record()
            if self._launcher is not None:
                self._launcher.launch(inputs, outputs, *self._spans[t])
            for call in step.calls if self._launcher is None else ():
                if call.launch.work == 0:
                    continue
                args = [a if kind == "static" else inputs[a] if kind == "input" else outputs[a]
                        for kind, a in call.args]
                call.kernel(*args)
            if timed:
                if self.device.simulated:
                    times.append(time.perf_counter() - t0)
                else:
                    ev1.record()
                    times.append((ev0, ev1))
        if timed and not self.device.simulated:
            cuda.synchronize()
            times = [cuda.event_elapsed_time(a, b) / 1e3 for a, b in times]
        return times

    def run(self, *arrays: Any) -> list[Any]:
        """Outputs for ``arrays``: NumPy arrays for NumPy inputs; numba device arrays (fresh
        ones each call) when any input is a device array."""
        on_device = any(_is_device_array(a) for a in arrays)
        inputs = self._device_inputs(arrays)
        cuda = self.device.cuda
        if on_device:
            outputs = [_device_empty(cuda, math.prod(s), d) for s, d in self._out_specs]
        else:
            outputs = self._outputs
        self._launch_all(inputs, outputs)
        results: list[Any] = []
        for j, ((shape, _), buf) in enumerate(zip(self._out_specs, outputs)):
            if j in self.plan.output_copies:
                results.append(None)  # filled below, once every written output is there
            else:
                results.append(buf.reshape(shape) if on_device else
                               buf.copy_to_host().reshape(shape))
        for j, src in self.plan.output_copies.items():
            results[j] = self._copy_output(src, arrays, results, on_device)
        return results

    def _copy_output(self, src: str, arrays: Sequence[Any], results: list[Any],
                     on_device: bool) -> Any:
        """A graph output no kernel writes: an input, a constant or another output."""
        g = self.graph
        if src in g.inputs:
            a = arrays[g.inputs.index(src)]
            host = a.copy_to_host() if hasattr(a, "copy_to_host") else (
                self._as_device(a).copy_to_host() if _is_device_array(a) else np.array(a))
        elif src in g.constants:
            host = np.array(g.constants[src])
        else:
            other = results[g.outputs.index(src)]
            host = other.copy_to_host() if on_device else other.copy()
        return self.device.cuda.to_device(host) if on_device else host

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The backend interface: a list of NumPy arrays in, a list of NumPy arrays out."""
        return self.run(*inputs)

    def profile(self, inputs: Sequence[Any], repeat: int = 10) -> list[KernelProfile]:
        """Per-kernel time (median over ``repeat`` runs: CUDA events on a GPU, wall time in the
        simulator), FLOPs and bytes, slowest first."""
        device_inputs = self._device_inputs(list(inputs))
        self._launch_all(device_inputs, self._outputs)
        samples = [self._launch_all(device_inputs, self._outputs, timed=True)
                   for _ in range(max(repeat, 1))]
        per_step = np.median(np.array(samples, dtype=np.float64), axis=0) if self._steps \
            else []
        out = [KernelProfile(s.name, s.root, s.op, float(sec), s.flops, s.bytes)
               for s, sec in zip(self._steps, per_step)]
        return sorted(out, key=lambda p: -p.seconds)

    @property
    def source(self) -> str:
        """The generated Python source of every kernel, in execution order."""
        return "\n\n".join(s.text for s in self.sources)

    def launches(self) -> list[LaunchInfo]:
        """Every CUDA launch as configured, in execution order."""
        out = []
        for step in self._steps:
            for call in step.calls:
                lc = call.launch
                grid, block = launch_shape(lc, self.device)
                out.append(LaunchInfo(lc.name, lc.work, grid, block, lc.bound,
                                      lc.schedule, lc.shared_bytes))
        return out

    def __repr__(self) -> str:
        n = sum(len(s.calls) for s in self._steps)
        return (f"<CudaProgram {self.graph.name}: {len(self._steps)} kernels, {n} launches on "
                f"{self.device.name}>")


def param_storage(plan: MemoryPlan, t: int, step: KernelStep, buf: K.Buffer) -> Storage:
    """Where kernel parameter ``buf`` of step ``t`` lives: a graph input or output (by
    position), or a byte offset in the arena or the constant blob."""
    value = step.reads.get(buf.name) or step.writes.get(buf.name)
    if buf.name in step.temps:
        key = f"{t}:{buf.name}"
    else:
        key = value if value in plan.storage else buf.name
    if key not in plan.storage:
        raise KilnError(f"kernel {step.kernel.name}: no storage for buffer {buf.name}",
                        node=step.root, hint="this is a kiln bug; please report it")
    return plan.storage[key]


def check_inputs_one(g: Graph, k: int, a: Any) -> np.ndarray:
    """Host input ``k`` as an array, checked against the graph's signature (KilnError if
    off, worded like the other backends')."""
    name = g.inputs[k]
    a = np.asarray(a)
    want = g.types[name]
    if a.dtype != want.dtype.numpy or a.shape != want.shape:
        raise KilnError(f"input %{name} expects {want}, got {a.dtype}{list(a.shape)}",
                        hint="kiln compiles for the example inputs' shapes and dtypes; compile "
                             "again with an example of this shape")
    return a


def _is_device_array(a: Any) -> bool:
    return hasattr(a, "__cuda_array_interface__") or (
        hasattr(a, "copy_to_host") and hasattr(a, "copy_to_device"))


def _device_empty(cuda, n: int, dtype) -> Any:
    """A flat device array of ``n`` elements (a zero-length view for ``n`` = 0, which not every
    driver allocates)."""
    return cuda.device_array(max(n, 1), dtype)[:n]


@register_stage
class CudaSource(Stage):
    """Kernel IR -> numba.cuda source, one function per launch, with the launch schedules of
    ``tuning`` (default: the GPU's)."""

    name = "cuda_source"
    description = "render every kernel as numba.cuda source with its launch schedules"
    level = CODE

    def __init__(self, tuning: CudaTuning | None = None) -> None:
        self.tuning = tuning or GPU_TUNING

    def apply(self, c: Compilation) -> Compilation:
        sources = [render_scheduled(step.kernel, self.tuning) for step in c.lowered.steps]
        return c.with_code("\n".join(src.text for src in sources), cuda_sources=sources)


@register_stage
class Ptx(Stage):
    """numba.cuda source -> PTX for compute capability ``cc`` (needs libNVVM, no GPU)."""

    name = "ptx"
    description = "compile every CUDA kernel to PTX (numba's compiler, libNVVM)"
    level = CODE

    def __init__(self, cc: tuple[int, int] = (8, 0), compile_ptx=None) -> None:
        self.cc = cc
        self.compile_ptx = compile_ptx or source_ptx

    def apply(self, c: Compilation) -> Compilation:
        ptx: dict[str, str] = {}
        for src in c.code["cuda_sources"]:
            ptx.update(self.compile_ptx(src.text, src.kernel.name, self.cc))
        return c.with_code("\n".join(ptx.values()), ptx=ptx)


def cuda_stages(width: int = 1) -> list[str]:
    """The shared kernel pipeline as the CUDA backend runs it: scalar kernels (width 1, the
    GPU's natural form) are not scheduled; a CPU width schedules them as the CPU would."""
    from kiln.passes.compile import kernel_stages

    return kernel_stages(schedule=width > 1)


def compile_graph_cuda(graph: Graph, *, width: int = 1,
                       tuning: CudaTuning | None = None) -> CudaProgram:
    """Compile ``graph`` to numba.cuda kernels.

    Dense nests (linear, matmul, conv and the int8 GEMMs) run as shared-memory tiled GEMMs,
    row reductions (softmax, norms, reduce_*) with a thread block per row, everything else
    with the generic grid-stride mapping (see ``schedule``). ``tuning`` sets those schedules'
    sizes (default: the GPU's, or small blocks in the simulator; ``schedule.GENERIC`` turns
    them off).

    ``width`` 1 (the default) lowers every group to scalar loop nests, the natural form for GPU
    threads. A larger width applies the CPU's schedules (packed GEMM micro-kernels with
    workspaces, vector loads and reductions): they are correct loop nests too and run as they
    are, scalarized, which tests the code generator on every construct of the kernel IR.

    Raises:
        KilnError: when numba's CUDA is unavailable (no GPU and no simulator), or for a graph
            that cannot be lowered (naming its node and op).
    """
    device = cuda_device()
    verify(graph)
    t0 = time.perf_counter()
    c = compile_kernels(graph, width=width, schedule=width > 1)
    t1 = time.perf_counter()
    if tuning is None:
        tuning = SIM_TUNING if device.simulated else GPU_TUNING
    c = CudaSource(tuning).apply(c)
    t2 = time.perf_counter()
    program = CudaProgram(graph, c.lowered, c.memory, c.code["cuda_sources"], device, {})
    t3 = time.perf_counter()
    program.timings.update(lower=t1 - t0, codegen=t2 - t1, jit=t3 - t2)
    return program


def run_kernel_cuda(kernel: K.Kernel, buffers: dict[str, np.ndarray],
                    tuning: CudaTuning | None = None) -> str:
    """Run one kernel on the device, in place on flat NumPy ``buffers`` (by parameter name),
    like ``kiln.ir.kernel.run_kernel`` does in the interpreter; returns the generated source.

    For tests and debugging: it uploads and downloads every buffer."""
    device = cuda_device()
    if tuning is None:
        tuning = SIM_TUNING if device.simulated else GPU_TUNING
    src = render_scheduled(kernel, tuning)
    ns = load_source(src.text, kernel.name)
    cuda = device.cuda
    dev = {}
    for p in kernel.params:
        arr = buffers.get(p.name)
        if arr is None or arr.ndim != 1 or arr.size < p.size or arr.dtype != K.np_dtype(p.dtype):
            raise KilnError(f"run_kernel_cuda: buffer {p.name} must be flat {p.dtype}[{p.size}]")
        dev[p.name] = cuda.to_device(arr) if arr.size else _device_empty(cuda, 0, arr.dtype)
    with device.pacing():
        for launch in src.launches:
            if launch.work:
                ns[launch.name][launch_shape(launch, device)](*[dev[p] for p in launch.params])
    for p in kernel.params:
        if buffers[p.name].size:
            buffers[p.name][...] = dev[p.name].copy_to_host()
    return src.text


def compile_graph_ptx(graph: Graph, *, cc: tuple[int, int] = (8, 0), width: int = 1,
                      tuning: CudaTuning = GPU_TUNING) -> dict[str, str]:
    """PTX for compute capability ``cc`` of every CUDA kernel of ``graph`` (by function name,
    in execution order), compiled by numba's CUDA compiler without a GPU (it needs the CUDA
    toolkit's libNVVM, and a process without NUMBA_ENABLE_CUDASIM).

    It checks, on any machine with the toolkit, that the generated kernels type and compile
    for a real device."""
    verify(graph)
    c = compile_kernels(graph, width=width, schedule=width > 1,
                        code_stages=[CudaSource(tuning), Ptx(cc)])
    return c.code["ptx"]


def compile_graph(graph: Graph, threads: int = 0) -> CudaProgram:
    """The backend interface (``kiln.compile(..., backend="cuda")``). ``threads`` (CPU worker
    threads) does not apply to a GPU and is accepted for a uniform interface."""
    del threads
    return compile_graph_cuda(graph)
