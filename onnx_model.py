"""``kiln.compile("model.onnx")``: compile an ONNX file (or ``onnx.ModelProto``) to a callable,
keeping the symbolic dimensions the file declares.

An input dimension the file gives as a ``dim_param`` (``"batch"``, ``"sequence"``) or leaves
unnamed is dynamic: the result is a ``DynamicModel`` whose size names are the file's (one name
in several inputs ties those dimensions), and each call's sizes get a program compiled on first
use, exactly as ``kiln.compile(module, x, dynamic=...)`` does. ``input_shapes`` fixes
dimensions instead (then they are static); a file whose inputs are all static gives a plain
``CompiledModel``. The file is read once, by the hardened importer
(``kiln.frontend.onnx_import``); each size re-imports the in-memory model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import torch

from kiln.frontend import onnx_import
from kiln.ir import KilnError

_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.DOUBLE: torch.float32, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.BOOL: torch.bool,
}


def is_onnx_model(model: Any) -> bool:
    """Whether ``model`` is what ``compile_onnx`` takes: an ONNX path or a ModelProto."""
    if isinstance(model, onnx.ModelProto):
        return True
    return isinstance(model, str) and model.endswith(".onnx") or (
        hasattr(model, "__fspath__") and str(model.__fspath__()).endswith(".onnx"))


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {i.name for i in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def _declared(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]
              ) -> tuple[list[tuple[str, torch.dtype, list]], dict[int, dict[int, str]]]:
    """Per input (name, dtype, dims: an int or a size name), and the dynamic dimensions as
    {input index: {dim: name}}; ``input_shapes`` overrides a whole input's shape."""
    inputs, dynamic = [], {}
    for i, vi in enumerate(_graph_inputs(model)):
        tt = vi.type.tensor_type
        dtype = _ONNX_TO_TORCH.get(tt.elem_type)
        if dtype is None:
            raise KilnError(f"input {vi.name!r} has ONNX element type "
                            f"{onnx.TensorProto.DataType.Name(tt.elem_type)}, which kiln does "
                            "not compile", hint="convert the model's inputs to float32 or int64")
        if vi.name in input_shapes:
            dims: list = [int(d) for d in input_shapes[vi.name]]
        elif not tt.HasField("shape"):
            raise KilnError(f"input {vi.name!r} has no declared rank",
                            hint=f"pass input_shapes={{{vi.name!r}: (...)}}")
        else:
            dims = []
            for d, dim in enumerate(tt.shape.dim):
                if dim.HasField("dim_value"):
                    dims.append(int(dim.dim_value))
                else:
                    name = dim.dim_param if dim.dim_param.isidentifier() else \
                        f"{vi.name}_{d}" if f"{vi.name}_{d}".isidentifier() else f"input{i}_{d}"
                    dims.append(name)
                    dynamic.setdefault(i, {})[d] = name
        inputs.append((vi.name, dtype, dims))
    return inputs, dynamic


def _examples(inputs: list[tuple[str, torch.dtype, list]],
              example_inputs: Sequence[Any] | None) -> tuple[torch.Tensor, ...]:
    """The example tensors: the caller's, or zeros with every dynamic size 1."""
    if example_inputs is not None:
        from kiln.api import example_tensors

        return example_tensors(example_inputs, [n for n, _, _ in inputs])
    return tuple(torch.zeros([d if isinstance(d, int) else 1 for d in dims], dtype=dtype)
                 for _, dtype, dims in inputs)


def compile_onnx(model: Any, example_inputs: Sequence[Any] | None = None, *,
                 input_shapes: Mapping[str, Sequence[int]] | None = None,
                 dynamic: Any = None, **options: Any) -> Any:
    """Compile an ONNX model (see the module docstring). ``options`` are kiln.compile's
    backend, pipeline, verify, check_numerics, threads, target and winograd. ``dynamic=False``
    refuses a file with dynamic dimensions (unless ``input_shapes`` fixes them);
    ``dynamic=True`` or None keeps the file's."""
    from kiln.api import compile_graph, optimize
    from kiln.dynamic import MAX_DIM, DynamicModel

    limit = onnx_import.tensor_byte_limit()
    proto, name = onnx_import._load(model, limit)
    inputs, dims = _declared(proto, dict(input_shapes or {}))
    examples = _examples(inputs, example_inputs)
    if len(examples) != len(inputs):
        raise KilnError(f"the ONNX model takes {len(inputs)} inputs, got {len(examples)} "
                        "example inputs", hint=f"its inputs: {[n for n, _, _ in inputs]}")
    names = [n for n, _, _ in inputs]

    def import_at(xs: Sequence[torch.Tensor]):
        shapes = {n: tuple(x.shape) for n, x in zip(names, xs)}
        graph = onnx_import.import_onnx(proto, input_shapes=shapes)
        graph.name = name
        graph.frontend = "onnx"
        return graph

    def compile_at(xs: Sequence[torch.Tensor]):
        return compile_graph(import_at(xs), xs, **options)

    def graph_at(xs: Sequence[torch.Tensor]):   # optimized, no code: for an ONNX re-export
        return optimize(import_at(xs), options.get("pipeline", "O1"),
                        verify=options.get("verify", True))[0]

    if not dims:
        return compile_at(examples)
    if dynamic is False:
        described = {names[i]: sorted(d.values()) for i, d in dims.items()}
        raise KilnError(f"the ONNX model has dynamic dimensions {described} and dynamic=False",
                        hint="fix them with input_shapes={name: shape}, or leave dynamic out")
    if dynamic not in (None, True):
        raise KilnError("an ONNX model's dynamic dimensions come from the file (dim_param)",
                        hint="leave dynamic out, or fix sizes with input_shapes=")
    bounds = {n: (1, MAX_DIM) for d in dims.values() for n in d.values()}
    for i, d in dims.items():
        for dim, n in d.items():
            if not 1 <= examples[i].shape[dim] <= MAX_DIM:
                raise KilnError(f"example input {names[i]!r} dimension {dim} ({n}) is "
                                f"{examples[i].shape[dim]}; a size must be 1..{MAX_DIM}")
    return DynamicModel(compile_at, examples, dims, names, bounds, graph_at=graph_at)

