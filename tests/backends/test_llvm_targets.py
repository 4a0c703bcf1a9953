"""The narrower schedules (AVX2: 6x16 GEMM tile on 8-lane vectors; SSE: 4 lanes) compiled for
those targets and run on this CPU (which has their instructions), against eager PyTorch."""

from __future__ import annotations

import re

import llvmlite.binding as llvm
import numpy as np
import pytest
import torch

import kiln
from kiln.backends.llvm.compiler import Target, compile_graph, host_target
from kiln.zoo import get_model

_FEATURES = llvm.get_host_cpu_features()
TARGETS = {
    "avx2": ("haswell", "+avx,+avx2,+fma,+f16c,+sse4.2,+popcnt,+bmi,+bmi2", 256),
    "sse2": ("x86-64", "+sse2", 128),
}


@pytest.mark.skipif(not (_FEATURES.get("avx2") and _FEATURES.get("fma")),
                    reason="the host cannot run AVX2 code")
@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("name", ["lenet5", "resnet18_cifar", "mobilenetv2", "bert",
                                  "gpt2_block"])
def test_zoo_model_on_narrower_target(name: str, target: str) -> None:
    cpu, features, bits = TARGETS[target]
    t = Target(host_target().triple, cpu, features, bits)
    model, inputs = get_model(name)
    graph = kiln.compile(model, inputs, backend="reference").graph
    program = compile_graph(graph, target=t, cache=False)
    with torch.no_grad():
        expected = model(*inputs).numpy()
    got = program([x.numpy() for x in inputs])[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.skipif(not (_FEATURES.get("avx2") and _FEATURES.get("fma")),
                    reason="the host cannot run AVX2 code")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_batched_conv_schedules_on_narrower_target(target: str) -> None:
    """Batch 2: Winograd, the batched stride-phase GEMM and its transposed form (their tiles
    sized for 8 and 4 lanes), as in ResNet-18 (CIFAR)."""
    cpu, features, bits = TARGETS[target]
    t = Target(host_target().triple, cpu, features, bits)
    model, inputs = get_model("resnet18_cifar", batch=2)
    graph = kiln.compile(model, inputs, backend="reference").graph
    program = compile_graph(graph, target=t, cache=False)
    ops = {s["op"] for s in program.image.steps}
    assert "conv/winograd" in ops
    with torch.no_grad():
        expected = model(*inputs).numpy()
    got = program([x.numpy() for x in inputs])[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.skipif(not (_FEATURES.get("avx2") and _FEATURES.get("fma")),
                    reason="the host cannot run AVX2 code")
def test_compile_takes_a_target_by_name(monkeypatch) -> None:
    """kiln.compile(target=...) and KILN_TARGET choose the instruction set; a target this
    CPU cannot run, an unknown name and a target for another backend are refused."""
    model, inputs = get_model("lenet5")
    with torch.no_grad():
        expected = model(*inputs).numpy()
    for name in ("avx2", "x86-64-v3", "sse2"):
        compiled = kiln.compile(model, inputs, target=name)
        image = compiled.executable.program.image
        assert image.target["name"] in ("avx2", "sse2") and image.target["vector_bits"] < 512
        np.testing.assert_allclose(compiled(*inputs).numpy(), expected, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("KILN_TARGET", "sse2")
    assert kiln.compile(model, inputs).executable.program.image.target["name"] == "sse2"
    with pytest.raises(kiln.KilnError, match="unknown target"):
        kiln.compile(model, inputs, target="pentium")
    with pytest.raises(kiln.KilnError, match="llvm backend"):
        kiln.compile(model, inputs, backend="reference", target="avx2")
    if not _FEATURES.get("avx512f"):
        with pytest.raises(kiln.KilnError, match="lacks"):
            kiln.compile(model, inputs, target="avx512")


@pytest.mark.skipif(not (_FEATURES.get("avx2") and _FEATURES.get("fma")),
                    reason="the host cannot run AVX2 code")
@pytest.mark.parametrize("isa", ["avx2", "host"])
@pytest.mark.parametrize("op", ["matmul", "linear"])
def test_gemm_blocks_rows_by_the_target_l2(isa: str, op: str) -> None:
    """Where A outgrows the target's L2 and B has many column tiles, the GEMM runs its tiles
    in row blocks sized from the L2 (a made-up 16 KiB L2 here, so that small shapes take it,
    with a partial last block and a partial column tile): same numbers as NumPy."""
    from dataclasses import replace

    from kiln.ir import GraphBuilder, TensorType
    from kiln.passes.target import named_target

    t = replace(named_target(isa, host_target()), l2_bytes=16 * 1024, cores=2)
    rng = np.random.default_rng(0)
    m, k, n = 101, 64, 16 * t.f32_lanes * 3 + 5
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n) if op == "matmul" else (n, k)).astype(np.float32)
    b = GraphBuilder(op)
    xin = b.input("x", TensorType((m, k)))
    b.output(b.op(op, [xin, b.constant(w, "w")]))
    program = compile_graph(b.build(), target=t, cache=False)
    text = "\n".join(str(s.kernel) for s in program.lowered.steps)
    assert re.search(r"\bib\d+ = ", text), "the row-blocked order was not taken"
    expected = x @ (w if op == "matmul" else w.T)
    np.testing.assert_allclose(program([x])[0], expected, rtol=1e-5, atol=1e-4)
