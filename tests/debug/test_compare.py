"""kiln compare: per-layer error of each compression stage, and kiln export with compression."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from kiln.debug.cli import main
from kiln.debug.compare import compare


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_compare_table_names_the_stage_that_moved_each_layer(capsys):
    status, out, _ = run(capsys, "compare", "mlp", "--prune", "0.3", "--quantize", "minmax")
    assert status == 0
    head = out.splitlines()[0].split()
    assert head == ["layer", "imported", "pruned", "O1", "int8", "llvm"]
    assert "output vs eager" in out and "pruned" in out


def test_compare_errors_appear_where_the_stage_is():
    result = compare("mlp", quantize="minmax", calibration_batches=2)
    assert result.stages == ["imported", "O1", "int8", "llvm"]
    for layer in result.layers:
        errors = result.errors[layer]
        assert errors["imported"] == 0.0
        assert errors["O1"] < 1e-6                      # exact cleanups
        assert 0.0 < errors["int8"] < 0.1               # quantization moves every layer a bit
        assert errors["llvm"] == pytest.approx(errors["int8"], abs=1e-6)
    assert result.eager_error["int8"] < 0.1


def test_compare_bad_fraction_exits_2(capsys):
    status, _, err = run(capsys, "compare", "mlp", "--prune", "1.5")
    assert status == 2 and "--prune" in err


@pytest.mark.parametrize("command", [["compare"], ["export"]])
def test_help_exits_0(capsys, command):
    status, out, _ = run(capsys, *command, "--help")
    assert status == 0 and "--quantize" in out and "--prune" in out


def test_export_onnx_with_int8_and_pruning(capsys, tmp_path):
    path = tmp_path / "lenet.onnx"
    status, out, _ = run(capsys, "export", "lenet5", "-o", str(path), "--format", "onnx",
                         "--prune", "0.1", "--quantize", "percentile")
    assert status == 0 and path.exists()
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert any(w.dtype == np.int8 and w.ndim == 4 for w in weights.values())


def test_export_onnx_with_low_rank_matches_kiln(capsys, tmp_path):
    import onnxruntime as ort
    import torch

    import kiln
    from kiln.zoo import get_model

    path = tmp_path / "mlp.onnx"
    status, _, _ = run(capsys, "export", "mlp", "-o", str(path), "--format", "onnx",
                       "--low-rank", "0.5")
    assert status == 0
    model, inputs = get_model("mlp")
    compiled = kiln.compile(model, inputs, low_rank=0.5)
    linears = [n for n in compiled.graph.nodes if n.op == "linear"]
    assert len(linears) > 3          # at least one layer became two
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = inputs[0].numpy()
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    want = compiled(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_prune_multiple_lets_small_models_reach_their_target(capsys, tmp_path):
    """LeNet's layers are narrow: rounded to the vector width (16) pruning can remove only
    12% of its FLOPs; --prune-multiple 1 lets it reach 20%, in compare and in export."""
    status, _, err = run(capsys, "compare", "lenet5", "--prune", "0.2", "--no-codegen")
    assert status == 2 and "can remove at most" in err
    status, out, _ = run(capsys, "compare", "lenet5", "--prune", "0.2", "--prune-multiple",
                         "1", "--no-codegen")
    assert status == 0 and "pruned" in out
    path = tmp_path / "lenet.kiln"
    status, out, _ = run(capsys, "export", "lenet5", "-o", str(path), "--prune", "0.2",
                         "--prune-multiple", "1")
    assert status == 0 and path.exists()
    status, _, err = run(capsys, "export", "lenet5", "-o", str(tmp_path / "x.kiln"),
                         "--prune-multiple", "2")
    assert status == 2 and "--prune-multiple applies to pruning" in err
