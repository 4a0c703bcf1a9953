"""Symbolic sizes: a dimension that is a formula of named sizes (``batch``, ``seq``).

A ``SymDim`` is a polynomial with integer coefficients in size names, such as ``batch``,
``batch*seq`` or ``seq+1``; a dimension of a ``TensorType`` is an ``int`` or a ``SymDim``.
Every name has bounds (``1 <= batch <= 4096``), declared once per graph (``Graph.sizes``) and
carried by each ``SymDim`` that uses the name, so the shape rules can decide comparisons such
as "a slice end ``seq`` is at most the position table's 512 rows" for every size the graph
admits. A comparison that holds for some sizes and not for others is a ShapeError naming the
sizes: the rule cannot be stated for all of them.

Arithmetic stays exact: ``+``, ``-``, ``*`` of polynomials; ``//`` and ``%`` by a number where
every size term divides (``(2*h+1)//2 == h``), or by a single term that divides every term
(``batch*seq*768 // (batch*seq) == 768``). Anything else (a strided window over a dynamic
dimension: ``(h-1)//2``) has no polynomial and raises a ShapeError; the caller says what to
make static. A polynomial whose size terms cancel is an ``int``: a ``SymDim`` is never constant.

The text form (``format_dim`` / ``parse_dim``) is the polynomial expanded: ``2*batch*seq+1``,
``seq^2``. Parsing reads only that grammar (numbers, names, ``+ - * ^``): no evaluation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from kiln.ir.errors import ShapeError

Monomial = tuple[tuple[str, int], ...]
"""Size names with their powers, sorted by name; ``()`` is the constant term."""

MAX_SIZE = 1 << 20
"""The default upper bound of a size."""


class SymDim:
    """A polynomial in size names (see the module docstring). Immutable and hashable; two
    are equal when their expanded terms are."""

    __slots__ = ("_terms", "_bounds", "_hash")

    def __init__(self, terms: Mapping[Monomial, int], bounds: Mapping[str, tuple[int, int]]):
        kept = {m: int(c) for m, c in terms.items() if c}
        names = {n for m in kept for n, _ in m}
        missing = names - set(bounds)
        if missing:
            raise ShapeError(f"size {sorted(missing)[0]} has no bounds")
        self._terms: tuple[tuple[Monomial, int], ...] = tuple(
            sorted(kept.items(), key=lambda mc: (-_degree(mc[0]), mc[0])))
        self._bounds: tuple[tuple[str, int, int], ...] = tuple(
            (n, *bounds[n]) for n in sorted(names))
        self._hash = hash(self._terms)

    # ---- construction ---------------------------------------------------------------------
    @staticmethod
    def named(name: str, lo: int = 1, hi: int = MAX_SIZE) -> SymDim:
        """The size ``name``, which takes any value in ``[lo, hi]`` (``1 <= lo <= hi``)."""
        check_size_name(name)
        lo, hi = int(lo), int(hi)
        if not 1 <= lo <= hi:
            raise ShapeError(f"size {name} has bounds [{lo}, {hi}]",
                             hint="a size is at least 1 and its minimum at most its maximum")
        return SymDim({((name, 1),): 1}, {name: (lo, hi)})

    @property
    def terms(self) -> dict[Monomial, int]:
        return dict(self._terms)

    @property
    def bounds(self) -> dict[str, tuple[int, int]]:
        """The bounds of every size name this formula uses."""
        return {n: (lo, hi) for n, lo, hi in self._bounds}

    @property
    def names(self) -> frozenset[str]:
        return frozenset(n for n, _, _ in self._bounds)

    @property
    def name(self) -> str | None:
        """The size name when this is exactly one size (``batch``), else None."""
        if len(self._terms) == 1:
            (mono, coef), = self._terms
            if coef == 1 and len(mono) == 1 and mono[0][1] == 1:
                return mono[0][0]
        return None

    # ---- evaluation -----------------------------------------------------------------------
    def evaluate(self, sizes: Mapping[str, int]) -> int:
        """The number at ``sizes`` (every name given)."""
        return sum(c * math.prod(int(sizes[n]) ** k for n, k in m) for m, c in self._terms)

    def substitute(self, sizes: Mapping[str, int]) -> Dim:
        """The formula with the given names replaced by numbers (an int when none is left)."""
        out: dict[Monomial, int] = {}
        for mono, coef in self._terms:
            rest = []
            for n, k in mono:
                if n in sizes:
                    coef *= int(sizes[n]) ** k
                else:
                    rest.append((n, k))
            out[tuple(rest)] = out.get(tuple(rest), 0) + coef
        return _make(out, self.bounds)

    def interval(self) -> tuple[int, int]:
        """The smallest and largest value over the sizes' bounds (interval arithmetic: sound,
        and exact when all size terms have one sign)."""
        bounds = self.bounds
        lo = hi = 0
        for mono, coef in self._terms:
            a = math.prod(bounds[n][0] ** k for n, k in mono)
            b = math.prod(bounds[n][1] ** k for n, k in mono)
            lo += coef * (a if coef > 0 else b)
            hi += coef * (b if coef > 0 else a)
        return lo, hi

    # ---- arithmetic -----------------------------------------------------------------------
    def _combine(self, other: object, sign: int) -> Dim:
        o = _as_terms(other)
        if o is None:
            return NotImplemented
        terms, bounds = o
        out = dict(self._terms)
        for m, c in terms.items():
            out[m] = out.get(m, 0) + sign * c
        return _make(out, _merge_bounds(self.bounds, bounds))

    def __add__(self, other: object) -> Dim:
        return self._combine(other, 1)

    __radd__ = __add__

    def __sub__(self, other: object) -> Dim:
        return self._combine(other, -1)

    def __rsub__(self, other: object) -> Dim:
        neg = -self
        return neg + other

    def __neg__(self) -> SymDim:
        return SymDim({m: -c for m, c in self._terms}, self.bounds)

    def __mul__(self, other: object) -> Dim:
        o = _as_terms(other)
        if o is None:
            return NotImplemented
        terms, bounds = o
        out: dict[Monomial, int] = {}
        for m1, c1 in self._terms:
            for m2, c2 in terms.items():
                m = _mono_mul(m1, m2)
                out[m] = out.get(m, 0) + c1 * c2
        return _make(out, _merge_bounds(self.bounds, bounds))

    __rmul__ = __mul__

    def __pow__(self, k: int) -> SymDim:
        """``self`` multiplied by itself ``k`` times (``k >= 1``)."""
        if _plain_int(k) is None or k < 1:
            return NotImplemented
        out: Dim = self
        for _ in range(k - 1):
            out = out * self
        return out

    def __floordiv__(self, other: object) -> Dim:
        if isinstance(other, SymDim):
            return _div_by_term(self, other)
        d = _plain_int(other)
        if d is None:
            return NotImplemented
        if d <= 0:
            raise ShapeError(f"size {self} divided by {d}")
        if any(c % d for m, c in self._terms if m):
            raise ShapeError(f"size {self} divided by {d} has no formula in the sizes",
                             hint="make this dimension static")
        out = {m: (c // d) for m, c in self._terms}
        return _make(out, self.bounds)

    def __rfloordiv__(self, other: object) -> Dim:
        d = _plain_int(other)
        if d is None:
            return NotImplemented
        raise ShapeError(f"{d} divided by size {self} has no formula in the sizes",
                         hint="make this dimension static")

    def __mod__(self, other: object) -> int:
        d = _plain_int(other)
        if d is None or d <= 0:
            if isinstance(other, SymDim):
                return 0 if _div_by_term(self, other, check_only=True) else self._undecided(
                    f"{self} % {other}")
            return NotImplemented
        if any(c % d for m, c in self._terms if m):
            return self._undecided(f"{self} % {d}")
        return dict(self._terms).get((), 0) % d

    def __rmod__(self, other: object) -> int:
        d = _plain_int(other)
        if d is None:
            return NotImplemented
        return self._undecided(f"{d} % {self}")

    # ---- comparisons ----------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if isinstance(other, SymDim):
            return self._terms == other._terms
        if _plain_int(other) is not None:
            return False                           # a SymDim is never constant
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return self._hash

    def _sign_of(self, other: object, what: str) -> tuple[int, int]:
        """The interval of ``self - other``."""
        if _as_terms(other) is None:
            raise TypeError(f"cannot compare a size with {type(other).__name__} ({what})")
        diff = self - other
        return (diff, diff) if isinstance(diff, int) else diff.interval()

    def __lt__(self, other: object) -> bool:
        lo, hi = self._sign_of(other, "<")
        return self._decide(hi < 0, lo >= 0, f"{self} < {other}")

    def __le__(self, other: object) -> bool:
        lo, hi = self._sign_of(other, "<=")
        return self._decide(hi <= 0, lo > 0, f"{self} <= {other}")

    def __gt__(self, other: object) -> bool:
        lo, hi = self._sign_of(other, ">")
        return self._decide(lo > 0, hi <= 0, f"{self} > {other}")

    def __ge__(self, other: object) -> bool:
        lo, hi = self._sign_of(other, ">=")
        return self._decide(lo >= 0, hi < 0, f"{self} >= {other}")

    def __bool__(self) -> bool:
        lo, hi = self.interval()
        return self._decide(lo > 0 or hi < 0, lo == hi == 0, f"{self} != 0")

    def _decide(self, true: bool, false: bool, what: str) -> bool:
        if true:
            return True
        if false:
            return False
        return self._undecided(what)

    def _undecided(self, what: str):
        bounds = ", ".join(f"{lo} <= {n} <= {hi}" for n, (lo, hi) in self.bounds.items())
        raise ShapeError(f"{what} holds for some sizes and not others ({bounds})",
                         hint="tighten the sizes' bounds (dynamic={...: {dim: "
                              "torch.export.Dim(name, min=..., max=...)}}) or make this "
                              "dimension static")

    def __int__(self) -> int:
        raise ShapeError(f"dimension {self} is dynamic here, a number is needed",
                         hint="make this dimension static")

    __index__ = __int__

    def __str__(self) -> str:
        return format_dim(self)

    def __repr__(self) -> str:
        return f"SymDim({format_dim(self)!r})"


Dim = int | SymDim
"""A dimension: a number, or a formula of the sizes."""


def _degree(mono: Monomial) -> int:
    return sum(k for _, k in mono)


def _mono_mul(a: Monomial, b: Monomial) -> Monomial:
    powers = dict(a)
    for n, k in b:
        powers[n] = powers.get(n, 0) + k
    return tuple(sorted(powers.items()))


def _plain_int(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    try:
        import numpy as np  # noqa: PLC0415 (numbers from NumPy shapes and attributes)
    except ImportError:                            # pragma: no cover
        return None
    return int(v) if isinstance(v, np.integer) else None


def _as_terms(v: object) -> tuple[dict[Monomial, int], dict[str, tuple[int, int]]] | None:
    if isinstance(v, SymDim):
        return v.terms, v.bounds
    i = _plain_int(v)
    return None if i is None else ({(): i}, {})


def _merge_bounds(a: Mapping[str, tuple[int, int]], b: Mapping[str, tuple[int, int]]
                  ) -> dict[str, tuple[int, int]]:
    out = dict(a)
    for n, bd in b.items():
        if n in out and out[n] != tuple(bd):
            raise ShapeError(f"size {n} has two bounds: {list(out[n])} and {list(bd)}",
                             hint="declare each size once")
        out[n] = tuple(bd)
    return out


def _make(terms: Mapping[Monomial, int], bounds: Mapping[str, tuple[int, int]]) -> Dim:
    kept = {m: c for m, c in terms.items() if c}
    if all(not m for m in kept):
        return int(kept.get((), 0))
    names = {n for m in kept for n, _ in m}
    return SymDim(kept, {n: bounds[n] for n in names})


def _div_by_term(x: SymDim, d: SymDim, check_only: bool = False):
    """``x // d`` for a single-term ``d`` that divides every term of ``x`` exactly."""
    dt = d.terms
    ok = len(dt) == 1
    if ok:
        (dm, dc), = dt.items()
        dp = dict(dm)
        out: dict[Monomial, int] = {}
        for m, c in x.terms.items():
            p = dict(m)
            if c % dc or any(p.get(n, 0) < k for n, k in dp.items()):
                ok = False
                break
            q = tuple(sorted((n, k - dp.get(n, 0)) for n, k in p.items() if k - dp.get(n, 0)))
            out[q] = c // dc
    if check_only:
        return ok
    if not ok:
        raise ShapeError(f"size {x} divided by {d} has no formula in the sizes",
                         hint="make this dimension static")
    return _make(out, x.bounds)


