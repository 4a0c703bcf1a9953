"""``kiln bisect``: find the first pass after which a model's outputs leave eager PyTorch's.

Each stage of the pipeline (the imported graph, then the graph after every pass) runs on the
reference backend with the model's example inputs and is compared with the eager model's
outputs, not only with the previous stage, so a small error that builds up across passes is
caught too. Exact passes must stay within ``1e-5 + 1e-4 * max|expected|``; once a lossy pass
has run, its error budget is added to the tolerance of every later stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils import _pytree as pytree

from kiln.backends.reference import run_graph
from kiln.debug.model_arg import is_onnx_spec, load_checked
from kiln.frontend.trace import trace_module
from kiln.ir import Graph, KilnError, NumericsError
from kiln.ir.text import print_node
from kiln.passes import (
    LOSSY,
    ErrorBudget,
    Instrument,
    Pass,
    PassManager,
    PassResult,
    Verify,
    get_pass,
    get_pipeline,
)

EXACT_BUDGET = ErrorBudget(rtol=0.0, atol=1e-4)
"""The fp32 tolerance of exact passes, on top of ``ABS_FLOOR``: 1e-4 of the output's max."""

ABS_FLOOR = 1e-5
"""An absolute allowance so that outputs near zero do not fail on rounding alone."""

INPUT_STAGE = "input"

ModelArg = str | tuple[torch.nn.Module, Sequence[torch.Tensor]]


def resolve_passes(pipeline: str = "O1", passes: Sequence[Pass | str] | None = None
                   ) -> list[Pass]:
    """The passes to run: ``passes`` (instances or registered names) when given, else the
    passes of the named ``pipeline``."""
    if passes is None:
        return get_pipeline(pipeline)
    return [get_pass(p) if isinstance(p, str) else p for p in passes]


def combined_budget(passes: Sequence[Pass]) -> ErrorBudget:
    """The tolerance after ``passes`` have run: the exact one plus every lossy pass's budget."""
    budgets = [p.error_budget for p in passes if p.numerics == LOSSY and p.error_budget]
    return ErrorBudget(rtol=EXACT_BUDGET.rtol + sum(b.rtol for b in budgets),
                       atol=EXACT_BUDGET.atol + sum(b.atol for b in budgets))


def max_violation(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray],
                  budget: ErrorBudget) -> tuple[float, bool]:
    """The largest |actual - expected| over all outputs and whether every element is within
    ``ABS_FLOOR + budget.atol * max|expected| + budget.rtol * |expected|``.

    A different number of outputs, shape, or non-finite values that do not match count as
    out of tolerance (with an infinite difference).
    """
    if len(expected) != len(actual):
        return float("inf"), False
    worst, ok = 0.0, True
    for exp, act in zip(expected, actual):
        e = np.asarray(exp, dtype=np.float64)
        a = np.asarray(act, dtype=np.float64)
        if e.shape != a.shape:
            return float("inf"), False
        if e.size == 0:
            continue
        same = (e == a) | (np.isnan(e) & np.isnan(a))
        diff = np.where(same, 0.0, np.nan_to_num(np.abs(a - e), nan=np.inf))
        finite = np.isfinite(e)
        scale = float(np.abs(e[finite]).max()) if finite.any() else 0.0
        allowed = ABS_FLOOR + budget.atol * scale + budget.rtol * np.abs(np.where(finite, e, 0))
        allowed = np.where(finite, allowed, 0.0)
        worst = max(worst, float(diff.max()))
        ok = ok and bool(np.all(diff <= allowed))
    return worst, ok


@dataclass(frozen=True)
class StageCheck:
    """One stage against eager PyTorch: stage 0 is the imported graph, stage k the graph after
    the k-th pass."""

    stage: int
    name: str
    max_diff: float
    ok: bool


@dataclass(frozen=True)
class BisectResult:
    """What ``bisect`` found.

    ``pass_name`` and ``index`` (0-based position in the pass list) name the first pass whose
    output leaves tolerance, crashes or fails verification; both are None when every stage
    matches, and ``pass_name`` is ``"input"`` (index None) when the imported graph itself
    differs from eager PyTorch. ``node`` is the first node of that pass's output whose value
    differs from the value of the same name before the pass; ``changed_nodes`` the text of
    every node the pass added or changed; ``error`` the exception a crashing pass raised.
    """

    pass_name: str | None
    index: int | None
    max_diff: float
    node: str | None = None
    changed_nodes: tuple[str, ...] = ()
    error: str | None = None
    stages: tuple[StageCheck, ...] = field(default=())
    reference: str = "eager PyTorch"

    @property
    def failed(self) -> bool:
        """Whether some stage broke."""
        return self.pass_name is not None

    def report(self) -> str:
        """A human-readable summary: every stage checked, then the verdict."""
        lines = [f"{s.stage:>3}  {s.name:<24} max|diff| {s.max_diff:.3g}  "
                 f"{'ok' if s.ok else 'OUT OF TOLERANCE'}" for s in self.stages]
        if not self.failed:
            lines.append(f"all stages match {self.reference}")
            return "\n".join(lines)
        if self.error is not None:
            lines.append(f"first failing pass: {self.pass_name} (#{self.index}) raised "
                         f"{self.error}")
            return "\n".join(lines)
        where = "the imported graph" if self.index is None else f"pass {self.pass_name} " \
                                                                 f"(#{self.index})"
        lines.append(f"first failing stage: {where}, max|diff| vs eager {self.max_diff:.3g}")
        if self.node is not None:
            lines.append(f"smallest offending node: %{self.node}")
        if self.changed_nodes:
            lines.append("nodes added or changed by the pass:")
            lines.extend(f"  {text}" for text in self.changed_nodes)
        return "\n".join(lines)


