"""ONNX indexing ops as kiln IR: GatherElements, ArgMax / ArgMin, TopK, CumSum and Resize
(kiln.ir.ops.index). Importing this module adds them to ``kiln.frontend.onnx_import``'s
``ONNX_IMPORT`` table (that module imports it at its end)."""

from __future__ import annotations

import math

import onnx

from kiln.frontend.onnx_import import ONNX_IMPORT, ImportContext, _axis
from kiln.ir.ops.index import COORDINATES, NEAREST_MODES


def _gather_elements(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x, idx = ctx.input(0), ctx.input(1)
    axis = _axis(ctx, ctx.attr("axis", 0), ctx.type_of(x).rank)
    return [ctx.op("gather_elements", [x, idx], {"axis": axis, "wrap": True})]


def _arg(op: str):
    def imp(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
        if ctx.attr("select_last_index", 0):
            raise ctx.unsupported(f"{node.op_type} with select_last_index=1 is not supported")
        x = ctx.input(0)
        axis = _axis(ctx, ctx.attr("axis", 0), ctx.type_of(x).rank)
        return [ctx.op(op, [x], {"axis": axis, "keepdim": bool(ctx.attr("keepdims", 1))})]

    return imp


def _topk(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    rank = ctx.type_of(x).rank
    axis = _axis(ctx, ctx.attr("axis", -1), rank)
    (k,) = ctx.int_input(1, "K", 1)
    # sorted=0 leaves the order open; kiln's is sorted, ties in index order (as ONNX asks).
    at = ctx.op("topk", [x], {"k": k, "axis": axis, "largest": bool(ctx.attr("largest", 1))})
    return [ctx.op("gather_elements", [x, at], {"axis": axis, "wrap": False}), at]


def _cumsum(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    x = ctx.input(0)
    (axis,) = ctx.int_input(1, "axis", 1)
    return [ctx.op("cumsum", [x], {"axis": _axis(ctx, axis, ctx.type_of(x).rank),
                                   "exclusive": bool(ctx.attr("exclusive", 0)),
                                   "reverse": bool(ctx.attr("reverse", 0))})]


_RESIZE_MODES = {"nearest": "nearest", "linear": "linear", "cubic": "cubic"}


def _resize(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    """Resize with scales or sizes given as constants; the axes that change must be the
    trailing ones (those in between keep their size)."""
    x = ctx.input(0)
    shape = ctx.type_of(x).shape
    mode = ctx.attr("mode", "nearest")
    coordinate = ctx.attr("coordinate_transformation_mode", "half_pixel")
    nearest = ctx.attr("nearest_mode", "round_prefer_floor")
    if mode not in _RESIZE_MODES or coordinate not in COORDINATES or (
            mode == "nearest" and nearest not in NEAREST_MODES):
        raise ctx.unsupported(f"Resize mode={mode!r}, coordinate_transformation_mode="
                              f"{coordinate!r}, nearest_mode={nearest!r} is not supported",
                              hint=f"kiln resizes with coordinate modes {list(COORDINATES)}")
    if ctx.attr("exclude_outside", 0):
        raise ctx.unsupported("Resize with exclude_outside=1 is not supported")
    scales = None
    if ctx.has_input(3):
        sizes = ctx.shape_input(3, "sizes")
    elif ctx.has_input(2):
        scales = [float(s) for s in ctx.const_input(2, "scales").reshape(-1)]
        sizes = [int(math.floor(d * s)) for d, s in zip(shape, scales)]
    else:
        raise ctx.error("Resize needs scales or sizes")
    if len(sizes) != len(shape):
        raise ctx.error(f"Resize has {len(sizes)} sizes for a rank-{len(shape)} tensor")
    changed = [k for k in range(len(shape)) if sizes[k] != shape[k] or (
        scales is not None and scales[k] != 1.0)]
    if not changed:
        return [x]
    lead = changed[0]
    attrs = {"sizes": tuple(sizes[lead:]), "mode": _RESIZE_MODES[mode],
             "coordinate": coordinate, "nearest": nearest,
             "cubic_a": float(ctx.attr("cubic_coeff_a", -0.75)),
             "scales": None if scales is None else tuple(scales[lead:])}
    return [ctx.op("resize", [x], attrs)]


ONNX_IMPORT.update({
    "GatherElements": _gather_elements,
    "ArgMax": _arg("argmax"),
    "ArgMin": _arg("argmin"),
    "TopK": _topk,
    "CumSum": _cumsum,
    "Resize": _resize,
})
