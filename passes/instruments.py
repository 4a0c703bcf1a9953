"""PassManager instruments: timing, IR dumps, verification, numeric checks between stages.

The pass-level debugger is built on these: a dump directory shows every stage's IR, and
``NumericCheck.stages`` says which pass moved the outputs and by how much.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.ir import DType, Graph, NumericsError, VerificationError, print_graph, verify
from kiln.passes.base import LOSSY, Pass, PassResult
from kiln.passes.manager import Instrument


# ---- timing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PassTiming:
    """How long one pass took and what it did to the node count."""

    index: int
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    changed: bool


class Timing(Instrument):
    """Records each pass's wall time and node counts; ``table()`` formats them."""

    def __init__(self) -> None:
        self.records: list[PassTiming] = []

    def begin(self, graph: Graph) -> None:
        """Start a fresh record for this run."""
        self.records = []

    def after_pass(self, pass_: Pass, before: Graph, after: Graph, result: PassResult,
                   index: int, seconds: float) -> None:
        """Record the pass."""
        self.records.append(PassTiming(index, pass_.name, seconds, len(before.nodes),
                                       len(after.nodes), result.changed))

    def after_stage(self, stage, before, after, index: int, seconds: float) -> None:
        """Record a kernel or code stage (its node counts are the graph's, unchanged)."""
        n = len(after.graph.nodes)
        self.records.append(PassTiming(index, stage.name, seconds, n, n, True))

    @property
    def total_seconds(self) -> float:
        """Time spent in passes."""
        return sum(r.seconds for r in self.records)

    def table(self) -> str:
        """A text table: one row per pass, then the total."""
        width = max([len(r.name) for r in self.records] + [4])
        lines = [f"{'#':>3}  {'pass':<{width}}  {'ms':>9}  {'nodes':>13}  changed"]
        for r in self.records:
            nodes = f"{r.nodes_before} -> {r.nodes_after}"
            lines.append(f"{r.index + 1:>3}  {r.name:<{width}}  {r.seconds * 1e3:>9.3f}  "
                         f"{nodes:>13}  {'yes' if r.changed else 'no'}")
        lines.append(f"{'':>3}  {'total':<{width}}  {self.total_seconds * 1e3:>9.3f}")
        return "\n".join(lines)


# ---- IR dumps --------------------------------------------------------------------------------
class DumpIR(Instrument):
    """Writes ``000_input.txt`` and then ``NNN_<pass>.txt`` after each pass into a directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.files: list[Path] = []

    def _write(self, filename: str, graph: Graph | str) -> None:
        path = self.directory / filename
        path.write_text(graph if isinstance(graph, str) else print_graph(graph))
        self.files.append(path)

    def begin(self, graph: Graph) -> None:
        """Create the directory and dump the input graph."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.files = []
        self._write("000_input.txt", graph)

    def after_pass(self, pass_: Pass, before: Graph, after: Graph, result: PassResult,
                   index: int, seconds: float) -> None:
        """Dump the pass's output graph."""
        self._write(f"{index + 1:03d}_{pass_.name}.txt", after)

    def after_stage(self, stage, before, after, index: int, seconds: float) -> None:
        """Dump the stage's output: the fusion plan, kernel IR, the memory plan, or code
        (LLVM IR, CUDA source)."""
        self._write(f"{index + 1:03d}_{stage.name}.txt", stage.text(after))


# ---- verification ----------------------------------------------------------------------------
def _snapshot(graph: Graph) -> tuple[str, dict[str, int]]:
    # The text catches changed nodes, names and small constants; array identities catch a
    # swapped weight. Arrays are read-only, so identity is enough for their contents.
    return print_graph(graph), {k: id(v) for k, v in graph.constants.items()}


