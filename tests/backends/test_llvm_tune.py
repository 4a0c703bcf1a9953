"""The autotuner (backends/llvm/tune.py) and the conv algorithms it can force: every forced
algorithm computes the same numbers, choices land in the tuning database and come back from
it, and a damaged database is ignored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kiln
from kiln.backends.llvm import compile_graph
from kiln.backends.llvm.compiler import default_target
from kiln.backends.llvm.tune import TuningDatabase, machine_key, tune_graph
from kiln.backends.reference import run_graph
from kiln.ir import GraphBuilder, TensorType
from kiln.passes.lower.conv import conv_signature
from kiln.passes.tuning import CONV_ALGORITHMS, Tuning

CONVS = {  # (input shape, weight shape, attrs)
    "3x3_pad_batch2": ((2, 16, 10, 12), (24, 16, 3, 3), {"padding": 1}),
    "3x3_stride2": ((1, 8, 13, 11), (16, 8, 3, 3), {"padding": 1, "stride": 2}),
    "1x1": ((3, 32, 6, 6), (40, 32, 1, 1), {}),
    "5x5_dilated": ((1, 4, 15, 15), (8, 4, 3, 3), {"padding": 2, "dilation": 2}),
}


def conv_graph(case: str):
    xs, ws, attrs = CONVS[case]
    rng = np.random.default_rng(0)
    b = GraphBuilder(case)
    x = b.input("x", TensorType(xs))
    w = b.constant(rng.standard_normal(ws).astype(np.float32), "w")
    bias = b.constant(rng.standard_normal(ws[0]).astype(np.float32), "b")
    b.output(b.op("relu", [b.op("conv", [x, w, bias], attrs, name="conv")]))
    return b.build(), rng.standard_normal(xs).astype(np.float32)


@pytest.mark.parametrize("alg", CONV_ALGORITHMS)
@pytest.mark.parametrize("case", sorted(CONVS))
def test_every_forced_algorithm_matches_the_reference(case: str, alg: str) -> None:
    """The tuner may force any algorithm that fits a convolution, also outside the default
    thresholds: each must compute the convolution (or lowering must fall back)."""
    g, x = conv_graph(case)
    node = next(n for n in g.nodes if n.op == "conv")
    sig = conv_signature(node, g.types["x"].shape, g.constants[node.inputs[1]])
    prog = compile_graph(g, cache=False, tuning=Tuning().with_conv_algorithms({sig: alg}))
    want = run_graph(g, [x])[0]
    np.testing.assert_allclose(prog([x])[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    taken = prog.image.steps[0]["schedule"]
    assert taken in CONV_ALGORITHMS
    if taken != alg:  # it did not fit: lowering took its default
        default = compile_graph(g, cache=False).image.steps[0]["schedule"]
        assert taken == default


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tune_measures_then_reuses_the_database(tmp_path: Path, monkeypatch) -> None:
    db_path = tmp_path / "tuning.json"
    monkeypatch.setenv("KILN_TUNING_DB", str(db_path))
    model, x = Net().eval(), torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        want = model(x).numpy()
    tuned = kiln.compile(model, (x,), tune={"progress": False, "budget_s": 30})
    report = tuned.tuning
    assert report.measured >= 2 and report.from_database == 0
    # b and c share a signature: one line for both.
    assert sorted(len(k.layers) for k in report.kernels) == [1, 2]
    for k in report.kernels:
        assert k.choice in CONV_ALGORITHMS and k.default in k.ms and k.why
    assert "tuned 2 convolutions" in report.table()
    np.testing.assert_allclose(tuned(x).numpy(), want, rtol=1e-4, atol=1e-4)
    saved = json.loads(db_path.read_text())
    (machine,) = saved["machines"]
    assert machine == machine_key(default_target(), default_target().cores, Tuning())
    assert {e["choice"] for e in saved["machines"][machine].values()} <= set(CONV_ALGORITHMS)

    again = kiln.compile(model, (x,), tune={"progress": False})
    assert again.tuning.measured == 0 and again.tuning.from_database == 2
    assert [k.choice for k in again.tuning.kernels] == [k.choice for k in report.kernels]
    np.testing.assert_allclose(again(x).numpy(), want, rtol=1e-4, atol=1e-4)


def test_damaged_or_foreign_database_is_ignored(tmp_path: Path) -> None:
    g, _ = conv_graph("3x3_pad_batch2")
    path = tmp_path / "tuning.json"
    for text in ("not json", "[]", json.dumps({"format": 99, "machines": {}}),
                 json.dumps({"format": 1, "machines": {"m": {"s": {"choice": "magic"}}}})):
        path.write_text(text)
        db = TuningDatabase(path)
        assert db.entries in ({}, {"m": {}})
    path.write_text("not json")
    tuning, report = tune_graph(g, default_target(), Tuning(), progress=False,
                                database=TuningDatabase(path), budget_s=20)
    assert report.from_database == 0 and len(report.kernels) == 1
    assert json.loads(path.read_text())["format"] == 1   # replaced by a good one


def test_winograd_switch_and_bad_tune_options() -> None:
    model, x = Net().eval(), torch.randn(2, 8, 12, 12)
    direct = kiln.compile(model, (x,), winograd=False)
    assert all(s["schedule"] != "winograd" for s in direct.executable.program.image.steps)
    for bad in ({"budget_s": 0}, {"budget_s": "60"}, {"rounds": 3}, "yes"):
        with pytest.raises(kiln.KilnError, match="tune"):
            kiln.compile(model, (x,), tune=bad)
    with pytest.raises(kiln.KilnError, match="llvm"):
        kiln.compile(model, (x,), backend="reference", tune=True)
    with pytest.raises(kiln.KilnError, match="llvm"):
        kiln.compile(model, (x,), backend="reference", winograd=False)
