"""``torch.compile(model, backend="kiln")``: kiln as a Dynamo backend.

Registered through PyTorch's ``torch_dynamo_backends`` entry point (see pyproject.toml).
Dynamo passes module weights as graph arguments; kiln binds them as constants (so passes such
as batchnorm folding see them) and checks on every call that they are the same, unmodified
tensors, recompiling when a weight was replaced or changed in place.

Dynamic shapes: when a second call brings another batch size (or sequence length), Dynamo
marks the dimension dynamic and hands over a graph whose sizes are symbols (``SymInt``
placeholders). Where every symbol is a plain size that an input dimension holds, the graph
runs as a ``kiln.dynamic.DynamicModel`` over its tensor inputs: programs per size from one
symbolic graph, and a batch size without a program run at once on row slices of power-of-two
programs when the rows never meet (a size called often gets its own program in the
background). Otherwise kiln compiles the graph per concrete size on the call that first brings
it (the sizes bound as constants; the compile cache makes a size seen before cheap) and keeps
the ``MAX_SPECIALIZATIONS`` most recently used programs. Every call gives eager's answer.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from kiln.api import CompiledModel, optimize, unsupported_dtype
from kiln.backends import backend_names
from kiln.frontend.importer import TORCH_TO_DTYPE
from kiln.frontend.trace import import_graph_module
from kiln.ir import KilnError
from kiln.runtime import Executable

OPTIONS = ("backend", "pipeline", "threads")
"""The keys of ``torch.compile(..., backend="kiln", options={...})``."""

MAX_SPECIALIZATIONS = 16
"""Programs a graph with symbolic sizes keeps, one per set of concrete sizes."""

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _is_weight(node: torch.fx.Node, value: Any) -> bool:
    return isinstance(value, torch.nn.Parameter) or "_parameters_" in node.name or (
        "_buffers_" in node.name)


class _DynamoGraph:
    """One Dynamo graph compiled by kiln; callable with Dynamo's flat argument list."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 options: dict[str, Any]) -> None:
        self.gm = gm
        self.options = options
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.static = frozenset(i for i, (n, v) in enumerate(zip(placeholders, example_inputs))
                                if _is_weight(n, v))
        # Size symbols, and module attributes Dynamo passes as 0-d tensors only to read them
        # with .item() (nn.Embedding's norm_type under dynamic=True): bound per call to the
        # values the call brings.
        # (A region of a partitioned graph gets concrete values; its placeholders' metadata
        # still says which were symbols.)
        self.symbols = tuple(i for i, (n, v) in enumerate(zip(placeholders, example_inputs))
                             if isinstance(v, _SYMBOLIC) or _is_read_scalar(n, v)
                             or isinstance(n.meta.get("example_value"), _SYMBOLIC))
        for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
            if (i not in self.static and i not in self.symbols
                    and isinstance(value, torch.Tensor) and value.dtype not in TORCH_TO_DTYPE):
                raise unsupported_dtype(f"input {node.name}", value.dtype)
        self.programs: OrderedDict[tuple, CompiledModel] = OrderedDict()
        self.weights: dict[int, tuple[Any, int]] = {}
        # Where every symbol is a plain size held by some input dimension, the graph runs as
        # a kiln.dynamic.DynamicModel over the tensor inputs (made on the first call): one
        # graph for every size, a batch size without a program run on row slices of
        # power-of-two programs instead of a compile per size.
        self._plan = _size_plan(placeholders, example_inputs, self.static, self.symbols)
        self._dynamic: Any = None
        if not self.symbols and not any(
                isinstance(v, torch.Tensor) and _has_symbolic_shape(v) for v in example_inputs):
            self._build(example_inputs)
            self.programs[self._key(example_inputs)] = self.compiled

    def _key(self, args: Sequence[Any]) -> tuple:
        """What a program is specialized to: the symbols' values and the inputs' shapes."""
        return tuple(_value(args[i]) if i in self.symbols else
                     (tuple(args[i].shape) if isinstance(args[i], torch.Tensor) else None)
                     for i in range(len(args)) if i not in self.static)

    def _build(self, inputs: Sequence[Any]) -> None:
        self.weights = {i: (inputs[i], inputs[i]._version) for i in self.static}
        gm, inputs, static = self.gm, list(inputs), self.static
        if self.symbols:
            gm, inputs, static = _bind_symbols(self.gm, inputs, self.symbols, self.static)
        graph, spec = import_graph_module(gm, inputs, "dynamo_graph", static)
        optimized, timing = optimize(graph, self.options.get("pipeline", "O1"))
        exe = Executable(optimized, self.options.get("backend", "llvm"),
                         self.options.get("threads", 0))
        self.compiled = CompiledModel(optimized, exe, spec, graph, timing)

    def _full_args(self, tensors: Sequence[torch.Tensor], like: Sequence[Any]) -> list[Any]:
        """Dynamo's argument list for these tensor inputs: the weights of ``like``, and each
        size symbol read off the tensor dimension that holds it."""
        dims, names = self._plan
        where = {n: (p, d) for p, ds in dims.items() for d, n in ds.items()}
        full, it = list(like), iter(tensors)
        for i in range(len(full)):
            if i in self.symbols:
                p, d = where[names[i]]
                full[i] = int(tensors[p].shape[d])
            elif i not in self.static:
                full[i] = next(it)
        return full

    def _make_dynamic(self, args: Sequence[Any]) -> Any:
        from kiln.dynamic import DynamicModel

        dims, _ = self._plan
        tensors = [a for i, a in enumerate(args) if i not in self.static and i not in
                   self.symbols]
        like = list(args)

        def compile_at(xs: Sequence[torch.Tensor]) -> CompiledModel:
            self._build(self._full_args(xs, like))
            return self.compiled

        def graph_at(xs: Sequence[torch.Tensor]) -> Any:
            gm, inputs, static = _bind_symbols(self.gm, self._full_args(xs, like),
                                               self.symbols, self.static)
            graph, _ = import_graph_module(gm, inputs, "dynamo_graph", static)
            return optimize(graph, self.options.get("pipeline", "O1"))[0]

        def compile_graph_at(graph: Any, xs: Sequence[torch.Tensor],
                             first: CompiledModel) -> CompiledModel:
            optimized, timing = optimize(graph, self.options.get("pipeline", "O1"))
            exe = Executable(optimized, self.options.get("backend", "llvm"),
                             self.options.get("threads", 0))
            return CompiledModel(optimized, exe, first._out_spec, graph, timing)

        names = [f"input{p}" for p in range(len(tensors))]
        return DynamicModel(compile_at, tensors, {p: dict(d) for p, d in dims.items()}, names,
                            graph_at=graph_at, compile_graph_at=compile_graph_at)

    def __call__(self, *args: Any) -> Any:
        if any(args[i] is not t or args[i]._version != v for i, (t, v) in self.weights.items()):
            self.programs.clear()  # every specialization holds the old weights
            self._dynamic = None
        if self._plan is not None:
            if self._dynamic is None:
                self._dynamic = self._make_dynamic(args)
            out = self._dynamic(*[a for i, a in enumerate(args)
                                  if i not in self.static and i not in self.symbols])
            return out if isinstance(out, (tuple, list)) else (out,)
        key = self._key(args)
        compiled = self.programs.get(key)
        if compiled is None:
            self._build(args)
            compiled = self.programs[key] = self.compiled
            while len(self.programs) > MAX_SPECIALIZATIONS:
                self.programs.popitem(last=False)
        else:
            self.programs.move_to_end(key)
        dynamic = [a for i, a in enumerate(args) if i not in self.static and i not in self.symbols]
        out = compiled(*dynamic)
        return out if isinstance(out, (tuple, list)) else (out,)


