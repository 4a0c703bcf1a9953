"""The ``kiln`` debugging tool: its commands run in-process through ``main``, plus one run of
the installed module as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kiln.debug import load_model, show
from kiln.debug.cli import main
from kiln.ir import KilnError

FACTORY_FILE = """
import torch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


def build():
    return Tiny().eval(), (torch.randn(2, 8),)


def broken():
    raise RuntimeError("no weights here")


def wrong_type():
    return 42
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``kiln argv...`` in-process; returns (status, stdout, stderr)."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny_model.py"
    path.write_text(textwrap.dedent(FACTORY_FILE))
    return path


def test_no_arguments_prints_help(capsys):
    status, out, _ = run(capsys)
    assert status == 0
    assert "usage: kiln" in out and "profile" in out


def test_passes_lists_passes_and_pipelines(capsys):
    status, out, _ = run(capsys, "passes")
    assert status == 0
    assert "fold_batchnorm" in out and "exact" in out
    assert "O1:" in out


def test_show_input_graph(capsys):
    status, out, _ = run(capsys, "show", "mlp", "--after", "input")
    assert status == 0
    assert "graph" in out and "linear" in out


def test_show_after_fold_batchnorm_removes_batch_norm(capsys):
    _, before, _ = run(capsys, "show", "resnet18_cifar", "--after", "input")
    status, after, _ = run(capsys, "show", "resnet18_cifar", "--after", "fold_batchnorm")
    assert status == 0
    assert "batch_norm(" in before
    assert "batch_norm(" not in after


def test_show_second_occurrence_matches_whole_pipeline():
    assert show("mlp", after="dce#2") == show("mlp")
    assert show("mlp", after="dce") == show("mlp", after="dce#1")


def test_show_unknown_pass_lists_pipeline_stages(capsys):
    status, out, err = run(capsys, "show", "mlp", "--after", "no_such_pass")
    assert status == 2 and out == ""
    assert err.startswith("kiln: error:")
    assert "fold_batchnorm" in err and "dce#2" in err


@pytest.mark.parametrize("stage, expect", [
    ("fuse", "anchor (dense)"),          # the fusion plan
    ("lower", "kernel k0_fc1("),         # kernel IR as lowered
    ("vectorize", "f32x"),               # vector kernel IR
    ("memory_plan", "# arena"),
    ("llvm_ir", "@kiln_run("),
    ("codegen", "@kiln_run("),           # the backend's first code stage
    ("object", "object code for"),       # assembly
])
def test_show_after_kernel_and_code_stages(capsys, stage, expect):
    status, out, _ = run(capsys, "show", "mlp", "--after", stage)
    assert status == 0 and expect in out


def test_show_lists_kernel_stages_for_a_bad_name(capsys):
    status, _, err = run(capsys, "show", "mlp", "--after", "vectorise")
    assert status == 2 and "vectorize" in err and "llvm_ir" in err and "object" in err


def test_file_factory_spec(capsys, model_file):
    status, out, _ = run(capsys, "show", f"{model_file}:build", "--after", "input")
    assert status == 0
    assert "graph Tiny" in out and "linear" in out and "relu" in out


@pytest.mark.parametrize("spec, message", [
    ("no_such_model", "resnet18"),                     # the error lists the zoo names
    ("missing_dir/model.py:build", "does not exist"),
])
def test_bad_spec_exits_2(capsys, spec, message):
    status, out, err = run(capsys, "show", spec)
    assert status == 2 and out == ""
    assert err.startswith("kiln: error:") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("factory, message", [
    ("no_factory", "build"),                           # lists the functions the file has
    ("broken", "no weights here"),
    ("wrong_type", "(module, example_inputs)"),
])
def test_bad_factory_exits_2(capsys, model_file, factory, message):
    status, _, err = run(capsys, "show", f"{model_file}:{factory}")
    assert status == 2
    assert err.startswith("kiln: error:") and message in err


def test_load_model_raises_kiln_error():
    with pytest.raises(KilnError, match="unknown model"):
        load_model("no_such_model")
    module, inputs, name = load_model("mlp")
    assert name == "mlp" and isinstance(inputs, tuple)


def test_profile_prints_table(capsys):
    status, out, _ = run(capsys, "profile", "mlp", "--repeat", "3", "--threads", "1")
    assert status == 0
    assert "linear" in out and "GFLOP/s" in out and "total" in out and "peaks:" in out
    assert "compute" in out or "memory" in out


@pytest.mark.parametrize("command", [[], ["passes"], ["show"], ["profile"], ["bisect"], ["minify"],
                                     ["trace"], ["export"], ["compare"]])
def test_help_exits_0(capsys, command):
    status, out, _ = run(capsys, *command, "--help")
    assert status == 0
    assert "usage: kiln" in out


def test_usage_error_exits_2(capsys):
    status, _, err = run(capsys, "profile", "mlp", "--repeat", "0")
    assert status == 2 and "--repeat" in err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "kiln.debug.cli", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "usage: kiln" in result.stdout


# ---- output paths: refused or reported in one error line, exit 2, never a traceback ---------
def clean_error(status: int, err: str, message: str) -> None:
    """The command failed the way a user error must: status 2 and a kiln error, no traceback."""
    assert status == 2, err
    assert err.startswith("kiln: error:") and message in err.splitlines()[0], err
    assert "Traceback" not in err


