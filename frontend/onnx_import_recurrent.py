"""ONNX ``LSTM``, ``GRU`` and ``RNN`` as kiln IR, built by ``kiln.frontend.recurrent`` (one
fused op per direction for LSTM without peepholes and GRU with ``linear_before_reset=1``, the
others unrolled over the static sequence).

Read: every direction (forward, reverse, bidirectional), both layouts, the optional bias,
initial states and (LSTM) peepholes, GRU's ``linear_before_reset``, RNN's activation (Tanh,
Relu or Sigmoid, per direction), and weights that are constants or computed. Refused with a
KilnError naming the node: LSTM and GRU activations other than the defaults (sigmoid and
tanh), RNN activations other than those three, ``clip``, LSTM's ``input_forget``, and
``sequence_lens`` unless it is a constant giving every batch entry the full sequence length
(kiln compiles one static length; shorter entries would need masking). Importing this module
adds the ops to ``kiln.frontend.onnx_import``'s ``ONNX_IMPORT`` table (that module imports it
at its end).
"""

from __future__ import annotations

import numpy as np
import onnx

from kiln.frontend.onnx_import import ONNX_IMPORT, ImportContext
from kiln.frontend.recurrent import (
    RNN_ACTIVATIONS,
    RNN_GATES,
    CellWeights,
    run_direction,
)

# The ONNX gate order in the rows of W and R, in kiln.frontend.recurrent's gate names.
GATES = {"LSTM": "iofg", "GRU": "zrn", "RNN": RNN_GATES}
_DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"),
                        "RNN": ("tanh",)}
_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}


def _part(ctx: ImportContext, v: str, axis: int, start: int, end: int,
          shape: tuple[int, ...], hint: str) -> str:
    """``v[start:end]`` along ``axis``, reshaped to ``shape``: cut while importing when ``v`` is
    a constant, by kiln ops when it is computed."""
    array = ctx.const_value(v)
    if array is not None:
        return ctx.constant(np.take(array, range(start, end), axis=axis).reshape(shape), hint)
    cut = ctx.op("slice", [v], {"axis": axis, "start": start, "end": end, "step": 1})
    return ctx.reshape(cut, shape)


def _optional_part(ctx: ImportContext, v: str | None, axis: int, start: int, end: int,
                   shape: tuple[int, ...], hint: str) -> str | None:
    """``_part`` of an optional operand; None when it is missing or a constant zero, both of
    which the unrolling skips (a zero initial state saves the first step's product)."""
    if v is None:
        return None
    array = ctx.const_value(v)
    if array is not None and not np.any(np.take(array, range(start, end), axis=axis)):
        return None
    return _part(ctx, v, axis, start, end, shape, hint)


def _bias_rows(ctx: ImportContext, v: str | None, dirs: int, gh: int) -> str | None:
    """B ``[dirs, 2 * gh]`` as ``[2 * dirs, gh]``: row ``2d`` is direction d's input bias,
    row ``2d + 1`` its recurrent bias."""
    if v is None:
        return None
    array = ctx.const_value(v)
    if array is not None:
        return ctx.constant(array.reshape(2 * dirs, gh), "B")
    return ctx.reshape(v, (2 * dirs, gh))


def _rnn_activations(ctx: ImportContext, dirs: int) -> list[str]:
    """An RNN's activation of each direction (kiln op names); ONNX's default is Tanh."""
    activations = ctx.attr("activations")
    if activations is None:
        return ["tanh"] * dirs
    names = [a.lower() for a in activations]
    if len(names) != dirs:
        raise ctx.error(f"RNN has {len(names)} activations for {dirs} direction(s)",
                        hint="give one activation per direction")
    unknown = [a for a, n in zip(activations, names) if n not in RNN_ACTIVATIONS]
    if unknown:
        raise ctx.unsupported(f"RNN with activation {unknown[0]}: kiln reads Tanh, Relu and "
                              "Sigmoid", hint="export the layer with one of those activations")
    return names


def _check_attributes(ctx: ImportContext, op: str, dirs: int) -> None:
    activations = ctx.attr("activations")
    if activations is not None and op != "RNN":  # an RNN's are read by _rnn_activations
        default = _DEFAULT_ACTIVATIONS[op] * dirs
        if tuple(a.lower() for a in activations) != default:
            raise ctx.unsupported(f"{op} with activations {activations}: kiln reads the default "
                                  f"ones only ({', '.join(default)})",
                                  hint="export the layer with its default activations")
    if ctx.has_attr("clip"):
        raise ctx.unsupported(f"{op} with clip={ctx.attr('clip')} is not supported",
                              hint="export the layer without cell clipping")
    if op == "LSTM" and ctx.attr("input_forget", 0):
        raise ctx.unsupported("LSTM with input_forget=1 (coupled input and forget gates) is "
                              "not supported", hint="export the layer with input_forget=0")
    if ctx.attr("layout", 0) not in (0, 1):
        raise ctx.error(f"{op} layout must be 0 or 1, got {ctx.attr('layout')}")


def _check_sequence_lens(ctx: ImportContext, op: str, steps: int) -> None:
    if not ctx.has_input(4):
        return
    lens = ctx.const_input(4, "sequence_lens")
    if np.any(lens != steps):
        raise ctx.unsupported(f"{op} with sequence_lens {lens.reshape(-1).tolist()}: kiln runs "
                              f"every batch entry over the full sequence of {steps} steps",
                              hint="run entries of different lengths as separate calls, "
                                   "each exported with its own sequence length")


