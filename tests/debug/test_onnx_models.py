"""Every debugger command that makes sense without PyTorch takes an ONNX file as MODEL (and
profile an exported artifact)."""

from __future__ import annotations

import warnings

import pytest
import torch

from kiln.debug.cli import main
from kiln.zoo import get_model


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    model, inputs = get_model("mlp")
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=17)
    return str(path)


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_show_and_profile(capsys, onnx_file):
    status, out, _ = run(capsys, "show", onnx_file)
    assert status == 0 and "linear" in out
    status, out, _ = run(capsys, "profile", onnx_file, "--repeat", "3", "--threads", "1")
    assert status == 0 and "GFLOP/s" in out


def test_trace_and_bisect_judge_against_the_import(capsys, onnx_file, tmp_path):
    status, out, _ = run(capsys, "trace", onnx_file, "-o", str(tmp_path / "t"))
    assert status == 0 and (tmp_path / "t" / "report.html").exists()
    status, out, _ = run(capsys, "bisect", onnx_file)
    assert status == 0 and "all stages match the imported ONNX model" in out


def test_minify_finds_nothing_to_shrink(capsys, onnx_file, tmp_path):
    status, out, _ = run(capsys, "minify", onnx_file, "-o", str(tmp_path / "m"))
    assert status == 0 and "no failure" in out


def test_export_then_profile_the_artifact(capsys, onnx_file, tmp_path):
    art = tmp_path / "mlp.kiln"
    status, out, _ = run(capsys, "export", onnx_file, "-o", str(art))
    assert status == 0 and art.exists()
    status, out, _ = run(capsys, "profile", str(art), "--repeat", "3", "--threads", "1")
    assert status == 0 and "total" in out


def test_commands_that_need_pytorch_say_so(capsys, onnx_file, tmp_path):
    status, _, err = run(capsys, "compare", onnx_file)
    assert status == 2 and "kiln: error:" in err
    status, _, err = run(capsys, "export", onnx_file, "-o", str(tmp_path / "x.kiln"),
                         "--quantize", "minmax")
    assert status == 2 and "PyTorch model" in err
