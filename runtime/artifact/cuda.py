"""CUDA artifacts: a compiled model as PTX plus everything needed to launch it, in one file.

The container is every kiln artifact's (runtime/artifact/format.py: magic, format, JSON
header, checksummed parts) with ``"kind": "cuda"`` in the header, which the CPU loader refuses
with a pointer here. The header holds the format and kiln version, the target compute
capability, the input and output signature, the arena size, the launch table (per CUDA launch:
its PTX part, PTX entry name, grid and block or the grid-stride work, static shared memory, and
where each argument lives: an arena or constant-blob byte range, or a graph input or output)
and, for every part of the data (the constant blob, one PTX module per launch, constant
outputs), its offset, size and SHA-256. Nothing is pickled or evaluated.

``export_cuda`` renders every kernel with the GPU schedules and compiles it to PTX with numba's
CUDA compiler (libNVVM; no GPU needed). ``load_cuda`` checks the magic, the kind, the format
version, every field, that parts lie inside the data without overlapping, every checksum, that
every argument range lies inside its buffer, and only then that a CUDA GPU of at least the
artifact's compute capability is present (PTX is compiled forward by the driver), before it
hands the PTX to the driver. Under Numba's CUDA simulator it refuses: the simulator runs Python
source, not PTX.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.backends.cuda.device import PTX_ENTRY, cuda_device, ptx_entry, ptx_target, source_ptx
from kiln.backends.cuda.launcher import LaunchPlan, PreparedLaunches
from kiln.backends.cuda.schedule import GPU_TUNING, CudaTuning
from kiln.ir import Graph, KilnError, verify
from kiln.ir import kernel as K
from kiln.ir.types import DType
from kiln.runtime.artifact.format import Validator, read_container, write_container

KIND = "cuda"
DEFAULT_CC = (8, 0)
MAX_ARENA_BYTES = 1 << 40
MAX_KERNELS = 1 << 16
MAX_SHARED_BYTES = 48 << 10  # static shared memory per block on every CUDA device
_ARG_KINDS = ("arena", "const", "input", "output")


class CudaArtifactError(KilnError):
    """A CUDA artifact that cannot be loaded: damaged, from another kiln, or for a GPU this
    machine does not have."""


def _fail(message: str, hint: str | None = None) -> CudaArtifactError:
    return CudaArtifactError(message, hint=hint or "export the model again with this kiln version")


@dataclass(frozen=True)
class ArgSpec:
    """Where a launch argument lives: a byte offset in the arena or the constant blob, or a
    graph input or output by position; and its element type and count."""

    kind: str
    index: int
    dtype: str
    size: int


@dataclass(frozen=True)
class LaunchEntry:
    """One CUDA launch of an artifact: its PTX part and entry, its launch shape (``grid`` and
    ``block``, or None for a grid-stride loop of ``work`` iterations sized on the device),
    static shared memory and arguments."""

    name: str
    kernel: str
    entry: str
    schedule: str
    grid: tuple[int, int, int] | None
    block: tuple[int, int, int] | None
    work: int
    parallel: bool
    shared_bytes: int
    args: tuple[ArgSpec, ...]


@dataclass
class CudaImage:
    """Everything in a CUDA artifact, in memory."""

    cc: tuple[int, int]
    inputs: list[tuple[str, str, tuple[int, ...]]]
    outputs: list[tuple[str, str, tuple[int, ...]]]
    arena_bytes: int
    const_blob: np.ndarray
    launches: list[LaunchEntry]
    ptx: dict[str, str]
    output_copies: dict[int, tuple[str, int]] = field(default_factory=dict)
    copy_constants: dict[int, np.ndarray] = field(default_factory=dict)


# ---- building --------------------------------------------------------------------------------
def default_cc() -> tuple[int, int]:
    """The PTX target for this machine's GPU (its compute capability, or the newest one numba
    compiles for when the GPU is newer), or sm_80 without one (or under the simulator)."""
    import numba

    if numba.config.ENABLE_CUDASIM:
        return DEFAULT_CC
    from numba import cuda

    try:
        cc = cuda.get_current_device().compute_capability if cuda.is_available() else None
    except Exception:  # a broken driver: export for the default target all the same
        cc = None
    return DEFAULT_CC if cc is None else ptx_target((int(cc[0]), int(cc[1])))


def _lowered(source: Any):
    """(graph, lowered graph, memory plan) of a CompiledModel, CudaProgram or Graph."""
    from kiln.backends.cuda.program import CudaProgram
    from kiln.passes.compile import compile_kernels

    executable = getattr(source, "executable", None)
    if executable is not None:  # a kiln.compile result, for any backend: its graph will do
        program = getattr(executable, "program", None)
        source = program if isinstance(program, CudaProgram) else executable.graph
    if isinstance(source, CudaProgram):
        return source.graph, source.lowered, source.plan
    if isinstance(source, Graph):
        verify(source)
        c = compile_kernels(source, schedule=False)
        return source, c.lowered, c.memory
    raise KilnError(f"export_cuda takes a compiled model, a CudaProgram or a Graph, got "
                    f"{type(source).__name__}")


def _signature(graph: Graph, names: Sequence[str]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(n, graph.types[n].dtype.value, tuple(graph.types[n].shape)) for n in names]


def build_cuda_image(source: Any, *, cc: tuple[int, int] | None = None,
                     tuning: CudaTuning = GPU_TUNING,
                     compile_ptx: Callable[[str, str, tuple[int, int]], dict[str, str]]
                     = source_ptx) -> CudaImage:
    """The CUDA image of ``source`` (a compiled model, a CudaProgram or a Graph): every kernel
    rendered with ``tuning`` and compiled to PTX for ``cc`` (default: this machine's GPU, else
    sm_80) by ``compile_ptx`` (numba's compiler; it needs libNVVM and a process without the
    simulator)."""
    from kiln.backends.cuda.program import CudaSource, Ptx, param_storage
    from kiln.passes.compile import Compilation, run_stages

    graph, lowered, plan = _lowered(source)
    major, minor = cc or default_cc()
    target = (int(major), int(minor))
    # The code stages of the shared pipeline, on the kernels the model was compiled to.
    code = run_stages(Compilation(graph, lowered=lowered, memory=plan),
                      [CudaSource(tuning), Ptx(target, compile_ptx)]).code
    launches: list[LaunchEntry] = []
    ptx: dict[str, str] = {}
    for t, (step, src) in enumerate(zip(lowered.steps, code["cuda_sources"])):
        kernel = step.kernel
        compiled = code["ptx"]
        storage = {b.name: param_storage(plan, t, step, b) for b in kernel.params}
        buffers = {b.name: b for b in kernel.params}
        for launch in src.launches:
            text = compiled[launch.name]
            entry = ptx_entry(text, launch.name)
            args = tuple(ArgSpec(storage[p].kind, int(storage[p].index), buffers[p].dtype,
                                 buffers[p].size) for p in launch.params)
            lc = LaunchEntry(launch.name, kernel.name, entry, launch.schedule, launch.grid,
                             launch.block, int(launch.work), bool(launch.parallel),
                             int(launch.shared_bytes), args)
            ptx[launch.name] = launch_record(lc) + "\n" + text
            launches.append(lc)
    copies: dict[int, tuple[str, int]] = {}
    copy_constants: dict[int, np.ndarray] = {}
    for j, src_value in plan.output_copies.items():
        if src_value in graph.inputs:
            copies[j] = ("input", graph.inputs.index(src_value))
        elif src_value in graph.constants:
            copies[j] = ("const", j)
            copy_constants[j] = np.ascontiguousarray(graph.constants[src_value])
        else:
            copies[j] = ("output", graph.outputs.index(src_value))
    return CudaImage(target, _signature(graph, graph.inputs),
                     _signature(graph, graph.outputs), int(plan.arena_bytes),
                     np.ascontiguousarray(plan.const_blob).view(np.uint8).reshape(-1),
                     launches, ptx, copies, copy_constants)


RECORD = "// kiln-record 1 "


def launch_record(lc: LaunchEntry) -> str:
    """The first line of a launch's PTX: what the kernel was compiled for (its grid, block,
    shared memory and every argument's buffer, offset, dtype and size), written with the
    code. A loader compares it with the launch table of the header, as the CPU loader compares
    the object code's signature record (backends/llvm/objcheck.py)."""
    args = ";".join(f"{a.kind}:{a.index}:{a.dtype}:{a.size}" for a in lc.args)
    grid = ",".join(map(str, lc.grid)) if lc.grid else "-"
    block = ",".join(map(str, lc.block)) if lc.block else "-"
    return (f"{RECORD}launch={lc.name} entry={lc.entry} grid={grid} block={block} "
            f"shared={lc.shared_bytes} work={lc.work} args={args}")


