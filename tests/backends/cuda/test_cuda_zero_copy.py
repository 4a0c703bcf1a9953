"""Device memory in, device memory out: ``kiln.compile(..., backend="cuda")`` models take CUDA
tensors (anything with ``__cuda_array_interface__``) without a copy through the host and give
CUDA tensors back.

This torch has no CUDA, so the simulator stands in: its device memory is host memory, and the
stand-ins below hand out ``__cuda_array_interface__`` over host arrays, as a CUDA tensor does
over GPU memory. torch's wrapping of device outputs (``torch.as_tensor(..., device="cuda")``)
is recorded rather than run; the real-GPU test (test_cuda_gpu.py) runs it for real.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.ir import KilnError
from kiln.zoo import get_model


def interface(a: np.ndarray) -> dict:
    return {"shape": tuple(a.shape), "typestr": a.dtype.str, "data": (a.ctypes.data, False),
            "strides": None, "version": 3}


class DeviceBuffer:
    """A stand-in for a device array of another library (CuPy, say): only the interface."""

    def __init__(self, a: np.ndarray) -> None:
        self.host = np.ascontiguousarray(a)

    @property
    def __cuda_array_interface__(self) -> dict:
        return interface(self.host)


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that says it is on a CUDA device and exports its memory like one."""

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def __cuda_array_interface__(self) -> dict:
        return interface(self.numpy())


@pytest.fixture(scope="module")
def mlp():
    model, (x,) = get_model("mlp", batch=1)
    compiled = kiln.compile(model, (x,), backend="cuda")
    with torch.no_grad():
        expected = model(x).numpy()
    return compiled, x, expected


def test_the_program_reads_the_interface_in_place(mlp):
    compiled, x, expected = mlp
    program = compiled.executable.program
    buf = DeviceBuffer(x.numpy().copy())
    view = program.device.as_device_array(buf)
    view[0, 0] = 7.0  # the same memory, not a copy
    assert buf.host[0, 0] == 7.0
    buf.host[0, 0] = x[0, 0]
    (out,) = program.run(buf)
    assert hasattr(out, "copy_to_host")
    np.testing.assert_allclose(out.copy_to_host(), expected, rtol=1e-5, atol=1e-5)


def test_device_arrays_in_device_arrays_out(mlp, monkeypatch):
    compiled, x, expected = mlp
    # The host path must not run: nothing is copied through NumPy on the way in.
    monkeypatch.setattr(compiled.executable, "run", None)
    out = compiled(DeviceBuffer(x.numpy()))
    assert hasattr(out, "copy_to_host") and not isinstance(out, np.ndarray)
    np.testing.assert_allclose(out.copy_to_host(), expected, rtol=1e-5, atol=1e-5)


def test_cuda_tensors_in_cuda_tensors_out(mlp, monkeypatch):
    compiled, x, expected = mlp
    wrapped = []

    def as_tensor(obj, device=None, **kw):
        wrapped.append((type(obj).__name__, device))
        return torch.from_numpy(obj.copy_to_host())

    monkeypatch.setattr(compiled.executable, "run", None)
    monkeypatch.setattr(compiled.executable, "run_checked", None)
    monkeypatch.setattr(torch, "as_tensor", as_tensor)
    out = compiled(x.clone().as_subclass(FakeCudaTensor))
    assert wrapped == [("FakeCUDAArray", "cuda")]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_device_inputs_are_checked(mlp):
    compiled, x, _ = mlp
    with pytest.raises(KilnError, match="expects"):
        compiled(DeviceBuffer(np.zeros((2, 3), np.float32)))
    with pytest.raises(KilnError, match="not contiguous"):
        compiled(_Strided(x.numpy()))


class _Strided:
    """A device buffer whose interface describes every other element."""

    def __init__(self, a: np.ndarray) -> None:
        self.host = np.repeat(a, 2, axis=-1)
        self.shape = a.shape

    @property
    def __cuda_array_interface__(self) -> dict:
        item = self.host.dtype.itemsize
        return {**interface(self.host), "shape": self.shape,
                "strides": (self.host.strides[0], 2 * item)}


def test_tensors_that_really_live_on_a_gpu_are_refused_by_the_simulator(mlp):
    compiled, x, _ = mlp

    class OnGpu(DeviceBuffer):
        device = torch.device("cuda")

    with pytest.raises(KilnError, match="simulator cannot read GPU memory"):
        compiled.executable.program.run(OnGpu(x.numpy()))
