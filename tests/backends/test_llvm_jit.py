"""The JIT links wherever the OS maps memory: object code reaches other sections and library
functions through 64-bit addresses only (the large code model). With 32-bit offsets, LLVM's
linker aborts the whole process when the JIT's sections or libgomp land more than 2 GB apart,
as they did under QEMU; the emulated test compiles and runs a model as an AVX2 CPU would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kiln
from kiln.backends.llvm import compile_graph
from kiln.zoo import get_model

# Relocations that hold a 32-bit offset: the ones that break when targets are far apart.
NEAR = ("R_X86_64_PC32", "R_X86_64_PLT32", "R_X86_64_GOTPCREL", "R_X86_64_GOTPCRELX",
        "R_X86_64_REX_GOTPCRELX", "R_X86_64_32", "R_X86_64_32S")


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_object_code_has_no_32_bit_relocations(tmp_path: Path) -> None:
    model, inputs = get_model("lenet5")
    graph = kiln.compile(model, inputs, backend="reference").graph
    obj = tmp_path / "model.o"
    obj.write_bytes(compile_graph(graph, cache=False).image.object_code)
    listing = subprocess.run(["readelf", "-rW", str(obj)], capture_output=True, text=True,
                             check=True).stdout
    kinds = {line.split()[2] for line in listing.splitlines()
             if len(line.split()) > 2 and line.split()[2].startswith("R_X86_64")}
    assert kinds, listing          # the model calls libgomp and reads its constants
    assert not kinds & set(NEAR), sorted(kinds & set(NEAR))


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.emulated
@pytest.mark.skipif(QEMU is None, reason="needs qemu-x86_64 (Debian: qemu-user)")
def test_compile_and_run_as_an_avx2_cpu(tmp_path: Path) -> None:
    """LeNet-5 compiled and run under QEMU's Haswell (AVX2, FMA, no AVX-512, no VNNI): LLVM,
    PyTorch and NumPy all see that CPU. Before the large code model this aborted."""
    script = ("import kiln, torch\n"
              "from kiln.zoo import get_model\n"
              "from kiln.backends.llvm.compiler import host_target\n"
              "m, x = get_model('lenet5')\n"
              "c = kiln.compile(m, x)\n"
              "assert host_target().f32_lanes == 8, host_target()\n"
              "err = float((c(*x) - m(*x)).abs().max())\n"
              "assert err < 1e-4, err\n"
              "print('ok', err)\n")
    env = dict(os.environ, KILN_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("KILN_TARGET", None)
    done = subprocess.run([QEMU, "-cpu", "Haswell-noTSX", sys.executable, "-c", script],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
