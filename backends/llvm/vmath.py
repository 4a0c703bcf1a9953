"""Vector math for the LLVM backend: exp, tanh and erf on float32 vectors as inline LLVM IR.

LLVM has no vector tanh/erf, and its vector exp becomes one libm call per lane. These are
branch-free polynomial versions that run on whole vectors:
- exp: Cody-Waite reduction x = n*ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial for e^r,
  scaling by 2^n through the exponent bits (in two halves, so e^88.7 does not overflow early);
  NaN propagates, large arguments give inf / 0. Error within a few ulp.
- tanh: sign(x) * (1 - 2 / (exp(2|x|) + 1)); absolute error below 1e-7.
- erf: x * P(x^2) / Q(x^2) on |x| <= 3.92 (a rational minimax fit, degrees 6 and 5), +-1
  beyond; absolute error below 4e-7.
- sin, cos: x = n*pi/2 + r reduced in float64 (pi/2 in three parts, fused multiply-adds), so
  r is exact to float32 precision however close x lies to a multiple of pi/2; Cephes' float32
  polynomials on |r| <= pi/4 and the quadrant n mod 4 pick the sign and the function. Past
  |x| = 2^30 (where n would leave int32) the lanes go to libm's sinf / cosf, one call each:
  a branch no ordinary input takes. Relative error about 2e-7.
- atan: Cephes' reduction to |t| <= tan(pi/8) (atan(x) = pi/2 + atan(-1/x), pi/4 +
  atan((x-1)/(x+1))) and its degree-4 polynomial in t^2; relative error below 2e-7.
"""

from __future__ import annotations

import math

from kiln.backends.llvm.codegen import float_literal


