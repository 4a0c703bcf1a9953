"""LSTM, GRU and Elman RNN layers as kiln IR, shared by the PyTorch and ONNX importers.

The input projection ``x @ W_ih^T + b`` of all time steps is one GEMM over the whole sequence
(a ``linear``). The recurrence over the steps is one op per direction of a layer where kiln has
one: ``lstm_seq`` (an LSTM without peepholes) and ``gru_seq`` (a GRU whose reset gate applies
after the recurrent product, PyTorch's and ONNX's ``linear_before_reset=1``); each lowers to one
kernel with the step loop inside (ir/ops/recurrent.py). The other cells (Elman RNN, ONNX's LSTM
with peepholes, ONNX's GRU with ``linear_before_reset=0``) are unrolled over the sequence into
ops every backend already runs: only the recurrent ``h @ W_hh^T`` and the gates' elementwise
math are per step, and the elementwise part of a step fuses into a few kernels. Every unrolled
per-step value is kept as ``[1, batch, hidden]`` so that the steps concatenate into the output
sequence with no reshape.

The math is PyTorch's (aten/src/ATen/native/RNN.cpp), which is ONNX's with its default
activations:

    LSTM  i, f, o = sigmoid(.)   g = tanh(.)   c' = f * c + i * g   h' = o * tanh(c')
    GRU   r, z = sigmoid(.)      n = tanh(x_n + r * (h W_hn^T + b_hn))   h' = n + z * (h - n)
    RNN   h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)   act: tanh or relu (ONNX: also sigmoid)

ONNX's GRU with ``linear_before_reset=0`` (its default) applies the reset gate before the
recurrent product instead: ``n = tanh(x_n + (r * h) W_hn^T + b_hn)``. ONNX's LSTM may add
peephole terms ``p * c`` to the i, f and o gates.

The importers give their gate order as a string: PyTorch's LSTM is ``"ifgo"``, ONNX's
``"iofg"`` (ONNX calls g "c"); PyTorch's GRU is ``"rzn"``, ONNX's ``"zrn"``. An RNN has one
gate, ``"h"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from kiln.ir import TensorType

LSTM_GATES = frozenset("ifgo")
GRU_GATES = frozenset("rzn")
RNN_GATES = "h"
RNN_ACTIVATIONS = ("tanh", "relu", "sigmoid")
"""The activations an RNN step may apply (kiln ops of those names)."""


class Emitter(Protocol):
    """What the unrolling needs of an importer: the torch Importer and the ONNX
    ImportContext both have it."""

    def op(self, op: str, inputs: Sequence[str], attrs: dict | None = None) -> str: ...

    def op_multi(self, op: str, inputs: Sequence[str], attrs: dict | None = None
                 ) -> list[str]: ...

    def type_of(self, value: str) -> TensorType: ...

    b: Any
    """The GraphBuilder (its ``constant`` makes the zero initial states of the fused ops)."""


@dataclass(frozen=True)
class CellWeights:
    """The kiln values of one direction of one layer.

    ``w_ih`` is ``[gates * hidden, input]``, ``w_hh`` ``[gates * hidden, hidden]``, the biases
    ``[gates * hidden]`` (either may be None), ``peephole`` ONNX's ``[3 * hidden]`` (i, o, f).
    """

    w_ih: str
    w_hh: str
    b_ih: str | None = None
    b_hh: str | None = None
    peephole: str | None = None


def _add(e: Emitter, a: str | None, b: str | None) -> str | None:
    """a + b where None stands for zero."""
    if a is None or b is None:
        return b if a is None else a
    return e.op("add", [a, b])


def _mul(e: Emitter, a: str | None, b: str | None) -> str | None:
    """a * b where None stands for zero."""
    return None if a is None or b is None else e.op("mul", [a, b])


def _split(e: Emitter, v: str | None, names: str, axis: int = -1) -> dict[str, str | None]:
    """``v`` cut into equal parts along ``axis``, by gate name (all None when ``v`` is)."""
    if v is None:
        return dict.fromkeys(names)
    t = e.type_of(v)
    axis %= t.rank
    size = t.shape[axis] // len(names)
    parts = e.op_multi("split", [v], {"axis": axis, "sizes": (size,) * len(names)})
    return dict(zip(names, parts))


def _rows(e: Emitter, w: str, start: int, end: int) -> str:
    """Rows ``start:end`` of a matrix (constant weights fold at compile time)."""
    return e.op("slice", [w], {"axis": 0, "start": start, "end": end, "step": 1})


def _steps(e: Emitter, projected: str) -> list[str]:
    """``[T, B, G]`` cut into T values ``[1, B, G]``."""
    steps = e.type_of(projected).shape[0]
    if steps == 1:
        return [projected]
    return e.op_multi("split", [projected], {"axis": 0, "sizes": (1,) * steps})


def run_direction(e: Emitter, cell: str, x: str, w: CellWeights, gates: str, *,
                  reverse: bool = False, h0: str | None = None, c0: str | None = None,
                  linear_before_reset: bool = True, activation: str = "tanh"
                  ) -> tuple[str, str, str | None]:
    """One direction of one LSTM (``cell="lstm"``), GRU (``"gru"``) or Elman RNN (``"rnn"``,
    whose step applies ``activation``, one of RNN_ACTIVATIONS) layer over ``x``.

    ``x`` is ``[T, B, input]``, ``h0`` and ``c0`` ``[1, B, hidden]`` or None for zeros.
    Returns the hidden states of every step ``[T, B, hidden]`` in time order (a reverse
    direction runs from the last step to the first but lists its states in time order), the
    last hidden state ``[1, B, hidden]`` and, for an LSTM, the last cell state.
    """
    hidden = e.type_of(w.w_hh).shape[1]
    x_bias, h_bias = w.b_ih, w.b_hh
    fused = (cell == "lstm" and w.peephole is None) or (cell == "gru" and linear_before_reset)
    if cell in ("lstm", "rnn") or not linear_before_reset:
        # b_hh is added outside any product with a gate: fold it into the input GEMM's bias.
        x_bias, h_bias = _add(e, w.b_ih, w.b_hh), None
    ins = [x, w.w_ih] + ([x_bias] if x_bias is not None else [])
    projected = e.op("linear", ins)
    if fused:
        return _fused(e, cell, projected, w.w_hh, h_bias, gates, hidden, reverse, h0, c0)
    steps = _steps(e, projected)
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    if cell == "lstm":
        step = _LstmStep(e, w, gates)
    elif cell == "rnn":
        step = _RnnStep(e, w, activation)
    else:
        step = _GruStep(e, w, h_bias, gates, hidden, linear_before_reset)
    h, c = h0, c0
    states: list[str] = [""] * len(steps)
    for t in order:
        h, c = step(steps[t], h, c)
        states[t] = h
    return _sequence(e, states), h, c


def _fused(e: Emitter, cell: str, projected: str, w_hh: str, h_bias: str | None, gates: str,
           hidden: int, reverse: bool, h0: str | None, c0: str | None
           ) -> tuple[str, str, str | None]:
    """The recurrence as one ``lstm_seq`` or ``gru_seq`` node; its outputs sliced out."""
    steps, batch, _ = e.type_of(projected).shape
    dtype = e.type_of(projected).dtype.numpy

    def given(v: str | None, shape: tuple[int, ...], hint: str) -> str:
        return v if v is not None else e.b.constant(np.zeros(shape, dtype), hint)

    state = (1, batch, hidden)
    last = 0 if reverse else steps - 1
    attrs = {"gates": gates, "reverse": reverse}
    if cell == "lstm":
        out = e.op("lstm_seq", [projected, w_hh, given(h0, state, "h0"), given(c0, state, "c0")],
                   attrs)
        y = _slice(e, out, 2, 0, hidden)
        return (y, _slice(e, y, 0, last, last + 1),
                _slice(e, _slice(e, out, 0, last, last + 1), 2, hidden, 2 * hidden))
    b_hh = given(h_bias, (len(gates) * hidden,), "b_hh")
    y = e.op("gru_seq", [projected, w_hh, b_hh, given(h0, state, "h0")], attrs)
    return y, _slice(e, y, 0, last, last + 1), None


def _slice(e: Emitter, v: str, axis: int, start: int, end: int) -> str:
    return e.op("slice", [v], {"axis": axis, "start": start, "end": end, "step": 1})


class _LstmStep:
    def __init__(self, e: Emitter, w: CellWeights, gates: str) -> None:
        assert frozenset(gates) == LSTM_GATES and len(gates) == 4, gates
        self.e, self.w, self.gates = e, w, gates
        self.peep = _split(e, w.peephole, "iof", axis=0)

    def __call__(self, x: str, h: str | None, c: str | None) -> tuple[str, str]:
        e, peep = self.e, self.peep
        pre = x if h is None else e.op("add", [x, e.op("linear", [h, self.w.w_hh])])
        g = _split(e, pre, self.gates)
        i = e.op("sigmoid", [_add(e, g["i"], _mul(e, peep["i"], c))])
        f = e.op("sigmoid", [_add(e, g["f"], _mul(e, peep["f"], c))])
        cell = e.op("tanh", [g["g"]])
        c = _add(e, _mul(e, f, c), e.op("mul", [i, cell]))
        o = e.op("sigmoid", [_add(e, g["o"], _mul(e, peep["o"], c))])
        return e.op("mul", [o, e.op("tanh", [c])]), c


class _RnnStep:
    def __init__(self, e: Emitter, w: CellWeights, activation: str) -> None:
        assert activation in RNN_ACTIVATIONS, activation
        self.e, self.w_hh, self.activation = e, w.w_hh, activation

    def __call__(self, x: str, h: str | None, c: None) -> tuple[str, None]:
        e = self.e
        pre = x if h is None else e.op("add", [x, e.op("linear", [h, self.w_hh])])
        return e.op(self.activation, [pre]), None


class _GruStep:
    def __init__(self, e: Emitter, w: CellWeights, h_bias: str | None, gates: str, hidden: int,
                 linear_before_reset: bool) -> None:
        assert frozenset(gates) == GRU_GATES and gates[2] == "n", gates
        self.e, self.gates, self.h_bias = e, gates, h_bias
        self.lbr = linear_before_reset
        if linear_before_reset:
            self.w_hh = w.w_hh
        else:  # the reset and update gates' rows apart from the new gate's
            self.w_rz = _rows(e, w.w_hh, 0, 2 * hidden)
            self.w_n = _rows(e, w.w_hh, 2 * hidden, 3 * hidden)

    def __call__(self, x: str, h: str | None, c: None) -> tuple[str, None]:
        e = self.e
        g = _split(e, x, self.gates)
        if self.lbr:
            ins = [self.w_hh] + ([self.h_bias] if self.h_bias is not None else [])
            rec = self.h_bias if h is None else e.op("linear", [h, *ins])
            hg = _split(e, rec, self.gates)
        else:
            rec = None if h is None else e.op("linear", [h, self.w_rz])
            hg = _split(e, rec, self.gates[:2])
        r = e.op("sigmoid", [_add(e, g["r"], hg["r"])])
        z = e.op("sigmoid", [_add(e, g["z"], hg["z"])])
        if self.lbr:
            n_rec = _mul(e, r, hg["n"])
        else:
            n_rec = None if h is None else e.op("linear", [e.op("mul", [r, h]), self.w_n])
        n = e.op("tanh", [_add(e, g["n"], n_rec)])
        if h is None:  # h' = n + z * (0 - n)
            return e.op("sub", [n, e.op("mul", [z, n])]), None
        return e.op("add", [n, e.op("mul", [z, e.op("sub", [h, n])])]), None


def _sequence(e: Emitter, states: Sequence[str]) -> str:
    """Per-step states ``[1, B, H]`` as one ``[T, B, H]`` value."""
    return states[0] if len(states) == 1 else e.op("concat", list(states), {"axis": 0})
