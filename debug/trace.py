"""``kiln trace``: what every pass of a pipeline does to a model, stage by stage.

The pipeline runs one pass at a time (stage 0 is the imported graph). For each stage the trace
writes ``NNN_<pass>.txt`` (its IR text, through the PassManager's ``DumpIR`` instrument) and
``NNN_<pass>.diff`` (a unified diff against the previous stage's text; stage 0 is diffed
against nothing), and measures one table row: pass time, nodes, parameters, FLOPs, bytes moved,
and the largest difference of the stage's outputs from eager PyTorch on the example inputs
(reference backend). The table goes to ``table.tsv`` and the whole trace, with a picture of
every stage's graph and its fused kernels, to ``report.html``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.backends.reference import run_graph
from kiln.debug.bisect import combined_budget, max_violation
from kiln.debug.model_arg import load_checked
from kiln.debug.report import Stage, code_stage_section, write_report
from kiln.debug.stages import INPUT_STAGE
from kiln.debug.trace_kernels import trace_backend
from kiln.debug.trace_partition import write_partition
from kiln.ir import Graph, KilnError, get_op, node_flops, print_graph
from kiln.passes import (
    DumpIR,
    Instrument,
    Pass,
    PassManager,
    PassResult,
    Timing,
    Verify,
    get_pipeline,
)

COLUMNS = ("stage", "pass", "seconds", "nodes", "parameters", "flops", "bytes", "max_diff", "ok")
"""The keys of a trace row, in table order."""


class _StageGraphs(Instrument):
    """Keeps every stage's graph: the input, then each pass's output."""

    def __init__(self) -> None:
        self.graphs: list[Graph] = []

    def begin(self, graph: Graph) -> None:
        """Keep the imported graph as stage 0."""
        self.graphs = [graph]

    def after_pass(self, pass_: Pass, before: Graph, after: Graph, result: PassResult,
                   index: int, seconds: float) -> None:
        """Keep the pass's output."""
        self.graphs.append(after)


def graph_cost(graph: Graph) -> tuple[int, int]:
    """``(flops, bytes)`` of ``graph``: the sums of each node's op cost, every operand read and
    every result written once."""
    flops = moved = 0
    for node in graph.nodes:
        op = get_op(node.op)
        ins = [graph.types[v] for v in node.inputs]
        outs = [graph.types[v] for v in node.outputs]
        flops += node_flops(node, graph.types)
        moved += op.bytes_moved(ins, outs)
    return flops, moved


