"""``kiln.compile``: PyTorch model in, fast callable out."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from kiln.backends import backend_names
from kiln.backends.reference import run_graph
from kiln.compression.compress import Compressed, compress_graph
from kiln.frontend.importer import TORCH_TO_DTYPE
from kiln.frontend.trace import FRONTENDS, trace_module
from kiln.ir import DType, Graph, KilnError
from kiln.passes import NumericCheck, PassManager, Timing, Verify, get_pass, get_pipeline
from kiln.runtime import Executable, artifact

if TYPE_CHECKING:
    from kiln.dynamic import DynamicCompressed


def optimize(graph: Graph, pipeline: str | Sequence[str] = "O1", *, verify: bool = True,
             check_inputs: Sequence[np.ndarray] | None = None,
             instruments: Sequence[Any] = ()) -> tuple[Graph, Timing]:
    """Run a named pipeline (or a list of pass names) over ``graph``.

    With ``check_inputs`` every stage's outputs are compared with the previous stage's on those
    inputs by the reference backend, so a pass that changes the numbers is named at once.
    """
    if not isinstance(graph, Graph):
        raise KilnError(f"kiln.optimize takes a kiln Graph, got {type(graph).__name__}",
                        hint="for a torch model use kiln.compile(model, example_inputs)")
    pipeline = _check_pipeline(pipeline)
    passes = get_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    timing = Timing()
    inst: list[Any] = [timing, *instruments]
    if verify:
        inst.append(Verify())
    if check_inputs is not None:
        inst.append(NumericCheck(run_graph, list(check_inputs)))
    return PassManager(passes, inst).run(graph), timing


def _check_pipeline(pipeline: Any) -> str | list[Any]:
    """``pipeline`` (a pipeline name or a list of pass names / Pass instances) after checking
    its type; unknown names are refused by get_pipeline / get_pass."""
    from kiln.passes import Pass

    if isinstance(pipeline, str):
        return pipeline
    if isinstance(pipeline, (list, tuple)) and all(isinstance(p, (str, Pass))
                                                   for p in pipeline):
        return list(pipeline)
    raise KilnError(f"pipeline= takes a pipeline name or a list of pass names, got "
                    f"{pipeline!r}", hint="for example pipeline='O1' or "
                                          "pipeline=['fold_batchnorm', 'dce']")


def _supported_dtypes() -> str:
    return ", ".join(str(dt).removeprefix("torch.") for dt in TORCH_TO_DTYPE)


def unsupported_dtype(what: str, dtype: Any, expected: Any = None) -> KilnError:
    """The error for an input of a dtype kiln does not compile (bfloat16, float8, float64,
    complex ...): names the input and the dtype, and says which cast fixes it. ``expected``
    is the type a compiled model was compiled for (None at compile time)."""
    name = str(dtype).removeprefix("torch.")
    if expected is not None:
        want = str(_TORCH_DTYPE[expected.dtype.value]).removeprefix("torch.")
        return KilnError(f"{what} has dtype {name}, but the model was compiled for {expected}",
                         hint=f"cast it: x.to(torch.{want})")
    if getattr(dtype, "is_floating_point", False) or getattr(dtype, "kind", "") == "f":
        cast = ("x.float() (float32) or x.half() (float16); if the model's weights are "
                f"{name} too, convert it with model.float()")
    elif getattr(dtype, "is_complex", False) or getattr(dtype, "kind", "") == "c":
        cast = "pass real tensors (for example the real and imaginary parts as two inputs)"
    else:
        cast = "x.int() (int32) or x.long() (int64)"
    return KilnError(f"{what} has dtype {name}, which kiln does not compile",
                     hint=f"kiln compiles {_supported_dtypes()}; cast it: {cast}")


def example_tensors(example_inputs: Any, names: Sequence[str] = ()) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` (a tensor or array, or a tuple/list of them) as a tuple of tensors
    of dtypes kiln compiles; a KilnError naming the first one that is not (by its index and,
    where ``names`` has it, its parameter name)."""
    what = "example input"
    usage = "pass a tuple of tensors shaped like the real inputs, e.g. (torch.randn(1, 3),)"
    if example_inputs is None:
        raise KilnError(f"no {what}s given: kiln compiles for their shapes and dtypes",
                        hint=usage)
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise KilnError(f"{what}s must be a tuple of tensors, got "
                        f"{type(example_inputs).__name__}", hint=usage)
    tensors = []
    for i, x in enumerate(example_inputs):
        which = f"{what} {i}" + (f" ({names[i]})" if i < len(names) else "")
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biuf" or x.dtype.itemsize > 8:
                raise unsupported_dtype(which, x.dtype)
            # a read-only array (a broadcast view, a loaded buffer) is copied: torch warns
            # that it cannot protect one it shares
            x = torch.as_tensor(x if x.flags.writeable else x.copy())
        if not isinstance(x, torch.Tensor):
            raise KilnError(f"{which} is of type {type(x).__name__}, not a tensor or NumPy "
                            "array", hint=usage)
        if x.dtype not in TORCH_TO_DTYPE:
            raise unsupported_dtype(which, x.dtype)
        tensors.append(x)
    return tuple(tensors)


