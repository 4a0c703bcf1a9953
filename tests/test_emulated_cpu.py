"""Tests that need another CPU, run on one: a subset of the suite in a child process under
QEMU's Haswell (AVX2 + FMA, no AVX-512, no VNNI: most AMD Zen 1-3 and older Intel servers),
where LLVM, PyTorch, NumPy and ONNX Runtime all see that CPU.

What only such a CPU shows: ONNX Runtime's int8 kernels without VNNI (they saturate pairs of
u8 x s8 products at 16 bits, so kiln's exported int8 models must keep their weights within
+-64 there), kiln's own AVX2 code paths chosen from the host (not forced), and a sample of the
random graphs through them. Slow (QEMU runs code 10-50x slower): marked ``emulated``, skipped
where ``qemu-x86_64`` (Debian: qemu-user) is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

QEMU = shutil.which("qemu-x86_64")
ROOT = Path(__file__).resolve().parents[1]

SUBSET = [
    "tests/interop/test_onnx_export.py::test_wide_int8_weights_warn_on_export",
    *(f"tests/interop/test_onnx_export.py::test_quantized_anchor_matches_reference_in_qdq_form"
      f"[{case}]" for case in ("qconv_f32_relu", "qconv_u8", "qlinear_f32", "qlinear_u8_relu")),
    *(f"tests/interop/test_onnx_export.py::test_int8_zoo_model_matches_kiln_in_onnx_runtime"
      f"[{name}]" for name in ("lenet5", "mlp", "gpt2_block")),
    "tests/backends/test_llvm_quant.py",
    *(f"tests/test_random_graphs.py::test_llvm_backend_agrees_with_reference[{seed}]"
      for seed in (0, 7, 13, 42, 77, 101, 131, 150, 199, 229, 250, 299)),
]


@pytest.mark.emulated
@pytest.mark.skipif(QEMU is None, reason="needs qemu-x86_64 (Debian: qemu-user)")
def test_int8_and_random_graphs_pass_as_an_avx2_cpu(tmp_path: Path) -> None:
    env = dict(os.environ, KILN_CACHE_DIR=str(tmp_path / "cache"),
               KILN_TUNING_DB=str(tmp_path / "tuning.json"))
    env.pop("KILN_TARGET", None)
    cmd = [QEMU, "-cpu", "Haswell-noTSX", sys.executable, "-m", "pytest", "-q", "-p",
           "no:xdist", "-p", "no:cacheprovider", *SUBSET]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=1500)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail
