"""torch.fx graphs -> kiln IR.

The importer runs the fx graph on the example inputs, node by node, and emits kiln nodes as it
goes. Every fx value is one of
- a ``Traced`` tensor: depends on a graph input; it has a kiln value name and its real value;
- a plain torch tensor: a weight, a buffer, or anything computed from those alone (it becomes a
  kiln constant when a traced op uses it);
- a Python value (sizes, dtypes, flags), known at compile time since shapes are static.
Ops whose operands are all untraced are simply evaluated by PyTorch, which folds buffer
arithmetic, ``torch.tril(torch.ones(...))`` and shape arithmetic away before kiln sees them.
A handler may return PyTorch's real result itself for a value that depends on the inputs'
shapes only (``x.new_zeros(...)``): it stays a plain tensor, and so does what is built from it
(Swin's shifted-window attention mask, filled in place slice by slice).
After each traced op the importer checks that kiln's type rule gives the shape and dtype that
PyTorch produced, so a mistranslated op fails at import, not later as a wrong number.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from torch.utils import _pytree as pytree

from kiln.ir import DType, Graph, GraphBuilder, KilnError, TensorType, UnsupportedOpError
from kiln.ir.graph import sanitize_name

TORCH_TO_DTYPE = {
    torch.float32: DType.f32,
    torch.float16: DType.f16,
    torch.int8: DType.i8,
    torch.uint8: DType.u8,
    torch.int32: DType.i32,
    torch.int64: DType.i64,
    torch.bool: DType.bool,
}


def kiln_dtype(dt: torch.dtype, what: str = "tensor") -> DType:
    """The kiln dtype for a torch dtype; a KilnError for one kiln does not compile."""
    try:
        return TORCH_TO_DTYPE[dt]
    except KeyError:
        raise KilnError(f"{what} has dtype {dt}, which kiln does not compile",
                        hint="use float32 (or float16 / integer types) in the model") from None


class NoneOutput:
    """A None among a model's outputs (MultiheadAttention's weights with need_weights=False):
    a pytree node without leaves, so the compiled model's outputs unflatten to None there."""


pytree.register_pytree_node(NoneOutput, lambda _: ([], None), lambda _, __: None,
                            serialized_type_name="kiln.frontend.importer.NoneOutput")


@dataclass
class Traced:
    """A tensor that depends on the graph inputs: its kiln value name and its real value."""

    value: str
    real: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.real.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.real.dtype

    @property
    def ndim(self) -> int:
        return self.real.ndim


def real_of(x: Any) -> Any:
    """The real value of an importer value (Traced unwrapped, containers mapped)."""
    return pytree.tree_map(lambda v: v.real if isinstance(v, Traced) else v, x)


def has_traced(x: Any) -> bool:
    return any(isinstance(v, Traced) for v in pytree.tree_leaves(x))