def save_cuda_image(path: str | os.PathLike, image: CudaImage, *,
                    kiln_version: str = "", sign_key: Any = None,
                    overwrite: bool = True) -> Path:
    """Write ``image`` at ``path`` (through a temporary file renamed into place, so a failed
    write never leaves half an artifact)."""
    parts: dict[str, bytes] = {"consts": image.const_blob.tobytes()}
    for name, text in image.ptx.items():
        parts[f"ptx_{name}"] = text.encode("ascii")
    tensors = {}
    for j, arr in image.copy_constants.items():
        arr = np.ascontiguousarray(arr)
        parts[f"output{j}"] = arr.tobytes()
        tensors[f"output{j}"] = {"dtype": DType.from_numpy(arr.dtype).value,
                                 "shape": list(arr.shape), "output": int(j)}
    header = {
        "kind": KIND,
        "kiln_version": kiln_version,
        "target": {"compute_capability": list(image.cc)},
        "inputs": [[n, d, list(s)] for n, d, s in image.inputs],
        "outputs": [[n, d, list(s)] for n, d, s in image.outputs],
        "arena_bytes": int(image.arena_bytes),
        "launches": [{
            "name": lc.name, "kernel": lc.kernel, "entry": lc.entry, "part": f"ptx_{lc.name}",
            "schedule": lc.schedule, "grid": list(lc.grid) if lc.grid else None,
            "block": list(lc.block) if lc.block else None, "work": lc.work,
            "parallel": lc.parallel, "shared_bytes": lc.shared_bytes,
            "args": [[a.kind, a.index, a.dtype, a.size] for a in lc.args],
        } for lc in image.launches],
        "output_copies": {str(j): [k, int(i)] for j, (k, i) in image.output_copies.items()},
        "tensors": tensors,
    }
    return write_container(path, header, parts, sign_key=sign_key, overwrite=overwrite)


