"""``kiln.compress``: make a model smaller and faster at an accuracy cost the user chooses.

Stages, each only when asked for, in this order:

1. cleanups that keep batch norms (their scales rank channels): fold_constants,
   simplify_algebra, dce;
2. ``prune``: structured channel pruning (compression/prune.py), Taylor scores from the data when
   the criterion is ``taylor``; with ``"schedule": "agp"`` the pruning happens gradually
   during stage 4 instead (compression/gradual.py), after the low-rank stage;
3. ``low_rank``: SVD factorization of dense layers (compression/low_rank.py);
4. ``distill``: knowledge distillation of the pruned / factorized student against the original
   model on the data (compression/distill.py);
5. the O1 cleanups (batch norms fold into the layers);
6. ``quantize``: int8 with activation ranges calibrated on the data (compression/quantize.py), then
   the layout cleanup and dce; with ``"mode": "qat"`` the calibrated graph is first fine-tuned
   with fake quantization at the same grids (quantization-aware training, compression/qat.py).

Every stage is recorded (parameters, FLOPs, seconds, the graph after it) in the result's
report; ``kiln compare`` reads the graphs to say which stage moved which layer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kiln.backends.reference import run_graph
from kiln.compression.calibration import RangeObserver
from kiln.compression.prune import graph_flops
from kiln.compression.quantize import calibration_values
from kiln.ir import Graph, KilnError, verify
from kiln.passes import PassContext, PassManager, Verify, get_pass, get_pipeline
from kiln.passes.dce import remove_dead
from kiln.passes.target import Target

log = logging.getLogger("kiln.compress")

# The passes' own defaults apply to whatever is not set here (prune_channels: ratio 0.3 of every
# group by L1 norm; low_rank: energy 0.9).
PRUNE_DEFAULTS: dict[str, Any] = {}
QUANTIZE_DEFAULTS = {"mode": "static", "method": "percentile", "percentile": 99.99,
                     "max_batches": 32, "protect": ()}
DISTILL_DEFAULTS = {"epochs": 3, "lr": 1e-3, "temperature": 4.0, "alpha": 0.9}
LOW_RANK_DEFAULTS: dict[str, Any] = {}


@dataclass
class StageReport:
    """What one compression stage left: its name, parameters, FLOPs, the seconds it took and
    the graph after it."""

    stage: str
    parameters: int
    flops: int
    seconds: float
    graph: Graph | None = field(default=None, repr=False)


@dataclass
class Compressed:
    """The result of ``kiln.compress``: the compressed graph, the graph it came from, and one
    report line per stage."""

    graph: Graph
    source_graph: Graph
    out_spec: Any
    report: list[StageReport] = field(default_factory=list)
    # Quantization's decision per conv / linear layer: name -> (precision, why).
    layers: dict[str, tuple[str, str]] = field(default_factory=dict)
    # One-shot pruning: the FLOPs removed against the target, and the groups rounded to a
    # finer channel multiple than asked to land on it (layers -> multiple).
    pruning: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The report as a text table: one line per stage, then (when quantized) the
        precision each layer runs in and why."""
        lines = [f"{'stage':<12} {'params':>12} {'MFLOPs':>10} {'seconds':>8}"]
        for r in self.report:
            lines.append(f"{r.stage:<12} {r.parameters:>12,} {r.flops / 1e6:>10.2f} "
                         f"{r.seconds:>8.2f}")
        p = self.pruning
        if p:
            target = "" if p["flops_target"] is None else f" (target {p['flops_target']:.3f})"
            lines += ["", f"pruning: {p['flops_removed']:.3f} of the FLOPs removed{target}, "
                          f"kept channels in multiples of {p['multiple']}"]
            lines += [f"  {layers}: multiple of {m}, to land on the target"
                      for layers, m in p["finer_rounding"].items()]
        if self.layers:
            width = max(len(n) for n in self.layers)
            lines += ["", f"{'layer':<{width}}  precision  why"]
            lines += [f"{name:<{width}}  {prec:<9}  {why}"
                      for name, (prec, why) in self.layers.items()]
        return "\n".join(lines)


