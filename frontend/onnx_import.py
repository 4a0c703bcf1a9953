"""ONNX model -> kiln IR: ``import_onnx(path)`` reads an ONNX file into a kiln Graph.

The importer is the reverse of ``to_onnx``: ``ONNX_IMPORT`` maps each ONNX op type to a
function ``fn(ctx, node)`` that emits the kiln nodes computing that ONNX node and returns one
kiln value per ONNX output it computes. ``ctx`` (an ``ImportContext``) gives the node's
attributes with defaults, its operands as kiln values, the NumPy value of operands that must be
constant (Reshape's shape, Slice's starts, Pad's pads ...) and a GraphBuilder to emit kiln ops.

Shapes are static, as everywhere in kiln. So everything ONNX computes from shapes alone
(``Shape``, ``Constant``, ``ConstantOfShape`` and the arithmetic an exporter builds on them) is
folded while importing: a node whose operands are all constants is imported as usual, then
its kiln nodes are run by the NumPy reference and replaced by their results. That is why
Reshape, Expand and friends can insist on constant operands.

After each node the importer checks the kiln types it made against the types ONNX shape
inference gives, so a mistranslated node fails at import, naming the node, not later as a wrong
number. Every kiln value keeps its ONNX name (sanitized for the text form; the last kiln node of
an ONNX node gets the ONNX output's name, its helpers ``<name>.<op>``), and every kiln node's
``source`` is ``onnx:<node name>``.

Covered: the ONNX files ``torch.onnx.export`` writes for the kiln zoo (opset 17, the
TorchScript exporter) and everything kiln's own ``graph_to_onnx`` writes (opsets 17..21,
QuantizeLinear / DequantizeLinear included). Opsets before 13 are read too where an op's
operands moved from attributes to inputs (axes, splits, pads, clip bounds, slice bounds); the
default-domain opset must lie in ``MIN_OPSET..MAX_OPSET`` and every node be of that domain.

An ONNX file is data from anywhere, and a few hundred bytes of it can describe a tensor of
any size. So nothing the importer allocates is sized by the file alone: a value whose static
shape needs more than ``tensor_byte_limit()`` (the machine's memory, the process's limits,
``MAX_TENSOR_BYTES``) is refused, naming its node, before any array is made; a folded result
larger than ``FOLD_LIMIT_BYTES`` (or costing more than ``FOLD_LIMIT_FLOPS``) is left to run
time as a kiln op, or refused where kiln has no such op; and tensor data must match its
declared shape, in the file and in external data files alike.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.ir import (
    DType,
    Graph,
    GraphBuilder,
    KilnError,
    Node,
    ShapeError,
    TensorType,
    UnsupportedOpError,
    get_op,
    infer_types,
    run_reference,
)
from kiln.ir.graph import sanitize_name

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as exc:  # keep the message kiln gives for every missing optional piece
    raise KilnError("ONNX import needs the onnx package", hint="pip install onnx") from exc

__all__ = ["FOLD_LIMIT_BYTES", "FOLD_LIMIT_FLOPS", "HANDLED_OPSET", "MAX_OPSET", "MAX_RANK",
           "MAX_TENSOR_BYTES", "MIN_OPSET", "ONNX_IMPORT", "ImportContext", "import_onnx",
           "tensor_byte_limit"]

MIN_OPSET = 7
"""Oldest default-domain opset kiln reads. From opset 7 on, elementwise ops broadcast as NumPy
does; before it they carried ``broadcast`` / ``axis`` attributes with other rules, which the
importer does not read (it would compute something else, silently)."""

MAX_OPSET = onnx.defs.onnx_opset_version()
"""Newest default-domain opset kiln reads: the newest the installed onnx package knows, whose
checker and shape inference vet every model before kiln reads it."""

HANDLED_OPSET = 21
"""The opset the handlers were written against. In a newer model, a node of an op whose
definition changed since (new attributes, inputs or defaults, not just new element types) is
read only if it uses nothing the opset-21 definition lacks; otherwise it is refused, never
read with the older meaning (``_check_newer_definitions``)."""

FOLD_LIMIT_BYTES = 64 << 20
"""Largest result (64 MiB) the importer computes while importing. ONNX computes shapes and
masks with ops (``ConstantOfShape``, ``Expand``, ``Range`` ...) that kiln folds into constants,
and a few bytes of file can ask for any size: a larger result stays a kiln op computed at run
time, or is refused where kiln has no such op. 64 MiB holds every shape computation and causal
mask up to 8192 x 8192 that real exporters write, and takes well under a second to compute."""

FOLD_LIMIT_FLOPS = 1 << 24
"""Most work (the op's FLOP count) one kiln node may cost to be folded while importing: a
small result can still be expensive (a convolution of two constants), and the importer should
never be the slow part of a compile."""

MAX_TENSOR_BYTES = 1 << 40
"""Largest tensor (1 TiB) an imported model may have, wherever the machine is bigger: one
tensor beyond it is a corrupt or hostile file, not a model. ``tensor_byte_limit`` lowers it to
what this machine and process can hold."""

MAX_RANK = 64
"""Most dimensions a tensor may have: NumPy's own limit, so the reference could not run more."""

# ONNX element types kiln has a dtype for. DOUBLE is read as f32 (kiln computes in single
# precision, as the PyTorch importer does with float64 buffers) for constants and casts only.
_ELEM_TO_DTYPE = {
    TensorProto.FLOAT: DType.f32,
    TensorProto.FLOAT16: DType.f16,
    TensorProto.INT8: DType.i8,
    TensorProto.UINT8: DType.u8,
    TensorProto.INT32: DType.i32,
    TensorProto.INT64: DType.i64,
    TensorProto.BOOL: DType.bool,
}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_REEXPORT_HINT = ("re-export the model without this op (another torch.onnx.export opset, or a "
                  "rewrite in the model), or add an entry to "
                  "kiln.frontend.onnx_import.ONNX_IMPORT")
_STATIC_HINT = ("kiln compiles static shapes: export with constant folding (torch.onnx.export "
                "does it by default) and fix dynamic input dims with import_onnx(..., "
                "input_shapes={name: shape})")


_SIZE_HINT = ("a size like this means a corrupt or hostile file, or a wrong input_shapes=; "
              "check the model's shapes, or import it on a machine with more memory")
_CORRUPT_HINT = "the file is damaged or was written wrongly: re-export the model"
_MAX_SLICES = 256  # most slice nodes one Gather or negative-step Slice becomes


def tensor_byte_limit() -> tuple[int, str]:
    """The most bytes one tensor of an imported model may take here, and what sets it.

    The smallest of ``MAX_TENSOR_BYTES``, the machine's physical memory and the process's
    address-space and data limits (``RLIMIT_AS``, ``RLIMIT_DATA``): a tensor larger than that
    can never be allocated, so the importer refuses it before trying.
    """
    limits = [(MAX_TENSOR_BYTES, "kiln's limit per tensor (MAX_TENSOR_BYTES)")]
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # a platform without sysconf
        memory = -1
    if memory > 0:
        limits.append((memory, "this machine's memory"))
    try:
        import resource
    except ImportError:  # Windows
        resource = None
    if resource is not None:
        for name, what in (("RLIMIT_AS", "this process's address-space limit (RLIMIT_AS)"),
                           ("RLIMIT_DATA", "this process's data limit (RLIMIT_DATA)")):
            which = getattr(resource, name, None)
            soft = resource.getrlimit(which)[0] if which is not None else -1
            if soft != resource.RLIM_INFINITY and soft > 0:
                limits.append((soft, what))
    return min(limits)


def _format_bytes(n: int) -> str:
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20),
                        ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def _size_problem(shape: Sequence[int], itemsize: int, limit: tuple[int, str]) -> str | None:
    """Why a tensor of ``shape`` cannot be held (None when it can); Python ints, no overflow."""
    if any(d < 0 for d in shape):
        return "has a negative dimension"
    if len(shape) > MAX_RANK:
        return f"has {len(shape)} dimensions, more than the {MAX_RANK} kiln handles"
    nbytes = math.prod(shape) * itemsize
    if nbytes > limit[0]:
        return (f"would take {_format_bytes(nbytes)}, more than {limit[1]} "
                f"({_format_bytes(limit[0])})")
    return None


def _elem_itemsize(elem_type: int) -> int:
    """Bytes per element of an ONNX element type (1 for types NumPy has no layout for)."""
    try:
        return helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, ValueError, TypeError):
        return 1


def _node_name(node: onnx.NodeProto) -> str:
    """An ONNX node's name (its op type and first output when it has none)."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def _elem_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() \
        else str(elem_type)


def kiln_array(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` in a dtype kiln has (float64 becomes float32); a KilnError for others."""
    array = np.asarray(array)
    if array.dtype == np.float64:
        return array.astype(np.float32)
    try:
        DType.from_numpy(array.dtype)
    except ShapeError:
        raise KilnError(f"{what} has dtype {array.dtype}, which kiln does not compile",
                        hint="convert it to float32, float16, int8/uint8, int32/int64 or "
                             "bool before exporting") from None
    return array


def _dtype_of_elem(elem_type: int, what: str, *, allow_double: bool = False) -> DType:
    if allow_double and elem_type == TensorProto.DOUBLE:
        return DType.f32
    try:
        return _ELEM_TO_DTYPE[elem_type]
    except KeyError:
        raise KilnError(f"{what} has ONNX type {_elem_name(elem_type)}, which kiln does not "
                        "compile", hint="use float32, float16, int8/uint8, int32/int64 or bool"
                        ) from None


def _tensor_nbytes(t: onnx.TensorProto, what: str, limit: tuple[int, str]) -> int:
    """The bytes a TensorProto's declared type and dims take; a KilnError for a type kiln
    does not compile or dims no array can have."""
    _dtype_of_elem(t.data_type, what, allow_double=True)
    itemsize = _elem_itemsize(t.data_type)
    dims = [int(d) for d in t.dims]
    problem = _size_problem(dims, itemsize, limit)
    if problem is not None:
        raise KilnError(f"{what} is {_elem_name(t.data_type)}{dims}, which {problem}",
                        hint=_SIZE_HINT)
    return math.prod(dims) * itemsize


def _tensor_array(t: onnx.TensorProto, what: str, limit: tuple[int, str]) -> np.ndarray:
    """A TensorProto's value, its dims and data checked against each other first."""
    nbytes = _tensor_nbytes(t, what, limit)
    if t.HasField("raw_data") and len(t.raw_data) != nbytes:
        raise KilnError(f"{what} holds {len(t.raw_data)} bytes of data where its type "
                        f"{_elem_name(t.data_type)}{list(t.dims)} needs {nbytes}",
                        hint=_CORRUPT_HINT)
    try:
        return numpy_helper.to_array(t)
    except Exception as e:  # a data field of the wrong length, segments ...
        raise KilnError(f"cannot read {what}: {type(e).__name__}: {e}", hint=_CORRUPT_HINT
                        ) from e