def export_cuda(source: Any, path: str | os.PathLike, *, cc: tuple[int, int] | None = None,
                overwrite: bool = False, tuning: CudaTuning = GPU_TUNING,
                sign_key: Any = None) -> Path:
    """Write ``source`` (a ``kiln.compile`` result, a CudaProgram or a Graph) as a CUDA
    artifact: PTX for compute capability ``cc`` (default: this machine's GPU, else sm_80) of
    every kernel, with its launch configuration and the memory plan. Needs numba's CUDA
    compiler (the toolkit's libNVVM) in a process without the simulator, not a GPU. An
    existing file is kept unless ``overwrite``; ``sign_key`` signs it (see ``kiln.export``)."""
    import numba

    if numba.config.ENABLE_CUDASIM:
        raise KilnError("CUDA artifacts hold PTX, which cannot be generated under the CUDA "
                        "simulator", hint="export in a process without NUMBA_ENABLE_CUDASIM")
    path = Path(path)
    if path.exists() and not overwrite:
        raise KilnError(f"{path} already exists",
                        hint="choose another path or pass overwrite=True")
    from kiln import __version__

    return save_cuda_image(path, build_cuda_image(source, cc=cc, tuning=tuning),
                           kiln_version=__version__, sign_key=sign_key, overwrite=overwrite)


# ---- reading ---------------------------------------------------------------------------------
_check = Validator(_fail, "CUDA artifact manifest")
_want, _is_int = _check.want, _check.is_int


def _name(v: Any, what: str) -> str:
    _want(isinstance(v, str) and 0 < len(v) <= 1024 and v.isascii(),
          f"{what} must be a short ASCII string")
    _want(not any(b in v for b in ("/", "\\", "\0", "..")), f"{what} {v!r} looks like a path")
    return v


_DTYPES = {d.value for d in DType}


def _dims(v: Any, what: str, limits: tuple[int, int, int]) -> tuple[int, int, int] | None:
    if v is None:
        return None
    _want(isinstance(v, list) and len(v) == 3 and all(_is_int(d) and 1 <= d <= lim
                                                       for d, lim in zip(v, limits)),
          f"{what} must be three positive integers within the device limits")
    return v[0], v[1], v[2]


