"""The CUDA backend on a real NVIDIA GPU: skipped (with the reason) where there is none.

This process runs numba's CUDA simulator (see conftest.py), so the GPU run happens in a child
process started without NUMBA_ENABLE_CUDASIM; it reports SKIP when numba finds no usable GPU.
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GPU_SCRIPT = textwrap.dedent("""
    import numba.cuda

    if not numba.cuda.is_available():
        print("SKIP: numba.cuda.is_available() is False (no usable GPU or driver)")
        raise SystemExit(0)
    import numpy as np
    import torch

    import kiln
    from kiln.examples.models import get_model

    for name in ["mlp", "lenet5", "resnet18_cifar", "gpt2_block"]:
        model, inputs = get_model(name, batch=2)
        compiled = kiln.compile(model, inputs, backend="cuda")
        with torch.no_grad():
            expected = model(*inputs)
        got = compiled(*inputs)
        err = (got - expected).abs().max().item() / expected.abs().max().item()
        assert err <= 1e-4, (name, err)
        if torch.cuda.is_available():
            # Device tensors in, device arrays out (no copy through the host).
            program = compiled.executable.program
            (out,) = program.run(*[x.cuda() for x in inputs])
            np.testing.assert_allclose(out.copy_to_host(), expected.numpy(), rtol=1e-4,
                                       atol=1e-4 * float(expected.abs().max()))
        print(name, "ok", compiled.profile(*inputs, repeat=3)[0])
    print("OK")
""")


def _nvidia_driver_present() -> bool:
    return ctypes.util.find_library("cuda") is not None or any(Path("/dev").glob("nvidia[0-9]*"))


def test_zoo_models_on_a_real_gpu():
    if not _nvidia_driver_present():
        pytest.skip("no NVIDIA driver on this machine (no libcuda, no /dev/nvidia*)")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", GPU_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout.strip()
    if proc.returncode == 0 and out.startswith("SKIP"):
        pytest.skip(out.removeprefix("SKIP: "))
    assert proc.returncode == 0 and out.endswith("OK"), f"{out}\n{proc.stderr[-4000:]}"
