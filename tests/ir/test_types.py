"""DType and TensorType: NumPy mapping, sizes, printing, validation."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.ir import DType, ShapeError, TensorType

NUMPY = {"f32": np.float32, "f16": np.float16, "i8": np.int8, "u8": np.uint8,
         "i32": np.int32, "i64": np.int64, "bool": np.bool_}


@pytest.mark.parametrize("name", list(NUMPY))
def test_dtype_numpy_round_trip(name):
    dt = DType(name)
    assert dt.numpy == np.dtype(NUMPY[name])
    assert DType.from_numpy(NUMPY[name]) is dt
    assert dt.itemsize == np.dtype(NUMPY[name]).itemsize
    assert dt.is_float == (name in ("f32", "f16"))
    assert str(dt) == name


def test_every_dtype_is_listed():
    assert {d.value for d in DType} == set(NUMPY)


def test_float64_becomes_f32():
    assert DType.from_numpy(np.float64) is DType.f32


@pytest.mark.parametrize("dtype", [np.complex64, np.uint16, np.int16, np.object_])
def test_unsupported_numpy_dtype(dtype):
    with pytest.raises(ShapeError, match="not supported"):
        DType.from_numpy(dtype)


def test_tensor_type_sizes_and_text():
    t = TensorType((2, 3, 4), DType.i32)
    assert (t.rank, t.numel, t.nbytes) == (3, 24, 96)
    assert str(t) == "i32[2,3,4]"
    scalar = TensorType(())
    assert (scalar.rank, scalar.numel, str(scalar)) == (0, 1, "f32[]")
    assert TensorType((0, 5)).numel == 0


def test_tensor_type_normalizes_and_compares():
    t = TensorType([np.int64(2), 3], "f16")
    assert t == TensorType((2, 3), DType.f16)
    assert hash(t) == hash(TensorType((2, 3), DType.f16))
    assert t.shape == (2, 3) and all(type(d) is int for d in t.shape)
    assert t.with_shape((6,)) == TensorType((6,), DType.f16)
    assert t != TensorType((2, 3))


def test_negative_dimension_is_a_shape_error():
    with pytest.raises(ShapeError, match="negative"):
        TensorType((2, -1))


def test_unknown_dtype_name():
    with pytest.raises(ValueError):
        TensorType((2,), "f64")


@pytest.mark.parametrize("array", [np.zeros((2, 3), np.float32), np.array(5, np.int64),
                                   np.ones((1, 0, 2), np.bool_), np.zeros(3, np.float64)])
def test_of_array(array):
    t = TensorType.of(array)
    assert t.shape == array.shape
    assert t.dtype == DType.from_numpy(array.dtype)