def _launch(raw: Any, blobs: dict[str, bytes], sizes: dict[str, int],
            signature: dict[str, list]) -> tuple[LaunchEntry, str]:
    _want(isinstance(raw, dict), "a launch must be an object")
    name = _name(raw.get("name"), "launch name")
    part = raw.get("part")
    _want(part in blobs and str(part).startswith("ptx_"), f"launch {name} names no PTX part")
    try:
        ptx = blobs[part].decode("ascii")
    except UnicodeDecodeError:
        raise _fail(f"PTX part {part} is not ASCII text") from None
    _want(".version" in ptx and ".target" in ptx, f"PTX part {part} has no PTX header")
    entry = raw.get("entry")
    _want(isinstance(entry, str) and entry in PTX_ENTRY.findall(ptx),
          f"launch {name}: entry {entry!r} is not an entry of its PTX")
    grid = _dims(raw.get("grid"), f"launch {name} grid", ((1 << 31) - 1, 65535, 65535))
    block = _dims(raw.get("block"), f"launch {name} block", (1024, 1024, 64))
    _want((grid is None) == (block is None), f"launch {name}: grid and block go together")
    _want(block is None or math.prod(block) <= 1024, f"launch {name}: more than 1024 threads")
    work, shared = raw.get("work"), raw.get("shared_bytes")
    _want(_is_int(work) and 0 <= work < (1 << 62), f"launch {name}: bad work")
    _want(_is_int(shared) and 0 <= shared <= MAX_SHARED_BYTES,
          f"launch {name}: bad shared memory size")
    _want(isinstance(raw.get("parallel"), bool), f"launch {name}: parallel must be a boolean")
    _want(isinstance(raw.get("schedule"), str), f"launch {name}: schedule must be a string")
    args = raw.get("args")
    _want(isinstance(args, list) and len(args) <= 256, f"launch {name}: args must be a list")
    specs = []
    for a in args:
        _want(isinstance(a, list) and len(a) == 4 and a[0] in _ARG_KINDS and _is_int(a[1])
              and a[2] in _DTYPES and _is_int(a[3]) and a[1] >= 0 and a[3] >= 0,
              f"launch {name}: argument {a!r} is malformed")
        kind, index, dtype, size = a
        itemsize = DType(dtype).itemsize
        if kind in ("arena", "const"):
            # Every byte the argument covers lies inside its buffer, at its type's alignment.
            _want(index % itemsize == 0 and index + size * itemsize <= sizes[kind],
                  f"launch {name}: argument range [{index}, +{size * itemsize}) lies outside "
                  f"the {kind} ({sizes[kind]} bytes)")
        else:
            sig = signature[kind]
            _want(index < len(sig), f"launch {name}: {kind} {index} does not exist")
            _, sdtype, shape = sig[index]
            _want(sdtype == dtype and math.prod(shape) == size,
                  f"launch {name}: {kind} {index} is {sdtype}{list(shape)}, the argument "
                  f"{dtype}[{size}]")
        specs.append(ArgSpec(kind, index, dtype, size))
    kernel = _name(raw.get("kernel"), f"launch {name} kernel")
    lc = LaunchEntry(name, kernel, entry, raw["schedule"], grid, block, work, raw["parallel"],
                     shared, tuple(specs))
    first = ptx.split("\n", 1)[0]
    if first != launch_record(lc):
        raise _fail(f"launch {name}: the record its PTX was compiled with disagrees with the "
                    f"header ({first[:60] if first.startswith(RECORD) else 'no record'})")
    return lc, ptx