def _options(value: Any, defaults: Mapping[str, Any], scalar_key: str | None, what: str
             ) -> dict[str, Any] | None:
    """None/False -> None; True -> defaults; a number -> {scalar_key: number}; a dict ->
    defaults updated by it."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(defaults)
    if isinstance(value, (int, float)) and scalar_key is not None:
        return {**defaults, scalar_key: float(value)}
    if isinstance(value, Mapping):
        return {**defaults, **value}
    raise KilnError(f"{what}= takes None, True, a number or a dict of options, got "
                    f"{type(value).__name__}", hint=f"see help(kiln.compress) for {what}")


def data_batches(data: Any, graph: Graph, limit: int | None = None) -> list[list[np.ndarray]]:
    """The data as batches shaped exactly like the graph's inputs. A tensor or array of many
    samples, or a batch of more samples than the graph's (a data loader's batch of 32 for a
    model compiled at batch 1), is cut into the graph's batch size along its leading
    dimension; a trailing partial batch is dropped."""
    if data is None:
        raise KilnError("this compression needs data", hint="pass data=...: an iterable of input "
                        "batches shaped like the example inputs, or a tensor of samples")
    types = [graph.types[i] for i in graph.inputs]
    out: list[list[np.ndarray]] = []

    def as_arrays(item) -> list[np.ndarray]:
        items = item if isinstance(item, (tuple, list)) else (item,)
        return [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
                for x in items][:len(types)]

    if isinstance(data, (torch.Tensor, np.ndarray)) and len(types) == 1:
        arr = as_arrays(data)[0]
        n = types[0].shape[0] if types[0].rank else 1
        if arr.shape[1:] != types[0].shape[1:]:
            raise KilnError(f"data samples are shaped {list(arr.shape[1:])}, the model's "
                            f"input {list(types[0].shape[1:])}",
                            hint="pass samples shaped like the example inputs")
        chunks: Iterable = (arr[i:i + n] for i in range(0, len(arr) - n + 1, n))
    else:
        chunks = (piece for item in data for piece in _cut(as_arrays(item), types))
    for chunk in chunks:
        arrays = chunk if isinstance(chunk, list) else [chunk]
        for a, t in zip(arrays, types):
            if a.shape != t.shape:
                raise KilnError(f"a data batch is shaped {list(a.shape)}, the model's input "
                                f"{list(t.shape)}", hint="pass batches shaped like the example "
                                                         "inputs, or holding a multiple of "
                                                         "their batch size")
        out.append([a.astype(t.dtype.numpy, copy=False) for a, t in zip(arrays, types)])
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise KilnError("the compression data holds no batch",
                        hint="pass at least one batch shaped like the example inputs")
    return out


def _cut(arrays: list[np.ndarray], types: Sequence[Any]) -> list[list[np.ndarray]]:
    """``arrays`` (one batch of every input) as batches of the graph's size when each holds a
    multiple of it along the leading dimension, the same multiple for all, and the graph's
    other dimensions; else unchanged (a wrong shape is refused by the caller)."""
    if len(arrays) != len(types) or any(a.ndim != t.rank or a.ndim == 0 or
                                         a.shape[1:] != tuple(t.shape[1:])
                                         for a, t in zip(arrays, types)):
        return [arrays]
    counts = {a.shape[0] // t.shape[0] if t.shape[0] and a.shape[0] % t.shape[0] == 0 else 0
              for a, t in zip(arrays, types)}
    if len(counts) != 1 or counts == {0} or counts == {1}:
        return [arrays]
    k = counts.pop()
    return [[a[j * t.shape[0]:(j + 1) * t.shape[0]] for a, t in zip(arrays, types)]
            for j in range(k)]


def calibrate(graph: Graph, batches: Sequence[Sequence[np.ndarray]], method: str = "percentile",
              percentile: float = 99.99) -> dict[str, tuple[float, float]]:
    """Activation ranges of the values int8 quantization reads (``calibration_values``) over
    ``batches``, computed by ``graph`` compiled to native code with those values as outputs
    (the NumPy interpreter, 10-20x slower, only where the llvm backend cannot compile it)."""
    obs = RangeObserver(method, percentile)
    values = calibration_values(graph)
    computed = [v for v in values if v not in graph.inputs]
    run = _calibration_program(graph, computed)
    for batch in batches:
        for v, a in zip(graph.inputs, batch):
            if v in values:
                obs.observe(v, a)
        for v, a in zip(computed, run(list(batch))):
            obs.observe(v, a)
    return obs.ranges()


def _calibration_program(graph: Graph, values: Sequence[str]):
    """A function of one batch returning ``values`` (in order)."""
    if not values:
        return lambda batch: []
    cal = graph.copy()
    cal.outputs = list(values)
    cal = remove_dead(cal)
    try:
        from kiln.backends.llvm import compile_graph

        return compile_graph(cal)
    except KilnError as e:
        log.info("calibration runs on the reference interpreter: %s", e)
        return lambda batch: run_graph(cal, batch)


def _record(result: Compressed, stage: str, graph: Graph, t0: float) -> None:
    result.report.append(StageReport(stage, graph.num_parameters(), graph_flops(graph),
                                     time.perf_counter() - t0, graph))


def _run(graph: Graph, names: Sequence[str], options: Mapping[str, Any]) -> Graph:
    return PassManager([get_pass(n) for n in names], [Verify()]).run(
        graph, PassContext(options=dict(options)))


def _fp16_layers(graph: Graph, patterns: Any) -> set[str]:
    """The linear layers ``quantize={"fp16": ...}`` names (glob patterns on node names or
    module paths, as ``prune={"layers": ...}``); a KilnError for a pattern naming none."""
    if not patterns:
        return set()
    from kiln.compression.prune import name_matches

    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    linears = [n.name for n in graph.nodes if n.op == "linear"]
    names = set()
    for p in patterns:
        if not isinstance(p, str):
            raise KilnError(f"quantize= option 'fp16' takes layer name patterns, got {p!r}",
                            hint='for example {"fp16": ["head", "layers.3.*"]}')
        hit = {n for n in linears if name_matches(n, p)}
        if not hit:
            raise KilnError(f"quantize= option 'fp16': {p!r} matches no linear layer",
                            hint=f"the linear layers are {linears[:20]}"
                                 + (" ..." if len(linears) > 20 else ""))
        names |= hit
    return names


def compress_graph(graph: Graph, data: Any = None, *, teacher: Any = None,
                   prune: Any = None, low_rank: Any = None, distill: Any = None,
                   quantize: Any = None, labels: Any = None, out_spec: Any = None,
                   prune_multiple: int = 16, target: Target | None = None) -> Compressed:
    """The stages of ``kiln.compress`` on a kiln graph (see the module docstring). ``target``:
    the CPU the result will run on (its int8 dot product bounds the weights)."""
    prune_o = _options(prune, PRUNE_DEFAULTS, "flops_target", "prune")
    low_rank_o = _options(low_rank, LOW_RANK_DEFAULTS, "energy", "low_rank")
    distill_o = _options(distill, DISTILL_DEFAULTS, None, "distill")
    quant_o = _options(quantize, QUANTIZE_DEFAULTS, None, "quantize")
    if quant_o is not None:
        from kiln.compression.qat import check_quantize_options

        check_quantize_options(quant_o)
    result = Compressed(graph, graph, out_spec)
    t0 = time.perf_counter()
    _record(result, "imported", graph, t0)
    g = _run(graph, ["fold_constants", "simplify_algebra", "dce"], {})
    gradual = prune_o is not None and prune_o.get("schedule") is not None
    if gradual and distill_o is None:
        raise KilnError("gradual pruning (prune schedule) happens during distillation",
                        hint="pass distill=... too, or drop the schedule for one-shot pruning")
    if prune_o is not None:
        t0 = time.perf_counter()
        prune_o.setdefault("multiple", prune_multiple)
        recalibrate = bool(prune_o.pop("recalibrate_bn", True))
        if prune_o.get("criterion") == "taylor" and "scores" not in prune_o:
            from kiln.compression.prune_scores import taylor_scores
            from kiln.compression.sensitivity import batches_with_labels

            cut = data_batches(data, g, 16)
            # Per-sample labels are cut like the data: one label array per batch.
            prune_o["scores"] = taylor_scores(g, cut, batches_with_labels(data, labels, cut))
        if not gradual:
            before = graph_flops(g)
            ctx = PassContext(options={f"prune_channels.{k}": v for k, v in prune_o.items()})
            g = PassManager([get_pass("prune_channels")], [Verify()]).run(g, ctx)
            result.pruning = {"flops_removed": 1.0 - graph_flops(g) / max(before, 1),
                              "flops_target": prune_o.get("flops_target"),
                              "multiple": prune_o["multiple"],
                              "finer_rounding": ctx.notes.get("prune_channels.rounding", {})}
            _record(result, "pruned", g, t0)
    if low_rank_o is not None:
        t0 = time.perf_counter()
        g = _run(g, ["low_rank"], {f"low_rank.{k}": v for k, v in low_rank_o.items()})
        _record(result, "low-rank", g, t0)
    changed = (prune_o is not None and not gradual) or low_rank_o is not None
    if changed and data is not None and (prune_o is None or recalibrate):
        # The layers before each batch norm changed: its statistics follow them (bn_stats.py).
        from kiln.compression.bn_stats import batches_needed, recalibrate_batch_norms

        t0 = time.perf_counter()
        n = g.types[g.inputs[0]].shape[0] if g.inputs and g.types[g.inputs[0]].rank else 1
        g, count = recalibrate_batch_norms(g, data_batches(data, g, batches_needed(n)))
        if count:
            _record(result, "bn stats", g, t0)
    if distill_o is not None:
        from kiln.compression.distill import distill as run_distill

        if teacher is None:
            raise KilnError("distillation needs the original model as teacher")
        if data is None:
            raise KilnError("distillation needs data", hint="pass data=... to kiln.compress")
        t0 = time.perf_counter()
        g = run_distill(g, teacher, data, labels=labels, prune=prune_o if gradual else None,
                        **distill_o)
        _record(result, "agp+distill" if gradual else "distilled", g, t0)
    t0 = time.perf_counter()
    g = PassManager(get_pipeline("O1"), [Verify()]).run(g)
    _record(result, "O1", g, t0)
    if quant_o is not None:
        t0 = time.perf_counter()
        qat = quant_o["mode"] == "qat"
        options = {"quantize_int8.mode": "static" if qat else quant_o["mode"],
                   "quantize_int8.protect": tuple(quant_o["protect"]),
                   "quantize_int8.target": target}
        if "weight_max" in quant_o:
            options["quantize_int8.weight_max"] = quant_o["weight_max"]
        # Mixed precision: the linear layers named in ``fp16`` stay out of int8 and store
        # their weights in half precision instead.
        fp16_names = _fp16_layers(g, quant_o.get("fp16"))
        if fp16_names:
            options["quantize_int8.protect"] += tuple(sorted(fp16_names))
        if qat and data is None:
            raise KilnError("quantization-aware training needs data",
                            hint="pass data=... (calibration and training batches), or use "
                                 "quantize=True for static int8")
        if quant_o["mode"] in ("static", "qat"):
            batches = data_batches(data, g, int(quant_o["max_batches"]))
            options["quantize_int8.ranges"] = calibrate(g, batches, quant_o["method"],
                                                        float(quant_o["percentile"]))
        if qat:
            # Fine-tune with fake quantization at the grids of the static pass (same ranges,
            # same options), which then converts the trained graph (compression/qat.py).
            from kiln.compression.qat import quantization_aware_training, train_options

            g = quantization_aware_training(g, teacher, data, labels=labels,
                                            pass_options=options, **train_options(quant_o))
            _record(result, "qat", g, t0)
            t0 = time.perf_counter()
        ctx = PassContext(options=options)
        order = {n.name: i for i, n in enumerate(g.nodes)}
        g = PassManager([get_pass(n) for n in ("quantize_int8", "sink_permutes", "dce")],
                        [Verify()]).run(g, ctx)
        layers = ctx.notes.get("quantize_int8.layers", {})
        if fp16_names:
            from kiln.compression.quantize import fp16_weights

            g, decided = fp16_weights(g, fp16_names)
            layers.update(decided)
        result.layers = {k: layers[k] for k in sorted(layers, key=lambda k: order.get(k, -1))}
        _record(result, "fp16" if quant_o["mode"] == "fp16" else "int8", g, t0)
    verify(g)
    result.graph = g
    return result
