"""Bad input to the frontend gets a KilnError that names the node, the op and the source line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import kiln
from kiln.ir import UnsupportedOpError


class UsesBessel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return torch.special.bessel_j0(y)  # kiln has no Bessel functions


class ItemControlFlow(nn.Module):
    def forward(self, x):
        return x * x.sum().item()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_unsupported_op_names_op_and_source_line(frontend: str) -> None:
    with pytest.raises(UnsupportedOpError) as info:
        kiln.compile(UsesBessel().eval(), (torch.randn(2, 4),), frontend=frontend)
    msg = str(info.value)
    assert "bessel_j0" in msg
    assert "test_errors.py" in msg and "torch.special.bessel_j0(y)" in msg
    assert info.value.source is not None and info.value.node is not None


def test_training_mode_is_refused() -> None:
    with pytest.raises(kiln.KilnError, match="eval"):
        kiln.compile(nn.Linear(3, 3).train(), (torch.randn(1, 3),))


def test_wrong_input_shape_at_call_time() -> None:
    compiled = kiln.compile(nn.Linear(3, 2).eval(), (torch.randn(4, 3),))
    with pytest.raises(kiln.KilnError, match=r"expects f32\[4,3\]"):
        compiled(torch.randn(5, 3))
    with pytest.raises(kiln.KilnError, match="takes 1 inputs"):
        compiled(torch.randn(4, 3), torch.randn(4, 3))


def test_wrong_input_dtype_at_call_time() -> None:
    compiled = kiln.compile(nn.Linear(3, 2).eval(), (torch.randn(4, 3),))
    with pytest.raises(kiln.KilnError, match="expects f32"):
        compiled(torch.randn(4, 3, dtype=torch.float64).numpy())


def test_float64_model_is_refused_with_hint() -> None:
    with pytest.raises(kiln.KilnError, match="float64"):
        kiln.compile(nn.Linear(3, 2).double().eval(), (torch.randn(1, 3).double(),))


def test_data_dependent_python_value_is_refused() -> None:
    with pytest.raises(kiln.KilnError):
        kiln.compile(ItemControlFlow().eval(), (torch.randn(2, 2),), frontend="export")


def test_unknown_backend_and_pipeline() -> None:
    model, x = nn.Linear(2, 2).eval(), (torch.randn(1, 2),)
    with pytest.raises(kiln.KilnError, match="unknown backend"):
        kiln.compile(model, x, backend="tpu")
    with pytest.raises(kiln.KilnError):
        kiln.compile(model, x, pipeline="O9")


# ---- the public API's argument checks: KilnErrors, never raw TypeError/AttributeError --------
def test_compile_without_example_inputs() -> None:
    model = nn.Linear(3, 2).eval()
    for call in (lambda: kiln.compile(model), lambda: kiln.compile(model, None)):
        with pytest.raises(kiln.KilnError, match="no example inputs") as info:
            call()
        assert "tuple of tensors" in info.value.hint


@pytest.mark.parametrize("inputs, message", [
    (3, "must be a tuple of tensors, got int"),
    ("abc", "must be a tuple of tensors, got str"),
    ({"x": torch.randn(1, 3)}, "must be a tuple of tensors, got dict"),
    ((torch.randn(1, 3), 3), "example input 1 is of type int"),
    ([[torch.randn(1, 3)]], r"example input 0 \(input\) is of type list"),
    ((torch.randn(1, 3).numpy().astype(object),), "dtype object"),
])
def test_compile_refuses_bad_example_inputs(inputs, message: str) -> None:
    with pytest.raises(kiln.KilnError, match=message):
        kiln.compile(nn.Linear(3, 2).eval(), inputs)


def test_compile_refuses_what_is_not_a_module() -> None:
    x = (torch.randn(1, 3),)
    with pytest.raises(kiln.KilnError, match="got function"):
        kiln.compile(lambda t: t * 2, x)
    compiled = kiln.compile(nn.Linear(3, 2).eval(), x, backend="reference")
    with pytest.raises(kiln.KilnError, match="compiled already"):
        kiln.compile(compiled, x)


@pytest.mark.parametrize("option, message", [
    ({"backend": 3}, "unknown backend 3"),
    ({"backend": ["llvm"]}, "unknown backend"),
    ({"pipeline": 3}, "pipeline= takes a pipeline name or a list of pass names"),
    ({"pipeline": [3]}, "pipeline= takes"),
    ({"pipeline": ["no_such_pass"]}, "no pass named 'no_such_pass'"),
    ({"frontend": None}, "unknown frontend None"),
    ({"frontend": "onnx"}, "unknown frontend 'onnx'"),
])
def test_compile_refuses_bad_names_before_tracing(option: dict, message: str, monkeypatch
                                                  ) -> None:
    import kiln.api as api

    def no_trace(*args, **kwargs):
        raise AssertionError("traced before checking the options")

    monkeypatch.setattr(api, "trace_module", no_trace)
    with pytest.raises(kiln.KilnError, match=message):
        kiln.compile(nn.Linear(3, 2).eval(), (torch.randn(1, 3),), **option)


def test_optimize_and_compress_check_their_arguments() -> None:
    model = nn.Linear(3, 2).eval()
    with pytest.raises(kiln.KilnError, match="takes a kiln Graph, got NoneType"):
        kiln.optimize(None)
    graph = kiln.compile(model, (torch.randn(1, 3),), backend="reference").graph
    with pytest.raises(kiln.KilnError, match="pipeline= takes"):
        kiln.optimize(graph, 3)
    with pytest.raises(kiln.KilnError, match="must be a tuple of tensors, got int"):
        kiln.compress(model, [torch.randn(1, 3)], example_inputs=3)
    with pytest.raises(kiln.KilnError, match="example input 0 .* is of type int"):
        kiln.compress(model, [3])
    with pytest.raises(kiln.KilnError, match="got str"):
        kiln.compress("model.pt", [torch.randn(1, 3)])


def test_export_refuses_a_module_and_a_missing_path(tmp_path) -> None:
    model = nn.Linear(3, 2).eval()
    with pytest.raises(kiln.KilnError, match="takes a compiled model, got Linear") as info:
        kiln.export(model, tmp_path / "m.kiln")
    assert "kiln.compile" in info.value.hint
    with pytest.raises(kiln.KilnError, match="takes a compiled model, got Linear"):
        kiln.export(model)
    with pytest.raises(kiln.KilnError, match="got NoneType"):
        kiln.export(None, tmp_path / "m.kiln")
    compiled = kiln.compile(model, (torch.randn(1, 3),))
    with pytest.raises(kiln.KilnError, match="comes first"):
        kiln.export(tmp_path / "m.kiln", compiled)
    with pytest.raises(kiln.KilnError, match="needs the path"):
        kiln.export(compiled)
    with pytest.raises(kiln.KilnError, match="str or os.PathLike, got int"):
        kiln.export(compiled, 3)
    assert not any(tmp_path.iterdir())


def test_export_refuses_paths_it_cannot_or_must_not_write(tmp_path) -> None:
    compiled = kiln.compile(nn.Linear(3, 2).eval(), (torch.randn(1, 3),))
    (tmp_path / "file").write_text("keep")
    with pytest.raises(kiln.KilnError, match="file is not a directory"):
        kiln.export(compiled, tmp_path / "file" / "m.kiln")
    with pytest.raises(kiln.KilnError, match="does not exist"):
        kiln.export(compiled, tmp_path / "missing" / "m.kiln")
    with pytest.raises(kiln.KilnError, match="is a directory"):
        kiln.export(compiled, tmp_path, overwrite=True)
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(kiln.KilnError, match="not a regular file"):
        kiln.export(compiled, tmp_path / "link", overwrite=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(kiln.KilnError, match="not a regular file"):
        kiln.export(compiled, fifo, overwrite=True)
    assert fifo.is_fifo() and (tmp_path / "file").read_text() == "keep"


def test_export_reports_a_failed_write_as_a_kiln_error(tmp_path, monkeypatch) -> None:
    import kiln.api as api

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(api.artifact, "save", denied)
    compiled = kiln.compile(nn.Linear(3, 2).eval(), (torch.randn(1, 3),))
    with pytest.raises(kiln.KilnError, match="cannot write .*m.kiln: Permission denied"):
        kiln.export(compiled, tmp_path / "m.kiln")


# ---- dtypes kiln does not compile: bfloat16, float8 -------------------------------------------
LOW_PRECISION = [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_example_input_names_input_dtype_and_cast(dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(kiln.KilnError) as info:
        kiln.compile(nn.Linear(3, 2).eval(), (torch.randn(1, 3).to(dtype),))
    assert f"example input 0 (input) has dtype {name}" in info.value.message
    assert "x.float() (float32)" in info.value.hint and "x.half() (float16)" in info.value.hint


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend", ["llvm", "reference"])
def test_low_precision_input_at_call_time(dtype, backend: str) -> None:
    compiled = kiln.compile(nn.Linear(3, 2).eval(), (torch.randn(4, 3),), backend=backend)
    x = torch.randn(4, 3).to(dtype)
    name = str(dtype).removeprefix("torch.")
    for call in (compiled, compiled.profile) if backend == "llvm" else (compiled,):
        with pytest.raises(kiln.KilnError) as info:
            call(x)
        assert f"input 0 (%input_1) has dtype {name}" in info.value.message
        assert "compiled for f32[4,3]" in info.value.message
        assert info.value.hint == "cast it: x.to(torch.float32)"


def _dynamo_kiln_error(call) -> kiln.KilnError:
    """The KilnError a torch.compile'd call raised (Dynamo wraps a backend's error)."""
    with pytest.raises(Exception) as info:
        call()
    error = info.value
    while error is not None and not isinstance(error, kiln.KilnError):
        error = getattr(error, "inner_exception", None) or error.__cause__
    assert error is not None, f"no KilnError in {info.value!r}"
    return error


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_input_through_torch_compile(dtype) -> None:
    torch._dynamo.reset()
    model = nn.Linear(3, 2).eval()
    fast = torch.compile(model, backend="kiln")
    x = torch.randn(2, 3)
    torch.testing.assert_close(fast(x), model(x))
    name = str(dtype).removeprefix("torch.")
    # A new dtype makes Dynamo recompile: kiln sees it as an example input.
    error = _dynamo_kiln_error(lambda: fast(x.to(dtype)))
    assert f"has dtype {name}" in error.message and "l_" in error.message
    assert "x.float() (float32)" in error.hint
    torch._dynamo.reset()


def test_torch_compile_options_are_used_and_checked() -> None:
    from kiln.frontend import dynamo

    torch._dynamo.reset()
    model, x = nn.Linear(3, 2).eval(), torch.randn(2, 3)
    built = []
    original = dynamo._DynamoGraph._build

    def spy(self, inputs):
        original(self, inputs)
        built.append(self.compiled.backend)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamo._DynamoGraph, "_build", spy)
        torch.compile(model, backend="kiln", options={"backend": "reference"})(x)
    assert built == ["reference"]  # torch.compile passes options as one dict
    for options, message in (({"backnd": "reference"}, "unknown kiln option 'backnd'"),
                             ({"backend": "tpu"}, "unknown backend 'tpu'"),
                             ({"pipeline": 3}, "pipeline= takes")):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="kiln", options=options)
        error = _dynamo_kiln_error(lambda f=fast: f(x))
        assert message in str(error)
    torch._dynamo.reset()


# ---- source lines of code Python has no text for (`python -`, a REPL, exec) -----------------
class ReluInFile(nn.Module):
    def forward(self, x):
        return torch.relu(x)  # the line the relu node names


TYPED_IN = """
import torch

class Outer(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 2
"""


def test_source_line_after_a_frame_without_source_text() -> None:
    namespace: dict = {}
    exec(compile(TYPED_IN, "<stdin>", "exec"), namespace)
    model = namespace["Outer"](ReluInFile()).eval()
    graph = kiln.compile(model, (torch.randn(2, 3),), backend="reference",
                         pipeline="O0").source_graph
    sources = {n.op: n.source for n in graph.nodes}
    # The <stdin> frame has no code line: the next frame's "File ..." line is not its code.
    assert sources["relu"].startswith("test_errors.py:")
    assert sources["relu"].endswith("in forward: return torch.relu(x)  # the line the relu "
                                    "node names")
    assert sources["mul"] == "<stdin>:10 in forward"


def test_api_without_pytorch_says_what_is_missing() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # as if PyTorch were not installed
        import kiln
        try:
            from kiln import compile
        except ImportError as e:
            assert isinstance(e, kiln.KilnError), repr(e)
            print(e)
        print(kiln.load.__name__)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "kiln.compile needs PyTorch, which is not installed" in done.stdout
    assert "pip install torch" in done.stdout and done.stdout.endswith("load\n")
