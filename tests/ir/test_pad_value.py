"""pad's fill value against the operand's dtype: an infinite or out-of-range fill for an
integer tensor is a ShapeError naming the value, never an OverflowError from int(inf)."""

from __future__ import annotations

import math

import pytest

from kiln.ir import DType, ShapeError, TensorType, get_op, infer_types


@pytest.mark.parametrize("value", [-math.inf, math.inf, math.nan, 256.0, -1.0])
def test_pad_value_outside_uint8_is_a_shape_error(value: float) -> None:
    attrs = get_op("pad").normalize_attrs({"pads": (1, 1), "value": value})
    with pytest.raises(ShapeError, match="does not fit a u8 tensor"):
        infer_types("pad", [TensorType((3,), DType.u8)], attrs)


def test_pad_value_inside_uint8_pads() -> None:
    attrs = get_op("pad").normalize_attrs({"pads": (1, 2), "value": 255.0})
    assert infer_types("pad", [TensorType((3,), DType.u8)], attrs) == [
        TensorType((6,), DType.u8)]
