"""Stride-2 vector loads (depthwise and pooling at stride 2, ``x[::2]``) read two vectors, the
second masked, and keep the even elements: they never touch memory past the last element
they use. Checked with the input placed right before an unreadable page."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import kiln

GUARDED = textwrap.dedent("""
    import ctypes, mmap, sys

    import numpy as np
    import torch

    import kiln

    class EveryOther(torch.nn.Module):
        def forward(self, x):
            return x[::2] * 2.0

    n = int(sys.argv[1])
    x = torch.randn(n)
    compiled = kiln.compile(EveryOther().eval(), (x,), backend="llvm")
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + page, page, 0) == 0  # the page after x: no access
    arr = np.frombuffer(buf, np.float32, count=n, offset=page - 4 * n)  # x ends at the page end
    arr[:] = x.numpy()
    got = compiled.executable.program.run([arr])[0]
    assert np.array_equal(got, x.numpy()[::2] * 2), "wrong values"
    print("OK")
""")


@pytest.mark.parametrize("n", [63, 31, 47])  # the last vector load of x[::2] ends at x's end
def test_stride2_loads_stay_inside_the_input(n: int) -> None:
    proc = subprocess.run([sys.executable, "-c", GUARDED, str(n)], capture_output=True,
                          text=True, timeout=300)
    # A read past x's last element hits the protected page: the child dies of SIGSEGV.
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", (proc.returncode,
                                                                  proc.stderr[-2000:])


def test_stride2_loads_are_a_masked_pair() -> None:
    from kiln.backends.llvm.compiler import build_image, default_target

    model = nn.Conv2d(32, 32, 3, 2, 1, groups=32).eval()
    x = torch.randn(1, 32, 40, 40)
    compiled = kiln.compile(model, (x,), backend="llvm")
    ir = build_image(compiled.graph, default_target())[2]
    assert "@llvm.masked.load." in ir and "shufflevector" in ir
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
