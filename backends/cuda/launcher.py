"""Prepared CUDA launches: PTX loaded once, every kernel's argument block built once.

numba's ``kernel[grid, block](*args)`` re-types its arguments and rebuilds their parameter
structures on every call (tens of microseconds per launch, more than a small kernel runs). A
compiled kiln model launches the same kernels on the same buffers every time: only the
addresses of the caller's inputs and outputs change. So ``PreparedLaunches`` builds each launch's
parameter block once, as ctypes values in numba's array ABI (per ``dtype[::1]`` argument:
meminfo, parent, item count, item size, data pointer, shape, stride, the layout numba's own
launcher passes), and a call only writes the caller's pointers into the data slots and hands
each block to ``cuLaunchKernel`` through numba's driver binding.

The JIT program (``program.CudaProgram``) on a GPU and the CUDA artifact loader
(``artifact.CudaArtifactModel``) both launch this way; Numba's simulator, which has no driver,
keeps numba's own dispatch.

CUDA graphs would batch the launches further, but numba's driver binding (its ctypes prototypes,
the default) exposes no graph or stream-capture functions, so kiln does not use them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kiln.ir import KilnError

ARRAY_ABI_FIELDS = 7
"""Kernel parameters per ``dtype[::1]`` array in numba's ABI, each eight bytes wide."""


@dataclass(frozen=True)
class LaunchPlan:
    """One launch to prepare: its PTX module text and ``.entry`` name, grid and block, and per
    argument where it comes from: ("static", device array), ("input", i) or ("output", j),
    with the argument's element count and item size (fixed by the graph's signature)."""

    name: str
    ptx: str
    entry: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[tuple[str, Any, int, int], ...]


def device_address(array: Any) -> int:
    """The device address of a numba device array (0 for an empty one, which may have none)."""
    if array.size == 0:
        return 0
    return int(array.__cuda_array_interface__["data"][0])


class _Prepared:
    """One launch's function handle, parameter block and the data slots a call rewrites."""

    __slots__ = ("name", "handle", "grid", "block", "values", "params", "dynamic")

    def __init__(self, name: str, handle: Any, grid, block, values: list, params: Any,
                 dynamic: list[tuple[ctypes.c_void_p, str, int]]) -> None:
        self.name, self.handle, self.grid, self.block = name, handle, grid, block
        self.values, self.params, self.dynamic = values, params, dynamic


class PreparedLaunches:
    """Kernels loaded from PTX with their parameter blocks; ``launch`` runs them in order.

    ``launch(inputs, outputs, first, last)`` takes flat device arrays for the graph's inputs and
    outputs (their sizes are checked by the caller) and launches ``first..last`` on the legacy
    default stream, which orders them after earlier work on any blocking stream (a CUDA torch
    tensor's producer included)."""

    def __init__(self, plans: Sequence[LaunchPlan]) -> None:
        from numba import cuda
        from numba.cuda.cudadrv import driver

        self._driver = driver
        self._call = driver.driver.cuLaunchKernel
        self._nv = bool(driver.USE_NV_BINDING)
        self._stream = driver.binding.CUstream(0) if self._nv else None
        ctx = cuda.current_context()
        self.modules: list[Any] = []  # kept alive: their functions are used by handle
        self._launches: list[_Prepared] = []
        for plan in plans:
            try:
                module = ctx.create_module_ptx(plan.ptx)
                function = module.get_function(plan.entry)
            except Exception as e:
                raise KilnError(f"the CUDA driver could not load the PTX of {plan.name}: {e}",
                                hint="the driver may be older than the CUDA toolkit that "
                                     "wrote the PTX; update the driver") from e
            self.modules.append(module)
            self._launches.append(self._prepare(plan, function.handle))

    def _prepare(self, plan: LaunchPlan, handle: Any) -> _Prepared:
        values: list[Any] = []
        dynamic: list[tuple[ctypes.c_void_p, str, int]] = []
        for kind, where, count, itemsize in plan.args:
            data = ctypes.c_void_p(device_address(where) if kind == "static" else 0)
            if kind != "static":
                dynamic.append((data, kind, int(where)))
            values += [ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_ssize_t(count),
                       ctypes.c_ssize_t(itemsize), data, ctypes.c_ssize_t(count),
                       ctypes.c_ssize_t(itemsize)]
        block = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
        values.append(block)  # the ctypes values and the block live as long as the launch
        # numba's ctypes binding takes the array; the NVIDIA binding takes its address.
        params = ctypes.addressof(block) if self._nv else block
        return _Prepared(plan.name, handle, tuple(plan.grid), tuple(plan.block), values,
                         params, dynamic)

    def __len__(self) -> int:
        return len(self._launches)

    def names(self) -> list[str]:
        return [p.name for p in self._launches]

    def launch(self, inputs: Sequence[Any], outputs: Sequence[Any], first: int = 0,
               last: int | None = None) -> None:
        addresses = {"input": [device_address(a) for a in inputs],
                     "output": [device_address(a) for a in outputs]}
        extra = 0 if self._nv else None
        for p in self._launches[first:last]:
            for slot, kind, index in p.dynamic:
                slot.value = addresses[kind][index]
            self._call(p.handle, *p.grid, *p.block, 0, self._stream, p.params, extra)

