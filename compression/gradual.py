"""Gradual channel pruning (AGP, Zhu & Gupta 2017) while distillation fine-tunes the student.

One-shot pruning removes every channel at once and leaves the fine-tune to recover; AGP
raises the pruned fraction along the cubic schedule

    s_k = s_f + (s_i - s_f) (1 - k / n)^3,   k = 1 .. n,   s_i = 0

over ``n`` updates (default 16) spread over the first ``end`` (default half) of the
fine-tune's steps, so the network adapts while it loses capacity, and the rest trains at the
final width. (On the digits CNN at 70% and 85% of the FLOPs and 4 epochs, 16 updates over the
first half did better than 8 over the first 3/4; against one-shot pruning the result is within
noise there, see the README's search section.) kiln's
pruning is structured, so a step *masks* channels: at update k the pruning pass's own plan
(``plan_pruning``, the same options: ``ratio`` or ``flops_target``, ``global``, ``criterion``,
``layers``, ``protect``, ``multiple``) is made on the current weights at fraction s_k, its units
join those masked before, and every masked channel's filters (weight rows, bias) and every
consumer's input columns reading it are zeroed, then kept at zero after each optimizer step.
The consumers' columns make a masked channel exactly absent from the outputs (whatever a
batch norm adds to it, nothing reads it), so the final ``rewrite`` removing the masked
channels physically does not change the trained student's outputs (tested). Zeroed filters
score lowest under the norm criteria, so a later plan keeps them masked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from kiln.compression.channel_groups import find_channel_groups
from kiln.compression.prune import PASS_NAME, element_mask, plan_pruning, rewrite
from kiln.ir import Graph, KilnError
from kiln.passes.base import PassContext

SCHEDULES = ("agp",)
# Options of the schedule itself; the rest are prune_channels options.
SCHEDULE_KEYS = ("schedule", "steps", "end")
DEFAULT_STEPS = 16
DEFAULT_END = 0.5
# Constant roles whose positions a masked channel zeroes: its filters and its readers' columns.
MASKED_ROLES = ("filters", "input")


def agp_fraction(k: int, n: int, final: float, initial: float = 0.0) -> float:
    """The pruned fraction after update ``k`` of ``n``: ``s_f + (s_i - s_f)(1 - k/n)^3``."""
    t = min(max(k / n, 0.0), 1.0)
    return final + (initial - final) * (1.0 - t) ** 3


class GradualPruning:
    """Masks channels of ``graph`` along the AGP schedule while ``trained`` (constant name ->
    the distillation's torch parameter) trains for ``total_steps``; ``finish`` removes them.

    ``options``: prune_channels options (``ratio`` or ``flops_target``: the final fraction;
    the ratios of ``layers`` follow the same schedule) plus ``steps`` (updates, default 16)
    and ``end`` (the fraction of the fine-tune by which the final fraction is reached,
    default 0.5).
    """

    def __init__(self, graph: Graph, options: Mapping[str, Any], total_steps: int,
                 trained: Mapping[str, torch.nn.Parameter]) -> None:
        options = dict(options)
        schedule = options.pop("schedule", "agp")
        if schedule not in SCHEDULES:
            raise KilnError(f"unknown pruning schedule {schedule!r}",
                            hint=f"use one of {SCHEDULES}, or leave schedule out (one-shot)")
        steps, end = options.pop("steps", DEFAULT_STEPS), options.pop("end", DEFAULT_END)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise KilnError(f"prune.steps must be an integer >= 1, got {steps!r}",
                            hint="the number of times AGP raises the pruned fraction")
        if not isinstance(end, (int, float)) or not 0.0 < end <= 1.0:
            raise KilnError(f"prune.end must be in (0, 1], got {end!r}",
                            hint="the fraction of the fine-tune by which pruning is complete")
        self.key = "flops_target" if options.get("flops_target") is not None else "ratio"
        self.final = float(options.pop(self.key, 0.3))
        self.options = options
        self.graph = graph
        self.trained = trained
        # norms=False: masking a channel a layer norm normalizes over is not removing it.
        self.analysis = find_channel_groups(graph)
        self.steps = steps
        # Update k (1..steps) happens after optimizer step update_at[k - 1].
        last = max(1, round(end * total_steps))
        self.update_at = {max(1, round(k * last / steps)): k for k in range(1, steps + 1)}
        self.removed: dict[int, set[int]] = {}
        self.zeroed: list[tuple[torch.nn.Parameter, int, torch.Tensor]] = []
        self.history: list[tuple[int, float]] = []  # (optimizer step, fraction asked)
        # An impossible target fails now, not after the fine-tune.
        self._plan(steps, graph)

    def _plan(self, k: int, graph: Graph) -> dict[int, np.ndarray]:
        """The pruning pass's plan at update ``k``: every fraction asked for (the global one
        and each of ``layers``) follows the schedule."""
        opts = {f"{PASS_NAME}.{key}": v for key, v in self.options.items()}
        opts[f"{PASS_NAME}.{self.key}"] = agp_fraction(k, self.steps, self.final)
        layers = self.options.get("layers")
        if layers:
            opts[f"{PASS_NAME}.layers"] = {p: agp_fraction(k, self.steps, float(r))
                                           for p, r in layers.items()}
        if self.key == "flops_target" and opts[f"{PASS_NAME}.{self.key}"] <= 0:
            # The pass takes targets in (0, 1): no global pruning yet.
            del opts[f"{PASS_NAME}.{self.key}"]
            opts[f"{PASS_NAME}.ratio"] = 0.0
        keep, _ = plan_pruning(graph, self.analysis, PassContext(options=opts))
        return keep

    def _current(self) -> Graph:
        """The student with its weights as trained so far."""
        g = self.graph.copy()
        for name, param in self.trained.items():
            g.constants[name] = param.detach().cpu().numpy().astype(g.constants[name].dtype)
        return g

    def step(self, done: int) -> None:
        """Called after optimizer step ``done`` (counting from 1): raise the fraction when an
        update falls here, and keep every masked position at zero."""
        k = self.update_at.get(done)
        if k is not None:
            self._mask(self._plan(k, self._current()))
            self.history.append((done, agp_fraction(k, self.steps, self.final)))
        with torch.no_grad():
            for param, axis, idx in self.zeroed:
                param.index_fill_(axis, idx, 0.0)

    def _mask(self, keep: Mapping[int, np.ndarray]) -> None:
        for gid, units in keep.items():
            gone = set(range(self.analysis.groups[gid].num_units)) - {int(u) for u in units}
            self.removed.setdefault(gid, set()).update(gone)
        mask = element_mask(self.analysis, self.kept())
        self.zeroed = []
        for ed in self.analysis.const_edits:
            if ed.role not in MASKED_ROLES:
                continue
            param = self.trained.get(self.graph.nodes[ed.node].inputs[ed.index])
            off = ~mask[ed.elem]
            if param is not None and off.any():
                self.zeroed.append((param, ed.axis, torch.from_numpy(np.flatnonzero(off))))

    def kept(self) -> dict[int, np.ndarray]:
        """Group id -> kept unit indices, for every group with masked units."""
        return {gid: np.array(sorted(set(range(self.analysis.groups[gid].num_units)) - gone),
                              dtype=np.int64)
                for gid, gone in self.removed.items() if gone}

    def finish(self, trained: Graph) -> Graph:
        """``trained`` (the student with its fine-tuned weights) with the masked channels
        physically removed."""
        keep = self.kept()
        return rewrite(trained, self.analysis, keep) if keep else trained