def _size_plan(placeholders: Sequence[torch.fx.Node], example_inputs: Sequence[Any],
               static: frozenset[int], symbols: Sequence[int]
               ) -> tuple[dict[int, dict[int, str]], dict[int, str]] | None:
    """({tensor input position: {dimension: size name}}, {symbol placeholder: size name}) when
    every symbolic dimension and every symbol argument is one plain size (``s0``) that some
    tensor input holds as a dimension; else None (the graph is compiled per size)."""
    dims: dict[int, dict[int, str]] = {}
    names: dict[int, str] = {}
    pos = 0
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if i in static:
            continue
        # Dynamo's example tensors are real; the placeholder's fake one has the symbols.
        meta = node.meta.get("example_value")
        if i in symbols:
            value = meta if isinstance(meta, torch.SymInt) else value
            expr = getattr(getattr(value, "node", None), "expr", None)
            if not isinstance(value, torch.SymInt) or not getattr(expr, "is_Symbol", False):
                return None           # a scalar read with .item(), or a formula of sizes
            names[i] = str(expr)
            continue
        if not isinstance(value, torch.Tensor):
            return None
        shape = meta.shape if isinstance(meta, torch.Tensor) else value.shape
        for d, size in enumerate(shape):
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                if not getattr(expr, "is_Symbol", False):
                    return None
                dims.setdefault(pos, {})[d] = str(expr)
        pos += 1
    held = {n for ds in dims.values() for n in ds.values()}
    if not dims or not set(names.values()) <= held:
        return None
    return dims, names