@pytest.fixture
def paths(tmp_path):
    """A regular file, a non-empty folder and a FIFO (a non-regular file) to write over."""
    (tmp_path / "file").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    os.mkfifo(tmp_path / "fifo")
    yield tmp_path
    assert (tmp_path / "file").read_text() == "mine"
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "fifo").is_fifo()


@pytest.mark.parametrize("argv, message", [
    (["export", "mlp", "-o", "file/x.kiln"], "file is not a directory"),
    (["export", "mlp", "-o", "file/x.onnx", "--format", "onnx"], "file is not a directory"),
    (["export", "mlp", "-o", "file/lib", "--format", "c"], "file is not a directory"),
    (["export", "mlp", "-o", "file/a/b", "--format", "c"], "file is not a directory"),
    (["export", "mlp", "-o", "missing/x.kiln"], "missing does not exist"),
    (["export", "mlp", "-o", "file"], "file already exists"),
    (["export", "mlp", "-o", "fifo", "--overwrite"], "fifo exists and is not a regular file"),
    (["export", "mlp", "-o", "full"], "full is a directory"),
    (["export", "mlp", "-o", "full", "--format", "c"], "full already exists and is not empty"),
    (["trace", "mlp", "-o", "file"], "file exists and is not a directory"),
    (["trace", "mlp", "-o", "file/t"], "file is not a directory"),
    (["trace", "mlp", "-o", "fifo", "--overwrite"], "fifo exists and is not a directory"),
    (["trace", "mlp", "-o", "full"], "full already exists and is not empty"),
    (["minify", "mlp", "-o", "file/m", "--passes", "dce"], "file is not a directory"),
])
def test_output_path_errors(capsys, paths, monkeypatch, argv, message):
    monkeypatch.chdir(paths)
    status, out, err = run(capsys, *argv)
    clean_error(status, err, message)
    assert sorted(p.name for p in paths.iterdir()) == ["fifo", "file", "full"]


def test_trace_overwrite_writes_into_a_folder_and_keeps_other_files(capsys, paths):
    status, _, err = run(capsys, "trace", "mlp", "-o", str(paths / "full"), "--overwrite")
    assert status == 0, err
    assert {"keep.txt", "table.tsv", "report.html", "000_input.txt"} <= {
        p.name for p in (paths / "full").iterdir()}


def _denied(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))


def test_unwritable_output_is_one_error_line(capsys, tmp_path, monkeypatch):
    """A write the system refuses (a read-only folder, a full disk) is reported, not raised:
    simulated here, since root may write anywhere."""
    import importlib

    import kiln.runtime.artifact

    # kiln.debug.trace is also the name of the function kiln.debug exports.
    monkeypatch.setattr(importlib.import_module("kiln.debug.trace"), "_write_tsv", _denied)
    status, _, err = run(capsys, "trace", "mlp", "-o", str(tmp_path / "t"))
    clean_error(status, err, "table.tsv: Permission denied")
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setattr(kiln.runtime.artifact, "save", _denied)
    status, _, err = run(capsys, "export", "mlp", "-o", str(tmp_path / "m.kiln"))
    clean_error(status, err, "m.kiln: Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("argv", [["export", "mlp", "-o", "ro/x.kiln"],
                                  ["export", "mlp", "-o", "ro/lib", "--format", "c"],
                                  ["trace", "mlp", "-o", "ro/t"]])
def test_read_only_folder(capsys, tmp_path, monkeypatch, argv):
    (tmp_path / "ro").mkdir(mode=0o500)
    monkeypatch.chdir(tmp_path)
    status, _, err = run(capsys, *argv)
    clean_error(status, err, "ro")
    assert not any((tmp_path / "ro").iterdir())


def test_export_signs_with_sign_key(tmp_path, capsys) -> None:
    ed25519 = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
    from cryptography.hazmat.primitives import serialization

    import kiln
    from kiln.runtime.artifact import ArtifactError

    key = ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "k.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    out = tmp_path / "m.kiln"
    assert main(["export", "mlp", "-o", str(out), "--sign-key", str(pem)]) == 0
    assert kiln.load(out, trusted_keys=[key.public_key()]).manifest["signed_by"]
    with pytest.raises(ArtifactError, match="not a trusted key"):
        kiln.load(out, trusted_keys=[ed25519.Ed25519PrivateKey.generate().public_key()])
    # A bad key is refused before compiling; a C library cannot be signed.
    (tmp_path / "bad.pem").write_text("nope")
    assert main(["export", "mlp", "-o", str(tmp_path / "x.kiln"), "--sign-key",
                 str(tmp_path / "bad.pem")]) == 2
    assert main(["export", "mlp", "-o", str(tmp_path / "c"), "--format", "c",
                 "--sign-key", str(pem)]) == 2
    assert "--sign-key" in capsys.readouterr().err
    assert not (tmp_path / "x.kiln").exists() and not (tmp_path / "c").exists()


def test_trace_dynamic_writes_the_graph_for_every_size(tmp_path, capsys) -> None:
    out = tmp_path / "trace"
    assert main(["trace", "mlp", "-o", str(out), "--backend", "reference", "--dynamic"]) == 0
    text = (out / "symbolic.txt").read_text()
    assert "size batch in 1..1048576" in text and "f32[batch," in text
    assert "rows: the rows of batch never meet" in capsys.readouterr().out
