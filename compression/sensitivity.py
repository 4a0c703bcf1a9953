"""Per-layer pruning sensitivity from one pass: the cheapest proxy of ``kiln.search``.

One forward and backward pass over a few batches gives every prunable channel its first-order
Taylor score (``prune_scores.taylor_scores``: the loss change its removal would cause). A
pruning plan (``plan_pruning`` with a candidate's options, no graph rewrite) then costs the sum
of the scores of the units it removes, as a fraction of all units' scores: ``cost`` is 0 for
no pruning and 1 for removing everything. No compile, no metric: a few milliseconds per plan.

``kiln.search`` uses it two ways: ``stages`` ranks the stages by how much pruning half of
each would cost (the report shows it), and a candidate whose pruning costs at least as much
as that of a candidate already found hopeless before fine-tuning (it lost more than
``gate_drop``) is pruned without being compiled. First-order estimates are rough; they rank
plans, they do not predict accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kiln.compression.channel_groups import find_channel_groups
from kiln.compression.prune import PASS_NAME, plan_pruning, unit_scores
from kiln.ir import Graph
from kiln.passes.base import PassContext

# Options of the pruning stage that do not choose which channels go.
_NOT_PLAN = ("schedule", "steps", "end", "scores")


class Sensitivity:
    """Taylor unit scores of ``graph``'s prunable groups (``scores``: producer value ->
    per-channel scores, as ``taylor_scores`` returns them)."""

    def __init__(self, graph: Graph, scores: Mapping[str, np.ndarray]) -> None:
        self.graph = graph
        # The groups of one-shot pruning (layer norms shrink with the channels they
        # normalize) and of AGP (they do not), each with its units' scores.
        self.analyses = {norms: find_channel_groups(graph, norms=norms)
                         for norms in (True, False)}
        self.unit_scores = {norms: {g.id: unit_scores(graph, g, "taylor", scores)
                                    for g in a.prunable()} for norms, a in self.analyses.items()}
        self.analysis, self.units = self.analyses[True], self.unit_scores[True]
        self.total = float(sum(s.sum() for s in self.units.values())) or 1.0

    def cost(self, prune: Mapping[str, Any] | None, multiple: int = 8) -> float:
        """The fraction of the total Taylor score that ``prune`` (``kiln.compress``'s prune
        options) removes."""
        if not prune:
            return 0.0
        opts = {f"{PASS_NAME}.{k}": v for k, v in prune.items() if k not in _NOT_PLAN}
        opts.setdefault(f"{PASS_NAME}.multiple", multiple)
        norms = bool(prune.get("norms", True)) and prune.get("schedule") is None
        units = self.unit_scores[norms]
        keep, _ = plan_pruning(self.graph, self.analyses[norms], PassContext(options=opts))
        removed = 0.0
        for gid, kept in keep.items():
            gone = np.ones(len(units[gid]), bool)
            gone[kept] = False
            removed += float(units[gid][gone].sum())
        return removed / float(sum(s.sum() for s in units.values()) or 1.0)

    def stages(self, patterns: Sequence[str], ratio: float = 0.5) -> dict[str, float]:
        """The cost of removing ``ratio`` of each stage's channels alone, per pattern."""
        return {p: self.cost({"ratio": 0.0, "layers": {p: ratio}}, multiple=1)
                for p in patterns}


def batches_with_labels(data: Any, labels: Any, batches: Sequence[Sequence[np.ndarray]]
                        ) -> list[np.ndarray] | None:
    """One label array per batch of ``batches`` (cut from ``data`` in order, as
    ``kiln.compress`` cuts them), or None when ``labels`` cannot be matched to them."""
    if labels is None:
        return None
    if isinstance(labels, (list, tuple)):
        return [np.asarray(y).reshape(-1) for y in labels[:len(batches)]]
    y = np.asarray(labels).reshape(-1)
    n = len(batches[0][0]) if batches and len(batches[0]) else 0
    if n == 0 or len(y) < n * len(batches) or len(y) != len(data):
        return None
    return [y[i * n:(i + 1) * n] for i in range(len(batches))]
