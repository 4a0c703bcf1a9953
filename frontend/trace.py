"""Entry points of the PyTorch frontend: nn.Module or fx GraphModule -> kiln Graph."""

from __future__ import annotations

import inspect
import os
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from kiln.frontend import handlers_coverage
from kiln.frontend.handlers import HANDLERS, MODULE_HANDLERS, target_key
from kiln.frontend.importer import Importer, NoneOutput
from kiln.ir import Graph, KilnError, UnsupportedOpError

FRONTENDS = ("fx", "export")


class _SourceTracer(torch.fx.Tracer):
    """symbolic_trace that records, for each node, the user's stack (for error messages that
    name the source line) with the standard library's traceback. torch.fx's own
    ``record_stack_traces`` goes through torch._dynamo, whose first import alone takes about a
    second: more than the rest of a cached compile."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        # A subclass of nn.LSTM / nn.GRU / nn.RNN that keeps their forward() (one that only sets its
        # weights up its own way) is still the layer kiln's module table translates; fx would
        # trace into it, as into any module defined outside torch.nn, and stop at its checks.
        if type(m).forward in _RECURRENT_FORWARDS:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if not node.stack_trace:
            frames = [f for f in traceback.extract_stack()[:-1]
                      if not f.filename.startswith(_SKIP_DIRS)]
            if frames:
                node.stack_trace = "".join(traceback.format_list(frames[-8:])).strip()
        return node


_SKIP_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
_RECURRENT_FORWARDS = (torch.nn.LSTM.forward, torch.nn.GRU.forward, torch.nn.RNN.forward)


def _call_graph(model: torch.nn.Module, n_inputs: int, name: str) -> torch.fx.GraphModule:
    """A graph that calls ``model`` once: for a built-in module (nn.BatchNorm1d, nn.LSTM ...)
    that is the whole model, which kiln's module table translates; tracing its forward()
    instead would stop at its input checks (Python control flow on the traced tensor)."""
    root = torch.nn.Module()
    root.model = model
    graph = torch.fx.Graph()
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params[:n_inputs]]
    names += [f"input_{i}" for i in range(len(names), n_inputs)]
    args = tuple(graph.placeholder(n) for n in names)
    graph.output(graph.call_module("model", args))
    return torch.fx.GraphModule(root, graph, name)


class FrontendFallbackWarning(UserWarning):
    """The default frontend (fx) could not trace the model; torch.export compiled it."""


def _resolve_by_name(gm: torch.fx.GraphModule) -> None:
    """Add the handlers of functions from packages kiln does not import (torchvision's
    stochastic_depth) to the handler table, found by their qualified name."""
    for node in gm.graph.nodes:
        t = node.target
        if node.op != "call_function" or not callable(t) or t in HANDLERS:
            continue
        name = f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', '')}"
        handler = handlers_coverage.HANDLERS_BY_NAME.get(name)
        if handler is not None:
            HANDLERS[t] = handler


def _wrapped_function(gm: torch.fx.GraphModule, error: UnsupportedOpError) -> str | None:
    """The qualified name of the function the failing node calls, when torch.fx kept it whole.

    fx inlines every Python function it traces through, so a call_function node calling one
    from outside torch is a function the model ``torch.fx.wrap``'d (torchvision's Swin
    attention, ``shifted_window_attention``, does: its body branches on sizes). torch.export
    traces into it, so the model may still compile through export.
    """
    node = next((n for n in gm.graph.nodes if n.name == error.node), None)
    if (node is None or node.op != "call_function" or not inspect.isfunction(node.target)
            or node.target in HANDLERS):  # a handler's own refusal stands
        return None
    module = getattr(node.target, "__module__", "") or ""
    if module.split(".")[0] == "torch":
        return None
    return f"{module}.{node.target.__qualname__}"


def import_graph_module(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                        name: str = "graph",
                        static_inputs: frozenset[int] = frozenset()) -> tuple[Graph, Any]:
    """Import an fx GraphModule (from symbolic_trace, torch.export or Dynamo).

    Returns the kiln Graph and the pytree spec that rebuilds the module's output structure.
    Inputs whose index is in ``static_inputs`` are bound as constants.
    """
    _resolve_by_name(gm)
    # In-place ops (x.relu_()) run on the real tensors while importing: on copies, so that the
    # caller's inputs stay as given.
    inputs = [x.clone() if isinstance(x, torch.Tensor) and i not in static_inputs else x
              for i, x in enumerate(example_inputs)]
    importer = Importer(gm, name, HANDLERS, MODULE_HANDLERS, target_key)
    return importer.run(inputs, static_inputs)


def _trace_fx(model: torch.nn.Module, n_inputs: int, name: str) -> torch.fx.GraphModule:
    tracer = _SourceTracer()
    if tracer.is_leaf_module(model, ""):
        return _call_graph(model, n_inputs, name)
    defaults = _defaults_after(model, n_inputs)
    graph = tracer.trace(model, concrete_args=defaults or None)
    if defaults:
        # fx keeps a placeholder for each concrete argument, used only by a check that the
        # value given is the one traced: with the argument not given, both go.
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for node in placeholders[n_inputs:]:
            for user in list(node.users):
                if user.op == "call_function" and getattr(user.target, "__name__", "") \
                        == "_assert_is_none" and not user.users:
                    graph.erase_node(user)
            if not node.users:
                graph.erase_node(node)
    return torch.fx.GraphModule(tracer.root, graph, name)


def _defaults_after(model: torch.nn.Module, n_inputs: int) -> dict[str, Any]:
    """The forward() parameters past the ``n_inputs`` given, with their defaults, as fx's
    concrete arguments (``forward(x, mask=None)`` called with one input traces with
    ``mask=None``, as calling it would, instead of making ``mask`` a second input)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {p.name: p.default for p in positional[n_inputs:]
            if p.default is not inspect.Parameter.empty}