def read_cuda_image(path: str | os.PathLike, trusted_keys: Any = None
                    ) -> tuple[CudaImage, dict]:
    """Read and check a CUDA artifact; returns (CudaImage, header). Loads no code and needs no
    GPU. ``trusted_keys``: see ``kiln.load``."""
    header, blobs = read_container(path, _fail, CudaArtifactError, KIND, ("consts",),
                                   lambda kind: "load it with kiln.load(path)",
                                   trusted_keys=trusted_keys)

    target = header.get("target")
    _want(isinstance(target, dict), "target must be an object")
    cc = target.get("compute_capability")
    _want(isinstance(cc, list) and len(cc) == 2 and all(_is_int(v) and 0 <= v < 100
                                                        for v in cc),
          "target.compute_capability must be [major, minor]")
    inputs = _check.signature(header.get("inputs"), "input")
    outputs = _check.signature(header.get("outputs"), "output")
    arena = header.get("arena_bytes")
    _want(_is_int(arena) and 0 <= arena <= MAX_ARENA_BYTES, "arena_bytes out of range")
    sizes = {"arena": arena, "const": len(blobs["consts"])}
    raw_launches = header.get("launches")
    _want(isinstance(raw_launches, list) and len(raw_launches) <= MAX_KERNELS,
          "launches must be a list")
    launches, ptx = [], {}
    for entry in raw_launches:
        launch, text = _launch(entry, blobs, sizes, {"input": inputs, "output": outputs})
        _want(launch.name not in ptx, f"launch {launch.name} appears twice")
        launches.append(launch)
        ptx[launch.name] = text

    copies: dict[int, tuple[str, int]] = {}
    raw_copies = header.get("output_copies")
    _want(isinstance(raw_copies, dict), "output_copies must be an object")
    tensors = header.get("tensors")
    _want(isinstance(tensors, dict), "tensors must be an object")
    copy_constants = {}
    for name, t in tensors.items():
        _want(name in blobs and isinstance(t, dict), f"tensor {name!r} has no part")
        dtype = t.get("dtype")
        _want(dtype in _DTYPES, f"tensor {name} dtype {dtype!r} is unknown")
        shape = _check.shape(t.get("shape"), dtype, f"tensor {name}")
        j = t.get("output")
        _want(_is_int(j) and 0 <= j < len(outputs), f"tensor {name} names no output")
        if math.prod(shape) * DType(dtype).itemsize != len(blobs[name]):
            raise _fail(f"tensor {name} holds {len(blobs[name])} bytes, its shape needs more "
                        "or fewer")
        copy_constants[j] = np.frombuffer(blobs[name], DType(dtype).numpy).reshape(shape)
    for j, spec in raw_copies.items():
        _want(j.isdigit() and int(j) < len(outputs), f"output copy {j!r} names no output")
        _want(isinstance(spec, list) and len(spec) == 2 and _is_int(spec[1]),
              f"output copy {j} is malformed")
        kind, index = spec
        _want(kind == "input" and 0 <= index < len(inputs)
              or kind == "output" and 0 <= index < len(outputs)
              or kind == "const" and int(j) in copy_constants,
              f"output copy {j} has no source")
        copies[int(j)] = (kind, index)
    image = CudaImage((cc[0], cc[1]), inputs, outputs, arena,
                      np.frombuffer(blobs["consts"], np.uint8).copy(), launches, ptx,
                      copies, copy_constants)
    return image, header


# ---- loading ---------------------------------------------------------------------------------
def _check_device(cc: tuple[int, int]):
    """numba.cuda after checking that it drives a real GPU able to run PTX for ``cc``."""
    import numba

    if numba.config.ENABLE_CUDASIM:
        raise CudaArtifactError(
            "a CUDA artifact holds PTX, which Numba's CUDA simulator cannot run (it runs the "
            "kernels' Python source)",
            hint="load it in a process without NUMBA_ENABLE_CUDASIM on a machine with an "
                 "NVIDIA GPU, or compile the model with kiln.compile(..., backend='cuda') to "
                 "use the simulator")
    from numba import cuda

    if not cuda.is_available():
        raise CudaArtifactError("loading a CUDA artifact needs a CUDA GPU, and numba finds "
                                "none (numba.cuda.is_available() is False)",
                                hint="load it on a machine with an NVIDIA GPU and its driver "
                                     "(Numba's CUDA simulator cannot run PTX)")
    have = tuple(cuda.get_current_device().compute_capability)
    if have < cc:
        raise CudaArtifactError(
            f"the artifact's PTX targets compute capability {cc[0]}.{cc[1]}; this GPU has "
            f"{have[0]}.{have[1]}",
            hint=f"export again with cc=({have[0]}, {have[1]}) (PTX runs on its compute "
                 "capability and newer ones)")
    return cuda