def _is_read_scalar(node: torch.fx.Node, value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() == 0 and bool(node.users)
            and all(u.op == "call_method" and u.target == "item" for u in node.users))


def _value(v: Any) -> Any:
    return v.item() if isinstance(v, torch.Tensor) else v


def _has_symbolic_shape(t: torch.Tensor) -> bool:
    return any(isinstance(d, torch.SymInt) for d in t.shape)


def _bind_symbols(gm: torch.fx.GraphModule, args: Sequence[Any], symbols: Sequence[int],
                  static: frozenset[int]) -> tuple[torch.fx.GraphModule, list[Any], frozenset]:
    """A copy of ``gm`` with the placeholders at ``symbols`` (sizes, and scalars read with
    .item()) replaced by their values in ``args``; the remaining arguments and the static
    (weight) indices among them."""
    graph = copy.deepcopy(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for i in symbols:
        node, value = placeholders[i], args[i]
        if isinstance(value, torch.Tensor):   # read only through .item(): bind the items
            value = value.item()
            for item in list(node.users):
                _replace_uses(item, value)
                graph.erase_node(item)
        if not isinstance(value, (int, float, bool)):
            raise KilnError(f"size {node.name} came as {type(value).__name__}, not a number",
                            node=node.name)
        _replace_uses(node, value)
        graph.erase_node(node)
    kept = [i for i in range(len(args)) if i not in symbols]
    remap = {old: new for new, old in enumerate(kept)}
    bound = torch.fx.GraphModule(gm, graph, gm.__class__.__name__)
    return bound, [args[i] for i in kept], frozenset(remap[i] for i in static)


def _replace_uses(node: torch.fx.Node, value: Any) -> None:
    """Every use of ``node`` becomes the constant ``value``."""
    for user in list(node.users):
        user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)


def kiln_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 options: dict[str, Any] | None = None, mode: str | None = None,
                 **direct: Any) -> Callable[..., Any]:
    """The Dynamo backend: ``torch.compile(model, backend="kiln", options={...})``.

    Options: ``backend`` (kiln backend name, default "llvm"), ``pipeline`` (default "O1"),
    ``threads`` (default 0: all cores). Called directly, the backend also takes them as
    keywords. torch.compile's ``mode`` does not change what kiln does.

    Raises:
        KilnError: for an unknown option or backend name, or an input of a dtype kiln does
            not compile (Dynamo reports it as a BackendCompilerFailed around the KilnError).
    """
    if options is not None and not isinstance(options, dict):
        raise KilnError(f"options= takes a dict, got {type(options).__name__}",
                        hint=f"for example options={{'backend': 'llvm'}}; keys: {OPTIONS}")
    merged = {**(options or {}), **direct}
    unknown = sorted(set(merged) - set(OPTIONS), key=str)
    if unknown:
        raise KilnError(f"unknown kiln option {unknown[0]!r}", hint=f"kiln's options: {OPTIONS}")
    backend = merged.get("backend", "llvm")
    if not isinstance(backend, str) or backend not in backend_names():
        raise KilnError(f"unknown backend {backend!r}", hint=f"choose one of {backend_names()}")
    if any(isinstance(v, _SYMBOLIC) or (isinstance(v, torch.Tensor) and _has_symbolic_shape(v))
           for v in example_inputs):
        return _FallbackOnFirstCall(gm, example_inputs, merged)
    try:
        return _DynamoGraph(gm, example_inputs, merged)
    except KilnError as e:
        if e.node is None:
            raise
        return _Partitioned(gm, example_inputs, merged, e)


MAX_FALLBACK_ROUNDS = 64
"""Partitioning rounds (each finds at least one more node kiln refuses) before the whole
graph runs in eager PyTorch."""


