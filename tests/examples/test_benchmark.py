"""The benchmark script runs end to end in --quick mode and writes sane JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_half_precision_benchmark_runs_kiln_and_eager_in_float16(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--models", "mlp", "--dtype", "float16",
           "--skip", "torch.compile", "onnxruntime", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["machine"]["dtype"] == "float16"
    rows = {r["runtime"]: r for r in report["results"]}
    assert set(rows) == {"eager", "kiln"}
    assert rows["kiln"]["error"] is None, rows["kiln"]["error"]
    # Both in f16: kiln (f32 inside its kernels) against eager's f16 run.
    assert 0 < rows["kiln"]["max_rel_err"] < 5e-3


def test_cuda_benchmark_without_a_gpu_says_what_it_needs() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("PyTorch sees a GPU here, so there is no refusal to check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--backend", "cuda", "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "torch.cuda.is_available() is False" in proc.stderr
    assert "CUDA build of torch" in proc.stderr


def test_avx2_target_under_load_reports_both_kiln_thread_counts(tmp_path: Path) -> None:
    """--target avx2 compiles kiln for AVX2 and limits PyTorch to it; --load runs the table
    beside busy processes and times kiln on one thread too."""
    from kiln.backends.llvm.compiler import host_target

    if not host_target().has("avx2"):
        pytest.skip("the host cannot run AVX2 code")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--models", "mlp", "--target", "avx2",
           "--load", "1", "--skip", "torch.compile", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "under load (1 busy processes)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["machine"]["target"] == "avx2" and report["machine"]["load_processes"] == 1
    assert report["machine"]["kiln_target"] == "avx2 (haswell)"
    rows = {r["runtime"]: r for r in report["results"]}
    assert set(rows) == {"eager", "kiln", "kiln 1 thread", "onnxruntime"}
    for row in rows.values():
        assert row["error"] is None and row["max_rel_err"] < 1e-4, row


def test_dynamic_benchmark_prints_a_ratio_per_batch() -> None:
    cmd = [sys.executable, str(SCRIPT), "--dynamic", "--models", "mlp", "--batches", "1", "3",
           "--repeat", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("mlp ")]
    assert [int(r[1]) for r in rows] == [1, 3]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
