"""The one pipeline from graph to machine code (passes/compile.py): registered stages, one
driver for every backend, instruments at every stage, stages that never change their input."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.backends.llvm.compiler import CODEGEN, default_target
from kiln.ir import GraphBuilder, InternalError, KilnError, TensorType
from kiln.ir import kernel as K
from kiln.ir.kernel_verify import verify_kernel
from kiln.passes import DumpIR, Timing, Verify
from kiln.passes.compile import (
    KERNEL,
    Compilation,
    Stage,
    compile_kernels,
    get_stage,
    kernel_stages,
    run_stages,
    stage_names,
)

ROOT = Path(kiln.__file__).parent


def small_graph():
    rng = np.random.default_rng(0)
    b = GraphBuilder()
    x = b.input("x", TensorType((4, 19)))
    w = b.constant(rng.standard_normal((7, 19)).astype(np.float32), "w")
    y = b.op("relu", [b.op("linear", [x, w])])
    b.output(b.op("softmax", [y], {"axis": -1}))
    return b.build()


def test_the_stages_are_registered_in_pipeline_order():
    names = stage_names()
    assert names[:6] == ["fuse", "lower", "parallel", "unroll", "vectorize", "memory_plan"]
    assert {"llvm_ir", "llvm_opt", "object"} <= set(names)
    assert kernel_stages() == names[:6]
    assert kernel_stages(schedule=False) == ["fuse", "lower", "memory_plan"]
    with pytest.raises(KilnError, match="registered stages: .*vectorize"):
        get_stage("vectorise")


def test_stages_never_change_their_input():
    target = default_target()
    c = Compilation(small_graph(), width=target.f32_lanes, target=target)
    lowered = run_stages(c, ["fuse", "lower"])
    texts = lowered.lowered.text()
    kernels = [s.kernel for s in lowered.lowered.steps]
    scheduled = run_stages(lowered, ["parallel", "unroll", "vectorize", "memory_plan"])
    assert lowered.lowered.text() == texts
    assert [s.kernel for s in lowered.lowered.steps] == kernels
    assert lowered.memory is None and scheduled.memory is not None
    assert scheduled.lowered.text() != texts  # vectorized: the kernels changed, in a copy


def test_instruments_see_and_dump_every_stage(tmp_path):
    target = default_target()
    timing = Timing()
    c = compile_kernels(small_graph(), width=target.f32_lanes, target=target,
                        code_stages=CODEGEN, instruments=[Verify(), DumpIR(tmp_path), timing])
    names = kernel_stages() + list(CODEGEN)
    assert [r.name for r in timing.records] == names
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["000_input.txt"] + [f"{i + 1:03d}_{n}.txt" for i, n in enumerate(names)]
    assert "anchor" in (tmp_path / "001_fuse.txt").read_text()
    assert (tmp_path / "002_lower.txt").read_text().startswith("kernel ")
    assert "f32x" in (tmp_path / "005_vectorize.txt").read_text()
    assert "arena" in (tmp_path / "006_memory_plan.txt").read_text()
    assert "@kiln_run(" in (tmp_path / "007_llvm_ir.txt").read_text()
    assert "object code for" in (tmp_path / "009_object.txt").read_text()
    assert len(c.code["object"]) > 0


class _BrokenSchedule(Stage):
    """A planted bug: a schedule that stores to a buffer the kernel does not have."""

    name = "broken_schedule"
    level = KERNEL

    def apply(self, c):
        def bad(k):
            return k.with_body([*k.body, K.Store("v_nowhere", K.Const(0, K.INDEX),
                                                 K.Const(1.0, "f32"))])
        return c.map_kernels(bad)


def test_the_verifier_catches_a_broken_kernel_as_an_internal_error():
    target = default_target()
    c = Compilation(small_graph(), width=target.f32_lanes, target=target)
    with pytest.raises(InternalError, match="unknown buffer v_nowhere") as e:
        run_stages(c, ["fuse", "lower", _BrokenSchedule()], [Verify()])
    assert "kiln bug" in str(e.value) and "kiln minify" in str(e.value)
    assert isinstance(e.value, KilnError)  # callers handling kiln's errors still do


def test_kernel_verifier_rules():
    x = K.Buffer("x", "f32", 4)
    i = K.Var("i")
    good = K.Kernel("k", (x,), (K.For(i, K.Const(0, K.INDEX), K.Const(4, K.INDEX), (
        K.Store("x", i, K.Load("x", i) + 1.0),)),))
    verify_kernel(good)
    undefined = dataclasses.replace(good, body=(K.Store("x", K.Var("j"), K.Const(1.0, "f32")),))
    with pytest.raises(InternalError, match="variable j used before"):
        verify_kernel(undefined)
    wrong_type = dataclasses.replace(good, body=(K.Store("x", K.Const(0, K.INDEX),
                                                         K.Const(1, "i32")),))
    with pytest.raises(InternalError, match="store of i32 into f32"):
        verify_kernel(wrong_type)
    outside = dataclasses.replace(good, body=(K.Store("x", K.Const(0, K.INDEX),
                                                      K.Load("x", K.Const(4, K.INDEX))),))
    with pytest.raises(InternalError, match="outside its 4 elements"):
        verify_kernel(outside)


def test_no_backend_lowers_or_schedules_outside_the_pipeline():
    """The grep of the acceptance: only passes/ calls the lowering, scheduling, fusion and
    memory-planning entry points; backends, the runtime and the exporters go through
    ``compile_kernels`` / ``run_stages``."""
    pattern = re.compile(r"\b(lower_graph|schedule_kernel|plan_memory|plan_fusion|"
                         r"place_parallel|vectorize_stmts|lower_group)\s*\(")
    offenders = []
    for folder in ("backends", "runtime", "interop", "frontend", "compression", "distributed"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_numeric_check_runs_kernel_stages_and_names_a_wrong_one():
    from kiln.backends.reference import run_graph
    from kiln.ir import NumericsError
    from kiln.passes import NumericCheck

    g = small_graph()
    inputs = [np.random.default_rng(0).standard_normal((4, 19)).astype(np.float32)]
    target = default_target()
    check = NumericCheck(run_graph, inputs)
    compile_kernels(g, width=target.f32_lanes, target=target, instruments=[check])
    checked = {s.name for s in check.stages if s.checked}
    assert {"lower", "parallel", "unroll", "vectorize"} <= checked
    assert all(s.max_abs_diff < 1e-5 for s in check.stages)

    class _Overwrite(Stage):
        name = "overwrite_output"
        level = KERNEL

        def apply(self, c):
            def bad(k):
                return k.with_body([*k.body, K.Store(k.params[-1].name, K.Const(0, K.INDEX),
                                                     K.Const(7.0, "f32"))])
            return c.map_kernels(bad)

    c = Compilation(g, width=target.f32_lanes, target=target)
    with pytest.raises(NumericsError, match="stage overwrite_output moved output 0"):
        run_stages(c, ["fuse", "lower", _Overwrite()], [NumericCheck(run_graph, inputs)])
