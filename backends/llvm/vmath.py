"""Vector math for the LLVM backend: exp, tanh and erf on float32 vectors as inline LLVM IR.

LLVM has no vector tanh/erf, and its vector exp becomes one libm call per lane. These are
branch-free polynomial versions that run on whole vectors:
- exp: Cody-Waite reduction x = n*ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial for e^r,
  scaling by 2^n through the exponent bits (in two halves, so e^88.7 does not overflow early);
  NaN propagates, large arguments give inf / 0. Error within a few ulp.
- tanh: sign(x) * (1 - 2 / (exp(2|x|) + 1)); absolute error below 1e-7.
- erf: x * P(x^2) / Q(x^2) on |x| <= 3.92 (a rational minimax fit, degrees 6 and 5), +-1
  beyond; absolute error below 4e-7.
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
    # maxnum / minnum drop a NaN; the select at the end gives it back.
    xc = b.intr("minnum", b.intr("maxnum", "%x", b.c(-ERF_CLAMP)), b.c(ERF_CLAMP))
    t = b.f("fmul", xc, xc)
    y = b.f("fdiv", b.f("fmul", xc, b.poly(t, list(ERF_P))), b.poly(t, list(ERF_Q)))
    return name, b.function(name, b.select(b.cmp("uno", "%x", "%x"), "%x", y))


BUILDERS = {"exp": exp_function, "tanh": tanh_function, "erf": erf_function}
