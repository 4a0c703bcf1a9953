"""First-order Taylor importance of prunable channels, computed with PyTorch autograd.

The pruning pass (kiln.compression.prune) must not import torch, so gradient-based scores are made
here and handed to it as the option ``prune_channels.scores``:

    scores = taylor_scores(graph, batches)
    ctx = PassContext({"prune_channels.criterion": "taylor", "prune_channels.scores": scores})

The score of channel c of a producer output a is Molchanov et al.'s first-order Taylor estimate
of the loss change when the channel is removed: for each example, |sum over positions of
a * dL/da| on channel c, summed over every example of every calibration batch.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from kiln.backends.reference import check_inputs
from kiln.compression.channel_groups import find_channel_groups
from kiln.interop.to_torch import TORCH_IMPL, graph_to_module
from kiln.ir import Graph, KilnError

LossFn = Callable[[tuple[torch.Tensor, ...], Any], torch.Tensor]


def output_norm_loss(outputs: tuple[torch.Tensor, ...], labels: Any = None) -> torch.Tensor:
    """The L2 norm of the floating-point outputs: how much the network says, with no labels."""
    return sum(torch.linalg.vector_norm(o) for o in outputs if o.is_floating_point())


def cross_entropy_loss(outputs: tuple[torch.Tensor, ...], labels: Any) -> torch.Tensor:
    """Cross entropy of the first output (classes on its last axis) against integer labels."""
    logits = outputs[0]
    target = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target)


def _fx_nodes(graph: Graph, module: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """kiln value -> the fx node computing it. ``graph_to_module`` emits one call per kiln
    node, in order (plus a getitem per output of a multi-output node), so the two walk
    together; fx may rename values, so names are not used."""
    kiln_nodes = iter(graph.nodes)
    current = None
    found: dict[str, torch.fx.Node] = {}
    for fxn in module.graph.nodes:
        if fxn.op != "call_function":
            continue
        if fxn.target is operator.getitem and current is not None and len(current.outputs) > 1:
            found[current.outputs[fxn.args[1]]] = fxn
            continue
        current = next(kiln_nodes, None)
        if current is None or TORCH_IMPL.get(current.op) is not fxn.target:
            raise KilnError("the torch module does not follow the graph node by node",
                            node=current.name if current else None,
                            hint="kiln.interop.to_torch.graph_to_module changed; update "
                                 "kiln.compression.prune_scores")
        if len(current.outputs) == 1:
            found[current.outputs[0]] = fxn
    return found


class _Recorder(torch.fx.Interpreter):
    """Runs the module and keeps the tensors of the watched fx nodes."""

    def __init__(self, module: torch.fx.GraphModule, watch: dict[torch.fx.Node, str]) -> None:
        super().__init__(module)
        self.watch = watch
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.watch:
            if not result.requires_grad:
                # The first watched activation is a leaf (no constant needs a gradient); from
                # here on autograd records everything computed from it.
                result.requires_grad_()
            self.seen[self.watch[n]] = result
        return result


def _as_inputs(graph: Graph, batch: Any) -> list[torch.Tensor]:
    items = batch if isinstance(batch, (list, tuple)) else (batch,)
    arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
              for x in items]
    return [torch.from_numpy(np.array(a)) for a in check_inputs(graph, arrays)]


def taylor_scores(graph: Graph, batches: Iterable[Any], labels: Iterable[Any] | None = None,
                  *, loss: LossFn | None = None,
                  values: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Taylor importance of each output channel of every pruning source of ``graph``.

    Args:
        graph: the kiln graph to prune (it is only read).
        batches: calibration batches; each is one input array/tensor or a sequence of them,
            shaped exactly like the graph's inputs.
        labels: one label array per batch; with labels the default loss is cross entropy
            (classes on the first output's last axis), without them the outputs' L2 norm.
        loss: ``loss(outputs, labels) -> scalar tensor`` replacing the default.
        values: the producer output values to score (default: every source the channel
            analysis finds).

    Returns:
        {producer output value: float64 array with one score per channel}, the format of the
        pruning option ``prune_channels.scores``.
    """
    sources = {s.value: s for s in find_channel_groups(graph).sources}
    wanted = list(sources) if values is None else list(values)
    for v in wanted:
        if v not in sources:
            raise KilnError(f"%{v} is not the output of a prunable conv or linear", node=v,
                            hint="score the outputs listed by find_channel_groups(graph)")
    if loss is None:
        loss = output_norm_loss if labels is None else cross_entropy_loss
    # Constants stay plain tensors: only activation gradients are needed, and batch-norm
    # running statistics must not require gradients.
    module = graph_to_module(graph, trainable=False)
    fx_of = _fx_nodes(graph, module)
    watch = {fx_of[v]: v for v in wanted}
    totals = {v: np.zeros(sources[v].channels) for v in wanted}
    label_iter = iter(labels) if labels is not None else None
    count = 0
    for batch in batches:
        batch_labels = None
        if label_iter is not None:
            batch_labels = next(label_iter, None)
            if batch_labels is None:
                raise KilnError("fewer label arrays than calibration batches",
                                hint="give one label array per batch")
        recorder = _Recorder(module, watch)
        with torch.enable_grad():
            result = recorder.run(*_as_inputs(graph, batch))
            outputs = result if isinstance(result, tuple) else (result,)
            value = loss(outputs, batch_labels)
            acts = [recorder.seen[v] for v in wanted]
            grads = torch.autograd.grad(value, acts, allow_unused=True)
        for v, a, g in zip(wanted, acts, grads):
            if g is None:
                continue  # the loss does not depend on this layer: every channel scores 0
            totals[v] += _per_channel(a.detach() * g, sources[v].axis)
        count += 1
    if count == 0:
        raise KilnError("taylor_scores needs at least one calibration batch")
    return totals


def _per_channel(contribution: torch.Tensor, axis: int) -> np.ndarray:
    """|sum over positions| per example and channel, summed over examples (axis 0 holds the
    examples unless it is the channel axis)."""
    c = contribution.double()
    if axis == 0 or c.dim() == 1:
        return c.reshape(c.shape[0], -1).sum(dim=1).abs().numpy()
    c = c.movedim(axis, 1).reshape(c.shape[0], c.shape[axis], -1).sum(dim=2)
    return c.abs().sum(dim=0).numpy()