# ---- names, text -----------------------------------------------------------------------------
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_size_name(name: str) -> str:
    """``name`` if it can name a size (an identifier); a ShapeError otherwise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ShapeError(f"{name!r} cannot name a size", hint="use an identifier such as 'batch'")
    return name


def format_dim(d: Dim) -> str:
    """A dimension as text: the number, or the expanded formula (``2*batch*seq+1``)."""
    if not isinstance(d, SymDim):
        return str(int(d))
    parts = []
    for mono, coef in d.terms.items():
        factors = [n if k == 1 else f"{n}^{k}" for n, k in mono]
        mag = abs(coef)
        body = "*".join(([str(mag)] if mag != 1 or not factors else []) + factors)
        parts.append(("-" if coef < 0 else "+") + body)
    text = "".join(parts)
    return text[1:] if text.startswith("+") else text


_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|([-+*^]))")
MAX_DIM_TEXT = 256


def parse_dim(text: str, bounds: Mapping[str, tuple[int, int]]) -> Dim:
    """A dimension from its text form; every name must be in ``bounds``. A ShapeError for
    anything outside the grammar (sums of products of numbers and ``name`` or ``name^k``)."""
    if not isinstance(text, str) or len(text) > MAX_DIM_TEXT:
        raise ShapeError(f"bad dimension {str(text)[:40]!r}")
    pos, tokens = 0, []
    s = text.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            raise ShapeError(f"bad dimension {text!r}",
                             hint="a dimension is a number or a formula like 2*batch*seq+1")
        tokens.append(m.groups())
        pos = m.end()
    total: Dim = 0
    i, sign = 0, 1
    if tokens and tokens[0][2] in ("+", "-"):
        sign = -1 if tokens[0][2] == "-" else 1
        i = 1
    while True:
        term: Dim = sign
        while True:
            if i >= len(tokens) or tokens[i][2]:
                raise ShapeError(f"bad dimension {text!r}")
            num, name, _ = tokens[i]
            i += 1
            if num is not None:
                if len(num) > 12:
                    raise ShapeError(f"dimension {text!r} is too large")
                factor: Dim = int(num)
            else:
                if name not in bounds:
                    raise ShapeError(f"size {name} in {text!r} is not declared",
                                     hint="declare it: 'size NAME in LO..HI'")
                factor = SymDim.named(name, *bounds[name])
                if i + 1 < len(tokens) and tokens[i][2] == "^" and tokens[i + 1][0]:
                    power = int(tokens[i + 1][0])
                    if not 1 <= power <= 8:
                        raise ShapeError(f"power {power} in {text!r} is out of range")
                    factor = factor ** power
                    i += 2
            term = term * factor
            if i < len(tokens) and tokens[i][2] == "*":
                i += 1
                continue
            break
        total = total + term
        if i >= len(tokens):
            return total
        op = tokens[i][2]
        if op not in ("+", "-"):
            raise ShapeError(f"bad dimension {text!r}")
        sign = 1 if op == "+" else -1
        i += 1


def is_static(shape) -> bool:
    """Whether every dimension of ``shape`` is a number."""
    return not any(isinstance(d, SymDim) for d in shape)


def size_names(shape) -> set[str]:
    """The size names used by the dimensions of ``shape``."""
    return {n for d in shape if isinstance(d, SymDim) for n in d.names}


def substitute(value, sizes: Mapping[str, int]):
    """``value`` (a dimension, or nested tuples, lists or dicts of them and other attribute
    values) with the given sizes replaced by numbers."""
    if isinstance(value, SymDim):
        return value.substitute(sizes)
    if isinstance(value, dict):
        return {k: substitute(v, sizes) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(substitute(v, sizes) for v in value)
    return value
