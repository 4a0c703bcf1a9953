"""CONTRIBUTING.md's "Adding an op" checklist, held for every registered op.

Each op has a NumPy reference, a declared cost, a lowering (an element rule, which a composite
op gets from its decomposition, or an anchor rule), an ONNX export (an ``ONNX_IMPL`` entry, a
decomposition, or a reason in ``NOT_EXPORTED``), a PyTorch oracle (``TORCH_IMPL``) and a test in
tests/ir/test_ops.py against both. The last tests remove one entry of each table and check that
the checklist names the gap, so it can fail.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import onnx
import pytest

import kiln.passes.lower  # noqa: F401  (registers every lowering rule)
from kiln.interop.to_onnx import NOT_EXPORTED, ONNX_IMPL, graph_to_onnx
from kiln.interop.to_torch import TORCH_IMPL
from kiln.ir import DType, GraphBuilder, TensorType, all_ops, get_op
from kiln.ir.registry import REGISTRY, elementwise_flops
from kiln.passes.fusion import is_injective
from kiln.passes.lower.anchors import ANCHOR_RULES
from kiln.passes.lower.core import ELEMENT_RULES


def _op_tests():
    """tests/ir/test_ops.py as a module (its ``COVERED`` names the ops it tests)."""
    spec = importlib.util.spec_from_file_location("kiln_tests_ir_ops",
                                                  Path(__file__).parent / "test_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TESTED = _op_tests().COVERED


def _composite_exports(op: str) -> str | None:
    """Why the decomposition of ``op`` does not export to a checked ONNX model, or None."""
    opdef = get_op(op)
    for case in opdef.decomposition_cases:
        b = GraphBuilder(op)
        names = [b.input(f"x{k}", TensorType((2, 3), DType.f32))
                 for k in range(opdef.min_inputs)]
        b.output(b.op(op, names, case))
        try:
            onnx.checker.check_model(graph_to_onnx(b.build()), full_check=True)
        except Exception as e:  # noqa: BLE001  (any failure is the answer)
            return f"its decomposition does not export ({type(e).__name__}: {e})"
    return None


def checklist_gaps(op: str) -> list[str]:
    """What ``op`` lacks of CONTRIBUTING.md's checklist (empty: nothing)."""
    opdef = get_op(op)
    gaps = []
    if not callable(opdef.reference):
        gaps.append("no NumPy reference (declare reference= or decomposition=)")
    if not callable(opdef.flops) or (opdef.kind != "elementwise"
                                     and opdef.flops is elementwise_flops):
        gaps.append(f"no declared cost (a {opdef.kind} op needs flops=)")
    rules = ELEMENT_RULES if is_injective(op) else ANCHOR_RULES
    if op not in rules:
        table = "ELEMENT_RULES" if rules is ELEMENT_RULES else "ANCHOR_RULES"
        gaps.append(f"no lowering: not in {table} (passes/lower) and no decomposition")
    if op in NOT_EXPORTED:
        if op in ONNX_IMPL or not NOT_EXPORTED[op].strip():
            gaps.append("NOT_EXPORTED gives no reason, or the op has an ONNX_IMPL entry")
    elif op not in ONNX_IMPL:
        if opdef.decomposition is None:
            gaps.append("no ONNX export: not in ONNX_IMPL, no decomposition, not in "
                        "NOT_EXPORTED (interop/to_onnx.py)")
        else:
            why = _composite_exports(op)
            if why:
                gaps.append(why)
    if op not in TORCH_IMPL:
        gaps.append("no PyTorch oracle: not in TORCH_IMPL (interop/to_torch.py)")
    if op not in TESTED:
        gaps.append("no op test: no @covers in tests/ir/test_ops.py")
    return gaps


@pytest.mark.parametrize("op", sorted(all_ops()))
def test_op_meets_the_checklist(op: str) -> None:
    assert checklist_gaps(op) == []


# ---- the checklist can fail ------------------------------------------------------------------
@pytest.mark.parametrize(("table", "op", "gap"), [
    (ELEMENT_RULES, "softsign", "no lowering"),
    (ANCHOR_RULES, "softmax", "no lowering"),
    (ONNX_IMPL, "relu", "no ONNX export"),
    (TORCH_IMPL, "softsign", "no PyTorch oracle"),
])
def test_a_missing_table_entry_is_named(monkeypatch, table, op, gap) -> None:
    monkeypatch.delitem(table, op)
    assert any(g.startswith(gap) for g in checklist_gaps(op))


def test_a_missing_op_test_is_named(monkeypatch) -> None:
    monkeypatch.setitem(globals(), "TESTED", TESTED - {"softsign"})
    assert "no op test: no @covers in tests/ir/test_ops.py" in checklist_gaps("softsign")


def test_an_undeclared_cost_is_named(monkeypatch) -> None:
    monkeypatch.setitem(REGISTRY, "matmul", replace(get_op("matmul"), flops=elementwise_flops))
    assert any(g.startswith("no declared cost") for g in checklist_gaps("matmul"))


def test_a_decomposition_that_does_not_export_is_named(monkeypatch) -> None:
    # softsign has an ONNX entry; without it, its decomposition is exported, and without
    # abs's entry that fails.
    monkeypatch.delitem(ONNX_IMPL, "softsign")
    assert checklist_gaps("softsign") == []
    monkeypatch.delitem(ONNX_IMPL, "abs")
    assert any(g.startswith("its decomposition does not export")
               for g in checklist_gaps("softsign"))
