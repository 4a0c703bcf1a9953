"""Knowledge distillation: fine-tune a (compressed) kiln Graph against a teacher.

``distill(student, teacher, data)`` turns the student Graph into a trainable torch.fx module
(``graph_to_module``), trains its weights with Adam so that its outputs follow the teacher's,
and returns a new Graph with the student's structure and the trained weights as constants.
The usual use: compress with a lossy pass (``low_rank``, pruning, ...), then win back the
accuracy the compression cost.

Loss, per batch (``s``: student output, ``t``: teacher output, ``T``: temperature):

* classification outputs (a class axis last): Hinton's ``KL(softmax(t/T) || softmax(s/T)) * T^2``
  averaged over rows; with ``labels``, ``alpha * that + (1 - alpha) * cross_entropy(s, labels)``;
* regression outputs (no class axis, or ``objective="mse"``): ``mse(s, t)``; with ``labels``
  (float targets), ``alpha * mse(s, t) + (1 - alpha) * mse(s, labels)``;
* with ``feature_pairs``: plus ``feature_weight * mse`` between each pair of intermediate
  values.

A graph's shapes are static, so the student's input types fix the size n of one call (its
batch axis, axis 0). Batches of m samples (m a multiple of n) run as m / n calls at once with
``torch.func.vmap``; the teacher gets the same m samples (an nn.Module in one call).

Only the weights and biases of dense, embedding and norm ops train (``TRAINED_OPERANDS``);
batch-norm statistics, scalars and masks stay as they are.

With ``prune={..., "schedule": "agp"}`` the fine-tune also prunes channels gradually
(``kiln.compression.gradual``): they are masked along the AGP schedule while training goes
on, and removed from the returned Graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from kiln.interop.to_torch import TORCH_DTYPE, graph_to_module
from kiln.ir import Graph, KilnError, verify

TRAINED_OPERANDS: dict[str, tuple[int, ...]] = {
    "linear": (1, 2),
    "conv": (1, 2),
    "conv_transpose": (1, 2),
    "matmul": (0, 1),
    "embedding": (1,),
    "layer_norm": (1, 2),
    "group_norm": (1, 2),
    "batch_norm": (3, 4),
}
"""Op name -> operand positions whose constants are trained (weights and biases)."""

OBJECTIVES = ("auto", "kd", "mse")

Tensors = list[torch.Tensor]
ModuleTransform = Callable[[torch.fx.GraphModule], torch.fx.GraphModule]


# ---- running a kiln Graph on batches of samples ----------------------------------------------
class GraphRunner:
    """A kiln Graph as a torch module that takes batches of m samples.

    ``extra`` values of the graph become additional outputs (for feature losses). Inputs and
    outputs are in the flat layout: input k is ``[m, *shape_k[1:]]`` for a graph input of shape
    ``shape_k`` (m a multiple of ``n = shape_k[0]``); an output whose first axis is n comes back
    as ``[m, ...]``, any other as ``[m / n, *shape]``. ``transform`` rewrites the torch module
    once built (QAT inserts fake quantization), keeping its parameters.
    """

    def __init__(self, graph: Graph, extra: Sequence[str] = (), trainable: bool = False,
                 role: str = "student", transform: ModuleTransform | None = None) -> None:
        missing = [v for v in extra if v not in graph.types]
        if missing:
            values = [v for v in graph.values() if v not in graph.constants]
            raise KilnError(f"feature_pairs names {missing}, not values of the {role} graph "
                            f"{graph.name}",
                            hint=f"its values include {values[:20]}"
                                 + (" ..." if len(values) > 20 else ""))
        for name in graph.inputs:
            if not graph.types[name].shape:
                raise KilnError(f"{role} input %{name} is a scalar: it has no batch axis",
                                hint="give the graph inputs whose axis 0 is the batch")
        sizes = {graph.types[name].shape[0] for name in graph.inputs}
        if len(sizes) > 1:
            raise KilnError(f"the {role} graph's inputs have batch axes of sizes {sorted(sizes)}",
                            hint="distill graphs whose inputs share axis 0 (the batch)")
        self.graph = graph
        self.role = role
        extended = graph.copy()
        extended.outputs = list(graph.outputs) + list(extra)
        self.num_outputs = len(graph.outputs)
        self.module = graph_to_module(extended, trainable=trainable)
        if transform is not None:
            # A rewrite of the module (QAT's fake quantization) that keeps its parameters.
            self.module = transform(self.module)
        self.out_shapes = [extended.types[v].shape for v in extended.outputs]
        self.n = graph.types[graph.inputs[0]].shape[0] if graph.inputs else 1
        self.trained: dict[str, torch.nn.Parameter] = {}
        if trainable:
            self._freeze_all_but_weights()

    def _freeze_all_but_weights(self) -> None:
        trained = {node.inputs[k] for node in self.graph.nodes
                   for k in TRAINED_OPERANDS.get(node.op, ()) if k < len(node.inputs)}
        attrs = self.module.meta["kiln_constants"]
        for name, attr in attrs.items():
            param = getattr(self.module, attr)
            if not isinstance(param, torch.nn.Parameter):
                continue
            if name in trained:
                self.trained[name] = param
            else:
                # Statistics, scalars and masks are not weights; batch_norm even refuses to
                # differentiate its running statistics.
                param.requires_grad_(False)

    def input_layout(self) -> list[tuple[int, tuple[int, ...], torch.dtype]]:
        """(n, shape after the batch axis, dtype) of each input."""
        return [(t.shape[0], t.shape[1:], TORCH_DTYPE[t.dtype])
                for t in (self.graph.types[i] for i in self.graph.inputs)]

    def __call__(self, flat: Tensors) -> tuple[Tensors, Tensors]:
        """The graph's outputs and extra values for flat inputs of m samples."""
        m = flat[0].shape[0]
        if m % self.n:
            raise KilnError(f"a batch of {m} samples does not split into calls of the {self.role}"
                            f" graph's {self.n}",
                            hint=f"use batches whose size is a multiple of {self.n}")
        k = m // self.n
        if k == 1:
            result = self.module(*flat)
        else:
            grouped = [x.reshape(k, self.n, *x.shape[1:]) for x in flat]
            result = torch.func.vmap(self.module)(*grouped)
        results = list(result) if isinstance(result, tuple) else [result]
        flat_out = []
        for r, shape in zip(results, self.out_shapes):
            if k > 1 and shape and shape[0] == self.n:
                r = r.reshape(k * self.n, *shape[1:])
            flat_out.append(r)
        return flat_out[:self.num_outputs], flat_out[self.num_outputs:]