def _check_shapes(ctx: ImportContext, op: str, dirs: int, gates: int, hidden: int,
                  size: int, batch: int) -> None:
    """Every operand's shape against the ONNX definition (shape inference does not check
    them all)."""
    want = {1: (dirs, gates * hidden, size), 2: (dirs, gates * hidden, hidden),
            3: (dirs, 2 * gates * hidden), 7: (dirs, 3 * hidden)}
    layout = ctx.attr("layout", 0)
    for i in (5, 6):
        want[i] = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    names = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")
    for i, shape in want.items():
        if ctx.has_input(i) and ctx.in_type(i).shape != shape:
            raise ctx.error(f"{op} operand {names[i]} is {list(ctx.in_type(i).shape)}; with "
                            f"hidden_size {hidden} it must be {list(shape)}",
                            hint="the file is damaged or was written wrongly: re-export it")


def _recurrent(ctx: ImportContext, node: onnx.NodeProto) -> list[str]:
    op = node.op_type
    cell = op.lower()
    gates = GATES[op]
    direction = ctx.attr("direction", "forward")
    if direction not in _DIRECTIONS:
        raise ctx.error(f"{op} direction {direction!r} is not one of {sorted(_DIRECTIONS)}")
    dirs = _DIRECTIONS[direction]
    _check_attributes(ctx, op, dirs)
    activations = _rnn_activations(ctx, dirs) if op == "RNN" else ["tanh"] * dirs
    layout = ctx.attr("layout", 0)
    x = ctx.input(0)
    if ctx.type_of(x).rank != 3:
        raise ctx.error(f"{op} input X must have rank 3, got {list(ctx.type_of(x).shape)}")
    if layout:
        x = ctx.op("permute", [x], {"perm": (1, 0, 2)})
    steps, batch, size = ctx.type_of(x).shape
    if ctx.in_type(2).rank != 3:
        raise ctx.error(f"{op} operand R must have rank 3, got {list(ctx.in_type(2).shape)}",
                        hint="the file is damaged or was written wrongly: re-export it")
    hidden = ctx.in_type(2).shape[2]
    if ctx.attr("hidden_size", hidden) != hidden:
        raise ctx.error(f"{op} hidden_size {ctx.attr('hidden_size')} does not match R's "
                        f"{list(ctx.in_type(2).shape)}", hint="re-export the model")
    _check_shapes(ctx, op, dirs, len(gates), hidden, size, batch)
    if steps == 0:
        raise ctx.error(f"{op} input has an empty sequence", hint="give at least one time step")
    _check_sequence_lens(ctx, op, steps)
    gh = len(gates) * hidden
    state_axis = 1 if layout else 0
    lbr = bool(ctx.attr("linear_before_reset", 0))
    bias = _bias_rows(ctx, ctx.optional(3), dirs, gh)
    ys, last = [], ([], [])
    for d in range(dirs):
        k = f"{cell}{d}"
        weights = CellWeights(
            _part(ctx, ctx.input(1), 0, d, d + 1, (gh, size), f"{k}.W"),
            _part(ctx, ctx.input(2), 0, d, d + 1, (gh, hidden), f"{k}.R"),
            _optional_part(ctx, bias, 0, 2 * d, 2 * d + 1, (gh,), f"{k}.Wb"),
            _optional_part(ctx, bias, 0, 2 * d + 1, 2 * d + 2, (gh,), f"{k}.Rb"),
            _optional_part(ctx, ctx.optional(7), 0, d, d + 1, (3 * hidden,), f"{k}.P")
            if cell == "lstm" else None)
        # One direction's initial state as [1, batch, hidden] in either layout (moving an axis
        # of size 1 is a reshape).
        h0, c0 = [_optional_part(ctx, ctx.optional(i), state_axis, d, d + 1,
                                 (1, batch, hidden), f"{k}.initial")
                  for i in ((5, 6) if cell == "lstm" else (5,))] + [None] * (cell != "lstm")
        reverse = d == 1 or direction == "reverse"
        seq, h, c = run_direction(ctx, cell, x, weights, gates, reverse=reverse, h0=h0, c0=c0,
                                  linear_before_reset=lbr, activation=activations[d])
        ys.append(seq)
        last[0].append(h)
        last[1].append(c)

    def wanted(k: int) -> bool:
        return k < len(node.output) and node.output[k] != ""

    # Unrequested outputs are not built: "" never reaches a value (the importer skips them).
    results = [""] * (3 if cell == "lstm" else 2)
    if wanted(0):
        y = [ctx.reshape(s, (steps, 1, batch, hidden)) for s in ys]
        y = y[0] if dirs == 1 else ctx.op("concat", y, {"axis": 1})
        results[0] = ctx.op("permute", [y], {"perm": (2, 0, 1, 3)}) if layout else y
    for k, states in enumerate(last[: len(results) - 1], start=1):
        if wanted(k):
            both = states[0] if dirs == 1 else ctx.op("concat", states, {"axis": 0})
            results[k] = ctx.op("permute", [both], {"perm": (1, 0, 2)}) if layout else both
    return results


ONNX_IMPORT.update({"LSTM": _recurrent, "GRU": _recurrent, "RNN": _recurrent})
