"""Half precision as a storage type: f16 values are computed in f32 inside every kernel.

A model in float16 (``model.half()``) keeps its tensors in f16: every buffer a kernel reads or
writes keeps its dtype, and so does the memory plan. Inside a kernel, though, arithmetic on f16
loses a bit per operation, and a sum over thousands of terms (a GEMM's K axis, a softmax's
denominator, a norm's variance) loses far more; some functions (erf, tanh) have no f16 form on
every target. ``compute_f16_in_f32`` rewrites a kernel so that

- every f16 load is widened to f32 where it is read (``cast<f32>(load)``),
- every f16 local (accumulators included) becomes an f32 local, every f16 constant an f32 one,
- every store into an f16 buffer rounds once (``cast<f16>(value)``),
- an explicit conversion to f16 in the graph (``x.half()``) keeps its rounding: it becomes
  ``cast<f32>(cast<f16>(x))``.

So a fused group rounds to f16 where its result is stored, never in between, and its reductions
accumulate in f32: what PyTorch's CUDA kernels do for half tensors (eager rounds after every
op, so kiln is as accurate or more). Both backends run the rewritten kernels; the hardware's
f16 <-> f32 conversions (F16C / AVX-512 on the CPU, cvt on the GPU) do the widening.
"""

from __future__ import annotations

from dataclasses import replace

from kiln.ir import kernel as K
from kiln.ir.kernel import Cast, Const, Decl, Expr, For, If, Load, Stmt, Store, Var

HALF, WIDE = "f16", "f32"


def _widen(e: Expr) -> Expr | None:
    """Bottom-up replacement of one node (children already rewritten)."""
    if isinstance(e, Load) and e.dtype == HALF:
        return Cast(e, WIDE)
    if isinstance(e, Var) and e.dtype == HALF:
        return Var(e.name, WIDE, e.lanes)
    if isinstance(e, Const) and e.dtype == HALF:
        return Const(e.value, WIDE, e.lanes)
    if isinstance(e, Cast) and e.dtype == HALF:
        x = e.x
        if isinstance(x, Cast) and x.dtype == WIDE and x.x.dtype == HALF:
            return x  # rounding a widened f16 value changes nothing
        # The graph asked for f16 here: round to it, then compute on in f32.
        return Cast(Cast(x, HALF), WIDE)
    if isinstance(e, Cast) and e.x.dtype == e.dtype:
        return e.x  # cast<f32>(x) of a value that is f32 now
    return None


def _stmts(stmts: tuple[Stmt, ...], buffers: dict[str, str]) -> tuple[Stmt, ...]:
    out: list[Stmt] = []
    for s in stmts:
        if isinstance(s, For):
            out.append(replace(s, start=K.map_expr(s.start, _widen),
                               extent=K.map_expr(s.extent, _widen),
                               body=_stmts(s.body, buffers)))
        elif isinstance(s, If):
            out.append(If(K.map_expr(s.cond, _widen), _stmts(s.then, buffers),
                          _stmts(s.orelse, buffers)))
        elif isinstance(s, Store):
            value = K.map_expr(s.value, _widen)
            if buffers.get(s.buffer) == HALF and value.dtype != HALF:
                value = Cast(value, HALF)
            out.append(Store(s.buffer, K.map_expr(s.index, _widen), value))
        elif isinstance(s, Decl):
            out.append(Decl(_widen(s.var) or s.var, K.map_expr(s.init, _widen)))
        else:  # Assign
            out.append(replace(s, var=_widen(s.var) or s.var,
                               value=K.map_expr(s.value, _widen)))
    return tuple(out)


# Where an f16 value can start: every other expression takes its dtype from an operand
# (or is bool or i32), so an f16 anywhere means an f16 one of these.
_SOURCES = (Const, Var, Load, Cast)


def _has_half(e: Expr) -> bool:
    # Only the sources are asked (a property dtype asks its operands again), over an
    # explicit stack: this runs over every node of every kernel.
    stack = [e]
    while stack:
        x = stack.pop()
        if type(x) in _SOURCES and x.dtype == HALF:
            return True
        stack.extend(K.expr_children(x))
    return False


def uses_half(kernel: K.Kernel) -> bool:
    """Whether any buffer, local or value of ``kernel`` is f16."""
    if any(b.dtype == HALF for b in kernel.params + kernel.scratch):
        return True
    for s in K.walk_stmts(kernel.body):
        if any(_has_half(e) for e in K.stmt_exprs(s)):
            return True
        if isinstance(s, Decl) and s.var.dtype == HALF:
            return True
    return False


def compute_f16_in_f32(kernel: K.Kernel) -> K.Kernel:
    """``kernel`` with its f16 arithmetic done in f32 (see the module docstring); a kernel
    without f16 comes back as it is."""
    if not uses_half(kernel):
        return kernel
    buffers = {b.name: b.dtype for b in kernel.params + kernel.scratch}
    return kernel.with_body(_stmts(kernel.body, buffers))
