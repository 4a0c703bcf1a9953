"""The CUDA backend outside the simulator: PTX from numba's real CUDA compiler (needs the CUDA
toolkit's libNVVM, not a GPU) and a run on a real NVIDIA GPU. Each skips, with the reason, where
its requirement is missing.

This process runs numba's CUDA simulator (see conftest.py), so both happen in a child process
started without NUMBA_ENABLE_CUDASIM; the child reports SKIP when what it needs is missing.
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
    import copy
    import os
    import tempfile

    import numpy as np
    import torch

    import kiln
    from kiln.zoo import ZOO, get_model

    for name in sorted(ZOO):
        model, inputs = get_model(name, batch=2)
        compiled = kiln.compile(model, inputs, backend="cuda")
        with torch.no_grad():
            expected = model(*inputs)
        got = compiled(*inputs)
        err = (got - expected).abs().max().item() / expected.abs().max().item()
        assert err <= 1e-4, (name, err)
        # Half precision (f16 tensors, f32 arithmetic inside kiln's kernels) against the
        # float32 model: about one f16 rounding of the output.
        half_model = copy.deepcopy(model).half()
        half_inputs = [x.half() if x.is_floating_point() else x for x in inputs]
        half = kiln.compile(half_model, half_inputs, backend="cuda")(*half_inputs)
        half_err = (half.float() - expected).abs().max().item() / expected.abs().max().item()
        assert half.dtype == torch.float16 and half_err <= 5e-3, (name, half_err)
        if torch.cuda.is_available():
            # The same model in eager PyTorch on this GPU.
            with torch.no_grad():
                on_gpu = copy.deepcopy(model).cuda()(*[x.cuda() for x in inputs]).cpu()
            gpu_err = (got - on_gpu).abs().max().item() / on_gpu.abs().max().item()
            assert gpu_err <= 1e-4, (name, "vs eager CUDA", gpu_err)
            # Device tensors in, device arrays out (no copy through the host).
            program = compiled.executable.program
            (out,) = program.run(*[x.cuda() for x in inputs])
            np.testing.assert_allclose(out.copy_to_host(), expected.numpy(), rtol=1e-4,
                                       atol=1e-4 * float(expected.abs().max()))
            # Through kiln.compile's model: CUDA tensors in, CUDA tensors out.
            got_cuda = compiled(*[x.cuda() for x in inputs])
            assert got_cuda.is_cuda, name
            torch.testing.assert_close(got_cuda.cpu(), expected, rtol=1e-4,
                                       atol=1e-4 * float(expected.abs().max()))
        # The same model as a CUDA artifact (PTX), loaded back and run: kiln.export and
        # kiln.load dispatch on the backend and on the artifact's kind.
        path = os.path.join(tempfile.mkdtemp(), name + ".kiln")
        kiln.export(compiled, path)
        loaded = kiln.load(path)
        assert type(loaded).__name__ == "CudaArtifactModel", type(loaded)
        np.testing.assert_allclose(loaded(*[x.numpy() for x in inputs]), expected.numpy(),
                                   rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        print(name, "ok", compiled.profile(*inputs, repeat=3)[0])
    print("OK")
""")


PTX_SCRIPT = textwrap.dedent(r"""
    import sys

    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():
        print("SKIP: numba finds no libNVVM (the CUDA toolkit's compiler library)")
        raise SystemExit(0)
    sys.path.insert(0, sys.argv[1])
    import test_cuda_codegen
    import test_cuda_ops

    from kiln.backends.cuda import compile_graph_ptx
    from kiln.backends.cuda.codegen import render_kernel
    from kiln.backends.cuda.device import source_ptx

    count = 0
    for name in test_cuda_ops.LIVE:
        op, operands, attrs, consts = test_cuda_ops.CASES[name]
        graph, _ = test_cuda_ops.one_op_graph(op, operands, attrs, consts)
        ptx = compile_graph_ptx(graph, cc=(8, 0))
        assert all(".entry" in text for text in ptx.values()), name
        count += len(ptx)
    kernel = test_cuda_codegen.all_constructs_kernel()
    assert source_ptx(render_kernel(kernel).text, kernel.name, (7, 5))
    # The prepared launches (backends/cuda/launcher.py) pass every buffer as numba's array
    # ABI: 7 eight-byte fields. The compiled entries must take exactly that.
    import re

    from kiln.backends.cuda.device import ptx_entry
    from kiln.backends.cuda.launcher import ARRAY_ABI_FIELDS
    from kiln.backends.cuda.schedule import GPU_TUNING, render_scheduled
    from kiln.passes.lower import lower_graph

    graph, _ = test_cuda_ops.one_op_graph(*test_cuda_ops.CASES["softmax_last"])
    for step in lower_graph(graph).steps:
        src = render_scheduled(step.kernel, GPU_TUNING)
        ptx = source_ptx(src.text, step.kernel.name, (9, 0))
        for launch in src.launches:
            text = ptx[launch.name]
            entry = ptx_entry(text, launch.name)
            signature = text[text.index(entry):text.index(")", text.index(entry))]
            params = re.findall(r"\.param\s+\.(\w+)", signature)
            assert params == ["u64"] * (ARRAY_ABI_FIELDS * len(launch.params)), params
    print("OK", count)
""")


def _child(script: str, *args: str) -> tuple[int, str, str]:
    """Run ``script`` in a Python without the simulator; (return code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=900)
    return proc.returncode, proc.stdout.strip(), proc.stderr


def test_every_op_compiles_to_ptx_with_numbas_cuda_compiler():
    """The simulator runs the kernels as Python; this proves numba's CUDA compiler types and
    compiles every one of them (every op case, every kernel-IR construct) for a real device."""
    code, out, err = _child(PTX_SCRIPT, str(Path(__file__).parent))
    if code == 0 and out.startswith("SKIP"):
        pytest.skip(out.removeprefix("SKIP: "))
    assert code == 0 and out.startswith("OK"), f"{out}\n{err[-4000:]}"


def _nvidia_driver_present() -> bool:
    return ctypes.util.find_library("cuda") is not None or any(Path("/dev").glob("nvidia[0-9]*"))


def test_zoo_models_on_a_real_gpu():
    if not _nvidia_driver_present():
        pytest.skip("no NVIDIA driver on this machine (no libcuda, no /dev/nvidia*)")
    code, out, err = _child(GPU_SCRIPT)
    if code == 0 and out.startswith("SKIP"):
        pytest.skip(out.removeprefix("SKIP: "))
    assert code == 0 and out.endswith("OK"), f"{out}\n{err[-4000:]}"