# ---- the context handlers see ----------------------------------------------------------------
class ImportContext:
    """What an ``ONNX_IMPORT`` function sees of the import of one ONNX node.

    ``node`` is the ONNX NodeProto, ``opset`` the model's default-domain opset and ``b`` the
    GraphBuilder of the kiln graph (``ctx.op`` wraps it so nodes are named and sourced).
    ``limit`` is ``tensor_byte_limit()``: (bytes, what sets them). ``deferred`` holds the kiln
    values whose operands are all constant but that were too large to fold (see ``_fold``).
    """

    def __init__(self, b: GraphBuilder, opset: int,
                 limit: tuple[int, str] | None = None) -> None:
        self.b = b
        self.opset = opset
        self.limit = limit or tensor_byte_limit()
        self.node: onnx.NodeProto = onnx.NodeProto()
        self.values: dict[str, str] = {}
        self.deferred: set[str] = set()
        self._attrs: dict[str, onnx.AttributeProto] = {}

    # ---- where we are ------------------------------------------------------------------------
    def begin(self, node: onnx.NodeProto) -> None:
        """Start importing ``node``."""
        self.node = node
        self._attrs = {a.name: a for a in node.attribute}

    @property
    def name(self) -> str:
        """The ONNX node's name (its op type and first output when it has none)."""
        return _node_name(self.node)

    @property
    def source(self) -> str:
        """The ``source`` of this node's kiln nodes: ``onnx:<node name>``."""
        return f"onnx:{self.name}"

    @property
    def base(self) -> str:
        """The value-name stem of this node's kiln values: its first ONNX output's name."""
        return sanitize_name(self.node.output[0] if self.node.output else self.name)

    def error(self, message: str, hint: str | None = None,
              cls: type[KilnError] = KilnError) -> KilnError:
        """A KilnError naming the ONNX node and op."""
        return cls(message, node=self.name, op=self.node.op_type, source=self.source,
                   hint=hint)

    def unsupported(self, message: str, hint: str | None = None) -> KilnError:
        """An UnsupportedOpError naming the ONNX node and op."""
        return self.error(message, hint or _REEXPORT_HINT, UnsupportedOpError)

    # ---- attributes --------------------------------------------------------------------------
    def has_attr(self, name: str) -> bool:
        """Whether the node sets attribute ``name``."""
        return name in self._attrs

    def attr(self, name: str, default: Any = None) -> Any:
        """Attribute ``name`` as a Python value (strings decoded, tensors as NumPy arrays,
        repeated fields as lists), or ``default`` when the node does not set it."""
        a = self._attrs.get(name)
        if a is None:
            return default
        if a.type == onnx.AttributeProto.TENSOR:
            return _tensor_array(a.t, f"attribute {name!r}", self.limit)
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, list):
            return [v.decode() if isinstance(v, bytes) else v for v in value]
        return value

    # ---- operands ----------------------------------------------------------------------------
    def has_input(self, i: int) -> bool:
        """Whether operand ``i`` is given (optional operands may be missing or empty)."""
        return i < len(self.node.input) and self.node.input[i] != ""

    def input(self, i: int) -> str:
        """The kiln value of operand ``i``."""
        if not self.has_input(i):
            raise self.error(f"{self.node.op_type} needs operand {i}, which is missing")
        return self.values[self.node.input[i]]

    def optional(self, i: int) -> str | None:
        """The kiln value of operand ``i``, or None when it is not given."""
        return self.input(i) if self.has_input(i) else None

    def inputs(self) -> list[str]:
        """The kiln values of all given operands, in order."""
        return [self.values[n] for n in self.node.input if n]

    def type_of(self, value: str) -> TensorType:
        """The kiln type of a kiln value."""
        return self.b.type_of(value)

    def in_type(self, i: int) -> TensorType:
        """The kiln type of operand ``i``."""
        return self.type_of(self.input(i))

    def const_value(self, value: str | None) -> np.ndarray | None:
        """The array of a kiln constant, or None for a computed value."""
        if value is None:
            return None
        return self.b.graph.constants.get(value)

    def runtime_reason(self, value: str) -> str:
        """Why the kiln value ``value`` is computed at run time, not known while importing."""
        if value in self.deferred:
            return ("it is (computed from) a tensor larger than the "
                    f"{_format_bytes(FOLD_LIMIT_BYTES)} the importer computes itself "
                    "(FOLD_LIMIT_BYTES), left to run time")
        return "it is computed from the graph inputs"

    def const_input(self, i: int, what: str) -> np.ndarray:
        """Operand ``i`` as a NumPy array; a KilnError when it is computed at run time."""
        value = self.input(i)
        array = self.const_value(value)
        if array is None:
            raise self.error(f"{self.node.op_type}'s {what} (operand {i}, "
                             f"{self.node.input[i]!r}) must be a constant, but "
                             f"{self.runtime_reason(value)}", _STATIC_HINT)
        return array

    def int_input(self, i: int, what: str, most: int | None = None) -> list[int]:
        """Constant operand ``i`` as a list of at most ``most`` ints. By default ``most``
        allows two entries per axis (pads) or one per node output (Split's sizes): an int
        operand is never longer, and a longer one would only cost time to read."""
        array = self.const_input(i, what)
        most = max(2 * MAX_RANK, len(self.node.output)) if most is None else most
        if array.size > most:
            raise self.error(f"{self.node.op_type}'s {what} has {array.size} entries; kiln "
                             f"reads at most {most}", hint=_CORRUPT_HINT)
        return [int(v) for v in array.reshape(-1)]

    def shape_input(self, i: int, what: str = "shape") -> list[int]:
        """Constant operand ``i`` read as a shape: at most ``MAX_RANK`` ints."""
        return self.int_input(i, what, MAX_RANK)

    def all_constant(self) -> bool:
        """Whether every given operand is a constant."""
        return all(self.const_value(v) is not None for v in self.inputs())

    def ints(self, name: str, index: int | None = None) -> list[int] | None:
        """An int list given as attribute ``name`` (older opsets) or as constant operand
        ``index`` (newer ones); None when neither is given."""
        if self.has_attr(name):
            return [int(v) for v in self.attr(name)]
        if index is not None and self.has_input(index):
            return self.int_input(index, name)
        return None

    # ---- emitting ----------------------------------------------------------------------------
    def op(self, op: str, inputs: Sequence[str], attrs: dict | None = None) -> str:
        """Emit one single-output kiln node; returns its value."""
        return self.b.op(op, inputs, attrs, name=f"{self.base}.{op}", source=self.source)

    def op_multi(self, op: str, inputs: Sequence[str], attrs: dict | None = None) -> list[str]:
        """Emit one kiln node with several outputs; returns them."""
        return self.b.op_multi(op, inputs, attrs, name=f"{self.base}.{op}", source=self.source)

    def constant(self, array: np.ndarray, hint: str | None = None) -> str:
        """A new kiln constant (float64 stored as float32)."""
        name = self.base if hint is None else f"{self.base}.{hint}"
        return self.b.constant(kiln_array(array, f"constant {name}"), name)

    def scalar(self, value: Any, dtype: DType, hint: str = "scalar") -> str:
        """A rank-0 kiln constant of ``dtype``."""
        return self.constant(np.asarray(value).astype(dtype.numpy), hint)

    def full(self, shape: Sequence[int], value: Any, dtype: np.dtype, hint: str | None = None
             ) -> str:
        """A tensor of ``shape`` filled with ``value``: a constant up to ``FOLD_LIMIT_BYTES``,
        a scalar expanded at run time beyond (a shape from the file may ask for any size)."""
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise self.error(f"{self.node.op_type} asks for shape {list(shape)}, which has a "
                             "negative size", hint=_CORRUPT_HINT)
        if math.prod(shape) * np.dtype(dtype).itemsize <= FOLD_LIMIT_BYTES:
            return self.constant(np.full(shape, value, dtype), hint)
        scalar = self.constant(np.array(value, dtype), "value")
        return self.op("expand", [scalar], {"shape": shape})

    def reshape(self, x: str, shape: Sequence[int]) -> str:
        """``x`` reshaped (no node when the shape is already right)."""
        shape = tuple(int(d) for d in shape)
        if self.type_of(x).shape == shape:
            return x
        return self.op("reshape", [x], {"shape": shape})


ImportFn = Callable[[ImportContext, onnx.NodeProto], list[str]]