class Verify(Instrument):
    """Runs the IR verifier on the input and after every pass, and checks that no pass
    modified the graph it was given or left a writable constant."""

    def __init__(self) -> None:
        self._before: tuple[str, dict[str, int]] | None = None

    def begin(self, graph: Graph) -> None:
        """Verify the pipeline's input."""
        try:
            verify(graph)
        except VerificationError as e:
            raise VerificationError(f"input graph is invalid: {e.message}", node=e.node,
                                    op=e.op, source=e.source) from e

    def before_pass(self, pass_: Pass, graph: Graph, index: int) -> None:
        """Remember the pass's input to check it is untouched afterwards."""
        self._before = _snapshot(graph)

    def after_pass(self, pass_: Pass, before: Graph, after: Graph, result: PassResult,
                   index: int, seconds: float) -> None:
        """Verify the pass's output and that its input is unchanged."""
        if _snapshot(before) != self._before:
            raise VerificationError(f"pass {pass_.name} modified its input graph",
                                    hint="a pass must build a new Graph (graph.copy()) and "
                                         "new Nodes (node.with_(...))")
        writable = [k for k, v in after.constants.items() if v.flags.writeable]
        if writable:
            raise VerificationError(f"pass {pass_.name} left writable constants {writable}",
                                    hint="add constants with Graph.add_constant")
        try:
            verify(after)
        except VerificationError as e:
            raise VerificationError(f"after pass {pass_.name}: {e.message}", node=e.node,
                                    op=e.op, source=e.source,
                                    hint="dump the IR (DumpIR) to see what the pass made") from e


    def after_stage(self, stage, before, after, index: int, seconds: float) -> None:
        """Verify every kernel after a kernel stage (InternalError: a kiln bug)."""
        from kiln.passes.compile import KERNEL, verify_kernels

        if stage.level == KERNEL:
            verify_kernels(after)


# ---- numeric checks --------------------------------------------------------------------------
RunFn = Callable[[Graph, list[np.ndarray]], list[np.ndarray]]

EXACT_TOLERANCE = {DType.f32: 1e-5, DType.f16: 1e-3}
"""rtol = atol for exact passes, by output dtype; other dtypes must match exactly."""


@dataclass(frozen=True)
class StageDiff:
    """How far one pass moved the outputs from the previous stage (``checked`` False: the pass
    reported no change, so the stage was not run)."""

    index: int
    name: str
    max_abs_diff: float
    checked: bool


def compare_arrays(old: np.ndarray, new: np.ndarray, rtol: float, atol: float
               ) -> tuple[float, bool]:
    """The largest |new - old| and whether every element is within
    ``atol * max(1, max|old|) + rtol * |old|``. NaN and infinities must match exactly."""
    o = old.astype(np.float64)
    n = new.astype(np.float64)
    if o.size == 0:
        return 0.0, True
    same = (o == n) | (np.isnan(o) & np.isnan(n))
    diff = np.where(same, 0.0, np.nan_to_num(np.abs(n - o), nan=np.inf))
    finite = np.isfinite(o)
    scale = max(1.0, float(np.abs(o[finite]).max())) if finite.any() else 1.0
    allowed = np.where(finite, atol * scale + rtol * np.abs(np.where(finite, o, 0.0)), 0.0)
    return float(diff.max()), bool(np.all(diff <= allowed))


