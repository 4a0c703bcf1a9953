"""The onnx package's backend node-test suite (``collect_testcases()``) through kiln's ONNX
import, on the reference and llvm backends.

Each case carries a one-node (or small) model, its inputs and ONNX's expected outputs. A case
either matches those outputs at the tolerances the case itself declares (as onnx's backend
runner compares them), or it is listed in ``onnx_node_unsupported.UNSUPPORTED`` under the
reason kiln cannot run it, and kiln must then refuse it with a KilnError: never a crash,
never a wrong number. A listed case that starts to pass fails its test, naming the entry to
delete, so the list only shrinks honestly. Nothing is skipped.

``TOLERANCE`` loosens the tolerance of a few cases, each with its reason.

Cases in the ``BOUND_AT_IMPORT`` group pass a shape, axes, pads or similar operand as a graph
input, which a static-shape compiler cannot take at run time: they must be refused as they
are, and must pass once those inputs are made initializers of the model (what a user does
with such a file: fix the values when exporting).

CI runs the reference backend on every case and the llvm backend on ``LLVM_SAMPLE`` (the
first case of each op type); every other llvm case is marked ``heavy``.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kiln.backends.llvm import compile_graph
from kiln.backends.reference import run_graph
from kiln.frontend.onnx_import import import_onnx
from kiln.ir import KilnError

_spec = importlib.util.spec_from_file_location(
    "onnx_node_unsupported", pathlib.Path(__file__).parent / "onnx_node_unsupported.py")
_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_table)
UNSUPPORTED: dict[str, tuple[str, ...]] = _table.UNSUPPORTED
BOUND_AT_IMPORT: str = _table.BOUND_AT_IMPORT
TOLERANCE: dict[str, tuple[float, float, str]] = _table.TOLERANCE


@functools.lru_cache(maxsize=1)
def node_cases() -> dict:
    """Every onnx backend node-test case by name (generating them takes a few seconds)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own overflow warnings
        return {c.name: c for c in collect_testcases()}


def _reason_of() -> dict[str, str]:
    reasons: dict[str, str] = {}
    for reason, names in UNSUPPORTED.items():
        for name in names:
            assert name not in reasons, f"{name} is listed under two reasons"
            reasons[name] = reason
    return reasons


REASON = _reason_of()


def _op_types(case) -> set[str]:
    return {n.op_type for n in case.model.graph.node}


def _llvm_sample(names: list[str]) -> set[str]:
    """The llvm cases CI runs: per op type, its first supported case by name (its first
    listed one where none is supported)."""
    cases = node_cases()
    sample: dict[str, str] = {}
    for supported in (True, False):
        for name in names:
            if (name not in REASON) == supported:
                for op in _op_types(cases[name]):
                    sample.setdefault(op, name)
    return set(sample.values())


NAMES = sorted(node_cases())
LLVM_SAMPLE = _llvm_sample(NAMES)


def _array(value) -> np.ndarray:
    """A data-set entry as an array (some generators store TensorProtos)."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value)


_MUST_BE_CONSTANT = re.compile(r"\(operand \d+, '([^']*)'\) must be a constant")


def bound_model(case) -> tuple[onnx.ModelProto, list[int]]:
    """The case's model with the graph inputs kiln needs as constants (those its import
    error names, one by one) made initializers holding the first data set's values, and the
    positions of the graph inputs that remain."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    g = model.graph
    values = {vi.name: _array(v) for vi, v in zip(case.model.graph.input, case.data_sets[0][0])}
    while True:
        try:
            import_onnx(model)
        except KilnError as e:
            named = _MUST_BE_CONSTANT.search(str(e))
            inputs = [vi.name for vi in g.input]
            if named is None or named.group(1) not in inputs:
                raise
            g.initializer.append(numpy_helper.from_array(values[named.group(1)],
                                                         named.group(1)))
            del g.input[inputs.index(named.group(1))]
            continue
        names = [vi.name for vi in case.model.graph.input]
        return model, [names.index(vi.name) for vi in g.input]


def assert_matches_onnx(got: list[np.ndarray], expected: list, rtol: float, atol: float,
                        what: str) -> None:
    """kiln's outputs have ONNX's shapes and dtypes and agree within the case's rtol / atol
    (NaN where ONNX has NaN); integers and bools exactly."""
    assert len(got) == len(expected), f"{what}: {len(got)} outputs, ONNX has {len(expected)}"
    for k, (g, e) in enumerate(zip(got, expected)):
        e = _array(e)
        assert g.shape == e.shape, f"{what} output {k}: shape {g.shape}, ONNX {e.shape}"
        assert g.dtype == e.dtype, f"{what} output {k}: dtype {g.dtype}, ONNX {e.dtype}"
        if e.dtype.kind in "fc":
            np.testing.assert_allclose(g, e, rtol=rtol, atol=atol, err_msg=f"{what} output {k}")
        else:
            np.testing.assert_array_equal(g, e, err_msg=f"{what} output {k}")


def run_case(case, backend: str, model: onnx.ModelProto | None = None,
             keep: list[int] | None = None) -> None:
    """Import ``model`` (the case's own by default), run every data set on ``backend`` and
    compare with ONNX's outputs; KilnError propagates."""
    graph = import_onnx(case.model if model is None else model)
    run = (functools.partial(run_graph, graph) if backend == "reference"
           else compile_graph(graph))
    for n, (inputs, outputs) in enumerate(case.data_sets):
        arrays = [_array(x) for x in inputs]
        if keep is not None:
            arrays = [arrays[i] for i in keep]
        got = [np.asarray(a) for a in run(arrays)]
        rtol, atol, _ = TOLERANCE.get(case.name, (case.rtol, case.atol, ""))
        assert_matches_onnx(got, outputs, rtol, atol, f"{case.name} data set {n} on {backend}")


def check_case(name: str, backend: str) -> None:
    """A supported case matches ONNX; a listed one is refused with a KilnError (and, when
    it is listed for a runtime operand, passes with that operand bound at import)."""
    case = node_cases()[name]
    reason = REASON.get(name)
    if reason is None:
        run_case(case, backend)
        return
    try:
        run_case(case, backend)
    except KilnError:
        pass
    else:
        pytest.fail(f"{name} now passes on {backend}: delete it from UNSUPPORTED[{reason!r}] "
                    "in tests/frontend/onnx_node_unsupported.py")
    if reason == BOUND_AT_IMPORT:
        run_case(case, backend, *bound_model(case))


def test_table_names_only_existing_cases() -> None:
    """Every listed case exists, so a renamed case cannot hide in the table; a looser
    tolerance is only ever for a case kiln runs (as it is, or with its operands bound), and
    never looser than 1e-2."""
    assert not set(REASON) - set(NAMES), sorted(set(REASON) - set(NAMES))
    assert BOUND_AT_IMPORT in UNSUPPORTED
    for name, (rtol, atol, why) in TOLERANCE.items():
        assert name in NAMES and REASON.get(name, BOUND_AT_IMPORT) == BOUND_AT_IMPORT, name
        assert why, name
        assert rtol <= 1e-2 and atol <= 1e-2, name


@pytest.mark.parametrize("name", NAMES)
def test_node_case_reference(name: str) -> None:
    """Every node case on the reference backend: matches ONNX, or is refused as listed."""
    check_case(name, "reference")


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n in LLVM_SAMPLE else pytest.mark.heavy) for n in NAMES])
def test_node_case_llvm(name: str) -> None:
    """Every node case on the llvm backend (CI: one case per op type, the rest heavy)."""
    check_case(name, "llvm")
