"""Which loops of a kernel may run on many GPU threads at once.

A kernel body is cut into *segments*: runs of top-level statements that share a local variable
(a ``Decl`` at the top level and every later statement that uses it) stay together, every other
top-level statement is a segment of its own. Segments run as separate launches, in order, so a
value one segment stores is visible to the next.

A segment that is a single loop nest binds the outermost loops whose iterations are
independent to GPU threads (flattened into one grid-stride loop). A loop is independent when

* every local it assigns is declared inside it (an accumulator declared outside would be a
  loop-carried dependence: ``acc = acc + x`` stays in one thread), and
* every buffer it stores to (scratch aside) is accessed, in all its loads and stores, at
  ``c * var + (same terms of the outer bound loops) + r``, and no two iterations can reach one
  element: either ``r`` stays inside a window narrower than ``|c| * step`` (each iteration has
  its own slice: rows of a row-wise softmax) or every ``r`` is a multiple of a stride no
  iteration distance can match (columns: a softmax over the first axis, ``x[j * 4 + i]``).

Kernel scratch buffers are private to a thread (the kernel IR's contract: a scratch buffer never
carries a value from one iteration of a parallel loop to another), so they do not count.
Anything the analysis cannot prove stays serial: a slow launch, never a wrong one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kiln.ir import kernel as K
from kiln.ir.kernel import (
    Assign,
    Binary,
    Cast,
    Const,
    Decl,
    Expr,
    For,
    If,
    Load,
    Select,
    Stmt,
    Store,
    Var,
    simplify,
)

Interval = tuple[int, int]


@dataclass(frozen=True)
class BoundLoop:
    """A loop bound to GPU threads: ``var = start + k * step`` for ``k`` in ``range(count)``."""

    var: str
    start: int
    count: int
    step: int


@dataclass(frozen=True)
class Segment:
    """Top-level statements that run as one launch. ``bound`` lists the loops of ``stmts[0]``
    bound to threads (outermost first); empty: the segment runs in a single thread."""

    stmts: tuple[Stmt, ...]
    bound: tuple[BoundLoop, ...] = ()

    @property
    def work(self) -> int:
        """Iterations of the grid-stride loop (1 for a single-thread segment)."""
        n = 1
        for b in self.bound:
            n *= b.count
        return n

    def body(self) -> tuple[Stmt, ...]:
        """The statements each thread runs per bound iteration."""
        if not self.bound:
            return self.stmts
        loop = self.stmts[0]
        for _ in self.bound[1:]:
            loop = loop.body[0]
        return loop.body


def plan_segments(kernel: K.Kernel) -> list[Segment]:
    """The launches of ``kernel``: its segments with their thread-bound loops."""
    scratch = {b.name for b in kernel.scratch}
    out = []
    for stmts in split_segments(kernel.body):
        bound: tuple[BoundLoop, ...] = ()
        if len(stmts) == 1 and isinstance(stmts[0], For):
            bound = tuple(bind_loops(stmts[0], scratch))
        out.append(Segment(tuple(stmts), bound))
    return out


# ---- segments --------------------------------------------------------------------------------
def _vars_in(s: Stmt) -> set[str]:
    names = set()
    for st in K.walk_stmts([s]):
        for e in K.stmt_exprs(st):
            names.update(x.name for x in K.walk_expr(e) if isinstance(x, Var))
        if isinstance(st, (Decl, Assign)):
            names.add(st.var.name)
    return names


def split_segments(body: Sequence[Stmt]) -> list[list[Stmt]]:
    """Cut top-level statements into runs that share no local variable."""
    uses = [_vars_in(s) for s in body]
    # Each top-level Decl must share a launch with every later statement that uses its variable
    # (up to the next top-level Decl of the same name, which starts a new variable).
    reach = list(range(len(body)))
    for i, s in enumerate(body):
        if not isinstance(s, Decl):
            continue
        name = s.var.name
        for j in range(i + 1, len(body)):
            if name in uses[j]:
                reach[i] = j
            if isinstance(body[j], Decl) and body[j].var.name == name:
                break
    segments: list[list[Stmt]] = []
    end = -1
    for i, s in enumerate(body):
        if i > end:
            segments.append([])
        segments[-1].append(s)
        end = max(end, reach[i])
    return segments


# ---- loop binding ----------------------------------------------------------------------------
def const_int(e: Expr) -> int | None:
    """The value of an integer expression without variables, else None."""
    e = simplify(e)
    return int(e.value) if isinstance(e, Const) and not K.is_float(e.dtype) else None


def bind_loops(nest: For, scratch: set[str]) -> list[BoundLoop]:
    """The outermost loops of ``nest`` that may run on separate threads (perfectly nested,
    constant bounds, independent iterations)."""
    bound: list[BoundLoop] = []
    ranges: dict[str, Interval] = {}
    loop = nest
    while True:
        start, extent = const_int(loop.start), const_int(loop.extent)
        if start is None or extent is None:
            break
        count = max(0, -(-extent // loop.step))
        ranges[loop.var.name] = (start, start + max(count - 1, 0) * loop.step)
        if count > 1 and not independent(loop, [b.var for b in bound], ranges, scratch):
            break
        bound.append(BoundLoop(loop.var.name, start, count, loop.step))
        if len(loop.body) != 1 or not isinstance(loop.body[0], For):
            break
        loop = loop.body[0]
    return bound


def independent(loop: For, outer: Sequence[str], ranges: dict[str, Interval],
                scratch: set[str]) -> bool:
    """Whether distinct iterations of ``loop`` (outer bound loops fixed) share no local and
    no buffer element that one of them stores."""
    declared = {s.var.name for s in K.walk_stmts(loop.body) if isinstance(s, Decl)}
    if any(isinstance(s, Assign) and s.var.name not in declared
           for s in K.walk_stmts(loop.body)):
        return False
    accesses = list(_accesses(loop.body, dict(ranges)))
    written = {buf for buf, _, _, store, _ in accesses if store} - scratch
    interest = {*outer, loop.var.name}
    count = -(-(const_int(loop.extent) or 0) // loop.step)
    for buf in written:
        forms = []
        for b, index, width, _, rng in accesses:
            if b != buf:
                continue
            f = affine(index, interest, rng)
            if f is None or (forms and f.coefs != forms[0].coefs):
                return False
            forms.append(f if width == 1 else
                          Affine(f.coefs, f.lo, f.hi + width - 1, 1, 0))
        if _may_collide(forms, abs(forms[0].coefs.get(loop.var.name, 0)) * loop.step, count):
            return False
    return True


def _may_collide(forms: list[Affine], slab: int, count: int) -> bool:
    """Whether two iterations ``slab`` * k elements apart (0 < k < count) can reach the same
    element, given every access is ``slab`` * iteration + r with r in the forms' intervals and
    congruence classes."""
    if slab == 0:
        return True
    modulus = 0
    for f in forms:
        modulus = math.gcd(modulus, f.modulus, abs(f.residue - forms[0].residue))
    if modulus == 0:  # every access is at one offset: iterations never meet
        return False
    # The smallest iteration distance whose address shift is a multiple of the modulus.
    k = modulus // math.gcd(modulus, slab)
    spread = max(f.hi for f in forms) - min(f.lo for f in forms)
    return k < count and slab * k <= spread


def _accesses(stmts: Sequence[Stmt], ranges: dict[str, Interval]
              ) -> Iterator[tuple[str, Expr, int, bool, dict[str, Interval]]]:
    """(buffer, index, elements spanned, is a store, loop-variable ranges there) for every
    load and store in ``stmts``."""
    for s in stmts:
        for e in K.stmt_exprs(s):
            for x in K.walk_expr(e):
                if isinstance(x, Load):
                    yield x.buffer, x.index, x.stride * (x.lanes - 1) + 1, False, ranges
        if isinstance(s, Store):
            yield s.buffer, s.index, s.value.lanes, True, ranges
        elif isinstance(s, For):
            inner = dict(ranges)
            start, extent = interval(s.start, ranges), interval(s.extent, ranges)
            if start is not None and extent is not None:
                # The last iteration starts a whole number of steps after the first.
                last = max(extent[1] - 1, 0) // s.step * s.step
                inner[s.var.name] = (start[0], start[1] + last)
            else:
                inner.pop(s.var.name, None)
            yield from _accesses(s.body, inner)
        elif isinstance(s, If):
            yield from _accesses(s.then, ranges)
            yield from _accesses(s.orelse, ranges)


# ---- index arithmetic ------------------------------------------------------------------------
def interval(e: Expr, ranges: dict[str, Interval]) -> Interval | None:
    """Bounds of an integer expression given the ranges of its variables (None: unknown)."""
    if isinstance(e, Const):
        return None if K.is_float(e.dtype) else (int(e.value), int(e.value))
    if isinstance(e, Var):
        return ranges.get(e.name)
    if isinstance(e, Cast):
        return None if K.is_float(e.dtype) or K.is_float(e.x.dtype) else interval(e.x, ranges)
    if isinstance(e, Select):
        a, b = interval(e.a, ranges), interval(e.b, ranges)
        return None if a is None or b is None else (min(a[0], b[0]), max(a[1], b[1]))
    if not isinstance(e, Binary) or K.is_float(e.dtype):
        return None
    if e.op in K.COMPARE_OPS or e.op in ("and", "or"):
        return (0, 1)
    a, b = interval(e.a, ranges), interval(e.b, ranges)
    if a is None or b is None:
        return None
    if e.op == "add":
        return (a[0] + b[0], a[1] + b[1])
    if e.op == "sub":
        return (a[0] - b[1], a[1] - b[0])
    if e.op == "mul":
        corners = [x * y for x in a for y in b]
        return (min(corners), max(corners))
    if e.op == "max":
        return (max(a[0], b[0]), max(a[1], b[1]))
    if e.op == "min":
        return (min(a[0], b[0]), min(a[1], b[1]))
    if e.op == "div" and b[0] > 0:
        corners = [x // y for x in a for y in b]
        return (min(corners), max(corners))
    if e.op == "mod" and b[0] > 0:
        return a if a[0] >= 0 and a[1] < b[0] else (0, b[1] - 1)
    return None


@dataclass(frozen=True)
class Affine:
    """``sum(coefs[v] * v) + r``: r in ``[lo, hi]`` and ``r = residue (mod modulus)``
    (modulus 0: r is exactly ``residue``)."""

    coefs: dict[str, int]
    lo: int
    hi: int
    modulus: int
    residue: int


def _point_or_any(iv: Interval) -> Affine:
    return Affine({}, iv[0], iv[1], 0, iv[0]) if iv[0] == iv[1] else \
        Affine({}, iv[0], iv[1], 1, 0)


def affine(e: Expr, interest: set[str], ranges: dict[str, Interval]) -> Affine | None:
    """``e`` as an ``Affine`` in the ``interest`` variables, or None when one of them enters
    ``e`` other than linearly or the rest is unbounded."""
    if isinstance(e, Var) and e.name in interest:
        return Affine({e.name: 1}, 0, 0, 0, 0)
    if isinstance(e, Binary) and not K.is_float(e.dtype) and e.op in ("add", "sub"):
        a, b = affine(e.a, interest, ranges), affine(e.b, interest, ranges)
        if a is None or b is None:
            return None
        sign = 1 if e.op == "add" else -1
        coefs = dict(a.coefs)
        for v, c in b.coefs.items():
            coefs[v] = coefs.get(v, 0) + sign * c
        lo, hi = (a.lo + b.lo, a.hi + b.hi) if sign > 0 else (a.lo - b.hi, a.hi - b.lo)
        return _normal({v: c for v, c in coefs.items() if c}, lo, hi,
                       math.gcd(a.modulus, b.modulus), a.residue + sign * b.residue)
    if isinstance(e, Binary) and not K.is_float(e.dtype) and e.op == "mul":
        for x, y in ((e.a, e.b), (e.b, e.a)):
            if _mentions(x, interest):
                continue
            k = interval(x, ranges)
            if k is not None and k[0] == k[1]:
                f = affine(y, interest, ranges)
                if f is None:
                    return None
                c = k[0]
                lo, hi = sorted((f.lo * c, f.hi * c))
                return _normal({v: c * n for v, n in f.coefs.items() if c * n}, lo, hi,
                               f.modulus * abs(c), f.residue * c)
    if _mentions(e, interest):
        return None
    iv = interval(e, ranges)
    return None if iv is None else _point_or_any(iv)


def _normal(coefs: dict[str, int], lo: int, hi: int, modulus: int, residue: int) -> Affine:
    return Affine(coefs, lo, hi, modulus, residue % modulus if modulus else residue)


def _mentions(e: Expr, names: set[str]) -> bool:
    return any(isinstance(x, Var) and x.name in names for x in K.walk_expr(e))
