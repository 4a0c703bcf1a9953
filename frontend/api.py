"""``kiln.compile``: PyTorch model in, fast callable out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from kiln.backends.reference import run_graph
from kiln.frontend.trace import trace_module
from kiln.ir import Graph, KilnError
from kiln.passes import NumericCheck, PassManager, Timing, Verify, get_pipeline
from kiln.runtime import Executable, artifact


def optimize(graph: Graph, pipeline: str | Sequence[str] = "O1", *, verify: bool = True,
             check_inputs: Sequence[np.ndarray] | None = None,
             instruments: Sequence[Any] = ()) -> tuple[Graph, Timing]:
    """Run a named pipeline (or a list of pass names) over ``graph``.

    With ``check_inputs`` every stage's outputs are compared with the previous stage's on those
    inputs by the reference backend, so a pass that changes the numbers is named at once.
    """
    passes = get_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    timing = Timing()
    inst: list[Any] = [timing, *instruments]
    if verify:
        inst.append(Verify())
    if check_inputs is not None:
        inst.append(NumericCheck(run_graph, list(check_inputs)))
    return PassManager(passes, inst).run(graph), timing


class CompiledModel:
    """A compiled model: call it like the original (torch tensors in, torch tensors out; or
    NumPy arrays in, NumPy arrays out)."""

    def __init__(self, graph: Graph, executable: Executable, out_spec: Any,
                 source_graph: Graph, timing: Any = None) -> None:
        self.graph = graph
        self.source_graph = source_graph
        self.executable = executable
        self.timing = timing
        self._out_spec = out_spec
        # A model returning one tensor needs no pytree rebuild on the hot path.
        self._single = out_spec is None or out_spec.is_leaf()
        # What a well-formed call looks like, so the hot path checks it in a few comparisons.
        types = executable.input_types
        self._torch_sig = [(torch.Size(t.shape), _TORCH_DTYPE[t.dtype.value]) for t in types]

    @property
    def backend(self) -> str:
        return self.executable.backend

    def __call__(self, *args: Any) -> Any:
        use_torch = any(isinstance(a, torch.Tensor) for a in args)
        if use_torch and len(args) == len(self._torch_sig) and all(
                isinstance(a, torch.Tensor) and a.shape == s and a.dtype == d
                and a.device.type == "cpu" and not a.requires_grad
                for a, (s, d) in zip(args, self._torch_sig)):
            # Fast path: CPU tensors of the compiled signature go straight to the program.
            outs = self.executable.run_checked([a.numpy() for a in args])
        else:
            arrays = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor)
                      else np.asarray(a) for a in args]
            outs = self.executable.run(arrays)
        if use_torch:
            # Backends return fresh arrays on every call, so sharing their memory is safe.
            outs = [torch.from_numpy(o) if o.flags.writeable else torch.from_numpy(o.copy())
                    for o in outs]
        if self._single:
            return outs[0] if len(outs) == 1 else tuple(outs)
        return pytree.tree_unflatten(outs, self._out_spec)

    def profile(self, *args: Any, repeat: int = 10) -> list:
        """Per-kernel time, FLOPs and GFLOP/s on these inputs, slowest first (llvm backend)."""
        program = self.executable.program
        if not hasattr(program, "profile"):
            raise KilnError(f"the {self.backend} backend has no per-kernel profile",
                            hint="compile with backend='llvm'")
        arrays = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
                  for a in args]
        return program.profile(self.executable.check(arrays), repeat=repeat)

    def __repr__(self) -> str:
        return f"<CompiledModel {self.graph.name} on {self.backend}: {len(self.graph.nodes)} nodes>"


_TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "i8": torch.int8,
                "u8": torch.uint8, "i32": torch.int32, "i64": torch.int64, "bool": torch.bool}


def export(compiled: CompiledModel, path: str | os.PathLike, *,
           overwrite: bool = False) -> Path:
    """Write ``compiled`` (llvm backend) as one artifact file that ``kiln.load`` runs without
    PyTorch. An existing file is kept unless ``overwrite`` is True."""
    program = compiled.executable.program
    image = getattr(program, "image", None)
    if image is None:
        raise KilnError(f"a model compiled for the {compiled.backend} backend has no native "
                        "code to export", hint="compile with backend='llvm'")
    path = Path(path)
    if path.exists() and not overwrite:
        raise KilnError(f"{path} already exists", hint="choose another path or pass "
                                                       "overwrite=True")
    pipeline = [r.name for r in compiled.timing.records] if compiled.timing else []
    return artifact.save(path, image, pipeline=pipeline, kiln_version=_kiln_version())


def _kiln_version() -> str:
    from kiln import __version__

    return __version__


def compile(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    backend: str = "llvm",
    pipeline: str | Sequence[str] = "O1",
    frontend: str = "fx",
    verify: bool = True,
    check_numerics: bool = False,
    threads: int = 0,
) -> CompiledModel:
    """Compile ``model`` for inference on inputs shaped like ``example_inputs``.

    Args:
        model: an ``nn.Module`` in eval mode.
        example_inputs: a tuple of tensors (a single tensor is accepted too); the compiled model
            takes inputs of exactly these shapes and dtypes.
        backend: ``"llvm"`` (native code for this CPU) or ``"reference"`` (the NumPy
            interpreter, the oracle).
        pipeline: a named pipeline (``"O0"`` none, ``"O1"`` cleanups) or a list of pass names.
        frontend: ``"fx"`` (torch.fx.symbolic_trace) or ``"export"`` (torch.export).
        verify: run the IR verifier after every pass.
        check_numerics: compare every pass's outputs with the previous stage's on the example
            inputs and stop with a NumericsError naming the pass that changed them.
        threads: worker threads of the llvm backend (0: the OpenMP default, all cores).

    Raises:
        KilnError: for an unsupported op (naming it and its source line), a model in training
            mode, or inputs kiln cannot take.
    """
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(torch.as_tensor(x) if isinstance(x, np.ndarray) else x
                           for x in example_inputs)
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise KilnError("example_inputs must be tensors or NumPy arrays",
                        hint="pass a tuple of tensors shaped like the real inputs")
    source_graph, out_spec = trace_module(model, example_inputs, frontend)
    arrays = [x.detach().cpu().numpy() for x in example_inputs]
    graph, timing = optimize(source_graph, pipeline, verify=verify,
                             check_inputs=arrays if check_numerics else None)
    return CompiledModel(graph, Executable(graph, backend, threads), out_spec, source_graph,
                         timing)
