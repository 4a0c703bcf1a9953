"""Sizes as formulas of a model's dynamic dimensions, read off graphs built at probe sizes.

kiln's IR is static: a graph holds the sizes of one call. To write a graph that holds for every
size (an ONNX file with ``dim_param``s, a compressed graph re-typed for a new batch), kiln builds
it at a few *probe sizes* and compares: a number that stays put is static, one that moves is a
size term ``c * batch^i * seq^j ...`` fitted from the probes. The probes are chosen so that this
is decidable: a base point, one point per size name where only that name moves, and a last
point where all move at once (which checks the fit, cross terms included). A number that moves
but fits no term (an arange folded into a constant, a size-dependent float) has no formula,
and the caller refuses it rather than freeze the base size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kiln.ir import KilnError

# Probe values start at small primes, not at 1: at size 1 the optimizer may drop a broadcast
# or reshape that every other size needs, and distinct primes keep two names from coinciding.
_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23)
_MAX_POWER = 4


@dataclass(frozen=True)
class SizeTerm:
    """``coef * prod(name ** power)``: a number that depends on the dynamic sizes."""

    coef: int
    powers: tuple[tuple[str, int], ...]

    def evaluate(self, sizes: Mapping[str, int]) -> int:
        """The number at ``sizes``."""
        return self.coef * math.prod(sizes[n] ** k for n, k in self.powers)

    @property
    def name(self) -> str | None:
        """The size name when the term is exactly one size (``batch``), else None."""
        if self.coef == 1 and len(self.powers) == 1 and self.powers[0][1] == 1:
            return self.powers[0][0]
        return None

    def __str__(self) -> str:
        factors = [n if k == 1 else f"{n}^{k}" for n, k in self.powers]
        return "*".join(([str(self.coef)] if self.coef != 1 else []) + factors)


Size = int | SizeTerm
"""A static number, or a term of the dynamic sizes."""


def probe_sizes(bounds: Mapping[str, tuple[int, int]]) -> list[dict[str, int]]:
    """The probe points for size names with these (min, max) bounds: the base, one point per
    name moving only that name, and one moving every name (see the module docstring)."""
    names = list(bounds)
    base, moved, last = {}, {}, {}
    for i, name in enumerate(names):
        lo, hi = bounds[name]
        b = _pick(lo, hi, (_PRIMES[i % len(_PRIMES)], 2, 4), ())
        m = None if b is None else _pick(lo, hi, (2 * b, b + 1), (b,))
        if m is None:
            raise KilnError(f"the dynamic size {name} is bounded to {lo}..{hi}, which leaves no "
                            "two sizes to tell static numbers from sizes",
                            hint=f"widen {name}'s bounds, or leave it static")
        base[name], moved[name] = b, m
        last[name] = _pick(lo, hi, (3 * b, b + 2), (b, m)) or m
    points = [dict(base)]
    for name in names:
        points.append({**base, name: moved[name]})
    points.append({n: last[n] for n in names})
    return points


def _pick(lo: int, hi: int, preferred: Sequence[int | None], avoid: Sequence[int | None]
          ) -> int | None:
    """The first preferred value in lo..hi not in ``avoid``, else the smallest such value
    above 1 (1 only when nothing else is left)."""
    for v in preferred:
        if v is not None and lo <= v <= hi and v not in avoid:
            return v
    for v in [*range(max(lo, 2), min(hi, lo + 16) + 1), lo]:
        if lo <= v <= hi and v not in avoid:
            return v
    return None


def fit(values: Sequence[int], points: Sequence[Mapping[str, int]]) -> Size | None:
    """The formula giving ``values[k]`` at ``points[k]`` (made by ``probe_sizes``): the number
    when every point gives it, a SizeTerm when one fits every point, else None."""
    values = [int(v) for v in values]
    if all(v == values[0] for v in values):
        return values[0]
    base, v0 = points[0], values[0]
    powers = []
    for name in base:
        k_at = next((i for i, p in enumerate(points[1:], 1)
                     if p[name] != base[name] and all(p[m] == base[m] for m in base if m != name)),
                    None)
        if k_at is None:
            return None
        vk, b, m = values[k_at], base[name], points[k_at][name]
        # v0 = c * b^k * rest and vk = c * m^k * rest, so vk * b^k == v0 * m^k
        k = next((k for k in range(_MAX_POWER + 1) if vk * b ** k == v0 * m ** k), None)
        if k is None:
            return None
        if k:
            powers.append((name, k))
    if not powers:
        return None
    scale = math.prod(base[n] ** k for n, k in powers)
    if v0 % scale:
        return None
    term = SizeTerm(v0 // scale, tuple(powers))
    if any(term.evaluate(p) != v for p, v in zip(points, values)):
        return None
    return term


def fit_shape(shapes: Sequence[Sequence[int]], points: Sequence[Mapping[str, int]]
              ) -> list[Size | None] | None:
    """Per dimension the fit of ``shapes[k]`` (the shape at ``points[k]``); None when the
    ranks differ."""
    if any(len(s) != len(shapes[0]) for s in shapes):
        return None
    return [fit([s[d] for s in shapes], points) for d in range(len(shapes[0]))]


def evaluate(size: Size, sizes: Mapping[str, int]) -> int:
    """A Size at ``sizes``."""
    return size if isinstance(size, int) else size.evaluate(sizes)