class CudaArtifactModel:
    """A model loaded from a CUDA artifact: call it with NumPy arrays (NumPy arrays back) or
    device arrays (anything with ``__cuda_array_interface__``; numba device arrays back)."""

    def __init__(self, path: str | os.PathLike, trusted_keys: Any = None) -> None:
        self.image, self.manifest = read_cuda_image(path, trusted_keys)
        image = self.image
        cuda = _check_device(image.cc)
        self._cuda = cuda
        self.device = cuda_device()
        self.inputs, self.outputs = image.inputs, image.outputs
        self._arena = cuda.device_array(max(image.arena_bytes, 8), np.uint8)
        blob = image.const_blob if image.const_blob.size else np.zeros(8, np.uint8)
        self._consts = cuda.to_device(blob)
        plans = []
        for lc in image.launches:
            if lc.work == 0:
                continue
            if lc.grid is not None and lc.block is not None:
                grid, block = lc.grid, lc.block
            else:
                blocks, threads = self.device.launch_config(lc.work, lc.parallel)
                grid, block = (blocks, 1, 1), (threads, 1, 1)
            args = tuple(("static", self._view(a), a.size, K.np_dtype(a.dtype).itemsize)
                         if a.kind in ("arena", "const") else
                         (a.kind, a.index, a.size, K.np_dtype(a.dtype).itemsize)
                         for a in lc.args)
            plans.append(LaunchPlan(lc.name, image.ptx[lc.name], lc.entry, grid, block, args))
        try:
            self._launches = PreparedLaunches(plans)
        except KilnError as e:
            raise CudaArtifactError(e.message, hint=e.hint) from e

    def _view(self, a: ArgSpec):
        base = self._arena if a.kind == "arena" else self._consts
        dtype = K.np_dtype(a.dtype)
        if a.size == 0:
            return self._cuda.device_array(1, dtype)[:0]
        return base[a.index:a.index + a.size * dtype.itemsize].view(dtype)

    def run(self, *arrays: Any) -> list[Any]:
        """Outputs for ``arrays`` (see the class docstring)."""
        cuda = self._cuda
        if len(arrays) != len(self.inputs):
            raise KilnError(f"the model takes {len(self.inputs)} inputs, got {len(arrays)}")
        on_device = any(hasattr(a, "__cuda_array_interface__") for a in arrays)
        inputs = []
        for (name, dtype, shape), a in zip(self.inputs, arrays):
            d = a if hasattr(a, "copy_to_host") else (
                cuda.as_cuda_array(a) if hasattr(a, "__cuda_array_interface__")
                else cuda.to_device(np.ascontiguousarray(a)))
            if tuple(d.shape) != shape or d.dtype != DType(dtype).numpy:
                raise KilnError(f"input %{name} expects {dtype}{list(shape)}, got "
                                f"{d.dtype}{list(d.shape)}")
            if not d.is_c_contiguous():
                raise KilnError(f"input %{name} is not contiguous",
                                hint="pass a contiguous array (tensor.contiguous())")
            inputs.append(d.reshape(d.size) if d.size else cuda.device_array(1, d.dtype)[:0])
        outputs = [cuda.device_array(max(math.prod(s), 1), DType(d).numpy)[:math.prod(s)]
                   for _, d, s in self.outputs]
        self._launches.launch(inputs, outputs)
        results: list[Any] = [o.reshape(s) for o, (_, _, s) in zip(outputs, self.outputs)]
        for j, (kind, index) in self.image.output_copies.items():
            if kind == "const":
                results[j] = cuda.to_device(self.image.copy_constants[j])
            else:
                src = inputs[index] if kind == "input" else results[index]
                results[j] = cuda.to_device(src.copy_to_host().reshape(self.outputs[j][2]))
        if on_device:
            return results
        return [r.copy_to_host() for r in results]

    def __call__(self, *arrays: Any) -> Any:
        outs = self.run(*arrays)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        sig = ", ".join(f"{d}{list(s)}" for _, d, s in self.inputs)
        cc = ".".join(map(str, self.image.cc))
        return f"<kiln CudaArtifactModel ({sig}) for compute capability {cc}>"


def load_cuda(path: str | os.PathLike, trusted_keys: Any = None) -> CudaArtifactModel:
    """Load a CUDA artifact written by ``export_cuda``.

    Raises CudaArtifactError (a KilnError) for a damaged or foreign file, a format this kiln
    does not read, no CUDA GPU (or Numba's simulator, which cannot run PTX), or a GPU older
    than the artifact's compute capability. An artifact is code: see ``kiln.load`` on
    ``trusted_keys`` and the trust it needs."""
    return CudaArtifactModel(path, trusted_keys)
