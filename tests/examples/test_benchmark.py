"""The benchmark script runs end to end in --quick mode and writes sane JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "benchmark.py"


def test_quick_benchmark_writes_finite_times_and_small_errors(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--models", "mlp",
           "--skip", "torch.compile", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max rel err" in proc.stdout

    report = json.loads(out.read_text())
    assert report["peak_gflops"] > 0
    rows = {r["runtime"]: r for r in report["results"]}
    assert set(rows) == {"eager", "kiln", "onnxruntime"}
    for runtime, row in rows.items():
        assert row["model"] == "mlp" and row["batch"] == 1, row
        assert row["error"] is None, f"{runtime}: {row['error']}"
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row
        assert row["max_rel_err"] < 1e-4, row
        assert row["flops"] > 0 and row["gflops"] > 0, row
    assert rows["onnxruntime"]["ratio_to_ort"] == 1.0
    assert report["summary"]["pairs"] == 1
    matmul = report["matmul"]
    assert "kiln_error" not in matmul, matmul["kiln_error"]
    assert matmul["torch_gflops"] > 0 and matmul["kiln_gflops"] > 0
    assert matmul["kiln_max_rel_err"] < 1e-4