class _Straight:
    """Builds a straight-line LLVM function over ``<lanes x float>`` (or float)."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        self.t = "float" if lanes == 1 else f"<{lanes} x float>"
        self.it = "i32" if lanes == 1 else f"<{lanes} x i32>"
        self.bt = "i1" if lanes == 1 else f"<{lanes} x i1>"
        self.lines: list[str] = []
        self.n = 0
        self.sfx = "f32" if lanes == 1 else f"v{lanes}f32"

    def _splat(self, elem: str, s: str) -> str:
        return s if self.lanes == 1 else "<" + ", ".join([f"{elem} {s}"] * self.lanes) + ">"

    def c(self, v: float) -> str:
        return self._splat("float", float_literal(v, "f32"))

    def ci(self, v: int) -> str:
        return self._splat("i32", str(v))

    def _new(self) -> str:
        self.n += 1
        return f"%m{self.n}"

    def f(self, inst: str, a: str, b: str) -> str:
        r = self._new()
        self.lines.append(f"  {r} = {inst} {self.t} {a}, {b}")
        return r

    def fma(self, a: str, b: str, c: str) -> str:
        r = self._new()
        self.lines.append(f"  {r} = call {self.t} @llvm.fma.{self.sfx}({self.t} {a}, "
                          f"{self.t} {b}, {self.t} {c})")
        return r

    def intr(self, name: str, *args: str) -> str:
        r = self._new()
        argtext = ", ".join(f"{self.t} {a}" for a in args)
        self.lines.append(f"  {r} = call {self.t} @llvm.{name}.{self.sfx}({argtext})")
        return r

    def cmp(self, pred: str, a: str, b: str) -> str:
        r = self._new()
        self.lines.append(f"  {r} = fcmp {pred} {self.t} {a}, {b}")
        return r

    def select(self, c: str, a: str, b: str) -> str:
        r = self._new()
        self.lines.append(f"  {r} = select {self.bt} {c}, {self.t} {a}, {self.t} {b}")
        return r

    def raw(self, text: str) -> str:
        r = self._new()
        self.lines.append(f"  {r} = {text}")
        return r

    def poly(self, x: str, coeffs: list[float]) -> str:
        """c0 + x*(c1 + x*(c2 + ...)) by Horner with fused multiply-adds."""
        acc = self.c(coeffs[-1])
        for c in reversed(coeffs[:-1]):
            acc = self.fma(acc, x, self.c(c))
        return acc

    def function(self, name: str, body_result: str) -> str:
        return (f"define internal {self.t} @{name}({self.t} %x) alwaysinline {{\n"
                + "\n".join(self.lines) + f"\n  ret {self.t} {body_result}\n}}\n")


def _exp_body(b: _Straight, x: str) -> str:
    xc = b.intr("minimum", b.intr("maximum", x, b.c(-104.0)), b.c(88.8))
    n = b.intr("rint", b.f("fmul", xc, b.c(1.4426950408889634)))
    r = b.fma(n, b.c(-0.693359375), xc)
    r = b.fma(n, b.c(2.12194440e-4), r)
    p = b.poly(r, [1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040])
    ni = b.raw(f"fptosi {b.t} {n} to {b.it}")
    n1 = b.raw(f"ashr {b.it} {ni}, {b.ci(1)}")
    n2 = b.raw(f"sub {b.it} {ni}, {n1}")
    scales = []
    for part in (n1, n2):
        e = b.raw(f"add {b.it} {part}, {b.ci(127)}")
        e = b.raw(f"shl {b.it} {e}, {b.ci(23)}")
        scales.append(b.raw(f"bitcast {b.it} {e} to {b.t}"))
    y = b.f("fmul", b.f("fmul", p, scales[0]), scales[1])
    y = b.select(b.cmp("ogt", x, b.c(88.72283935546875)), b.c(math.inf), y)
    y = b.select(b.cmp("olt", x, b.c(-103.97)), b.c(0.0), y)
    return b.select(b.cmp("uno", x, x), x, y)


def exp_function(lanes: int) -> tuple[str, str]:
    """(name, LLVM IR) of the vector exp for ``lanes`` float32 lanes."""
    b = _Straight(lanes)
    name = f"kiln.exp.{b.sfx}"
    return name, b.function(name, _exp_body(b, "%x"))


def tanh_function(lanes: int) -> tuple[str, str]:
    b = _Straight(lanes)
    name = f"kiln.tanh.{b.sfx}"
    ax = b.intr("fabs", "%x")
    e = _exp_body(b, b.f("fmul", ax, b.c(2.0)))
    t = b.f("fsub", b.c(1.0), b.f("fdiv", b.c(2.0), b.f("fadd", e, b.c(1.0))))
    # Tiny arguments: tanh(x) = x to float precision (and keeps the sign of -0.0).
    t = b.select(b.cmp("olt", ax, b.c(1e-4)), ax, t)
    y = b.intr("copysign", t, "%x")
    return name, b.function(name, b.select(b.cmp("uno", "%x", "%x"), "%x", y))


# erf(x) = x * P(x^2) / Q(x^2) on |x| <= ERF_CLAMP, fitted for kiln (minimax, Lawson's
# iteration in float64: 4.7e-9 there); past the clamp erf is +-1 to float32 precision
# (erf(3.92) = 1 - 5.6e-9).
ERF_CLAMP = 3.92
ERF_P = (1.128379225730896, 0.1846514493227005, 0.05421404168009758, 0.0038224966265261173,
         0.00037778468686155975, 4.6514260247931816e-06, -1.299266561005652e-08)
ERF_Q = (1.0, 0.4969766139984131, 0.1137038990855217, 0.015402693301439285,
         0.0012994806747883558, 6.278391811065376e-05)


def erf_function(lanes: int) -> tuple[str, str]:
    """erf as one rational function: 12 multiply-adds and one division per vector (the
    Taylor series plus Abramowitz-Stegun tail it replaces took an exp and a division more,
    and made BERT's GELU epilogues twice as slow). Absolute error below 4e-7 in float32."""
    b = _Straight(lanes)
    name = f"kiln.erf.{b.sfx}"
    # The clamp as compare-and-select keeps a NaN (an ordered compare is false for it), and
    # is one vminps / vmaxps each on x86, where minnum / maxnum drop the NaN and take three
    # instructions, plus a compare and a blend at the end to give the NaN back: a quarter
    # of the function, in BERT's GELU epilogues that run on every activation.
    xc = b.select(b.cmp("olt", "%x", b.c(-ERF_CLAMP)), b.c(-ERF_CLAMP), "%x")
    xc = b.select(b.cmp("ogt", xc, b.c(ERF_CLAMP)), b.c(ERF_CLAMP), xc)
    t = b.f("fmul", xc, xc)
    y = b.f("fdiv", b.f("fmul", xc, b.poly(t, list(ERF_P))), b.poly(t, list(ERF_Q)))
    return name, b.function(name, y)


# pi/2 = PIO2[0] + PIO2[1] + PIO2[2] to about 160 bits (each part the double nearest the rest).
PIO2 = (1.5707963267948966, 6.123233995736766e-17, -1.4973849048591698e-33)
# Cephes sinf / cosf: sin r = r + r^3 * S(r^2), cos r = 1 - r^2/2 + r^4 * C(r^2), |r| <= pi/4.
SIN_S = (-1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4)
COS_C = (4.166664568298827e-2, -1.388731625493765e-3, 2.443315711809948e-5)
# Above this |x| the quadrant number leaves int32: libm takes those lanes.
TRIG_LIMIT = 2.0 ** 30
# The libm function a vector sin / cos falls back to for huge arguments (declare it).
LIBM_FALLBACK = {"sin": "sinf", "cos": "cosf"}


def _trig_function(op: str, lanes: int) -> tuple[str, str]:
    """sin (``op`` "sin") or cos: reduction in float64, polynomials in float32 (see the module
    docstring), and a libm branch for the lanes past ``TRIG_LIMIT``."""
    b = _Straight(lanes)
    name = f"kiln.{op}.{b.sfx}"
    dt = "double" if lanes == 1 else f"<{lanes} x double>"
    dsfx = "f64" if lanes == 1 else f"v{lanes}f64"

    def d(v: float) -> str:
        return b._splat("double", float_literal(v, "f64"))

    def dcall(fn: str, *args: str) -> str:
        return b.raw(f"call {dt} @llvm.{fn}.{dsfx}(" + ", ".join(f"{dt} {a}" for a in args)
                     + ")")

    xd = b.raw(f"fpext {b.t} %x to {dt}")
    n = dcall("rint", b.raw(f"fmul {dt} {xd}, {d(2 / math.pi)}"))
    # maxnum / minnum also turn a NaN quadrant into a number, so fptosi is never poison (the
    # NaN itself still flows through r).
    n = dcall("minnum", dcall("maxnum", n, d(-TRIG_LIMIT)), d(TRIG_LIMIT))
    neg_n = b.raw(f"fneg {dt} {n}")
    r = xd
    for part in PIO2:
        r = dcall("fma", neg_n, d(part), r)
    rf = b.raw(f"fptrunc {dt} {r} to {b.t}")
    q = b.raw(f"fptosi {dt} {n} to {b.it}")
    if op == "cos":
        q = b.raw(f"add {b.it} {q}, {b.ci(1)}")
    z = b.f("fmul", rf, rf)
    sin_r = b.fma(b.f("fmul", rf, z), b.poly(z, list(SIN_S)), rf)
    cos_r = b.fma(b.f("fmul", z, z), b.poly(z, list(COS_C)), b.fma(z, b.c(-0.5), b.c(1.0)))
    odd = b.raw(f"and {b.it} {q}, {b.ci(1)}")
    odd = b.raw(f"icmp ne {b.it} {odd}, {b.ci(0)}")
    v = b.select(odd, cos_r, sin_r)
    half = b.raw(f"and {b.it} {q}, {b.ci(2)}")
    half = b.raw(f"icmp ne {b.it} {half}, {b.ci(0)}")
    fast = b.select(half, b.raw(f"fneg {b.t} {v}"), v)
    if op == "sin":  # sin x = x to float32 precision below 2^-12, -0.0 included
        fast = b.select(b.cmp("olt", b.intr("fabs", "%x"), b.c(2.0 ** -12)), "%x", fast)
    big = b.cmp("ogt", b.intr("fabs", "%x"), b.c(TRIG_LIMIT))
    anybig = big if lanes == 1 else b.raw(f"call i1 @llvm.vector.reduce.or.v{lanes}i1("
                                          f"{b.bt} {big})")
    libm = LIBM_FALLBACK[op]
    if lanes == 1:
        slow = ["  %s0 = call float @" + libm + "(float %x)"]
        slow_value = "%s0"
    else:
        slow, acc = [], "poison"
        for i in range(lanes):
            slow += [f"  %e{i} = extractelement {b.t} %x, i64 {i}",
                     f"  %r{i} = call float @{libm}(float %e{i})",
                     f"  %v{i} = insertelement {b.t} {acc}, float %r{i}, i64 {i}"]
            acc = f"%v{i}"
        slow.append(f"  %s0 = select {b.bt} {big}, {b.t} {acc}, {b.t} {fast}")
        slow_value = "%s0"
    return name, (f"define internal {b.t} @{name}({b.t} %x) alwaysinline {{\nentry:\n"
                  + "\n".join(b.lines)
                  + f"\n  br i1 {anybig}, label %huge, label %done\nhuge:\n"
                  + "\n".join(slow)
                  + "\n  br label %done\ndone:\n"
                  + f"  %y = phi {b.t} [{fast}, %entry], [{slow_value}, %huge]\n"
                  + f"  ret {b.t} %y\n}}\n")


def sin_function(lanes: int) -> tuple[str, str]:
    """(name, LLVM IR) of the vector sine for ``lanes`` float32 lanes."""
    return _trig_function("sin", lanes)


def cos_function(lanes: int) -> tuple[str, str]:
    """(name, LLVM IR) of the vector cosine for ``lanes`` float32 lanes."""
    return _trig_function("cos", lanes)


ATAN_P = (-3.33329491539e-1, 1.99777106478e-1, -1.38776856032e-1, 8.05374449538e-2)


def atan_function(lanes: int) -> tuple[str, str]:
    """(name, LLVM IR) of the vector arc tangent for ``lanes`` float32 lanes, branch-free."""
    b = _Straight(lanes)
    name = f"kiln.atan.{b.sfx}"
    a = b.intr("fabs", "%x")
    big = b.cmp("ogt", a, b.c(2.414213562373095))  # tan(3 pi / 8)
    mid = b.cmp("ogt", a, b.c(0.41421356237309503))  # tan(pi / 8)
    far = b.f("fdiv", b.c(-1.0), a)
    near = b.f("fdiv", b.f("fsub", a, b.c(1.0)), b.f("fadd", a, b.c(1.0)))
    t = b.select(big, far, b.select(mid, near, a))
    y0 = b.select(big, b.c(math.pi / 2), b.select(mid, b.c(math.pi / 4), b.c(0.0)))
    z = b.f("fmul", t, t)
    y = b.fma(b.f("fmul", b.poly(z, list(ATAN_P)), z), t, t)
    y = b.intr("copysign", b.f("fadd", y, y0), "%x")
    return name, b.function(name, b.select(b.cmp("uno", "%x", "%x"), "%x", y))


BUILDERS = {"exp": exp_function, "tanh": tanh_function, "erf": erf_function,
            "sin": sin_function, "cos": cos_function, "atan": atan_function}
