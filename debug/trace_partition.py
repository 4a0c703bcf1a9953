"""``kiln trace --stages K``: the traced model's final graph cut into K pipeline stages, as
``kiln.pipeline`` cuts it, each stage written as its own graph.

Writes ``stage_<i>.txt`` (each stage's IR text: an ordinary kiln graph, parseable, that
compiles on its own), ``partition.txt`` (the partition report, where each cut falls, and the
cost it balanced) and, when the trace wrote ``report.html``, a section there with the same.
"""

from __future__ import annotations

import html
from pathlib import Path

from kiln.ir import Graph, print_graph
from kiln.passes.partition import Partition, partition


def describe_partition(part: Partition) -> str:
    """The partition report, then each stage's first and last node and what it sends on."""
    lines = [part.table(), ""]
    for k, (info, g) in enumerate(zip(part.stages, part.graphs)):
        first, last = (g.nodes[0].name, g.nodes[-1].name) if g.nodes else ("-", "-")
        lines.append(f"stage {k}: {info.nodes} nodes, {first} .. {last}; takes "
                     f"{', '.join('%' + v for v in g.inputs)}; sends "
                     f"{', '.join('%' + v for v in g.outputs)}")
    return "\n".join(lines) + "\n"


def write_partition(out: Path, graph: Graph, stages: int) -> Partition | None:
    """Cut ``graph`` into ``stages`` stages and write them into ``out`` (see the module
    docstring); nothing for ``stages`` 0. KilnError when the graph cannot be cut so."""
    if not stages:
        return None
    part = partition(graph, stages)
    for k, g in enumerate(part.graphs):
        (out / f"stage_{k}.txt").write_text(print_graph(g))
    text = describe_partition(part)
    (out / "partition.txt").write_text(text)
    report = out / "report.html"
    if report.exists():
        page = report.read_text()
        links = ", ".join(f'<a href="stage_{k}.txt">stage_{k}.txt</a>' for k in range(stages))
        section = (f"<h2>Pipeline stages ({stages})</h2>\n<p>The final graph cut as "
                   f"<code>kiln.pipeline(stages={stages})</code> cuts it: {links}, "
                   f'<a href="partition.txt">partition.txt</a>.</p>\n'
                   f"<pre>{html.escape(text)}</pre>\n")
        end = page.rfind("</body>")
        end = len(page) if end < 0 else end
        report.write_text(page[:end] + section + page[end:])
    return part
