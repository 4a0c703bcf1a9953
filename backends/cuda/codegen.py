"""Kernel IR -> Python source of ``numba.cuda.jit`` kernels.

Each kiln ``Kernel`` becomes one CUDA kernel per segment (see ``mapping``): a segment with
thread-bound loops is a grid-stride loop over ``cuda.grid(1)`` whose index is unflattened into
the bound loop variables; any other segment runs in thread 0 of a one-thread launch. Inner loops
stay Python ``for`` loops inside the thread.

Typing follows the kernel IR exactly, so numba never widens a value: float constants are
module-level ``f32(...)`` values, integer arithmetic narrower than 64 bits is wrapped back to
its type (numba computes it in int64), and every local keeps one type per Python name (a name
redeclared with another type gets a typed suffix). Vector expressions (``lanes`` > 1, from the
CPU schedules) are scalarized: a lane loop per vector statement, vector locals in
``cuda.local.array``, ``ReduceLanes`` folded in a loop hoisted before its statement.

Float max/min propagate NaN like NumPy's, written inline with their operands in temporaries
(hoisted before the statement, so nested ones do not repeat work); no device functions, so the
kernels compile to PTX without a driver. The source refers to a few names the runtime provides
(``cuda``, ``math``, the type constructors ``f32``..., ``_rint32``), so the same text runs on a
GPU and in Numba's CUDA simulator.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kiln.backends.cuda.mapping import BoundLoop, Segment, plan_segments
from kiln.ir import InternalError
from kiln.ir import kernel as K
from kiln.ir.kernel import (
    INDEX,
    Assign,
    Binary,
    Broadcast,
    Cast,
    Const,
    Decl,
    DotAdd4,
    Expr,
    For,
    If,
    Kernel,
    Load,
    ReduceLanes,
    Select,
    Stmt,
    Store,
    Unary,
    Var,
)

# kiln dtype -> the name of its scalar constructor in the kernels' namespace, and its numba
# signature spelling.
TYPE_NAMES = {"f32": "f32", "f16": "f16", "f64": "f64", "i8": "i8", "u8": "u8", "i32": "i32",
              "i64": "i64", "bool": "bool_"}
NUMBA_TYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i8": "int8",
               "u8": "uint8", "i32": "int32", "i64": "int64", "bool": "boolean"}
# Arithmetic in these types is computed wider by numba and must be wrapped back.
_NARROW = ("i8", "u8", "i32", "f16")

# Round half to even: libdevice's rint on a GPU, np.rint in the simulator.
RINT_NAMES = {"f32": "_rint32", "f64": "_rint64"}
NAMESPACE_NAMES = ("cuda", "math", "_INF", "_NAN", *TYPE_NAMES.values(), *RINT_NAMES.values())

_BINARY_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "lt": "<", "le": "<=", "gt": ">",
                   "ge": ">=", "eq": "==", "ne": "!="}
_MATH = {"exp": "exp", "log": "log", "sqrt": "sqrt", "tanh": "tanh", "erf": "erf",
         "floor": "floor", "trunc": "trunc", "sin": "sin", "cos": "cos", "atan": "atan"}
# numba's CUDA math has float16 versions of these only; others go through float32.
_MATH_F16 = ("exp", "log", "sqrt", "floor", "trunc")


@dataclass(frozen=True)
class Launch:
    """One CUDA kernel of a kiln kernel: its function name, its buffer parameters in argument
    order, and the iterations of its grid-stride loop (1 and ``parallel`` False: one thread).

    ``schedule`` names how the work is spread: ``grid-stride`` and ``serial`` (the generic
    mapping, whose launch size the device picks), or a schedule with a launch shape of its own
    (``tiled-gemm``, ``block-reduce``): then ``grid`` and ``block`` are fixed here and
    ``shared_bytes`` is its static shared memory per block."""

    name: str
    params: tuple[str, ...]
    work: int
    parallel: bool
    bound: tuple[str, ...]
    schedule: str = ""
    grid: tuple[int, int, int] | None = None
    block: tuple[int, int, int] | None = None
    shared_bytes: int = 0


@dataclass(frozen=True)
class KernelSource:
    """The generated module of one kiln kernel: its text and its launches, in order."""

    kernel: Kernel
    text: str
    launches: tuple[Launch, ...]


SegmentSchedule = Callable[["KernelWriter", Segment, str, list[str]], "Launch | None"]
"""A schedule for one segment: given the writer, the segment, the CUDA function name and the
output lines, it appends a whole ``@cuda.jit`` function and returns its Launch, or returns None
(appending nothing) when the segment is not of its shape."""


def render_kernel(kernel: Kernel, schedules: Sequence[SegmentSchedule] = ()) -> KernelSource:
    """Python source of the CUDA kernels that run ``kernel``. Each segment gets the first of
    ``schedules`` that takes it, else the generic grid-stride (or one-thread) mapping."""
    return KernelWriter(kernel, schedules).render()


class KernelWriter:
    """Renders one kiln kernel as CUDA kernel source: expressions and statements of the kernel
    IR as typed Python text (``expr``, ``stmts``), constants hoisted to module level, and the
    generic launch of a segment (``launch``). Segment schedules (``dense``, ``reduce``) use the
    same writer for the kernel IR they embed in their own loop structure."""

    def __init__(self, kernel: Kernel, schedules: Sequence[SegmentSchedule] = ()) -> None:
        self.kernel = kernel
        self.schedules = tuple(schedules)
        self.consts: dict[tuple[str, object], str] = {}
        self.const_lines: list[str] = []
        self.counter = 0
        self.names = _name_table(kernel)
        self.buffers = {b.name: b for b in kernel.params + kernel.scratch}
        self.pre: list[str] = []

    # ---- names -----------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"_{prefix}{self.counter}"

    def var(self, v: Var) -> str:
        return self.names[(v.name, v.dtype, v.lanes)]

    def buf(self, name: str) -> str:
        if name not in self.buffers:
            raise InternalError(f"kernel {self.kernel.name} uses buffer {name}, which is neither a "
                            "parameter nor a scratch buffer",
                            hint="this is a kiln lowering bug; please report it")
        return _ident(name)

    def const(self, value, dtype: str) -> str:
        if dtype == "bool":
            return "True" if value else "False"
        if dtype == INDEX:
            return str(int(value)) if int(value) >= 0 else f"({int(value)})"
        key = (dtype, repr(value))
        if key not in self.consts:
            name = f"_c{len(self.consts)}"
            if K.is_float(dtype):
                v = float(value)
                lit = "_NAN" if math.isnan(v) else ("_INF" if v > 0 else "-_INF") \
                    if math.isinf(v) else repr(v)
            else:
                lit = str(int(value))
            self.consts[key] = name
            self.const_lines.append(f"{name} = {TYPE_NAMES[dtype]}({lit})")
        return self.consts[key]

    # ---- expressions -----------------------------------------------------------------------
    def expr(self, e: Expr, lane: str | None = None) -> str:
        """Python text of ``e`` (lane ``lane`` of it when it is a vector). Lines that must run
        first (``ReduceLanes`` loops, max/min operands) are appended to ``self.pre``."""
        if e.lanes > 1 and lane is None and not isinstance(e, ReduceLanes):
            raise InternalError(f"kernel {self.kernel.name}: vector expression "
                            f"{K.format_expr(e)} where a scalar is needed",
                            hint="this is a kiln lowering bug; please report it")
        if isinstance(e, Const):
            return self.const(e.value, e.dtype)
        if isinstance(e, Var):
            name = self.var(e)
            return f"{name}[{lane}]" if e.lanes > 1 else name
        if isinstance(e, Load):
            index = self.expr(e.index)
            if e.lanes > 1:
                step = f" * {e.stride}" if e.stride != 1 else ""
                index = f"{index} + {lane}{step}"
            return f"{self.buf(e.buffer)}[{index}]"
        if isinstance(e, Binary):
            return self.binary(e, lane)
        if isinstance(e, Unary):
            return self.unary(e, lane)
        if isinstance(e, Select):
            return (f"({self.expr(e.a, lane)} if {self.expr(e.cond, lane)} "
                    f"else {self.expr(e.b, lane)})")
        if isinstance(e, Cast):
            x = self.expr(e.x, lane)
            return x if e.x.dtype == e.dtype else f"{TYPE_NAMES[e.dtype]}({x})"
        if isinstance(e, Broadcast):
            return self.expr(e.x)
        if isinstance(e, ReduceLanes):
            return self.reduce_lanes(e)
        if isinstance(e, DotAdd4):
            return self.dot_add4(e, lane)
        raise InternalError(f"kernel {self.kernel.name}: no CUDA rendering for "
                        f"{type(e).__name__}", hint="this is a kiln bug; please report it")

    def binary(self, e: Binary, lane: str | None) -> str:
        a, b = self.expr(e.a, lane), self.expr(e.b, lane)
        dt = e.a.dtype
        if e.op in _BINARY_SYMBOLS:
            text = f"({a} {_BINARY_SYMBOLS[e.op]} {b})"
            if e.op in ("add", "sub", "mul") and dt in _NARROW:
                text = f"{TYPE_NAMES[dt]}{text}"
            return text
        if e.op in ("div", "mod"):
            sym = "%" if e.op == "mod" else "/" if K.is_float(dt) else "//"
            text = f"({a} {sym} {b})"
            return f"{TYPE_NAMES[dt]}{text}" if dt in _NARROW else text
        if e.op in ("max", "min"):
            return self.max_min(e.op, dt, a, b)
        if e.op == "pow":
            return f"{TYPE_NAMES[dt]}({a} ** {b})"
        if e.op in ("and", "or"):
            if dt != "bool":
                a, b = f"({a} != 0)", f"({b} != 0)"
            return f"({a} {e.op} {b})"
        raise InternalError(f"kernel {self.kernel.name}: no CUDA rendering for binary {e.op}")

    def unary(self, e: Unary, lane: str | None) -> str:
        x = self.expr(e.x, lane)
        dt, t = e.dtype, TYPE_NAMES[e.dtype]
        if e.op == "neg":
            return f"{t}(-{x})" if dt in _NARROW else f"(-{x})"
        if e.op == "abs":
            return f"{t}(abs({x}))" if dt in _NARROW else f"abs({x})"
        if e.op == "not":
            return f"(not {x})"
        if e.op in ("floor", "trunc") and not K.is_float(dt):
            return x
        if e.op == "round":
            if not K.is_float(dt):
                return x
            if dt == "f16":
                return f"f16(_rint32(f32({x})))"
            return f"{RINT_NAMES[dt]}({x})"
        if e.op == "rsqrt":
            one = self.const(1.0, dt)
            if dt == "f16":
                return f"f16({self.const(1.0, 'f32')} / math.sqrt(f32({x})))"
            return f"({one} / math.sqrt({x}))"
        if e.op in _MATH:
            if not K.is_float(dt):
                raise InternalError(f"kernel {self.kernel.name}: {e.op} of {dt}",
                                hint="this is a kiln lowering bug; please report it")
            if dt == "f16" and e.op not in _MATH_F16:
                return f"f16(math.{_MATH[e.op]}(f32({x})))"
            return f"{t}(math.{_MATH[e.op]}({x}))"
        raise InternalError(f"kernel {self.kernel.name}: no CUDA rendering for unary {e.op}")

    def dot_add4(self, e: DotAdd4, lane: str | None) -> str:
        """Lane ``lane`` of ``acc + sum of four u8 * i8 products`` (int32, wrapping)."""
        terms = [self.expr(e.acc, lane)]
        for j in range(4):
            sub = [str(j) if x.lanes == 4 else f"4 * {lane} + {j}" for x in (e.u, e.s)]
            terms.append(f"i32({self.expr(e.u, sub[0])}) * i32({self.expr(e.s, sub[1])})")
        return f"i32({' + '.join(terms)})"

    def max_min(self, op: str, dt: str, a: str, b: str) -> str:
        # Inline rather than numba's max(): its CUDA version is a device function. Floats
        # follow NumPy's maximum/minimum: a NaN on either side wins.
        a, b = self.hoist(a), self.hoist(b)
        cmp = ">" if op == "max" else "<"
        nan = f" or {a} != {a}" if K.is_float(dt) else ""
        return f"({a} if {a} {cmp} {b}{nan} else {b})"

    def combine(self, op: str, dt: str, a: str, b: str) -> str:
        """Text of the reduction step ``op`` (add, max, min) of names ``a`` and ``b`` in
        ``dt``; max/min operands that are not names are hoisted to ``self.pre``."""
        if op == "add":
            text = f"{a} + {b}"
            return f"{TYPE_NAMES[dt]}({text})" if dt in _NARROW else f"({text})"
        return self.max_min(op, dt, a, b)

    def expr_at(self, e: Expr, depth: int, out: list[str]) -> str:
        """Text of scalar ``e``, with the lines it needs first appended to ``out``."""
        text = self.expr(e)
        self._flush(depth, out)
        return text

    def hoist(self, text: str) -> str:
        """A name holding the value of expression ``text`` (itself when it is a name)."""
        if text.isidentifier():
            return text
        t = self.fresh("m")
        self.pre.append(f"{t} = {text}")
        return t

    def in_loop(self, render) -> tuple[str, list[str]]:
        """``render()`` with its hoisted lines collected apart, for the body of a lane loop."""
        saved, self.pre = self.pre, []
        try:
            return render(), self.pre
        finally:
            self.pre = saved

    def reduce_lanes(self, e: ReduceLanes) -> str:
        dt = e.dtype
        acc, lane = self.fresh("r"), self.fresh("l")
        init = self.expr(K.reduction_identity(e.op, dt))

        def step() -> str:
            x = self.expr(e.x, lane)
            if e.op == "add":
                text = f"{acc} + {x}"
                return f"{TYPE_NAMES[dt]}({text})" if dt in _NARROW else text
            return self.max_min(e.op, dt, acc, x)

        text, body = self.in_loop(step)
        self.pre += [f"{acc} = {init}", f"for {lane} in range({e.x.lanes}):",
                     *(f"    {line}" for line in body), f"    {acc} = {text}"]
        return acc

    # ---- statements ------------------------------------------------------------------------
    def stmts(self, stmts: Sequence[Stmt], depth: int, out: list[str]) -> None:
        if not stmts:
            out.append("    " * depth + "pass")
        for s in stmts:
            self.stmt(s, depth, out)

    def _flush(self, depth: int, out: list[str]) -> None:
        pad = "    " * depth
        out.extend(pad + line for line in self.pre)
        self.pre = []

    def stmt(self, s: Stmt, depth: int, out: list[str]) -> None:
        pad = "    " * depth
        if isinstance(s, For):
            start, extent = self.expr(s.start), self.expr(s.extent)
            self._flush(depth, out)
            if start == "0" and s.step == 1:
                rng = extent
            else:
                stop = extent if start == "0" else f"{start} + {extent}"
                rng = f"{start}, {stop}" + (f", {s.step}" if s.step != 1 else "")
            out.append(f"{pad}for {self.var(s.var)} in range({rng}):")
            self.stmts(s.body, depth + 1, out)
        elif isinstance(s, Store):
            buf, index = self.buf(s.buffer), self.expr(s.index)
            if s.value.lanes == 1:
                value = self.expr(s.value)
                self._flush(depth, out)
                out.append(f"{pad}{buf}[{index}] = {value}")
            else:
                lane = self.fresh("l")
                value, body = self.in_loop(lambda: self.expr(s.value, lane))
                self._flush(depth, out)
                out.append(f"{pad}for {lane} in range({s.value.lanes}):")
                out.extend(f"{pad}    {line}" for line in body)
                out.append(f"{pad}    {buf}[{index} + {lane}] = {value}")
        elif isinstance(s, (Decl, Assign)):
            v = s.var
            value_expr = s.init if isinstance(s, Decl) else s.value
            name = self.var(v)
            if v.lanes == 1:
                value = self.expr(value_expr)
                if value_expr.dtype != v.dtype:
                    value = f"{TYPE_NAMES[v.dtype]}({value})"
                self._flush(depth, out)
                out.append(f"{pad}{name} = {value}")
            else:
                lane = self.fresh("l")
                value, body = self.in_loop(lambda: self.expr(
                    value_expr, lane if value_expr.lanes > 1 else None))
                self._flush(depth, out)
                if isinstance(s, Decl):
                    out.append(f"{pad}{name} = cuda.local.array({v.lanes}, "
                               f"numba.types.{NUMBA_TYPES[v.dtype]})")
                out.append(f"{pad}for {lane} in range({v.lanes}):")
                out.extend(f"{pad}    {line}" for line in body)
                out.append(f"{pad}    {name}[{lane}] = {value}")
        elif isinstance(s, If):
            cond = self.expr(s.cond)
            self._flush(depth, out)
            out.append(f"{pad}if {cond}:")
            self.stmts(s.then, depth + 1, out)
            if s.orelse:
                out.append(f"{pad}else:")
                self.stmts(s.orelse, depth + 1, out)
        else:
            raise InternalError(f"kernel {self.kernel.name}: no CUDA rendering for statement "
                            f"{type(s).__name__}")

    # ---- kernels ---------------------------------------------------------------------------
    def header(self, name: str, stmts: Sequence[Stmt], out: list[str]) -> tuple[str, ...]:
        """Append the ``@cuda.jit`` line, the ``def`` line and the per-thread scratch arrays of
        a CUDA function running ``stmts``; returns its buffer parameters in argument order."""
        k = self.kernel
        used = buffers_in(stmts)
        params = tuple(b.name for b in k.params if b.name in used)
        sig = ", ".join(f"{NUMBA_TYPES[self.buffers[p].dtype]}[::1]" for p in params)
        out.append(f'@cuda.jit("void({sig})")')
        out.append(f"def {name}({', '.join(self.buf(p) for p in params)}):")
        for b in k.scratch:
            if b.name in used:
                # One private copy per thread, reused across its grid-stride iterations (the
                # IR's contract for scratch inside parallel loops).
                out.append(f"    {self.buf(b.name)} = cuda.local.array({b.size}, "
                           f"numba.types.{NUMBA_TYPES[b.dtype]})")
        return params

    def decode(self, flat: str, loops: Sequence[BoundLoop], depth: int, out: list[str]) -> None:
        """Append the lines setting the variables of ``loops`` (outermost first) from the flat
        iteration number ``flat`` (a name, below the product of their counts)."""
        inner = 1
        lines = []
        for b in reversed(loops):
            # Outermost loop in the highest digits; it needs no modulo, being below its count.
            q = flat if inner == 1 else f"{flat} // {inner}"
            if b is not loops[0]:
                q = f"({q}) % {b.count}" if inner != 1 else f"{q} % {b.count}"
            if b.step != 1:
                q = f"({q}) * {b.step}"
            if b.start != 0:
                q = f"{b.start} + {q}"
            if b.count == 1:
                q = str(b.start)
            lines.append(f"{'    ' * depth}{self.loop_var(b.var)} = {q}")
            inner *= b.count
        out.extend(reversed(lines))

    def loop_var(self, name: str) -> str:
        """The Python name of index loop variable ``name``."""
        return self.names[(name, INDEX, 1)]

    def launch(self, seg: Segment, name: str, out: list[str]) -> Launch:
        """The generic mapping of a segment: a grid-stride loop over its bound loops, or one
        thread."""
        params = self.header(name, seg.stmts, out)
        if seg.bound:
            t = self.fresh("t")
            out.append(f"    for {t} in range(cuda.grid(1), {seg.work}, cuda.gridsize(1)):")
            self.decode(t, seg.bound, 2, out)
            self.stmts(seg.body(), 2, out)
        else:
            out.append("    if cuda.grid(1) == 0:")
            self.stmts(seg.stmts, 2, out)
        out.append("")
        out.append("")
        return Launch(name, params, seg.work, bool(seg.bound), tuple(b.var for b in seg.bound),
                      "grid-stride" if seg.bound else "serial")

    def render(self) -> KernelSource:
        body: list[str] = []
        launches = []
        for i, seg in enumerate(plan_segments(self.kernel)):
            name = _ident(f"{self.kernel.name}_{i}")
            for schedule in self.schedules:
                launch = schedule(self, seg, name, body)
                if launch is not None:
                    break
            else:
                launch = self.launch(seg, name, body)
            launches.append(launch)
        header = [f"# kernel {self.kernel.name}", *self.const_lines, "", ""]
        text = "\n".join(header + body).rstrip() + "\n"
        return KernelSource(self.kernel, text, tuple(launches))


# ---- helpers ---------------------------------------------------------------------------------
_RESERVED = {"range", "abs", "numba", "np", *NAMESPACE_NAMES}


def _ident(name: str) -> str:
    """A Python identifier for an IR name. Safe names stay as they are; others get a prefix
    starting with an underscore, which no safe name and no generated temporary has."""
    if name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("_") \
            and name not in _RESERVED:
        return name
    return "_u_" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def _name_table(kernel: Kernel) -> dict[tuple[str, str, int], str]:
    """Python name of every (variable, dtype, lanes): the plain name, with a type suffix when
    the kernel declares the same name with several types (numba types each name once)."""
    kinds: dict[str, set[tuple[str, int]]] = {}

    def note(v: Var) -> None:
        kinds.setdefault(v.name, set()).add((v.dtype, v.lanes))

    for s in K.walk_stmts(kernel.body):
        if isinstance(s, For):
            note(s.var)
        elif isinstance(s, (Decl, Assign)):
            note(s.var)
        for e in K.stmt_exprs(s):
            for x in K.walk_expr(e):
                if isinstance(x, Var):
                    note(x)
    table = {}
    for name, types in kinds.items():
        for dtype, lanes in types:
            suffix = "" if len(types) == 1 else f"_{dtype}" + (f"x{lanes}" if lanes > 1 else "")
            table[(name, dtype, lanes)] = _ident(name) + suffix
    return table


def buffers_in(stmts: Sequence[Stmt]) -> set[str]:
    """Names of the buffers ``stmts`` load from or store to."""
    names = set()
    for s in K.walk_stmts(stmts):
        if isinstance(s, Store):
            names.add(s.buffer)
        for e in K.stmt_exprs(s):
            names.update(x.buffer for x in K.walk_expr(e) if isinstance(x, Load))
    return names
