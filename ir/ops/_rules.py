"""Shared pieces of type rules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiln.ir.errors import ShapeError
from kiln.ir.sizes import Dim, is_static
from kiln.ir.types import DType, TensorType


def broadcast(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    """NumPy/PyTorch broadcasting of shapes; ShapeError when they do not broadcast.

    With sizes (``batch``): a size broadcasts with 1 and with itself only, since it must hold
    for every value of the size, 1 included and not only."""
    shapes = [tuple(s) for s in shapes]

    def failed() -> ShapeError:
        listed = ", ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes)
        return ShapeError(f"shapes {listed} do not broadcast",
                          hint="reshape or expand the operands so that trailing dimensions agree")

    if all(is_static(s) for s in shapes):
        try:
            return tuple(int(d) for d in np.broadcast_shapes(*shapes))
        except ValueError:
            raise failed() from None
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for k in range(rank):
        dims = {s[len(s) - rank + k] for s in shapes if len(s) - rank + k >= 0} - {1}
        if len(dims) > 1:
            raise failed()
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def slice_length(start: Dim, end: Dim, step: int) -> Dim:
    """How many of ``range(start, end, step)`` there are (``0 <= start <= end``)."""
    if isinstance(start, int) and isinstance(end, int):
        return len(range(start, end, step))
    return (end - start + step - 1) // step


def same_dtype(types: Sequence[TensorType]) -> DType:
    """The single dtype all operands share."""
    dts = {t.dtype for t in types}
    if len(dts) != 1:
        raise ShapeError(
            f"operands have different dtypes {sorted(str(d) for d in dts)}",
            hint="insert a cast so both operands have one dtype",
        )
    return dts.pop()


def want_float(t: TensorType, what: str = "operand") -> None:
    if not t.dtype.is_float:
        raise ShapeError(f"{what} must be floating point, got {t.dtype}",
                         hint="cast it to f32 first")


def norm_axis(axis: int, rank: int) -> int:
    """A non-negative axis; ShapeError when out of range.

    Like PyTorch, a scalar (rank 0) accepts axis 0 and -1, both meaning "the scalar itself".
    """
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise ShapeError(f"axis {axis} is out of range for rank {rank}")
    return axis % max(rank, 1)


def norm_axes(axes: Sequence[int] | None, rank: int) -> tuple[int, ...]:
    """Sorted, deduplicated non-negative axes (None: all); a scalar has none to reduce."""
    if axes is None:
        return tuple(range(rank))
    out = tuple(sorted({norm_axis(a, rank) for a in axes}))
    return out if rank else ()


def conv_out_size(size: Dim, k: int, stride: int, pad_lo: int, pad_hi: int, dilation: int,
                  ceil_mode: bool = False) -> Dim:
    """Output length of a sliding window (convolution or pooling). Over a size (``h``) it is
    a formula where one exists: stride 1, or a stride that divides every size term."""
    span = dilation * (k - 1) + 1
    avail = size + pad_lo + pad_hi - span
    if avail < 0:
        raise ShapeError(f"window of size {span} does not fit an input of size {size} "
                         f"with padding {pad_lo}+{pad_hi}")
    if ceil_mode:
        out = -(-avail // stride) + 1
        # PyTorch: the last window must start inside the input or left padding.
        if (out - 1) * stride >= size + pad_lo:
            out -= 1
        return out
    return avail // stride + 1


def as_tuple(v, n: int, name: str) -> tuple[int, ...]:
    """Expand an int or length-n sequence to an n-tuple of ints."""
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    v = tuple(int(x) for x in v)
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise ShapeError(f"{name} has {len(v)} entries, expected {n}")
    return v