class ModuleTeacher:
    """An nn.Module teacher: run on the flat batch in eval mode; ``features`` are submodule
    names whose outputs are captured with forward hooks."""

    def __init__(self, module: torch.nn.Module, features: Sequence[str]) -> None:
        modules = dict(module.named_modules())
        missing = [f for f in features if f not in modules]
        if missing:
            names = [n for n in modules if n]
            raise KilnError(f"feature_pairs names {missing}, not submodules of the teacher "
                            f"{type(module).__name__}",
                            hint="for an nn.Module teacher, name submodules (module paths); "
                                 f"it has {names[:20]}" + (" ..." if len(names) > 20 else ""))
        self.module = module
        self.features = list(features)
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = [modules[f].register_forward_hook(self._capture(f)) for f in features]

    def _capture(self, name: str):
        def hook(mod, args, output):
            if not isinstance(output, torch.Tensor):
                raise KilnError(f"teacher submodule {name} returns {type(output).__name__}, "
                                "not a tensor", hint="pair a submodule that returns a tensor")
            self._captured[name] = output
        return hook

    def __call__(self, flat: Tensors) -> tuple[Tensors, Tensors]:
        self._captured.clear()
        leaves, _ = pytree.tree_flatten(self.module(*flat))
        outputs = [t for t in leaves if isinstance(t, torch.Tensor)]
        return outputs, [self._captured[f] for f in self.features]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