def _axis(ctx: ImportContext, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ctx.error(f"axis {axis} is out of range for rank {rank}")
    return axis % max(rank, 1)


# ---- elementwise -----------------------------------------------------------------------------
def _unary(kiln_op: str) -> ImportFn:
    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        return [ctx.op(kiln_op, [ctx.input(0)])]

    return imp


def _binary(kiln_op: str) -> ImportFn:
    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        return [ctx.op(kiln_op, [ctx.input(0), ctx.input(1)])]

    return imp


def _div(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    a, b = ctx.input(0), ctx.input(1)
    if ctx.type_of(a).dtype.is_float:
        return [ctx.op("div", [a, b])]
    # Integer division (shape arithmetic) truncates toward zero in ONNX; kiln's div is float.
    dtype = ctx.type_of(a).dtype
    if not ctx.all_constant() and dtype in (DType.i8, DType.u8):
        # 8-bit operands are exact in f32, and so is the quotient's integer part: an exact
        # quotient is exact in f32, and any other is at least 1/255 from an integer, far
        # more than f32's rounding. The cast back truncates toward zero, as ONNX does.
        q = ctx.op("div", [ctx.op("cast", [v], {"dtype": "f32"}) for v in (a, b)])
        return [ctx.op("cast", [q], {"dtype": dtype.value})]
    if not ctx.all_constant():
        computed = a if ctx.const_value(a) is None else b
        raise ctx.unsupported(f"integer Div of computed values: {ctx.runtime_reason(computed)}",
                              hint="cast the operands to float before dividing, or keep the "
                                   "division on constants")
    x, y = ctx.const_value(a), ctx.const_value(b)
    _check_foldable(ctx, "integer Div", _broadcast(ctx, x, y), x.dtype)
    if np.any(y == 0):
        raise ctx.error("integer division by zero")
    q = np.abs(x) // np.abs(y) * np.sign(x) * np.sign(y)
    return [ctx.constant(q.astype(x.dtype))]


def _pow(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x, e = ctx.input(0), ctx.input(1)
    dt = ctx.type_of(x).dtype
    if ctx.type_of(e).dtype != dt:  # ONNX lets the exponent have its own type
        e = ctx.op("cast", [e], {"dtype": dt.value})
    return [ctx.op("pow", [x, e])]


def _variadic(kiln_op: str) -> ImportFn:
    """Max / Min / Sum of any number of operands, as a chain of binary ops."""

    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        values = ctx.inputs()
        y = values[0]
        for v in values[1:]:
            y = ctx.op(kiln_op, [y, v])
        return [y]

    return imp


def _mean(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    values = ctx.inputs()
    total = _variadic("add")(ctx, node)[0]
    if len(values) == 1:
        return [total]
    return [ctx.op("div", [total, ctx.scalar(len(values), ctx.type_of(total).dtype, "count")])]


def _clip(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    dt = ctx.type_of(x).dtype
    if ctx.opset < 11:
        lo, hi = ctx.attr("min"), ctx.attr("max")
        return [ctx.op("clamp", [x], {"min": lo, "max": hi})]
    bounds: list[Any] = []
    computed = []
    for i, kiln_op in ((1, "maximum"), (2, "minimum")):
        v = ctx.optional(i)
        array = ctx.const_value(v)
        if v is None:
            bounds.append(None)
        elif array is not None:
            value = array.reshape(-1)[0].item()
            bounds.append(float(value) if dt.is_float else int(value))
        else:
            bounds.append(None)
            computed.append((kiln_op, v))
    y = x
    if bounds != [None, None]:
        y = ctx.op("clamp", [y], {"min": bounds[0], "max": bounds[1]})
    for kiln_op, v in computed:  # bounds computed at run time
        y = ctx.op(kiln_op, [y, v])
    return [y]


def _leaky_relu(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    return [ctx.op("leaky_relu", [ctx.input(0)], {"negative_slope": ctx.attr("alpha", 0.01)})]


def _hard_sigmoid(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    alpha, beta = ctx.attr("alpha", 0.2), ctx.attr("beta", 0.5)
    # kiln's hardsigmoid is PyTorch's: relu6(x + 3) / 6, i.e. alpha 1/6 and beta 1/2.
    if math.isclose(alpha, 1.0 / 6.0, rel_tol=1e-6) and math.isclose(beta, 0.5):
        return [ctx.op("hardsigmoid", [x])]
    dt = ctx.type_of(x).dtype
    y = ctx.op("add", [ctx.op("mul", [x, ctx.scalar(alpha, dt, "alpha")]),
                       ctx.scalar(beta, dt, "beta")])
    return [ctx.op("clamp", [y], {"min": 0.0, "max": 1.0})]


def _gelu(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    return [ctx.op("gelu", [ctx.input(0)], {"approximate": ctx.attr("approximate", "none")})]


def _cast(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    to = _dtype_of_elem(ctx.attr("to"), f"Cast {ctx.name}'s target", allow_double=True)
    if ctx.type_of(x).dtype == to:
        return [x]
    return [ctx.op("cast", [x], {"dtype": to.value})]


def _is_inf(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    t = ctx.type_of(x)
    pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)
    if pos and neg:
        return [ctx.op("eq", [ctx.op("abs", [x]), ctx.scalar(np.inf, t.dtype, "inf")])]
    if pos or neg:
        return [ctx.op("eq", [x, ctx.scalar(np.inf if pos else -np.inf, t.dtype, "inf")])]
    return [ctx.full(t.shape, False, np.dtype(bool))]


def _is_nan(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    return [ctx.op("ne", [x, x])]  # NaN is the only value unequal to itself


def _where(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    return [ctx.op("where", [ctx.input(0), ctx.input(1), ctx.input(2)])]


def _dropout(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    training = ctx.optional(2)
    if training is not None and bool(ctx.const_input(2, "training_mode").reshape(-1)[0]):
        # Training drops at random, except at ratio 0 (the default ratio is 0.5).
        ratio = ctx.const_input(1, "ratio") if ctx.has_input(1) else np.array(0.5)
        if float(ratio.reshape(-1)[0]) != 0.0:
            raise ctx.unsupported("Dropout in training mode",
                                  hint="export the model in eval() mode")
    # Inference: dropout is the identity, and its mask keeps everything.
    x = ctx.input(0)
    if len(node.output) < 2 or not node.output[1]:
        return [x]
    return [x, ctx.full(ctx.type_of(x).shape, True, np.dtype(bool), "mask")]


def _identity(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    return [ctx.input(0)]


# ---- dense -----------------------------------------------------------------------------------
def _matmul(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    a, b = ctx.input(0), ctx.input(1)
    at, bt = ctx.type_of(a), ctx.type_of(b)
    w = ctx.const_value(b)
    if w is not None and w.ndim == 2 and at.rank >= 2:
        # x @ W with a constant W is a linear layer (weight [out, in]): the form kiln's
        # passes (fusion, pruning, quantization) look for.
        return [ctx.op("linear", [a, ctx.constant(w.T, "weight")])]
    # NumPy's rules for vectors: a 1-d operand is a row (left) or a column (right) whose
    # axis is dropped from the result.
    if at.rank == 1:
        a = ctx.reshape(a, (1,) + at.shape)
    if bt.rank == 1:
        b = ctx.reshape(b, bt.shape + (1,))
    y = ctx.op("matmul", [a, b])
    shape = list(ctx.type_of(y).shape)
    if bt.rank == 1:
        shape.pop(-1)
    if at.rank == 1:
        shape.pop(-2 if bt.rank != 1 else -1)
    return [ctx.reshape(y, shape)]


def _gemm(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    a, b, c = ctx.input(0), ctx.input(1), ctx.optional(2)
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    trans_a, trans_b = ctx.attr("transA", 0), ctx.attr("transB", 0)
    if trans_a:
        a = ctx.op("permute", [a], {"perm": (1, 0)})
    dt = ctx.type_of(a).dtype
    w = ctx.const_value(b)
    if w is not None:
        # A constant B becomes a linear layer's [N, K] weight, alpha folded in (B itself,
        # keeping its name, when it already is that).
        n = w.shape[0] if trans_b else w.shape[1]
        if trans_b and alpha == 1.0:
            weight = b
        else:
            w = w if trans_b else w.T
            w = w if alpha == 1.0 else (w.astype(np.float64) * alpha).astype(w.dtype)
            weight = ctx.constant(w, "weight")
        alpha_done = True
    else:
        weight = b if trans_b else ctx.op("permute", [b], {"perm": (1, 0)})
        alpha_done = alpha == 1.0
        n = ctx.type_of(weight).shape[0]
    bias = ctx.const_value(c)
    if bias is not None and alpha_done and bias.size == n and bias.shape[-1:] == (n,) \
            and bias.ndim <= 2:
        # A [N] (or [1, N]) constant C is the linear layer's bias, beta folded in.
        if beta != 1.0 or bias.shape != (n,):
            c = ctx.constant((bias.astype(np.float64) * beta).astype(bias.dtype).reshape(n),
                             "bias")
        return [ctx.op("linear", [a, weight, c])]
    y = ctx.op("linear", [a, weight])
    if not alpha_done:
        y = ctx.op("mul", [y, ctx.scalar(alpha, dt, "alpha")])
    if c is not None:
        if beta != 1.0:
            c = ctx.op("mul", [c, ctx.scalar(beta, dt, "beta")])
        y = ctx.op("add", [y, c])
    return [y]


def _spatial_pads(ctx: ImportContext, in_sizes: Sequence[int], kernel: Sequence[int],
                  strides: Sequence[int], dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(lo, hi) padding per spatial axis from ``pads`` or ``auto_pad``."""
    nd = len(in_sizes)
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = ctx.attr("pads", [0] * (2 * nd))
        return [(int(pads[i]), int(pads[nd + i])) for i in range(nd)]
    if auto == "VALID":
        return [(0, 0)] * nd
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for n, k, s, d in zip(in_sizes, kernel, strides, dilations):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return out
    raise ctx.error(f"unknown auto_pad {auto!r}")


def _window(ctx: ImportContext, x: str, kernel: Sequence[int]
            ) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    nd = len(kernel)
    strides = [int(s) for s in ctx.attr("strides", [1] * nd)]
    dilations = [int(d) for d in ctx.attr("dilations", [1] * nd)]
    pads = _spatial_pads(ctx, ctx.type_of(x).shape[2:], kernel, strides, dilations)
    return strides, dilations, pads


def _pad_spatial(ctx: ImportContext, x: str, pads: Sequence[tuple[int, int]],
                 value: float) -> str:
    """``x`` [N, C, *spatial] padded explicitly (negative amounts crop)."""
    flat = [0, 0, 0, 0] + [p for lo_hi in pads for p in lo_hi]
    return ctx.op("pad", [x], {"pads": tuple(flat), "value": value})


def conv_operand_and_attrs(ctx: ImportContext, x: str, kernel: Sequence[int]
                           ) -> tuple[str, dict]:
    """A Conv-like node's input (padded first where its pads are asymmetric: kiln's conv
    pads symmetrically) and kiln conv attributes, from its strides, dilations, pads, group."""
    strides, dilations, pads = _window(ctx, ctx.input(0), kernel)
    attrs = {"stride": tuple(strides), "dilation": tuple(dilations),
             "groups": ctx.attr("group", 1)}
    if all(lo == hi for lo, hi in pads):
        attrs["padding"] = tuple(lo for lo, _ in pads)
    else:
        x = _pad_spatial(ctx, x, pads, 0.0)
    return x, attrs


def _conv(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    w, bias = ctx.input(1), ctx.optional(2)
    x, attrs = conv_operand_and_attrs(ctx, ctx.input(0), list(ctx.type_of(w).shape[2:]))
    return [ctx.op("conv", [x, w] + ([bias] if bias else []), attrs)]


def _conv_transpose_pads(ctx: ImportContext, sizes: Sequence[int], kernel: Sequence[int],
                         attrs: dict) -> list[tuple[int, int]]:
    """(lo, hi) cropping per spatial axis of a transposed convolution: its ``pads``, or the
    ones ONNX derives from ``output_shape`` or ``auto_pad`` (SAME: output = input * stride);
    an output_shape beyond the full output raises ``attrs``' output_padding."""
    nd = len(sizes)
    auto = ctx.attr("auto_pad", "NOTSET")
    if not ctx.has_attr("output_shape") and auto in ("NOTSET", ""):
        pads = ctx.attr("pads", [0] * (2 * nd))
        return [(int(pads[i]), int(pads[nd + i])) for i in range(nd)]
    if auto == "VALID":
        return [(0, 0)] * nd
    if ctx.has_attr("output_shape"):
        want = [int(v) for v in ctx.attr("output_shape")][-nd:]
    else:
        want = [n * s for n, s in zip(sizes, attrs["stride"])]
    out = []
    extra = list(attrs["output_padding"])
    for i, (n, k, s, d, o) in enumerate(zip(sizes, kernel, attrs["stride"], attrs["dilation"],
                                            want)):
        total = s * (n - 1) + extra[i] + (k - 1) * d + 1 - o
        if total < 0:
            # An output larger than the full one grows at the end, as output_padding does.
            extra[i] -= total
            total = 0
        small, big = total // 2, total - total // 2
        # SAME_UPPER puts the odd cell at the end; SAME_LOWER and an output_shape (ONNX and
        # ONNX Runtime) at the start.
        out.append((small, big) if auto == "SAME_UPPER" else (big, small))
    attrs["output_padding"] = tuple(extra)
    return out


def _conv_transpose(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x, w, bias = ctx.input(0), ctx.input(1), ctx.optional(2)
    nd = ctx.type_of(w).rank - 2
    attrs = {"stride": tuple(ctx.attr("strides", [1] * nd)),
             "dilation": tuple(ctx.attr("dilations", [1] * nd)),
             "groups": ctx.attr("group", 1),
             "output_padding": tuple(ctx.attr("output_padding", [0] * nd))}
    lo_hi = _conv_transpose_pads(ctx, ctx.type_of(x).shape[2:], ctx.type_of(w).shape[2:],
                                 attrs)
    symmetric = all(lo == hi for lo, hi in lo_hi)
    attrs["padding"] = tuple(lo for lo, _ in lo_hi) if symmetric else (0,) * nd
    y = ctx.op("conv_transpose", [x, w] + ([bias] if bias else []), attrs)
    if not symmetric:
        # Padding a transposed convolution crops its output.
        y = _pad_spatial(ctx, y, [(-lo, -hi) for lo, hi in lo_hi], 0.0)
    return [y]


# ---- normalization and softmax ---------------------------------------------------------------
def _softmax(kiln_op: str) -> ImportFn:
    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        x = ctx.input(0)
        t = ctx.type_of(x)
        if ctx.opset >= 13:
            return [ctx.op(kiln_op, [x], {"axis": _axis(ctx, ctx.attr("axis", -1), t.rank)})]
        # Before opset 13 the input is seen as a matrix [prod(:axis), prod(axis:)] and each
        # row is normalized: over all the trailing axes together.
        axis = _axis(ctx, ctx.attr("axis", 1), t.rank)
        rows = (math.prod(t.shape[:axis]), math.prod(t.shape[axis:]))
        y = ctx.op(kiln_op, [ctx.reshape(x, rows)], {"axis": 1})
        return [ctx.reshape(y, t.shape)]

    return imp


def _batch_norm(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    if ctx.attr("training_mode", 0):
        return _batch_norm_training(ctx)
    if ctx.opset < 9 and not ctx.attr("spatial", 1):
        raise ctx.unsupported("BatchNormalization with spatial=0 (statistics per element)",
                              hint="export with spatial=1 (opset 9 and later have no other)")
    x, scale, bias, mean, var = (ctx.input(i) for i in range(5))
    return [ctx.op("batch_norm", [x, mean, var, scale, bias],
                   {"eps": float(ctx.attr("epsilon", 1e-5))})]


def _batch_norm_training(ctx: ImportContext) -> list[str]:
    """BatchNormalization with training_mode=1: normalize with the batch's own statistics
    (population variance) and return the updated running mean and variance."""
    x, scale, bias, mean, var = (ctx.input(i) for i in range(5))
    t = ctx.type_of(x)
    dt = t.dtype
    axes = {"axes": (0,) + tuple(range(2, t.rank)), "keepdim": True}
    column = (1, t.shape[1]) + (1,) * (t.rank - 2)
    batch_mean = ctx.op("reduce_mean", [x], axes)
    centered = ctx.op("sub", [x, batch_mean])
    batch_var = ctx.op("reduce_mean", [ctx.op("mul", [centered, centered])], axes)
    eps = ctx.scalar(float(ctx.attr("epsilon", 1e-5)), dt, "eps")
    y = ctx.op("mul", [centered, ctx.op("rsqrt", [ctx.op("add", [batch_var, eps])])])
    y = ctx.op("add", [ctx.op("mul", [y, ctx.reshape(scale, column)]),
                       ctx.reshape(bias, column)])
    momentum = float(ctx.attr("momentum", 0.9))
    keep, new = ctx.scalar(momentum, dt, "momentum"), ctx.scalar(1 - momentum, dt, "update")
    running = [ctx.op("add", [ctx.op("mul", [old, keep]),
                              ctx.op("mul", [ctx.reshape(stat, (t.shape[1],)), new])])
               for old, stat in ((mean, batch_mean), (var, batch_var))]
    return [y, *running]


def _affine_operand(ctx: ImportContext, v: str, shape: tuple[int, ...]) -> str:
    """A LayerNormalization scale or bias broadcast to the normalized shape."""
    if ctx.type_of(v).shape == shape:
        return v
    array = ctx.const_value(v)
    if array is not None and math.prod(shape) * array.itemsize <= FOLD_LIMIT_BYTES:
        return ctx.constant(np.broadcast_to(array, shape), "affine")
    t = ctx.type_of(v)
    v = ctx.reshape(v, t.shape[max(t.rank - len(shape), 0):])
    return ctx.op("expand", [v], {"shape": shape})


def _layer_norm(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    t = ctx.type_of(x)
    axis = _axis(ctx, ctx.attr("axis", -1), t.rank)
    shape = t.shape[axis:]
    operands = [x] + [_affine_operand(ctx, v, shape) for v in (ctx.input(1), ctx.optional(2))
                      if v is not None]
    eps = float(ctx.attr("epsilon", 1e-5))
    y = ctx.op("layer_norm", operands, {"normalized_ndim": t.rank - axis, "eps": eps})
    if not any(node.output[1:]):
        return [y]
    # The optional Mean and InvStdDev outputs (training graphs save them for the backward
    # pass), in the stash type: f32, the only one ONNX defines besides bfloat16.
    if ctx.attr("stash_type", 1) != TensorProto.FLOAT:
        raise ctx.unsupported("LayerNormalization with a stash_type other than FLOAT")
    xs = x if t.dtype == DType.f32 else ctx.op("cast", [x], {"dtype": "f32"})
    axes = {"axes": tuple(range(axis, t.rank)), "keepdim": True}
    mean = ctx.op("reduce_mean", [xs], axes)
    centered = ctx.op("sub", [xs, mean])
    var = ctx.op("reduce_mean", [ctx.op("mul", [centered, centered])], axes)
    inv_std = ctx.op("rsqrt", [ctx.op("add", [var, ctx.scalar(eps, DType.f32, "eps")])])
    return [y, mean, inv_std]


# ---- pooling ---------------------------------------------------------------------------------
def _pool_out_sizes(ctx: ImportContext, sizes, kernel, strides, dilations, pads) -> list[int]:
    """ONNX's output size per spatial axis (floor, or ceil with ceil_mode)."""
    ceil = bool(ctx.attr("ceil_mode", 0))
    out = []
    for n, k, s, d, (lo, hi) in zip(sizes, kernel, strides, dilations, pads):
        avail = n + lo + hi - d * (k - 1) - 1
        m = (-(-avail // s) if ceil else avail // s) + 1
        # Under ceil_mode, from opset 22 on (as ONNX's shape inference has it), the last
        # window must start inside the input or its left padding, as in PyTorch: one starting
        # in the right padding would pool nothing but padding. Older opsets keep it.
        if ceil and ctx.opset >= 22 and (m - 1) * s >= n + lo:
            m -= 1
        out.append(m)
    return out


def _pool(ctx: ImportContext, kind: str, x: str | None = None,
          count_pad: bool | None = None) -> str:
    """MaxPool / AveragePool of ``x`` (the node's operand 0 by default; ``count_pad``
    overrides the node's count_include_pad).

    Symmetric padding whose output size kiln (PyTorch's rules) computes the same as ONNX maps
    straight to kiln's pool. Otherwise (asymmetric or auto padding, or a ceil-mode window that
    ONNX keeps and PyTorch drops) the input is padded explicitly to exactly the extent ONNX's
    windows cover and pooled without padding: with -inf for max; for average, zeros and a
    constant per-window divisor for the cells ONNX counts. A dilated average (kiln's avg_pool
    has no dilation) is a depthwise convolution with weights 1 / window size.
    """
    x = ctx.input(0) if x is None else x
    t = ctx.type_of(x)
    kernel = [int(k) for k in ctx.attr("kernel_shape")]
    nd = len(kernel)
    if t.rank != nd + 2:
        raise ctx.error(f"{nd}-d pooling of a rank-{t.rank} input")
    strides, dilations, pads = _window(ctx, x, kernel)
    dilated = any(d != 1 for d in dilations)
    sizes = t.shape[2:]
    out = _pool_out_sizes(ctx, sizes, kernel, strides, dilations, pads)
    ceil = bool(ctx.attr("ceil_mode", 0))
    if count_pad is None:
        count_pad = bool(ctx.attr("count_include_pad", 0))
    attrs: dict[str, Any] = {"kernel": tuple(kernel), "stride": tuple(strides)}
    if kind == "max_pool":
        attrs["dilation"] = tuple(dilations)
    else:
        attrs["count_include_pad"] = count_pad
    if not (kind == "avg_pool" and dilated) and all(
            lo == hi and 2 * lo <= k for (lo, hi), k in zip(pads, kernel)):
        direct = {**attrs, "padding": tuple(lo for lo, _ in pads), "ceil_mode": ceil}
        want = TensorType(t.shape[:2] + tuple(out), t.dtype)
        try:
            same = infer_types(kind, [t], get_op(kind).normalize_attrs(direct)) == [want]
        except KilnError:
            same = False
        if same:
            return ctx.op(kind, [x], direct)
    # Explicit padding to the extent the windows cover (negative crops unused input).
    spans = [(o - 1) * s + d * (k - 1) + 1 for o, s, d, k in zip(out, strides, dilations, kernel)]
    explicit = [(lo, span - n - lo) for (lo, _), span, n in zip(pads, spans, sizes)]
    if kind == "max_pool":
        xp = _pad_spatial(ctx, x, explicit, -math.inf)
        return ctx.op(kind, [xp], {**attrs, "padding": 0, "ceil_mode": False})
    xp = _pad_spatial(ctx, x, explicit, 0.0)
    dt = t.dtype.numpy
    if dilated:
        ones = np.full((t.shape[1], 1, *kernel), 1 / math.prod(kernel), dt)
        mean = ctx.op("conv", [xp, ctx.constant(ones, "window")],
                      {"stride": tuple(strides), "dilation": tuple(dilations),
                       "groups": t.shape[1]})
    else:
        mean = ctx.op(kind, [xp], {**attrs, "padding": 0, "ceil_mode": False,
                                   "count_include_pad": True})
    # Divisor per window: the cells inside the input, plus the declared pads when ONNX
    # counts them (never the extra cells a ceil-mode window hangs over). Those cells are a
    # box, so a window's count is the product of its overlaps with the box along each axis.
    counts = []
    for i, (n, (lo, _), k, s, d, m) in enumerate(zip(sizes, explicit, kernel, strides,
                                                     dilations, out)):
        first, end = (0, lo + n + pads[i][1]) if count_pad else (lo, lo + n)
        cells = (np.arange(m) * s)[:, None] + np.arange(k) * d  # each window's cells
        counts.append(((cells >= first) & (cells < end)).sum(axis=1).astype(np.float64))
    if any(np.any(c == 0) for c in counts):
        raise ctx.unsupported("AveragePool with a window that covers no counted cell")
    if math.prod(out) * dt.itemsize <= FOLD_LIMIT_BYTES:
        factor = (math.prod(kernel) / functools.reduce(np.multiply.outer, counts)).astype(dt)
        return ctx.op("mul", [mean, ctx.constant(factor.reshape((1, 1) + factor.shape),
                                                 "divisor")])
    for i, (k, c) in enumerate(zip(kernel, counts)):  # one factor per axis
        shape = [1] * (nd + 2)
        shape[2 + i] = len(c)
        mean = ctx.op("mul", [mean, ctx.constant((k / c).astype(dt).reshape(shape), "divisor")])
    return mean


def _max_pool(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    if ctx.attr("storage_order", 0):
        raise ctx.unsupported("MaxPool with storage_order=1")
    dtype = ctx.in_type(0).dtype
    if dtype.is_float:
        return [_pool(ctx, "max_pool")]
    if dtype not in (DType.u8, DType.i8):
        raise ctx.unsupported(f"MaxPool of a {dtype} tensor",
                              hint="kiln pools float, int8 and uint8 tensors: cast to f32")
    # kiln pools floats; every int8 / uint8 value is exact in f32, and a maximum is one of
    # its window's values, so pooling the f32 copy and casting back is exact.
    y = _pool(ctx, "max_pool", ctx.op("cast", [ctx.input(0)], {"dtype": "f32"}))
    return [ctx.op("cast", [y], {"dtype": dtype.value})]


def _avg_pool(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    return [_pool(ctx, "avg_pool")]


def _global_avg_pool(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    nd = ctx.type_of(x).rank - 2
    return [ctx.op("adaptive_avg_pool", [x], {"output_size": (1,) * nd})]


def _global_max_pool(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    rank = ctx.type_of(x).rank
    return [ctx.op("reduce_max", [x], {"axes": tuple(range(2, rank)), "keepdim": True})]


# ---- reductions ------------------------------------------------------------------------------
def _reduce(kiln_op: str) -> ImportFn:
    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        x = ctx.input(0)
        rank = ctx.type_of(x).rank
        axes = ctx.ints("axes", 1)
        keep = bool(ctx.attr("keepdims", 1))
        if not axes:
            if ctx.attr("noop_with_empty_axes", 0) or rank == 0:
                return [x]
            axes = list(range(rank))
        axes = sorted({_axis(ctx, a, rank) for a in axes})
        t = ctx.type_of(x)
        if kiln_op in ("reduce_max", "reduce_min") and any(t.shape[a] == 0 for a in axes):
            # ONNX: the max (min) of nothing is the identity of max (min): the type's lowest
            # (highest) value, -inf (inf) for floats.
            shape = [1 if i in axes else d for i, d in enumerate(t.shape)]
            shape = shape if keep else [d for i, d in enumerate(shape) if i not in axes]
            low = kiln_op == "reduce_max"
            if t.dtype.is_float:
                value = -np.inf if low else np.inf
            elif t.dtype == DType.bool:
                value = not low
            else:
                value = getattr(np.iinfo(t.dtype.numpy), "min" if low else "max")
            return [ctx.full(shape, value, t.dtype.numpy)]
        attrs = {"axes": tuple(axes), "keepdim": keep}
        if t.dtype == DType.bool and kiln_op in ("reduce_max", "reduce_min"):
            # Max / min of bools is any / all: reduce 0 / 1 bytes.
            y = ctx.op(kiln_op, [ctx.op("cast", [x], {"dtype": "u8"})], attrs)
            return [ctx.op("cast", [y], {"dtype": "bool"})]
        return [ctx.op(kiln_op, [x], attrs)]

    return imp


# ---- shape -----------------------------------------------------------------------------------
def _reshape(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    t = ctx.type_of(x)
    shape = ctx.shape_input(1)  # an input since opset 5 (MIN_OPSET is later)
    if not ctx.attr("allowzero", 0):  # 0 copies the input's size on that axis
        shape = [t.shape[i] if d == 0 and i < t.rank else d for i, d in enumerate(shape)]
    if shape.count(-1) > 1:
        raise ctx.error(f"Reshape to {shape} has more than one -1")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or t.numel % known:
            raise ctx.error(f"cannot reshape {list(t.shape)} to {shape}")
        shape[shape.index(-1)] = t.numel // known
    return [ctx.reshape(x, shape)]


def _flatten(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    t = ctx.type_of(x)
    axis = ctx.attr("axis", 1)
    axis = axis + t.rank if axis < 0 else axis
    if not 0 <= axis <= t.rank:
        raise ctx.error(f"Flatten axis {axis} is out of range for rank {t.rank}")
    return [ctx.reshape(x, (math.prod(t.shape[:axis]), math.prod(t.shape[axis:])))]


def _transpose(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    rank = ctx.type_of(x).rank
    perm = tuple(int(p) for p in ctx.attr("perm", list(range(rank))[::-1]))
    if perm == tuple(range(rank)):
        return [x]
    return [ctx.op("permute", [x], {"perm": perm})]


def _squeeze(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    t = ctx.type_of(x)
    axes = ctx.ints("axes", 1)
    if axes is None:
        drop = {i for i, d in enumerate(t.shape) if d == 1}
    else:
        drop = {_axis(ctx, a, t.rank) for a in axes}
        if any(t.shape[a] != 1 for a in drop):
            raise ctx.error(f"Squeeze axes {axes} of shape {list(t.shape)} are not all 1")
    return [ctx.reshape(x, [d for i, d in enumerate(t.shape) if i not in drop])]


def _unsqueeze(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    t = ctx.type_of(x)
    axes = ctx.ints("axes", 1) or []
    rank = t.rank + len(axes)
    new = {_axis(ctx, a, rank) for a in axes}
    if len(new) != len(axes):
        raise ctx.error(f"Unsqueeze axes {axes} repeat an axis")
    dims = iter(t.shape)
    return [ctx.reshape(x, [1 if i in new else next(dims) for i in range(rank)])]


def _concat(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    values = ctx.inputs()
    rank = ctx.type_of(values[0]).rank
    axis = _axis(ctx, ctx.attr("axis"), rank)
    if len(values) == 1:
        return values
    return [ctx.op("concat", values, {"axis": axis})]


def _split(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    t = ctx.type_of(x)
    axis = _axis(ctx, ctx.attr("axis", 0), t.rank)
    size, count = t.shape[axis], len(node.output)
    sizes = ctx.ints("split", 1)
    if sizes is None:
        if ctx.has_attr("num_outputs"):
            # Opset 18: equal pieces of ceil(size / n), the last one smaller.
            piece = -(-size // count)
            sizes = [min(piece, size - piece * i) for i in range(count)]
        elif size % count:
            raise ctx.error(f"cannot split {size} into {count} equal pieces")
        else:
            sizes = [size // count] * count
    if len(sizes) != count:
        raise ctx.error(f"Split has {count} outputs but {len(sizes)} sizes")
    if count == 1:
        return [x]
    return ctx.op_multi("split", [x], {"axis": axis, "sizes": tuple(sizes)})


def _reverse(ctx: ImportContext, x: str, axis: int) -> str:
    """``x`` reversed along ``axis``: kiln has no flip, so one slice per element."""
    n = ctx.type_of(x).shape[axis]
    if n <= 1:
        return x
    if n > _MAX_SLICES:
        raise ctx.unsupported(f"a negative-step Slice over {n} elements",
                              hint="kiln reverses an axis element by element (up to "
                                   f"{_MAX_SLICES})")
    pieces = [ctx.op("slice", [x], {"axis": axis, "start": i, "end": i + 1})
              for i in range(n - 1, -1, -1)]
    return ctx.op("concat", pieces, {"axis": axis})


def _slice_axis(ctx: ImportContext, x: str, axis: int, start: int, end: int, step: int) -> str:
    """``x[start:end:step]`` along ``axis`` with NumPy's (= ONNX's) clamping."""
    if step == 0:
        raise ctx.error("Slice step 0")
    n = ctx.type_of(x).shape[axis]
    # ONNX clamps starts and ends (INT64_MAX meaning "to the end") exactly as Python does.
    idx = range(*slice(start, end, step).indices(n))
    if len(idx) == n and step > 0:
        return x
    if len(idx) == 0:
        return ctx.op("slice", [x], {"axis": axis, "start": 0, "end": 0})
    lo, hi = min(idx[0], idx[-1]), max(idx[0], idx[-1])
    y = ctx.op("slice", [x], {"axis": axis, "start": lo, "end": hi + 1, "step": abs(step)})
    return y if step > 0 else _reverse(ctx, y, axis)


def _slice(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    rank = ctx.type_of(x).rank
    if ctx.opset < 10:
        starts, ends = ctx.ints("starts"), ctx.ints("ends")
        axes, steps = ctx.ints("axes"), None
    else:
        starts = ctx.int_input(1, "starts", MAX_RANK)
        ends = ctx.int_input(2, "ends", MAX_RANK)
        axes = ctx.ints("axes", 3)
        steps = ctx.ints("steps", 4)
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ctx.error("Slice's starts, ends, axes and steps differ in length")
    axes = [_axis(ctx, a, rank) for a in axes]
    if len(set(axes)) != len(axes):
        raise ctx.error(f"Slice repeats an axis in {axes}")
    y = x
    for s, e, a, st in zip(starts, ends, axes, steps):
        y = _slice_axis(ctx, y, a, s, e, st)
    return [y]


def _gather(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """Gather: constant indices pick slices; many or computed indices are a kiln take."""
    data, idx = ctx.input(0), ctx.input(1)
    t, it = ctx.type_of(data), ctx.type_of(idx)
    axis = _axis(ctx, ctx.attr("axis", 0), t.rank)
    n = t.shape[axis]
    out_shape = t.shape[:axis] + it.shape + t.shape[axis + 1:]
    table, indices = ctx.const_value(data), ctx.const_value(idx)
    if indices is not None:
        if np.any((indices < -n) | (indices >= n)):
            raise ctx.error(f"Gather index out of range [-{n}, {n})")
        indices = np.where(indices < 0, indices + n, indices)
        if table is not None and math.prod(out_shape) * t.dtype.itemsize <= FOLD_LIMIT_BYTES:
            return [ctx.constant(np.take(table, indices, axis=axis))]
        flat = indices.reshape(-1)
        if not flat.size:
            return [ctx.constant(np.zeros(out_shape, t.dtype.numpy))]
        # Runs of consecutive indices are one slice each, while they are few; more indices
        # are an embedding with constant indices (like computed ones, below).
        cuts = np.flatnonzero(np.diff(flat) != 1) + 1
        if table is None and len(cuts) < _MAX_SLICES:
            bounds = zip([0, *cuts.tolist()], [*cuts.tolist(), flat.size])
            runs = [(int(flat[a]), int(flat[b - 1]) + 1) for a, b in bounds]
            pieces = [ctx.op("slice", [data], {"axis": axis, "start": lo, "end": hi})
                      if (lo, hi) != (0, n) else data for lo, hi in runs]
            y = pieces[0] if len(pieces) == 1 else ctx.op("concat", pieces, {"axis": axis})
            return [ctx.reshape(y, out_shape)]
        idx = ctx.constant(indices, "indices")
    # Computed indices: negative ones count from the end; one out of range is a KilnError.
    return [ctx.op("take", [data, idx], {"axis": axis, "wrap": True})]


def _expand(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    t = ctx.type_of(x)
    shape = ctx.shape_input(1)
    try:  # ONNX's Expand broadcasts both ways: the result may be larger than `shape`
        target = tuple(int(d) for d in np.broadcast_shapes(t.shape, tuple(shape)))
    except ValueError:
        raise ctx.error(f"cannot expand {list(t.shape)} to {shape}") from None
    if target == t.shape:
        return [x]
    return [ctx.op("expand", [x], {"shape": target})]


def _pad(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    t = ctx.type_of(x)
    mode = ctx.attr("mode", "constant")
    if mode != "constant":
        raise ctx.unsupported(f"Pad mode {mode!r}", hint="kiln pads with a constant only")
    if ctx.opset < 11:
        pads, value = ctx.ints("pads"), float(ctx.attr("value", 0.0))
    else:
        pads = ctx.ints("pads", 1)
        v = ctx.optional(2)
        value = 0.0 if v is None else ctx.const_input(2, "constant_value").reshape(-1)[0].item()
    axes = ctx.ints("axes", 3)
    axes = list(range(t.rank)) if axes is None else [_axis(ctx, a, t.rank) for a in axes]
    if pads is None or len(pads) != 2 * len(axes):
        raise ctx.error(f"Pad wants 2 entries per padded axis, got {pads}")
    # ONNX lists all the starts, then all the ends; kiln (lo, hi) per axis.
    flat = [0] * (2 * t.rank)
    for k, a in enumerate(axes):
        flat[2 * a], flat[2 * a + 1] = pads[k], pads[len(axes) + k]
    if not any(flat):
        return [x]
    value = float(value) if t.dtype.is_float else int(value)
    return [ctx.op("pad", [x], {"pads": tuple(flat), "value": value})]


def _trilu(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    t = ctx.type_of(x)
    k = int(ctx.const_input(1, "k").reshape(-1)[0]) if ctx.has_input(1) else 0
    rows, cols = t.shape[-2:]
    upper = ctx.attr("upper", 1)
    if rows * cols <= FOLD_LIMIT_BYTES:
        ones = np.ones((rows, cols), bool)
        keep = ctx.constant(np.triu(ones, k) if upper else np.tril(ones, k), "keep")
    else:  # a mask this large is computed at run time: keep column j of row i if j - k >= i
        row = ctx.constant(np.arange(rows, dtype=np.int64).reshape(rows, 1), "row")
        col = ctx.constant(np.arange(cols, dtype=np.int64).reshape(1, cols) - k, "col")
        keep = ctx.op("ge" if upper else "le", [col, row])
    # A constant x folds with the rest (up to FOLD_LIMIT_BYTES).
    return [ctx.op("where", [keep, x, ctx.scalar(0, t.dtype, "zero")])]


# ---- values known from shapes and attributes alone -------------------------------------------
def _shape(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    shape = ctx.in_type(0).shape
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    return [ctx.constant(np.array(shape[slice(start, end)], np.int64))]


def _size(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    return [ctx.constant(np.array(ctx.in_type(0).numel, np.int64))]


def _constant(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    for name, make in (("value", lambda v: v),
                       ("value_float", lambda v: np.array(v, np.float32)),
                       ("value_floats", lambda v: np.array(v, np.float32)),
                       ("value_int", lambda v: np.array(v, np.int64)),
                       ("value_ints", lambda v: np.array(v, np.int64))):
        if ctx.has_attr(name):
            return [ctx.constant(make(ctx.attr(name)))]
    raise ctx.unsupported(f"Constant with {[a.name for a in node.attribute]}",
                          hint="kiln reads dense tensor, float and int constants")


def _constant_of_shape(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    shape = ctx.shape_input(0)
    value = ctx.attr("value")
    value = np.zeros(1, np.float32) if value is None else value
    if value.size != 1:
        raise ctx.error(f"ConstantOfShape's value has {value.size} elements, not one")
    return [ctx.full(shape, value.reshape(-1)[0], value.dtype)]


def _range(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    start, limit, delta = (ctx.const_input(i, what).reshape(())
                           for i, what in enumerate(("start", "limit", "delta")))
    # ONNX: max(ceil((limit - start) / delta), 0) elements, counted before any is made.
    if start.dtype.kind == "f":
        span = (float(limit) - float(start)) / float(delta) if float(delta) else math.nan
        if not math.isfinite(span):
            raise ctx.error(f"Range({start}, {limit}, {delta}) has no finite length")
        count = max(math.ceil(span), 0)
    else:
        if int(delta) == 0:
            raise ctx.error("Range with delta 0")
        count = max(-((int(start) - int(limit)) // int(delta)), 0)
    _check_foldable(ctx, "Range", (count,), start.dtype)
    return [ctx.constant(np.arange(start, limit, delta, dtype=start.dtype))]


def _constant_only(fn: Callable[..., np.ndarray], what: str) -> ImportFn:
    """An op kiln has no node for, imported when its operands are all constants (shape
    arithmetic) by computing it here."""

    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        computed = [v for v in ctx.inputs() if ctx.const_value(v) is None]
        if computed:
            raise ctx.unsupported(f"{node.op_type} of computed values: kiln has no {what} op, "
                                  f"and {ctx.runtime_reason(computed[0])}",
                                  hint="keep this computation on constants, or rewrite it")
        arrays = [ctx.const_value(v) for v in ctx.inputs()]
        _check_foldable(ctx, node.op_type, _broadcast(ctx, *arrays), np.result_type(*arrays))
        return [ctx.constant(np.asarray(fn(ctx, *arrays)))]

    return imp


def _broadcast(ctx: ImportContext, *arrays: np.ndarray) -> tuple[int, ...]:
    """The shape the arrays broadcast to, computed from their shapes alone."""
    try:
        return np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        raise ctx.error(f"{ctx.node.op_type} of shapes {[list(a.shape) for a in arrays]}, "
                        "which do not broadcast") from None


def _check_foldable(ctx: ImportContext, what: str, shape: Sequence[int], dtype: Any) -> None:
    """Refuse to compute ``what`` (an op kiln has no node for) while importing when its result
    would exceed ``FOLD_LIMIT_BYTES``: it cannot be left to run time either."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes > FOLD_LIMIT_BYTES:
        raise ctx.unsupported(
            f"{what} with a {_format_bytes(nbytes)} result {list(shape)}: kiln has no op to "
            f"compute it at run time, and computes at most {_format_bytes(FOLD_LIMIT_BYTES)} "
            "while importing (FOLD_LIMIT_BYTES)",
            hint="compute it in the model from smaller pieces, or keep it on smaller shapes")


def _mod(ctx: ImportContext, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.any(b == 0):
        raise ctx.error("Mod by zero")
    # fmod=1: C's remainder (sign of the dividend); fmod=0: Python's (sign of the divisor).
    return (np.fmod(a, b) if ctx.attr("fmod", 0) else np.mod(a, b)).astype(a.dtype)


# ---- quantization ----------------------------------------------------------------------------
# ---- rounding and logic at run time ----------------------------------------------------------
def _floor_ceil(up: bool) -> ImportFn:
    """Floor / Ceil from round: the nearest integer r is one off exactly where r > x (floor)
    or r < x (ceil); every float beyond 2**23 is already an integer, and NaN and inf pass
    through round unchanged and compare false."""

    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        x = ctx.input(0)
        dtype = ctx.type_of(x).dtype
        r = ctx.op("round", [x])
        off = ctx.op("cast", [ctx.op("lt" if up else "gt", [r, x])], {"dtype": dtype.value})
        return [ctx.op("add" if up else "sub", [r, off])]

    return imp


def _logical(kind: str) -> ImportFn:
    """And / Or / Xor of bool tensors (broadcasting): a where-select, or inequality."""

    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        a, b = ctx.input(0), ctx.input(1)
        if kind == "xor":
            return [ctx.op("ne", [a, b])]
        fixed = ctx.scalar(kind == "or", DType.bool, kind)
        return [ctx.op("where", [a, fixed, b] if kind == "or" else [a, b, fixed])]

    return imp


def _cast_like(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """CastLike: Cast to operand 1's element type (a DOUBLE constant was read as f32, as a
    Cast to DOUBLE is)."""
    x, to = ctx.input(0), ctx.in_type(1).dtype
    array = ctx.const_value(x)
    if array is not None:  # only operand 1's type is read: a constant stays one
        return [ctx.constant(array.astype(to.numpy), "cast")]
    return [x if ctx.type_of(x).dtype == to else ctx.op("cast", [x], {"dtype": to.value})]


def _qparams(ctx: ImportContext, quantize: bool) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Scale and zero point as arrays, and the axis when they are per channel (else None)."""
    if ctx.attr("block_size", 0):
        raise ctx.unsupported("blocked quantization (block_size)")
    scale = ctx.const_input(1, "scale").astype(np.float32)
    if ctx.has_input(2):
        zero = ctx.const_input(2, "zero point")
    elif quantize:
        # Opset 21 names the type when no zero point does; uint8 before that.
        elem = ctx.attr("output_dtype", TensorProto.UINT8) or TensorProto.UINT8
        zero = np.zeros((), _dtype_of_elem(elem, "QuantizeLinear output").numpy)
    else:
        zero = np.zeros((), ctx.in_type(0).dtype.numpy)
    per_tensor = scale.size == 1 and zero.size == 1
    axis = None if per_tensor else _axis(ctx, ctx.attr("axis", 1), ctx.in_type(0).rank)
    return scale, zero, axis


def _channel(array: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    if axis is None:
        return array.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return array.reshape(shape)


def _quantize_linear(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    scale, zero, axis = _qparams(ctx, quantize=True)
    dt = DType.from_numpy(zero.dtype)
    if dt not in (DType.u8, DType.i8):
        raise ctx.unsupported(f"QuantizeLinear to {dt}", hint="kiln quantizes to u8 or i8")
    array = ctx.const_value(x)
    if axis is None and array is None:
        return [ctx.op("quantize", [x], {"scale": float(scale.reshape(())),
                                         "zero_point": int(zero.reshape(())),
                                         "dtype": dt.value})]
    if array is None:
        raise ctx.unsupported("per-channel QuantizeLinear of a computed value",
                              hint="kiln quantizes activations per tensor")
    info = np.iinfo(dt.numpy)
    rank = array.ndim
    with np.errstate(all="ignore"):  # rint(x / scale) + zero point, saturated, in float32
        q = np.rint(array.astype(np.float32) / _channel(scale, axis, rank)) + _channel(
            zero, axis, rank).astype(np.float32)
    return [ctx.constant(np.clip(q, info.min, info.max).astype(dt.numpy))]


def _dequantize_linear(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    scale, zero, axis = _qparams(ctx, quantize=False)
    dt = ctx.type_of(x).dtype
    array = ctx.const_value(x)
    if array is not None:
        # Constant weights and biases (int8 or int32, per channel or not) become float.
        rank = array.ndim
        y = (array.astype(np.int64) - _channel(zero, axis, rank)).astype(np.float32)
        return [ctx.constant(y * _channel(scale, axis, rank))]
    if axis is not None or dt not in (DType.u8, DType.i8):
        raise ctx.unsupported(f"DequantizeLinear of a computed {dt} value"
                              f"{' per channel' if axis is not None else ''}",
                              hint="kiln dequantizes u8/i8 activations per tensor")
    return [ctx.op("dequantize", [x], {"scale": float(scale.reshape(())),
                                       "zero_point": int(zero.reshape(()))})]


ONNX_IMPORT: dict[str, ImportFn] = {
    # elementwise
    "Add": _binary("add"),
    "Sub": _binary("sub"),
    "Mul": _binary("mul"),
    "Div": _div,
    "Pow": _pow,
    "Max": _variadic("maximum"),
    "Min": _variadic("minimum"),
    "Sum": _variadic("add"),
    "Mean": _mean,
    "Relu": _unary("relu"),
    "Clip": _clip,
    "LeakyRelu": _leaky_relu,
    "Sigmoid": _unary("sigmoid"),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _unary("hardswish"),
    "Softsign": _unary("softsign"),
    "Gelu": _gelu,
    "Tanh": _unary("tanh"),
    "Erf": _unary("erf"),
    "Exp": _unary("exp"),
    "Log": _unary("log"),
    "Sqrt": _unary("sqrt"),
    "Reciprocal": _unary("reciprocal"),
    "Neg": _unary("neg"),
    "Abs": _unary("abs"),
    "Cast": _cast,
    "Equal": _binary("eq"),
    "Less": _binary("lt"),
    "LessOrEqual": _binary("le"),
    "Greater": _binary("gt"),
    "GreaterOrEqual": _binary("ge"),
    "Not": _unary("logical_not"),
    "IsInf": _is_inf,
    "IsNaN": _is_nan,
    "Where": _where,
    "Identity": _identity,
    "Dropout": _dropout,
    # dense
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    # normalization
    "Softmax": _softmax("softmax"),
    "LogSoftmax": _softmax("log_softmax"),
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    # pooling
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": _global_avg_pool,
    "GlobalMaxPool": _global_max_pool,
    # reductions
    "ReduceMean": _reduce("reduce_mean"),
    "ReduceSum": _reduce("reduce_sum"),
    "ReduceMax": _reduce("reduce_max"),
    "ReduceMin": _reduce("reduce_min"),
    # shape
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Expand": _expand,
    "Pad": _pad,
    "Trilu": _trilu,
    # known from shapes and attributes
    "Shape": _shape,
    "Size": _size,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Floor": _floor_ceil(up=False),
    "Ceil": _floor_ceil(up=True),
    "Round": _unary("round"),
    "Mod": _constant_only(_mod, "modulo"),
    "And": _logical("and"),
    "Or": _logical("or"),
    "Xor": _logical("xor"),
    "CastLike": _cast_like,
    # quantization
    "QuantizeLinear": _quantize_linear,
    "DequantizeLinear": _dequantize_linear,
}
"""ONNX op type -> function(ctx, node) emitting the kiln nodes; returns one kiln value per
ONNX output it computes (optional outputs it leaves out must be unused)."""


# ---- loading ---------------------------------------------------------------------------------
def _subgraph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph: initializers and tensor attributes, subgraphs included."""
    graphs = [graph]  # a work list, not recursion: subgraphs nest as deep as the file says
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == onnx.AttributeProto.GRAPH:
                    graphs.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(a.graphs)


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in _subgraph_tensors(model.graph)
            if t.data_location == TensorProto.EXTERNAL]


def _load_external_data(model: onnx.ModelProto, path: Path, limit: tuple[int, str]) -> None:
    """Load external tensor data, refusing any file outside the model's directory and any
    tensor whose declared type, offset and length do not match its file (checked before a
    byte is read: a tensor never reads more than its shape needs)."""
    base = path.parent.resolve()
    for t in _external_tensors(model):
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(base):
            raise KilnError(f"tensor {t.name!r} of {path} keeps its data at {location!r}, "
                            "outside the model's directory",
                            hint="keep external data files next to the .onnx file")
        if not target.is_file():
            raise KilnError(f"tensor {t.name!r} of {path}: external data file {location!r} "
                            "does not exist", hint="copy it next to the .onnx file")
        what = f"tensor {t.name!r} of {path}"
        nbytes = _tensor_nbytes(t, what, limit)
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise KilnError(f"{what}: external data offset {info.get('offset')!r} or length "
                            f"{info.get('length')!r} is not a number", hint=_CORRUPT_HINT
                            ) from None
        size = target.stat().st_size
        # Without a length the data runs to the end of the file (ONNX's rule).
        end = size if length is None else offset + length
        if offset < 0 or end - offset != nbytes or end > size:
            raise KilnError(
                f"{what} is {_elem_name(t.data_type)}{list(t.dims)} ({nbytes} bytes), but "
                f"its external data is {end - offset} bytes at offset {offset} of "
                f"{location!r} ({size} bytes)", hint="the model and its data file do not "
                "match: save them again together (onnx.save_model(..., "
                "save_as_external_data=True))")
    if _external_tensors(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as e:
            raise KilnError(f"cannot read the external data of {path}: {e}") from e


def _load(path_or_model: Any, limit: tuple[int, str]) -> tuple[onnx.ModelProto, str]:
    """The ModelProto (a private copy) and a name for the graph; its opsets checked before
    its external data is read."""
    if isinstance(path_or_model, onnx.ModelProto):
        _check_opsets(path_or_model)
        if _external_tensors(path_or_model):
            raise KilnError("the ONNX model's external data is not loaded",
                            hint="pass the .onnx file's path instead, so kiln loads it from "
                                 "the model's directory")
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)
        return model, path_or_model.graph.name or "onnx_model"
    if not isinstance(path_or_model, (str, os.PathLike)):
        raise KilnError(f"cannot import a {type(path_or_model).__name__} as ONNX",
                        hint="pass the path of an .onnx file or an onnx.ModelProto")
    path = Path(path_or_model)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise KilnError(f"ONNX model {str(path)!r} {what}", hint="give the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise KilnError(f"cannot parse {str(path)!r} as an ONNX model: {type(e).__name__}: {e}",
                        hint="check that the file is a complete .onnx file") from e
    _check_opsets(model)
    _load_external_data(model, path, limit)
    return model, path.stem


def _static_dims(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """The static shape of a value info, or None when some dim (or the rank) is unknown."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def _describe_dims(vi: onnx.ValueInfoProto) -> str:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return "unknown rank"
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else
                           (d.dim_param or "?") for d in tt.shape.dim) + "]"


def _fix_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None,
                      inputs: Sequence[onnx.ValueInfoProto]) -> None:
    """Write ``input_shapes`` into the model's inputs; every input must end up static."""
    input_shapes = dict(input_shapes or {})
    names = [i.name for i in inputs]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise KilnError(f"input_shapes names {unknown}, which are not inputs of the model",
                        hint=f"the model's inputs are {names}")
    for vi in inputs:
        if vi.name in input_shapes:
            shape = tuple(int(d) for d in input_shapes[vi.name])
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                dims = list(tt.shape.dim)
                if len(dims) != len(shape) or any(
                        d.HasField("dim_value") and d.dim_value != s for d, s in zip(dims, shape)):
                    raise KilnError(f"input_shapes gives {list(shape)} for input {vi.name!r}, "
                                    f"whose shape is {_describe_dims(vi)}",
                                    hint="fix only the dynamic dims, keep the others")
            if any(s < 0 for s in shape):
                raise KilnError(f"input_shapes gives a negative size for input {vi.name!r}")
            tt.shape.Clear()
            for s in shape:
                tt.shape.dim.add().dim_value = s
        if _static_dims(vi) is None:
            raise KilnError(f"input {vi.name!r} has a dynamic shape {_describe_dims(vi)}",
                            hint="kiln compiles static shapes: pass import_onnx(..., "
                                 f"input_shapes={{{vi.name!r}: (...)}}) with every size")


# Attributes whose default ONNX's shape inference gets wrong when a node leaves them out:
# MeanVarianceNormalization's function body (from opset 13) reads axes into a Constant, left
# without a value, so inference fails; STFT's inference takes onesided as 0 where the spec's
# default (and the reference's output) is 1. Writing the default in changes no meaning.
_DEFAULTS_INFERENCE_NEEDS = {"MeanVarianceNormalization": ("axes", [0, 2, 3]),
                             "STFT": ("onesided", 1)}


def _spell_out_defaults(model: onnx.ModelProto) -> None:
    """Write ``_DEFAULTS_INFERENCE_NEEDS`` into the (private copy of the) model's nodes."""
    for node in model.graph.node:
        default = _DEFAULTS_INFERENCE_NEEDS.get(node.op_type)
        if default and node.domain in _DEFAULT_DOMAINS and all(
                a.name != default[0] for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute(*default))


def _check_and_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise KilnError(f"the ONNX model is not valid: {e}",
                        hint="re-export it, or check it with onnx.checker.check_model") from e
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as e:
        raise KilnError(f"ONNX shape inference failed: {e}",
                        hint="check the model's input shapes (input_shapes=) and types") from e


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in _DEFAULT_DOMAINS:
            return int(o.version)
    raise KilnError("the ONNX model imports no default-domain opset",
                    hint="kiln imports models of the standard ONNX operator set")


def _check_opsets(model: onnx.ModelProto) -> None:
    """Refuse a node of another domain than the default one (custom and contrib ops: kiln
    reads the standard operator set only) and a default-domain opset outside
    ``MIN_OPSET..MAX_OPSET``. A model that names no default-domain opset is left to the
    checker (it is not a valid model, or has no standard op, which the import refuses)."""
    for node in model.graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            name = _node_name(node)
            raise UnsupportedOpError(
                f"op {node.op_type} of domain {node.domain!r}: kiln reads the default ONNX "
                f"domain only (opsets {MIN_OPSET} to {MAX_OPSET})", node=name,
                op=node.op_type, source=f"onnx:{name}",
                hint="export without custom or contrib ops (an ONNX Runtime-optimized model "
                     "has them: import the model as exported, before optimization)")
    opset = next((int(o.version) for o in model.opset_import if o.domain in _DEFAULT_DOMAINS),
                 None)
    if opset is not None and opset < MIN_OPSET:
        raise KilnError(
            f"the ONNX model uses opset {opset}; kiln reads opsets {MIN_OPSET} to {MAX_OPSET}",
            hint="convert it first: onnx.version_converter.convert_version(model, 17), or "
                 "re-export it with a newer opset (torch.onnx.export(..., opset_version=17))")
    if opset is not None and HANDLED_OPSET < opset <= MAX_OPSET:
        _check_newer_definitions(model, opset)
    if opset is not None and opset > MAX_OPSET:
        raise KilnError(
            f"the ONNX model uses opset {opset}; kiln reads opsets {MIN_OPSET} to {MAX_OPSET} "
            f"(the newest this onnx {onnx.__version__} knows)",
            hint="upgrade the onnx package, or convert the model down: "
                 f"onnx.version_converter.convert_version(model, {MAX_OPSET})")


def _attr_default(schema: Any, name: str) -> bytes | None:
    attr = schema.attributes.get(name)
    if attr is None or attr.required:
        return None
    return attr.default_value.SerializeToString()


def _check_newer_definitions(model: onnx.ModelProto, opset: int) -> None:
    """Refuse a node whose op was redefined after ``HANDLED_OPSET`` in a way that touches it:
    an attribute the older definition lacks set to other than its default (or an attribute of
    another type), an attribute left at a default that changed, or more inputs than the older
    definition takes."""
    cache: dict[str, tuple[Any, Any] | None] = {}
    for node in model.graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        if node.op_type not in cache:
            try:
                new = onnx.defs.get_schema(node.op_type, opset)
                old = onnx.defs.get_schema(node.op_type, HANDLED_OPSET)
            except onnx.defs.SchemaError:
                cache[node.op_type] = None   # an op kiln does not know: refused later
                continue
            cache[node.op_type] = (old, new) if new.since_version > HANDLED_OPSET else None
        pair = cache[node.op_type]
        if pair is None:
            continue
        old, new = pair
        given = {a.name: a for a in node.attribute}
        # ONNX adds attributes whose default keeps the older meaning: one left out, or set to
        # that default, reads as before; any other value of it does not.
        problems = [f"attribute {n}" for n, a in given.items()
                    if (n not in old.attributes and a.SerializeToString()
                        != (_attr_default(new, n) or b""))
                    or (n in old.attributes and old.attributes[n].type != a.type)]
        problems += [f"the default of {n}" for n in old.attributes
                     if n not in given and _attr_default(new, n) != _attr_default(old, n)]
        if len(node.input) > old.max_input:
            problems.append(f"input {old.max_input + 1}")
        if problems:
            name = _node_name(node)
            raise UnsupportedOpError(
                f"{node.op_type} was redefined in opset {new.since_version}, and this node "
                f"uses what kiln's importer (written for opset {HANDLED_OPSET}) does not read: "
                f"{', '.join(problems)}", node=name, op=node.op_type, source=f"onnx:{name}",
                hint=f"export with opset {HANDLED_OPSET} (torch.onnx.export(..., "
                     f"opset_version={HANDLED_OPSET})) or convert: "
                     f"onnx.version_converter.convert_version(model, {HANDLED_OPSET})")


# ---- the import ------------------------------------------------------------------------------
class _OnnxImporter:
    def __init__(self, model: onnx.ModelProto, name: str, limit: tuple[int, str]) -> None:
        self.model = model
        self.graph = model.graph
        self.b = GraphBuilder(sanitize_name(name))
        self.ctx = ImportContext(self.b, _default_opset(model), limit)
        self.values = self.ctx.values
        # What ONNX shape inference says each value is, to check each node's kiln types.
        self.expected: dict[str, onnx.ValueInfoProto] = {
            vi.name: vi for vi in [*self.graph.value_info, *self.graph.output]}
        self.used = {i for n in self.graph.node for i in n.input} | {
            o.name for o in self.graph.output}

    def run(self) -> Graph:
        g = self.graph
        if g.sparse_initializer:
            raise KilnError("the ONNX model has sparse initializers",
                            hint="store the weights as dense tensors")
        self._check_value_sizes()
        for vi in g.output:
            if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
                # kiln reads DOUBLE constants and casts as f32; an output must keep its type.
                raise KilnError(f"graph output {vi.name!r} is DOUBLE, and kiln computes f32",
                                hint="export the model with FLOAT outputs")
        for init in g.initializer:
            what = f"initializer {init.name!r}"
            array = kiln_array(_tensor_array(init, what, self.ctx.limit), what)
            self.values[init.name] = self.b.constant(array, sanitize_name(init.name))
        for vi in g.input:
            if vi.name in self.values:  # an initializer listed as an input (IR < 4)
                continue
            dtype = _dtype_of_elem(vi.type.tensor_type.elem_type, f"input {vi.name!r}")
            self.values[vi.name] = self.b.input(sanitize_name(vi.name),
                                                TensorType(_static_dims(vi), dtype))
        for node in g.node:
            self._import_node(node)
        for vi in g.output:
            self.b.output(self.values[vi.name])
        graph = self.b.graph
        read = {i for n in graph.nodes for i in n.inputs} | set(graph.outputs)
        for name in [c for c in graph.constants if c not in read]:
            del graph.constants[name]
        return self.b.build()

    def _check_value_sizes(self) -> None:
        """Refuse, before any array is made, a graph input or node output whose static shape
        (as declared, or as ONNX shape inference found it) no array here can have."""
        g = self.graph
        producers = {out: node for node in g.node for out in node.output}
        for vi in [*g.input, *g.value_info, *g.output]:
            dims = _static_dims(vi)
            elem = vi.type.tensor_type.elem_type
            problem = None if dims is None else _size_problem(dims, _elem_itemsize(elem),
                                                              self.ctx.limit)
            if problem is None:
                continue
            what = f"{_elem_name(elem)}{list(dims)}"
            node = producers.get(vi.name)
            if node is None:
                raise KilnError(f"graph input {vi.name!r} is {what}, which {problem}",
                                hint=_SIZE_HINT)
            self.ctx.begin(node)
            raise self.ctx.error(f"{node.op_type} would make {vi.name!r} a {what} tensor, "
                                 f"which {problem}", hint=_SIZE_HINT)

    def _import_node(self, node: onnx.NodeProto) -> None:
        ctx = self.ctx
        ctx.begin(node)
        fn = ONNX_IMPORT.get(node.op_type)
        if fn is None:
            self._import_function(node)
            return
        graph = self.b.graph
        start = len(graph.nodes)
        # Operands all known while importing (or too large to be): fold what fits.
        static = all(ctx.const_value(v) is not None or v in ctx.deferred
                     for v in ctx.inputs())
        try:
            results = list(fn(ctx, node))
        except KilnError as e:
            raise self._locate(e) from None
        for n in graph.nodes[start:]:  # every kiln value must fit before any is computed
            for out in n.outputs:
                t = graph.types[out]
                problem = _size_problem(t.shape, t.dtype.itemsize, ctx.limit)
                if problem is not None:
                    raise ctx.error(f"{node.op_type} would make a {t} tensor, which {problem}",
                                    hint=_SIZE_HINT)
        if static:
            results = self._fold(start, results)
        self._name_outputs(start, results)
        if static:  # what is left of this node's kiln nodes was too large to fold
            ctx.deferred.update(o for n in graph.nodes[start:] for o in n.outputs)
        for k, out in enumerate(node.output):
            if not out:
                continue
            if k >= len(results):
                if out in self.used:
                    raise ctx.unsupported(f"output {k} ({out!r}) of {node.op_type}",
                                          hint="kiln computes this op's first output(s) only")
                continue
            self.values[out] = results[k]
            self._check_type(out, results[k])

    def _import_function(self, node: onnx.NodeProto) -> None:
        """Import an op kiln has no importer for through the ONNX function defining it (see
        ``onnx_import_extra.function_body``), its nodes read at the body's opset."""
        ctx = self.ctx
        expanded = onnx_import_extra.function_body(ctx, node)
        if expanded is None:
            raise ctx.unsupported(f"kiln cannot import ONNX op {node.op_type}")
        body, opset = expanded
        self.used.update(v for inner in body for v in inner.input)
        outer = ctx.opset
        ctx.opset = opset
        try:
            for inner in body:
                self._import_node(inner)
        finally:
            ctx.opset = outer
        for out in node.output:
            if out and out in self.used and out not in self.values:
                ctx.begin(node)
                raise ctx.unsupported(f"output {out!r} of {node.op_type}, which its ONNX "
                                      "function does not compute")

    def _locate(self, e: KilnError) -> KilnError:
        """Name the ONNX node in an error raised while importing it."""
        if e.source is None or e.node is None:
            e.source = e.source or self.ctx.source
            e.node = e.node or self.ctx.name
            e.op = e.op or self.ctx.node.op_type
            e.args = (e._format(),)
        return e

    def _fold(self, start: int, results: list[str]) -> list[str]:
        """Evaluate this node's kiln nodes whose operands are constants and whose results fit
        ``FOLD_LIMIT_BYTES`` / ``FOLD_LIMIT_FLOPS``, and replace them by constants; the others
        stay nodes (reading the folded values as constants), computed at run time."""
        graph = self.b.graph
        tail = graph.nodes[start:]
        if not tail:
            return results
        env = graph.constants
        computed: dict[str, np.ndarray] = {}
        kept = []
        for n in tail:
            operands = [computed.get(i, env.get(i)) for i in n.inputs]
            if any(a is None for a in operands) or not self._small_enough(n):
                kept.append(n)
                continue
            try:
                arrays = run_reference(n.op, operands, n.attrs)
            except KilnError as e:
                raise self._locate(e) from None
            for out, a in zip(n.outputs, arrays):
                computed[out] = np.asarray(a).astype(graph.types[out].dtype.numpy)
        del graph.nodes[start:]
        folded = {v: self.ctx.constant(computed[v]) for v in dict.fromkeys(results)
                  if v in computed}
        for n in kept:
            for v in n.inputs:
                if v in computed and v not in folded:  # keeps its name, now as a constant
                    del graph.types[v]
                    folded[v] = self.b.constant(computed[v], v)
            graph.nodes.append(n.with_(inputs=tuple(folded.get(v, v) for v in n.inputs)))
        return [folded.get(v, v) for v in results]

    def _small_enough(self, n: Node) -> bool:
        """Whether folding kiln node ``n`` stays within the fold limits."""
        graph = self.b.graph
        outs = [graph.types[o] for o in n.outputs]
        if sum(t.nbytes for t in outs) > FOLD_LIMIT_BYTES:
            return False
        ins = [graph.types[i] for i in n.inputs]
        return get_op(n.op).flops(ins, outs, dict(n.attrs)) <= FOLD_LIMIT_FLOPS

    def _name_outputs(self, start: int, results: list[str]) -> None:
        """Give the kiln values made for this node's ONNX outputs the ONNX names."""
        graph = self.b.graph
        made = {o for n in graph.nodes[start:] for o in n.outputs}
        renames: dict[str, str] = {}
        for onnx_name, v in zip(self.ctx.node.output, results):
            if v in made and v not in renames:
                t = graph.types.pop(v)
                renames[v] = graph.fresh_name(sanitize_name(onnx_name))
                graph.types[renames[v]] = t
        if renames:
            graph.nodes[start:] = [
                n.with_(inputs=tuple(renames.get(i, i) for i in n.inputs),
                        outputs=tuple(renames.get(o, o) for o in n.outputs))
                for n in graph.nodes[start:]]
            results[:] = [renames.get(v, v) for v in results]

    def _check_type(self, onnx_name: str, value: str) -> None:
        vi = self.expected.get(onnx_name)
        if vi is None:
            return
        shape = _static_dims(vi)
        elem = vi.type.tensor_type.elem_type
        if shape is None or not elem:
            return
        dtype = DType.f32 if elem == TensorProto.DOUBLE else _ELEM_TO_DTYPE.get(elem)
        got = self.b.type_of(value)
        if dtype is not None and got != TensorType(shape, dtype):
            raise self.ctx.error(
                f"internal: kiln made {got} for {onnx_name!r} where ONNX infers "
                f"{TensorType(shape, dtype)}",
                hint="this is a kiln bug; please report it with this message")


def import_onnx(path_or_model: str | os.PathLike | onnx.ModelProto, *,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> Graph:
    """Import an ONNX model (a file path or an ``onnx.ModelProto``) as a kiln Graph.

    The model is checked with ``onnx.checker.check_model`` and typed by ONNX shape inference.
    Every graph input needs a static shape; ``input_shapes`` (ONNX input name -> shape) fixes
    the dynamic ones. Initializers become constants (float64 as float32); external data is
    read only from files inside the model's directory. Graph inputs and outputs keep their
    ONNX order and (sanitized) names.

    Nothing is allocated by the file's say-so alone (see the module docstring): constants the
    import computes are capped at ``FOLD_LIMIT_BYTES`` (larger ones stay kiln ops), and a
    tensor larger than ``tensor_byte_limit()`` is refused before it is made.

    Raises:
        KilnError: for a missing or unreadable file, an invalid model, an opset outside
            ``MIN_OPSET..MAX_OPSET``, tensor data that does not match its shape, a tensor too
            large for this machine (naming the node), a dynamic input shape without
            ``input_shapes``, or an operand that must be constant and is not;
            UnsupportedOpError naming the ONNX node and op type for an op kiln cannot import
            (or a node of another domain than the default one).
    """
    limit = tensor_byte_limit()
    model, name = _load(path_or_model, limit)
    inputs = [vi for vi in model.graph.input
              if vi.name not in {i.name for i in model.graph.initializer}]
    _fix_input_shapes(model, input_shapes, inputs)
    _spell_out_defaults(model)
    model = _check_and_infer(model)
    return _OnnxImporter(model, name, limit).run()


# The indexing ops' importers (onnx_import_index) and the ops imported as decompositions into
# existing kiln ops (onnx_import_extra, onnx_import_more) add themselves to ONNX_IMPORT.
# So do LSTM and GRU (onnx_import_recurrent).
from kiln.frontend import (  # noqa: E402,F401
    onnx_import_extra,
    onnx_import_index,
    onnx_import_more,
    onnx_import_recurrent,
)
