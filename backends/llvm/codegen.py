"""Kernel IR -> LLVM IR text: one module per model with one exported entry point.

Every kernel becomes an internal function taking its buffers as pointers. A parallel loop at
the top of a kernel is outlined into a task run by the OpenMP runtime (``GOMP_parallel`` from
libgomp, through its C ABI): each thread takes one contiguous chunk of the iterations. The
exported entry ``kiln_run(inputs, outputs, arena, consts, nthreads)`` calls the kernels in
order with pointers into the caller's input/output arrays, the activation arena and the weight
blob, and the call's thread count (1: every loop on the calling thread, without the OpenMP
runtime; 0: the runtime's default). The count is an argument, not a global, so calls with
different counts may run at once.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from kiln.ir import InternalError
from kiln.ir import kernel as K
from kiln.ir.kernel import (
    Assign,
    Binary,
    Broadcast,
    Cast,
    Const,
    Decl,
    Expr,
    For,
    If,
    Kernel,
    Load,
    ReduceLanes,
    Select,
    Store,
    Unary,
    Var,
)
from kiln.passes.target import Target

# Chunks per thread of a parallel loop (taken dynamically; see _emit_task). One per thread
# keeps each thread's run of GEMM tiles as long as a static split's, and a thread that has not
# started when another finishes still loses its chunk to it. Finer chunks share a late
# thread's work better, but cut the runs short: on ResNet-18 (CIFAR) at 2 threads, 2 chunks
# per thread were 3-6% slower than 1 (batch 1 and 8, measured interleaved), 4 were 10-15%
# slower. On a loaded machine the thread count itself adapts (threads.py).
CHUNKS_PER_THREAD = 1

SCALAR = {"f32": "float", "f16": "half", "f64": "double", "i8": "i8", "u8": "i8", "i32": "i32",
          "i64": "i64", "bool": "i1"}
MEMORY = dict(SCALAR, bool="i8")  # bools are bytes in memory
SIGNED = {"i8", "i32", "i64"}
FLOAT = {"f32", "f16", "f64"}
SUFFIX = {"float": "f32", "half": "f16", "double": "f64", "i8": "i8", "i32": "i32",
          "i64": "i64", "i1": "i1"}


def llvm_type(dtype: str, lanes: int = 1, memory: bool = False) -> str:
    t = (MEMORY if memory else SCALAR)[dtype]
    return t if lanes == 1 else f"<{lanes} x {t}>"


def _intrinsic_suffix(dtype: str, lanes: int) -> str:
    s = SUFFIX[SCALAR[dtype]]
    return s if lanes == 1 else f"v{lanes}{s}"


def float_literal(value: float, dtype: str) -> str:
    """An exact LLVM literal (hex of the double holding the value rounded to ``dtype``)."""
    if dtype == "f16":
        bits = np.array(value, np.float16).view(np.uint16).item()
        return f"0xH{bits:04X}"
    v = float(np.float32(value)) if dtype == "f32" else float(value)
    return f"0x{struct.unpack('>Q', struct.pack('>d', v))[0]:016X}"


@dataclass
class Binding:
    """Where a kernel buffer lives for one call: ``kind`` is input/output/arena/const/scratch;
    ``index`` is the input/output position or the byte offset."""

    kind: str
    index: int


class _Fn:
    """Emits one LLVM function body."""

    def __init__(self, module: ModuleBuilder, name: str, params: Sequence[str]) -> None:
        self.m = module
        self.name = name
        self.params = list(params)
        self.entry: list[str] = []      # allocas
        self.lines: list[str] = []
        self.n = 0
        self.vars: dict[str, tuple[str, str]] = {}   # var name -> (alloca ptr, llvm type)
        self.buffers: dict[str, str] = {}            # buffer name -> ptr SSA value
        self.tasks: list[str] = []
        self.int_params: list[str] = []   # i32 parameters after the pointers
        # Set on a kernel's own function: runs a parallel loop on the thread pool. Inside a
        # task it stays None, so nested parallel loops run serially in their thread.
        self.outline = None

    def tmp(self) -> str:
        self.n += 1
        return f"%t{self.n}"

    def label(self, hint: str) -> str:
        self.n += 1
        return f"{hint}{self.n}"

    def emit(self, line: str) -> None:
        self.lines.append("  " + line)

    def block(self, label: str) -> None:
        self.lines.append(f"{label}:")

    # ---- expressions -----------------------------------------------------------------------
    def expr(self, e: Expr) -> str:
        t = llvm_type(e.dtype, e.lanes)
        if isinstance(e, Const):
            return self.const(e)
        if isinstance(e, Var):
            ptr, vt = self.var_slot(e)
            r = self.tmp()
            self.emit(f"{r} = load {vt}, ptr {ptr}")
            return r
        if isinstance(e, Load):
            return self.load(e)
        if isinstance(e, Binary):
            return self.binary(e)
        if isinstance(e, Unary):
            return self.unary(e)
        if isinstance(e, Select):
            c, a, b = self.expr(e.cond), self.expr(e.a), self.expr(e.b)
            r = self.tmp()
            self.emit(f"{r} = select {llvm_type('bool', e.cond.lanes)} {c}, {t} {a}, {t} {b}")
            return r
        if isinstance(e, Cast):
            return self.cast(e)
        if isinstance(e, Broadcast):
            x = self.expr(e.x)
            st = llvm_type(e.x.dtype)
            r1, r2 = self.tmp(), self.tmp()
            self.emit(f"{r1} = insertelement <{e.lanes} x {st}> poison, {st} {x}, i64 0")
            self.emit(f"{r2} = shufflevector <{e.lanes} x {st}> {r1}, <{e.lanes} x {st}> "
                      f"poison, <{e.lanes} x i32> zeroinitializer")
            return r2
        if isinstance(e, ReduceLanes):
            return self.reduce(e)
        if isinstance(e, K.DotAdd4):
            return self.dot_add4(e)
        raise InternalError(f"codegen: unknown expression {type(e).__name__}")

    def const(self, e: Const) -> str:
        t = llvm_type(e.dtype)
        if e.dtype in FLOAT:
            s = float_literal(float(e.value), e.dtype)
        elif e.dtype == "bool":
            s = "true" if e.value else "false"
        else:
            s = str(int(e.value))
        if e.lanes == 1:
            return s
        return "<" + ", ".join(f"{t} {s}" for _ in range(e.lanes)) + ">"

    def var_slot(self, v: Var) -> tuple[str, str]:
        if v.name not in self.vars:
            raise InternalError(f"codegen: variable {v.name} used before it is declared in "
                            f"{self.name}")
        return self.vars[v.name]

    def declare(self, v: Var) -> str:
        t = llvm_type(v.dtype, v.lanes)
        if v.name in self.vars and self.vars[v.name][1] == t:
            return self.vars[v.name][0]
        self.n += 1
        ptr = f"%var.{v.name}.{self.n}"
        self.entry.append(f"  {ptr} = alloca {t}, align 64")
        self.vars[v.name] = (ptr, t)
        return ptr

    def address(self, buffer: str, index: Expr, dtype: str) -> str:
        idx = self.expr(index)
        p = self.tmp()
        self.emit(f"{p} = getelementptr inbounds {llvm_type(dtype, memory=True)}, "
                  f"ptr {self.buffers[buffer]}, i64 {idx}")
        return p

    def load(self, e: Load) -> str:
        p = self.address(e.buffer, e.index, e.dtype)
        mt = llvm_type(e.dtype, e.lanes, memory=True)
        r = self.tmp()
        align = K.np_dtype(e.dtype).itemsize
        if e.stride == 2 and e.lanes > 1 and e.dtype != "bool":
            # Two vectors, the second masked to the lanes the span covers (no element past the
            # last lane is touched: the masked lane cannot fault), and one two-input shuffle
            # of the even elements: a masked load and a vpermi2ps on AVX-512.
            st = llvm_type(e.dtype, memory=True)
            vt = f"<{e.lanes} x {st}>"
            hi_p, lo, hi = self.tmp(), self.tmp(), self.tmp()
            self.emit(f"{lo} = load {vt}, ptr {p}, align {align}")
            self.emit(f"{hi_p} = getelementptr inbounds {st}, ptr {p}, i64 {e.lanes}")
            mask = ", ".join(f"i1 {int(i < e.lanes - 1)}" for i in range(e.lanes))
            fn = f"llvm.masked.load.{_intrinsic_suffix(e.dtype, e.lanes)}.p0"
            self.emit(f"{hi} = call {vt} @{fn}(ptr {hi_p}, i32 {align}, <{e.lanes} x i1> "
                      f"<{mask}>, {vt} poison)")
            self.m.declare(fn, vt, ["ptr", "i32", f"<{e.lanes} x i1>", vt])
            even = ", ".join(f"i32 {2 * i}" for i in range(e.lanes))
            self.emit(f"{r} = shufflevector {vt} {lo}, {vt} {hi}, <{e.lanes} x i32> <{even}>")
        elif e.stride > 1 and e.lanes > 1:
            # Load the span the lanes cover (no element past the last lane) and keep every
            # stride-th element.
            span = e.stride * (e.lanes - 1) + 1
            wide, st = self.tmp(), llvm_type(e.dtype, memory=True)
            self.emit(f"{wide} = load <{span} x {st}>, ptr {p}, align {align}")
            mask = ", ".join(f"i32 {i * e.stride}" for i in range(e.lanes))
            self.emit(f"{r} = shufflevector <{span} x {st}> {wide}, <{span} x {st}> poison, "
                      f"<{e.lanes} x i32> <{mask}>")
        else:
            self.emit(f"{r} = load {mt}, ptr {p}, align {align}")
        if e.dtype == "bool":
            r2 = self.tmp()
            zero = "0" if e.lanes == 1 else "zeroinitializer"
            self.emit(f"{r2} = icmp ne {mt} {r}, {zero}")
            return r2
        return r

    def store(self, s: Store, dtype: str) -> None:
        v = self.expr(s.value)
        lanes = s.value.lanes
        if dtype == "bool":
            r = self.tmp()
            self.emit(f"{r} = zext {llvm_type('bool', lanes)} {v} to "
                      f"{llvm_type('bool', lanes, memory=True)}")
            v = r
        p = self.address(s.buffer, s.index, dtype)
        align = K.np_dtype(dtype).itemsize
        self.emit(f"store {llvm_type(dtype, lanes, memory=True)} {v}, ptr {p}, align {align}")

    def call(self, ret: str, fn: str, args: Sequence[tuple[str, str]], flags: str = "") -> str:
        r = self.tmp()
        argtext = ", ".join(f"{t} {v}" for t, v in args)
        self.emit(f"{r} = call {flags}{' ' if flags else ''}{ret} @{fn}({argtext})")
        self.m.declare(fn, ret, [t for t, _ in args])
        return r

    def binary(self, e: Binary) -> str:
        a, b = self.expr(e.a), self.expr(e.b)
        at = llvm_type(e.a.dtype, e.lanes)
        dt = e.a.dtype
        fl = dt in FLOAT
        r = self.tmp()
        op = e.op
        if op in ("add", "sub", "mul", "div"):
            divisor = self._exact_division(e.b) if op == "div" and dt == "f32" else None
            if divisor is not None:
                return self._divide_by_constant(a, at, e.lanes, divisor)
            if fl:
                inst = {"add": "fadd", "sub": "fsub", "mul": "fmul", "div": "fdiv"}[op]
                self.emit(f"{r} = {inst} contract {at} {a}, {b}")
            else:
                inst = {"add": "add", "sub": "sub", "mul": "mul",
                        "div": "sdiv" if dt in SIGNED else "udiv"}[op]
                self.emit(f"{r} = {inst} {at} {a}, {b}")
            return r
        if op == "mod":
            self.emit(f"{r} = {'frem' if fl else 'srem' if dt in SIGNED else 'urem'} {at} {a}, {b}")
            return r
        if op in ("max", "min"):
            sfx = _intrinsic_suffix(dt, e.lanes)
            if fl:
                fn = f"llvm.{'maximum' if op == 'max' else 'minimum'}.{sfx}"
            elif dt == "bool":
                fn = f"llvm.{'umax' if op == 'max' else 'umin'}.{sfx}"
            else:
                sign = "s" if dt in SIGNED else "u"
                fn = f"llvm.{sign}{op}.{sfx}"
            return self.call(at, fn, [(at, a), (at, b)])
        if op == "pow":
            return self.call(at, f"llvm.pow.{_intrinsic_suffix(dt, e.lanes)}", [(at, a), (at, b)])
        if op in K.COMPARE_OPS:
            if fl:
                pred = {"lt": "olt", "le": "ole", "gt": "ogt", "ge": "oge", "eq": "oeq",
                        "ne": "une"}[op]
                self.emit(f"{r} = fcmp {pred} {at} {a}, {b}")
            else:
                s = "s" if dt in SIGNED else "u"
                pred = {"lt": f"{s}lt", "le": f"{s}le", "gt": f"{s}gt", "ge": f"{s}ge",
                        "eq": "eq", "ne": "ne"}[op]
                self.emit(f"{r} = icmp {pred} {at} {a}, {b}")
            return r
        if op in ("and", "or"):
            self.emit(f"{r} = {op} {at} {a}, {b}")
            return r
        raise InternalError(f"codegen: unknown binary op {op}")

    def _exact_division(self, divisor: Expr) -> float | None:
        """The constant float32 divisor of a division that `_divide_by_constant` may take:
        finite, not a power of two (LLVM multiplies by those itself), its reciprocal a
        normal number, on a target with FMA."""
        c = divisor.x if isinstance(divisor, Broadcast) else divisor
        if not isinstance(c, Const) or "+fma" not in self.m.features.split(","):
            return None
        v = np.float32(c.value)
        if not np.isfinite(v) or v == 0:
            return None
        mant, _ = np.frexp(np.float64(abs(v)))
        inv = np.float32(1) / v
        tiny = np.finfo(np.float32).tiny
        if mant == 0.5 or not tiny <= abs(inv) < np.finfo(np.float32).max / 4:
            return None
        return float(v)

    def _divide_by_constant(self, a: str, t: str, lanes: int, divisor: float) -> str:
        """``a / divisor``, correctly rounded, without a division instruction: q = a * y with
        y = RN(1/divisor), the remainder r = a - q * divisor exactly by one FMA, and
        RN(q + r * y) is RN(a / divisor) for every quotient in the normal range (Markstein's
        theorem). A vector division occupies the divider for 5-14 cycles per vector (14 on
        Haswell); this is three FMA-port instructions and a NaN check. Measured: BERT int8's
        quantize kernels 8.0 -> 5.9 us; its GELU epilogues, bound by FP-port issue rather
        than the divider, unchanged. Where q is inf or NaN (a inf or NaN, or a quotient at
        the overflow edge) r is NaN and q itself is the answer."""
        d = float_literal(divisor, "f32")
        y = float_literal(float(np.float32(1) / np.float32(divisor)), "f32")
        if lanes > 1:
            d = "<" + ", ".join([f"float {d}"] * lanes) + ">"
            y = "<" + ", ".join([f"float {y}"] * lanes) + ">"
        sfx = _intrinsic_suffix("f32", lanes)
        q = self.tmp()
        self.emit(f"{q} = fmul {t} {a}, {y}")
        # Which side the residual is taken from follows the divisor's sign, so that a zero
        # quotient keeps a's sign (-0 / 3 the other way round would be -0 + +0 = +0). The
        # negations fold into vfmsub / vfnmadd.
        fma = f"llvm.fma.{sfx}"
        if divisor > 0:   # r = q*d - a, q2 = q - r*y
            na = self.tmp()
            self.emit(f"{na} = fneg {t} {a}")
            r = self.call(t, fma, [(t, q), (t, d), (t, na)])
            nr = self.tmp()
            self.emit(f"{nr} = fneg {t} {r}")
            q2 = self.call(t, fma, [(t, nr), (t, y), (t, q)])
        else:             # r = a - q*d, q2 = q + r*y
            nq = self.tmp()
            self.emit(f"{nq} = fneg {t} {q}")
            r = self.call(t, fma, [(t, nq), (t, d), (t, a)])
            q2 = self.call(t, fma, [(t, r), (t, y), (t, q)])
        ok = self.tmp()
        bt = "i1" if lanes == 1 else f"<{lanes} x i1>"
        self.emit(f"{ok} = fcmp ord {t} {q2}, {q2}")
        out = self.tmp()
        self.emit(f"{out} = select {bt} {ok}, {t} {q2}, {t} {q}")
        return out

    def unary(self, e: Unary) -> str:
        x = self.expr(e.x)
        t = llvm_type(e.dtype, e.lanes)
        dt = e.dtype
        sfx = _intrinsic_suffix(dt, e.lanes)
        r = self.tmp()
        if e.op == "neg":
            if dt in FLOAT:
                self.emit(f"{r} = fneg {t} {x}")
            else:
                self.emit(f"{r} = sub {t} {self.const(Const(0, dt, e.lanes))}, {x}")
            return r
        if e.op == "not":
            self.emit(f"{r} = xor {t} {x}, {self.const(Const(True, 'bool', e.lanes))}")
            return r
        if e.op == "abs":
            if dt in FLOAT:
                return self.call(t, f"llvm.fabs.{sfx}", [(t, x)])
            return self.call(t, f"llvm.abs.{sfx}", [(t, x), ("i1", "false")])
        if e.op in ("exp", "tanh", "erf", "sin", "cos", "atan") and dt == "f32":
            return self.call(t, self.m.vector_math(e.op, e.lanes), [(t, x)])
        if e.op in ("exp", "log", "sqrt", "floor", "trunc"):
            return self.call(t, f"llvm.{e.op}.{sfx}", [(t, x)])
        if e.op == "round":
            return self.call(t, f"llvm.roundeven.{sfx}", [(t, x)])
        if e.op == "rsqrt":
            s = self.call(t, f"llvm.sqrt.{sfx}", [(t, x)])
            one = self.const(Const(1.0, dt, e.lanes))
            self.emit(f"{r} = fdiv {t} {one}, {s}")
            return r
        if e.op in ("tanh", "erf", "sin", "cos", "atan"):
            fn = self.m.math_function(e.op, dt, e.lanes)
            return self.call(t, fn, [(t, x)])
        raise InternalError(f"codegen: unknown unary op {e.op}")

    def cast(self, e: Cast) -> str:
        x = self.expr(e.x)
        src, dst = e.x.dtype, e.dtype
        st, dt_ = llvm_type(src, e.lanes), llvm_type(dst, e.lanes)
        if st == dt_:
            return x
        r = self.tmp()
        if dst == "bool":
            zero = self.const(Const(0.0 if src in FLOAT else 0, src, e.lanes))
            self.emit(f"{r} = {'fcmp une' if src in FLOAT else 'icmp ne'} {st} {x}, {zero}")
            return r
        if src in FLOAT and dst in FLOAT:
            bits = {"f16": 16, "f32": 32, "f64": 64}
            inst = "fpext" if bits[dst] > bits[src] else "fptrunc"
        elif src in FLOAT:
            inst = "fptosi" if dst in SIGNED else "fptoui"
        elif dst in FLOAT:
            inst = "sitofp" if src in SIGNED else "uitofp"
        else:
            wi = {"i1": 1, "i8": 8, "i32": 32, "i64": 64}
            ws, wd = wi[SCALAR[src]], wi[SCALAR[dst]]
            inst = ("sext" if src in SIGNED else "zext") if wd > ws else "trunc"
        self.emit(f"{r} = {inst} {st} {x} to {dt_}")
        return r

    def _bytes_as_words(self, e: K.Expr, lanes: int) -> str:
        """A u8/i8 operand of dot_add4 as ``lanes`` 32-bit words (a 4-byte group splat)."""
        v = self.expr(e)
        if e.lanes == 4 * lanes:
            r = self.tmp()
            self.emit(f"{r} = bitcast <{4 * lanes} x i8> {v} to <{lanes} x i32>")
            return r
        w, r1, r2 = self.tmp(), self.tmp(), self.tmp()
        self.emit(f"{w} = bitcast <4 x i8> {v} to i32")
        self.emit(f"{r1} = insertelement <{lanes} x i32> poison, i32 {w}, i64 0")
        self.emit(f"{r2} = shufflevector <{lanes} x i32> {r1}, <{lanes} x i32> poison, "
                  f"<{lanes} x i32> zeroinitializer")
        return r2

    def dot_add4(self, e: K.DotAdd4) -> str:
        n = e.lanes
        acc = self.expr(e.acc)
        scalar = n == 1
        if scalar:  # one lane: computed as a 1-lane vector
            a1 = self.tmp()
            self.emit(f"{a1} = insertelement <1 x i32> poison, i32 {acc}, i64 0")
            acc = a1
        u, s = self._bytes_as_words(e.u, n), self._bytes_as_words(e.s, n)
        vt = f"<{n} x i32>"
        kind = self.m.target.dot4_instruction(n, e.s_max)
        if kind == "vnni":
            # u8 x i8 products summed in groups of four into each i32 lane, in one instruction.
            return self.call(vt, f"llvm.x86.avx512.vpdpbusd.{n * 32}",
                             [(vt, acc), (vt, u), (vt, s)])
        if kind == "maddubs":
            # Pairs of u8 x i8 products summed to i16 (pmaddubsw; they cannot saturate: the
            # lowering promises |s| <= 64), pairs of those to i32 (pmaddwd by ones), added.
            bt, ht = f"<{4 * n} x i8>", f"<{2 * n} x i16>"
            ub, sb = self.tmp(), self.tmp()
            self.emit(f"{ub} = bitcast {vt} {u} to {bt}")
            self.emit(f"{sb} = bitcast {vt} {s} to {bt}")
            names = {4: ("llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd"),
                     8: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
                     16: ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512")}
            maddubs, maddwd = names[n]
            pairs = self.call(ht, maddubs, [(bt, ub), (bt, sb)])
            ones = f"<{', '.join(['i16 1'] * (2 * n))}>"
            quads = self.call(vt, maddwd, [(ht, pairs), (ht, ones)])
            r = self.tmp()
            self.emit(f"{r} = add {vt} {acc}, {quads}")
            return r
        # Elsewhere: widen to 16 bits, multiply-add pairs (pmaddwd's pattern), then add pairs.
        bt, wt = f"<{4 * n} x i8>", f"<{4 * n} x i16>"
        ub, sb = self.tmp(), self.tmp()
        self.emit(f"{ub} = bitcast {vt} {u} to {bt}")
        self.emit(f"{sb} = bitcast {vt} {s} to {bt}")
        uw, sw = self.tmp(), self.tmp()
        self.emit(f"{uw} = zext {bt} {ub} to {wt}")
        self.emit(f"{sw} = sext {bt} {sb} to {wt}")

        def half(x: str, ty: str, count: int, odd: int) -> str:
            r = self.tmp()
            mask = ", ".join(f"i32 {2 * i + odd}" for i in range(count))
            self.emit(f"{r} = shufflevector {ty} {x}, {ty} poison, <{count} x i32> <{mask}>")
            return r

        def widen_mul(a: str, b: str) -> str:
            a32, b32, p = self.tmp(), self.tmp(), self.tmp()
            ht = f"<{2 * n} x i16>"
            self.emit(f"{a32} = sext {ht} {a} to <{2 * n} x i32>")
            self.emit(f"{b32} = sext {ht} {b} to <{2 * n} x i32>")
            self.emit(f"{p} = mul <{2 * n} x i32> {a32}, {b32}")
            return p

        pe = widen_mul(half(uw, wt, 2 * n, 0), half(sw, wt, 2 * n, 0))
        po = widen_mul(half(uw, wt, 2 * n, 1), half(sw, wt, 2 * n, 1))
        pairs = self.tmp()
        self.emit(f"{pairs} = add <{2 * n} x i32> {pe}, {po}")
        p2t = f"<{2 * n} x i32>"
        quads = self.tmp()
        self.emit(f"{quads} = add {vt} {half(pairs, p2t, n, 0)}, {half(pairs, p2t, n, 1)}")
        r = self.tmp()
        self.emit(f"{r} = add {vt} {acc}, {quads}")
        if scalar:
            r1 = self.tmp()
            self.emit(f"{r1} = extractelement <1 x i32> {r}, i64 0")
            return r1
        return r

    def reduce(self, e: ReduceLanes) -> str:
        x = self.expr(e.x)
        vt = llvm_type(e.x.dtype, e.x.lanes)
        st = llvm_type(e.dtype)
        sfx = _intrinsic_suffix(e.x.dtype, e.x.lanes)
        if e.x.dtype in FLOAT:
            if e.op == "add":
                return self.call(st, f"llvm.vector.reduce.fadd.{sfx}",
                                 [(st, float_literal(-0.0, e.dtype)), (vt, x)], "reassoc")
            fn = {"max": "fmaximum", "min": "fminimum"}[e.op]
            return self.call(st, f"llvm.vector.reduce.{fn}.{sfx}", [(vt, x)])
        fn = {"add": "add", "max": "smax", "min": "smin"}[e.op]
        return self.call(st, f"llvm.vector.reduce.{fn}.{sfx}", [(vt, x)])

    # ---- statements ------------------------------------------------------------------------
    def stmts(self, body: Sequence[K.Stmt], dtypes: dict[str, str]) -> None:
        for s in body:
            if isinstance(s, For) and s.kind in ("parallel", "team") \
                    and self.outline is not None:
                self.outline(s)
            elif isinstance(s, For):
                self.loop(s, dtypes)
            elif isinstance(s, Store):
                self.store(s, dtypes[s.buffer])
            elif isinstance(s, Decl):
                v = self.expr(s.init)
                ptr = self.declare(s.var)
                self.emit(f"store {llvm_type(s.var.dtype, s.var.lanes)} {v}, ptr {ptr}")
            elif isinstance(s, Assign):
                v = self.expr(s.value)
                ptr, t = self.var_slot(s.var)
                self.emit(f"store {t} {v}, ptr {ptr}")
            elif isinstance(s, If):
                c = self.expr(s.cond)
                then, other, done = self.label("then"), self.label("else"), self.label("endif")
                self.emit(f"br i1 {c}, label %{then}, label %{other}")
                self.block(then)
                self.stmts(s.then, dtypes)
                self.emit(f"br label %{done}")
                self.block(other)
                self.stmts(s.orelse, dtypes)
                self.emit(f"br label %{done}")
                self.block(done)
            else:
                raise InternalError(f"codegen: unknown statement {type(s).__name__}")

    def loop(self, s: For, dtypes: dict[str, str], lo: str | None = None,
             hi: str | None = None, body: Callable[[], None] | None = None) -> None:
        """``s`` as a counted loop over [lo, hi) (default: its start and extent); ``body``
        emits the body instead of ``s.body`` (a team loop's phases)."""
        emit_body = body or (lambda: self.stmts(s.body, dtypes))
        if lo is None:
            lo = self.expr(s.start)
            ext = self.expr(s.extent)
            hi = self.tmp()
            self.emit(f"{hi} = add i64 {lo}, {ext}")
        ptr = self.declare(s.var)
        self.emit(f"store i64 {lo}, ptr {ptr}")
        head, top, done = self.label("head"), self.label("body"), self.label("done")
        self.emit(f"br label %{head}")
        self.block(head)
        i = self.tmp()
        self.emit(f"{i} = load i64, ptr {ptr}")
        c = self.tmp()
        self.emit(f"{c} = icmp slt i64 {i}, {hi}")
        self.emit(f"br i1 {c}, label %{top}, label %{done}")
        self.block(top)
        emit_body()
        i2, nxt = self.tmp(), self.tmp()
        self.emit(f"{i2} = load i64, ptr {ptr}")
        self.emit(f"{nxt} = add nsw i64 {i2}, {s.step}")
        self.emit(f"store i64 {nxt}, ptr {ptr}")
        self.emit(f"br label %{head}")
        self.block(done)

    def text(self, linkage: str = "internal", attrs: str = "") -> str:
        params = ", ".join([f"ptr noalias %{p}" for p in self.params]
                           + [f"i32 %{p}" for p in self.int_params])
        return (f"define {linkage} void @{self.name}({params}) {attrs} {{\nentry:\n"
                + "\n".join(self.entry) + ("\n" if self.entry else "")
                + "  br label %start\nstart:\n" + "\n".join(self.lines) + "\n  ret void\n}\n")


class ModuleBuilder:
    """Collects functions and declarations of one LLVM module."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.triple = target.triple
        self.features = target.features
        self.functions: list[str] = []
        self.declared: dict[str, str] = {}
        self.defined_math: set[str] = set()

    def declare(self, fn: str, ret: str, args: Sequence[str]) -> None:
        if fn not in self.declared and fn not in self.defined_math:
            self.declared[fn] = f"declare {ret} @{fn}({', '.join(args)})"

    def vector_math(self, op: str, lanes: int) -> str:
        """kiln's own polynomial exp/tanh/erf/sin/cos/atan for float32 (see vmath.py),
        defined once (with the libm function a huge-argument lane falls back to, if any)."""
        from kiln.backends.llvm.vmath import BUILDERS, LIBM_FALLBACK

        name, text = BUILDERS[op](lanes)
        if name not in self.defined_math:
            self.functions.append(text)
            self.defined_math.add(name)
            if op in LIBM_FALLBACK:
                self.declare(LIBM_FALLBACK[op], "float", ["float"])
        return name

    def math_function(self, op: str, dtype: str, lanes: int) -> str:
        """A function applying libm's ``tanhf``/``erff`` lane by lane (no LLVM intrinsic)."""
        base = {"f32": f"{op}f", "f64": op}.get(dtype)
        if base is None:
            raise InternalError(f"codegen: {op} on {dtype} is not supported")
        st = llvm_type(dtype)
        if lanes == 1:
            return base
        name = f"kiln.{op}.v{lanes}{dtype}"
        if name not in self.defined_math:
            vt = llvm_type(dtype, lanes)
            lines = [f"define internal {vt} @{name}({vt} %x) {{"]
            acc = "poison"
            for i in range(lanes):
                lines.append(f"  %e{i} = extractelement {vt} %x, i64 {i}")
                lines.append(f"  %r{i} = call {st} @{base}({st} %e{i})")
                lines.append(f"  %v{i} = insertelement {vt} {acc}, {st} %r{i}, i64 {i}")
                acc = f"%v{i}"
            lines.append(f"  ret {vt} {acc}\n}}")
            self.functions.append("\n".join(lines) + "\n")
            self.defined_math.add(name)
            self.declare(base, st, [st])
        return name

    def text(self) -> str:
        head = [f'target triple = "{self.triple}"',
                "declare void @GOMP_parallel(ptr, ptr, i32, i32)",
                "declare void @GOMP_barrier()",
                "declare i32 @omp_get_thread_num()",
                "declare i32 @omp_get_num_threads()"]
        return "\n".join(head + sorted(self.declared.values())) + "\n\n" + "\n".join(
            self.functions)


def _buffer_dtypes(k: Kernel) -> dict[str, str]:
    return {b.name: b.dtype for b in k.params + k.scratch}


def _scratch_allocas(fn: _Fn, scratch: Sequence[K.Buffer]) -> None:
    for b in scratch:
        ptr = f"%scratch.{b.name}"
        fn.entry.append(f"  {ptr} = alloca {llvm_type(b.dtype, memory=True)}, i64 {b.size}, "
                        f"align 64")
        fn.buffers[b.name] = ptr


def emit_kernel(m: ModuleBuilder, k: Kernel) -> None:
    """Emit ``k`` (and its outlined parallel tasks) into the module."""
    dtypes = _buffer_dtypes(k)
    params = [b.name for b in k.params]
    fn = _Fn(m, k.name, params)
    fn.int_params = ["nthreads"]
    for p in params:
        fn.buffers[p] = f"%{p}"
    _scratch_allocas(fn, k.scratch)
    fn.outline = lambda loop: _outline(fn, m, k, loop, dtypes)
    fn.stmts(k.body, dtypes)
    # noinline: LLVM would inline every kernel called once (all but the repeated layers)
    # into kiln_run, which then holds most of the model in one function, and the
    # optimizer's time grows faster than the code it is given (DenseNet-121, about 100
    # such kernels: 13 s of -O3 instead of 7). Each kernel stays a function of its own, as
    # the kernels called more than once always were; a call per kernel costs nothing.
    m.functions.append(fn.text(attrs="noinline"))
    fn.outline = None  # a cycle (fn -> closure -> fn) that would keep its lines until a gc


def _to_slot(fn: _Fn, value: str, dtype: str) -> str:
    """An i64 holding a scalar of ``dtype`` (for the task context)."""
    if dtype == "i64":
        return value
    r = fn.tmp()
    if dtype in ("f32", "f16"):
        bits = "i32" if dtype == "f32" else "i16"
        b = fn.tmp()
        fn.emit(f"{b} = bitcast {SCALAR[dtype]} {value} to {bits}")
        fn.emit(f"{r} = zext {bits} {b} to i64")
    elif dtype == "f64":
        fn.emit(f"{r} = bitcast double {value} to i64")
    else:
        fn.emit(f"{r} = zext {SCALAR[dtype]} {value} to i64")
    return r


def _from_slot(fn: _Fn, value: str, dtype: str) -> str:
    if dtype == "i64":
        return value
    r = fn.tmp()
    if dtype in ("f32", "f16"):
        bits = "i32" if dtype == "f32" else "i16"
        t = fn.tmp()
        fn.emit(f"{t} = trunc i64 {value} to {bits}")
        fn.emit(f"{r} = bitcast {bits} {t} to {SCALAR[dtype]}")
    elif dtype == "f64":
        fn.emit(f"{r} = bitcast i64 {value} to double")
    else:
        fn.emit(f"{r} = trunc i64 {value} to {SCALAR[dtype]}")
    return r


def _outline(fn: _Fn, m: ModuleBuilder, k: Kernel, loop: For, dtypes: dict[str, str]) -> None:
    """Run ``loop`` as an OpenMP task: buffer pointers and the scalar variables it reads
    from the enclosing code travel in a context array of 8-byte slots."""
    if isinstance(loop.extent, Const) and loop.extent.value <= 1:
        # One iteration leaves nothing to share: a region would only wake the pool and wait
        # for it (BERT's batch-1 P @ V matmul at 2 threads: 10.2 us as a region, 7.9 without).
        # (A team loop of one step: its parallel loops get regions of their own.)
        fn.loop(replace(loop, kind="serial"), dtypes)
        return
    inner_decls = {s.var.name for s in K.walk_stmts(loop.body) if isinstance(s, (Decl, For))}
    inner_decls.add(loop.var.name)
    captured: dict[str, Var] = {}
    exprs = [loop.start, loop.extent] + [e for st in K.walk_stmts(loop.body)
                                         for e in K.stmt_exprs(st)]
    for e in exprs:
        for x in K.walk_expr(e):
            if isinstance(x, Var) and x.name not in inner_decls and x.name in fn.vars:
                captured[x.name] = Var(x.name, x.dtype, x.lanes)
    if any(v.lanes > 1 for v in captured.values()):
        fn.loop(replace(loop, kind="serial"), dtypes)
        return
    task = f"{k.name}.task{len(fn.tasks)}"
    fn.tasks.append(task)
    params = [b.name for b in k.params]
    # The last slot is the task's chunk counter (see _emit_task), zeroed before each run.
    nslots = len(params) + len(captured) + 1
    ctx = f"%ctx.{len(fn.tasks)}"
    fn.entry.append(f"  {ctx} = alloca i64, i64 {max(nslots, 1)}, align 8")
    for i, p in enumerate(params):
        slot = fn.tmp()
        fn.emit(f"{slot} = getelementptr i64, ptr {ctx}, i64 {i}")
        fn.emit(f"store ptr {fn.buffers[p]}, ptr {slot}")
    for i, v in enumerate(captured.values(), start=len(params)):
        slot = fn.tmp()
        val = _to_slot(fn, fn.expr(v), v.dtype)
        fn.emit(f"{slot} = getelementptr i64, ptr {ctx}, i64 {i}")
        fn.emit(f"store i64 {val}, ptr {slot}")
    counter = fn.tmp()
    fn.emit(f"{counter} = getelementptr i64, ptr {ctx}, i64 {nslots - 1}")
    fn.emit(f"store i64 0, ptr {counter}")
    nt, solo_p = "%nthreads", fn.tmp()
    # One thread: the task runs on the caller, without the OpenMP runtime (no pool round
    # trip; and after fork(), where libgomp's pool is gone, calls still work).
    solo, team, joined = fn.label("solo"), fn.label("team"), fn.label("joined")
    fn.emit(f"{solo_p} = icmp eq i32 {nt}, 1")
    fn.emit(f"br i1 {solo_p}, label %{solo}, label %{team}")
    fn.block(solo)
    fn.emit(f"call void @{task}(ptr {ctx})")
    fn.emit(f"br label %{joined}")
    fn.block(team)
    fn.emit(f"call void @GOMP_parallel(ptr @{task}, ptr {ctx}, i32 {nt}, i32 0)")
    fn.emit(f"br label %{joined}")
    fn.block(joined)
    _emit_task(m, task, k, loop, dtypes, list(captured.values()))


def _emit_task(m: ModuleBuilder, name: str, k: Kernel, loop: For,
               dtypes: dict[str, str], captured: Sequence[Var] = ()) -> None:
    fn = _Fn(m, name, ["ctx"])
    for i, b in enumerate(k.params):
        slot, p = fn.tmp(), f"%buf.{b.name}"
        fn.emit(f"{slot} = getelementptr i64, ptr %ctx, i64 {i}")
        fn.emit(f"{p} = load ptr, ptr {slot}")
        fn.buffers[b.name] = p
    for i, v in enumerate(captured, start=len(k.params)):
        slot, raw = fn.tmp(), fn.tmp()
        fn.emit(f"{slot} = getelementptr i64, ptr %ctx, i64 {i}")
        fn.emit(f"{raw} = load i64, ptr {slot}")
        val = _from_slot(fn, raw, v.dtype)
        ptr = fn.declare(v)
        fn.emit(f"store {llvm_type(v.dtype)} {val}, ptr {ptr}")
    _scratch_allocas(fn, k.scratch)
    if loop.kind == "team":
        _emit_team(fn, loop, dtypes)
        text = fn.text()
        m.functions.append(text.replace(f"define internal void @{name}(ptr noalias %ctx)",
                                        f"define internal void @{name}(ptr %ctx)"))
        return
    # Threads take chunks of [start, start + extent) from a shared counter until none is
    # left: a thread the OS has descheduled holds up one chunk, not a fixed share of the
    # loop (which, on a loaded machine, stalled every parallel region for a time slice).
    # A thread that starts late finds its share taken by the others.
    start, ext = fn.expr(loop.start), fn.expr(loop.extent)
    nt32 = fn.tmp()
    fn.emit(f"{nt32} = call i32 @omp_get_num_threads()")
    nt, parts, t1, t2, chunk0, chunk = (fn.tmp() for _ in range(6))
    fn.emit(f"{nt} = sext i32 {nt32} to i64")
    fn.emit(f"{parts} = mul i64 {nt}, {CHUNKS_PER_THREAD}")
    fn.emit(f"{t1} = add i64 {ext}, {parts}")
    fn.emit(f"{t2} = sub i64 {t1}, 1")
    fn.emit(f"{chunk0} = sdiv i64 {t2}, {parts}")
    fn.emit(f"{chunk} = call i64 @llvm.smax.i64(i64 {chunk0}, i64 1)")
    m.declare("llvm.smax.i64", "i64", ["i64", "i64"])
    slot, end = fn.tmp(), fn.tmp()
    fn.emit(f"{slot} = getelementptr i64, ptr %ctx, i64 {len(k.params) + len(captured)}")
    fn.emit(f"{end} = add i64 {start}, {ext}")
    grab, work, finished = fn.label("grab"), fn.label("work"), fn.label("finished")
    fn.emit(f"br label %{grab}")
    fn.block(grab)
    c, off, lo, more = fn.tmp(), fn.tmp(), fn.tmp(), fn.tmp()
    fn.emit(f"{c} = atomicrmw add ptr {slot}, i64 1 monotonic")
    fn.emit(f"{off} = mul i64 {c}, {chunk}")
    fn.emit(f"{lo} = add i64 {start}, {off}")
    fn.emit(f"{more} = icmp slt i64 {lo}, {end}")
    fn.emit(f"br i1 {more}, label %{work}, label %{finished}")
    fn.block(work)
    hi0, hi = fn.tmp(), fn.tmp()
    fn.emit(f"{hi0} = add i64 {lo}, {chunk}")
    fn.emit(f"{hi} = call i64 @llvm.smin.i64(i64 {hi0}, i64 {end})")
    m.declare("llvm.smin.i64", "i64", ["i64", "i64"])
    fn.loop(replace(loop, kind="serial"), dtypes, lo, hi)
    fn.emit(f"br label %{grab}")
    fn.block(finished)
    text = fn.text()
    m.functions.append(text.replace(f"define internal void @{name}(ptr noalias %ctx)",
                                    f"define internal void @{name}(ptr %ctx)"))

def _emit_team(fn: _Fn, loop: For, dtypes: dict[str, str]) -> None:
    """A ``team`` loop in its task: every thread runs the steps; each top-level parallel loop
    of a step takes this thread's static share (the same share every step: the rows a thread
    computes stay in its cache) and ends in a barrier; the other statements run on thread 0,
    then a barrier. Outside a region (one thread) the barriers return at once."""
    tid32, nt32, tid, nt = fn.tmp(), fn.tmp(), fn.tmp(), fn.tmp()
    fn.emit(f"{tid32} = call i32 @omp_get_thread_num()")
    fn.emit(f"{nt32} = call i32 @omp_get_num_threads()")
    fn.emit(f"{tid} = sext i32 {tid32} to i64")
    fn.emit(f"{nt} = sext i32 {nt32} to i64")
    first = fn.tmp()
    fn.emit(f"{first} = icmp eq i64 {tid}, 0")
    groups: list[tuple[str, list]] = []
    for st in loop.body:
        kind = ("parallel" if isinstance(st, For) and st.kind == "parallel" else
                "local" if isinstance(st, (Decl, Assign)) else "single")
        if groups and kind == groups[-1][0] == "single":
            groups[-1][1].append(st)
        else:
            groups.append((kind, [st]))

    def phases() -> None:
        for kind, stmts in groups:
            _emit_team_phase(fn, kind, stmts, dtypes, tid, nt, first)

    fn.loop(replace(loop, kind="serial"), dtypes, body=phases)


def _emit_team_phase(fn: _Fn, kind: str, stmts: list, dtypes: dict[str, str], tid: str,
                     nt: str, first: str) -> None:
    """One phase of a team step: locals on every thread; a parallel loop's static share of
    this thread, then a barrier; other statements on thread 0, then a barrier."""
    if kind == "local":
        fn.stmts(stmts, dtypes)
        return
    if kind == "parallel":
        (par,) = stmts
        start, ext = fn.expr(par.start), fn.expr(par.extent)
        t1, chunk, off, lo, end, hi0, hi = (fn.tmp() for _ in range(7))
        fn.emit(f"{t1} = add i64 {ext}, {nt}")
        fn.emit(f"{t1}.m = sub i64 {t1}, 1")
        fn.emit(f"{chunk} = sdiv i64 {t1}.m, {nt}")
        fn.emit(f"{off} = mul i64 {tid}, {chunk}")
        fn.emit(f"{lo} = add i64 {start}, {off}")
        fn.emit(f"{end} = add i64 {start}, {ext}")
        fn.emit(f"{hi0} = add i64 {lo}, {chunk}")
        fn.emit(f"{hi} = call i64 @llvm.smin.i64(i64 {hi0}, i64 {end})")
        fn.m.declare("llvm.smin.i64", "i64", ["i64", "i64"])
        fn.loop(replace(par, kind="serial"), dtypes, lo, hi)
    else:
        one, rest = fn.label("team_one"), fn.label("team_wait")
        fn.emit(f"br i1 {first}, label %{one}, label %{rest}")
        fn.block(one)
        fn.stmts(stmts, dtypes)
        fn.emit(f"br label %{rest}")
        fn.block(rest)
    fn.emit("call void @GOMP_barrier()")


def emit_entry(m: ModuleBuilder, calls: Sequence[tuple[Kernel, Sequence[Binding]]]) -> None:
    """The exported ``kiln_run(ptr inputs, ptr outputs, ptr arena, ptr consts, i32 nthreads)``.

    Each kernel call is timed with the CPU's cycle counter into ``@kiln_cycles[step]`` (a few
    cycles per kernel), which the profiler reads."""
    fn = _Fn(m, "kiln_run", ["inputs", "outputs", "arena", "consts"])
    fn.int_params = ["nthreads"]
    n = max(len(calls), 1)
    m.functions.append(f"@kiln_cycles = global [{n} x i64] zeroinitializer\n"
                       f"@kiln_steps = global i64 {len(calls)}\n")
    m.declare("llvm.readcyclecounter", "i64", [])
    for step, (k, bindings) in enumerate(calls):
        args = []
        for b in bindings:
            p = fn.tmp()
            if b.kind in ("input", "output"):
                slot = fn.tmp()
                fn.emit(f"{slot} = getelementptr ptr, ptr %{b.kind}s, i64 {b.index}")
                fn.emit(f"{p} = load ptr, ptr {slot}")
            else:
                base = "%arena" if b.kind == "arena" else "%consts"
                fn.emit(f"{p} = getelementptr i8, ptr {base}, i64 {b.index}")
            args.append(f"ptr {p}")
        args.append("i32 %nthreads")
        t0, t1, dt, slot, old, new = (fn.tmp() for _ in range(6))
        fn.emit(f"{t0} = call i64 @llvm.readcyclecounter()")
        fn.emit(f"call void @{k.name}({', '.join(args)})")
        fn.emit(f"{t1} = call i64 @llvm.readcyclecounter()")
        fn.emit(f"{dt} = sub i64 {t1}, {t0}")
        fn.emit(f"{slot} = getelementptr [{n} x i64], ptr @kiln_cycles, i64 0, i64 {step}")
        fn.emit(f"{old} = load i64, ptr {slot}")
        fn.emit(f"{new} = add i64 {old}, {dt}")
        fn.emit(f"store i64 {new}, ptr {slot}")
    text = fn.text(linkage="", attrs="").replace("ptr noalias %", "ptr %")
    m.functions.append(text)


# The integer dtypes an index input may have: (LLVM type, extension to i64).
_INDEX_TYPES = {"i64": ("i64", None), "i32": ("i32", "sext"), "i8": ("i8", "sext"),
                "u8": ("i8", "zext"), "bool": ("i8", "zext")}


def emit_index_check(m: ModuleBuilder,
                     checks: Sequence[tuple[int, str, int, int, int]]) -> None:
    """The exported ``i64 kiln_check(ptr inputs)``: for each check (input index, dtype,
    element count, lo, hi), in order, whether every element of that input lies in [lo, hi);
    the number of the first check that fails, or -1. The kernels clamp every index they read
    (memory stays safe whatever the input); this is how a caller learns that the answer would
    have been computed from clamped indices, in one native call instead of NumPy reductions
    on the per-call path (BERT int8: 30 us of its 470)."""
    lines = ["define i64 @kiln_check(ptr %inputs) {", "entry:"]
    for c, (index, dtype, count, lo, hi) in enumerate(checks):
        ty, ext = _INDEX_TYPES[dtype]
        nxt = f"next{c}" if c + 1 < len(checks) else "ok"
        lines += [
            f"  %slot{c} = getelementptr ptr, ptr %inputs, i64 {index}",
            f"  %base{c} = load ptr, ptr %slot{c}",
            f"  br label %loop{c}",
            f"loop{c}:",
            f"  %i{c} = phi i64 [0, %{'entry' if c == 0 else f'next{c - 1}'}], "
            f"[%i{c}n, %loop{c}]",
            f"  %bad{c} = phi i1 [false, %{'entry' if c == 0 else f'next{c - 1}'}], "
            f"[%bad{c}n, %loop{c}]",
            f"  %p{c} = getelementptr {ty}, ptr %base{c}, i64 %i{c}",
            f"  %v{c}r = load {ty}, ptr %p{c}",
            (f"  %v{c} = {ext} {ty} %v{c}r to i64" if ext else f"  %v{c} = add i64 %v{c}r, 0"),
            f"  %lo{c} = icmp slt i64 %v{c}, {lo}",
            f"  %hi{c} = icmp sge i64 %v{c}, {hi}",
            f"  %out{c} = or i1 %lo{c}, %hi{c}",
            f"  %bad{c}n = or i1 %bad{c}, %out{c}",
            f"  %i{c}n = add i64 %i{c}, 1",
            f"  %more{c} = icmp ult i64 %i{c}n, {count}",
            f"  br i1 %more{c}, label %loop{c}, label %done{c}",
            f"done{c}:",
            f"  br i1 %bad{c}n, label %fail{c}, label %{nxt}",
            f"fail{c}:",
            f"  ret i64 {c}",
        ]
        if nxt != "ok":
            lines.append(f"{nxt}:")
    if checks:
        lines.append("ok:")
    lines += ["  ret i64 -1", "}"]
    m.functions.append("\n".join(lines) + "\n")
