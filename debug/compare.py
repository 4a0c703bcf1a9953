"""``kiln compare``: which layer, and which stage, lost the accuracy.

The model goes through kiln.compress's stages (pruning, low-rank, cleanups that fold batch
norms, int8) and then the llvm backend (fusion and code generation). After every stage each
layer's output is compared with the same layer in the imported graph run by the reference
backend (which matches eager PyTorch to float rounding; the table's last line compares the
final outputs with eager PyTorch itself). A cell is the largest error of that layer's output
after that stage, relative to the layer's largest magnitude, so reading a row from left to
right shows where the layer's error appeared.

Layers are the outputs of dense ops (conv, linear, matmul, attention) and norms, named as in
the imported graph. A layer whose output a stage renamed or reshaped shows ``-``: pruning
changes the channel count of the layers it prunes (``pruned``; later stages of such a layer are
measured against its pruned version, marked ``p``), and int8 layers whose output stays u8 are
compared after dequantizing with the calibrated range (after the relu fused into them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kiln.backends.reference import run_graph
from kiln.compression.compress import calibrate, compress_graph
from kiln.compression.quantize import activation_qparams
from kiln.debug.model_arg import load_model
from kiln.frontend.trace import trace_module
from kiln.ir import DType, Graph, KilnError

LAYER_OPS = ("conv", "linear", "matmul", "attention", "conv_transpose", "layer_norm",
             "batch_norm", "group_norm", "qconv", "qlinear")


@dataclass
class Comparison:
    """Per-layer relative errors: ``errors[layer][stage]`` (None: not comparable)."""

    stages: list[str]
    layers: list[str]
    errors: dict[str, dict[str, float | None]]
    notes: dict[str, dict[str, str]]
    eager_error: dict[str, float]

    def table(self) -> str:
        width = max([len(x) for x in self.layers] + [12])
        head = f"{'layer':<{width}}" + "".join(f"{s:>12}" for s in self.stages)
        lines = [head, "-" * len(head)]
        for layer in self.layers:
            cells = []
            for s in self.stages:
                e = self.errors[layer].get(s)
                note = self.notes[layer].get(s)
                cells.append(f"{note:>12}" if note else
                             f"{'-':>12}" if e is None else f"{e:>12.2e}")
            relu = self.notes[layer].get("relu")
            lines.append(f"{layer:<{width}}" + "".join(cells) +
                         (f"  (int8: compared after the fused {relu})" if relu else ""))
        lines.append(f"{'output vs eager':<{width}}" +
                     "".join(f"{self.eager_error.get(s, float('nan')):>12.2e}"
                             for s in self.stages))
        lines.append("cells: max |stage - imported| / max |imported| of each layer's output; "
                     "'pruned': fewer channels than imported; 'p': measured against the "
                     "pruned layer")
        return "\n".join(lines)


def _values(graph: Graph, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    seen: dict[str, np.ndarray] = dict(zip(graph.inputs, inputs))

    def keep(value: str, array: np.ndarray) -> None:
        seen[value] = np.array(array)

    outs = run_graph(graph, list(inputs), observe=keep)
    seen.update(zip(graph.outputs, outs))
    return seen


def _llvm_values(graph: Graph, inputs: Sequence[np.ndarray], wanted: Sequence[str]
                 ) -> dict[str, np.ndarray]:
    """Layer values computed by the llvm backend: a copy of the graph that also outputs them
    (so they are stored; the fusion of everything else is kept)."""
    from kiln.backends.llvm import compile_graph

    g = graph.copy()
    extra = [v for v in wanted if v in g.types and v not in g.outputs and v not in g.inputs
             and v not in g.constants]
    g.outputs = list(graph.outputs) + extra
    outs = compile_graph(g, cache=False)(list(inputs))
    return dict(zip(g.outputs, outs))


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.abs(want).max(initial=0.0)) or 1.0
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0.0)
                 / scale)


def compare(spec: str, *, prune: float | None = None, low_rank: float | None = None,
            quantize: str | None = None, calibration_batches: int = 4, backend: bool = True,
            seed: int = 0, prune_multiple: int | None = None) -> Comparison:
    """Run the compression stages on MODEL ``spec`` and measure each layer after each
    (``prune_multiple``: channels kept per pruned group are a multiple of it)."""
    module, inputs, _ = load_model(spec)
    module.eval()
    source, _ = trace_module(module, inputs, "fx")
    gen = torch.Generator().manual_seed(seed)
    data = [tuple(torch.randn(x.shape, generator=gen) if x.is_floating_point() else x
                  for x in inputs) for _ in range(max(1, calibration_batches))]
    result = compress_graph(
        source, data, teacher=module, low_rank=low_rank,
        prune=({"flops_target": prune, "multiple": prune_multiple}
               if prune is not None and prune_multiple is not None else prune),
        quantize={"method": quantize} if quantize else None)
    arrays = [x.numpy() for x in inputs]
    ref = _values(source, arrays)
    users = source.users()
    # A conv or linear followed by its batch norm is one layer (they fold into one): its row
    # is the batch norm's output.
    layers = [n.outputs[0] for n in source.nodes
              if n.op in LAYER_OPS and source.types[n.outputs[0]].dtype == DType.f32
              and [u.op for u in users.get(n.outputs[0], [])] != ["batch_norm"]]
    with torch.no_grad():
        eager = module(*inputs)
    eager_out = (eager if isinstance(eager, torch.Tensor) else eager[0]).numpy()
    stages = [(r.stage, r.graph) for r in result.report if r.graph is not None]
    ranges = None
    if quantize:
        o1 = next(g for s, g in stages if s == "O1")
        ranges = calibrate(o1, [[x.numpy() for x in b] for b in data], quantize)
    errors: dict[str, dict[str, float | None]] = {v: {} for v in layers}
    notes: dict[str, dict[str, str]] = {v: {} for v in layers}
    eager_error: dict[str, float] = {}
    runs = []
    for name, g in stages:
        found = {v: _locate(g, v, users, ranges) for v in layers}
        runs.append((name, g, found, _values(g, arrays)))
    if backend:
        name, g, found, _ = runs[-1]
        wanted = [f[0] for f in found.values() if f is not None]
        runs.append(("llvm", g, found, _llvm_values(g, arrays, wanted)))
    # Once pruning has changed a layer's shape, later stages are measured against the pruned
    # layer (the cell is marked 'p').
    pruned_base: dict[str, dict[str, np.ndarray]] = {v: {} for v in layers}
    for name, g, found, vals in runs:
        eager_error[name] = _rel(vals[g.outputs[0]], eager_out)
        for v in layers:
            if found[v] is None:
                errors[v][name] = None
                continue
            value, convert, ref_value = found[v]
            got, want = convert(vals[value]), ref[ref_value]
            base = pruned_base[v].get(ref_value)
            if base is None and v in pruned_base[v] and ref_value != v:
                base = np.maximum(pruned_base[v][v], 0)  # the pruned layer, then its relu
            if got.shape != want.shape and base is None:
                errors[v][name] = None
                notes[v][name] = "pruned"
                pruned_base[v][ref_value] = got
            elif got.shape != want.shape and base.shape == got.shape:
                errors[v][name] = _rel(got, base)
                notes[v][name] = f"{errors[v][name]:.2e}p"
            elif got.shape != want.shape:
                errors[v][name] = None
            else:
                errors[v][name] = _rel(got, want)
            if ref_value != v:
                notes[v].setdefault("relu", ref_value)
    return Comparison([n for n, *_ in runs], layers, errors, notes, eager_error)


def _locate(graph: Graph, value: str, users: dict, ranges: dict | None):
    """Where layer ``value`` of the imported graph is in ``graph``: (value there, conversion
    to the imported layout and dtype, the imported value it matches), or None. A layer whose
    relu was fused into its int8 form is matched with that relu's output."""
    types = graph.types
    if value in types and value not in graph.constants:
        return value, lambda a: a, value
    if f"{value}.nhwc" in types:   # an int8 conv with a float output, channels last
        return f"{value}.nhwc", lambda a: a.transpose(0, 3, 1, 2), value
    readers = users.get(value, [])
    candidates = [value]
    if len(readers) == 1 and readers[0].op == "relu":
        candidates.append(readers[0].outputs[0])
    for v in candidates[1:]:
        if v in types:
            return v, lambda a: a, v
        if f"{v}.nhwc" in types:
            return f"{v}.nhwc", lambda a: a.transpose(0, 3, 1, 2), v
    for v in candidates:
        for n in graph.nodes:
            if n.op in ("qconv", "qlinear") and n.outputs[0].startswith(f"{v}.u8") \
                    and ranges is not None and v in ranges:
                scale, zp = activation_qparams(*ranges[v], value=v)

                def convert(a, conv=n.op == "qconv", scale=scale, zp=zp):
                    x = (a.astype(np.float32) - zp) * np.float32(scale)
                    return x.transpose(0, 3, 1, 2) if conv else x

                return n.outputs[0], convert, v
    return None


def check_options(prune: float | None, low_rank: float | None) -> None:
    """Refuse fractions outside (0, 1) before any work is done."""
    for name, v in (("--prune", prune), ("--low-rank", low_rank)):
        if v is not None and not 0.0 < v < 1.0:
            raise KilnError(f"{name} must be a fraction in (0, 1), got {v}")
