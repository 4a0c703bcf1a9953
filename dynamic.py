"""``kiln.compile(model, example_inputs, dynamic=...)``: one compiled model for inputs whose
batch size or sequence length varies from call to call.

A ``DynamicModel`` checks each call against the declared dynamic dimensions (the others must
keep the example's sizes; dimensions sharing a name must be equal), and runs a program compiled
for that call's exact sizes, compiling it on the first call that brings them. The
``MAX_SPECIALIZATIONS`` most recently used programs stay in memory, and the compile cache on
disk keeps the rest, so a size seen before costs a cache load, not a compile. Each program is a
static kiln program: it runs exactly as fast as ``kiln.compile`` at that size. Artifacts keep
the sizes compiled so far (``kiln.export``); an ONNX export is written for every size
(``dim_param``s, sizes computed in the graph: kiln.interop.onnx_dynamic), from the graph built
at a few probe sizes (``graph_at``).

With compression (``kiln.compile(..., quantize=..., dynamic=...)`` or ``kiln.compress(...,
dynamic=...)``) the model is compressed once, at the example inputs, and that compression is
rebuilt at each new size (``SizedCompression``). ``symbolic_graph()`` is the graph for every
size, with the dynamic dimensions as named sizes (kiln.ir.sizes, kiln.frontend.symbolic). Not
done yet: one program whose kernels take their sizes at run time.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kiln.ir import KilnError

MAX_SPECIALIZATIONS = 16
"""Programs a DynamicModel keeps in memory, one per set of sizes (least recently used go)."""

HOT_CALLS = 8
"""A row count served on row slices this many times gets a program of its own, compiled in
the background (``DynamicModel.compile_hot``)."""

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


def resize_inputs(inputs: Sequence[torch.Tensor], dims: Mapping[int, Mapping[int, str]],
                  sizes: Mapping[str, int]) -> tuple[torch.Tensor, ...]:
    """``inputs`` with each dynamic dimension (``dims``: input index -> {dim: size name}) at
    ``sizes[its name]``: repeated along it and cut, so token ids and other values stay ones
    the model takes."""
    out = []
    for i, x in enumerate(inputs):
        for d, name in sorted(dims.get(i, {}).items()):
            n = sizes[name]
            reps = -(-n // x.shape[d])
            x = torch.cat([x] * reps, dim=d).narrow(d, 0, n) if reps > 1 else x.narrow(d, 0, n)
        out.append(x.contiguous())
    return tuple(out)


class DynamicModel:
    """A model compiled for every size its dynamic dimensions take (see the module
    docstring). Call it like the original; ``specialize(*inputs)`` gives the CompiledModel
    for those inputs' sizes (to export, profile or inspect)."""

    split_rows: bool = True
    """A call whose row count (a size every input that has it holds as its leading dimension,
    such as the batch) is not a power of two and has no program yet runs as calls of
    power-of-two row counts on row slices (13 rows: 8 + 4 + 1), when the model's symbolic
    graph shows that rows never meet (``rows``); so any batch size runs on at most
    log2(max) + 1 compiled programs instead of one compile per size, at once. A row count
    called often gets its own program (``compile_hot``). False: compile every size on the call
    that first brings it."""

    compile_hot: int = HOT_CALLS
    """Calls on row slices after which a row count gets a program of its own, compiled by a
    background thread while calls go on on row slices (0: never)."""

    def __init__(self, compile_at: Callable[[tuple[torch.Tensor, ...]], Any],
                 example_inputs: Sequence[torch.Tensor], dims: dict[int, dict[int, str]],
                 names: Sequence[str], bounds: Mapping[str, tuple[int, int]] | None = None,
                 graph_at: Callable[[tuple[torch.Tensor, ...]], Any] | None = None,
                 compile_graph_at: Callable[[Any, tuple[torch.Tensor, ...], Any], Any]
                 | None = None) -> None:
        self._compile_at = compile_at
        # Compiles a static graph (the symbolic graph specialized to a call's sizes), given the
        # call's inputs and the first program (for its output structure): a new size then
        # needs no trace of the model.
        self._compile_graph_at = compile_graph_at
        self._first: Any = None
        # The optimized graph at given sizes, without code (ONNX export builds it at probes).
        self._graph_at = graph_at
        self._example_inputs = tuple(example_inputs)
        # The kiln.compress result when the model was compressed (made once, at the example).
        self.compression: Any = None
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
        self._symbolic: Any = None
        self._symbolic_error: KilnError | None = None
        self._rows: tuple[str | None, str] | None = None   # (row size, reason)
        self._rows_lock = threading.RLock()     # the symbolic graph and the rows, made once
        self._split_calls: dict[tuple, int] = {}  # calls served on row slices, per sizes
        self._hot: list[tuple] = []            # sizes to compile in the background
        self._worker: threading.Thread | None = None
        _LIVE.add(self)
        first = self.specialize(*example_inputs)
        self._first = first
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
                program = self._compile_sizes(key, tensors)
            except KilnError as e:
                sizes = ", ".join(f"{n}={v}" for n, v in zip(self._size_names(), key))
                e.message = f"{e.message} (compiling for {sizes})"
                raise
            with self._lock:
                self._programs[key] = program
                while len(self._programs) > MAX_SPECIALIZATIONS:
                    self._programs.popitem(last=False)
            return program

    def _compile_sizes(self, key: tuple, tensors: tuple[torch.Tensor, ...]) -> Any:
        """The program for one set of sizes: from the symbolic graph specialized to them when
        the model has one (no trace of the model: a trace patches torch.nn.Module calls
        process-wide while it runs), else from a trace at these sizes."""
        if self._first is not None and self._compile_graph_at is not None:
            graph = self._symbolic_or_none()
            if graph is not None:
                from kiln.ir.symbolic import specialize

                sizes = dict(zip(self._size_names(), key))
                return self._compile_graph_at(specialize(graph, sizes), tensors, self._first)
        return self._compile_at(tensors)

    def _symbolic_or_none(self) -> Any:
        with self._rows_lock:
            if self._symbolic is None and self._symbolic_error is None:
                try:
                    self.symbolic_graph()
                except KilnError as e:
                    self._symbolic_error = e
            return self._symbolic

    def inputs_at(self, sizes: Mapping[str, int]) -> tuple[torch.Tensor, ...]:
        """The example inputs with each dynamic dimension at ``sizes[its name]``."""
        return resize_inputs(self._example_inputs, self.dims, sizes)

    def graph_at(self, sizes: Mapping[str, int]) -> Any:
        """The optimized kiln Graph at ``sizes`` ({size name: size}), without compiling code:
        an export for every size compares it at several sizes (kiln.interop.onnx_dynamic)."""
        if self._graph_at is None:
            raise KilnError("this dynamic model cannot rebuild its graph at other sizes",
                            hint="export one size: kiln.export(model.specialize(*inputs), "
                                 "path)")
        return self._graph_at(self.inputs_at(sizes))

    def symbolic_graph(self) -> Any:
        """The model's optimized graph for every size: its dynamic dimensions are named sizes
        (kiln.ir.sizes) with the model's bounds, fitted from the graph at a few probe sizes
        (kiln.frontend.symbolic) and verified. A KilnError names the node when the model's
        graph has no such form (a constant folded from a size, a graph that changes with the
        sizes)."""
        with self._rows_lock:
            if self._symbolic is None:
                if self._symbolic_error is not None:
                    raise self._symbolic_error
                from kiln.frontend.symbolic import symbolic_graph

                try:
                    self._symbolic = symbolic_graph(self.graph_at, self.bounds)
                except KilnError as e:
                    self._symbolic_error = e
                    raise
            return self._symbolic

    @property
    def rows(self) -> tuple[str | None, str]:
        """(the size whose rows run apart, or None; why): the first size held as the leading
        dimension of inputs for which ``kiln.ir.symbolic.rows_independent`` holds on the
        symbolic graph, else None and the reason."""
        with self._rows_lock:
            if self._rows is None:
                self._rows = self._find_rows()
            return self._rows

    def _find_rows(self) -> tuple[str | None, str]:
        from kiln.ir.symbolic import rows_independent

        leading = list(dict.fromkeys(d[0] for d in self.dims.values() if 0 in d))
        if not leading:
            return None, "no input has a dynamic leading dimension"
        graph = self._symbolic_or_none()
        if graph is None:
            return None, f"the model has no graph for every size: {self._symbolic_error.message}"
        reasons = []
        for name in leading:
            why = rows_independent(graph, name)
            if why is None:
                return name, f"the rows of {name} never meet in the graph"
            reasons.append(why)
        return None, "; ".join(reasons)

    def _split_plan(self, key: tuple) -> tuple[str, list[int]] | None:
        """(row size, row counts) when this call runs as smaller calls (``split_rows``)."""
        if not self.split_rows:
            return None
        with self._lock:
            if key in self._programs:
                return None
        sizes = dict(zip(self._size_names(), key))
        name = self.rows[0]
        if name is None:
            return None
        n = sizes[name]
        if n & (n - 1) == 0:
            return None                        # a power of two: compiled as it is
        parts = [1 << k for k in range(n.bit_length() - 1, -1, -1) if n >> k & 1]
        lo, hi = self.bounds[name]
        if any(not lo <= p <= hi for p in parts):
            return None
        return name, parts

    def _count_split(self, key: tuple) -> None:
        """Count a call served on row slices; the ``compile_hot``-th queues its sizes for a
        program of their own, compiled by a background thread."""
        if self.compile_hot <= 0:
            return
        with self._lock:
            if len(self._split_calls) >= 4096:
                self._split_calls.clear()
            count = self._split_calls[key] = self._split_calls.get(key, 0) + 1
            if count != self.compile_hot:
                return
            self._hot.append(key)
            if self._worker is None:
                # Not a daemon: the interpreter waits for a compile in flight at exit rather
                # than freeze this thread inside LLVM while it tears the process down.
                self._worker = threading.Thread(target=self._compile_hot_sizes, daemon=False,
                                                name="kiln-dynamic-compile")
                self._worker.start()

    def _compile_hot_sizes(self) -> None:
        while True:
            with self._lock:
                if not self._hot:
                    self._worker = None
                    return
                key = self._hot.pop(0)
            sizes = dict(zip(self._size_names(), key))
            try:
                self.specialize(*self.inputs_at(sizes))
            except Exception as e:  # noqa: BLE001 (a background compile must not kill its thread)
                warnings.warn(f"kiln: compiling a program for {sizes} failed; calls of these "
                              f"sizes keep running on row slices: {e}", stacklevel=1)

    def wait_compiles(self, timeout: float | None = None) -> bool:
        """Wait for the background compiles of hot sizes; True when none is left."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        return self._worker is None

    def _after_fork(self) -> None:
        # Only the forking thread lives on in a child: a lock held by another thread (a
        # compile) would never be released there, and its background worker is gone.
        self._lock = threading.Lock()
        self._compiling = threading.Lock()
        self._rows_lock = threading.RLock()
        self._hot, self._worker = [], None
        self._split_calls = {}

    def _run_rows(self, args: Sequence[Any], name: str, parts: list[int]) -> Any:
        sliced = {i for i, d in self.dims.items() if d.get(0) == name}
        outs, start = [], 0
        for part in parts:
            piece = [a[start:start + part] if i in sliced else a for i, a in enumerate(args)]
            outs.append(self(*piece))
            start += part
        return _cat_rows(outs)

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
        key = self._sizes(args)
        plan = self._split_plan(key)
        if plan is not None:
            self._count_split(key)
            return self._run_rows(args, *plan)
        program = self.specialize(*args)
        if shapes is not None:
            if len(self._by_shapes) >= 4096:
                self._by_shapes.clear()
            self._by_shapes[shapes] = self._sizes(args)
        return program(*args)

    def __repr__(self) -> str:
        return (f"<kiln DynamicModel {self.dynamic_dims}, {len(self._programs)} size(s) "
                f"compiled>")


_LIVE: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for model in list(_LIVE):
        model._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _cat_rows(outs: Sequence[Any]) -> Any:
    """The outputs of calls on consecutive row slices, joined along their leading axis (the
    output structure is the first call's)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat = [tree_flatten(o) for o in outs]
    leaves, spec = flat[0]
    joined = []
    for k, leaf in enumerate(leaves):
        column = [f[0][k] for f in flat]
        if isinstance(leaf, torch.Tensor):
            joined.append(torch.cat(column, dim=0))
        elif isinstance(leaf, np.ndarray):
            joined.append(np.concatenate(column, axis=0))
        else:
            joined.append(leaf)
    return tree_unflatten(joined, spec)


# ---- compression with dynamic sizes -------------------------------------------------------
class SizedCompression:
    """A compression made once, at the example sizes, rebuilt at any other sizes.

    Compression's decisions come from data (calibrated ranges, Taylor scores, distilled weights)
    at the example sizes, and its graph is static. At new sizes the same stages run again
    on the model traced at those sizes, data-free: the same pruning rule (Taylor scores
    replaced by L1 and a gradual schedule by one shot: the same ratios keep the same channel
    counts), no distillation, int8 with placeholder ranges. That *twin* has the structure of
    the real result at the new sizes; comparing it with the twin at the example sizes tells
    which numbers move with the sizes (reshape targets, a position table's slice), and every
    other number is taken from the real result (its kept channels, ranges and trained
    weights). A number that moves and that compression also changed (a distilled position
    table, channels a FLOPs target chose differently at another size) is refused, naming the
    node.
    """

    def __init__(self, trace_at: Callable[[tuple[torch.Tensor, ...]], tuple[Any, Any]],
                 compressed: Any, example_inputs: Sequence[torch.Tensor],
                 options: Mapping[str, Any]) -> None:
        self.compressed = compressed
        self._trace_at = trace_at
        self._options = dict(options)
        prune = self._options.get("prune")
        if isinstance(prune, Mapping):
            # The twin prunes data-free and at once: Taylor scores and a gradual schedule (which
            # needs distillation) give way to L1 at the same ratios, the same channel counts.
            prune = {k: v for k, v in prune.items() if k not in ("scores", "schedule")}
            if prune.get("criterion") == "taylor":
                prune["criterion"] = "l1"
            self._options["prune"] = prune
        self._example_inputs = tuple(example_inputs)
        self._base: Any = None
        self._lock = threading.Lock()

    def twin(self, inputs: Sequence[torch.Tensor]) -> tuple[Any, Any]:
        """(the data-free compressed graph at these inputs' sizes, the traced graph)."""
        from kiln.compression.compress import compress_graph
        from kiln.compression.quantize import calibration_values
        from kiln.passes import PassContext, PassManager, Verify, get_pass

        source, _ = self._trace_at(tuple(inputs))
        o = self._options
        graph = compress_graph(source, None, prune=o.get("prune"), low_rank=o.get("low_rank"),
                               prune_multiple=o["prune_multiple"], target=o.get("target")).graph
        quantize = o.get("quantize")
        if quantize is not None and quantize is not False:
            q = quantize if isinstance(quantize, Mapping) else {}
            # QAT's graph converts with the static pass (its training is in the weights).
            mode = q.get("mode", "static")
            options = {"quantize_int8.mode": "static" if mode == "qat" else mode,
                       "quantize_int8.protect": tuple(q.get("protect", ())),
                       "quantize_int8.target": o.get("target"),
                       "quantize_int8.ranges": {v: (-1.0, 1.0)
                                                for v in calibration_values(graph)}}
            if "weight_max" in q:
                options["quantize_int8.weight_max"] = q["weight_max"]
            graph = PassManager([get_pass(n) for n in ("quantize_int8", "sink_permutes", "dce")],
                                [Verify()]).run(graph, PassContext(options=options))
        return graph, source

    def graph_at(self, inputs: Sequence[torch.Tensor]) -> tuple[Any, Any]:
        """(the compressed graph at these inputs' sizes, the graph traced at them)."""
        if [x.shape for x in inputs] == [x.shape for x in self._example_inputs]:
            return self.compressed.graph, self.compressed.source_graph
        with self._lock:
            if self._base is None:
                self._base = self.twin(self._example_inputs)[0]
        twin, source = self.twin(inputs)
        moves = {(a, b) for x, y in zip(self._example_inputs, inputs)
                 for a, b in zip(x.shape, y.shape) if a != b}
        return transplant(self.compressed.graph, self._base, twin, moves), source


def transplant(real: Any, base: Any, twin: Any, moves: set[tuple[int, int]]) -> Any:
    """``twin``'s graph with every number that does not move between ``base`` (the twin at the
    real graph's sizes) and ``twin`` taken from ``real`` (see SizedCompression). ``moves``:
    the (example size, new size) pairs of the inputs' dimensions; a constant may only grow or
    shrink along such a pair (a table slice), not by other channel counts."""
    from kiln.ir import Graph, TensorType, infer_types, verify

    def refuse(node: Any, what: str, hint: str = "") -> KilnError:
        return KilnError(f"the compressed graph cannot be rebuilt at other sizes: {what}",
                         node=getattr(node, "name", None), op=getattr(node, "op", None),
                         hint=hint + "compile the compressed model for each size without "
                                     "dynamic=")

    if len(real.nodes) != len(base.nodes) or len(base.nodes) != len(twin.nodes) or \
            real.inputs != base.inputs or set(real.constants) != set(twin.constants):
        raise refuse(None, "compression made a different graph at another size")
    constants = {}
    for name, value in real.constants.items():
        b, t = base.constants[name], twin.constants[name]
        if b.shape == t.shape and np.array_equal(b, t):
            constants[name] = value
        elif b.ndim == t.ndim and any((m, n) not in moves and m != n
                                      for m, n in zip(b.shape, t.shape)):
            user = next((n for n in real.nodes if name in n.inputs), None)
            raise refuse(user, f"constant %{name} is {list(t.shape)} at the new sizes, "
                               f"{list(b.shape)} at the example's: compression chose other "
                               "channels there (a FLOPs target depends on the sizes)",
                         "prune by a ratio (prune={'ratio': 0.3}), not a FLOPs target; or ")
        elif value.shape == b.shape and np.array_equal(value, b):
            constants[name] = t   # moves with the sizes, and compression left it as it was
        else:
            user = next((n for n in real.nodes if name in n.inputs), None)
            raise refuse(user, f"constant %{name} moves with the sizes and was changed by "
                               "compression (pruned or distilled)")
    types = {i: twin.types[i] for i in twin.inputs}
    types.update({k: TensorType.of(v) for k, v in constants.items()})
    nodes = []
    for r, b, t in zip(real.nodes, base.nodes, twin.nodes):
        if not (r.op == b.op == t.op and r.inputs == b.inputs == t.inputs
                and r.outputs == b.outputs == t.outputs and set(r.attrs) == set(t.attrs)):
            raise refuse(r, "compression made a different node at another size")
        attrs = {k: _merge_attr(r.attrs[k], b.attrs[k], t.attrs[k]) for k in r.attrs}
        if any(v is _MOVED for v in attrs.values()):
            raise refuse(r, "an attribute moves with the sizes and was changed by compression")
        node = r.with_(attrs=attrs)
        for out, ty in zip(node.outputs, infer_types(node.op, [types[i] for i in node.inputs],
                                                     dict(node.attrs), node=node.name)):
            types[out] = ty
        nodes.append(node)
    graph = Graph(real.name, twin.inputs, real.outputs, nodes, types, constants)
    for attr in ("frontend",):
        if hasattr(real, attr):
            setattr(graph, attr, getattr(real, attr))
    verify(graph)
    return graph


_MOVED = object()


def _merge_attr(real: Any, base: Any, twin: Any) -> Any:
    """An attribute at the twin's sizes: the real value where base and twin agree, the twin's
    where they differ (entry by entry for tuples of one length); _MOVED where a moving value
    was also changed by compression."""
    if base == twin:
        return real
    if isinstance(base, tuple) and isinstance(twin, tuple) and isinstance(real, tuple) \
            and len(base) == len(twin) == len(real):
        merged = tuple(_merge_attr(r, b, t) for r, b, t in zip(real, base, twin))
        return _MOVED if any(m is _MOVED for m in merged) else merged
    return twin if real == base else _MOVED


class DynamicCompressed:
    """``kiln.compress(..., dynamic=...)``: a compression made once at the example sizes
    (``graph``, ``report``, ``layers`` and ``table()`` are that one's) that gives its graph at
    any sizes (``graph_at``) and compiles to a DynamicModel (``compile``), one program per
    size, all with the same kept channels, ranges and weights."""

    def __init__(self, sized: SizedCompression, example_inputs: Sequence[torch.Tensor],
                 dims: dict[int, dict[int, str]], names: Sequence[str],
                 bounds: Mapping[str, tuple[int, int]],
                 finish: Callable[[Any, Any, int], Any]) -> None:
        self.sized = sized
        self.dims, self.bounds = dims, bounds
        self._example_inputs, self._names = tuple(example_inputs), list(names)
        self._finish = finish

    def __getattr__(self, name: str) -> Any:
        # graph, source_graph, out_spec, report, layers, table: the example-size compression's
        if name.startswith("_") or name in ("sized", "dims", "bounds"):
            raise AttributeError(name)
        return getattr(self.sized.compressed, name)

    def compile(self, threads: int = 0) -> DynamicModel:
        """A DynamicModel running the compressed model at every size (see SizedCompression);
        ``threads`` as in kiln.compile."""
        def compile_at(xs: tuple[torch.Tensor, ...]) -> Any:
            graph, source = self.sized.graph_at(xs)
            return self._finish(graph, source, threads)

        model = DynamicModel(compile_at, self._example_inputs, self.dims, self._names,
                             self.bounds, graph_at=lambda xs: self.sized.graph_at(xs)[0])
        model.compression = self.sized.compressed
        return model

    def graph_at(self, sizes: Mapping[str, int]) -> Any:
        """The compressed kiln Graph at ``sizes`` ({size name: size})."""
        return self.sized.graph_at(resize_inputs(self._example_inputs, self.dims, sizes))[0]
