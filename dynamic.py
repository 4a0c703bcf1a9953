"""``kiln.compile(model, example_inputs, dynamic=...)``: one compiled model for inputs whose
batch size or sequence length varies from call to call.

This is the first step of dynamic shapes: a ``DynamicModel`` checks each call against the
declared dynamic dimensions (the others must keep the example's sizes; dimensions sharing a
name must be equal), and runs a program compiled for that call's exact sizes, compiling it on
the first call that brings them. The ``MAX_SPECIALIZATIONS`` most recently used programs stay
in memory, and the compile cache on disk keeps the rest, so a size seen before costs a cache
load, not a compile. Each program is a static kiln program: it runs exactly as fast as
``kiln.compile`` at that size. What this step does not do yet: one program whose kernels take
their sizes at run time (symbolic dimensions in the IR), and artifacts that keep dynamic
dimensions; export one size with ``dynamic_model.specialize(*inputs)``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kiln.ir import KilnError

MAX_SPECIALIZATIONS = 16
"""Programs a DynamicModel keeps in memory, one per set of sizes (least recently used go)."""

MAX_DIM = 1 << 20
"""The largest size a dynamic dimension may take at a call."""


def _dim_name_and_bounds(spec: Any) -> tuple[str, int, int] | None:
    """A size name and its bounds from a ``dynamic=`` entry: a name (1..MAX_DIM) or a
    ``torch.export.Dim`` (its name, min and max; an unbounded max becomes MAX_DIM). None for
    anything else."""
    if isinstance(spec, str):
        return (spec, 1, MAX_DIM) if spec.isidentifier() else None
    if isinstance(spec, torch.export.Dim):
        lo, hi = spec.min, spec.max
        lo = max(int(lo), 1)
        hi = int(hi) if isinstance(hi, int) and hi < MAX_DIM else MAX_DIM
        return spec.__name__, lo, hi
    return None


def normalize_dynamic(dynamic: Any, example_inputs: Sequence[torch.Tensor],
                      names: Sequence[str]
                      ) -> tuple[dict[int, dict[int, str]], dict[str, tuple[int, int]]]:
    """``dynamic=`` as ({input index: {dim: size name}}, {size name: (min, max)}): True makes
    dimension 0 of every input ``batch``; a mapping names inputs by index or parameter name,
    and each dimension by a name or a ``torch.export.Dim`` (whose min and max become the
    size's bounds; the same name in several places ties those dimensions, and their bounds
    meet). The example's sizes must lie in the bounds. A KilnError for anything else, naming
    the input and the dimension."""
    usage = ("dynamic=True (the batch dimension of every input), or e.g. "
             "dynamic={'input_ids': {0: 'batch', 1: torch.export.Dim('seq', max=512)}}")
    if dynamic is True:
        out = {i: {0: "batch"} for i, x in enumerate(example_inputs) if x.dim() >= 1}
        if not out:
            raise KilnError("dynamic=True: no input has a batch dimension", hint=usage)
        return out, {"batch": (1, MAX_DIM)}
    if not isinstance(dynamic, Mapping) or not dynamic:
        raise KilnError(f"dynamic must be True or a non-empty dict, got {dynamic!r}"[:200],
                        hint=usage)
    out: dict[int, dict[int, str]] = {}
    bounds: dict[str, tuple[int, int]] = {}
    for key, dims in dynamic.items():
        if isinstance(key, str) and key in names[:len(example_inputs)]:
            index = list(names).index(key)
        elif isinstance(key, int) and not isinstance(key, bool) \
                and 0 <= key < len(example_inputs):
            index = key
        else:
            raise KilnError(f"dynamic names input {key!r}, which the model does not take",
                            hint=f"inputs: {list(names[:len(example_inputs)]) or 'by index'}")
        rank = example_inputs[index].dim()
        label = names[index] if index < len(names) else f"input {index}"
        if not isinstance(dims, Mapping):
            raise KilnError(f"dynamic[{key!r}] must map dimensions to names, got {dims!r}",
                            hint=usage)
        for dim, spec in dims.items():
            if isinstance(dim, bool) or not isinstance(dim, int) or not -rank <= dim < rank:
                raise KilnError(f"dynamic dimension {dim!r} of {label} is not one of its "
                                f"{rank} dimensions", hint=usage)
            named = _dim_name_and_bounds(spec)
            if named is None:
                raise KilnError(f"dynamic dimension {dim} of {label} needs a name (a Python "
                                f"identifier) or a torch.export.Dim, got {spec!r}", hint=usage)
            name, lo, hi = named
            lo0, hi0 = bounds.get(name, (1, MAX_DIM))
            lo, hi = max(lo, lo0), min(hi, hi0)
            size = example_inputs[index].shape[dim]
            if not lo <= size <= hi:
                raise KilnError(f"dynamic dimension {dim} of {label} ({name}) is {size} in the "
                                f"example inputs, outside its bounds {lo}..{hi}",
                                hint="widen the Dim's min/max, or pass an example inside them")
            bounds[name] = (lo, hi)
            out.setdefault(index, {})[dim % rank] = name
    return out, bounds


class DynamicModel:
    """A model compiled for every size its dynamic dimensions take (see the module
    docstring). Call it like the original; ``specialize(*inputs)`` gives the CompiledModel
    for those inputs' sizes (to export, profile or inspect)."""

    def __init__(self, compile_at: Callable[[tuple[torch.Tensor, ...]], Any],
                 example_inputs: Sequence[torch.Tensor], dims: dict[int, dict[int, str]],
                 names: Sequence[str], bounds: Mapping[str, tuple[int, int]] | None = None
                 ) -> None:
        self._compile_at = compile_at
        self.dims = dims
        self.bounds = {name: (bounds or {}).get(name, (1, MAX_DIM))
                       for d in dims.values() for name in d.values()}
        self._names = [names[i] if i < len(names) else f"input {i}"
                       for i in range(len(example_inputs))]
        self._example = [(tuple(x.shape), x.dtype) for x in example_inputs]
        self._programs: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()          # the table of programs
        self._compiling = threading.Lock()     # compiles, one at a time
        self._by_shapes: dict[tuple, tuple] = {}  # input shapes -> sizes, for calls
        first = self.specialize(*example_inputs)
        self.backend = first.backend

    @property
    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        """{input name: {dimension: size name}}."""
        return {self._names[i]: dict(d) for i, d in self.dims.items()}

    def _sizes(self, args: Sequence[Any]) -> tuple:
        """The sizes of this call's dynamic dimensions, after checking every other size."""
        if len(args) != len(self._example):
            raise KilnError(f"the model takes {len(self._example)} inputs, got {len(args)}")
        seen: dict[str, tuple[int, str]] = {}
        key = []
        for i, (a, (shape, _)) in enumerate(zip(args, self._example)):
            got = tuple(a.shape) if hasattr(a, "shape") else tuple(np.shape(a))
            dyn = self.dims.get(i, {})
            if len(got) != len(shape):
                raise KilnError(f"input %{self._names[i]} has {len(got)} dimensions, the "
                                f"model was compiled for {len(shape)} ({list(shape)})")
            for d, (n, want) in enumerate(zip(got, shape)):
                if d in dyn:
                    name = dyn[d]
                    lo, hi = self.bounds[name]
                    if not lo <= n <= hi:
                        raise KilnError(f"input %{self._names[i]} dimension {d} ({name}) is "
                                        f"{n}; the model takes {lo} <= {name} <= {hi}",
                                        hint="compile with wider bounds for it (a "
                                             "torch.export.Dim's min/max in dynamic=)")
                    if name in seen and seen[name][0] != n:
                        raise KilnError(
                            f"input %{self._names[i]} dimension {d} is {n}, but {name} is "
                            f"{seen[name][0]} in {seen[name][1]}",
                            hint=f"dimensions named {name!r} must be equal in one call")
                    seen.setdefault(name, (n, f"%{self._names[i]} dimension {d}"))
                    key.append(n)
                elif n != want:
                    raise KilnError(
                        f"input %{self._names[i]} dimension {d} is {n}; the model was "
                        f"compiled for {want} there, and it is not dynamic",
                        hint=f"declare it: dynamic={{{self._names[i]!r}: {{{d}: 'name'}}}}")
        return tuple(key)

    def specialize(self, *inputs: Any) -> Any:
        """The CompiledModel for the sizes of ``inputs`` (compiled now if not yet). Calls of
        sizes already compiled never wait for a compile of another size."""
        key = self._sizes(inputs)
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                self._programs.move_to_end(key)
                return program
        with self._compiling:   # one compile at a time, and each size once
            with self._lock:
                program = self._programs.get(key)
            if program is not None:
                return program
            tensors = tuple(a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
                            for a in inputs)
            try:
                program = self._compile_at(tensors)
            except KilnError as e:
                sizes = ", ".join(f"{n}={v}" for n, v in zip(self._size_names(), key))
                e.message = f"{e.message} (compiling for {sizes})"
                raise
            with self._lock:
                self._programs[key] = program
                while len(self._programs) > MAX_SPECIALIZATIONS:
                    self._programs.popitem(last=False)
            return program

    def programs(self) -> list[Any]:
        """The compiled programs held now, least recently used first."""
        with self._lock:
            return list(self._programs.values())

    def _size_names(self) -> list[str]:
        return [self.dims[i][d] for i in sorted(self.dims) for d in sorted(self.dims[i])]

    def __call__(self, *args: Any) -> Any:
        # Fast path: input shapes seen before map straight to their sizes (a few hundred ns,
        # not the microseconds of checking every dimension; programs check dtypes and shapes)
        try:
            shapes = tuple(a.shape for a in args)
        except AttributeError:
            shapes = None
        key = self._by_shapes.get(shapes)
        if key is not None:
            with self._lock:
                program = self._programs.get(key)
                if program is not None:
                    self._programs.move_to_end(key)
            if program is not None:
                return program(*args)
        program = self.specialize(*args)
        if shapes is not None:
            if len(self._by_shapes) >= 4096:
                self._by_shapes.clear()
            self._by_shapes[shapes] = self._sizes(args)
        return program(*args)

    def __repr__(self) -> str:
        return (f"<kiln DynamicModel {self.dynamic_dims}, {len(self._programs)} size(s) "
                f"compiled>")
