"""``kiln.search``: find the compression settings that make a model fastest (or smallest, or
cheapest in FLOPs) while its score stays within ``max_drop`` of the float32 model's.

The search composes what ``kiln.compile`` already does (``prune=``, ``low_rank=``,
``quantize=``, ``distill=``); every candidate is one ``kiln.compile`` call, and the winner's
options (``best_config``) given to ``kiln.compile`` again rebuild it.

The space (``default_space``; ``space=`` overrides it) is a dict of categorical dimensions:

- ``prune``: fraction of FLOPs removed by structured channel pruning (0: none), and
  ``prune_global``: rank channels of all groups together;
- ``prune_layers.<pattern>``: per stage / per layer widths (kiln's channel-width search), the
  alternative to a global ``prune``: where ``prune`` is 0, the fraction of the channels
  removed from the groups whose layers match the glob ``pattern`` (``prune={"ratio": 0,
  "layers": {pattern: ratio}}``); inert where ``prune`` sets a FLOPs target (fixed widths
  would often make it unreachable). The default space has one per stage
  (``stage_patterns``: ResNet stages, transformer blocks, at most four).
  ``prune_keep.<layer>``: ``[False, True]`` (True: the groups touching that layer stay
  whole, the FLOPs target falls on the others) is the older per-layer switch;
- ``agp``: prune gradually during distillation (``prune={"schedule": "agp"}``) instead of
  before it; only where the trial distills;
- ``low_rank``: singular-value energy kept by each factorized dense layer (None: none);
  ``low_rank_layers.<pattern>``: the energy of the layers matching ``pattern`` (None: they
  follow ``low_rank``; False: not factorized), ``low_rank_keep.<layer>``: ``[False, True]``;
- ``precision.<layer>``: ``int8``, ``fp16`` (linear layers: half-precision weights) or
  ``fp32`` for each layer the int8 pass quantizes (the fp32 ones become
  ``quantize={"protect": [...]}``, the fp16 ones ``quantize={"fp16": [...]}``, or
  ``{"mode": "fp16"}`` when no layer is int8); none in int8 or fp16: no quantization.
  A space without ``precision.*`` may have ``quantize``: ``[False, True]`` (the whole model);
- ``distill_epochs``, ``temperature``, ``alpha``: knowledge distillation after pruning.

Every sampler reads the same space: optuna's TPE (``method="bayes"``), its GridSampler
(``"grid"``) and NSGA-II (``"genetic"``, two objectives: score up, the objective down). The
accuracy budget is a constraint (``constraints_func``) for TPE and NSGA-II.

A trial is cheap before it is expensive: the candidate is compiled without distillation and
scored (the proxy), with its FLOPs and weight bytes. Distillation then runs only where it can
matter: not when the proxy already meets the budget (the trial keeps the undistilled model),
not when the proxy lost more than ``gate_drop`` (pruned: too far gone to recover), and not
when a model already found meets the budget with no more FLOPs and no more bytes (pruned: it
cannot win). A distillation that lowers the score is dropped (``distilled_score`` keeps what it
reached). Pruned trials are optuna's PRUNED, compile errors its FAIL.

The time budget counts from the call: a trial starts only when the longest trial so far
would still end inside ``budget_s``. Studies resume from optuna storage
(``storage="sqlite:///search.db"``): earlier trials are read back, and identical settings are
never compiled twice in one call.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kiln.compression.prune import graph_flops
from kiln.ir import KilnError

log = logging.getLogger("kiln.search")

METHODS = ("bayes", "grid", "genetic")
OBJECTIVES = ("latency", "size", "flops")
# What every trial's distillation uses besides the searched epochs / temperature / alpha.
DISTILL_FIXED = {"lr": 1e-3, "progress": False}
STATES = ("complete", "pruned", "failed")


def _optuna():
    """optuna, or a KilnError saying how to install it."""
    try:
        import optuna
    except ImportError as e:
        raise KilnError("kiln.search needs optuna", hint="pip install 'kiln[search]' "
                        "(optuna, and matplotlib for the report)") from e
    return optuna


# ---- trials -----------------------------------------------------------------------------------
@dataclass
class TrialRecord:
    """One trial: its sampled ``params``, the ``kiln.compile`` options they mean (``config``),
    its ``state`` (complete / pruned / failed) and what it measured."""

    number: int
    params: dict[str, Any]
    state: str
    config: dict[str, Any] = field(default_factory=dict)
    score: float | None = None
    proxy_score: float | None = None
    distilled_score: float | None = None
    objective: float | None = None
    latency_ms: float | None = None
    base_latency_ms: float | None = None
    latency_ratio: float | None = None
    size_bytes: int | None = None
    flops: int | None = None
    distilled: bool = False
    # The fraction of the Taylor importance its pruning removes (compression/sensitivity.py).
    sensitivity: float | None = None
    feasible: bool = False
    seconds: float = 0.0
    start_s: float = 0.0
    note: str = ""
    # Timed again at the end (confirm_latency): the latency that ranks it for ``best``.
    confirmed: bool = False

    @property
    def speedup(self) -> float | None:
        """How many times faster than fp32: the inverse of the median per-round latency ratio
        of the interleaved timing."""
        return None if not self.latency_ratio else 1.0 / self.latency_ratio

    @property
    def cached(self) -> bool:
        """Whether the sampler proposed settings already tried in this call (the trial
        repeats that one's measures)."""
        return self.note.startswith("(cached)")


class Gated(Exception):
    """Raised by an evaluation that stops early (an optuna PRUNED trial); ``measures`` holds
    what was measured before it stopped."""

    def __init__(self, note: str, measures: Mapping[str, Any]) -> None:
        super().__init__(note)
        self.measures = dict(measures)


def _jsonable(value: Any) -> Any:
    """``value`` with NumPy scalars and tuples made plain JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def grid_size(space: Mapping[str, Sequence[Any]]) -> int:
    """The number of distinct points of a categorical space."""
    return math.prod(len(v) for v in space.values())


def _check_space(space: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
    if not space:
        raise KilnError("the search space is empty", hint="give at least one dimension")
    out = {}
    for name, choices in space.items():
        choices = list(choices) if isinstance(choices, (list, tuple)) else None
        if not choices or any(c is not None and not isinstance(c, (bool, int, float, str))
                              for c in choices):
            raise KilnError(f"search dimension {name!r} must be a non-empty list of None, "
                            "bool, int, float or str choices",
                            hint='e.g. space={"prune": [0.0, 0.3, 0.5]}')
        out[str(name)] = choices
    return out


def run_study(space: Mapping[str, Sequence[Any]],
              evaluate: Callable[[dict[str, Any]], Mapping[str, Any]], *, method: str,
              threshold: float, budget_s: float, seed: int = 0, storage: Any = None,
              study_name: str | None = None, n_trials: int | None = None,
              progress: bool = True, start: float | None = None, population_size: int = 16,
              reserve_trials: int = 0) -> tuple[Any, list[TrialRecord]]:
    """Run an optuna study over the categorical ``space``; returns ``(study, trials)``.

    ``evaluate(params)`` returns measures with at least ``score`` (higher is better) and
    ``objective`` (lower is better); it may raise ``Gated`` (a PRUNED trial) or KilnError (a
    FAIL trial, its message kept as the note). A trial is feasible when its score reaches
    ``threshold``. ``method``: ``bayes`` (TPE, the budget as a constraint), ``grid``
    (GridSampler) or ``genetic`` (NSGA-II on score and objective, the budget as a
    constraint). Trials start while the longest one so far would end within ``budget_s`` of
    ``start`` (default: now), leaving time for ``reserve_trials`` more of the median
    duration (work the caller does after the study), until ``n_trials`` ran in this call or
    every point of the space has been tried. Trials already in ``storage`` under
    ``study_name`` are read back first.
    """
    optuna = _optuna()
    space = _check_space(space)
    if method not in METHODS:
        raise KilnError(f"unknown search method {method!r}", hint=f"use one of {METHODS}")
    start = time.perf_counter() if start is None else start

    # optuna 5 takes a trial's constraint from Trial.set_constraint; older versions from the
    # sampler's constraints_func (deprecated in 5).
    per_trial = hasattr(optuna.trial.Trial, "set_constraint")
    extra: dict[str, Any] = {} if per_trial else {
        "constraints_func": lambda t: [float(t.user_attrs.get("constraint", 1.0))]}
    if method == "bayes":
        sampler = optuna.samplers.TPESampler(seed=seed, **extra,
                                             n_startup_trials=min(10, grid_size(space)))
    elif method == "grid":
        sampler = optuna.samplers.GridSampler(space, seed=seed)
    else:
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size,
                                                **extra)
    directions = ["maximize", "minimize"] if method == "genetic" else ["minimize"]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler,
                                    directions=directions, load_if_exists=storage is not None)
    finally:
        optuna.logging.set_verbosity(verbosity)
    records = [r for r in (_record_of(t) for t in study.trials) if r is not None]
    cache: dict[str, tuple[str, dict, str]] = {}
    seen = {_key(r.params) for r in records}
    durations = [r.seconds for r in records if not r.cached]
    points = grid_size(space)

    def objective(trial):
        params = {k: trial.suggest_categorical(k, v) for k, v in space.items()}
        key = _key(params)
        t0 = time.perf_counter()
        cached = key in cache
        if not cached:
            try:
                cache[key] = ("complete", dict(evaluate(params)), "")
            except Gated as g:
                cache[key] = ("pruned", g.measures, str(g))
            except KilnError as e:
                cache[key] = ("failed", {}, str(e))
        state, measures, note = cache[key]
        seconds = time.perf_counter() - t0
        score = measures.get("score")
        trial.set_user_attr("measures", _jsonable(measures))
        trial.set_user_attr("note", ("(cached) " if cached else "") + note)
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("start_s", t0 - start)
        constraint = 1.0 if score is None else threshold - score
        trial.set_user_attr("constraint", constraint)
        if per_trial:
            trial.set_constraint("max_drop", constraint)
        seen.add(key)
        if not cached:
            durations.append(seconds)
        if state == "pruned":
            raise optuna.TrialPruned(note)
        if state == "failed":
            raise _TrialFailed(note)
        if method == "genetic":
            return float(score), float(measures["objective"])
        return float(measures["objective"])

    bar = _progress(budget_s, progress)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    ran = 0
    try:
        while n_trials is None or ran < n_trials:
            elapsed = time.perf_counter() - start
            if len(seen) >= points:
                log.info("every point of the space has been tried")
                break
            reserve = reserve_trials * statistics.median(durations) if durations else 0.0
            if elapsed + max(durations, default=0.0) + reserve > budget_s:
                log.info("stopping: the next trial would end after the %.0f s budget", budget_s)
                break
            study.optimize(objective, n_trials=1, catch=(_TrialFailed,))
            ran += 1
            record = _record_of(study.trials[-1])
            if record is not None:
                records.append(record)
                record.feasible = record.score is not None and record.score >= threshold
            if bar is not None:
                bar.n = min(budget_s, round(time.perf_counter() - start, 1))
                best = [r.objective for r in records if r.feasible and r.state == "complete"]
                bar.set_postfix(trials=len(records),
                                best=f"{min(best):.4g}" if best else "-", refresh=True)
    finally:
        optuna.logging.set_verbosity(verbosity)
        if bar is not None:
            bar.close()
    for r in records:
        r.feasible = r.score is not None and r.score >= threshold
    return study, records


class _TrialFailed(Exception):
    """An evaluation's KilnError, carried to optuna as a FAIL trial."""


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(_jsonable(params), sort_keys=True)


def _record_of(trial) -> TrialRecord | None:
    """The TrialRecord of a finished optuna trial (None for one still running)."""
    state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(trial.state.name)
    if state is None:
        return None
    m = trial.user_attrs.get("measures", {})
    known = {k: m[k] for k in ("config", "score", "proxy_score", "distilled_score",
                               "objective", "latency_ms", "latency_ratio",
                               "base_latency_ms", "size_bytes", "flops", "distilled", "sensitivity")
             if k in m}
    return TrialRecord(trial.number, dict(trial.params), state,
                       seconds=float(trial.user_attrs.get("seconds", 0.0)),
                       start_s=float(trial.user_attrs.get("start_s", 0.0)),
                       note=str(trial.user_attrs.get("note", "")), **known)


def _progress(budget_s: float, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=budget_s, unit="s", desc="kiln.search",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}")


def pareto_front(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The complete trials no other complete trial beats on score (higher), latency and
    weight bytes (lower) at once, by score then latency."""
    done = [r for r in records if r.state == "complete" and r.score is not None]

    def key(r: TrialRecord) -> tuple[float, float, float]:
        lat = r.latency_ratio if r.latency_ratio else math.inf
        return -r.score, lat, float(r.size_bytes if r.size_bytes is not None else math.inf)

    keys = {r.number: key(r) for r in done}

    def dominates(a: tuple, b: tuple) -> bool:
        return all(x <= y for x, y in zip(a, b)) and a != b

    front = [r for r in done if not any(dominates(keys[o.number], keys[r.number])
                                        for o in done)]
    unique: dict[tuple, TrialRecord] = {}
    for r in front:
        unique.setdefault(keys[r.number], r)
    return sorted(unique.values(), key=lambda r: keys[r.number])


# ---- the compression space --------------------------------------------------------------------
STAGE_RATIOS = [0.0, 0.3, 0.5, 0.7]
"""Choices of each stage's ``prune_layers`` dimension in the default space."""


def default_space(int8_layers: Sequence[str] = (), stages: Sequence[str] = (),
                  fp16_layers: Sequence[str] = ()) -> dict[str, list[Any]]:
    """The default space; ``int8_layers``: the layers the int8 pass would quantize, each
    searched as int8 or fp32, and as fp16 too where it is one of ``fp16_layers`` (the linear
    layers: half-precision weight storage); ``stages``: glob patterns (``stage_patterns``),
    each a ``prune_layers`` dimension."""
    space: dict[str, list[Any]] = {
        "prune": [0.0, 0.3, 0.5, 0.7],
        "prune_global": [False, True],
        "low_rank": [None, 0.95, 0.9],
        "distill_epochs": [0, 2, 5],
        "temperature": [2.0, 4.0],
        "alpha": [0.5, 0.9],
        "agp": [False, True],
    }
    for pattern in stages:
        space[f"prune_layers.{pattern}"] = list(STAGE_RATIOS)
    halves = set(fp16_layers)
    for name in int8_layers:
        space[f"precision.{name}"] = ["int8", "fp16", "fp32"] if name in halves \
            else ["int8", "fp32"]
    return space


def _stage_key(name: str, depth: int) -> str:
    """The stage of node ``name``: its name up to (depth 0) or through (depth 1) its first
    numeric component after the first: ``layer3_0_conv1`` -> ``layer3`` / ``layer3_0``."""
    parts = name.split("_")
    for i in range(1, len(parts)):
        if parts[i].isdigit():
            return "_".join(parts[:i + depth])
    return name


def stage_patterns(graph: Any, max_stages: int = 4) -> list[str]:
    """Glob patterns (``prune`` ``layers`` keys) splitting the prunable channel groups of
    ``graph`` into stages in graph order: ResNet's ``layer1`` .. ``layer4``, a transformer's
    blocks, a Sequential's layers; more than ``max_stages`` are merged into that many runs of
    neighbours (``a_*|b_*``). Empty when everything is one stage."""
    from kiln.compression.channel_groups import find_channel_groups

    order = {n.name: i for i, n in enumerate(graph.nodes)}
    groups = sorted(find_channel_groups(graph).prunable(),
                    key=lambda g: min(order[s.node] for s in g.sources))
    firsts = [min(g.sources, key=lambda s: order[s.node]).node for g in groups]
    names = [n.name for n in graph.nodes]
    for depth in (0, 1):
        keys = list(dict.fromkeys(_stage_key(n, depth) for n in firsts))
        if len(keys) > 1:
            break
    else:
        return []

    def pattern(key: str) -> str:
        return f"{key}|{key}_*" if key in names else f"{key}_*"

    runs = np.array_split(np.arange(len(keys)), min(max_stages, len(keys)))
    return ["|".join(pattern(keys[i]) for i in run) for run in runs]


def config_of(params: Mapping[str, Any], options: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
    """The ``kiln.compile`` options (``prune``, ``low_rank``, ``distill``, ``quantize``) that
    the searched ``params`` mean; ``options`` (same keys, dicts) are merged into each stage
    that is on, and its other keys (``threads``, ``target`` ...) pass through."""
    options = dict(options or {})
    stage_opts = {k: dict(options.pop(k) or {}) for k in ("prune", "low_rank", "distill",
                                                          "quantize") if k in options}
    config: dict[str, Any] = {"prune": None, "low_rank": None, "distill": None,
                              "quantize": None}
    def per_layer(prefix: str) -> dict[str, Any]:
        return {k.partition(".")[2]: v for k, v in params.items()
                if k.startswith(prefix + ".") and v is not None}

    ratio = float(params.get("prune", 0.0) or 0.0)
    widths = {p: float(v) for p, v in per_layer("prune_layers").items() if v}
    if ratio > 0 or widths:
        config["prune"] = ({"flops_target": ratio, "global": bool(params.get("prune_global"))}
                           if ratio > 0 else {"ratio": 0.0})
        config["prune"].update(stage_opts.get("prune", {}))
        if widths and ratio == 0:
            config["prune"]["layers"] = {**config["prune"].get("layers", {}), **widths}
        keep = sorted(k.partition(".")[2] for k, v in params.items()
                      if k.startswith("prune_keep.") and v)
        if keep:
            config["prune"]["protect"] = sorted({*config["prune"].get("protect", ()), *keep})
    if params.get("low_rank") is not None:
        config["low_rank"] = {"energy": float(params["low_rank"]),
                              **stage_opts.get("low_rank", {})}
        groups = {p: v if v is False else float(v)
                  for p, v in per_layer("low_rank_layers").items()}
        if groups:
            config["low_rank"]["layers"] = {**config["low_rank"].get("layers", {}), **groups}
        keep = sorted(k.partition(".")[2] for k, v in params.items()
                      if k.startswith("low_rank_keep.") and v)
        if keep:
            config["low_rank"]["protect"] = sorted({*config["low_rank"].get("protect", ()),
                                                    *keep})
    epochs = int(params.get("distill_epochs", 0) or 0)
    if epochs > 0:
        config["distill"] = {"epochs": epochs, "temperature": float(params.get("temperature", 4.0)),
                             "alpha": float(params.get("alpha", 0.9)), **DISTILL_FIXED,
                             **stage_opts.get("distill", {})}
        if params.get("agp") and config["prune"] is not None:
            config["prune"]["schedule"] = "agp"
    layers = {k.partition(".")[2]: v for k, v in params.items() if k.startswith("precision.")}
    halves = sorted(n for n, v in layers.items() if v == "fp16")
    if any(v == "int8" for v in layers.values()):
        protect = sorted(n for n, v in layers.items() if v == "fp32")
        config["quantize"] = {**stage_opts.get("quantize", {}), "protect": protect}
        if halves:
            config["quantize"]["fp16"] = halves
    elif halves:   # no int8 layer: half-precision weights where chosen, float elsewhere
        config["quantize"] = {"mode": "fp16",
                              "protect": sorted(n for n, v in layers.items() if v == "fp32")}
    elif params.get("quantize") and not layers:
        config["quantize"] = dict(stage_opts.get("quantize", {}))
    return {**config, **options}


def one_shot(prune: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``prune`` options without a gradual schedule: what the cheap, undistilled proxy of a
    trial with AGP prunes at once."""
    if prune is None:
        return None
    from kiln.compression.gradual import SCHEDULE_KEYS

    return {k: v for k, v in prune.items() if k not in SCHEDULE_KEYS}


def sensitivity_of(graph: Any, data: Any, labels: Any, batches: int = 8) -> Any:
    """The one-pass Taylor sensitivity (``kiln.compression.sensitivity``) of ``graph`` on up
    to ``batches`` batches of ``data``; None (logged) where it cannot be computed."""
    from kiln.compression.compress import data_batches
    from kiln.compression.prune_scores import taylor_scores
    from kiln.compression.sensitivity import Sensitivity, batches_with_labels

    try:
        cut = data_batches(data, graph, batches)
        return Sensitivity(graph, taylor_scores(graph, cut, batches_with_labels(data, labels,
                                                                                cut)))
    except (KilnError, RuntimeError, TypeError, ValueError) as e:
        # The proxy only saves compiles: a model it cannot score is searched without it.
        log.info("no sensitivity proxy: %s", e)
        return None


def int8_layers(model: torch.nn.Module, example_inputs: Any, data: Any,
                options: Mapping[str, Any] | None = None) -> list[str]:
    """The layers that static int8 quantizes in ``model`` (those it leaves in float, for
    being slower in int8 on this CPU or not quantizable, are no choice)."""
    from kiln.api import compress

    quant = dict((options or {}).get("quantize") or {})
    compressed = compress(model, data, example_inputs=example_inputs, quantize=quant or True)
    return [name for name, (prec, _) in compressed.layers.items() if prec == "int8"]


def weight_bytes(compiled: Any) -> int:
    """Bytes of the compiled model's constants (weights, biases, scales)."""
    return int(sum(a.nbytes for a in compiled.graph.constants.values()))


def interleaved_latency(candidate: Callable, baseline: Callable, inputs: Sequence[Any],
                        repeat: int = 15, min_sample_s: float = 2e-3
                        ) -> tuple[float, float, float]:
    """Median milliseconds per call of ``candidate`` and ``baseline`` on ``inputs``, and the
    median of their per-round ratios, timed in alternation (each sample: enough calls for
    ``min_sample_s``) so both see the same load: a burst of load elsewhere slows both
    samples of a round, and the ratio of the round holds."""
    for fn in (baseline, candidate):
        fn(*inputs)
    t0 = time.perf_counter()
    baseline(*inputs)
    number = max(1, int(min_sample_s / max(time.perf_counter() - t0, 1e-7)))
    times: dict[int, list[float]] = {0: [], 1: []}
    # Which of the two goes first changes at random from round to round, so a periodic
    # disturbance (another process's time slices) cannot keep falling on the same one.
    order = random.Random(0)
    for _ in range(repeat):
        pair = [(0, baseline), (1, candidate)]
        order.shuffle(pair)
        for which, fn in pair:
            t0 = time.perf_counter()
            for _ in range(number):
                fn(*inputs)
            times[which].append((time.perf_counter() - t0) * 1e3 / number)
    ratio = statistics.median(c / b for c, b in zip(times[1], times[0]))
    return statistics.median(times[1]), statistics.median(times[0]), ratio


def accuracy_metric(inputs: Any, labels: Any) -> Callable[[Any], float]:
    """A ``metric`` for ``kiln.search``: top-1 accuracy (a fraction) of a compiled classifier
    (the last axis of its first output) against ``labels``. ``inputs``: samples of a
    one-input model (cut into the compiled batch size; ``labels`` one per sample), or a list
    of batches, each a tuple of inputs (``labels`` one array per batch)."""
    from torch.utils import _pytree as pytree

    batched = isinstance(inputs, (list, tuple))
    if batched:
        batches = [tuple(torch.as_tensor(np.asarray(x)) for x in b) for b in inputs]
        targets = [np.asarray(y).reshape(-1) for y in labels]
    else:
        x = torch.as_tensor(np.asarray(inputs))
        y = np.asarray(labels).reshape(-1)

    def predict(compiled: Any, args: Sequence[torch.Tensor]) -> np.ndarray:
        out = pytree.tree_leaves(compiled(*args))[0]
        out = np.asarray(out)
        return out.reshape(-1, out.shape[-1]).argmax(-1)

    def metric(compiled: Any) -> float:
        if batched:
            pred, want = [predict(compiled, b) for b in batches], targets
        else:
            n = compiled.executable.input_types[0].shape[0]
            usable = len(x) - len(x) % n
            if usable == 0:
                raise KilnError(f"accuracy_metric has {len(x)} samples, fewer than the "
                                f"compiled batch of {n}", hint="give more validation samples")
            pred = [predict(compiled, (x[i:i + n],)) for i in range(0, usable, n)]
            want = [y[:usable]]
        return float((np.concatenate(pred) == np.concatenate(want)).mean())

    return metric


# ---- the result -------------------------------------------------------------------------------
@dataclass
class Baseline:
    """The float32 model: its score, median latency, weight bytes and FLOPs."""

    score: float
    latency_ms: float
    size_bytes: int
    flops: int


class SearchResult:
    """What ``kiln.search`` found: every trial, the Pareto front, the best model and the
    options that rebuild it."""

    def __init__(self, *, baseline: Baseline, trials: list[TrialRecord], study: Any,
                 objective: str, max_drop: float, method: str, elapsed_s: float,
                 build: Callable[[Mapping[str, Any]], Any], compiled: dict[str, Any],
                 stage_sensitivity: Mapping[str, float] | None = None) -> None:
        self.baseline = baseline
        # Stage pattern -> the fraction of the Taylor importance that pruning half of that
        # stage alone removes (compression/sensitivity.py): which stages tolerate pruning.
        self.stage_sensitivity = dict(stage_sensitivity or {})
        self.trials = trials
        self.study = study
        self.objective = objective
        self.max_drop = max_drop
        self.method = method
        self.elapsed_s = elapsed_s
        self._build = build
        self._compiled = compiled

    @property
    def threshold(self) -> float:
        """The lowest score a candidate may have: the fp32 score less ``max_drop``."""
        return self.baseline.score - self.max_drop

    @property
    def pareto(self) -> list[TrialRecord]:
        """Complete trials on the front of score x latency x weight bytes."""
        return pareto_front(self.trials)

    @property
    def best_trial(self) -> TrialRecord:
        """The feasible complete trial with the lowest objective (then the highest score),
        among the latency-confirmed ones when there are any; a KilnError naming the closest
        trial and what to relax when none is feasible."""
        ok = [r for r in self.trials if r.state == "complete" and r.feasible]
        # Latencies timed again at the end are comparable with each other, not with the
        # single in-search timings of the rest: the best is among them when there are any.
        ok = [r for r in ok if r.confirmed] or ok
        if ok:
            return min(ok, key=lambda r: (r.objective, -r.score, r.number))
        scored = [r for r in self.trials if r.score is not None]
        if not scored:
            raise KilnError(f"kiln.search finished {len(self.trials)} trial(s) in "
                            f"{self.elapsed_s:.0f} s and none was scored",
                            hint="raise budget_s, or see the trials' notes for their errors")
        close = max(scored, key=lambda r: r.score)
        drop = self.baseline.score - close.score
        raise KilnError(
            f"no candidate stays within max_drop={self.max_drop:g} of the fp32 score "
            f"{self.baseline.score:.4g} ({len(self.trials)} trials): the closest, trial "
            f"{close.number} ({close.state}), scored {close.score:.4g}, a drop of {drop:.4g}, "
            f"with {json.dumps(close.config)}",
            hint=f"relax max_drop to {drop:.4g} or more, raise budget_s for more trials, or "
                 "widen the space (lighter pruning, more distillation epochs, fp32 layers)")

    @property
    def best_config(self) -> dict[str, Any]:
        """``kiln.compile`` options that rebuild ``best``: pass them with the search's
        ``data`` and ``labels``: ``kiln.compile(model, example_inputs, data=data,
        labels=labels, **best_config)``."""
        return json.loads(json.dumps(self.best_trial.config))

    @property
    def best(self) -> Any:
        """The compiled model of ``best_trial`` (rebuilt from ``best_config`` when it came
        from an earlier session's storage)."""
        key = _key(self.best_trial.config)
        if key not in self._compiled:
            self._compiled[key] = self._build(self.best_trial.config)
        return self._compiled[key]

    def table(self) -> str:
        """The trials as a text table, best objective first."""
        head = (f"{'#':>4} {'state':<8} {'score':>8} {'proxy':>8} {'speedup':>8} "
                f"{'KiB':>9} {'MFLOPs':>9} {'s':>6}  config")
        lines = [head]
        shown = [r for r in self.trials if not r.cached]
        order = sorted(shown, key=lambda r: (r.state != "complete", not r.feasible,
                                                   r.objective if r.objective is not None
                                                   else math.inf))
        for r in order:
            lines.append(
                f"{r.number:>4} {r.state:<8} {_fmt(r.score)} {_fmt(r.proxy_score)} "
                f"{_fmt(r.speedup, '8.2f')} "
                f"{_fmt(None if r.size_bytes is None else r.size_bytes / 1024, '9.1f')} "
                f"{_fmt(None if r.flops is None else r.flops / 1e6, '9.3f')} {r.seconds:6.1f}  "
                f"{_short(r.config) or r.note}")
        if len(shown) < len(self.trials):
            lines.append(f"({len(self.trials) - len(shown)} more trials repeated settings "
                         "already tried and are not shown)")
        return "\n".join(lines)

    def report(self, path: Any) -> Any:
        """Write an HTML report to ``path``: the baseline, the best configuration, a Pareto
        plot (score against latency, marker area by weight bytes) as an embedded PNG, and a
        table of every trial. Returns the path."""
        from pathlib import Path

        path = Path(path)
        png = base64.b64encode(self._plot_png()).decode("ascii")
        try:
            best = (f"<p>Best (trial {self.best_trial.number}): "
                    f"<code>{html.escape(json.dumps(self.best_config))}</code></p>")
        except KilnError as e:
            best = f"<p><b>No candidate met the budget.</b> {html.escape(str(e))}</p>"
        front = {r.number for r in self.pareto}
        rows = []
        for r in sorted(self.trials, key=lambda r: r.number):
            if r.cached:
                continue
            cells = [str(r.number), r.state, "yes" if r.feasible else "", "yes" if r.number in
                     front else "", _fmt(r.score).strip(), _fmt(r.proxy_score).strip(),
                     _fmt(r.latency_ms, ".4f").strip(), _fmt(r.speedup, ".2f").strip(),
                     _fmt(None if r.size_bytes is None else r.size_bytes / 1024, ".1f").strip(),
                     _fmt(None if r.flops is None else r.flops / 1e6, ".3f").strip(),
                     "yes" if r.distilled else "", f"{r.seconds:.1f}",
                     html.escape(_short(r.config)), html.escape(r.note)]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        heads = ["#", "state", "feasible", "pareto", "score", "proxy", "ms", "speedup", "KiB",
                 "MFLOPs", "distilled", "s", "config", "note"]
        b = self.baseline
        sens = ""
        if self.stage_sensitivity:
            cells = "".join(f"<tr class=\"stage\"><td>{html.escape(p)}</td><td>{c:.3f}</td></tr>"
                            for p, c in self.stage_sensitivity.items())
            sens = ("<h2>Stage sensitivity</h2><p>Fraction of the first-order (Taylor) "
                    "importance removed by pruning half of each stage alone: lower tolerates "
                    f"pruning better.</p><table><tr><th>stage</th><th>cost</th></tr>{cells}"
                    "</table>")
        text = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kiln.search report</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>
<h1>kiln.search</h1>
<p>method {self.method}, objective {self.objective}, max_drop {self.max_drop:g},
{len(self.trials)} trials in {self.elapsed_s:.0f} s. fp32: score {b.score:.4g},
{b.latency_ms:.4f} ms, {b.size_bytes / 1024:.1f} KiB, {b.flops / 1e6:.3f} MFLOPs.</p>
{best}
<h2>Pareto front (score x latency x size)</h2>
<img id="pareto" alt="Pareto plot" src="data:image/png;base64,{png}">
{sens}
<h2>Trials</h2>
<p>{sum(r.cached for r in self.trials)} trials that repeated settings already tried are not
listed.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in heads)}</tr>
{chr(10).join(rows)}
</table></body></html>
"""
        path.write_text(text, encoding="utf-8")
        return path

    def _plot_png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter

        fig = Figure(figsize=(7, 4.5), dpi=100)
        ax = fig.add_subplot()
        done = [r for r in self.trials if r.state == "complete" and r.speedup is not None]
        front = self.pareto
        biggest = max([r.size_bytes or 1 for r in done] + [self.baseline.size_bytes])
        for group, color, label in ((done, "#999999", "trials"),
                                    (front, "#d62728", "Pareto front")):
            group = [r for r in group if r.speedup is not None]
            ax.scatter([r.latency_ratio for r in group], [r.score for r in group],
                       s=[20 + 200 * (r.size_bytes or 0) / biggest for r in group],
                       c=color, label=label, alpha=0.7)
        ax.scatter([1.0], [self.baseline.score], marker="*", s=200, c="#1f77b4", label="fp32")
        ax.axhline(self.threshold, ls="--", c="#2ca02c", label="score budget")
        ax.set_xscale("log")
        # Minor ticks of a log axis spanning less than a decade crowd their labels together.
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("latency / fp32 latency (median of interleaved rounds, log scale)")
        ax.set_ylabel("score")
        ax.set_title("score x latency (marker area: weight bytes)")
        ax.legend(loc="lower right", fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()


def confirm_latency(records: Sequence[TrialRecord], top: int, kept: dict[str, Any],
                    build: Callable[[Mapping[str, Any]], Any], fresh_baseline: Callable[[], Any],
                    inputs: Sequence[Any], repeat: int, deadline: float = math.inf) -> None:
    """Time the ``top`` fastest feasible candidates of ``records`` again against
    ``fresh_baseline()`` and write the new latencies (and latency objective) into every record
    of their configs: a trial's own timing is one short measurement on a machine that other
    work may disturb. After the first, a candidate is confirmed only when the slowest
    confirmation so far would still end before ``deadline`` (a ``time.perf_counter()``
    value). ``kept`` (config key -> compiled model) is reused, then holds only the
    fastest confirmed model."""
    leaders: dict[str, TrialRecord] = {}
    for r in sorted((r for r in records if r.state == "complete" and r.feasible
                     and r.latency_ratio is not None), key=lambda r: r.objective):
        leaders.setdefault(_key(r.config), r)
        if len(leaders) == top:
            break
    if not leaders:
        return
    base = fresh_baseline()
    confirmed: dict[str, tuple[float, Any]] = {}
    longest = 0.0
    for key, r in leaders.items():
        t0 = time.perf_counter()
        if confirmed and t0 + longest > deadline:
            break
        candidate = kept.get(key) or build(r.config)
        ms, b_ms, ratio = interleaved_latency(candidate, base, inputs, repeat)
        confirmed[key] = (ratio, candidate)
        for o in records:
            if _key(o.config) == key:
                o.latency_ms, o.base_latency_ms, o.latency_ratio = ms, b_ms, ratio
                o.objective = ratio
                o.note = f"{o.note} (latency confirmed)".strip()
                o.confirmed = True
        longest = max(longest, time.perf_counter() - t0)
    fastest = min(confirmed, key=lambda k: confirmed[k][0])
    kept.clear()
    kept[fastest] = confirmed[fastest][1]


def _fmt(value: float | None, spec: str = "8.4g") -> str:
    return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])


def _short(config: Mapping[str, Any]) -> str:
    """The stages of a config that are on, compactly."""
    parts = []
    for k in ("prune", "low_rank", "distill", "quantize"):
        v = config.get(k)
        if v is None:
            continue
        if k == "distill":
            v = {x: v[x] for x in ("epochs", "temperature", "alpha") if x in v}
        parts.append(f"{k}={json.dumps(v)}")
    return " ".join(parts)


# ---- kiln.search ------------------------------------------------------------------------------
def search(model: torch.nn.Module, example_inputs: Any, *, data: Any, labels: Any = None,
           metric: Callable[[Any], float], max_drop: float, budget_s: float,
           objective: str = "latency", method: str = "bayes",
           space: Mapping[str, Sequence[Any]] | None = None, seed: int = 0,
           storage: Any = None, study_name: str | None = None, n_trials: int | None = None,
           options: Mapping[str, Any] | None = None, gate_drop: float | None = None,
           latency_repeat: int = 15, confirm_top: int = 5,
           progress: bool = True) -> SearchResult:
    """Search compression settings of ``model`` that keep ``metric`` within ``max_drop`` of
    the float32 model's and minimize ``objective``.

    Args:
        model: an ``nn.Module`` in eval mode (also the distillation teacher).
        example_inputs: the inputs every candidate is compiled for (as in ``kiln.compile``).
        data: calibration and distillation data, as ``kiln.compile`` takes it.
        labels: class labels of ``data`` for distillation (optional).
        metric: ``metric(compiled) -> float`` scores a compiled candidate on the user's
            validation data; higher is better (``accuracy_metric(x, y)`` makes one).
        max_drop: the largest allowed fall from the fp32 model's score, in the metric's units.
        budget_s: seconds the search may take, counted from the call; no trial starts that
            the longest trial so far says would end later.
        objective: ``latency`` (median of interleaved runs against the fp32 model, as a
            fraction of its time), ``size`` (bytes of the compiled weights) or ``flops``.
        method: ``bayes`` (optuna TPE), ``grid`` (GridSampler) or ``genetic`` (NSGA-II on
            score and objective).
        space: ``{dimension: [choices]}`` (see the module docstring); default:
            ``default_space`` over the layers the int8 pass quantizes.
        seed: the sampler's seed.
        storage, study_name: optuna storage (e.g. ``"sqlite:///search.db"``) and study name;
            an existing study there is resumed.
        n_trials: the most trials this call runs (default: until the budget or the space is
            spent).
        options: fixed ``kiln.compile`` options: ``prune``/``low_rank``/``distill``/
            ``quantize`` dicts are merged into those stages when a trial turns them on (e.g.
            ``{"prune": {"multiple": 1}}``), other keys (``threads``, ``target``) pass through.
        gate_drop: the largest score drop before fine-tuning that still gets distilled
            (default: half the fp32 score).
        latency_repeat: interleaved timing samples per candidate.
        confirm_top: with the latency objective, the fastest feasible candidates timed
            again at the end, twice as long, against a freshly compiled fp32 model; their
            confirmed latencies decide the best (the study leaves time for them inside
            ``budget_s``).
        progress: show a progress bar.

    Returns:
        a ``SearchResult``: ``best`` (raises a KilnError naming the closest trial when none
        met the budget), ``best_config``, ``trials``, ``pareto``, ``table()`` and
        ``report(path)``.
    """
    import kiln
    from kiln.api import check_model, example_tensors

    start = time.perf_counter()
    _optuna()
    if objective not in OBJECTIVES:
        raise KilnError(f"unknown search objective {objective!r}", hint=f"use one of {OBJECTIVES}")
    if not (isinstance(max_drop, (int, float)) and max_drop >= 0):
        raise KilnError(f"max_drop must be a number >= 0, got {max_drop!r}",
                        hint="the largest allowed fall from the fp32 model's score")
    if not (isinstance(budget_s, (int, float)) and budget_s > 0):
        raise KilnError(f"budget_s must be a number of seconds > 0, got {budget_s!r}")
    check_model(model)
    example_inputs = example_tensors(example_inputs)
    options = dict(options or {})
    passthrough = {k: v for k, v in options.items()
                   if k not in ("prune", "low_rank", "distill", "quantize")}
    baseline_model = kiln.compile(model, example_inputs, **passthrough)
    base_score = float(metric(baseline_model))
    base_ms, _, _ = interleaved_latency(baseline_model, baseline_model, example_inputs,
                                        latency_repeat)
    baseline = Baseline(base_score, base_ms, weight_bytes(baseline_model),
                        graph_flops(baseline_model.graph))
    threshold = base_score - max_drop
    confirm = confirm_top if objective == "latency" else 0
    gate_drop = 0.5 * abs(base_score) if gate_drop is None else float(gate_drop)
    stages = stage_patterns(baseline_model.source_graph)
    if space is None:
        linears = [n.name for n in baseline_model.source_graph.nodes if n.op == "linear"]
        space = default_space(int8_layers(model, example_inputs, data, options), stages,
                              fp16_layers=linears)
    sensitivity = sensitivity_of(baseline_model.source_graph, data, labels) if any(
        k == "prune" or k.startswith(("prune_layers.", "prune_keep.")) for k in space) else None
    stage_costs = sensitivity.stages(stages) if sensitivity is not None else {}
    hopeless: list[float] = []  # sensitivity costs of pruning-only candidates gated as hopeless
    # The compiled model of the best feasible candidate so far, by its config's key: `best`
    # then needs no rebuild.
    kept: dict[str, Any] = {}
    winners: list[tuple[int, int]] = []  # (flops, bytes) of feasible models found so far

    def build(config: Mapping[str, Any]) -> Any:
        kwargs = dict(config)
        if any(kwargs.get(k) is not None for k in ("prune", "low_rank", "distill",
                                                   "quantize")):
            kwargs.update(data=data, labels=labels)
        return kiln.compile(model, example_inputs, **kwargs)

    def measure_objective(candidate: Any, measures: dict[str, Any]) -> None:
        # Latency is measured whatever the objective: the Pareto front needs it.
        ms, b_ms, ratio = interleaved_latency(candidate, baseline_model, example_inputs,
                                              latency_repeat)
        if (objective == "latency" and measures["score"] >= threshold and "rank" in kept
                and ratio < kept["rank"][0]):
            # A new leader is timed again, twice as long, and keeps the slower of the two
            # measurements: one lucky measurement on a busy machine must not win the search.
            again = interleaved_latency(candidate, baseline_model, example_inputs,
                                        2 * latency_repeat)
            if again[2] > ratio:
                ms, b_ms, ratio = again
        measures.update(latency_ms=ms, base_latency_ms=b_ms, latency_ratio=ratio)
        measures["objective"] = {"latency": ratio, "size": measures["size_bytes"],
                                 "flops": measures["flops"]}[objective]

    def evaluate(params: dict[str, Any]) -> dict[str, Any]:
        config = config_of(params, options)
        cheap_config = {**config, "distill": None, "prune": one_shot(config["prune"])}
        cost = sensitivity.cost(config["prune"]) if sensitivity is not None else None
        if cost is not None and hopeless and cost >= min(hopeless):
            raise Gated(f"its pruning removes {cost:.3g} of the Taylor importance, no less than "
                        f"a candidate that lost more than gate_drop before fine-tuning "
                        f"({min(hopeless):.3g})", {"config": cheap_config, "sensitivity": cost})
        cheap = build(cheap_config)
        proxy = float(metric(cheap))
        measures: dict[str, Any] = {"config": cheap_config, "proxy_score": proxy,
                                    "size_bytes": weight_bytes(cheap),
                                    "flops": graph_flops(cheap.graph), "distilled": False,
                                    "sensitivity": cost}
        final = cheap
        if proxy < threshold and config["distill"] is not None:
            if base_score - proxy > gate_drop:
                measures["score"] = proxy
                if cost is not None and config["low_rank"] is None:
                    # Pruning alone lost this much: more costly pruning is hopeless too.
                    hopeless.append(cost)
                raise Gated(f"score {proxy:.4g} before fine-tuning lost more than "
                            f"gate_drop={gate_drop:.4g}", measures)
            if method != "genetic" and any(f <= measures["flops"] and b <= measures["size_bytes"]
                                           for f, b in winners):
                measures["score"] = proxy
                raise Gated("a model meeting the budget with no more FLOPs and bytes is "
                            "known", measures)
            tuned = build(config)
            measures["distilled_score"] = float(metric(tuned))
            # Distillation that lowers the score is not kept: the trial is the cheap model.
            if measures["distilled_score"] > proxy:
                final = tuned
                measures.update(config=config, distilled=True, size_bytes=weight_bytes(final),
                                flops=graph_flops(final.graph))
        measures["score"] = measures["distilled_score"] if final is not cheap else proxy
        measure_objective(final, measures)
        if measures["score"] >= threshold:
            winners.append((measures["flops"], measures["size_bytes"]))
            rank = (measures["objective"], -measures["score"])
            if "rank" not in kept or rank < kept["rank"]:
                kept.clear()
                kept.update(rank=rank, **{_key(measures["config"]): final})
        return measures

    study, records = run_study(space, evaluate, method=method, threshold=threshold,
                               budget_s=budget_s, seed=seed, storage=storage,
                               study_name=study_name, n_trials=n_trials, progress=progress,
                               start=start, reserve_trials=confirm)
    kept.pop("rank", None)
    if confirm:
        confirm_latency(records, confirm, kept, build,
                        lambda: kiln.compile(model, example_inputs, **passthrough),
                        example_inputs, 2 * latency_repeat, deadline=start + budget_s)
    return SearchResult(baseline=baseline, trials=records, study=study, objective=objective,
                        max_drop=max_drop, method=method,
                        elapsed_s=time.perf_counter() - start, build=build, compiled=kept,
                        stage_sensitivity=stage_costs)

