"""Entry points of the PyTorch frontend: nn.Module or fx GraphModule -> kiln Graph."""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from kiln.frontend.handlers import HANDLERS, MODULE_HANDLERS, target_key
from kiln.frontend.importer import Importer
from kiln.ir import Graph, KilnError

FRONTENDS = ("fx", "export")


class _SourceTracer(torch.fx.Tracer):
    """symbolic_trace that records, for each node, the user's stack (for error messages that
    name the source line) with the standard library's traceback. torch.fx's own
    ``record_stack_traces`` goes through torch._dynamo, whose first import alone takes about a
    second: more than the rest of a cached compile."""

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if not node.stack_trace:
            frames = [f for f in traceback.extract_stack()[:-1]
                      if not f.filename.startswith(_SKIP_DIRS)]
            if frames:
                node.stack_trace = "".join(traceback.format_list(frames[-8:])).strip()
        return node


_SKIP_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


def import_graph_module(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                        name: str = "graph",
                        static_inputs: frozenset[int] = frozenset()) -> tuple[Graph, Any]:
    """Import an fx GraphModule (from symbolic_trace, torch.export or Dynamo).

    Returns the kiln Graph and the pytree spec that rebuilds the module's output structure.
    Inputs whose index is in ``static_inputs`` are bound as constants.
    """
    importer = Importer(gm, name, HANDLERS, MODULE_HANDLERS, target_key)
    return importer.run(example_inputs, static_inputs)


def trace_module(model: torch.nn.Module, example_inputs: Sequence[Any],
                 frontend: str = "fx") -> tuple[Graph, Any]:
    """Trace ``model`` with torch.fx.symbolic_trace (``fx``) or torch.export (``export``)."""
    if not isinstance(model, torch.nn.Module):
        raise KilnError(f"kiln compiles torch.nn.Module objects, got {type(model).__name__}")
    if model.training:
        raise KilnError(f"{type(model).__name__} is in training mode",
                        hint="call model.eval() before compiling for inference")
    name = type(model).__name__
    if frontend == "fx":
        tracer = _SourceTracer()
        try:
            graph = tracer.trace(model)
        except Exception as e:
            raise KilnError(f"torch.fx could not trace {name}: {type(e).__name__}: {e}",
                            hint="try frontend='export', or remove data-dependent control "
                                 "flow from forward()") from e
        gm = torch.fx.GraphModule(tracer.root, graph, name)
    elif frontend == "export":
        try:
            ep = torch.export.export(model, tuple(example_inputs))
        except Exception as e:
            raise KilnError(f"torch.export could not export {name}: {type(e).__name__}: {e}",
                            hint="try frontend='fx'") from e
        graph, _ = import_graph_module(ep.module(), example_inputs, name)
        # The unlifted module's output node holds a flat tuple; the user's structure is here.
        return graph, ep.call_spec.out_spec
    else:
        raise KilnError(f"unknown frontend {frontend!r}", hint=f"choose one of {FRONTENDS}")
    return import_graph_module(gm, example_inputs, name)
