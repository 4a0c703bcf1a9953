"""nn.LSTM, nn.GRU and nn.RNN as kiln IR, built by ``kiln.frontend.recurrent`` (LSTM and GRU
as one fused recurrent op per direction, RNN unrolled over the static sequence).

torch.fx keeps the modules whole (they are leaf modules: their forward() checks its inputs
with Python control flow that symbolic tracing cannot follow); torch.export and Dynamo give
``aten.lstm`` / ``aten.gru`` / ``aten.rnn_tanh`` / ``aten.rnn_relu`` (``torch._VF.lstm`` ...)
with the flat weight list. Both come here. Projections (``proj_size``) and packed sequences
are refused.

Importing this module registers the handlers in ``kiln.frontend.handlers``' tables (that
module imports it at its end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from kiln.frontend.handlers import on, on_module, permute, reshape_to, slice_axis
from kiln.frontend.importer import Importer, Traced
from kiln.frontend.recurrent import RNN_GATES, CellWeights, run_direction

aten = torch.ops.aten

GATES = {"lstm": "ifgo", "gru": "rzn", "rnn": RNN_GATES}
"""PyTorch's gate order in the rows of weight_ih / weight_hh."""

_PACKED_HINT = ("pass the padded batch as a tensor (all sequences of one length), or run "
                "sequences of different lengths as separate calls")


def _initial_states(imp: Importer, hx: Any, layers: int, batch: int) -> list[str | None]:
    """The initial states ``[1, batch, hidden]`` of each (layer, direction), from ``hx``
    (``[layers, batch, hidden]``, or ``[layers, hidden]`` unbatched); None stands for zeros,
    so the first step skips its recurrent product."""
    if hx is None or (isinstance(hx, torch.Tensor) and not torch.any(hx)):
        return [None] * layers
    v = reshape_to(imp, hx, (layers, batch, hx.shape[-1]))
    return [slice_axis(imp, v, 0, k, k + 1) for k in range(layers)]


def _recurrent(imp: Importer, cell: str, x: Any, hx: Sequence[Any], weights: list[CellWeights],
               num_layers: int, bidirectional: bool, batch_first: bool,
               real: Sequence[torch.Tensor], activation: str = "tanh") -> list[str]:
    """The outputs (sequence, then h_n and for an LSTM c_n) shaped as PyTorch's ``real``
    ones. ``weights`` lists (layer, direction) pairs in PyTorch's order; ``hx`` holds h0 (and
    c0), each a tensor or None; ``activation`` is an RNN's nonlinearity."""
    if not isinstance(x, (Traced, torch.Tensor)):
        raise imp.error(f"{cell.upper()} input is a {type(x).__name__}; kiln compiles padded "
                        "tensor inputs only", hint=_PACKED_HINT)
    if x.ndim == 2:  # unbatched [T, input]: computed as a batch of one
        v = reshape_to(imp, x, (x.shape[0], 1, x.shape[1]))
    else:
        v = permute(imp, imp.value(x), (1, 0, 2)) if batch_first else imp.value(x)
    steps, batch = imp.type_of(v).shape[:2]
    if steps == 0:
        raise imp.error(f"{cell.upper()} input has an empty sequence",
                        hint="give at least one time step")
    dirs = 2 if bidirectional else 1
    states = [_initial_states(imp, s, num_layers * dirs, batch) for s in hx]
    last: list[list[str]] = [[] for _ in hx]
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            initial = [s[k] for s in states] + [None]
            seq, h, c = run_direction(imp, cell, v, weights[k], GATES[cell], reverse=d == 1,
                                      h0=initial[0], c0=initial[1], activation=activation)
            outs.append(seq)
            for out, value in zip(last, (h, c)):
                out.append(value)
        v = outs[0] if dirs == 1 else imp.op("concat", outs, {"axis": 2})
    if batch_first and x.ndim == 3:
        v = permute(imp, v, (1, 0, 2))
    results = [reshape_to(imp, v, real[0].shape)]
    for out, r in zip(last, real[1:]):
        both = out[0] if len(out) == 1 else imp.op("concat", out, {"axis": 0})
        results.append(reshape_to(imp, both, r.shape))
    return results


