"""CUDA artifacts: export writes PTX with its launch table and memory plan; the loader checks
the container, every checksum and field, and refuses clearly where no GPU can run the PTX
(here: Numba's CUDA simulator).

Real PTX needs numba's CUDA compiler, which the simulator replaces, so that export runs in a
child process without NUMBA_ENABLE_CUDASIM (and skips without libNVVM). The container checks
run here on an image whose PTX is a stand-in text.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kiln.ir import GraphBuilder, KilnError, TensorType
from kiln.runtime import artifact as cpu_artifact
from kiln.runtime.artifact.cuda import (
    CudaArtifactError,
    build_cuda_image,
    export_cuda,
    load_cuda,
    read_cuda_image,
    save_cuda_image,
)

RNG = np.random.default_rng(5)
_PREFIX = struct.Struct("<8sIQ")
_LEAD = _PREFIX.size + 32   # the prefix, then the header's SHA-256


def model_graph():
    """linear + relu (a tiled GEMM on a GPU), a softmax (one block per row), a conv, and an
    input returned as it is (an output copy)."""
    b = GraphBuilder("m")
    x = b.input("x", TensorType.of(np.zeros((32, 24), np.float32)))
    img = b.input("img", TensorType.of(np.zeros((1, 3, 8, 8), np.float32)))
    h = b.op("linear", [x, b.constant(RNG.standard_normal((40, 24)).astype(np.float32), "w"),
                        b.constant(RNG.standard_normal(40).astype(np.float32), "bias")])
    h = b.op("softmax", [b.op("relu", [h])], {"axis": -1})
    c = b.op("conv", [img, b.constant(RNG.standard_normal((16, 3, 3, 3)).astype(np.float32),
                                      "cw")], {"padding": 1})
    b.output(h, c, x)
    return b.build()


def fake_ptx(text: str, label: str, cc: tuple[int, int]) -> dict[str, str]:
    """A stand-in for numba's compiler: a PTX-shaped text per kernel function."""
    return {name: (f"//\n// stand-in PTX of {label}\n//\n\n.version 8.0\n.target sm_{cc[0]}"
                   f"{cc[1]}\n.address_size 64\n\n.visible .entry _Z{name}(\n)\n{{\n\tret;\n}}\n")
            for name in re.findall(r"^def (\w+)\(", text, re.M)}


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    image = build_cuda_image(model_graph(), cc=(8, 0), compile_ptx=fake_ptx)
    return save_cuda_image(tmp_path / "m.kiln", image, kiln_version="test")


def rewrite_header(path: Path, edit, fmt: int | None = None) -> None:
    """Apply ``edit`` to the JSON manifest of the artifact at ``path`` (data unchanged), and
    write ``fmt`` as the format in the prefix when given."""
    raw = path.read_bytes()
    magic, old_fmt, n = _PREFIX.unpack_from(raw)
    header = json.loads(raw[_LEAD:_LEAD + n])
    edit(header)
    fmt = old_fmt if fmt is None else fmt
    head = json.dumps(header).encode()
    # Resealed: the header digest recomputed, as someone who edits a header would.
    path.write_bytes(_PREFIX.pack(magic, fmt, len(head)) + hashlib.sha256(head).digest()
                     + head + raw[_LEAD + n:])


def test_image_holds_launches_memory_plan_and_copies(artifact: Path):
    image, header = read_cuda_image(artifact)
    assert header["kind"] == "cuda" and header["target"] == {"compute_capability": [8, 0]}
    schedules = [lc.schedule for lc in image.launches]
    assert schedules == ["tiled-gemm", "block-reduce", "tiled-gemm"]
    gemm = image.launches[0]
    assert gemm.block == (16, 16, 1) and gemm.shared_bytes > 0
    assert {a.kind for lc in image.launches for a in lc.args} == {"arena", "const", "input",
                                                                  "output"}
    assert image.output_copies == {2: ("input", 0)}
    assert image.arena_bytes > 0 and image.const_blob.size > 0
    assert all(text.startswith("//") and ".version" in text for text in image.ptx.values())


