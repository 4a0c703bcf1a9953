"""The MODEL argument of the ``kiln`` tool: a zoo name, ``path/to/file.py:factory`` or an ONNX
file.

``load_model`` gives the PyTorch module (for the commands that compare against eager PyTorch or
compile the module); ``load_graph`` gives the imported kiln graph and example inputs, and is
the one that also reads ``.onnx`` files (there is no module to trace for them).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.frontend.trace import trace_module
from kiln.ir import DType, Graph, KilnError
from kiln.zoo import ZOO

SPEC_HELP = ("a zoo model name (" + ", ".join(ZOO) + "), path/to/file.py:factory, where "
             "factory() returns (module, example_inputs), or path/to/model.onnx (an ONNX "
             "file, run on seeded random inputs and judged against its own import on the "
             "reference backend; not for compare, which needs the PyTorch module)")
ONNX_SUFFIX = ".onnx"


def is_onnx_spec(spec: str) -> bool:
    """Whether MODEL ``spec`` names an ONNX file."""
    return spec.lower().endswith(ONNX_SUFFIX)


def load_model(spec: str, batch: int | None = None
               ) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], str]:
    """Build the model named by ``spec``; returns ``(module, example_inputs, name)``.

    ``spec`` is a zoo model name (see ``kiln.zoo.ZOO``) or ``file.py:factory``.
    ``batch`` goes to the zoo factory (default 1); a file factory gets ``batch=batch`` only
    when it is given.

    Raises:
        KilnError: for an unknown zoo name, a missing file or function, or a factory that
            raises or does not return ``(module, example_inputs)``.
    """
    if is_onnx_spec(spec):
        raise KilnError(f"{spec!r} is an ONNX file; this command needs a PyTorch model",
                        hint="give a zoo name or path/to/file.py:factory (ONNX files work "
                             "with the commands built on kiln.debug.model_arg.load_graph)")
    if ":" in spec or spec.endswith(".py"):
        factory, name = _file_factory(spec)
    elif spec in ZOO:
        factory, name = ZOO[spec], spec
        batch = 1 if batch is None else batch
    else:
        raise KilnError(f"unknown model {spec!r}", hint=f"MODEL is {SPEC_HELP}")
    try:
        result = factory() if batch is None else factory(batch=batch)
    except Exception as e:
        raise KilnError(f"model factory {spec!r} raised {type(e).__name__}: {e}",
                        hint="fix the factory so it returns (module, example_inputs)") from e
    module, inputs = _check_result(result, spec)
    return module, inputs, name


def _file_factory(spec: str) -> tuple[Callable[..., Any], str]:
    """Import ``file.py`` of ``file.py:factory`` by path and return the factory function."""
    path_text, _, func_name = spec.rpartition(":")
    if not path_text or not func_name:
        raise KilnError(f"model spec {spec!r} names no factory function",
                        hint="write path/to/file.py:factory")
    path = Path(path_text)
    if not path.is_file():
        raise KilnError(f"model file {str(path)!r} does not exist",
                        hint=f"MODEL is {SPEC_HELP}")
    module_name = f"kiln_debug_model_{path.stem}"
    import_spec = importlib.util.spec_from_file_location(module_name, path)
    if import_spec is None or import_spec.loader is None:
        raise KilnError(f"cannot import {str(path)!r} as Python", hint="give a .py file")
    module = importlib.util.module_from_spec(import_spec)
    # Registered before running so dataclasses and pickling inside the file can find it.
    sys.modules[module_name] = module
    try:
        import_spec.loader.exec_module(module)
    except Exception as e:
        raise KilnError(f"importing {str(path)!r} raised {type(e).__name__}: {e}",
                        hint="fix the error in the model file") from e
    factory = getattr(module, func_name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        raise KilnError(f"{str(path)!r} has no function {func_name!r}",
                        hint=f"functions defined there: {', '.join(found) or 'none'}")
    return factory, f"{path.stem}:{func_name}"


def _check_result(result: Any, spec: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Validate a factory's ``(module, example_inputs)``; a single tensor becomes a 1-tuple."""
    hint = "the factory must return (torch.nn.Module, tensor or tuple of tensors)"
    if not (isinstance(result, tuple) and len(result) == 2):
        raise KilnError(f"model factory {spec!r} returned {type(result).__name__}, "
                        "not a (module, example_inputs) pair", hint=hint)
    module, inputs = result
    if not isinstance(module, torch.nn.Module):
        raise KilnError(f"model factory {spec!r} returned a {type(module).__name__} "
                        "instead of a torch.nn.Module", hint=hint)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not (isinstance(inputs, (tuple, list)) and inputs
            and all(isinstance(x, torch.Tensor) for x in inputs)):
        raise KilnError(f"model factory {spec!r} returned example inputs that are not "
                        "tensors", hint=hint)
    return module, tuple(inputs)