# ---- nn.LSTM / nn.GRU / nn.RNN (torch.fx leaf modules) ---------------------------------------
def _module_weights(imp: Importer, mod: nn.RNNBase) -> list[CellWeights]:
    weights = []
    for layer in range(mod.num_layers):
        for suffix in ("", "_reverse")[: 2 if mod.bidirectional else 1]:
            p = {n: getattr(mod, f"{n}_l{layer}{suffix}", None)
                 for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            weights.append(CellWeights(
                imp.value(p["weight_ih"]), imp.value(p["weight_hh"]),
                *(imp.value(p[n]) if mod.bias else None for n in ("bias_ih", "bias_hh"))))
    return weights


def _check_module(imp: Importer, mod: nn.RNNBase, x: Any) -> None:
    name = type(mod).__name__
    if isinstance(x, PackedSequence):
        raise imp.error(f"{name} on a PackedSequence is not supported", hint=_PACKED_HINT)
    if getattr(mod, "proj_size", 0):
        raise imp.error(f"{name} with proj_size={mod.proj_size} is not supported",
                        hint="use proj_size=0, with an nn.Linear on the outputs if needed")


@on_module(nn.LSTM)
def _lstm_module(imp, mod, real, input, hx=None):
    _check_module(imp, mod, input)
    h0, c0 = (None, None) if hx is None else hx
    out, h_n, c_n = _recurrent(imp, "lstm", input, (h0, c0), _module_weights(imp, mod),
                               mod.num_layers, mod.bidirectional, mod.batch_first,
                               (real[0], *real[1]))
    return out, (h_n, c_n)


@on_module(nn.GRU)
def _gru_module(imp, mod, real, input, hx=None):
    _check_module(imp, mod, input)
    out, h_n = _recurrent(imp, "gru", input, (hx,), _module_weights(imp, mod), mod.num_layers,
                          mod.bidirectional, mod.batch_first, real)
    return out, h_n


@on_module(nn.RNN)
def _rnn_module(imp, mod, real, input, hx=None):
    _check_module(imp, mod, input)
    out, h_n = _recurrent(imp, "rnn", input, (hx,), _module_weights(imp, mod), mod.num_layers,
                          mod.bidirectional, mod.batch_first, real, mod.nonlinearity)
    return out, h_n


# ---- aten.lstm / gru / rnn_tanh / rnn_relu (torch.export, Dynamo, torch._VF calls) -----------
def _flat_weights(imp: Importer, cell: str, params: Sequence[Any], has_biases: bool,
                  cells: int) -> list[CellWeights]:
    """PyTorch's flat weight list (w_ih, w_hh[, b_ih, b_hh][, w_hr] per layer and direction)
    as CellWeights."""
    per = len(params) // max(cells, 1)
    if per != (4 if has_biases else 2) or per * cells != len(params):
        raise imp.error(f"{cell.upper()} with {len(params)} weights for {cells} layers and "
                        "directions: projections (proj_size) are not supported",
                        hint="use proj_size=0, with an nn.Linear on the outputs if needed")
    return [CellWeights(*(imp.value(p) for p in params[k * per:(k + 1) * per]))
            for k in range(cells)]


def _check_aten(imp: Importer, cell: str, packed: bool, dropout: float, train: bool) -> None:
    if packed:
        raise imp.error(f"{cell.upper()} on a packed sequence is not supported",
                        hint=_PACKED_HINT)
    if train and dropout:
        raise imp.error(f"{cell.upper()} with dropout in training mode",
                        hint="call model.eval() before compiling for inference")


@on(aten.lstm, torch.lstm)
def _lstm_aten(imp, real, input, hx, params, has_biases, num_layers, dropout, train,
               bidirectional, batch_first=False):
    # aten.lstm.data (a packed sequence) passes (data, batch_sizes, hx, params, ...).
    _check_aten(imp, "lstm", not isinstance(hx, (list, tuple)), dropout, train)
    cells = num_layers * (2 if bidirectional else 1)
    return tuple(_recurrent(imp, "lstm", input, tuple(hx),
                            _flat_weights(imp, "lstm", params, has_biases, cells),
                            num_layers, bidirectional, batch_first, real))


@on(aten.gru, torch.gru)
def _gru_aten(imp, real, input, hx, params, has_biases, num_layers, dropout, train,
              bidirectional, batch_first=False):
    # aten.gru.data (a packed sequence) passes (data, batch_sizes, hx, params, ...).
    _check_aten(imp, "gru", not isinstance(params, (list, tuple)), dropout, train)
    cells = num_layers * (2 if bidirectional else 1)
    return tuple(_recurrent(imp, "gru", input, (hx,),
                            _flat_weights(imp, "gru", params, has_biases, cells),
                            num_layers, bidirectional, batch_first, real))


def _rnn_aten(activation: str):
    def handler(imp, real, input, hx, params, has_biases, num_layers, dropout, train,
                bidirectional, batch_first=False):
        # aten.rnn_*.data (a packed sequence) passes (data, batch_sizes, hx, params, ...).
        _check_aten(imp, "rnn", not isinstance(params, (list, tuple)), dropout, train)
        cells = num_layers * (2 if bidirectional else 1)
        return tuple(_recurrent(imp, "rnn", input, (hx,),
                                _flat_weights(imp, "rnn", params, has_biases, cells),
                                num_layers, bidirectional, batch_first, real, activation))

    return handler


on(aten.rnn_tanh, torch.rnn_tanh)(_rnn_aten("tanh"))
on(aten.rnn_relu, torch.rnn_relu)(_rnn_aten("relu"))