def _export(model: torch.nn.Module, example_inputs: Sequence[Any], name: str,
            fx_error: Exception | None = None) -> tuple[Graph, Any]:
    try:
        # An empty decomposition table only functionalizes: in-place ops (relu_, add_) become
        # their functional forms and views become copies; every other op stays as it was.
        ep = torch.export.export(model, tuple(example_inputs)).run_decompositions({})
    except Exception as e:
        if fx_error is not None:
            raise KilnError(f"neither torch.fx nor torch.export could trace {name}: "
                            f"torch.fx: {type(fx_error).__name__}: {fx_error}; torch.export: "
                            f"{type(e).__name__}: {e}",
                            hint="remove data-dependent control flow from forward()") from e
        raise KilnError(f"torch.export could not export {name}: {type(e).__name__}: {e}",
                        hint="try frontend='fx'") from e
    graph, flat_spec = import_graph_module(ep.module(), example_inputs, name)
    # The unlifted module's output node holds a flat tuple; the user's structure is here.
    return graph, _with_none_outputs(ep.call_spec.out_spec, flat_spec)


def _with_none_outputs(user_spec: Any, flat_spec: Any) -> Any:
    """The user's output structure with the None leaves of the flat output (``flat_spec``,
    where the importer marked them NoneOutput) made leafless, so that the compiled model's
    outputs unflatten to None there too."""
    if user_spec is None or flat_spec is None or flat_spec.num_leaves == user_spec.num_leaves:
        return user_spec
    flat = pytree.tree_unflatten(list(range(flat_spec.num_leaves)), flat_spec)
    if not isinstance(flat, (tuple, list)) or len(flat) != user_spec.num_leaves:
        return user_spec
    user = pytree.tree_unflatten(list(flat), user_spec)
    return pytree.tree_flatten(pytree.tree_map(lambda a: NoneOutput() if a is None else a, user,
                                               is_leaf=lambda a: a is None))[1]


def trace_module(model: torch.nn.Module, example_inputs: Sequence[Any],
                 frontend: str = "fx") -> tuple[Graph, Any]:
    """Trace ``model`` with torch.fx.symbolic_trace (``fx``) or torch.export (``export``).

    When fx cannot trace the model (data-dependent control flow, HuggingFace models' argument
    handling), or kept a ``torch.fx.wrap``'d function whole that kiln cannot import (Swin's
    window attention), ``fx`` falls back to torch.export and says so with a
    FrontendFallbackWarning.
    The graph's ``frontend`` attribute names the frontend that made it.
    """
    if not isinstance(model, torch.nn.Module):
        raise KilnError(f"kiln compiles torch.nn.Module objects, got {type(model).__name__}")
    if model.training:
        raise KilnError(f"{type(model).__name__} is in training mode",
                        hint="call model.eval() before compiling for inference")
    if frontend not in FRONTENDS:
        raise KilnError(f"unknown frontend {frontend!r}", hint=f"choose one of {FRONTENDS}")
    name = type(model).__name__
    if frontend == "export":
        result = _export(model, example_inputs, name)
    else:
        try:
            gm = _trace_fx(model, len(example_inputs), name)
        except Exception as e:
            warnings.warn(f"torch.fx could not trace {name} ({type(e).__name__}: {e}); "
                          "compiling it with frontend='export'", FrontendFallbackWarning,
                          stacklevel=3)
            frontend = "export"
            result = _export(model, example_inputs, name, fx_error=e)
        else:
            try:
                result = import_graph_module(gm, example_inputs, name)
            except UnsupportedOpError as e:
                wrapped = _wrapped_function(gm, e)
                if wrapped is None:
                    raise
                warnings.warn(f"torch.fx kept {wrapped} whole (a torch.fx.wrap'd function) and "
                              f"kiln has no handler for it; compiling {name} with "
                              "frontend='export', which traces into it",
                              FrontendFallbackWarning, stacklevel=3)
                frontend = "export"
                result = _export(model, example_inputs, name, fx_error=e)
    result[0].frontend = frontend
    return result