# ---- data ------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One training step's inputs (flat layout) and labels (or None)."""

    inputs: Tensors
    labels: torch.Tensor | None


def _as_tuple(item: Any) -> tuple:
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return (item,)
    if isinstance(item, (tuple, list)):
        return tuple(item)
    raise KilnError(f"a batch is a {type(item).__name__}",
                    hint="give tensors, tuples of tensors (one per graph input) or a dataset")


def _flatten_inputs(item: Any, runner: GraphRunner) -> Tensors:
    """A batch in the flat layout ``[m, *shape[1:]]`` per input, cast to the inputs' dtypes."""
    parts = _as_tuple(item)
    layout = runner.input_layout()
    if len(parts) != len(layout):
        raise KilnError(f"a batch holds {len(parts)} tensors; the student takes {len(layout)} "
                        "inputs", hint="give one tensor per graph input, in order (labels go "
                                       "in labels=)")
    flat = []
    for k, (x, (n, rest, dtype)) in enumerate(zip(parts, layout)):
        x = torch.as_tensor(x)
        if x.is_floating_point() != dtype.is_floating_point:
            raise KilnError(f"batch tensor {k} is {x.dtype}; student input %"
                            f"{runner.graph.inputs[k]} is {dtype}",
                            hint="give float data for float inputs and integers for integer ones")
        shape = tuple(x.shape)
        if shape[1:] == (n, *rest):
            x = x.reshape(-1, *rest)
        elif shape[1:] != rest or shape[0] % n:
            raise KilnError(f"batch tensor {k} has shape {list(shape)}; student input %"
                            f"{runner.graph.inputs[k]} is {[n, *rest]}",
                            hint=f"give batches shaped [m, {', '.join(map(str, rest))}] with m a "
                                 f"multiple of {n}, or [b, {n}, ...]")
        flat.append(x.to(dtype))
    if len({x.shape[0] for x in flat}) > 1:
        raise KilnError(f"the tensors of a batch hold {[x.shape[0] for x in flat]} samples",
                        hint="every input of a batch needs the same number of samples")
    return flat


def _is_dataset(data: Any) -> bool:
    """A tensor of samples or a map-style dataset (lists and tuples are lists of batches)."""
    return isinstance(data, (torch.Tensor, np.ndarray)) or (
        hasattr(data, "__getitem__") and hasattr(data, "__len__")
        and not isinstance(data, (list, tuple, str)))