def load_graph(spec: str, batch: int | None = None, frontend: str = "fx"
               ) -> tuple[Graph, list[np.ndarray], str]:
    """The kiln graph of MODEL ``spec`` with example inputs; returns
    ``(graph, example_arrays, name)``.

    A zoo name or ``file.py:factory`` is built as by ``load_model`` and traced with
    ``frontend`` (``fx`` or ``export``); its example inputs are the factory's. An ``.onnx``
    file is imported with ``kiln.frontend.onnx_import.import_onnx``; a dynamic leading (batch)
    dim of an input becomes ``batch`` (default 1), and the example inputs are seeded random
    arrays of the input types (``random_inputs``).

    Raises:
        KilnError: as ``load_model`` does, or for an ONNX file kiln cannot import (unreadable,
            an unsupported op, a dynamic dim other than the leading one, or a ``batch`` that
            differs from the file's static batch size).
    """
    if is_onnx_spec(spec):
        from kiln.frontend.onnx_import import import_onnx

        graph = import_onnx(spec, input_shapes=_onnx_batch_shapes(Path(spec), batch))
        return graph, random_inputs(graph), Path(spec).stem
    module, inputs, name = load_model(spec, batch)
    graph, _ = trace_module(module, inputs, frontend)
    return graph, [x.detach().cpu().numpy() for x in inputs], name


def _onnx_batch_shapes(path: Path, batch: int | None) -> dict[str, list[int]] | None:
    """Input shapes that fix each input's dynamic leading dim to ``batch`` (default 1).

    Only the inputs' declared shapes are read here; import_onnx reports a file it cannot load
    and the dims still dynamic.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # import_onnx says what is wrong with the file
        return None
    weights = {t.name for t in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        if vi.name in weights or not tt.HasField("shape") or not tt.shape.dim:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if dims[0] == -1:
            dims[0] = 1 if batch is None else batch
        elif batch is not None and dims[0] != batch:
            raise KilnError(f"{str(path)!r} fixes the batch size of input {vi.name!r} to "
                            f"{dims[0]}; it cannot be compiled for batch {batch}",
                            hint="leave out --batch, or export the model with a dynamic "
                                 "batch dim")
        if -1 not in dims:
            shapes[vi.name] = dims
    return shapes


def random_inputs(graph: Graph, seed: int = 0) -> list[np.ndarray]:
    """Seeded example inputs of ``graph``'s input types.

    Floats are standard normal, bools fair coins; integers are uniform in [0, n) where n is
    the smallest number of rows of any table they index (embedding, take; through shape ops), so
    token ids are valid, else in [0, 2).
    """
    rng = np.random.default_rng(seed)
    bounds = _index_bounds(graph)
    arrays = []
    for name in graph.inputs:
        t = graph.types[name]
        if t.dtype.is_float:
            arrays.append(rng.standard_normal(t.shape).astype(t.dtype.numpy))
        elif t.dtype == DType.bool:
            arrays.append(rng.random(t.shape) < 0.5)
        else:
            high = min(bounds.get(name, 2), int(np.iinfo(t.dtype.numpy).max))
            arrays.append(rng.integers(0, high, t.shape).astype(t.dtype.numpy))
    return arrays


_SHAPE_OPS = ("reshape", "permute", "slice", "expand", "concat", "split", "cast")


def _index_bounds(graph: Graph) -> dict[str, int]:
    """For each graph input, the fewest rows of the tables (embedding, take) it indexes."""
    users = graph.users()
    bounds = {}
    for name in graph.inputs:
        seen, todo, rows = set(), [name], []
        while todo:
            value = todo.pop()
            for n in users.get(value, []):
                if n.op == "embedding" and n.inputs[0] == value:
                    rows.append(graph.types[n.inputs[1]].shape[0])
                elif n.op in ("take", "gather_elements") and value in n.inputs[1:]:
                    # the axis it indexes (ONNX Gather imports as take)
                    x = graph.types[n.inputs[0]]
                    axis = n.attrs.get("axis", 0) % max(x.rank, 1)
                    rows.append(x.shape[axis + (n.inputs[1:].index(value)
                                                if n.op == "take" else 0)])
                elif n.op in _SHAPE_OPS:
                    todo.extend(o for o in n.outputs if o not in seen)
                    seen.update(n.outputs)
        if rows:
            bounds[name] = max(min(rows), 1)
    return bounds


def load_checked(spec: str, batch: int | None = None, frontend: str = "fx"
                 ) -> tuple[Graph, list[np.ndarray], list[np.ndarray], str]:
    """``load_graph`` plus the outputs every stage is judged against: eager PyTorch's for a
    PyTorch model, the imported graph's on the reference backend for an ONNX file (there is
    no PyTorch module to run); returns ``(graph, arrays, expected, name)``."""
    from torch.utils import _pytree as pytree

    from kiln.backends.reference import run_graph

    if is_onnx_spec(spec):
        graph, arrays, name = load_graph(spec, batch, frontend)
        return graph, arrays, [np.asarray(o) for o in run_graph(graph, arrays)], name
    module, inputs, name = load_model(spec, batch)
    graph, _ = trace_module(module, inputs, frontend)
    with torch.no_grad():
        result = module(*inputs)
    expected = [leaf.detach().cpu().numpy() for leaf in pytree.tree_leaves(result)
                if isinstance(leaf, torch.Tensor)]
    return graph, [x.detach().cpu().numpy() for x in inputs], expected, name