class CompiledModel:
    """A compiled model: call it like the original (torch tensors in, torch tensors out; or
    NumPy arrays in, NumPy arrays out)."""

    def __init__(self, graph: Graph, executable: Executable, out_spec: Any,
                 source_graph: Graph, timing: Any = None) -> None:
        self.graph = graph
        self.source_graph = source_graph
        self.executable = executable
        self.timing = timing
        # The frontend that made the graph ("fx", "export" after an fx failure, "onnx" ...).
        self.frontend: str | None = getattr(source_graph, "frontend", None)
        # The kiln.compress result when the model was compressed (its report per stage).
        self.compression: Compressed | None = None
        # The autotuner's report (kiln.backends.llvm.tune.TuneReport) when tune= was given.
        self.tuning = None
        self._out_spec = out_spec
        # A model returning one tensor needs no pytree rebuild on the hot path.
        self._single = out_spec is None or out_spec.is_leaf()
        # What a well-formed call looks like, so the hot path checks it in a few comparisons.
        types = executable.input_types
        self._torch_sig = [(torch.Size(t.shape), _TORCH_DTYPE[t.dtype.value]) for t in types]
        self._numpy_sig = [(tuple(t.shape), t.dtype.numpy) for t in types]
        self._cuda = executable.backend == "cuda"
        # Output tensors allocated ahead of the calls that return them (see _fast_call).
        program = executable.program
        self._into = program.run_into if getattr(program, "writes_every_output", False) \
            else None
        # ... and the inputs by address, where no index needs a check or the native code
        # checks them (see _fast_call).
        self._direct = program.run_addresses if self._into is not None and (
            not program.checks_indices or program.checks_indices_natively) else None
        self._spares: list[tuple[list[torch.Tensor], list[int]]] = []

    @property
    def backend(self) -> str:
        return self.executable.backend

    def __call__(self, *args: Any) -> Any:
        fast = self._fast_call(args)
        if fast is not None:
            return fast
        use_torch = any(isinstance(a, torch.Tensor) for a in args)
        on_device = self.backend == "cuda" and any(
            a.is_cuda if isinstance(a, torch.Tensor) else hasattr(a, "__cuda_array_interface__")
            for a in args)
        if use_torch:
            self._check_dtypes(args)
        if on_device:
            # Device memory stays on the device: the CUDA program reads the inputs in place and
            # returns fresh device arrays, which torch wraps as CUDA tensors without a copy.
            outs = self.executable.program.run(
                *[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
            if use_torch:
                outs = [torch.as_tensor(o, device="cuda") for o in outs]
        elif use_torch and len(args) == len(self._torch_sig) and all(
                isinstance(a, torch.Tensor) and a.shape == s and a.dtype == d
                and a.device.type == "cpu" and not a.requires_grad
                for a, (s, d) in zip(args, self._torch_sig)):
            # Fast path: CPU tensors of the compiled signature go straight to the program.
            outs = self.executable.run_checked([a.numpy() for a in args])
        else:
            arrays = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor)
                      else np.asarray(a) for a in args]
            outs = self.executable.run(arrays)
        if use_torch and not on_device:
            outs = self._as_tensors(outs)
        return self._structured(outs)

    def _fast_call(self, args: Sequence[Any]) -> Any:
        """The call of plain CPU tensors of the compiled signature (the common case), in as
        few Python and torch steps as possible. After a call's kernels have streamed the
        weights through the caches, every step here runs cold: a torch call that takes 1 us
        warm takes 10-30 us then (BERT int8: the general path spent about 100 us per call
        outside its 450 us of kernels). So the checks look at the NumPy view (``numpy()``
        itself refuses a tensor that needs grad or lives off the CPU), and the outputs are
        torch tensors allocated ahead, several at once (only the first allocation runs
        cold), each returned by exactly one call. None where the general path must run."""
        if self._cuda or len(args) != len(self._numpy_sig):
            return None
        if self._direct is not None:
            # Tensors straight to the native code: checked on torch's own attributes, passed
            # by data_ptr() (no NumPy view, no ctypes object per input).
            addresses = []
            for a, (shape, dtype) in zip(args, self._torch_sig):
                if (type(a) is not torch.Tensor or a.dtype != dtype or a.shape != shape
                        or a.requires_grad or not a.is_cpu or not a.is_contiguous()):
                    break
                addresses.append(a.data_ptr())
            else:
                return self._into_spares(lambda out: self._direct(addresses, out))
        arrays = []
        for a, (shape, dtype) in zip(args, self._numpy_sig):
            if type(a) is not torch.Tensor:
                return None
            try:
                arr = a.numpy()
            except Exception:   # needs grad, not on the CPU, conjugate, no NumPy dtype...
                return None
            if arr.shape != shape or arr.dtype != dtype:
                return None
            arrays.append(arr)
        if self._into is None:
            return self._structured(self._as_tensors(self.executable.run_checked(arrays)))
        return self._into_spares(lambda out: self._into(arrays, out))

    def _into_spares(self, run: Any) -> Any:
        """``run(output addresses)`` into a set of output tensors made ahead, returned in the
        model's structure (the set goes back to the spares if the call fails)."""
        try:
            outs, addresses = self._spares.pop()
        except IndexError:
            self._allocate_spares()
            outs, addresses = self._spares.pop()
        try:
            run(addresses)
        except BaseException:
            self._spares.append((outs, addresses))   # never returned: reusable
            raise
        return self._structured(outs)

    def _allocate_spares(self) -> None:
        """Output tensors for the next calls: as many sets as fit in 4 MB (at most 8, at
        least 1). Concurrent callers each pop a set of their own (list.pop is atomic)."""
        specs = [(shape, _TORCH_DTYPE[DType.from_numpy(dt).value])
                 for shape, dt in self.executable.program.output_specs]
        size = sum(math.prod(shape) * torch.empty((), dtype=dt).element_size()
                   for shape, dt in specs)
        for _ in range(max(1, min(8, (4 << 20) // max(size, 1)))):
            outs = [torch.empty(shape, dtype=dt) for shape, dt in specs]
            self._spares.append((outs, [o.data_ptr() for o in outs]))

    @staticmethod
    def _as_tensors(outs: Sequence[np.ndarray]) -> list[torch.Tensor]:
        # Backends return fresh arrays on every call, so sharing their memory is safe.
        return [torch.from_numpy(o) if o.flags.writeable else torch.from_numpy(o.copy())
                for o in outs]

    def _structured(self, outs: Sequence[Any]) -> Any:
        """The outputs in the model's own structure."""
        if self._single:
            return outs[0] if len(outs) == 1 else tuple(outs)
        return pytree.tree_unflatten(list(outs), self._out_spec)

    def _check_dtypes(self, args: Sequence[Any]) -> None:
        """A KilnError for a tensor argument of a dtype NumPy and kiln cannot take (bfloat16,
        float8 ...), before it is converted; other mismatches are the executable's to name."""
        for i, (a, t) in enumerate(zip(args, self.executable.input_types)):
            if isinstance(a, torch.Tensor) and a.dtype not in TORCH_TO_DTYPE:
                raise unsupported_dtype(f"input {i} (%{self.graph.inputs[i]})", a.dtype, t)

    def profile(self, *args: Any, repeat: int = 10) -> list:
        """Per-kernel time, FLOPs and GFLOP/s on these inputs, slowest first (llvm and cuda
        backends)."""
        program = self.executable.program
        if not hasattr(program, "profile"):
            raise KilnError(f"the {self.backend} backend has no per-kernel profile",
                            hint="compile with backend='llvm'")
        self._check_dtypes(args)
        arrays = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
                  for a in args]
        return program.profile(self.executable.check(arrays), repeat=repeat)

    def __repr__(self) -> str:
        return f"<CompiledModel {self.graph.name} on {self.backend}: {len(self.graph.nodes)} nodes>"


_TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "i8": torch.int8,
                "u8": torch.uint8, "i32": torch.int32, "i64": torch.int64, "bool": torch.bool}


def export(compiled: CompiledModel, path: str | os.PathLike | None = None, *,
           overwrite: bool = False, sign_key: Any = None) -> Path:
    """Write ``compiled`` (a ``kiln.compile`` result) as one artifact file at ``path`` that
    ``kiln.load`` runs without PyTorch: native code for this CPU (llvm backend), or PTX with
    its launch table for NVIDIA GPUs (cuda backend; see ``kiln.runtime.artifact.cuda.export_cuda``).
    A ``DynamicModel`` (``kiln.compile(..., dynamic=...)``, llvm backend) is written with a
    program for every set of sizes it has compiled (call or ``specialize`` it at the sizes
    to ship first): the loaded model runs those sizes and refuses others with their list.
    An existing file is kept unless ``overwrite`` is True; anything at ``path`` that is not a
    regular file (a directory, a device) is never replaced.

    A path ending in ``.onnx`` writes an ONNX model instead (kiln.interop.to_onnx): a
    DynamicModel's (or a ``kiln.compress(..., dynamic=...)`` result's) dynamic dimensions
    become ``dim_param``s named after their sizes, and the sizes inside the graph are
    computed from the inputs' shapes, so the file runs at any size (or a KilnError names the
    node that would hold only at one size).

    ``sign_key`` (an Ed25519 private key: a ``cryptography`` key object, PEM bytes or the path
    of a PEM file) signs the artifact, so that ``kiln.load(path, trusted_keys=[public key])``
    can tell it came from you. An artifact is native code: whoever loads it runs it.

    Raises:
        KilnError: for something other than a compiled model, a missing or unusable path, or
            a model without code to export.
    """
    from kiln.dynamic import DynamicCompressed, DynamicModel

    if isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(".onnx") \
            and isinstance(compiled, (CompiledModel, DynamicModel, DynamicCompressed)):
        return _export_onnx(compiled, Path(path), overwrite, sign_key)
    dynamic = None
    if isinstance(compiled, DynamicModel):
        dynamic = compiled
        programs = compiled.programs()
        if any(p.backend != "llvm" for p in programs):
            raise KilnError("a dynamic model's artifact holds native CPU code (llvm backend)",
                            hint="export one size of a CUDA model: "
                                 "kiln.export(dynamic_model.specialize(*inputs), path)")
        compiled = programs[0]
    if not isinstance(compiled, CompiledModel):
        what = type(compiled).__name__
        hint = "export what kiln.compile returns: kiln.export(kiln.compile(model, " \
               "example_inputs), path)"
        if isinstance(compiled, (str, os.PathLike)) and isinstance(path, CompiledModel):
            hint = "the compiled model comes first: kiln.export(compiled, path)"
        raise KilnError(f"kiln.export takes a compiled model, got {what}", hint=hint)
    if path is None:
        raise KilnError("kiln.export needs the path of the file to write",
                        hint="kiln.export(compiled, 'model.kiln')")
    if not isinstance(path, (str, os.PathLike)):
        raise KilnError(f"kiln.export's path must be a str or os.PathLike, got "
                        f"{type(path).__name__}", hint="kiln.export(compiled, 'model.kiln')")
    check_output_file(Path(path), overwrite)
    if compiled.backend == "cuda":
        from kiln.runtime.artifact.cuda import export_cuda

        return export_cuda(compiled, path, overwrite=overwrite, sign_key=sign_key)
    program = compiled.executable.program
    image = getattr(program, "image", None)
    if image is None:
        raise KilnError(f"a model compiled for the {compiled.backend} backend has no native "
                        "code to export", hint="compile with backend='llvm' or 'cuda'")
    if compiled.compression is not None:
        pipeline = [r.stage for r in compiled.compression.report[1:]]
    else:
        pipeline = [r.name for r in compiled.timing.records] if compiled.timing else []
    extra = {}
    if dynamic is not None:
        extra = {"variants": [p.executable.program.image for p in programs[1:]],
                 "dims": [(i, d, n) for i, dims in sorted(dynamic.dims.items())
                          for d, n in sorted(dims.items())],
                 "bounds": dynamic.bounds,
                 "rows": dynamic.rows[0] if dynamic.split_rows else None}
    try:
        return artifact.save(path, image, pipeline=pipeline, kiln_version=_kiln_version(),
                             sign_key=sign_key, overwrite=overwrite, **extra)
    except OSError as e:
        raise KilnError(f"cannot write {path}: {e.strerror or e}",
                        hint="choose a path in a folder you can write to") from e


def _export_onnx(compiled: Any, path: Path, overwrite: bool, sign_key: Any) -> Path:
    """``kiln.export`` to a ``.onnx`` path: the model as an ONNX file."""
    if sign_key is not None:
        raise KilnError("sign_key signs kiln artifacts; an ONNX file carries no signature",
                        hint="export to a .kiln path to sign, or leave sign_key out")
    check_output_file(path, overwrite)
    from kiln.interop.to_onnx import export_onnx

    try:
        return export_onnx(compiled, path, overwrite=overwrite)
    except OSError as e:
        raise KilnError(f"cannot write {path}: {e.strerror or e}",
                        hint="choose a path in a folder you can write to") from e


def check_output_file(path: Path, overwrite: bool = False, flag: str = "overwrite=True"
                      ) -> None:
    """A KilnError unless ``path`` can take a new file: its folder exists, and nothing is there
    (or, with ``overwrite``, a regular file). ``flag`` is how the caller spells overwrite."""
    if path.is_dir():
        raise KilnError(f"{path} is a directory", hint="give the path of the file to write")
    if os.path.lexists(path):
        if not path.is_file():
            raise KilnError(f"{path} exists and is not a regular file",
                            hint="kiln replaces only regular files; choose another path")
        if not overwrite:
            raise KilnError(f"{path} already exists", hint=f"choose another path or pass {flag}")
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if os.path.lexists(parent) else "does not exist"
        raise KilnError(f"cannot write {path}: {parent} {what}",
                        hint="choose a path in an existing folder")


def _kiln_version() -> str:
    from kiln import __version__

    return __version__


def compile(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    backend: str = "llvm",
    pipeline: str | Sequence[str] = "O1",
    frontend: str = "fx",
    verify: bool = True,
    check_numerics: bool = False,
    threads: int = 0,
    prune: Any = None,
    low_rank: Any = None,
    distill: Any = None,
    quantize: Any = None,
    data: Any = None,
    labels: Any = None,
    target: Any = None,
    winograd: bool = True,
    tune: Any = False,
    dynamic: Any = None,
    input_shapes: Any = None,
) -> CompiledModel:
    """Compile ``model`` for inference on inputs shaped like ``example_inputs``.

    Args:
        model: an ``nn.Module`` in eval mode; or an ONNX model (a ``.onnx`` path or an
            ``onnx.ModelProto``), whose ``dim_param`` dimensions stay dynamic and whose
            example inputs may be left out (see ``kiln.onnx_model``).
        example_inputs: a tuple of tensors (a single tensor is accepted too; required); the
            compiled model takes inputs of exactly these shapes and dtypes (float32, float16,
            int8, uint8, int32, int64 or bool: cast bfloat16 / float8 / float64 first).
        backend: ``"llvm"`` (native code for this CPU), ``"cuda"`` (numba.cuda kernels on an
            NVIDIA GPU, or on Numba's CUDA simulator when NUMBA_ENABLE_CUDASIM=1 is set before
            numba is imported) or ``"reference"`` (the NumPy interpreter, the oracle).
        pipeline: a named pipeline (``"O0"`` none, ``"O1"`` cleanups) or a list of pass names.
        frontend: ``"fx"`` (torch.fx.symbolic_trace) or ``"export"`` (torch.export). When
            fx cannot trace the model (HuggingFace models, data-dependent control flow),
            the default falls back to export with a ``FrontendFallbackWarning``;
            ``compiled.frontend`` says which ran.
        verify: run the IR verifier after every pass.
        check_numerics: compare every pass's outputs with the previous stage's on the example
            inputs and stop with a NumericsError naming the pass that changed them.
        threads: the most threads the llvm backend uses (0: ``OMP_NUM_THREADS``, else one
            per core). Each call runs with the count (that many, halved down to one) measured
            fastest on this machine lately: small models and busy machines run on fewer.
        target: the CPU the llvm backend compiles for: None (this machine, or the instruction
            set ``KILN_TARGET`` names), a name (``"avx2"`` / ``"x86-64-v3"``, ``"avx512"``,
            ``"avx512-vnni"``, ``"sse2"``: the code must run here, so only sets this CPU
            has) or a ``kiln.passes.target.Target``.
        winograd: 3x3 convolutions may run as Winograd F(4,3) (llvm backend; half the
            multiply-adds, a few float32 ulps from a direct convolution, but an inf or NaN
            spreads to its 4-row tile). False: direct convolutions only.
        tune: time each convolution's candidate algorithms on this machine and use the
            fastest (llvm backend; see ``kiln.backends.llvm.tune``). True, or a dict with
            ``budget_s`` (default 60: what it does not reach keeps its default) and
            ``progress`` (a progress bar, default True). Choices are kept in a tuning database
            (``KILN_TUNING_DB``, default ``~/.cache/kiln/tuning.json``) that later compiles
            reuse; ``compiled.tuning.table()`` says what each convolution chose and why.
        prune, low_rank, distill, quantize, data, labels: compress the model first, as
            ``kiln.compress`` does with the same arguments (the pipeline is then the
            compression's own; see ``help(kiln.compress)``).
        dynamic: sizes that may change from call to call. ``True``: dimension 0 (the batch)
            of every input; or ``{input name or index: {dim: "size name"}}``, for example
            ``{"input_ids": {0: "batch", 1: "seq"}}`` (dimensions with one name must be
            equal). A ``torch.export.Dim`` may stand for a name: its ``min`` and ``max``
            bound the size, and calls outside them get a KilnError. Returns a
            ``kiln.dynamic.DynamicModel``, which compiles each new set of sizes on
            the call that first brings it (see its module docstring). With compression
            options the model is compressed once, at ``example_inputs``, and that
            compression is rebuilt at each size. ``kiln.export(model, "x.onnx")`` writes it
            as one ONNX file for every size.
        input_shapes: for an ONNX model, ``{input name: shape}`` fixing dimensions the file
            leaves dynamic.

    Raises:
        KilnError: for an unsupported op (naming it and its source line), a model in training
            mode, a model that is not an ``nn.Module``, missing example inputs or inputs kiln
            cannot take, an unknown backend, pipeline or frontend, or ``backend="cuda"`` with
            neither a GPU nor the simulator.
    """
    from kiln.onnx_model import compile_onnx, is_onnx_model

    if is_onnx_model(model):
        if any(o is not None and o is not False for o in (prune, low_rank, distill, quantize)):
            raise KilnError("compression of an ONNX model is not supported yet",
                            hint="compress the PyTorch model, or compile the file as it is")
        _check_names(backend, pipeline, "fx")
        return compile_onnx(model, example_inputs, input_shapes=input_shapes,
                            dynamic=dynamic, backend=backend,
                            pipeline=pipeline, verify=verify, check_numerics=check_numerics,
                            threads=threads, target=target, winograd=winograd, tune=tune)
    check_model(model)
    if input_shapes is not None:
        raise KilnError("input_shapes= fixes an ONNX model's dynamic dimensions",
                        hint="a PyTorch model takes its shapes from example_inputs")
    example_inputs = example_tensors(example_inputs, _parameter_names(model))
    _check_names(backend, pipeline, frontend)
    if dynamic is not None and dynamic is not False:
        from kiln.dynamic import DynamicModel, normalize_dynamic

        names = _parameter_names(model)
        dims, bounds = normalize_dynamic(dynamic, example_inputs, names)
        if tune:
            raise KilnError("dynamic= does not combine with tuning yet",
                            hint="compile the tuned model for each size without dynamic=")
        if any(o is not None and o is not False for o in (prune, low_rank, distill, quantize)):
            return _compress_dynamic(
                model, data, example_inputs, dynamic, frontend=frontend, backend=backend,
                target=target, winograd=winograd, prune=prune, low_rank=low_rank,
                distill=distill, quantize=quantize, labels=labels).compile(threads=threads)
        options = dict(backend=backend, pipeline=pipeline, frontend=frontend, verify=verify,
                       check_numerics=check_numerics, threads=threads, target=target,
                       winograd=winograd)

        def graph_at(xs: tuple[torch.Tensor, ...]) -> Graph:
            return optimize(trace_module(model, xs, frontend)[0], pipeline, verify=verify)[0]

        def compile_graph_at(graph: Graph, xs: tuple[torch.Tensor, ...],
                             first: CompiledModel) -> CompiledModel:
            return compile_graph(graph, xs, out_spec=first._out_spec, backend=backend,
                                 pipeline=pipeline, verify=verify,
                                 check_numerics=check_numerics, threads=threads, target=target,
                                 winograd=winograd)

        return DynamicModel(lambda xs: compile(model, xs, **options), example_inputs, dims,
                            names, bounds, graph_at=graph_at,
                            compile_graph_at=compile_graph_at)
    source_graph, out_spec = trace_module(model, example_inputs, frontend)
    if not any(o is not None and o is not False for o in (prune, low_rank, distill, quantize)):
        return compile_graph(source_graph, example_inputs, out_spec=out_spec, backend=backend,
                             pipeline=pipeline, verify=verify, check_numerics=check_numerics,
                             threads=threads, target=target, winograd=winograd, tune=tune)
    cpu = _cpu_target(backend, target)
    tune_options = _tune_options(tune, backend)
    tuning = _tuning(backend, winograd)
    compression = compress_graph(source_graph, data, teacher=model, prune=prune,
                                 low_rank=low_rank, distill=distill, quantize=quantize,
                                 labels=labels, out_spec=out_spec,
                                 prune_multiple=cpu.f32_lanes if cpu else 8, target=cpu)
    return _finish(compression.graph, source_graph, out_spec, backend=backend, threads=threads,
                   cpu=cpu, tuning=tuning, tune_options=tune_options, compression=compression)


def compile_graph(source_graph: Graph, example_inputs: Sequence[torch.Tensor], *,
                  out_spec: Any = None, backend: str = "llvm",
                  pipeline: str | Sequence[str] = "O1", verify: bool = True,
                  check_numerics: bool = False, threads: int = 0, target: Any = None,
                  winograd: bool = True, tune: Any = False) -> CompiledModel:
    """Optimize an imported graph and compile it for ``backend`` (kiln.compile's steps after
    the frontend, without compression); ``example_inputs`` serve the numerics check."""
    cpu = _cpu_target(backend, target)
    tune_options = _tune_options(tune, backend)
    tuning = _tuning(backend, winograd)
    arrays = [x.detach().cpu().numpy() for x in example_inputs]
    graph, timing = optimize(source_graph, pipeline, verify=verify,
                             check_inputs=arrays if check_numerics else None)
    return _finish(graph, source_graph, out_spec, backend=backend, threads=threads, cpu=cpu,
                   tuning=tuning, tune_options=tune_options, timing=timing)


def _finish(graph: Graph, source_graph: Graph, out_spec: Any, *, backend: str, threads: int,
            cpu: Any, tuning: Any, tune_options: dict | None, compression: Any = None,
            timing: Any = None) -> CompiledModel:
    """Tune (when asked) and build the CompiledModel of an optimized graph."""
    report = None
    if tune_options is not None:
        from kiln.backends.llvm.tune import tune_graph
        from kiln.passes.tuning import DEFAULT

        tuning, report = tune_graph(graph, cpu, tuning or DEFAULT, threads=threads,
                                    **tune_options)
    compiled = CompiledModel(graph, Executable(graph, backend, threads, cpu, tuning), out_spec,
                             source_graph, timing)
    compiled.compression = compression
    compiled.tuning = report
    return compiled


def _compress_dynamic(model: torch.nn.Module, data: Any,
                      example_inputs: tuple[torch.Tensor, ...], dynamic: Any, *, frontend: str,
                      backend: str, target: Any, winograd: bool = True, **stages: Any) -> Any:
    """kiln.compress with ``dynamic=``: the compression made once at the example inputs, as a
    DynamicCompressed that rebuilds its graph at any sizes (kiln.dynamic.SizedCompression)."""
    from kiln.dynamic import DynamicCompressed, SizedCompression, normalize_dynamic

    names = _parameter_names(model)
    dims, bounds = normalize_dynamic(dynamic, example_inputs, names)
    cpu = _cpu_target(backend, target)
    tuning = _tuning(backend, winograd)
    source_graph, out_spec = trace_module(model, example_inputs, frontend)
    multiple = cpu.f32_lanes if cpu else 8
    compression = compress_graph(source_graph, data, teacher=model, out_spec=out_spec,
                                 prune_multiple=multiple, target=cpu, **stages)
    sized = SizedCompression(
        lambda xs: trace_module(model, xs, frontend), compression, example_inputs,
        {"prune": stages.get("prune"), "low_rank": stages.get("low_rank"),
         "quantize": stages.get("quantize"), "prune_multiple": multiple, "target": cpu})

    def finish(graph: Graph, source: Graph, threads: int) -> CompiledModel:
        return _finish(graph, source, out_spec, backend=backend, threads=threads, cpu=cpu,
                       tuning=tuning, tune_options=None, compression=compression)

    return DynamicCompressed(sized, example_inputs, dims, names, bounds, finish)


def check_model(model: Any) -> None:
    """A KilnError unless ``model`` is an ``nn.Module`` (kiln.compile's and kiln.compress's
    first argument)."""
    if isinstance(model, torch.nn.Module):
        return
    if isinstance(model, CompiledModel):
        raise KilnError("this model is compiled already",
                        hint="pass the original nn.Module, or call the compiled model")
    raise KilnError(f"kiln compiles torch.nn.Module objects, got {type(model).__name__}",
                    hint="wrap a function in an nn.Module whose forward() calls it")


def _parameter_names(model: torch.nn.Module) -> list[str]:
    """The names of ``model.forward``'s positional parameters (for error messages)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _check_names(backend: Any, pipeline: Any, frontend: Any) -> None:
    """KilnErrors for a bad backend, pipeline or frontend, before any tracing is done."""
    if not isinstance(backend, str) or backend not in backend_names():
        raise KilnError(f"unknown backend {backend!r}", hint=f"choose one of {backend_names()}")
    if not isinstance(frontend, str) or frontend not in FRONTENDS:
        raise KilnError(f"unknown frontend {frontend!r}", hint=f"choose one of {FRONTENDS}")
    pipeline = _check_pipeline(pipeline)
    if isinstance(pipeline, str):
        get_pipeline(pipeline)
    else:
        for name in pipeline:
            if isinstance(name, str):
                get_pass(name)


def _tuning(backend: str, winograd: bool):
    """The schedule tuning of a compile (None: the backend's default)."""
    from kiln.passes.tuning import Tuning

    if not isinstance(winograd, bool):
        raise KilnError(f"winograd= takes True or False, got {winograd!r}")
    if winograd:
        return None
    if backend != "llvm":
        raise KilnError(f"winograd=False applies to the llvm backend, not {backend!r}",
                        hint="leave winograd out for this backend")
    return Tuning(winograd=False)


def _tune_options(tune: Any, backend: str) -> dict | None:
    """tune= as tune_graph keywords (None: no tuning)."""
    if tune is None or tune is False:
        return None
    if backend != "llvm":
        raise KilnError(f"tune= measures the llvm backend's schedules, not {backend!r}'s",
                        hint="leave tune out, or compile with backend='llvm'")
    options = {} if tune is True else tune
    if not isinstance(options, dict) or set(options) - {"budget_s", "progress"}:
        raise KilnError(f"tune= takes True or a dict of budget_s and progress, got {tune!r}")
    budget = options.get("budget_s", 60.0)
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not budget > 0:
        raise KilnError(f"tune budget_s must be a positive number of seconds, got {budget!r}")
    return {"budget_s": float(budget), "progress": bool(options.get("progress", True))}


def _cpu_target(backend: str, target: Any = None):
    """The CPU the llvm backend compiles for (None for other backends): ``target`` (a name
    or a Target) or the default (the host, or ``KILN_TARGET``)."""
    from kiln.passes.target import Target

    if backend != "llvm":
        if target is not None:
            raise KilnError(f"target= chooses a CPU for the llvm backend, not {backend!r}",
                            hint="leave target out, or compile with backend='llvm'")
        return None
    from kiln.backends.llvm.compiler import default_target, host_target
    from kiln.passes.target import named_target

    if target is None:
        return default_target()
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        return named_target(target.strip().lower(), host_target())
    raise KilnError(f"target= takes a name or a kiln.passes.target.Target, got "
                    f"{type(target).__name__}", hint="for example target='avx2'")


def compress(
    model: torch.nn.Module,
    data: Any,
    *,
    example_inputs: Sequence[Any] | None = None,
    prune: Any = None,
    low_rank: Any = None,
    distill: Any = None,
    quantize: Any = None,
    labels: Any = None,
    frontend: str = "fx",
    backend: str = "llvm",
    target: Any = None,
    dynamic: Any = None,
) -> Compressed | DynamicCompressed:
    """Make ``model`` smaller and faster: structured pruning, low-rank factorization,
    distillation and int8 quantization, each only when asked for.

    Args:
        model: an ``nn.Module`` in eval mode (also the distillation teacher).
        data: representative inputs: an iterable of batches (a tensor or a tuple of tensors,
            each shaped like ``example_inputs``) or one tensor of samples (cut into the example
            batch size). Used for calibration, Taylor scores and distillation.
        example_inputs: the inputs the compressed model will take (default: the first batch of
            ``data``, or its first sample when ``data`` is a tensor of samples).
        prune: None (default: no pruning); a number: the fraction of FLOPs to remove (e.g. 0.5);
            True: 30% of every channel group by L1 norm; or a dict of ``prune_channels``
            options: ``flops_target``, ``ratio``, ``global``,
            ``criterion`` (``l1`` default, ``l2``, ``bn_scale``, ``taylor``), ``protect``,
            ``multiple`` (default: the backend's vector width), ``min_channels``.
        low_rank: None; a number: the singular-value energy each layer keeps (True: 0.9); or a
            dict of ``low_rank`` options: ``energy``, ``param_ratio``,
            ``flops_target``, ``protect``, ``min_size``, ``multiple``.
        distill: None; True (3 epochs, lr 1e-3, temperature 4, alpha 0.9); or a dict of
            ``kiln.compression.distill.distill`` arguments (``epochs``, ``lr``, ``temperature``,
            ``alpha``, ``batch_size``, ``feature_pairs`` ...). Trains the pruned / factorized
            model against ``model`` on ``data`` (and ``labels`` when given).
        quantize: None; True (static int8 with percentile-99.99 calibration over at most 32
            batches); or a dict: ``mode`` (``static``; ``dynamic``: linear layers quantize
            their input on every call, no data needed; ``weight_only``: linear layers keep
            float activations and int8 weights; ``qat``: quantization-aware training, a
            fine-tune against ``model`` on ``data`` with fake quantization at the static
            pass's grids, then converted as static int8, taking ``epochs`` (3), ``lr`` (1e-4),
            ``temperature``, ``alpha``, ``batch_size``, ``seed``, ``progress``), ``method``
            (``minmax``, ``percentile``, ``entropy``), ``percentile``, ``max_batches``,
            ``protect`` (layers left in float),
            ``weight_max`` (largest |int8 weight|; default: 64 for a target whose int8 dot
            product is pmaddubsw, without VNNI, else 127). Layers stay float where int8
            would be slower on the target; ``table()`` lists each layer's precision and why.
        labels: class labels of ``data`` for distillation and Taylor scores (optional).
        frontend: ``"fx"`` or ``"export"``.
        backend: the backend the result is meant for (sets the default channel multiple).
        target: the CPU it is meant for (llvm backend; as in ``kiln.compile``): its vector
            width is the channel multiple, and its int8 dot product bounds int8 weights
            (+-64 where it is pmaddubsw, on CPUs without VNNI).
        dynamic: sizes that may change from call to call, as in ``kiln.compile``. The model
            is compressed once, on ``example_inputs`` and ``data`` (kept channels, calibrated
            ranges, distilled weights); the result is a ``kiln.dynamic.DynamicCompressed``
            whose ``compile()`` gives a DynamicModel compiling that compression at each new
            size, and whose ``graph_at(sizes)`` is its graph at those sizes.

    Returns:
        a ``Compressed`` with ``graph`` (the compressed kiln graph; ``kiln.compile`` with the
        same options returns it compiled, or run it with
        ``kiln.backends.llvm.compile_graph(graph)``), ``source_graph`` and ``report``
        (parameters, FLOPs and time per stage; ``table()`` prints it).
    """
    check_model(model)
    if example_inputs is None:
        if isinstance(data, (torch.Tensor, np.ndarray)):
            example_inputs = (torch.as_tensor(data[:1]),)
        else:
            try:
                first = next(iter(data))
            except (TypeError, StopIteration):
                raise KilnError("kiln.compress needs example_inputs or non-empty data",
                                hint="pass data=... (batches) or example_inputs=...") from None
            example_inputs = first if isinstance(first, (tuple, list)) else (first,)
    example_inputs = example_tensors(example_inputs, _parameter_names(model))
    _check_names(backend, "O1", frontend)
    if dynamic is not None and dynamic is not False:
        return _compress_dynamic(model, data, example_inputs, dynamic, frontend=frontend,
                                 backend=backend, target=target, prune=prune,
                                 low_rank=low_rank, distill=distill, quantize=quantize,
                                 labels=labels)
    cpu = _cpu_target(backend, target)
    source_graph, out_spec = trace_module(model, example_inputs, frontend)
    return compress_graph(source_graph, data, teacher=model, prune=prune, low_rank=low_rank,
                          distill=distill, quantize=quantize, labels=labels, out_spec=out_spec,
                          prune_multiple=cpu.f32_lanes if cpu else 8, target=cpu)