class Batches:
    """The training batches: a dataset (a tensor, a TensorDataset or any map-style dataset of
    samples) is shuffled with ``generator`` and cut into ``batch_size`` samples per epoch; an
    iterable of batches is used as given, in order, every epoch."""

    def __init__(self, data: Any, labels: Any, batch_size: int, runner: GraphRunner,
                 generator: torch.Generator) -> None:
        self.runner = runner
        self.generator = generator
        if _is_dataset(data):
            self.dataset = (torch.utils.data.TensorDataset(torch.as_tensor(data))
                            if isinstance(data, (torch.Tensor, np.ndarray)) else data)
            self.size = len(self.dataset)
            self.labels = None if labels is None else torch.as_tensor(labels)
            if self.labels is not None and len(self.labels) != self.size:
                raise KilnError(f"labels hold {len(self.labels)} entries for {self.size} samples",
                                hint="give one label per sample of the dataset")
            # Every step's batch must split into whole calls of the student graph, and a
            # dataset smaller than batch_size still makes one step.
            n = runner.n
            self.batch_size = min(batch_size - batch_size % n or n, self.size - self.size % n)
            self.batches = None
        else:
            if not isinstance(data, Iterable):
                raise KilnError(f"data is a {type(data).__name__}",
                                hint="give an iterable of input batches or a tensor dataset")
            self.batches = list(data)
            self.size = len(self.batches)
            label_list = None if labels is None else list(labels)
            if label_list is not None and len(label_list) != self.size:
                raise KilnError(f"labels hold {len(label_list)} batches for {self.size} input "
                                "batches", hint="give one label tensor per input batch")
            self.labels = label_list
        if self.size == 0:
            raise KilnError("data holds no samples", hint="give at least one batch of inputs")

    def steps_per_epoch(self) -> int:
        """Training steps in one epoch (0 when a dataset cannot fill one call)."""
        if self.batches is not None:
            return len(self.batches)
        return self.size // self.batch_size if self.batch_size else 0

    def epoch(self) -> Iterable[Batch]:
        """One pass over the data."""
        if self.batches is not None:
            for k, item in enumerate(self.batches):
                labels = None if self.labels is None else torch.as_tensor(self.labels[k])
                yield Batch(_flatten_inputs(item, self.runner), labels)
            return
        order = torch.randperm(self.size, generator=self.generator)
        # The tail that does not fill a batch waits for the next epoch's shuffle.
        for start in range(0, self.size - self.batch_size + 1, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield Batch(self._gather(idx), None if self.labels is None else self.labels[idx])

    def _gather(self, idx: torch.Tensor) -> Tensors:
        if isinstance(self.dataset, torch.utils.data.TensorDataset):
            fields = [t[idx] for t in self.dataset.tensors]
        else:
            samples = [_as_tuple(self.dataset[int(i)]) for i in idx]
            fields = [torch.stack([torch.as_tensor(s[j]) for s in samples])
                      for j in range(len(samples[0]))]
        return _flatten_inputs(tuple(fields), self.runner)


# ---- loss ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossConfig:
    """The loss's settings (see the module docstring)."""

    temperature: float
    alpha: float
    objective: str
    feature_weight: float


def _is_classification(s: torch.Tensor, objective: str) -> bool:
    if objective != "auto":
        return objective == "kd"
    return s.dim() >= 2 and s.shape[-1] > 1 and s.is_floating_point()


def kd_loss(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss: KL(softmax(t/T) || softmax(s/T)) * T^2, mean over rows of
    the last (class) axis."""
    c = s.shape[-1]
    log_p_s = F.log_softmax(s.reshape(-1, c).float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t.reshape(-1, c).float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def distillation_loss(s_out: Tensors, t_out: Tensors, s_feat: Tensors, t_feat: Tensors,
                      labels: torch.Tensor | None, cfg: LossConfig,
                      pair_names: Sequence[tuple[str, str]]) -> torch.Tensor:
    """The loss of one batch; KilnError where student and teacher shapes disagree."""
    if len(s_out) != len(t_out):
        raise KilnError(f"the student has {len(s_out)} outputs, the teacher {len(t_out)}",
                        hint="distill against a teacher with the same outputs")
    teach = s_out[0].new_zeros(())
    for k, (s, t) in enumerate(zip(s_out, t_out)):
        if s.shape != t.shape:
            raise KilnError(f"student output {k} has shape {list(s.shape)}, the teacher's "
                            f"{list(t.shape)}", hint="the teacher must compute the same outputs "
                                                     "for the same batch")
        if _is_classification(s, cfg.objective):
            teach = teach + kd_loss(s, t, cfg.temperature)
        else:
            teach = teach + F.mse_loss(s.float(), t.float())
    loss = teach
    if labels is not None:
        s = s_out[0]
        if _is_classification(s, cfg.objective):
            rows = s.reshape(-1, s.shape[-1])
            if labels.numel() != rows.shape[0]:
                raise KilnError(f"{labels.numel()} labels for {rows.shape[0]} rows of output 0",
                                hint="give one class index per sample (per row of the logits)")
            hard = F.cross_entropy(rows.float(), labels.reshape(-1).long().to(s.device))
        else:
            if labels.numel() != s.numel():
                raise KilnError(f"{labels.numel()} label values for output 0 of shape "
                                f"{list(s.shape)}", hint="give regression targets shaped like "
                                                         "the output")
            hard = F.mse_loss(s.float(), labels.reshape(s.shape).float())
        loss = cfg.alpha * teach + (1.0 - cfg.alpha) * hard
    for (s_name, t_name), sf, tf in zip(pair_names, s_feat, t_feat):
        if sf.shape != tf.shape:
            raise KilnError(f"feature pair {s_name} -> {t_name}: the student's value has shape "
                            f"{list(sf.shape)}, the teacher's {list(tf.shape)}",
                            hint="pair values of the same shape")
        loss = loss + cfg.feature_weight * F.mse_loss(sf.float(), tf.float())
    return loss


# ---- the fine-tuner --------------------------------------------------------------------------
def _check_settings(epochs: int, lr: float, temperature: float, alpha: float, batch_size: int,
                    objective: str, feature_weight: float) -> None:
    def positive_int(name: str, v: Any) -> None:
        if not isinstance(v, Integral) or isinstance(v, bool) or v < 1:
            raise KilnError(f"distill: {name}={v!r}", hint=f"{name} must be an integer >= 1")

    def positive(name: str, v: Any, allow_zero: bool = False) -> None:
        ok = isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and (
            v >= 0 if allow_zero else v > 0)
        if not ok:
            raise KilnError(f"distill: {name}={v!r}",
                            hint=f"{name} must be a finite number {'>=' if allow_zero else '>'} 0")

    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    positive("lr", lr)
    positive("temperature", temperature)
    positive("feature_weight", feature_weight, allow_zero=True)
    if not isinstance(alpha, Real) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise KilnError(f"distill: alpha={alpha!r}", hint="alpha must be a number in [0, 1]")
    if objective not in OBJECTIVES:
        raise KilnError(f"distill: objective={objective!r}",
                        hint=f"objective must be one of {', '.join(OBJECTIVES)}")


def _trained_graph(student: Graph, runner: GraphRunner) -> Graph:
    """``student`` with the trained parameters as its (frozen) constants."""
    out = student.copy()
    for name, param in runner.trained.items():
        arr = param.detach().cpu().numpy().astype(student.constants[name].dtype, copy=True)
        arr.setflags(write=False)
        out.constants[name] = arr
    verify(out)
    return out


def distill(
    student: Graph,
    teacher: torch.nn.Module | Graph,
    data: Any,
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    temperature: float = 4.0,
    alpha: float = 0.9,
    labels: Any = None,
    feature_pairs: Mapping[str, str] | None = None,
    feature_weight: float = 1.0,
    objective: str = "auto",
    batch_size: int = 32,
    progress: bool = True,
    seed: int = 0,
    prune: Mapping[str, Any] | None = None,
    student_transform: ModuleTransform | None = None,
) -> Graph:
    """Fine-tune ``student`` against ``teacher`` by knowledge distillation; a new Graph.

    Args:
        student: the kiln Graph to train (left untouched); its floating weights and biases
            train, everything else stays.
        teacher: an nn.Module or a kiln Graph computing the same outputs; run in eval mode
            without gradients (an nn.Module's mode is restored afterwards).
        data: the student's inputs: an iterable of batches (a tensor or a tuple of tensors,
            one per graph input, used in order every epoch) or a dataset (a tensor of samples,
            a TensorDataset or a map-style Dataset, shuffled each epoch and cut into
            ``batch_size`` samples). A batch is ``[m, *shape[1:]]`` per input, m a multiple
            of the graph's batch size n, or ``[b, *shape]``.
        epochs: passes over the data.
        lr: Adam's learning rate.
        temperature: softens both distributions of the KD loss (T).
        alpha: weight of the teacher term; ``1 - alpha`` weighs the label term. Without
            labels the teacher term alone is the loss.
        labels: class indices (or regression targets) for output 0: one per sample of a
            dataset, or one tensor per batch of an iterable.
        feature_pairs: student value name -> teacher value name (a kiln Graph teacher) or
            submodule name (an nn.Module teacher); their MSE is added to the loss.
        feature_weight: weight of each feature pair's MSE.
        objective: ``"auto"`` (KD for outputs with a class axis last, MSE for the others),
            ``"kd"`` or ``"mse"``.
        batch_size: samples per step for a dataset (rounded down to a multiple of n).
        progress: show a tqdm progress bar with the loss.
        seed: seeds the shuffling and torch's RNG: the same seed gives the same weights.
        prune: gradual (AGP) channel pruning during the fine-tune: ``prune_channels``
            options (``ratio`` or ``flops_target``: the final fraction) with ``schedule:
            "agp"``, ``steps`` (updates) and ``end`` (the fraction of the fine-tune by which
            it is reached); see ``kiln.compression.gradual``.
        student_transform: a rewrite of the student's torch module (``graph_to_module`` of
            the student, extra outputs included) before training, keeping its parameters and
            its ``meta``; quantization-aware training inserts fake quantization with it
            (``kiln.compression.qat``).

    Returns:
        A new Graph with the student's structure and the trained weights (read-only arrays),
        less the pruned channels with ``prune``; it compiles like any other graph.

    Raises:
        KilnError: for empty data, batches that do not fit the student's inputs, teacher and
            student outputs of different shapes, unknown feature values, bad settings, or a
            loss that is not finite (lower ``lr``, check the data).
    """
    _check_settings(epochs, lr, temperature, alpha, batch_size, objective, feature_weight)
    verify(student)
    pairs = dict(feature_pairs or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()):
        raise KilnError("feature_pairs must map value names (str) to value names (str)",
                        hint="for example {'relu': 'relu'}")
    cfg = LossConfig(float(temperature), float(alpha), objective, float(feature_weight))
    runner = GraphRunner(student, list(pairs), trainable=True, transform=student_transform)
    if not runner.trained:
        raise KilnError(f"graph {student.name} has no constant weights to train",
                        hint="distill a graph whose dense or norm ops read constant weights")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        batches = Batches(data, labels, batch_size, runner, generator)
        if isinstance(teacher, Graph):
            verify(teacher)
            teacher_run: Any = GraphRunner(teacher, list(pairs.values()), role="teacher")
            was_training = None
        elif isinstance(teacher, torch.nn.Module):
            was_training = teacher.training
            teacher.eval()
            teacher_run = ModuleTeacher(teacher, list(pairs.values()))
        else:
            raise KilnError(f"teacher is a {type(teacher).__name__}",
                            hint="give an nn.Module or a kiln Graph")
        pruner = None
        if prune is not None:
            from kiln.compression.gradual import GradualPruning

            pruner = GradualPruning(student, prune, epochs * batches.steps_per_epoch(),
                                    runner.trained)
        try:
            _train(runner, teacher_run, batches, cfg, list(pairs.items()), epochs, lr,
                   progress, pruner.step if pruner is not None else None)
        finally:
            if isinstance(teacher_run, ModuleTeacher):
                teacher_run.close()
                teacher.train(was_training)
    trained = _trained_graph(student, runner)
    return pruner.finish(trained) if pruner is not None else trained


def _train(runner: GraphRunner, teacher: GraphRunner | ModuleTeacher, batches: Batches,
           cfg: LossConfig, pairs: list[tuple[str, str]], epochs: int, lr: float,
           progress: bool, after_step: Callable[[int], None] | None = None) -> None:
    steps = batches.steps_per_epoch()
    if steps == 0:
        raise KilnError(f"the dataset's {batches.size} samples do not fill one call of the "
                        f"student graph ({runner.n} samples)", hint="give more samples")
    optimizer = torch.optim.Adam(list(runner.trained.values()), lr=lr)
    bar = tqdm(total=epochs * steps, desc="distill", unit="step", disable=not progress)
    done = 0
    try:
        for epoch in range(epochs):
            for step, batch in enumerate(batches.epoch()):
                with torch.no_grad():
                    t_out, t_feat = teacher(batch.inputs)
                s_out, s_feat = runner(batch.inputs)
                loss = distillation_loss(s_out, t_out, s_feat, t_feat, batch.labels, cfg, pairs)
                if not torch.isfinite(loss):
                    raise KilnError(f"the distillation loss is {loss.item()} at epoch {epoch}, "
                                    f"step {step}", hint="lower lr or temperature, and check "
                                                         "the data and labels for NaN or inf")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
                done += 1
                if after_step is not None:
                    after_step(done)
                bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
    finally:
        bar.close()
