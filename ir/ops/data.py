"""Data-dependent indexing ops."""

from __future__ import annotations

from kiln.ir.errors import KilnError, ShapeError
from kiln.ir.registry import register
from kiln.ir.types import DType, TensorType


def _embedding_infer(ins, attrs):
    idx, w = ins
    if idx.dtype not in (DType.i32, DType.i64):
        raise ShapeError(f"embedding indices must be i32 or i64, got {idx.dtype}")
    if w.rank != 2:
        raise ShapeError(f"embedding table must be [num, dim], got {list(w.shape)}")
    return [TensorType(idx.shape + (w.shape[1],), w.dtype)]


def _embedding_ref(idx, w):
    if idx.size and (idx.min() < 0 or idx.max() >= w.shape[0]):
        raise KilnError(f"embedding index out of range [0, {w.shape[0]})", op="embedding",
                        hint="check the token ids fed to the model")
    return w[idx]


register("embedding", ["indices", "weight"], infer=_embedding_infer, reference=_embedding_ref,
         kind="data", description="rows of weight picked by integer indices",
         flops=lambda i, o, a: 0)
