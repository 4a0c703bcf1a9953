"""Numba's CUDA, loaded on demand: the real driver or its simulator, and the namespace the
generated kernels run in.

The generated source is the same on both; only the names it refers to differ. On a GPU the
type constructors are numba's types and ``math`` is Python's module, which numba compiles to
libdevice calls. In the simulator the kernels are plain Python run by one Python thread per CUDA
thread: there the type constructors are NumPy's scalar types and ``math`` is a NumPy-backed
stand-in, so float32 arithmetic stays float32 and overflow or a domain error gives inf/NaN as
on the GPU instead of a Python exception.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import math
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from kiln.backends.cuda.codegen import NUMBA_TYPES, TYPE_NAMES
from kiln.ir import KilnError
from kiln.ir.kernel import np_dtype

NO_CUDA_HINT = ("set NUMBA_ENABLE_CUDASIM=1 in the environment before numba is imported to run "
                "on Numba's CUDA simulator (slow; for tests), or use a machine with an NVIDIA "
                "GPU and its driver")

# Threads per block and blocks per multiprocessor on a GPU. The simulator runs one Python thread
# per CUDA thread and one block after another: a few threads in two blocks exercise the
# grid-stride loop across blocks without paying for hundreds of threads.
GPU_BLOCK = 256
GPU_BLOCKS_PER_SM = 32
SIM_BLOCK = 4
SIM_BLOCKS = 2
SIM_SWITCH_INTERVAL = 1e-4


@dataclass(frozen=True)
class CudaDevice:
    """The loaded ``numba.cuda`` module, whether it is the simulator, and the device's size."""

    cuda: Any
    simulated: bool
    name: str
    multiprocessors: int
    compute_capability: tuple[int, int] = (0, 0)

    def as_device_array(self, a: Any) -> Any:
        """``a`` as a numba device array without a copy: numba device arrays as they are,
        anything else through its ``__cuda_array_interface__`` (a CUDA torch tensor, CuPy).

        In the simulator, device memory is host memory: the interface's pointer is read as a
        host address (what a stand-in for a device array hands out in tests), and a tensor
        that really lives on a GPU is refused."""
        if hasattr(a, "copy_to_host"):
            return a
        if not self.simulated:
            return self.cuda.as_cuda_array(a)
        if getattr(getattr(a, "device", None), "type", None) == "cuda":
            raise KilnError("Numba's CUDA simulator cannot read GPU memory (a CUDA tensor)",
                            hint="pass CPU tensors or NumPy arrays to a model compiled in the "
                                 "simulator")
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        cai = a.__cuda_array_interface__
        host = SimpleNamespace(__array_interface__={
            "shape": tuple(cai["shape"]), "typestr": cai["typestr"], "data": cai["data"],
            "strides": cai.get("strides"), "version": 3})
        return FakeCUDAArray(np.asarray(host))

    @contextlib.contextmanager
    def pacing(self) -> Iterator[None]:
        """Around launches: in the simulator, a short GIL switch interval. Its block manager
        busy-polls the block's Python threads for barriers, so with Python's default 5 ms
        interval every ``cuda.syncthreads()`` costs several milliseconds; at 0.1 ms about one.
        The interval is the process's, so it is restored on the way out. No-op on a GPU."""
        if not self.simulated:
            yield
            return
        _serialize_simulated_shared_arrays()
        _simulate_warp_shuffles()
        old = sys.getswitchinterval()
        sys.setswitchinterval(min(old, SIM_SWITCH_INTERVAL))
        try:
            yield
        finally:
            sys.setswitchinterval(old)

    def launch_config(self, work: int, parallel: bool) -> tuple[int, int]:
        """(blocks, threads per block) for a grid-stride loop of ``work`` iterations."""
        if not parallel or work <= 1:
            return 1, 1
        block = SIM_BLOCK if self.simulated else GPU_BLOCK
        max_blocks = SIM_BLOCKS if self.simulated else GPU_BLOCKS_PER_SM * self.multiprocessors
        block = min(block, work)
        return min(-(-work // block), max_blocks), block


@functools.cache
def cuda_device() -> CudaDevice:
    """numba.cuda and the device it drives (a KilnError when there is neither a GPU nor the
    simulator)."""
    try:
        import numba
        from numba import cuda
    except ImportError as e:
        raise KilnError(f"the cuda backend needs numba, which cannot be imported ({e})",
                        hint="pip install numba") from None
    simulated = bool(numba.config.ENABLE_CUDASIM)
    if not simulated and os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        raise KilnError("NUMBA_ENABLE_CUDASIM was set after numba was imported, so numba uses "
                        "the real CUDA driver", hint=NO_CUDA_HINT)
    if not cuda.is_available():
        raise KilnError("the cuda backend found no usable CUDA GPU (numba.cuda.is_available() "
                        "is False)", hint=NO_CUDA_HINT)
    if simulated:
        return CudaDevice(cuda, True, "Numba CUDA simulator", 1)
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    major, minor = dev.compute_capability
    return CudaDevice(cuda, False, name, int(dev.MULTIPROCESSOR_COUNT),
                      (int(major), int(minor)))


def ptx_target(cc: tuple[int, int]) -> tuple[int, int]:
    """The compute capability to generate PTX for on a GPU of compute capability ``cc``: the
    newest one numba's NVVM supports that is not newer than ``cc`` (the driver compiles PTX
    forward to the device, so a GPU newer than NVVM runs its newest target)."""
    from numba.cuda.cudadrv import nvvm

    supported = [tuple(c) for c in nvvm.get_supported_ccs() if tuple(c) <= tuple(cc)]
    if not supported:
        raise KilnError(f"numba's CUDA compiler supports no target at or below compute "
                        f"capability {cc[0]}.{cc[1]}",
                        hint="this GPU is older than numba supports; use the llvm backend")
    return max(supported)


PTX_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(")


def ptx_entry(ptx: str, label: str) -> str:
    """The name of the (single) ``.entry`` of a kernel's PTX."""
    found = PTX_ENTRY.search(ptx)
    if found is None:
        raise KilnError(f"the PTX of {label} has no .entry",
                        hint="this is a kiln bug; please report it")
    return found.group(1)


def _sim_math() -> SimpleNamespace:
    from scipy import special

    return SimpleNamespace(exp=np.exp, log=np.log, sqrt=np.sqrt, tanh=np.tanh, erf=special.erf,
                           floor=np.floor, trunc=np.trunc, sin=np.sin, cos=np.cos,
                           atan=np.arctan)


@functools.cache
def _namespace_base(simulated: bool) -> dict:
    import numba
    from numba import cuda

    ns: dict[str, Any] = {"cuda": cuda, "numba": numba, "_INF": math.inf, "_NAN": math.nan}
    for dtype, name in TYPE_NAMES.items():
        ns[name] = np_dtype(dtype).type if simulated else getattr(numba.types,
                                                                  NUMBA_TYPES[dtype])
    ns["math"] = _sim_math() if simulated else math
    if simulated:
        ns["_rint32"] = ns["_rint64"] = np.rint
    else:
        from numba.cuda import libdevice

        ns["_rint32"], ns["_rint64"] = libdevice.rintf, libdevice.rint
    return ns


_counter = 0


def load_source(text: str, label: str) -> dict[str, Any]:
    """Execute generated kernel source in a fresh namespace; returns that namespace.

    The text is registered with ``linecache`` so tracebacks (and numba's error messages) show
    the generated lines."""
    global _counter
    _counter += 1
    filename = f"<kiln-cuda {_counter} {label}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    ns = dict(_namespace_base(cuda_device().simulated))
    _exec_source(text, filename, ns, label)
    return ns


def _exec_source(text: str, filename: str, ns: dict[str, Any], label: str) -> None:
    try:
        exec(compile(text, filename, "exec"), ns)
    except Exception as e:  # numba type or compile errors surface here with an eager signature
        raise KilnError(f"numba could not compile the CUDA kernels of {label}: "
                        f"{type(e).__name__}: {e}",
                        hint="this is a kiln bug; please report it with the kernel source "
                             "(CudaProgram.source)") from e


class _RecordingJit:
    """Stands for ``numba.cuda`` while generated source is executed for PTX: ``@cuda.jit(sig)``
    records the signature and leaves the Python function as it is."""

    def __init__(self) -> None:
        self.signatures: dict[str, str] = {}

    def jit(self, signature: str):
        def record(fn):
            self.signatures[fn.__name__] = signature
            return fn

        return record


def source_ptx(text: str, label: str, cc: tuple[int, int] = (8, 0)) -> dict[str, str]:
    """PTX for compute capability ``cc`` of every kernel in generated ``text``, from numba's
    CUDA compiler (NVVM): it needs the CUDA toolkit's libNVVM, not a GPU. Unavailable in the
    simulator, which has no compiler."""
    import numba

    if numba.config.ENABLE_CUDASIM:
        raise KilnError("PTX cannot be generated under the CUDA simulator",
                        hint="unset NUMBA_ENABLE_CUDASIM (in a fresh process)")
    from numba import cuda

    recorder = _RecordingJit()
    ns = dict(_namespace_base(False))
    ns["cuda"] = recorder
    _exec_source(text, f"<kiln-cuda ptx {label}>", ns, label)
    ns["cuda"] = cuda  # the kernels' bodies are compiled against the real module
    out = {}
    for name, signature in recorder.signatures.items():
        try:
            out[name], _ = cuda.compile_ptx(ns[name], signature, cc=cc)
        except Exception as e:
            raise KilnError(f"numba could not compile CUDA kernel {name} of {label}: "
                            f"{type(e).__name__}: {e}",
                            hint="this is a kiln bug; please report it with the kernel "
                                 "source") from e
    return out


@functools.cache
def _serialize_simulated_shared_arrays() -> None:
    """Make the simulator's ``cuda.shared.array`` allocate once per block.

    The simulator looks an allocation up by call site and creates it when missing, without a
    lock: when two threads of a block reach the line together, both create one and the block
    silently computes with two "shared" arrays (wrong results a few runs in a hundred, more
    often with the short switch interval above). A lock around that lookup is all it needs."""
    from numba.core import types
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    from numba.np import numpy_support

    lock = threading.Lock()
    dynamic = FakeCUDAShared.array

    def array(self, shape, dtype):
        if shape == 0:  # dynamic shared memory: one buffer, nothing to race on
            return dynamic(self, shape, dtype)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)  # the kernel's line identifies the allocation, as before
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    FakeCUDAShared.array = array


@functools.cache
def _simulate_warp_shuffles() -> None:
    """Give the simulator ``cuda.shfl_sync_intrinsic``, which it lacks, for the two modes the
    generated kernels use: 2 (down: the value ``b`` lanes up within the lane group, or the
    thread's own past the group's end) and 0 (idx: lane ``b`` of the group). The group width
    comes from ``c`` as on a GPU (``c = ((32 - width) << 8) | 0x1f``), so a simulated block of
    a few threads can run several "warps".

    The threads exchange values through a per-block array between two barriers, so, unlike a
    GPU's shuffle, every thread of the block must call it together: the kernels do (their
    shuffles run in uniform control flow)."""
    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    def shfl_sync_intrinsic(self, mask, mode, value, b, c):
        if self.blockDim.y != 1 or self.blockDim.z != 1 or mode not in (0, 2):
            raise KilnError("kiln's simulated warp shuffle takes 1-d blocks and modes 0 (idx) "
                            "and 2 (down) only", hint="this is a kiln bug; please report it")
        width = 32 - ((c >> 8) & 0x1F)
        tid = self.threadIdx.x
        exchange = self.shared.array(self.blockDim.x, object)
        exchange[tid] = value
        self.syncthreads()
        lane = tid % width
        src = lane + b if mode == 2 else b % width
        valid = src < width
        out = exchange[tid - lane + src] if valid else value
        self.syncthreads()
        return out, valid

    FakeCUDAModule.shfl_sync_intrinsic = shfl_sync_intrinsic