def unified_diff(before: str, after: str, before_name: str, after_name: str) -> str:
    """The unified diff (``difflib.unified_diff``) between two IR texts, as one string."""
    return "".join(difflib.unified_diff(before.splitlines(keepends=True),
                                        after.splitlines(keepends=True),
                                        fromfile=before_name, tofile=after_name))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The trace rows as an aligned text table, one line per stage."""
    cells = [["#", "pass", "time (s)", "nodes", "params", "FLOPs", "bytes", "max|diff|", "ok"]]
    for r in rows:
        cells.append([str(r["stage"]), r["pass"], f"{r['seconds']:.4f}", str(r["nodes"]),
                      f"{r['parameters']:,}", f"{r['flops']:,}", f"{r['bytes']:,}",
                      "-" if r["max_diff"] != r["max_diff"] else f"{r['max_diff']:.3g}",
                      "yes" if r["ok"] else "NO"])
    widths = [max(len(row[k]) for row in cells) for k in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) if k == 1 else c.rjust(w)
                               for k, (c, w) in enumerate(zip(row, widths))).rstrip()
                     for row in cells)


def _write_tsv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    lines = ["\t".join(COLUMNS)]
    lines += ["\t".join(repr(r[c]) if c == "max_diff" else str(r[c]) for c in COLUMNS)
              for r in rows]
    path.write_text("\n".join(lines) + "\n")


def check_output_dir(out: Path, overwrite: bool = False, flag: str = "overwrite=True") -> None:
    """A KilnError unless ``out`` can be (or is) a folder to write into: not a file, not under
    a file, in a folder this process may write to, and empty unless ``overwrite`` (``flag`` is
    how the caller spells it). Nothing is created."""
    if os.path.lexists(out) and not out.is_dir():
        raise KilnError(f"{out} exists and is not a directory",
                        hint="choose the path of a new or empty folder")
    if out.is_dir():
        if any(out.iterdir()) and not overwrite:
            raise KilnError(f"{out} already exists and is not empty",
                            hint=f"choose another folder, or pass {flag} to write into it "
                                 "(files of the same names are replaced, others kept)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise KilnError(f"cannot write into {out}: permission denied",
                            hint="choose a folder you can write to")
        return
    ancestor = out.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise KilnError(f"cannot create {out}: {ancestor} is not a directory",
                        hint="choose a path in an existing folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise KilnError(f"cannot create {out}: {ancestor} is not writable",
                        hint="choose a folder you can write to")


def trace(spec: str, out_dir: str | Path, pipeline: str = "O1", frontend: str = "fx", *,
          overwrite: bool = False, backend: str | None = "llvm",
          kernels: list[dict[str, Any]] | None = None, partition_stages: int = 0
          ) -> list[dict[str, Any]]:
    """Trace model ``spec`` (zoo name or ``file.py:factory``) through ``pipeline`` into
    ``out_dir``; returns one row per stage (keys: ``COLUMNS``).

    ``seconds`` is the pass's wall time (0 for the input stage), ``max_diff`` the largest
    |stage output - eager output|, and ``ok`` whether that is within ``kiln bisect``'s
    tolerance for the passes run so far. Writes the per-stage ``.txt``/``.diff`` files,
    ``table.tsv`` and ``report.html`` into ``out_dir``, which is created, or must be an empty
    folder unless ``overwrite`` (then the files of those names are replaced and nothing else
    in it is touched). KilnError for a bad model, pipeline, frontend or output folder.

    With ``backend="llvm"`` (the default) the trace goes on through the one pipeline to machine
    code: fusion, lowering, each schedule, the memory plan, LLVM IR, optimized LLVM IR and
    assembly each get a stage file, a row (the last row's max_diff is the compiled model's)
    and a report section, and the report gets a table of the fused kernels (schedule, time,
    GFLOP/s, roofline class, numeric check); ``kernels``, when a list, receives those rows.
    ``partition_stages`` above 0 also writes the final graph cut into that many pipeline
    stages (``stage_<i>.txt``, ``partition.txt``; see ``kiln.debug.trace_partition``).
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    passes = get_pipeline(pipeline)
    graph, arrays, expected, name = load_checked(spec, frontend=frontend)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KilnError(f"cannot create {out}: {e.strerror or e}",
                        hint="choose a folder you can write to") from e
    timing, graphs = Timing(), _StageGraphs()
    PassManager(passes, [Verify(), DumpIR(out), timing, graphs]).run(graph)

    names = [INPUT_STAGE] + [p.name for p in passes]
    seconds = [0.0] + [r.seconds for r in timing.records]
    rows: list[dict[str, Any]] = []
    stages: list[Stage] = []
    previous_text, previous_file = "", "/dev/null"
    for index, (stage_graph, stage_name) in enumerate(zip(graphs.graphs, names)):
        text = print_graph(stage_graph)
        filename = f"{index:03d}_{stage_name}"
        stage = Stage(index, stage_name, stage_graph,
                      unified_diff(previous_text, text, previous_file, f"{filename}.txt"))
        (out / f"{filename}.diff").write_text(stage.diff)
        stages.append(stage)
        previous_text, previous_file = text, f"{filename}.txt"

        diff, ok = max_violation(expected, run_graph(stage_graph, arrays),
                                 combined_budget(passes[:index]))
        flops, moved = graph_cost(stage_graph)
        rows.append({"stage": index, "pass": stage_name, "seconds": seconds[index],
                     "nodes": len(stage_graph.nodes),
                     "parameters": stage_graph.num_parameters(), "flops": flops,
                     "bytes": moved, "max_diff": diff, "ok": ok})
    code_sections: list[str] = []
    kernel_rows: list[dict[str, Any]] = []
    if backend is not None:
        code_rows, code_stages, kernel_rows = trace_backend(
            graphs.graphs[-1], arrays, expected, out, first=len(names))
        rows += code_rows
        code_sections = _code_sections(code_stages, len(names), out)
        if kernels is not None:
            kernels.extend(kernel_rows)
    _write_tsv(out / "table.tsv", rows)
    write_report(out / "report.html", f"kiln trace: {name} ({pipeline}, {frontend}"
                 f"{', ' + backend if backend else ''})", rows, stages, code_sections,
                 kernel_rows)
    write_partition(out, graphs.graphs[-1], partition_stages)
    return rows


_COMPARABLE = ({"lower", "parallel", "unroll", "vectorize"}, {"llvm_ir", "llvm_opt"})


def _code_sections(code_stages: Sequence[tuple[str, str, str]], first: int, out: Path
                   ) -> list[str]:
    """Report sections of the stages after the graph passes, and their ``.diff`` files where
    a stage's text compares with the previous one's (kernel IR, LLVM IR)."""
    sections = []
    previous = ("", "", "")
    for k, (name, level, text) in enumerate(code_stages):
        filename = f"{first + k:03d}_{name}"
        comparable = any(name in group and previous[0] in group for group in _COMPARABLE)
        diff = (unified_diff(previous[2], text, f"{first + k - 1:03d}_{previous[0]}.txt",
                             f"{filename}.txt") if comparable else "")
        if comparable:
            (out / f"{filename}.diff").write_text(diff)
        sections.append(code_stage_section(first + k, name, level, text,
                                           diff if comparable else ""))
        previous = (name, level, text)
    return sections


__all__ = ["COLUMNS", "Stage", "check_output_dir", "format_table", "graph_cost", "trace",
           "unified_diff"]