class _Supported(OperatorSupportBase):
    """The nodes kiln is asked to compile: every call, except those it refused."""

    def __init__(self, refused: dict[str, KilnError]) -> None:
        self.refused = refused

    def is_node_supported(self, submodules: Any, node: torch.fx.Node) -> bool:
        return (node.op in ("call_function", "call_method", "call_module")
                and node.name not in self.refused)


class _KilnRegion(torch.nn.Module):
    """A partition compiled by kiln, returning what the partition's graph returned."""

    def __init__(self, graph: _DynamoGraph, single: bool) -> None:
        super().__init__()
        self.graph = graph
        self.single = single

    def forward(self, *args: Any) -> Any:
        out = self.graph(*args)
        return out[0] if self.single else tuple(out)


def _partition_inputs(fused: torch.fx.GraphModule, args: Sequence[Any]) -> dict[str, list]:
    """The arguments each fused region receives when ``fused`` runs on ``args``."""
    seen: dict[str, list] = {}

    class Recorder(torch.fx.Interpreter):
        def call_module(self, target, args, kwargs):
            if target.startswith("fused_"):
                seen[target] = list(args)
            return super().call_module(target, args, kwargs)

    with torch.no_grad():
        Recorder(fused).run(*args)
    return seen


class _Partitioned:
    """A Dynamo graph with ops kiln refuses: the regions kiln compiles run as kiln programs,
    the refused nodes in eager PyTorch between them (as ONNX Runtime's torch.compile backend
    does). ``report`` lists what runs where and why; a warning says it once."""

    def __init__(self, gm: torch.fx.GraphModule, args: Sequence[Any], options: dict[str, Any],
                 first: KilnError) -> None:
        refused: dict[str, KilnError] = {first.node: first}
        regions: dict[str, _KilnRegion] = {}
        for _ in range(MAX_FALLBACK_ROUNDS):
            fused = CapabilityBasedPartitioner(
                copy.deepcopy(gm), _Supported(refused),
                allows_single_node_partition=True).partition_and_fuse()
            inputs = _partition_inputs(fused, args)
            regions, retry = {}, False
            for name, sub in fused.named_children():
                if not name.startswith("fused_") or name not in inputs:
                    continue
                try:
                    region = _DynamoGraph(sub, inputs[name], options)
                    region(*inputs[name])          # compiles now where sizes are symbolic
                except KilnError as e:
                    names = {n.name for n in sub.graph.nodes if n.op != "placeholder"}
                    culprits = [e.node] if e.node in names else sorted(names - set(refused))
                    if not culprits:
                        raise
                    refused.update({n: e for n in culprits})
                    retry = True
                    break
                output = next(n for n in sub.graph.nodes if n.op == "output")
                regions[name] = _KilnRegion(region, not isinstance(output.args[0], tuple))
            if not retry:
                break
        else:
            fused, regions = gm, {}
            refused = {n.name: first for n in gm.graph.nodes
                       if n.op in ("call_function", "call_method", "call_module")}
        for name, region in regions.items():
            setattr(fused, name, region)
        self.fused = fused
        self.refused = refused
        self.kiln_regions = len(regions)
        self.report = self._report(gm)
        warnings.warn(self.report, stacklevel=2)

    def _report(self, gm: torch.fx.GraphModule) -> str:
        ops = sum(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes)
        reasons = "; ".join(f"{name}: {e.message}" for name, e in list(self.refused.items())[:8])
        more = f" (and {len(self.refused) - 8} more)" if len(self.refused) > 8 else ""
        return (f"kiln: {len(self.refused)} of {ops} ops run in eager PyTorch, the rest in "
                f"{self.kiln_regions} kiln region(s): {reasons}{more}")

    def __call__(self, *args: Any) -> Any:
        return self.fused(*args)


class _FallbackOnFirstCall:
    """A graph with symbolic sizes: kiln compiles it on its first call, when sizes are
    known; should kiln refuse an op then, the graph is partitioned on that call's values."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 options: dict[str, Any]) -> None:
        self.gm = gm
        self.options = options
        self.run: Callable[..., Any] = _DynamoGraph(gm, example_inputs, options)
        self.checked = False

    def __call__(self, *args: Any) -> Any:
        if self.checked:
            return self.run(*args)
        try:
            out = self.run(*args)
        except KilnError as e:
            if e.node is None:
                raise
            self.run = _Partitioned(self.gm, args, self.options, e)
            out = self.run(*args)
        self.checked = True
        return out
