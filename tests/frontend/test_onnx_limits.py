"""ONNX import of hostile and extreme files: nothing is allocated by the file's say-so alone
(memory bombs are refused in well under a second, under a 4 GiB address-space limit), large
folded values stay kiln ops that compute the same numbers as ONNX, opsets outside the range
kiln reads are refused, tensor data must match its shape, and a 20,000-node chain imports."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from kiln.backends.reference import run_graph
from kiln.frontend import onnx_import
from kiln.frontend.onnx_import import (
    FOLD_LIMIT_BYTES,
    MAX_OPSET,
    MIN_OPSET,
    import_onnx,
)
from kiln.ir import KilnError, UnsupportedOpError, verify

N = helper.make_node


def model_of(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    """A model of ``nodes``; ``inputs`` / ``outputs`` map names to (elem type, shape)."""
    graph = helper.make_graph(
        nodes, "case", [helper.make_tensor_value_info(k, t, s) for k, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(k, t, s) for k, (t, s) in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def f32(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def matches_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
    """Import ``model``, run it on kiln's reference backend against ONNX's; the graph."""
    graph = import_onnx(model)
    expected = ReferenceEvaluator(model).run(None, feeds)
    for got, want in zip(run_graph(graph, list(feeds.values())), expected, strict=True):
        scale = max(float(np.abs(want).max(initial=0.0)), 1.0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    return graph


# ---- memory bombs, under a 4 GiB address-space limit --------------------------------------------
_BOMBS = r'''
import json, resource, sys, time
import numpy as np
from onnx import helper, numpy_helper
from kiln.frontend.onnx_import import import_onnx

N = helper.make_node
def model(nodes, out_shape, inits, out_type=1):
    graph = helper.make_graph(nodes, "bomb", [],
                              [helper.make_tensor_value_info("y", out_type, out_shape)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

big = [65536, 65536]
cases = {
    "constant_of_shape_16g": model([N("ConstantOfShape", ["s"], ["y"], name="bomb")], big,
                                   {"s": np.array(big, np.int64)}),
    "expand_16g": model([N("Expand", ["one", "s"], ["y"], name="bomb")], big,
                        {"one": np.ones(1, np.float32), "s": np.array(big, np.int64)}),
    "mod_1g": model([N("ConstantOfShape", ["a"], ["p"], value=numpy_helper.from_array(
                         np.array([7], np.int8))),
                     N("ConstantOfShape", ["b"], ["q"], value=numpy_helper.from_array(
                         np.array([3], np.int8))),
                     N("Mod", ["p", "q"], ["y"], name="bomb")], [32768, 32768],
                    {"a": np.array([32768, 1], np.int64), "b": np.array([1, 32768], np.int64)},
                    out_type=3),
    "range_128m": model([N("Range", ["r0", "r1", "r2"], ["y"], name="bomb")], [1 << 24],
                        {"r0": np.array(0, np.int64), "r1": np.array(1 << 24, np.int64),
                         "r2": np.array(1, np.int64)}, out_type=7),
    "expand_1g_lazy": model([N("Expand", ["one", "s"], ["y"], name="bomb")], [16384, 16384],
                            {"one": np.ones(1, np.float32),
                             "s": np.array([16384, 16384], np.int64)}),
}
path = sys.argv[1] + "/bomb.onnx"
with open(path, "wb") as f:
    f.write(cases["constant_of_shape_16g"].SerializeToString())
cases["constant_of_shape_16g_file"] = path

resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
report = {}
for name, case in cases.items():
    start = time.perf_counter()
    try:
        g = import_onnx(case)
        got = {"ops": [n.op for n in g.nodes],
               "largest_constant": max((a.nbytes for a in g.constants.values()), default=0)}
    except BaseException as e:  # MemoryError is what the bomb does without the limits
        got = {"error": type(e).__name__, "kiln": isinstance(e, Exception) and
               type(e).__module__.startswith("kiln"), "node": getattr(e, "node", None),
               "message": str(e)[:500]}
    got["seconds"] = time.perf_counter() - start
    report[name] = got
print(json.dumps(report))
'''


def test_memory_bombs_are_refused_in_a_second_under_a_4gib_address_space(tmp_path) -> None:
    run = subprocess.run([sys.executable, "-c", _BOMBS, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert (tmp_path / "bomb.onnx").stat().st_size <= 192
    for name in ("constant_of_shape_16g", "constant_of_shape_16g_file", "expand_16g",
                 "mod_1g", "range_128m"):
        got = report[name]
        assert got.get("error") in ("KilnError", "UnsupportedOpError"), (name, got)
        assert got["node"] == "bomb", (name, got)
        assert got["seconds"] < 1.0, (name, got)
    for name in ("constant_of_shape_16g", "constant_of_shape_16g_file", "expand_16g"):
        assert "16.0 GiB" in report[name]["message"] and "RLIMIT_AS" in report[name]["message"]
    assert "FOLD_LIMIT_BYTES" in report["mod_1g"]["message"]
    # 1 GiB fits the process but not the import: it stays an expand, computed at run time.
    lazy = report["expand_1g_lazy"]
    assert "error" not in lazy, lazy
    assert lazy["ops"] == ["expand"] and lazy["largest_constant"] <= FOLD_LIMIT_BYTES
    assert lazy["seconds"] < 1.0


def test_tensors_no_machine_can_hold_are_refused_naming_the_node() -> None:
    huge = [1 << 20] * 3  # 4 EiB of float32: past MAX_TENSOR_BYTES on any machine
    for nodes, inits in (
            ([N("ConstantOfShape", ["s"], ["y"], name="bomb")], {"s": i64(*huge)}),
            ([N("Expand", ["one", "s"], ["y"], name="bomb")],
             {"one": np.ones(1, np.float32), "s": i64(*huge)})):
        start = time.perf_counter()
        with pytest.raises(KilnError, match="EiB") as info:
            import_onnx(model_of(nodes, {}, {"y": (1, huge)}, inits))
        assert info.value.node == "bomb" and time.perf_counter() - start < 1.0
    # Dims whose product overflows int64 are counted exactly.
    with pytest.raises(KilnError, match="graph input 'x'"):
        import_onnx(model_of([N("Relu", ["x"], ["y"])], {"x": (1, [1 << 40, 1 << 40])},
                             {"y": (1, [1 << 40, 1 << 40])}))


def test_large_folded_constant_stays_an_op_and_matches_onnx_runtime(tmp_path) -> None:
    """A 68 MiB initializer (file data) is read as it is; a 68 MiB ConstantOfShape (above
    FOLD_LIMIT_BYTES) and the ReduceSum over it stay kiln ops; ONNX Runtime agrees."""
    rows, cols = 4096, 4352
    assert rows * cols * 4 > FOLD_LIMIT_BYTES
    w = f32(rows, cols, seed=1) / 64
    nodes = [N("MatMul", ["x", "w"], ["h"]),
             N("ConstantOfShape", ["shape"], ["big"],
               value=numpy_helper.from_array(np.array([0.5], np.float32))),
             N("ReduceSum", ["big", "axes"], ["s"], keepdims=0),
             N("Add", ["h", "s"], ["y"])]
    model = model_of(nodes, {"x": (1, [4, rows])}, {"y": (1, [4, cols])},
                     {"w": w, "shape": i64(rows, cols), "axes": i64(0)})
    path = tmp_path / "large.onnx"
    path.write_bytes(model.SerializeToString())
    graph = import_onnx(path)
    assert {"expand", "reduce_sum"} <= {n.op for n in graph.nodes}
    assert max(a.nbytes for a in graph.constants.values()) == w.nbytes
    x = f32(4, rows, seed=2)
    want = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_allclose(run_graph(graph, [x])[0], want, rtol=1e-4, atol=1e-3)


def test_folding_is_capped_by_work_as_well_as_size() -> None:
    """A convolution of two constants has a small result and a large cost: it stays a node."""
    x, w = f32(1, 1, 128, 128), f32(1, 1, 32, 32, seed=1)
    model = model_of([N("Conv", ["x", "w"], ["c"]), N("Add", ["c", "z"], ["y"])],
                     {"z": (1, [1, 1, 97, 97])}, {"y": (1, [1, 1, 97, 97])}, {"x": x, "w": w})
    graph = matches_onnx(model, {"z": f32(1, 1, 97, 97, seed=2)})
    assert "conv" in {n.op for n in graph.nodes}


@pytest.fixture
def tiny_fold_limit(monkeypatch):
    """Fold at most 64 bytes, so small cases take the paths of large ones."""
    monkeypatch.setattr(onnx_import, "FOLD_LIMIT_BYTES", 64)


@pytest.mark.parametrize("upper,k", [(1, 0), (1, 2), (0, -1), (0, 3)])
def test_trilu_mask_beyond_the_fold_limit_is_computed_at_run_time(tiny_fold_limit, upper,
                                                                   k) -> None:
    model = model_of([N("Trilu", ["x", "k"], ["y"], upper=upper)], {"x": (1, [2, 9, 12])},
                     {"y": (1, [2, 9, 12])}, {"k": np.array(k, np.int64)})
    graph = matches_onnx(model, {"x": f32(2, 9, 12)})
    assert {"ge", "le"} & {n.op for n in graph.nodes}


def test_avg_pool_divisor_beyond_the_fold_limit_is_one_factor_per_axis(tiny_fold_limit):
    model = model_of([N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[0, 1, 2, 1],
                        strides=[2, 1])], {"x": (1, [1, 2, 9, 7])}, {"y": (1, [1, 2, 5, 7])})
    graph = matches_onnx(model, {"x": f32(1, 2, 9, 7)})
    divisors = [c for name, c in graph.constants.items() if "divisor" in name]
    assert len(divisors) == 2 and all(c.size < 9 for c in divisors)


def test_large_gathers_and_fills_stay_ops(tiny_fold_limit) -> None:
    nodes = [N("Gather", ["table", "idx"], ["g"]),  # constant table and indices
             N("Shape", ["x"], ["s"]),
             N("ConstantOfShape", ["s"], ["ones"], value=numpy_helper.from_array(
                 np.array([1.0], np.float32))),
             N("Mul", ["x", "ones"], ["xm"]),
             N("IsInf", ["x"], ["none"], detect_positive=0, detect_negative=0),
             N("Where", ["none", "g", "xm"], ["y"])]
    table = f32(5, 4)
    model = model_of(nodes, {"x": (1, [6, 4])}, {"y": (1, [6, 4])},
                     {"table": table, "idx": i64(4, 0, 0, 3, 1, 4)})
    graph = matches_onnx(model, {"x": f32(6, 4, seed=1)})
    assert {"take", "expand"} <= {n.op for n in graph.nodes}   # Gather stays one take
    assert max(a.nbytes for a in graph.constants.values()) <= table.nbytes


def test_gather_of_many_scattered_indices_is_one_take() -> None:
    """1000 constant indices are one node, not a slice per run of consecutive indices."""
    model = model_of([N("Gather", ["x", "idx"], ["y"], axis=1)], {"x": (1, [3, 8])},
                     {"y": (1, [3, 1000])}, {"idx": np.arange(1000, dtype=np.int64) * 5 % 8})
    graph = matches_onnx(model, {"x": f32(3, 8)})
    assert len(graph.nodes) <= 4 and "take" in {n.op for n in graph.nodes}


# ---- opsets ------------------------------------------------------------------------------------
def _relu_model(opset: int) -> onnx.ModelProto:
    return model_of([N("Relu", ["x"], ["y"])], {"x": (1, [3])}, {"y": (1, [3])}, opset=opset)


def test_opsets_outside_the_range_kiln_reads_are_refused() -> None:
    x = f32(3)
    for opset in (MIN_OPSET, 17, MAX_OPSET):
        np.testing.assert_array_equal(run_graph(import_onnx(_relu_model(opset)), [x])[0],
                                      np.maximum(x, 0))
    for opset, hint in ((MIN_OPSET - 1, "convert_version(model, 17)"),
                        (MAX_OPSET + 1, f"convert_version(model, {MAX_OPSET})")):
        with pytest.raises(KilnError) as info:
            import_onnx(_relu_model(opset))
        message = str(info.value)
        assert f"opset {opset}" in message and f"{MIN_OPSET} to {MAX_OPSET}" in message
        assert hint in message
    node = N("FusedGemm", ["x", "x"], ["y"], domain="com.microsoft", name="fused")
    graph = helper.make_graph([node], "custom", [helper.make_tensor_value_info("x", 1, [3, 3])],
                              [helper.make_tensor_value_info("y", 1, [3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedOpError, match="default ONNX domain only") as info:
        import_onnx(model)
    assert info.value.node == "fused"


def test_batch_norm_per_element_statistics_of_opset_7_are_refused() -> None:
    c = np.ones(3, np.float32)
    model = model_of([N("BatchNormalization", ["x", "c", "c", "c", "c"], ["y"], spatial=0,
                        name="bn")], {"x": (1, [2, 3, 4])}, {"y": (1, [2, 3, 4])},
                     {"c": c}, opset=7)
    with pytest.raises(UnsupportedOpError, match="spatial=0") as info:
        import_onnx(model)
    assert info.value.node == "bn"


# ---- tensor data against its shape --------------------------------------------------------------
def test_initializer_data_longer_than_its_shape_is_refused() -> None:
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3], raw_data=bytes(400))
    model = model_of([N("Add", ["x", "w"], ["y"])], {"x": (1, [3])}, {"y": (1, [3])})
    model.graph.initializer.append(w)
    with pytest.raises(KilnError, match="initializer 'w' holds 400 bytes .* needs 12"):
        import_onnx(model)


def test_external_data_must_match_the_tensor_before_it_is_read(tmp_path) -> None:
    model = model_of([N("Add", ["x", "w"], ["y"])], {"x": (1, [3])}, {"y": (1, [3])},
                     {"w": np.arange(3, dtype=np.float32)})
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.weights",
                    size_threshold=0)
    assert run_graph(import_onnx(path), [np.zeros(3, np.float32)])[0].tolist() == [0, 1, 2]
    saved = onnx.load(str(path), load_external_data=False)
    assert {e.key for e in saved.graph.initializer[0].external_data} >= {"offset", "length"}
    with open(tmp_path / "m.weights", "ab") as f:
        f.write(bytes(1 << 20))  # the data file is now longer than the tensor
    for key, value, message in (("length", "400", "400 bytes at offset 0"),
                                ("length", None, "1048588 bytes at offset 0"),
                                ("offset", "1048580", "more")):
        bad = onnx.ModelProto()
        bad.CopyFrom(saved)
        tensor = bad.graph.initializer[0]
        info = {e.key: e.value for e in tensor.external_data}
        if value is None:
            del info[key]
        else:
            info[key] = value
        del tensor.external_data[:]
        for k, v in info.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v
        path.write_bytes(bad.SerializeToString())
        with pytest.raises(KilnError, match="do not match") as err:
            import_onnx(path)
        if message != "more":
            assert message in str(err.value)
    # Dims no machine holds are refused before the data file is opened.
    del bad.graph.initializer[0].dims[:]
    bad.graph.initializer[0].dims.extend([1 << 40])
    path.write_bytes(bad.SerializeToString())
    with pytest.raises(KilnError, match="tensor 'w' .* 4.0 TiB"):
        import_onnx(path)


# ---- depth -------------------------------------------------------------------------------------
def test_deep_elementwise_chain_imports_and_compiles() -> None:
    """20,000 alternating Add / Relu: no recursion by depth in the importer or the compiler,
    and no work per node that grows with the graph (naming values by a set of every name per
    call took 20 s to import; now 1 s). It compiles for the CPU and runs right."""
    from kiln.api import optimize
    from kiln.backends.llvm import compile_graph

    depth = 20_000
    nodes = [N("Add", [f"v{i - 1}" if i else "x", "c"], [f"v{i}"]) if i % 2 == 0 else
             N("Relu", [f"v{i - 1}"], [f"v{i}"]) for i in range(depth)]
    c = np.array([-1e-3, 1e-3, 0, 2e-3], np.float32)
    model = model_of(nodes, {"x": (1, [4])}, {f"v{depth - 1}": (1, [4])}, {"c": c})
    graph = import_onnx(model)
    verify(graph)
    assert len(graph.nodes) == depth
    x = np.array([5.0, -1.0, 0.5, 0.0], np.float32)
    want = x
    for _ in range(depth // 2):
        want = np.maximum(want + c, 0)
    np.testing.assert_allclose(run_graph(graph, [x])[0], want, rtol=1e-5, atol=1e-6)
    program = compile_graph(optimize(graph, "O1")[0], cache=False)
    np.testing.assert_allclose(program.run([x])[0], want, rtol=1e-5, atol=1e-6)


def test_ops_redefined_after_the_handled_opset_are_read_only_with_their_old_meaning() -> None:
    """Cast gained ``round_mode`` in opset 24: left out or at its default, a Cast means what
    it meant in opset 21 and imports; set to anything else, the node is refused, never read
    with the older meaning."""
    from kiln.frontend.onnx_import import HANDLED_OPSET

    if MAX_OPSET < 25:
        pytest.skip("needs an onnx package that knows opset 25")
    x = f32(3) * 10

    def cast(**attrs):
        return model_of([N("Cast", ["x"], ["y"], to=TensorProto.INT32, name="c", **attrs)],
                        {"x": (1, [3])}, {"y": (6, [3])}, opset=25)

    for model in (cast(), cast(round_mode="up")):
        np.testing.assert_array_equal(run_graph(import_onnx(model), [x])[0], x.astype(np.int32))
    with pytest.raises(UnsupportedOpError, match="redefined in opset 2") as info:
        import_onnx(cast(round_mode="down"))
    assert info.value.node == "c" and f"opset_version={HANDLED_OPSET}" in str(info.value)
    assert "round_mode" in str(info.value)
