"""The HTML report of ``kiln trace``: one self-contained page (inline CSS and SVG, no scripts,
nothing fetched) with the stage table and, per stage, a picture of the graph coloured by fused
kernel plus the stage's IR diff.

The picture is laid out top to bottom by topological depth: graph inputs on the first level,
each node one level below its deepest non-constant operand, the nodes of one level side by side
(wrapped onto more rows when a level is wider than ``MAX_ROW_WIDTH``). Constants are not drawn.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.ir import Graph
from kiln.passes.fusion import FusionPlan, plan_fusion

CHAR_WIDTH = 6.7
"""Approximate advance of one character of the 11px monospace label font, in SVG units."""
BOX_HEIGHT = 24
ROW_GAP = 26
BOX_GAP = 14
MARGIN = 16
MAX_LABEL = 48
"""Labels longer than this are cut with an ellipsis; the box's tooltip has the full text."""
MAX_ROW_WIDTH = 1400
"""A level wider than this wraps onto another row."""
MAX_DISPLAY_WIDTH = 1150
"""The picture's displayed width at most; the viewBox lets the browser scale it down."""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table.stages { border-collapse: collapse; font-size: 13px; }
table.stages th, table.stages td { border: 1px solid #ccc; padding: 3px 8px; }
table.stages td.num { text-align: right; font-family: monospace; }
table.stages tr.bad td { background: #fdd; }
details { margin: 0.8em 0; border: 1px solid #ddd; border-radius: 4px; padding: 0.3em 0.8em; }
summary { cursor: pointer; font-weight: 600; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; margin: 0.5em 0; }
.legend span.sw { display: inline-block; width: 12px; height: 12px; vertical-align: middle;
  margin-right: 4px; border: 1px solid #555; }
.legend span.dash { border-style: dashed; }
.legend span.thick { border-width: 2px; }
.legend span.out { border: 3px double #000; }
.legend span.in { border-radius: 6px; background: #fff; }
pre.diff { font-size: 12px; background: #fafafa; padding: 0.5em; overflow-x: auto; }
pre.diff .add { color: #075e07; background: #e6ffe6; }
pre.diff .del { color: #a30d0d; background: #ffe8e8; }
pre.diff .hunk { color: #5a2ca0; }
pre.diff .hdr { color: #666; font-weight: 600; }
svg text { font-family: monospace; font-size: 11px; }
"""


@dataclass(frozen=True)
class Stage:
    """One stage of a trace: its number, the pass that made it (``input`` for stage 0), its
    graph and the unified diff of its IR text against the previous stage's."""

    index: int
    name: str
    graph: Graph
    diff: str


def kernel_roots(graph: Graph, plan: FusionPlan) -> dict[str, list[str]]:
    """For each node, the root node(s) whose kernel computes it: a root itself, an epilogue
    its anchor, an inline node the kernels of the nodes it feeds (it is recomputed in each;
    empty for an inline node nothing reads)."""
    roots: dict[str, list[str]] = {}
    for root, chain in plan.epilogues.items():
        roots[root] = [root]
        for node in chain:
            roots[node.name] = [root]
    users = graph.users()
    for node in reversed(graph.nodes):
        if node.name in roots:
            continue
        fed = [r for out in node.outputs for user in users.get(out, [])
               for r in roots.get(user.name, [])]
        roots[node.name] = list(dict.fromkeys(fed))
    return roots


def _colour(k: int) -> tuple[str, str]:
    """Fill and outline colours of kernel ``k``: hues a golden angle apart."""
    hue = (k * 137.508) % 360
    return f"hsl({hue:.0f},70%,80%)", f"hsl({hue:.0f},60%,32%)"


@dataclass(frozen=True)
class _Box:
    name: str
    label: str
    tooltip: str
    x: float
    y: float
    width: float


def _label(text: str) -> str:
    return text if len(text) <= MAX_LABEL else text[:MAX_LABEL - 1] + "\u2026"


def _layout(graph: Graph, plan: FusionPlan, roots: dict[str, list[str]]
            ) -> tuple[dict[str, _Box], float, float]:
    """Place graph inputs and nodes by depth; returns the boxes by value name (inputs) or node
    name, and the picture's width and height."""
    depth: dict[str, int] = {}
    items: list[tuple[str, str, str, int]] = []  # (box name, label, tooltip, depth)
    for value in graph.inputs:
        depth[value] = 0
        items.append((value, f"{value}: input {graph.types[value]}",
                      f"graph input %{value}: {graph.types[value]}", 0))
    for node in graph.nodes:
        level = 1 + max((depth[v] for v in node.inputs if v in depth), default=-1)
        for out in node.outputs:
            depth[out] = level
        shape = ", ".join(str(graph.types[o]) for o in node.outputs)
        kernel = ", ".join(roots[node.name]) or "none"
        tooltip = (f"%{node.name} = {node.op}({', '.join('%' + v for v in node.inputs)})\n"
                   f"{shape}\nrole: {plan.roles[node.name]} ({plan.reasons[node.name]})\n"
                   f"kernel: {kernel}")
        items.append((node.name, f"{node.name}: {node.op} {shape}", tooltip, level))

    levels: dict[int, list[tuple[str, str, str, float]]] = {}
    for name, label, tooltip, level in items:
        text = _label(label)
        levels.setdefault(level, []).append((name, text, tooltip, len(text) * CHAR_WIDTH + 12))
    rows: list[list[tuple[str, str, str, float]]] = []
    for level in sorted(levels):
        row: list[tuple[str, str, str, float]] = []
        for entry in levels[level]:
            if row and sum(e[3] + BOX_GAP for e in row) + entry[3] > MAX_ROW_WIDTH:
                rows.append(row)
                row = []
            row.append(entry)
        rows.append(row)

    row_widths = [sum(e[3] for e in row) + BOX_GAP * (len(row) - 1) for row in rows]
    width = max(row_widths, default=0.0) + 2 * MARGIN
    boxes: dict[str, _Box] = {}
    for k, (row, row_width) in enumerate(zip(rows, row_widths)):
        x = (width - row_width) / 2
        y = MARGIN + k * (BOX_HEIGHT + ROW_GAP)
        for name, text, tooltip, box_width in row:
            boxes[name] = _Box(name, text, tooltip, x, y, box_width)
            x += box_width + BOX_GAP
    height = 2 * MARGIN + len(rows) * (BOX_HEIGHT + ROW_GAP) - ROW_GAP
    return boxes, width, height


def graph_svg(graph: Graph, plan: FusionPlan, colours: dict[str, tuple[str, str]],
              marker_id: str = "arrow") -> str:
    """An inline SVG picture of ``graph``: a box per node labelled ``name: op shape``, filled
    with its kernel's colour (``colours`` by root name) and outlined by role (root: thick,
    epilogue: thin, inline: dashed), graph inputs as white rounded boxes, graph outputs with a
    double outline, and an arrow per data edge (constants left out). ``marker_id`` names the
    arrowhead; it must be unique within the page."""
    roots = kernel_roots(graph, plan)
    boxes, width, height = _layout(graph, plan, roots)
    scale = min(1.0, MAX_DISPLAY_WIDTH / width) if width else 1.0
    parts = [f'<svg viewBox="0 0 {width:.0f} {height:.0f}" width="{width * scale:.0f}" '
             f'height="{height * scale:.0f}" role="img" style="max-width:100%;height:auto">',
             f'<defs><marker id="{marker_id}" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" '
             'markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#777"/>'
             '</marker></defs>']
    producer = {out: node.name for node in graph.nodes for out in node.outputs}
    producer.update({v: v for v in graph.inputs})
    for node in graph.nodes:
        dst = boxes[node.name]
        for src_name in dict.fromkeys(producer[v] for v in node.inputs if v in producer):
            src = boxes[src_name]
            x1, y1 = src.x + src.width / 2, src.y + BOX_HEIGHT
            x2, y2 = dst.x + dst.width / 2, dst.y
            bend = max(ROW_GAP, (y2 - y1) / 3)
            parts.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} '
                         f'{x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}" fill="none" '
                         f'stroke="#999" stroke-width="1" marker-end="url(#{marker_id})"/>')
    output_boxes = {producer[v] for v in graph.outputs if v in producer}
    for box in boxes.values():
        if box.name in graph.inputs:
            fill, stroke, extra = "#fff", "#000", ' rx="11" stroke-width="1.5"'
        else:
            kernel = roots[box.name]
            fill, stroke = colours[kernel[0]] if kernel else ("#eee", "#888")
            role = plan.roles[box.name]
            extra = {"root": ' stroke-width="2.5"', "epilogue": ' stroke-width="1"',
                     "inline": ' stroke-width="1.2" stroke-dasharray="4 2"'}[role]
        parts.append(f"<g><title>{html.escape(box.tooltip)}</title>")
        if box.name in output_boxes:
            parts.append(f'<rect x="{box.x - 4:.1f}" y="{box.y - 4:.1f}" '
                         f'width="{box.width + 8:.1f}" height="{BOX_HEIGHT + 8}" fill="none" '
                         'stroke="#000" stroke-width="1.5"/>')
        parts.append(f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" '
                     f'height="{BOX_HEIGHT}" fill="{fill}" stroke="{stroke}"{extra}/>')
        parts.append(f'<text x="{box.x + 6:.1f}" y="{box.y + BOX_HEIGHT / 2 + 4:.1f}">'
                     f"{html.escape(box.label)}</text></g>")
    parts.append("</svg>")
    return "\n".join(parts)


def _legend(graph: Graph, plan: FusionPlan, colours: dict[str, tuple[str, str]]) -> str:
    """The fusion legend: the outline styles, then one swatch per kernel with its ops (root and
    epilogues in store order, then the nodes inlined into it)."""
    ops = {node.name: node.op for node in graph.nodes}
    roots = kernel_roots(graph, plan)
    keys = ['<span><span class="sw in"></span>graph input</span>',
            '<span><span class="sw out"></span>graph output</span>',
            '<span><span class="sw thick"></span>root (kernel writes it)</span>',
            '<span><span class="sw"></span>epilogue (fused into the store)</span>',
            '<span><span class="sw dash"></span>inline (recomputed by its consumers)</span>']
    for root, (fill, stroke) in colours.items():
        chain = [root] + [n.name for n in plan.epilogues[root]]
        text = " \u2192 ".join(f"{name} ({ops[name]})" for name in chain)
        inlined = [n for n, role in plan.roles.items() if role == "inline" and root in roots[n]]
        if inlined:
            text += "; inlined: " + ", ".join(f"{name} ({ops[name]})" for name in inlined)
        keys.append(f'<span><span class="sw" style="background:{fill};border-color:{stroke}">'
                    f"</span>{html.escape(text)}</span>")
    return (f"<p><b>Fusion legend</b>: {len(colours)} kernels; a box's colour is the kernel "
            "that computes it (hover a box for its role and why).</p>"
            f'<div class="legend">{"".join(keys)}</div>')


def diff_html(diff: str) -> str:
    """A unified diff as an HTML ``<pre>``, each line escaped and coloured by its kind."""
    lines = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            kind = "hdr"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = ""
        text = html.escape(line)
        lines.append(f'<span class="{kind}">{text}</span>' if kind else text)
    return f'<pre class="diff">{chr(10).join(lines) or "(no change)"}</pre>'


def _table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("<tr><th>#</th><th>pass</th><th>time (s)</th><th>nodes</th><th>parameters</th>"
            "<th>FLOPs</th><th>bytes</th><th>max|diff| vs eager</th><th>within tolerance</th>"
            "</tr>")
    body = []
    for r in rows:
        cells = [str(r["stage"]), f"{r['seconds']:.4f}", str(r["nodes"]), f"{r['parameters']:,}",
                 f"{r['flops']:,}", f"{r['bytes']:,}", _number(r["max_diff"])]
        body.append(f'<tr class="{"ok" if r["ok"] else "bad"}"><td class="num">{cells[0]}</td>'
                    f"<td>{html.escape(r['pass'])}</td>"
                    + "".join(f'<td class="num">{c}</td>' for c in cells[1:])
                    + f"<td>{'yes' if r['ok'] else 'NO'}</td></tr>")
    return f'<table class="stages">{head}{"".join(body)}</table>'


def _number(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}"


MAX_LINES = 300
"""Lines of a code stage's text shown in the report (the whole text is in its .txt file)."""


def code_stage_section(index: int, name: str, level: str, text: str, diff: str) -> str:
    """A collapsible section for a stage after the graph passes: its diff against the previous
    stage where the two are comparable (kernel IR, LLVM IR), else the start of its text."""
    lines = text.splitlines()
    shown = "\n".join(lines[:MAX_LINES])
    more = (f"\n... {len(lines) - MAX_LINES} more lines in {index:03d}_{name}.txt"
            if len(lines) > MAX_LINES else "")
    body = (f"<p><b>Diff against the previous stage</b></p>\n{diff_html(diff)}" if diff else
            f'<pre class="diff">{html.escape(shown + more)}</pre>')
    return (f"<details><summary>{index:03d} {html.escape(name)} ({level}): {len(lines)} lines"
            f"</summary>\n{body}\n</details>")


def kernel_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per fused kernel: nodes, schedule, time, GFLOP/s, GB/s, roofline class and the
    numeric check; each kernel's IR in a collapsible cell."""
    head = ("<tr><th>#</th><th>kernel</th><th>op</th><th>graph nodes</th><th>schedule</th>"
            "<th>time (ms)</th><th>GFLOP/s</th><th>GB/s</th><th>bound</th>"
            "<th>max|diff| vs reference</th><th>ok</th></tr>")
    body = []
    for r in rows:
        ir = html.escape("\n".join(r["ir"].splitlines()[:MAX_LINES]))
        body.append(
            f'<tr class="{"ok" if r["ok"] else "bad"}"><td class="num">{r["index"]}</td>'
            f"<td><details><summary>{html.escape(r['kernel'])}</summary>"
            f'<pre class="diff">{ir}</pre></details></td><td>{html.escape(r["op"])}</td>'
            f"<td>{html.escape(', '.join(r['nodes']))}</td><td>{html.escape(r['schedule'])}</td>"
            f'<td class="num">{_number(r["ms"])}</td><td class="num">{_number(r["gflops"])}</td>'
            f'<td class="num">{_number(r["gbytes"])}</td><td>{r["bound"]}</td>'
            f'<td class="num">{_number(r["max_diff"])}</td>'
            f"<td>{'yes' if r['ok'] else 'NO'}</td></tr>")
    return f'<table class="stages kernels">{head}{"".join(body)}</table>'


def stage_section(stage: Stage, open_: bool = False) -> str:
    """One collapsible ``<details>`` section (expanded when ``open_``): the stage's graph
    picture, its fusion legend and its diff against the previous stage."""
    plan = plan_fusion(stage.graph)
    kernel_list = [name for name, role in plan.roles.items() if role == "root"]
    kernel_list.sort(key=[n.name for n in stage.graph.nodes].index)
    colours = {root: _colour(k) for k, root in enumerate(kernel_list)}
    summary = (f"{stage.index:03d} {html.escape(stage.name)}: {len(stage.graph.nodes)} nodes, "
               f"{len(colours)} kernels")
    return (f"<details{' open' if open_ else ''}><summary>{summary}</summary>\n"
            f"{_legend(stage.graph, plan, colours)}\n"
            f"{graph_svg(stage.graph, plan, colours, f'arrow{stage.index}')}\n"
            f"<p><b>Diff against the previous stage</b></p>\n{diff_html(stage.diff)}\n"
            "</details>")


def write_report(path: str | Path, title: str, rows: Sequence[dict[str, Any]],
                 stages: Sequence[Stage], code_sections: Sequence[str] = (),
                 kernels: Sequence[dict[str, Any]] = ()) -> None:
    """Write the self-contained HTML report of a trace: ``title``, the table of ``rows`` (see
    ``kiln.debug.trace.COLUMNS``), one section per graph stage, the sections of the stages
    after the graph passes (``code_stage_section``), then the table of ``kernels``."""
    # The final graph, what the pipeline hands to the backend, is shown expanded.
    sections = "\n".join(stage_section(s, open_=k == len(stages) - 1)
                         for k, s in enumerate(stages))
    Path(path).write_text(
        f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n{_table(rows)}\n"
        "<p>Stage 0 is the imported graph; each later stage is the graph after one pass. "
        "max|diff| is the largest difference of the stage's outputs (reference backend) from "
        "eager PyTorch on the example inputs.</p>\n"
        f"{sections}\n"
        + (f"<h2>Fusion, lowering, schedules, memory plan, code</h2>\n"
           f"{chr(10).join(code_sections)}\n" if code_sections else "")
        + (f"<h2>Kernels</h2>\n<p>Each fused kernel of the compiled model: the graph nodes it "
           "computes, the schedule chosen, its median time and rates in the whole model, its "
           "roofline class against this machine's measured peaks, and its output when run "
           "alone on the reference values of its inputs against the reference values of its "
           f"nodes.</p>\n{kernel_table(kernels)}\n" if kernels else "")
        + "</body></html>\n")