class NumericCheck(Instrument):
    """Runs every stage on fixed inputs and compares its outputs with the previous stage's.

    ``run(graph, inputs) -> outputs`` executes a graph (the caller passes the reference
    backend; passes do not depend on backends). Exact passes must stay within ``rtol``/``atol``
    (default: ``EXACT_TOLERANCE`` for the output's dtype), lossy passes within their stated
    ``error_budget``. A pass over its tolerance raises NumericsError naming it; ``stages``
    keeps every pass's largest difference for the debugger.
    """

    def __init__(self, run: RunFn, inputs: Sequence[np.ndarray], rtol: float | None = None,
                 atol: float | None = None) -> None:
        self.run = run
        self.inputs = [np.asarray(a) for a in inputs]
        self.rtol = rtol
        self.atol = atol
        self.stages: list[StageDiff] = []
        self._previous: list[np.ndarray] = []

    def begin(self, graph: Graph) -> None:
        """Run the input graph to get the first stage's outputs."""
        self.stages = []
        self._previous = list(self.run(graph, list(self.inputs)))

    def _tolerance(self, pass_: Pass, dtype: np.dtype) -> tuple[float, float]:
        if pass_.numerics == LOSSY:
            return pass_.error_budget.rtol, pass_.error_budget.atol
        default = EXACT_TOLERANCE.get(DType.from_numpy(dtype), 0.0)
        return (self.rtol if self.rtol is not None else default,
                self.atol if self.atol is not None else default)

    def after_pass(self, pass_: Pass, before: Graph, after: Graph, result: PassResult,
                   index: int, seconds: float) -> None:
        """Run the pass's output and compare with the previous stage."""
        if not result.changed:
            self.stages.append(StageDiff(index, pass_.name, 0.0, False))
            return
        outputs = list(self.run(after, list(self.inputs)))
        if len(outputs) != len(self._previous):
            raise NumericsError(f"pass {pass_.name} changed the number of outputs from "
                                f"{len(self._previous)} to {len(outputs)}")
        for k, (old, new) in enumerate(zip(self._previous, outputs)):
            if old.shape != new.shape or old.dtype != new.dtype:
                raise NumericsError(f"pass {pass_.name} changed output {k} from "
                                    f"{old.dtype}{list(old.shape)} to {new.dtype}"
                                    f"{list(new.shape)}", node=after.outputs[k])
        self._compare(index, f"pass {pass_.name} ({pass_.numerics})", pass_.name, outputs,
                      lambda dtype: self._tolerance(pass_, dtype), after.outputs,
                      "compare the IR before and after this pass (DumpIR)")

    def _compare(self, index: int, what: str, name: str, outputs: list[np.ndarray],
                 tolerance: Callable[[np.dtype], tuple[float, float]], names: Sequence[str],
                 hint: str) -> None:
        """Compare ``outputs`` with the previous stage's; record the stage, or raise
        NumericsError for the first output over its tolerance."""
        worst = 0.0
        for k, (old, new) in enumerate(zip(self._previous, outputs)):
            rtol, atol = tolerance(old.dtype)
            diff, ok = compare_arrays(old, new, rtol, atol)
            worst = max(worst, diff)
            if not ok:
                self.stages.append(StageDiff(index, name, worst, True))
                raise NumericsError(
                    f"{what} moved output {k} by up to {diff:.3g}, over its tolerance "
                    f"rtol={rtol:g}, atol={atol:g} x max(1, max|output|)", node=names[k],
                    hint=hint)
        self.stages.append(StageDiff(index, name, worst, True))
        self._previous = outputs

    def after_stage(self, stage, before, after, index: int, seconds: float) -> None:
        """After a kernel stage, run its kernels on the kernel-IR interpreter (only when every
        kernel is small: the interpreter walks the loops in Python) and compare with the
        previous stage's outputs at KERNEL_TOLERANCE (kernels reassociate sums: vector lanes,
        blocked reductions). Other stages, and kernels too large, are recorded unchecked."""
        from kiln.passes.compile import KERNEL
        from kiln.passes.lower import run_lowered

        steps = after.lowered.steps if after.lowered is not None else []
        small = sum(max(s.kernel.flops, sum(b.size for b in s.kernel.params))
                    for s in steps) <= KERNEL_CHECK_LIMIT
        if stage.level != KERNEL or not steps or not small:
            self.stages.append(StageDiff(index, stage.name, 0.0, False))
            return
        outputs = run_lowered(after.lowered, list(self.inputs))
        self._compare(index, f"stage {stage.name}", stage.name, outputs,
                      lambda dtype: (KERNEL_TOLERANCE, KERNEL_TOLERANCE), after.graph.outputs,
                      "compare the kernel IR before and after this stage (DumpIR), or run "
                      "kiln bisect --backend llvm")


KERNEL_TOLERANCE = 1e-4
"""rtol = atol (x max(1, max|output|)) of a kernel stage against the previous stage."""

KERNEL_CHECK_LIMIT = 2_000_000
"""Work (loop iterations or buffer elements, summed over kernels) above which NumericCheck
leaves a kernel stage unchecked rather than interpret it."""
