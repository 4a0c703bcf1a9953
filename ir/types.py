"""Tensor types: a static shape and one of kiln's dtypes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from kiln.ir.errors import ShapeError
from kiln.ir.sizes import Dim, SymDim, format_dim, size_names


class DType(str, Enum):
    """Element types kiln's IR knows."""

    f32 = "f32"
    f16 = "f16"
    i8 = "i8"
    u8 = "u8"
    i32 = "i32"
    i64 = "i64"
    bool = "bool"

    @property
    def numpy(self) -> np.dtype:
        """The NumPy dtype with the same layout."""
        return np.dtype(_TO_NUMPY[self])

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.f16)

    @staticmethod
    def from_numpy(dt: np.dtype | type) -> DType:
        """The kiln dtype of a NumPy dtype; a KilnError for one kiln has no name for."""
        dt = np.dtype(dt)
        for k, v in _TO_NUMPY.items():
            if np.dtype(v) == dt:
                return k
        if dt == np.float64:
            # Python floats and float64 buffers become f32: kiln computes in single precision.
            return DType.f32
        raise ShapeError(f"dtype {dt} is not supported", hint="cast the tensor to float32 or int64")

    def __str__(self) -> str:
        return self.value


_TO_NUMPY = {
    DType.f32: "float32",
    DType.f16: "float16",
    DType.i8: "int8",
    DType.u8: "uint8",
    DType.i32: "int32",
    DType.i64: "int64",
    DType.bool: "bool",
}


@dataclass(frozen=True)
class TensorType:
    """A shape and a dtype. A dimension is a number, or a formula of named sizes (a
    ``kiln.ir.sizes.SymDim``: ``batch``, ``batch*seq``) in a graph that holds for every size
    it declares."""

    shape: tuple[Dim, ...]
    dtype: DType = DType.f32

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(
            d if isinstance(d, SymDim) else int(d) for d in self.shape))
        object.__setattr__(self, "dtype", DType(self.dtype))
        for d in self.shape:
            if isinstance(d, SymDim):
                if d.interval()[0] < 0:
                    raise ShapeError(f"dimension {d} of shape [{self._dims()}] is negative for "
                                     f"some sizes", hint="tighten the sizes' bounds")
            elif d < 0:
                raise ShapeError(f"negative dimension in shape {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> Dim:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> Dim:
        return self.numel * self.dtype.itemsize

    @property
    def is_static(self) -> bool:
        """Whether every dimension is a number."""
        return not any(isinstance(d, SymDim) for d in self.shape)

    @property
    def size_names(self) -> set[str]:
        """The size names its dimensions use."""
        return size_names(self.shape)

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def _dims(self) -> str:
        return ",".join(format_dim(d) for d in self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{self._dims()}]"

    @staticmethod
    def of(array: np.ndarray) -> TensorType:
        """The type of a NumPy array."""
        return TensorType(tuple(array.shape), DType.from_numpy(array.dtype))
