"""The kernel IR: loop nests over flat buffers.

A Kernel has buffer parameters (row-major arrays addressed by flat element index) and a body of
statements: ``For`` loops (serial, parallel, vectorized or unrolled), ``Store``s, local
variables (``Decl``/``Assign``) and ``If``s. Expressions are scalar or vector (``lanes`` > 1):
a vector ``Load`` reads ``lanes`` consecutive elements, ``Broadcast`` splats a scalar, and
``ReduceLanes`` folds a vector to a scalar. Schedules (tiling, vectorization, unrolling,
parallelization) are rewrites of this IR; backends render it (LLVM for the CPU, Numba for CUDA)
and ``run_kernel`` interprets it, so lowering is tested apart from code generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from kiln.ir.errors import InternalError

INDEX = "i64"
"""The dtype of loop variables and element indices."""

_NP = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "i8": np.int8, "u8": np.uint8,
       "i32": np.int32, "i64": np.int64, "bool": np.bool_}


def np_dtype(dtype: str) -> np.dtype:
    return np.dtype(_NP[dtype])


def is_float(dtype: str) -> bool:
    return dtype in ("f32", "f16", "f64")


# ---- expressions -----------------------------------------------------------------------------
class Expr:
    """Base of expressions. Arithmetic operators build ``Binary`` nodes."""

    dtype: str
    lanes: int

    def __add__(self, o): return Binary("add", self, as_expr(o, self.dtype))
    def __radd__(self, o): return Binary("add", as_expr(o, self.dtype), self)
    def __sub__(self, o): return Binary("sub", self, as_expr(o, self.dtype))
    def __rsub__(self, o): return Binary("sub", as_expr(o, self.dtype), self)
    def __mul__(self, o): return Binary("mul", self, as_expr(o, self.dtype))
    def __rmul__(self, o): return Binary("mul", as_expr(o, self.dtype), self)
    def __truediv__(self, o): return Binary("div", self, as_expr(o, self.dtype))
    def __floordiv__(self, o): return Binary("div", self, as_expr(o, self.dtype))
    def __mod__(self, o): return Binary("mod", self, as_expr(o, self.dtype))
    def __neg__(self): return Unary("neg", self)


@dataclass(frozen=True, eq=True)
class Const(Expr):
    value: float | int | bool
    dtype: str = "f32"
    lanes: int = 1


@dataclass(frozen=True, eq=True)
class Var(Expr):
    """A loop variable or a local variable."""

    name: str
    dtype: str = INDEX
    lanes: int = 1


@dataclass(frozen=True, eq=True)
class Load(Expr):
    """``buffer[index : index + lanes * stride : stride]`` (``stride`` > 1: every stride-th
    element, for vector loads of strided data)."""

    buffer: str
    index: Expr
    dtype: str = "f32"
    lanes: int = 1
    stride: int = 1


BINARY_OPS = ("add", "sub", "mul", "div", "mod", "max", "min", "pow", "lt", "le", "gt", "ge",
              "eq", "ne", "and", "or")
COMPARE_OPS = ("lt", "le", "gt", "ge", "eq", "ne")
UNARY_OPS = ("neg", "abs", "exp", "log", "sqrt", "rsqrt", "tanh", "erf", "not", "floor",
             "trunc", "round", "sin", "cos", "atan")
"""Unary functions; ``round`` rounds half to even (like np.rint)."""


@dataclass(frozen=True, eq=True)
class Binary(Expr):
    op: str
    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        if self.op not in BINARY_OPS:
            raise InternalError(f"unknown binary op {self.op!r} in kernel IR")
        lanes = self.a.lanes
        if lanes != self.b.lanes:
            raise InternalError(f"kernel IR {self.op}: lanes differ ({self.a.lanes} vs "
                            f"{self.b.lanes})")
        # Stored, not properties: index arithmetic nests deeply, and a property asked the
        # whole chain of left operands on every question (a large part of lowering's time).
        # Not fields: equality, hashing and the text are the operator's and operands' alone.
        object.__setattr__(self, "dtype", "bool" if self.op in COMPARE_OPS else self.a.dtype)
        object.__setattr__(self, "lanes", lanes)


@dataclass(frozen=True, eq=True)
class Unary(Expr):
    op: str
    x: Expr

    def __post_init__(self) -> None:
        if self.op not in UNARY_OPS:
            raise InternalError(f"unknown unary op {self.op!r} in kernel IR")

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.x.dtype

    @property
    def lanes(self) -> int:  # type: ignore[override]
        return self.x.lanes


@dataclass(frozen=True, eq=True)
class Select(Expr):
    cond: Expr
    a: Expr
    b: Expr

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.a.dtype

    @property
    def lanes(self) -> int:  # type: ignore[override]
        return self.a.lanes


@dataclass(frozen=True, eq=True)
class Cast(Expr):
    x: Expr
    dtype: str = "f32"

    @property
    def lanes(self) -> int:  # type: ignore[override]
        return self.x.lanes


@dataclass(frozen=True, eq=True)
class Broadcast(Expr):
    x: Expr
    lanes: int = 1

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.x.dtype


@dataclass(frozen=True, eq=True)
class ReduceLanes(Expr):
    """Fold a vector to a scalar with ``op`` (add, max, min)."""

    op: str
    x: Expr

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.x.dtype

    @property
    def lanes(self) -> int:  # type: ignore[override]
        return 1


@dataclass(frozen=True, eq=True)
class DotAdd4(Expr):
    """``acc + sum of 4 products``: lane l of the i32 vector ``acc`` gains
    ``u[4l + j] * s[4l + j]`` for j < 4, with ``u`` unsigned and ``s`` signed 8-bit
    (the int8 dot-product instructions: AVX-512 VNNI vpdpbusd, CUDA dp4a). An operand with
    only 4 lanes is one group used by every lane (a broadcast 32-bit word).

    ``s_max`` is a promise of the lowering, made from the weight values: every element of
    ``s`` lies in [-s_max, s_max]. At 64 or less, no sum of two u8 x s8 products leaves
    int16, so code generators may use pmaddubsw (whose pair sums saturate at 16 bits)."""

    acc: Expr
    u: Expr
    s: Expr
    s_max: int = 128

    def __post_init__(self) -> None:
        n = self.acc.lanes
        if self.acc.dtype != "i32" or self.u.dtype != "u8" or self.s.dtype != "i8":
            raise InternalError(f"kernel IR dot_add4 wants i32 += u8 * i8, got {self.acc.dtype}, "
                            f"{self.u.dtype}, {self.s.dtype}")
        if self.u.lanes not in (4, 4 * n) or self.s.lanes not in (4, 4 * n):
            raise InternalError(f"kernel IR dot_add4: {n} accumulator lanes want 4 or {4 * n} "
                            f"byte lanes, got {self.u.lanes} and {self.s.lanes}")

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return "i32"

    @property
    def lanes(self) -> int:  # type: ignore[override]
        return self.acc.lanes


def as_expr(v: Expr | float | int | bool, dtype: str = INDEX) -> Expr:
    """Wrap a Python number as a Const of ``dtype`` (index for ints by default)."""
    if isinstance(v, Expr):
        return v
    if isinstance(v, bool):
        return Const(v, "bool")
    if isinstance(v, (int, np.integer)):
        return Const(int(v), dtype if dtype != "bool" else INDEX)
    return Const(float(v), dtype if is_float(dtype) else "f32")


def reduction_identity(op: str, dtype: str) -> Const:
    """The neutral start value of an add / max / min reduction in ``dtype``."""
    if is_float(dtype):
        return Const({"add": 0.0, "max": float("-inf"), "min": float("inf")}[op], dtype)
    info = np.iinfo(np_dtype(dtype))
    return Const({"add": 0, "max": int(info.min), "min": int(info.max)}[op], dtype)


def maximum(a: Expr, b: Expr | float) -> Expr:
    return Binary("max", a, as_expr(b, a.dtype))


def minimum(a: Expr, b: Expr | float) -> Expr:
    return Binary("min", a, as_expr(b, a.dtype))


def call(op: str, x: Expr) -> Expr:
    return Unary(op, x)


def cmp(op: str, a: Expr, b: Expr | float) -> Expr:
    return Binary(op, a, as_expr(b, a.dtype))


# ---- statements ------------------------------------------------------------------------------
LOOP_KINDS = ("serial", "parallel", "vectorized", "unrolled", "team")
"""``team``: a serial loop that every thread of one parallel region runs (a recurrent layer's
time steps): each of its body's top-level ``parallel`` loops is shared out among the threads
and ends in a barrier; its other top-level statements run on one thread, then a barrier (a
Decl or Assign of a local runs on every thread). One region for all the steps, where a
``parallel`` loop inside a serial one opens a region per step. Serial anywhere else (inside a
parallel loop, on one thread, in the interpreter, on the GPU)."""


@dataclass(frozen=True)
class For:
    """``for var in range(start, start + extent, step)``; ``extent`` counts iterations*step."""

    var: Var
    start: Expr
    extent: Expr
    body: tuple[Stmt, ...]
    kind: str = "serial"
    step: int = 1

    def __post_init__(self) -> None:
        if self.kind not in LOOP_KINDS:
            raise InternalError(f"unknown loop kind {self.kind!r}")
        object.__setattr__(self, "body", tuple(self.body))


@dataclass(frozen=True)
class Store:
    buffer: str
    index: Expr
    value: Expr


@dataclass(frozen=True)
class Decl:
    """Declare local ``var`` with an initial value (a register in the backends)."""

    var: Var
    init: Expr


@dataclass(frozen=True)
class Assign:
    var: Var
    value: Expr


@dataclass(frozen=True)
class If:
    cond: Expr
    then: tuple[Stmt, ...]
    orelse: tuple[Stmt, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "then", tuple(self.then))
        object.__setattr__(self, "orelse", tuple(self.orelse))


Stmt = For | Store | Decl | Assign | If


@dataclass(frozen=True)
class Buffer:
    """A flat row-major array: a kernel parameter or a kernel-local scratch array."""

    name: str
    dtype: str
    size: int

    @property
    def nbytes(self) -> int:
        return self.size * np_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Kernel:
    """A loop nest over buffer parameters. ``scratch`` buffers are private to the kernel (one per
    thread when they are declared inside a parallel loop)."""

    name: str
    params: tuple[Buffer, ...]
    body: tuple[Stmt, ...]
    scratch: tuple[Buffer, ...] = ()
    flops: int = 0
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "body", tuple(self.body))
        object.__setattr__(self, "scratch", tuple(self.scratch))

    def with_body(self, body: Sequence[Stmt]) -> Kernel:
        return replace(self, body=tuple(body))

    def buffer(self, name: str) -> Buffer:
        for b in self.params + self.scratch:
            if b.name == name:
                return b
        raise InternalError(f"kernel {self.name} has no buffer {name}")

    def __str__(self) -> str:
        return print_kernel(self)


# ---- traversal -------------------------------------------------------------------------------
def map_expr(e: Expr, fn: Callable[[Expr], Expr | None]) -> Expr:
    """Rebuild ``e`` bottom-up; ``fn`` may return a replacement for a node (or None).

    A node whose operands all come back unchanged is kept, not rebuilt (expressions are
    immutable): most rewrites touch few nodes, and rebuilding every node was most of the
    time of lowering and scheduling a large model. (Exact classes: kernel-IR nodes are
    not subclassed.)"""
    t = type(e)
    if t is Binary:
        a, b = map_expr(e.a, fn), map_expr(e.b, fn)
        if a is not e.a or b is not e.b:
            e = Binary(e.op, a, b)
    elif t is Load:
        index = map_expr(e.index, fn)
        if index is not e.index:
            e = replace(e, index=index)
    elif t is Unary:
        x = map_expr(e.x, fn)
        if x is not e.x:
            e = Unary(e.op, x)
    elif t is Cast:
        x = map_expr(e.x, fn)
        if x is not e.x:
            e = Cast(x, e.dtype)
    elif t is Broadcast:
        x = map_expr(e.x, fn)
        if x is not e.x:
            e = Broadcast(x, e.lanes)
    elif t is Select:
        c, a, b = map_expr(e.cond, fn), map_expr(e.a, fn), map_expr(e.b, fn)
        if c is not e.cond or a is not e.a or b is not e.b:
            e = Select(c, a, b)
    elif t is ReduceLanes:
        x = map_expr(e.x, fn)
        if x is not e.x:
            e = ReduceLanes(e.op, x)
    elif t is DotAdd4:
        acc, u, s = map_expr(e.acc, fn), map_expr(e.u, fn), map_expr(e.s, fn)
        if acc is not e.acc or u is not e.u or s is not e.s:
            e = DotAdd4(acc, u, s, e.s_max)
    out = fn(e)
    return e if out is None else out


def substitute(e: Expr, mapping: dict[str, Expr]) -> Expr:
    """Replace variables by name."""
    return map_expr(e, lambda x: mapping.get(x.name) if isinstance(x, Var) else None)


def map_stmts(stmts: Sequence[Stmt], fn: Callable[[Expr], Expr | None]) -> tuple[Stmt, ...]:
    """Apply ``map_expr(., fn)`` to every expression in a statement list (statements that
    come back unchanged are kept, as map_expr keeps expressions)."""
    out = []
    for s in stmts:
        t = type(s)
        if t is For:
            start, extent = map_expr(s.start, fn), map_expr(s.extent, fn)
            body = map_stmts(s.body, fn)
            if start is not s.start or extent is not s.extent or _changed(body, s.body):
                s = replace(s, start=start, extent=extent, body=body)
        elif t is Store:
            index, value = map_expr(s.index, fn), map_expr(s.value, fn)
            if index is not s.index or value is not s.value:
                s = Store(s.buffer, index, value)
        elif t is Decl:
            init = map_expr(s.init, fn)
            if init is not s.init:
                s = Decl(s.var, init)
        elif t is Assign:
            value = map_expr(s.value, fn)
            if value is not s.value:
                s = Assign(s.var, value)
        elif t is If:
            cond = map_expr(s.cond, fn)
            then, orelse = map_stmts(s.then, fn), map_stmts(s.orelse, fn)
            if cond is not s.cond or _changed(then, s.then) or _changed(orelse, s.orelse):
                s = If(cond, then, orelse)
        else:
            raise InternalError(f"unknown statement {type(s).__name__}")
        out.append(s)
    return tuple(out)


def _changed(new: tuple[Stmt, ...], old: Sequence[Stmt]) -> bool:
    return len(new) != len(old) or any(a is not b for a, b in zip(new, old))


def walk_stmts(stmts: Sequence[Stmt]) -> Iterator[Stmt]:
    """Every statement, pre-order."""
    for s in stmts:
        yield s
        if isinstance(s, For):
            yield from walk_stmts(s.body)
        elif isinstance(s, If):
            yield from walk_stmts(s.then)
            yield from walk_stmts(s.orelse)


def walk_expr(e: Expr) -> Iterator[Expr]:
    """Every sub-expression, pre-order."""
    # A stack, not nested generators: those cost a frame per level for every node yielded.
    stack = [e]
    while stack:
        x = stack.pop()
        yield x
        stack.extend(reversed(expr_children(x)))


def expr_children(e: Expr) -> tuple[Expr, ...]:
    """The operands of an expression (its index for a load)."""
    # Exact-type tests, most frequent first: this runs for every node of every walk.
    t = type(e)
    if t is Binary:
        return (e.a, e.b)
    if t is Var or t is Const:
        return ()
    if t is Load:
        return (e.index,)
    if t is Unary or t is Cast or t is Broadcast or t is ReduceLanes:
        return (e.x,)
    if t is Select:
        return (e.cond, e.a, e.b)
    if t is DotAdd4:
        return (e.acc, e.u, e.s)
    return ()


def stmt_exprs(s: Stmt) -> tuple[Expr, ...]:
    """The expressions directly held by a statement (not those of nested statements)."""
    if isinstance(s, For):
        return (s.start, s.extent)
    if isinstance(s, Store):
        return (s.index, s.value)
    if isinstance(s, Decl):
        return (s.init,)
    if isinstance(s, Assign):
        return (s.value,)
    if isinstance(s, If):
        return (s.cond,)
    return ()


def affine_coef(e: Expr, var: str) -> int | None:
    """The integer coefficient of variable ``var`` in ``e``, or None when ``e`` is not affine
    in it (a product of two terms that both hold it, a division, a select...)."""
    if not any(isinstance(x, Var) and x.name == var for x in walk_expr(e)):
        return 0
    if isinstance(e, Var):
        return 1
    if isinstance(e, Binary) and e.op in ("add", "sub"):
        ca, cb = affine_coef(e.a, var), affine_coef(e.b, var)
        if ca is None or cb is None:
            return None
        return ca + cb if e.op == "add" else ca - cb
    if isinstance(e, Binary) and e.op == "mul":
        if isinstance(e.a, Const):
            c = affine_coef(e.b, var)
            return None if c is None else int(e.a.value) * c
        if isinstance(e.b, Const):
            c = affine_coef(e.a, var)
            return None if c is None else int(e.b.value) * c
    return None


# ---- simplification of index arithmetic ------------------------------------------------------
def fold_index(x: Expr) -> Expr | None:
    """One step of ``simplify`` at the root of ``x`` (its operands already simplified): the
    folded expression, or None when there is nothing to fold. ``map_expr(e, fold_index)``
    simplifies a whole tree in one bottom-up walk."""
    # Only scalar index arithmetic folds: anything else leaves at once.
    if type(x) is not Binary or x.dtype != INDEX or x.lanes != 1:
        return None
    a, b = x.a, x.b
    if isinstance(a, Const) and isinstance(b, Const):
        va, vb = int(a.value), int(b.value)
        ops = {"add": va + vb, "sub": va - vb, "mul": va * vb}
        if x.op in ops:
            return Const(ops[x.op], INDEX)
        if x.op == "div" and vb:
            return Const(va // vb, INDEX)
        if x.op == "mod" and vb:
            return Const(va % vb, INDEX)
    if x.op == "add":
        if _is_const(a, 0):
            return b
        if _is_const(b, 0):
            return a
    if x.op == "sub" and _is_const(b, 0):
        return a
    if x.op == "mul":
        if _is_const(a, 1):
            return b
        if _is_const(b, 1):
            return a
        if _is_const(a, 0) or _is_const(b, 0):
            return Const(0, INDEX)
    return None


def simplify(e: Expr) -> Expr:
    """Fold constant integer arithmetic and drop x*1, x+0, x*0 (index expressions mostly)."""
    return map_expr(e, fold_index)


def _is_const(e: Expr, v: int) -> bool:
    return isinstance(e, Const) and e.value == v


# ---- text form -------------------------------------------------------------------------------
_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "mod": "%", "lt": "<", "le": "<=",
            "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "and": "&&", "or": "||"}
_NO_NAMES: dict[str, str] = {}


def format_expr(e: Expr) -> str:
    """Readable text of an expression."""
    return _format_expr(e, _NO_NAMES)


def _format_expr(e: Expr, names: dict[str, str]) -> str:
    """format_expr with the buffers named in ``names`` printed as their values there."""
    t = type(e)  # exact types, most frequent first (kernel IR classes are not subclassed)
    if t is Binary:
        sym = _SYMBOLS.get(e.op)
        if sym:
            return f"({_format_expr(e.a, names)} {sym} {_format_expr(e.b, names)})"
        return f"{e.op}({_format_expr(e.a, names)}, {_format_expr(e.b, names)})"
    if t is Var:
        return e.name
    if t is Const:
        v = "true" if e.value is True else "false" if e.value is False else repr(e.value)
        s = v if e.dtype in (INDEX, "f32") else f"{e.dtype}({v})"
        return s if e.lanes == 1 else f"{s}x{e.lanes}"
    if t is Load:
        lanes = f", {e.lanes}" if e.lanes > 1 else ""
        stride = f":{e.stride}" if e.stride != 1 else ""
        return f"{names.get(e.buffer, e.buffer)}[{_format_expr(e.index, names)}{lanes}{stride}]"
    if t is Unary:
        return f"{e.op}({_format_expr(e.x, names)})"
    if t is Select:
        return (f"select({_format_expr(e.cond, names)}, {_format_expr(e.a, names)}, "
                f"{_format_expr(e.b, names)})")
    if t is Cast:
        return f"{e.dtype}({_format_expr(e.x, names)})"
    if t is Broadcast:
        return f"broadcast({_format_expr(e.x, names)}, {e.lanes})"
    if t is ReduceLanes:
        return f"reduce_{e.op}({_format_expr(e.x, names)})"
    if t is DotAdd4:
        bound = f", |s|<={e.s_max}" if e.s_max < 128 else ""
        return (f"dot_add4({_format_expr(e.acc, names)}, {_format_expr(e.u, names)}, "
                f"{_format_expr(e.s, names)}{bound})")
    raise InternalError(f"unknown expression {type(e).__name__}")


def _format_stmts(stmts: Sequence[Stmt], indent: int, out: list[str],
                  names: dict[str, str] = _NO_NAMES) -> None:
    pad = "  " * indent
    for s in stmts:
        t = type(s)
        if t is For:
            step = f" step {s.step}" if s.step != 1 else ""
            kind = "" if s.kind == "serial" else f"{s.kind} "
            out.append(f"{pad}{kind}for {s.var.name} in [{_format_expr(s.start, names)}, "
                       f"+{_format_expr(s.extent, names)}){step}:")
            _format_stmts(s.body, indent + 1, out, names)
        elif t is Store:
            lanes = f", {s.value.lanes}" if s.value.lanes > 1 else ""
            out.append(f"{pad}{names.get(s.buffer, s.buffer)}[{_format_expr(s.index, names)}"
                       f"{lanes}] = {_format_expr(s.value, names)}")
        elif t is Decl:
            lanes = f"x{s.var.lanes}" if s.var.lanes > 1 else ""
            out.append(f"{pad}{s.var.dtype}{lanes} {s.var.name} = "
                       f"{_format_expr(s.init, names)}")
        elif t is Assign:
            out.append(f"{pad}{s.var.name} = {_format_expr(s.value, names)}")
        elif t is If:
            out.append(f"{pad}if {_format_expr(s.cond, names)}:")
            _format_stmts(s.then, indent + 1, out, names)
            if s.orelse:
                out.append(f"{pad}else:")
                _format_stmts(s.orelse, indent + 1, out, names)


def print_kernel(k: Kernel) -> str:
    """The kernel as text."""
    params = ", ".join(f"{b.name}: {b.dtype}[{b.size}]" for b in k.params)
    lines = [f"kernel {k.name}({params}) {{"]
    _format_body(k, lines)
    return "\n".join(lines) + "\n"


def _format_body(k: Kernel, lines: list[str], names: dict[str, str] = _NO_NAMES) -> None:
    for b in k.scratch:
        lines.append(f"  scratch {b.name}: {b.dtype}[{b.size}]")
    _format_stmts(k.body, 1, lines, names)
    lines.append("}")


def structure_key(k: Kernel) -> str:
    """The kernel's text with its name and its parameters' names replaced by position: two
    kernels with the same key compute the same function of their buffers (identical layers of
    a network), so one compiled function serves both."""
    # Printed with the parameters renamed as it goes (buffer names appear in the text only
    # where a load or store uses them): a regular expression over the printed text, built
    # for each kernel, took longer than the printing.
    lines: list[str] = []
    _format_body(k, lines, {b.name: f"$p{i}" for i, b in enumerate(k.params)})
    sig = ", ".join(f"{b.dtype}[{b.size}]" for b in k.params)
    return f"({sig})\n" + "\n".join(lines) + "\n"


# ---- reference interpreter -------------------------------------------------------------------
_BIN = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum,
    "min": np.minimum, "pow": np.power, "lt": np.less, "le": np.less_equal,
    "gt": np.greater, "ge": np.greater_equal, "eq": np.equal, "ne": np.not_equal,
    "and": np.logical_and, "or": np.logical_or,
}


def _erf(x):
    from scipy import special

    return special.erf(x)


_UN = {
    "neg": np.negative, "abs": np.abs, "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
    "rsqrt": lambda x: 1 / np.sqrt(x), "tanh": np.tanh, "erf": _erf,
    "not": np.logical_not, "floor": np.floor, "trunc": np.trunc, "round": np.rint,
    "sin": np.sin, "cos": np.cos, "atan": np.arctan,
}


def run_kernel(k: Kernel, buffers: dict[str, np.ndarray]) -> None:
    """Interpret kernel ``k`` in place on flat NumPy ``buffers`` (a dict by parameter name).

    Slow (Python per element): meant for small shapes in tests.
    """
    mem = dict(buffers)
    for p in k.params:
        if p.name not in mem:
            raise InternalError(f"run_kernel: no array for buffer {p.name}")
        arr = mem[p.name]
        if arr.ndim != 1 or arr.size < p.size or arr.dtype != np_dtype(p.dtype):
            raise InternalError(f"run_kernel: buffer {p.name} must be flat {p.dtype}[{p.size}]")
    for s in k.scratch:
        mem[s.name] = np.zeros(s.size, np_dtype(s.dtype))
    _exec(k.body, mem, {})


def _eval(e: Expr, mem: dict, env: dict):
    if isinstance(e, Const):
        v = np_dtype(e.dtype).type(e.value)
        return np.full(e.lanes, v) if e.lanes > 1 else v
    if isinstance(e, Var):
        return env[e.name]
    if isinstance(e, Load):
        i = int(_eval(e.index, mem, env))
        buf = mem[e.buffer]
        end = i + e.stride * (e.lanes - 1) + 1
        if i < 0 or end > buf.size:
            raise InternalError(f"out-of-bounds load {e.buffer}[{i}:{end}] (size {buf.size})")
        return buf[i:end:e.stride].copy() if e.lanes > 1 else buf[i]
    if isinstance(e, Binary):
        a, b = _eval(e.a, mem, env), _eval(e.b, mem, env)
        if e.op in ("div", "mod") and e.dtype not in ("f32", "f16", "f64"):
            # Index arithmetic: C semantics on non-negative operands.
            return np.floor_divide(a, b) if e.op == "div" else np.remainder(a, b)
        if e.op == "div":
            with np.errstate(all="ignore"):
                return np.divide(a, b).astype(np_dtype(e.dtype))
        with np.errstate(all="ignore"):
            r = _BIN[e.op](a, b)
        return r if e.op in COMPARE_OPS or e.op in ("and", "or") else np.asarray(r).astype(
            np_dtype(e.dtype))[()]
    if isinstance(e, Unary):
        with np.errstate(all="ignore"):
            x = _eval(e.x, mem, env)
            return np.asarray(_UN[e.op](x)).astype(np_dtype(e.dtype))[()]
    if isinstance(e, Select):
        return np.where(_eval(e.cond, mem, env), _eval(e.a, mem, env), _eval(e.b, mem, env)
                        ).astype(np_dtype(e.dtype))[()]
    if isinstance(e, Cast):
        x = _eval(e.x, mem, env)
        if e.dtype not in ("f32", "f16", "f64", "bool") and np.asarray(x).dtype.kind == "f":
            x = np.trunc(x)
        return np.asarray(x).astype(np_dtype(e.dtype))[()]
    if isinstance(e, Broadcast):
        return np.full(e.lanes, _eval(e.x, mem, env))
    if isinstance(e, ReduceLanes):
        x = _eval(e.x, mem, env)
        fn = {"add": np.sum, "max": np.max, "min": np.min}[e.op]
        return np_dtype(e.dtype).type(fn(x))
    if isinstance(e, DotAdd4):
        acc = np.asarray(_eval(e.acc, mem, env), np.int64).reshape(-1)
        u = np.asarray(_eval(e.u, mem, env), np.int64).reshape(-1, 4)
        s = np.asarray(_eval(e.s, mem, env), np.int64).reshape(-1, 4)
        if np.abs(s).max() > e.s_max:
            raise InternalError(f"internal: a dot_add4 operand leaves its promised bound "
                            f"|s| <= {e.s_max}", hint="this is a kiln bug; please report it")
        total = acc + (u * s).sum(axis=1)
        return total.astype(np.int32) if e.lanes > 1 else np.int32(total[0])
    raise InternalError(f"unknown expression {type(e).__name__}")


def _exec(stmts: Sequence[Stmt], mem: dict, env: dict) -> None:
    for s in stmts:
        if isinstance(s, For):
            start = int(_eval(s.start, mem, env))
            stop = start + int(_eval(s.extent, mem, env))
            for i in range(start, stop, s.step):
                env[s.var.name] = np.int64(i)
                _exec(s.body, mem, env)
        elif isinstance(s, Store):
            i = int(_eval(s.index, mem, env))
            v = _eval(s.value, mem, env)
            buf = mem[s.buffer]
            n = s.value.lanes
            if i < 0 or i + n > buf.size:
                raise InternalError(f"out-of-bounds store {s.buffer}[{i}:{i + n}] "
                                f"(size {buf.size})")
            buf[i:i + n] = v
        elif isinstance(s, (Decl, Assign)):
            env[s.var.name] = _eval(s.init if isinstance(s, Decl) else s.value, mem, env)
        elif isinstance(s, If):
            _exec(s.then if bool(_eval(s.cond, mem, env)) else s.orelse, mem, env)

