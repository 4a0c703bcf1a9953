"""``kiln trace``: per-stage IR and diff files, the stage table, and the HTML report."""

from __future__ import annotations

import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kiln.debug import load_model, trace
from kiln.debug.bisect import eager_outputs
from kiln.debug.cli import main
from kiln.debug.report import kernel_roots
from kiln.debug.stages import graph_after
from kiln.passes import PIPELINES
from kiln.passes.fusion import plan_fusion

O1_STAGES = ["input"] + PIPELINES["O1"]
CODE_STAGES = ["fuse", "lower", "parallel", "unroll", "vectorize", "memory_plan", "llvm_ir",
               "llvm_opt", "object"]
VOID_TAGS = {"meta", "br", "hr", "img", "input", "link"}


class StrictParser(HTMLParser):
    """Collects tag counts and fails on an end tag that closes nothing open or on tags left
    open (html.parser itself is lenient)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def parse_report(path: Path) -> StrictParser:
    parser = StrictParser()
    parser.feed(path.read_text())
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert not parser.stack, f"unclosed tags: {parser.stack}"
    return parser


@pytest.fixture(scope="module")
def resnet_trace(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet18_cifar")
    kernels: list = []
    rows = trace("resnet18_cifar", out, kernels=kernels)
    return rows, out, kernels


def check_trace(rows: list[dict], out: Path, spec: str) -> None:
    """The files, table and numbers every O1 trace through the llvm backend must have: the
    graph stages, then the stages of the pipeline to machine code."""
    assert [r["pass"] for r in rows] == O1_STAGES + CODE_STAGES
    assert [r["stage"] for r in rows] == list(range(len(rows)))
    graph_rows = rows[:len(O1_STAGES)]
    for r in rows:
        stem = f"{r['stage']:03d}_{r['pass']}"
        text = (out / f"{stem}.txt").read_text()
        assert text.startswith("graph ") == (r in graph_rows)
        assert (out / f"{stem}.diff").exists() == (r in graph_rows or r["pass"] in (
            "parallel", "unroll", "vectorize", "llvm_opt"))
        assert r["nodes"] > 0 and r["parameters"] > 0 and r["flops"] > 0 and r["bytes"] > 0
    assert "kernel k0_" in (out / f"{len(O1_STAGES) + 1:03d}_lower.txt").read_text()
    assert "define " in (out / f"{len(O1_STAGES) + 6:03d}_llvm_ir.txt").read_text()
    module, inputs, _ = load_model(spec)
    scale = max(float(abs(a).max()) for a in eager_outputs(module, inputs))
    checked = graph_rows + rows[-1:]  # the compiled model's outputs are checked at the end
    for r in checked:
        assert math.isfinite(r["max_diff"]) and r["max_diff"] / scale < 1e-4 and r["ok"]
    assert all(math.isnan(r["max_diff"]) for r in rows[len(O1_STAGES):-1])
    tsv = (out / "table.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["stage", "pass", "seconds", "nodes", "parameters", "flops",
                                  "bytes", "max_diff", "ok"]
    assert [line.split("\t")[1] for line in tsv[1:]] == O1_STAGES + CODE_STAGES
    written = [float(line.split("\t")[7]) for line in tsv[1:]]
    assert [w for w in written if math.isfinite(w)] == [r["max_diff"] for r in checked]

    report = out / "report.html"
    parser = parse_report(report)
    assert parser.counts["svg"] == len(graph_rows)
    kernels = report.read_text().count('class="stages kernels"')
    assert kernels == 1
    assert parser.counts["details"] >= len(rows)
    text = report.read_text()
    assert "Fusion legend" in text
    # Self-contained: nothing to fetch, no scripts.
    assert "<script" not in text and "<link" not in text and "src=" not in text
    assert "http://" not in text and "https://" not in text


def test_trace_mlp_through_the_cli(tmp_path, capsys):
    status = main(["trace", "mlp", "-o", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    table = out.splitlines()
    assert table[0].split()[:2] == ["#", "pass"]
    assert [line.split()[1] for line in table[1:len(O1_STAGES) + 1]] == O1_STAGES
    assert [line.split()[1] for line in table[len(O1_STAGES) + 1:len(O1_STAGES) + 10]] \
        == CODE_STAGES
    assert any("k0_fc1" in line and "linear" in line for line in table)
    assert "report.html" in out
    rows = trace("mlp", tmp_path / "api")
    check_trace(rows, tmp_path / "api", "mlp")


def test_trace_resnet18_cifar(resnet_trace):
    rows, out, _ = resnet_trace
    check_trace(rows, out, "resnet18_cifar")
    before, after = rows[3], rows[4]
    assert after["pass"] == "fold_batchnorm"
    assert after["nodes"] < before["nodes"] and after["parameters"] < before["parameters"]
    assert after["flops"] < before["flops"] and after["bytes"] < before["bytes"]


def test_trace_resnet18_cifar_reports_every_kernel(resnet_trace):
    """More than 10 stages, through fusion, lowering, scheduling and codegen; per kernel: its
    nodes, schedule, time and rates with roofline class, and a numeric check."""
    rows, out, kernels = resnet_trace
    assert len(rows) > 10
    assert len(kernels) >= 20
    for k in kernels:
        assert k["nodes"] and k["schedule"] and k["ir"].startswith("kernel ")
        assert k["ms"] > 0 and k["gflops"] > 0 and k["bound"] in ("compute", "memory")
        assert k["ok"] and k["max_diff"] < 1e-3
    convs = [k for k in kernels if k["op"] == "conv"]
    assert convs and all("vector x" in k["schedule"] for k in convs)
    assert any(k["bound"] == "compute" for k in convs)
    text = (out / "report.html").read_text()
    assert text.count("<tr class=\"ok\"><td class=\"num\">") >= len(rows) + len(kernels)
    vectorized = (out / f"{len(O1_STAGES) + 4:03d}_vectorize.diff").read_text()
    assert "+" in vectorized and "broadcast(" in vectorized


def test_fold_batchnorm_diff_removes_batch_norm(resnet_trace):
    _, out, _ = resnet_trace
    diff = (out / "004_fold_batchnorm.diff").read_text().splitlines()
    assert diff[0] == "--- 003_dce.txt" and diff[1] == "+++ 004_fold_batchnorm.txt"
    removed = [line for line in diff if line.startswith("-") and "= batch_norm(" in line]
    assert len(removed) == 20
    assert not any(line.startswith("+") and "batch_norm(" in line for line in diff)
    assert (out / "003_dce.diff").read_text() == ""  # dce changes nothing here
    assert "(no change)" in (out / "report.html").read_text()


def test_report_colours_fused_nodes_by_kernel():
    graph = graph_after("lenet5")
    plan = plan_fusion(graph)
    roots = kernel_roots(graph, plan)
    assert roots["relu1"] == ["conv1"]  # epilogue: its anchor's kernel
    assert plan.roles["flatten"] == "inline" and roots["flatten"] == ["fc1"]  # the root it feeds
    assert all(roots[n] == [n] for n, role in plan.roles.items() if role == "root")


def test_bad_model_exits_2(tmp_path, capsys):
    assert main(["trace", "no_such_model", "-o", str(tmp_path)]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    assert main(["trace", "mlp", "-o", str(tmp_path), "--pipeline", "O9"]) == 2


def test_trace_help_exits_0(capsys):
    assert main(["trace", "--help"]) == 0
    assert "report.html" in capsys.readouterr().out


def test_report_renders_in_headless_chromium(resnet_trace, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed")
    _, out, _ = resnet_trace
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,2000",
                    (out / "report.html").resolve().as_uri()],
                   capture_output=True, timeout=60, check=False)
    assert shot.exists() and shot.stat().st_size > 10_000