_TORCH_DIR = os.path.dirname(torch.__file__)
_FRONTEND_DIR = os.path.dirname(__file__)
# A frame of traceback.format_list; its code line is missing where Python has no source text
# (a model typed into `python -` or a REPL), and the next frame's "File" line is not code.
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)(?:\n(?![ \t]*File ")[ \t]*(.*))?')


def source_of(node: torch.fx.Node) -> str | None:
    """The user's source line an fx node came from: 'file.py:12 in forward: code'."""
    trace = node.stack_trace or node.meta.get("stack_trace")
    if not trace:
        return None
    frames = _FRAME.findall(trace)
    user = [f for f in frames if not f[0].startswith((_TORCH_DIR, _FRONTEND_DIR))]
    if not user:
        return None
    # Frames run oldest first: the last user frame is the innermost module's code.
    path, line, func, code = user[-1]
    where = f"{os.path.basename(path)}:{line} in {func}"
    return f"{where}: {code.strip()}" if code.strip() else where


Handler = Callable[..., Any]


class Importer:
    """Emits kiln IR while running an fx graph. Handlers call the ``emit`` helpers."""

    def __init__(self, gm: torch.fx.GraphModule, name: str,
                 handlers: dict[Any, Handler], module_handlers: dict[type, Handler],
                 target_key: Callable[[torch.fx.Node], Any]) -> None:
        self.gm = gm
        self.b = GraphBuilder(sanitize_name(name))
        self.handlers = handlers
        self.module_handlers = module_handlers
        self.target_key = target_key
        self._consts: dict[int, tuple[torch.Tensor, str]] = {}
        self._param_names = {id(p): n for n, p in gm.named_parameters(remove_duplicate=False)}
        self._param_names.update({id(b): n for n, b in gm.named_buffers(remove_duplicate=False)})
        self.node: torch.fx.Node | None = None

    # ---- helpers for handlers ----------------------------------------------------------------
    @property
    def source(self) -> str | None:
        return source_of(self.node) if self.node is not None else None

    def error(self, message: str, hint: str | None = None,
              cls: type[KilnError] = KilnError) -> KilnError:
        """A KilnError naming the current fx node and its source line."""
        n = self.node
        return cls(message, node=n.name if n else None, op=self.describe(n) if n else None,
                   source=self.source, hint=hint)

    def describe(self, n: torch.fx.Node) -> str:
        """A readable name for an fx node's target."""
        if n.op == "call_module":
            return type(self.gm.get_submodule(n.target)).__name__
        if n.op == "call_method":
            return f"Tensor.{n.target}"
        t = n.target
        if isinstance(t, torch._ops.OpOverload):
            return str(t)
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__name__", str(t))
        return f"{mod}.{name}" if mod and mod != "_operator" else name

    def const(self, tensor: torch.Tensor, hint: str = "const") -> str:
        """The kiln constant holding ``tensor`` (one constant per tensor object)."""
        key = id(tensor)
        if key in self._consts:
            return self._consts[key][1]
        hint = self._param_names.get(key, hint)
        t = tensor.detach()
        kiln_dtype(t.dtype, f"constant {hint}")
        name = self.b.constant(t.cpu().contiguous().numpy(), hint)
        # Keep the tensor alive so its id is not reused by another constant.
        self._consts[key] = (tensor, name)
        return name

    def scalar(self, value: Any, dtype: DType) -> str:
        """A 0-d constant of ``dtype``."""
        return self.b.constant(np.array(value, dtype=dtype.numpy), "scalar")

    def value(self, x: Any, dtype: DType | None = None) -> str:
        """A kiln value for a kiln value name, Traced or plain tensor, or Python number, cast to
        ``dtype`` when given."""
        if isinstance(x, str):  # already a kiln value
            v, dt = x, self.type_of(x).dtype
        elif isinstance(x, Traced):
            v, dt = x.value, kiln_dtype(x.dtype)
        elif isinstance(x, torch.Tensor):
            v, dt = self.const(x), kiln_dtype(x.dtype)
        elif isinstance(x, (bool, int, float)):
            if dtype is None:
                dtype = DType.bool if isinstance(x, bool) else (
                    DType.i64 if isinstance(x, int) else DType.f32)
            return self.scalar(x, dtype)
        else:
            raise self.error(f"expected a tensor operand, got {type(x).__name__}")
        if dtype is not None and dt != dtype:
            v = self.op("cast", [v], {"dtype": dtype.value})
        return v

    def op(self, op: str, inputs: Sequence[str], attrs: dict | None = None) -> str:
        """Emit one single-output kiln node tagged with the current source line."""
        return self.b.op(op, inputs, attrs, name=self.node.name if self.node else None,
                         source=self.source)

    def op_multi(self, op: str, inputs: Sequence[str], attrs: dict | None = None) -> list[str]:
        return self.b.op_multi(op, inputs, attrs, name=self.node.name if self.node else None,
                               source=self.source)

    def type_of(self, value: str) -> TensorType:
        return self.b.type_of(value)

    # ---- the walk ----------------------------------------------------------------------------
    def run(self, example_inputs: Sequence[Any],
            static_inputs: frozenset[int] = frozenset()) -> tuple[Graph, Any]:
        """Import the graph; returns the kiln Graph and the pytree spec of the outputs.

        Placeholders whose index is in ``static_inputs`` (weights that Dynamo passes as
        arguments) become constants instead of graph inputs.
        """
        env: dict[torch.fx.Node, Any] = {}
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        flat_inputs = list(example_inputs)
        if len(flat_inputs) != len(placeholders):
            raise KilnError(f"the model takes {len(placeholders)} inputs, "
                            f"{len(flat_inputs)} example inputs were given")
        out_spec = None
        with torch.no_grad():
            for n in self.gm.graph.nodes:
                self.node = n
                if n.op == "placeholder":
                    index = placeholders.index(n)
                    x = flat_inputs[index]
                    if index in static_inputs:
                        env[n] = x
                        continue
                    if not isinstance(x, torch.Tensor):
                        raise self.error(f"input {n.name} is a {type(x).__name__}; kiln "
                                         "compiles tensor inputs only",
                                         hint="bind non-tensor arguments before compiling")
                    t = TensorType(tuple(x.shape), kiln_dtype(x.dtype, f"input {n.name}"))
                    env[n] = Traced(self.b.input(n.name, t), x.detach())
                elif n.op == "get_attr":
                    env[n] = _fetch_attr(self.gm, n.target)
                elif n.op in ("call_function", "call_method", "call_module"):
                    if n.op == "call_module" and n.target == "_guards_fn":
                        continue  # torch.export's shape guards; shapes are static here
                    args = pytree.tree_map(lambda a: env[a] if isinstance(a, torch.fx.Node)
                                           else a, (n.args, n.kwargs))
                    env[n] = self._call(n, *args)
                elif n.op == "output":
                    values = pytree.tree_map(lambda a: env[a] if isinstance(a, torch.fx.Node)
                                             else a, n.args[0])
                    leaves, out_spec = pytree.tree_flatten(pytree.tree_map(
                        lambda a: NoneOutput() if a is None else a, values,
                        is_leaf=lambda a: a is None))
                    for leaf in leaves:
                        if isinstance(leaf, (Traced, torch.Tensor)):
                            self.b.output(self.value(leaf))
                        elif leaf is not None:
                            raise self.error(f"the model returns a {type(leaf).__name__}; kiln "
                                             "compiles models that return tensors")
        self.node = None
        return self.b.build(), out_spec

    def _call(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        real = self._run_real(n, real_of(args), real_of(kwargs))
        if not has_traced((args, kwargs)):
            return real  # depends on weights and constants only: PyTorch already folded it
        if n.op == "call_module":
            mod = self.gm.get_submodule(n.target)
            handler = None
            for cls in type(mod).__mro__:
                handler = self.module_handlers.get(cls)
                if handler:
                    break
            if handler is None:
                raise self.unsupported(n)
            result = handler(self, mod, real, *args, **kwargs)
        else:
            key = self.target_key(n)
            handler = self.handlers.get(key)
            if handler is None:
                raise self.unsupported(n)
            result = handler(self, real, *args, **kwargs)
        return self._wrap(result, real)

    def unsupported(self, n: torch.fx.Node) -> KilnError:
        what = self.describe(n)
        if n.op == "call_method" and n.target in _DATA_DEPENDENT:
            return self.error(f"{what} makes a Python value from tensor data; kiln compiles "
                              "graphs whose control flow does not depend on data",
                              hint="keep the computation in tensors", cls=UnsupportedOpError)
        return self.error(f"kiln does not support {what}",
                          hint="replace it with supported ops, or file an issue with this "
                               "message", cls=UnsupportedOpError)

    def _run_real(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        try:
            if n.op == "call_module":
                return self.gm.get_submodule(n.target)(*args, **kwargs)
            if n.op == "call_method":
                self_obj, *rest = args
                return getattr(self_obj, n.target)(*rest, **kwargs)
            return n.target(*args, **kwargs)
        except Exception as e:  # the model itself fails on the example inputs
            raise self.error(f"PyTorch raised {type(e).__name__} running this node on the "
                             f"example inputs: {e}",
                             hint="check the example inputs' shapes and dtypes") from e

    def _wrap(self, result: Any, real: Any) -> Any:
        """Pair the handler's kiln values with PyTorch's real results, checking their types."""
        if isinstance(real, torch.Tensor):
            if isinstance(result, Traced):
                return result
            if result is real:
                # The handler's word that the value depends on static facts only (shapes,
                # dtypes): a plain tensor, so that what is computed from it folds in PyTorch.
                return real
            if not isinstance(result, str):
                raise self.error(f"internal: handler returned {type(result).__name__}")
            self._check(result, real)
            return Traced(result, real)
        if isinstance(real, (tuple, list)) and isinstance(result, (tuple, list)):
            return type(real)(self._wrap(r, x) for r, x in zip(result, real, strict=True))
        return result

    def _check(self, value: str, real: torch.Tensor) -> None:
        got = self.type_of(value)
        want = TensorType(tuple(real.shape), kiln_dtype(real.dtype))
        if got != want:
            raise self.error(f"internal: kiln made {got} where PyTorch made {want}",
                             hint="this is a kiln bug; please report it with this message")


_DATA_DEPENDENT = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "nonzero"}


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