def test_damaged_files_are_refused(artifact: Path):
    raw = bytearray(artifact.read_bytes())
    _, _, n = _PREFIX.unpack_from(raw)
    header = json.loads(raw[_LEAD:_LEAD + n])
    part = header["parts"]["ptx_" + header["launches"][0]["name"]]
    raw[_LEAD + n + part["offset"] + 40] ^= 1
    artifact.write_bytes(bytes(raw))
    with pytest.raises(CudaArtifactError, match="checksum of part ptx_"):
        read_cuda_image(artifact)
    artifact.write_bytes(bytes(raw[:100]))
    with pytest.raises(CudaArtifactError, match="header length"):
        read_cuda_image(artifact)
    artifact.write_bytes(b"NOTKILN\0" + bytes(raw[8:]))
    with pytest.raises(CudaArtifactError, match="bad magic"):
        read_cuda_image(artifact)


def test_other_versions_and_kinds_are_refused(artifact: Path, tmp_path: Path):
    newer = tmp_path / "newer.kiln"
    newer.write_bytes(artifact.read_bytes())
    rewrite_header(newer, lambda h: h.__setitem__("format", 3), fmt=3)
    with pytest.raises(CudaArtifactError, match="format 3 is not supported"):
        read_cuda_image(newer)
    cpu = tmp_path / "cpu.kiln"
    cpu.write_bytes(artifact.read_bytes())
    rewrite_header(cpu, lambda h: h.pop("kind"))
    with pytest.raises(CudaArtifactError, match="CPU artifact") as info:
        read_cuda_image(cpu)
    assert "kiln.load" in str(info.value)
    # The CPU loader points a CUDA artifact here.
    with pytest.raises(KilnError, match="CUDA artifact, not a CPU one") as info:
        cpu_artifact.read_image(artifact)
    assert "load_cuda" in str(info.value)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda h: h["launches"][0]["args"][0].__setitem__(1, 1 << 30), "lies outside"),
    (lambda h: h["launches"][1]["args"][-1].__setitem__(3, 7), "the argument f32"),
    (lambda h: h["launches"][0].__setitem__("block", [64, 32, 1]), "more than 1024 threads"),
    (lambda h: h["launches"][0].__setitem__("entry", "_Zelsewhere"), "not an entry"),
    (lambda h: h["launches"][0].__setitem__("part", "consts"), "names no PTX part"),
    (lambda h: h["target"].__setitem__("compute_capability", "sm_80"), "compute_capability"),
    (lambda h: h["output_copies"].__setitem__("2", ["input", 5]), "has no source"),
    (lambda h: h["parts"]["consts"].__setitem__("offset", 1 << 40), "outside the data"),
])
def test_malformed_manifests_are_refused(artifact: Path, edit, message):
    rewrite_header(artifact, edit)
    with pytest.raises(CudaArtifactError, match=message):
        read_cuda_image(artifact)


def test_loading_without_a_gpu_is_a_clear_error(artifact: Path):
    with pytest.raises(CudaArtifactError, match="simulator cannot run") as info:
        load_cuda(artifact)
    assert "without NUMBA_ENABLE_CUDASIM" in str(info.value)
    with pytest.raises(KilnError, match="cannot be generated under the CUDA simulator"):
        export_cuda(model_graph(), artifact.with_name("other.kiln"))


EXPORT_SCRIPT = textwrap.dedent("""
    import sys

    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():
        print("SKIP: numba finds no libNVVM (the CUDA toolkit's compiler library)")
        raise SystemExit(0)
    sys.path.insert(0, sys.argv[1])
    import test_cuda_artifact

    from kiln.runtime.artifact.cuda import export_cuda

    export_cuda(test_cuda_artifact.model_graph(), sys.argv[2], cc=(8, 0))
    try:
        export_cuda(test_cuda_artifact.model_graph(), sys.argv[2])
    except Exception as e:
        print("OK", type(e).__name__, e)
""")


