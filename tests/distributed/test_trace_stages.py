"""``kiln trace --stages K``: the final graph's pipeline stages as their own files, each an
ordinary graph that parses back and, chained, computes the whole model; the partition report
beside them and in report.html."""

from __future__ import annotations

import numpy as np

from kiln.api import optimize
from kiln.backends.reference import run_graph
from kiln.debug.cli import main
from kiln.debug.trace_partition import write_partition
from kiln.frontend.trace import trace_module
from kiln.ir import parse_graph, verify
from kiln.zoo import get_model


def test_trace_writes_each_stage_and_the_partition(tmp_path, capsys) -> None:
    out = tmp_path / "trace"
    assert main(["trace", "lenet5", "-o", str(out), "--backend", "reference",
                 "--stages", "3"]) == 0
    capsys.readouterr()
    texts = [(out / f"stage_{k}.txt").read_text() for k in range(3)]
    assert not (out / "stage_3.txt").exists()
    model, inputs = get_model("lenet5")
    whole, _ = optimize(trace_module(model, inputs)[0], "O1")
    # Large weights are elided from the text: they come from the traced model.
    graphs = [parse_graph(t, constants=whole.constants) for t in texts]
    values = [x.numpy() for x in inputs]
    for g in graphs:
        verify(g)
        values = run_graph(g, values)
    np.testing.assert_array_equal(values[0], run_graph(whole, [x.numpy() for x in inputs])[0])
    report = (out / "partition.txt").read_text()
    assert "pred. ms" in report and "cost: predicted per node" in report
    assert "stage 2:" in report
    page = (out / "report.html").read_text()
    assert "Pipeline stages (3)" in page and 'href="stage_0.txt"' in page
    assert page.rstrip().endswith("</html>")


def test_stage_files_chain_to_the_whole_graph(tmp_path) -> None:
    model, inputs = get_model("resnet18_cifar")
    graph, _ = trace_module(model, inputs)
    graph, _ = optimize(graph, "O1")
    part = write_partition(tmp_path, graph, 2)
    assert part is not None and write_partition(tmp_path, graph, 0) is None
    values = [x.numpy() for x in inputs]
    for k, g in enumerate(part.graphs):
        values = run_graph(g, values)
        assert (tmp_path / f"stage_{k}.txt").read_text().count("\n") >= len(g.nodes)
    np.testing.assert_array_equal(values[0], run_graph(graph, [x.numpy() for x in inputs])[0])
    assert not (tmp_path / "report.html").exists()
