"""Recurrent ops: one direction of one LSTM or GRU layer over a whole sequence.

The input projection ``x @ W_ih^T + b`` of every time step is one ``linear`` over the sequence
(a GEMM); these ops take its result, ``xproj`` ``[T, B, G * H]``, and run the recurrence:
per step ``h @ W_hh^T`` and the gates' elementwise math. Being one op, a direction lowers to
one kernel whose serial loop runs the time steps, instead of a few kernels per step.

Both ops have one output (fusion gives an anchor one output): the LSTM's is ``[T, B, 2H]``,
each step's hidden state in ``[..., :H]`` and its cell state in ``[..., H:]``, so that ``y``,
``h_n`` and ``c_n`` are slices of it; the GRU's is ``y`` ``[T, B, H]``.

The math is PyTorch's (and ONNX's, with GRU ``linear_before_reset=1``); ``gates`` names the
order of the gate blocks in the rows of ``W_hh`` and the columns of ``xproj``:

    LSTM  i, f, o = sigmoid(.)   g = tanh(.)   c' = f * c + i * g   h' = o * tanh(c')
    GRU   r, z = sigmoid(xproj_rz + h W_hrz^T + b_hrz)
          n = tanh(xproj_n + r * (h W_hn^T + b_hn))   h' = n + z * (h - n)

``reverse`` runs the steps from the last to the first (a bidirectional layer's backward
direction); the output stays in time order.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.errors import ShapeError
from kiln.ir.ops._rules import same_dtype, want_float
from kiln.ir.registry import register
from kiln.ir.types import TensorType


def _check_gates(op: str, gates: str, names: str) -> None:
    if sorted(gates) != sorted(names):
        raise ShapeError(f"{op}: gates {gates!r} must order the letters {names!r}",
                         hint=f"e.g. gates={names!r}")


def _seq_infer(op: str, names: str, ins, attrs) -> tuple[int, int, int]:
    """Checks shared by both ops; returns (T, B, H)."""
    same_dtype(ins)
    want_float(ins[0])
    _check_gates(op, attrs["gates"], names)
    x, w = ins[0], ins[1]
    g = len(names)
    if w.rank != 2 or w.shape[0] != g * w.shape[1]:
        raise ShapeError(f"{op}: w_hh {list(w.shape)} must be [{g} * hidden, hidden]")
    hidden = w.shape[1]
    if x.rank != 3 or x.shape[2] != g * hidden:
        raise ShapeError(f"{op}: xproj {list(x.shape)} must be [steps, batch, {g * hidden}]",
                         hint="xproj is the input projection x @ W_ih^T + b of every step")
    return x.shape[0], x.shape[1], hidden


def _state_check(op: str, what: str, t: TensorType, batch: int, hidden: int) -> None:
    if t.shape != (1, batch, hidden):
        raise ShapeError(f"{op}: {what} {list(t.shape)} must be [1, {batch}, {hidden}]")


def _lstm_infer(ins, attrs):
    steps, batch, hidden = _seq_infer("lstm_seq", "ifgo", ins, attrs)
    for t, what in zip(ins[2:], ("h0", "c0")):
        _state_check("lstm_seq", what, t, batch, hidden)
    return [TensorType((steps, batch, 2 * hidden), ins[0].dtype)]


def _gru_infer(ins, attrs):
    steps, batch, hidden = _seq_infer("gru_seq", "rzn", ins, attrs)
    if ins[2].shape != (3 * hidden,):
        raise ShapeError(f"gru_seq: b_hh {list(ins[2].shape)} must be [{3 * hidden}]")
    _state_check("gru_seq", "h0", ins[3], batch, hidden)
    return [TensorType((steps, batch, hidden), ins[0].dtype)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _gate(pre: np.ndarray, gates: str, name: str, hidden: int) -> np.ndarray:
    k = gates.index(name)
    return pre[..., k * hidden:(k + 1) * hidden]


def _lstm_ref(xproj, w_hh, h0, c0, gates="ifgo", reverse=False):
    x, w = xproj.astype(np.float64), w_hh.astype(np.float64)
    hidden = w.shape[1]
    h, c = h0[0].astype(np.float64), c0[0].astype(np.float64)
    out = np.zeros(x.shape[:2] + (2 * hidden,))
    for t in _order(x.shape[0], reverse):
        pre = x[t] + h @ w.T
        i, f, g, o = (_gate(pre, gates, q, hidden) for q in "ifgo")
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out[t, :, :hidden], out[t, :, hidden:] = h, c
    return out.astype(xproj.dtype)


def _gru_ref(xproj, w_hh, b_hh, h0, gates="rzn", reverse=False):
    x, w = xproj.astype(np.float64), w_hh.astype(np.float64)
    hidden = w.shape[1]
    h = h0[0].astype(np.float64)
    out = np.zeros(x.shape[:2] + (hidden,))
    for t in _order(x.shape[0], reverse):
        rec = h @ w.T + b_hh.astype(np.float64)
        r = _sigmoid(_gate(x[t], gates, "r", hidden) + _gate(rec, gates, "r", hidden))
        z = _sigmoid(_gate(x[t], gates, "z", hidden) + _gate(rec, gates, "z", hidden))
        n = np.tanh(_gate(x[t], gates, "n", hidden) + r * _gate(rec, gates, "n", hidden))
        h = n + z * (h - n)
        out[t] = h
    return out.astype(xproj.dtype)


def _flops(elementwise: int):
    """Per step: the recurrent product (2 * B * G*H * H) and ``elementwise`` operations per
    hidden unit (exp and tanh counted as one)."""

    def flops(ins, outs, attrs):
        steps, batch, gh = ins[0].shape
        hidden = ins[1].shape[1]
        return steps * batch * (2 * gh * hidden + elementwise * hidden)

    return flops


register("lstm_seq", ["xproj", "w_hh", "h0", "c0"], infer=_lstm_infer, reference=_lstm_ref,
         kind="dense", attrs={"gates": "ifgo", "reverse": False},
         description="an LSTM direction over a sequence: xproj [T,B,4H] (x W_ih^T + biases), "
                     "w_hh [4H,H], h0, c0 [1,B,H] -> [T,B,2H] (h | c per step)",
         flops=_flops(4 + 3 * 4 + 2 + 3))
register("gru_seq", ["xproj", "w_hh", "b_hh", "h0"], infer=_gru_infer, reference=_gru_ref,
         kind="dense", attrs={"gates": "rzn", "reverse": False},
         description="a GRU direction over a sequence (linear before reset): xproj [T,B,3H] "
                     "(x W_ih^T + b_ih), w_hh [3H,H], b_hh [3H], h0 [1,B,H] -> y [T,B,H]",
         flops=_flops(3 + 2 * 4 + 2 + 2 + 3))
