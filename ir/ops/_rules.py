"""Shared pieces of type rules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiln.ir.errors import ShapeError
from kiln.ir.types import DType, TensorType


def broadcast(*shapes: Sequence[int]) -> tuple[int, ...]:
    """NumPy/PyTorch broadcasting of shapes; ShapeError when they do not broadcast."""
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        raise ShapeError(
            f"shapes {', '.join(str(list(s)) for s in shapes)} do not broadcast",
            hint="reshape or expand the operands so that trailing dimensions agree",
        ) from None


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


def conv_out_size(size: int, k: int, stride: int, pad_lo: int, pad_hi: int, dilation: int,
                  ceil_mode: bool = False) -> int:
    """Output length of a sliding window (convolution or pooling)."""
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
