"""Kernel passes: vectorization of stride-1 loops, unrolling, and parallel-loop placement.

``vectorize`` turns each loop marked ``vectorized`` into a main loop that steps by the vector
width, with vector loads/stores where the loop variable indexes memory with stride 1 and
broadcasts where it does not appear, plus a scalar tail loop. A reduction into a scalar declared
outside the loop (``acc = acc + x``, max, min) gets a vector accumulator folded once after the
main loop. A loop whose body cannot be vectorized that way (a gather, a store whose address does
not move with the loop, data-dependent control flow) stays scalar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kiln.ir import kernel as K
from kiln.ir.kernel import (
    INDEX,
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
    as_expr,
    simplify,
    substitute,
)
from kiln.passes.tuning import DEFAULT as DEFAULT_TUNING
from kiln.passes.tuning import Tuning

REDUCTION_OPS = ("add", "max", "min")
# Tuning.max_load_stride: loads whose address moves by up to that many elements per lane are
# still vectorized (one wider load and a shuffle); larger strides would read mostly unused
# data. Tuning.min_tail_width: loop tails shorter than a vector are vectorized with narrower
# vectors down to that width.


class _NotVectorizable(Exception):
    pass


def _identity(op: str, dtype: str) -> Expr:
    # Integer max/min stay scalar: the backends' vector reductions are signed only.
    if not K.is_float(dtype) and op != "add":
        raise _NotVectorizable("integer max/min reduction")
    return K.reduction_identity(op, dtype)


class _Vectorizer:
    def __init__(self, var: Var, width: int, varying: set[str], max_stride: int) -> None:
        self.var = var
        self.width = width
        self.varying = varying  # local variables holding vectors
        self.max_stride = max_stride
        # id(expression) -> (expression, uniform?), for the current contents of ``varying``
        # (the caller may add to it; it only grows). Rewriting asks at every level of an
        # expression: without the table a kernel's expressions cost their size times their
        # depth. The entry holds the expression, so its id is not reused while it stands.
        self._uniform: dict[int, tuple[Expr, bool]] = {}
        self._uniform_for = len(varying)

    # -- analysis --
    def uniform(self, e: Expr) -> bool:
        """Whether ``e`` is the same in every lane: it reads neither the loop variable nor a
        local that holds a vector."""
        known = self._uniform
        if self._uniform_for != len(self.varying):
            known.clear()
            self._uniform_for = len(self.varying)
        hit = known.get(id(e))
        if hit is not None:
            return hit[1]
        stack: list[tuple[Expr, bool]] = [(e, False)]
        while stack:  # post-order, children before parents
            x, children_done = stack.pop()
            if id(x) in known:
                continue
            children = K.expr_children(x)
            if not children_done:
                stack.append((x, True))
                stack.extend((c, False) for c in children if id(c) not in known)
            elif isinstance(x, Var):
                known[id(x)] = (x, x.name != self.var.name and x.name not in self.varying)
            else:
                known[id(x)] = (x, all(known[id(c)][1] for c in children))
        return known[id(e)][1]

    def coef(self, e: Expr) -> int:
        """Coefficient of the loop variable in an index expression (raise if not affine)."""
        if self.uniform(e):
            return 0
        if isinstance(e, Var) and e.name == self.var.name:
            return 1
        if isinstance(e, Binary) and e.op in ("add", "sub"):
            ca, cb = self.coef(e.a), self.coef(e.b)
            return ca + cb if e.op == "add" else ca - cb
        if isinstance(e, Binary) and e.op == "mul":
            if isinstance(e.a, Const) and self.uniform(e.a):
                return int(e.a.value) * self.coef(e.b)
            if isinstance(e.b, Const) and self.uniform(e.b):
                return int(e.b.value) * self.coef(e.a)
        raise _NotVectorizable(f"index {K.format_expr(e)} is not affine in {self.var.name}")

    # -- rewriting --
    def widen(self, e: Expr) -> Expr:
        return e if e.lanes == self.width else Broadcast(e, self.width)

    def expr(self, e: Expr) -> Expr:
        if self.uniform(e):
            return e
        if isinstance(e, Var):
            if e.name == self.var.name:
                raise _NotVectorizable("loop variable used as a value")
            return Var(e.name, e.dtype, self.width)
        if isinstance(e, Load):
            c = self.coef(e.index)
            if not 1 <= c <= self.max_stride:
                raise _NotVectorizable(f"load {e.buffer} with stride {c}")
            return Load(e.buffer, simplify(e.index), e.dtype, self.width, c)
        if isinstance(e, Binary):
            return Binary(e.op, self.widen(self.expr(e.a)), self.widen(self.expr(e.b)))
        if isinstance(e, Unary):
            return Unary(e.op, self.expr(e.x))
        if isinstance(e, Select):
            return Select(self.widen(self.expr(e.cond)), self.widen(self.expr(e.a)),
                          self.widen(self.expr(e.b)))
        if isinstance(e, Cast):
            return Cast(self.expr(e.x), e.dtype)
        raise _NotVectorizable(f"cannot vectorize {type(e).__name__}")

    def stmts(self, body: Sequence[K.Stmt], outer_reductions: dict[str, str]) -> list:
        out = []
        for s in body:
            if isinstance(s, Store):
                if self.coef(s.index) != 1:
                    raise _NotVectorizable("store address does not move with the loop")
                out.append(Store(s.buffer, simplify(s.index), self.widen(self.expr(s.value))))
            elif isinstance(s, Decl):
                if s.var.name in self.varying:
                    out.append(Decl(Var(s.var.name, s.var.dtype, self.width),
                                    self.widen(self.expr(s.init))))
                else:
                    out.append(s)
            elif isinstance(s, Assign):
                name = s.var.name
                if name in outer_reductions:
                    op, x = outer_reductions[name], s.value.b  # acc = op(acc, x)
                    acc = Var(name + "_v", s.var.dtype, self.width)
                    out.append(Assign(acc, Binary(op, acc, self.widen(self.expr(x)))))
                elif name in self.varying:
                    out.append(Assign(Var(name, s.var.dtype, self.width),
                                      self.widen(self.expr(s.value))))
                elif self.uniform(s.value):
                    out.append(s)
                else:
                    raise _NotVectorizable(f"varying value assigned to {name}")
            elif isinstance(s, For):
                if not (self.uniform(s.start) and self.uniform(s.extent)):
                    raise _NotVectorizable("inner loop bounds vary with the vector lanes")
                out.append(replace(s, kind="serial" if s.kind == "vectorized" else s.kind,
                                   body=tuple(self.stmts(s.body, outer_reductions))))
            elif isinstance(s, If):
                if not self.uniform(s.cond):
                    raise _NotVectorizable("condition varies with the vector lanes")
                out.append(If(s.cond, self.stmts(s.then, outer_reductions),
                              self.stmts(s.orelse, outer_reductions)))
            else:
                raise _NotVectorizable(type(s).__name__)
        return out


def vectorize_expr(e: Expr, var: Var, width: int, varying: Sequence[str] = (),
                   tuning: Tuning = DEFAULT_TUNING) -> Expr:
    """``e`` evaluated for ``width`` consecutive values of ``var`` at once (vector loads where
    ``var`` indexes memory with stride 1); variables named in ``varying`` become vectors.
    KilnError when that is not possible."""
    vec = _Vectorizer(var, width, set(varying), tuning.max_load_stride)
    try:
        return vec.widen(vec.expr(e))
    except _NotVectorizable as err:
        raise K.KilnError(f"cannot vectorize {K.format_expr(e)}: {err}") from None


def _declared(body: Sequence[K.Stmt]) -> set[str]:
    return {s.var.name for s in K.walk_stmts(body) if isinstance(s, Decl)}


def _find_varying(var: Var, body: Sequence[K.Stmt], reductions: set[str]) -> set[str]:
    """Locals declared inside the loop whose value depends on the loop variable (fixpoint)."""
    local = _declared(body)
    varying: set[str] = set()
    changed = True
    while changed:
        changed = False
        probe = _Vectorizer(var, 2, varying, 1)  # only its uniformity test is used
        for s in K.walk_stmts(body):
            if isinstance(s, (Decl, Assign)) and s.var.name in local and s.var.name not in varying:
                value = s.init if isinstance(s, Decl) else s.value
                if not probe.uniform(value):
                    varying.add(s.var.name)
                    changed = True
    return varying - reductions


def _outer_reductions(var: Var, body: Sequence[K.Stmt]) -> dict[str, str]:
    """Scalars declared outside the loop and updated inside as ``acc = op(acc, x)``."""
    local = _declared(body)
    found: dict[str, str] = {}
    for s in K.walk_stmts(body):
        if isinstance(s, Assign) and s.var.name not in local:
            v = s.value
            if (isinstance(v, Binary) and v.op in REDUCTION_OPS and isinstance(v.a, Var)
                    and v.a.name == s.var.name
                    and not any(isinstance(x, Var) and x.name == s.var.name
                                for x in K.walk_expr(v.b))):
                if found.get(s.var.name, v.op) != v.op:
                    raise _NotVectorizable(f"{s.var.name} reduced with two ops")
                found[s.var.name] = v.op
            else:
                raise _NotVectorizable(f"{s.var.name} assigned inside the loop")
    # A reduction variable read anywhere but in its own update would see partial values.
    for name in found:
        uses = sum(1 for st in K.walk_stmts(body) for e in K.stmt_exprs(st)
                   for x in K.walk_expr(e) if isinstance(x, Var) and x.name == name)
        updates = sum(1 for st in K.walk_stmts(body)
                      if isinstance(st, Assign) and st.var.name == name)
        if uses != updates:
            raise _NotVectorizable(f"{name} is read inside the loop it reduces")
    return found


def vectorize_loop(loop: For, width: int, tuning: Tuning = DEFAULT_TUNING) -> list[K.Stmt]:
    """The loop split into a vector main loop and a scalar tail (or the loop, serial)."""
    try:
        reductions = _outer_reductions(loop.var, loop.body)
        varying = _find_varying(loop.var, loop.body, set(reductions))
        vec = _Vectorizer(loop.var, width, varying, tuning.max_load_stride)
        body = vec.stmts(loop.body, reductions)
        dtypes = {}
        for s in K.walk_stmts(loop.body):
            if isinstance(s, Assign) and s.var.name in reductions:
                dtypes[s.var.name] = s.var.dtype
        pre = [Decl(Var(n + "_v", dtypes[n], width), Broadcast(_identity(op, dtypes[n]), width))
               for n, op in reductions.items()]
    except _NotVectorizable:
        return [replace(loop, kind="serial",
                        body=tuple(vectorize_stmts(loop.body, width, tuning)))]
    extent = simplify(loop.extent)
    if isinstance(extent, Const):
        main_n = (int(extent.value) // width) * width
        main, tail = as_expr(main_n), as_expr(int(extent.value) - main_n)
    else:
        main = simplify((extent // width) * width)
        tail = simplify(extent - main)
    stmts: list[K.Stmt] = list(pre)
    if not (isinstance(main, Const) and main.value == 0):
        stmts.append(For(loop.var, loop.start, main, tuple(body), "serial", width))
    for n, op in reductions.items():
        acc = Var(n, dtypes[n])
        stmts.append(Assign(acc, Binary(op, acc, ReduceLanes(op, Var(n + "_v", dtypes[n],
                                                                       width)))))
    if not (isinstance(tail, Const) and tail.value == 0):
        tail_loop = For(loop.var, simplify(loop.start + main), tail, loop.body, "vectorized")
        narrower = width // 2
        if isinstance(tail, Const):
            while narrower > int(tail.value) and narrower // 2 >= tuning.min_tail_width:
                narrower //= 2
        if narrower >= tuning.min_tail_width and not (isinstance(tail, Const)
                                               and tail.value < narrower):
            # The rest runs on narrower vectors (half, quarter... the widest that fits a
            # known tail), so a 14-wide row on 16 lanes is 8 + 4 + 2 and a 7-wide one 4 + 3,
            # not left scalar.
            stmts.extend(vectorize_loop(tail_loop, narrower, tuning))
        else:
            stmts.append(replace(tail_loop, kind="serial",
                                 body=tuple(vectorize_stmts(loop.body, width, tuning))))
    return stmts


def vectorize_stmts(stmts: Sequence[K.Stmt], width: int,
                    tuning: Tuning = DEFAULT_TUNING) -> list[K.Stmt]:
    out: list[K.Stmt] = []
    for s in stmts:
        if isinstance(s, For):
            if s.kind == "vectorized" and width > 1:
                out.extend(vectorize_loop(s, width, tuning))
            else:
                out.append(replace(s, body=tuple(vectorize_stmts(s.body, width, tuning))))
        elif isinstance(s, If):
            out.append(If(s.cond, vectorize_stmts(s.then, width, tuning),
                          vectorize_stmts(s.orelse, width, tuning)))
        else:
            out.append(s)
    return out


def vectorize(kernel: Kernel, width: int, tuning: Tuning = DEFAULT_TUNING) -> Kernel:
    """Vectorize every loop marked ``vectorized`` with ``width`` lanes."""
    return kernel.with_body(vectorize_stmts(kernel.body, width, tuning))


def unroll_stmts(stmts: Sequence[K.Stmt], max_extent: int = 16) -> list[K.Stmt]:
    out: list[K.Stmt] = []
    for s in stmts:
        if isinstance(s, For):
            body = unroll_stmts(s.body, max_extent)
            ext, start = simplify(s.extent), simplify(s.start)
            if (s.kind == "unrolled" and isinstance(ext, Const) and isinstance(start, Const)
                    and int(ext.value) <= max_extent):
                for i in range(int(start.value), int(start.value) + int(ext.value), s.step):
                    mapping = {s.var.name: Const(i, INDEX)}
                    copy = K.map_stmts(body, lambda e, m=mapping: substitute(e, m)
                                       if isinstance(e, Var) else None)
                    out.extend(K.map_stmts(copy, lambda e: simplify(e)
                                           if e.dtype == INDEX else None))
            else:
                out.append(replace(s, body=tuple(body),
                                   kind="serial" if s.kind == "unrolled" else s.kind))
        elif isinstance(s, If):
            out.append(If(s.cond, unroll_stmts(s.then, max_extent),
                          unroll_stmts(s.orelse, max_extent)))
        else:
            out.append(s)
    return out


def unroll(kernel: Kernel, max_extent: int = 16) -> Kernel:
    """Replicate the bodies of loops marked ``unrolled`` with constant trip counts."""
    return kernel.with_body(unroll_stmts(kernel.body, max_extent))


def place_parallel(kernel: Kernel) -> Kernel:
    """Keep ``parallel`` on the outermost parallel loop of each nest (the backends run it on
    the thread pool, which may be inside serial loops); parallel loops nested in one become
    serial."""

    def demote(stmts, inside):
        out = []
        for s in stmts:
            if isinstance(s, For):
                par = s.kind == "parallel"
                kind = "serial" if (par or s.kind == "team") and inside else s.kind
                out.append(replace(s, kind=kind, body=tuple(demote(s.body, inside or par))))
            elif isinstance(s, If):
                out.append(If(s.cond, demote(s.then, inside), demote(s.orelse, inside)))
            else:
                out.append(s)
        return out

    return kernel.with_body(demote(kernel.body, False))


def schedule_kernel(kernel: Kernel, width: int, tuning: Tuning = DEFAULT_TUNING) -> Kernel:
    """The kernel passes in order: parallel placement, unrolling, vectorization."""
    return vectorize(unroll(place_parallel(kernel)), width, tuning)
