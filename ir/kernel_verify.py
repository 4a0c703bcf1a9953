"""The kernel-IR verifier: what every kernel stage (lowering, scheduling) must leave intact.

It checks what codegen relies on and cannot check itself: every load and store names a buffer
of the kernel, every variable is a loop variable or a local declared earlier in an enclosing
scope, stores keep their buffer's element type, constant loop extents are not negative, and
constant indices stay inside their buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

from kiln.ir.errors import InternalError
from kiln.ir.kernel import (
    Assign,
    Const,
    Decl,
    Expr,
    For,
    If,
    Kernel,
    Load,
    Stmt,
    Store,
    Var,
    walk_expr,
)


def _fail(kernel: Kernel, message: str) -> InternalError:
    return InternalError(f"kernel {kernel.name}: {message}",
                         node=str(kernel.meta.get("root", "")) or None,
                         op=str(kernel.meta.get("op", "")) or None)


def _check_expr(kernel: Kernel, e: Expr, buffers: dict, scope: set[str]) -> None:
    for sub in walk_expr(e):
        if isinstance(sub, Load):
            buf = buffers.get(sub.buffer)
            if buf is None:
                raise _fail(kernel, f"load from unknown buffer {sub.buffer}")
            if isinstance(sub.index, Const):
                last = int(sub.index.value) + (sub.lanes - 1) * sub.stride
                if int(sub.index.value) < 0 or last >= buf.size:
                    raise _fail(kernel, f"constant load {sub.buffer}[{sub.index.value}] "
                                        f"outside its {buf.size} elements")
        elif isinstance(sub, Var) and sub.name not in scope:
            raise _fail(kernel, f"variable {sub.name} used before it is defined")


def _check_stmts(kernel: Kernel, stmts: Sequence[Stmt], buffers: dict, scope: set[str]) -> None:
    scope = set(scope)
    for s in stmts:
        if isinstance(s, For):
            for e in (s.start, s.extent):
                _check_expr(kernel, e, buffers, scope)
            if isinstance(s.extent, Const) and s.extent.value < 0:
                raise _fail(kernel, f"loop {s.var.name} has a negative extent {s.extent.value}")
            _check_stmts(kernel, s.body, buffers, scope | {s.var.name})
        elif isinstance(s, Store):
            buf = buffers.get(s.buffer)
            if buf is None:
                raise _fail(kernel, f"store to unknown buffer {s.buffer}")
            if s.value.dtype != buf.dtype:
                raise _fail(kernel, f"store of {s.value.dtype} into {buf.dtype} buffer "
                                    f"{s.buffer}")
            _check_expr(kernel, s.index, buffers, scope)
            _check_expr(kernel, s.value, buffers, scope)
        elif isinstance(s, Decl):
            _check_expr(kernel, s.init, buffers, scope)
            scope.add(s.var.name)
        elif isinstance(s, Assign):
            if s.var.name not in scope:
                raise _fail(kernel, f"assignment to undeclared variable {s.var.name}")
            _check_expr(kernel, s.value, buffers, scope)
        elif isinstance(s, If):
            _check_expr(kernel, s.cond, buffers, scope)
            _check_stmts(kernel, s.then, buffers, scope)
            _check_stmts(kernel, s.orelse, buffers, scope)


def verify_kernel(kernel: Kernel) -> None:
    """Raise InternalError (a kiln bug: lowering or a schedule made it) if ``kernel`` breaks
    one of the rules above."""
    buffers = {b.name: b for b in kernel.params + kernel.scratch}
    if len(buffers) != len(kernel.params) + len(kernel.scratch):
        raise _fail(kernel, "two buffers share a name")
    _check_stmts(kernel, kernel.body, buffers, {"nthreads"})