def test_export_writes_real_ptx(tmp_path: Path):
    import os

    path = tmp_path / "real.kiln"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(Path(__file__).parent),
                           str(path)], env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout.strip()
    if proc.returncode == 0 and out.startswith("SKIP"):
        pytest.skip(out.removeprefix("SKIP: "))
    assert proc.returncode == 0 and out.startswith("OK"), f"{out}\n{proc.stderr[-4000:]}"
    assert "already exists" in out  # a second export keeps the first file
    image, _ = read_cuda_image(path)
    assert [lc.schedule for lc in image.launches] == ["tiled-gemm", "block-reduce",
                                                      "tiled-gemm"]
    for lc in image.launches:
        text = image.ptx[lc.name]
        # numba's PTX: a comment header, then the ISA version and the target.
        assert text.startswith("//") and re.search(r"^\.version \d+\.\d+$", text, re.M)
        assert re.search(r"^\.target sm_80$", text, re.M)
        assert f".entry {lc.entry}(" in text
    assert "bar.sync" in image.ptx[image.launches[0].name]  # the GEMM's barriers
    with pytest.raises(CudaArtifactError, match="simulator cannot run"):
        load_cuda(path)


def test_kiln_load_and_export_dispatch_to_the_cuda_artifact(artifact: Path, tmp_path: Path):
    """kiln.load reads the artifact's kind: a CUDA artifact goes to load_cuda (which, under the
    simulator, refuses clearly), a CPU reader error never appears; kiln.export of a model
    compiled for the cuda backend writes a CUDA artifact (here: refused by the simulator)."""
    import kiln

    with pytest.raises(CudaArtifactError, match="simulator cannot run"):
        kiln.load(artifact)
    with pytest.raises(KilnError, match="threads=2 applies to CPU artifacts only"):
        kiln.load(artifact, threads=2)
    truncated = tmp_path / "truncated.kiln"
    truncated.write_bytes(artifact.read_bytes()[:10])
    with pytest.raises(cpu_artifact.ArtifactError, match="too short"):
        kiln.load(truncated)
    import torch

    compiled = kiln.compile(model_graph_module(), (torch.zeros(2, 8),),
                            backend="cuda")
    with pytest.raises(KilnError, match="cannot be generated under the CUDA simulator"):
        kiln.export(compiled, tmp_path / "gpu.kiln")
    assert not (tmp_path / "gpu.kiln").exists()


def model_graph_module():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()).eval()


def test_cli_export_format_cuda(tmp_path: Path, capsys):
    from kiln.debug.cli import main

    out = tmp_path / "mlp_gpu.kiln"
    assert main(["export", "mlp", "-o", str(out), "--format", "cuda"]) == 2
    assert "cannot be generated under the CUDA simulator" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("edit", [
    lambda h: h["launches"][0]["grid"].__setitem__(0, h["launches"][0]["grid"][0] + 1),
    lambda h: h["launches"][0].__setitem__("block", [8, 8, 1]),
    lambda h: h["launches"][0].__setitem__("shared_bytes", 0),
    lambda h: h["launches"][0]["args"][0].__setitem__(3, h["launches"][0]["args"][0][3] - 1),
    lambda h: h["launches"][1]["args"].reverse(),
])
def test_launch_edits_every_check_accepts_disagree_with_the_ptx_record(artifact: Path, edit):
    """A resealed header whose launch table still passes every check (sizes inside the arena,
    a legal grid) is refused: each PTX part starts with the record it was compiled with."""
    image, _ = read_cuda_image(artifact)
    assert all(text.startswith("// kiln-record 1 ") for text in image.ptx.values())
    rewrite_header(artifact, edit)
    with pytest.raises(CudaArtifactError, match="record"):
        read_cuda_image(artifact)