class _EagerCheck(Instrument):
    """Compares each stage with the eager outputs; raises NumericsError at the first stage out
    of tolerance and remembers which pass is running (for crashes)."""

    def __init__(self, inputs: Sequence[np.ndarray], expected: Sequence[np.ndarray],
                 passes: Sequence[Pass]) -> None:
        self.inputs = list(inputs)
        self.expected = list(expected)
        self.passes = list(passes)
        self.stages: list[StageCheck] = []
        self.current: int | None = None
        self.before: Graph | None = None
        self.after: Graph | None = None

    def _check(self, stage: int, name: str, graph: Graph) -> None:
        budget = combined_budget(self.passes[:stage])
        diff, ok = max_violation(self.expected, run_graph(graph, self.inputs), budget)
        self.stages.append(StageCheck(stage, name, diff, ok))
        if not ok:
            raise NumericsError(f"stage {name} differs from eager PyTorch by {diff:.3g}")

    def begin(self, graph: Graph) -> None:
        """Check the imported graph."""
        self._check(0, INPUT_STAGE, graph)

    def before_pass(self, pass_: Pass, graph: Graph, index: int) -> None:
        """Remember the running pass so a crash can be blamed on it."""
        self.current = index

    def after_pass(self, pass_: Pass, before: Graph, after: Graph, result: PassResult,
                   index: int, seconds: float) -> None:
        """Check the pass's output against eager PyTorch."""
        self.before, self.after = before, after
        self._check(index + 1, pass_.name, after)


def _observe_all(graph: Graph, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    values: dict[str, np.ndarray] = {}
    run_graph(graph, inputs, observe=lambda name, arr: values.__setitem__(name, arr))
    return values


def offending_node(before: Graph, after: Graph, inputs: Sequence[np.ndarray],
                   budget: ErrorBudget) -> str | None:
    """The first node output of ``after`` (in graph order) whose value differs beyond
    ``budget`` from the value of the same name in ``before``; None if no shared value does."""
    old = _observe_all(before, inputs)
    new = _observe_all(after, inputs)
    for node in after.nodes:
        for out in node.outputs:
            if out in old and not max_violation([old[out]], [new[out]], budget)[1]:
                return out
    return None


def changed_nodes(before: Graph, after: Graph) -> tuple[str, ...]:
    """The text of each node of ``after`` that ``before`` has no identical node line for."""
    old = {print_node(n, before.types) for n in before.nodes}
    return tuple(text for text in (print_node(n, after.types) for n in after.nodes)
                 if text not in old)


def eager_outputs(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The module's outputs on ``inputs`` in eager PyTorch, flattened, as NumPy arrays."""
    with torch.no_grad():
        result = module(*inputs)
    return [leaf.detach().cpu().numpy() for leaf in pytree.tree_leaves(result)
            if isinstance(leaf, torch.Tensor)]


def _mismatch(check: _EagerCheck, pass_list: Sequence[Pass], inputs: Sequence[np.ndarray]
              ) -> BisectResult:
    """The result for the stage that left tolerance (the last one ``check`` ran)."""
    failed = check.stages[-1]
    if failed.stage == 0:
        return BisectResult(INPUT_STAGE, None, failed.max_diff, stages=tuple(check.stages))
    assert check.before is not None and check.after is not None
    budget = combined_budget(pass_list[:failed.stage])
    return BisectResult(failed.name, failed.stage - 1, failed.max_diff,
                        offending_node(check.before, check.after, inputs, budget),
                        changed_nodes(check.before, check.after), stages=tuple(check.stages))


def bisect(model: ModelArg, pipeline: str = "O1", passes: Sequence[Pass | str] | None = None,
           frontend: str = "fx") -> BisectResult:
    """Run ``pipeline`` (or the explicit ``passes``) pass by pass on ``model`` and find the
    first pass after which the outputs leave tolerance against eager PyTorch.

    ``model`` is a MODEL spec (zoo name or ``file.py:factory``) or ``(module, inputs)``.
    A pass that raises (verifier errors included) is reported as the failing pass.
    """
    pass_list = resolve_passes(pipeline, passes)
    reference = "eager PyTorch"
    if isinstance(model, str):
        graph, arrays, expected, _ = load_checked(model, frontend=frontend)
        if is_onnx_spec(model):
            reference = "the imported ONNX model (reference backend)"
    else:
        module, inputs = model[0], tuple(model[1])
        graph, _ = trace_module(module, inputs, frontend)
        arrays = [t.detach().cpu().numpy() for t in inputs]
        expected = eager_outputs(module, inputs)
    check = _EagerCheck(arrays, expected, pass_list)
    try:
        PassManager(pass_list, [Verify(), check]).run(graph)
    except Exception as e:  # a crashing pass is a finding, whatever it raised
        if check.stages and not check.stages[-1].ok:
            return _mismatch(check, pass_list, arrays)
        if check.current is None:
            raise
        return BisectResult(pass_list[check.current].name, check.current, float("nan"),
                            error=f"{type(e).__name__}: {e}", stages=tuple(check.stages))
    return BisectResult(None, None, max(s.max_diff for s in check.stages),
                        stages=tuple(check.stages), reference=reference)


def parse_pass_list(text: str | None) -> list[str] | None:
    """``--passes p1,p2,...`` as a list of names (None when not given); KilnError if empty."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise KilnError("--passes names no pass", hint="write --passes p1,p2,...")
    for name in names:
        get_pass(name)  # a KilnError listing the known passes for a wrong name
    return names


__all__ = ["BisectResult", "StageCheck", "bisect", "combined_budget", "max_violation",
           "resolve_passes"]
