"""``torch.compile(model, backend="kiln")``: kiln as a Dynamo backend.

Registered through PyTorch's ``torch_dynamo_backends`` entry point (see pyproject.toml).
Dynamo passes module weights as graph arguments; kiln binds them as constants (so passes such
as batchnorm folding see them) and checks on every call that they are the same, unmodified
tensors, recompiling when a weight was replaced or changed in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kiln.backends import backend_names
from kiln.frontend.api import CompiledModel, optimize, unsupported_dtype
from kiln.frontend.importer import TORCH_TO_DTYPE
from kiln.frontend.trace import import_graph_module
from kiln.ir import KilnError
from kiln.runtime import Executable

OPTIONS = ("backend", "pipeline", "threads")
"""The keys of ``torch.compile(..., backend="kiln", options={...})``."""


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
        for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
            if (i not in self.static and isinstance(value, torch.Tensor)
                    and value.dtype not in TORCH_TO_DTYPE):
                raise unsupported_dtype(f"input {node.name}", value.dtype)
        self._build(example_inputs)

    def _build(self, inputs: Sequence[Any]) -> None:
        graph, spec = import_graph_module(self.gm, inputs, "dynamo_graph", self.static)
        optimized, timing = optimize(graph, self.options.get("pipeline", "O1"))
        exe = Executable(optimized, self.options.get("backend", "llvm"),
                         self.options.get("threads", 0))
        self.compiled = CompiledModel(optimized, exe, spec, graph, timing)
        self.weights = {i: (inputs[i], inputs[i]._version) for i in self.static}

    def __call__(self, *args: Any) -> Any:
        if any(args[i] is not t or args[i]._version != v for i, (t, v) in self.weights.items()):
            self._build(args)
        dynamic = [a for i, a in enumerate(args) if i not in self.static]
        out = self.compiled(*dynamic)
        return out if isinstance(out, (tuple, list)) else (out,)


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
    return _DynamoGraph(gm, example_inputs, merged)
