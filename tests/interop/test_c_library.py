"""Export to C: the generated library, driven by examples/c/run_model.c in a subprocess, gives
the same bits as the compiled model in Python; the ``kiln export`` command writes C libraries
and artifacts and keeps existing outputs."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
from kiln.debug.cli import main
from kiln.interop.c_library import export_c, find_c_compiler
from kiln.zoo import get_model

EXAMPLE = Path(kiln.__file__).parent / "examples" / "c" / "run_model.c"
CC = find_c_compiler()
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) found")


def build_example(lib_dir: Path) -> Path:
    """Compile examples/c/run_model.c against the library in ``lib_dir``, warnings as errors."""
    exe = lib_dir / "run_model"
    subprocess.run([CC, "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", str(EXAMPLE),
                    f"-I{lib_dir}", f"-L{lib_dir}", "-lmodel", f"-Wl,-rpath,{lib_dir}",
                    "-o", str(exe)], check=True)
    return exe


def run_example(lib_dir: Path, inputs: list[np.ndarray], outputs: list[tuple],
                weights: Path | None = None) -> tuple[subprocess.CompletedProcess, list]:
    """Run the example on ``inputs``; returns the process and the outputs it wrote, shaped
    like ``outputs`` ((shape, dtype) pairs)."""
    in_paths = []
    for i, a in enumerate(inputs):
        in_paths.append(lib_dir / f"in{i}.bin")
        np.ascontiguousarray(a).tofile(in_paths[-1])
    out_paths = [lib_dir / f"out{j}.bin" for j in range(len(outputs))]
    done = subprocess.run([str(lib_dir / "run_model"),
                           str(weights or lib_dir / "model_weights.bin"),
                           *map(str, in_paths), *map(str, out_paths)],
                          capture_output=True, text=True)
    got = [np.fromfile(p, dt).reshape(shape) if done.returncode == 0 else None
           for p, (shape, dt) in zip(out_paths, outputs)]
    return done, got


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_c_library_matches_python(name: str, tmp_path: Path) -> None:
    model, inputs = get_model(name)
    compiled = kiln.compile(model, inputs, backend="llvm")
    arrays = [x.numpy() for x in inputs]
    want = compiled(*arrays)
    lib = export_c(compiled, tmp_path / "lib")
    build_example(lib)
    done, got = run_example(lib, arrays, [(want.shape, want.dtype)])
    assert done.returncode == 0, done.stderr
    assert np.array_equal(got[0], want)


class CopiesAndConstants(torch.nn.Module):
    """Outputs the wrapper fills itself: a copy of the input and a folded constant."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("c", torch.arange(6.0).reshape(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.relu(x), x, self.c * 2


def test_output_copies_and_constant_outputs(tmp_path: Path) -> None:
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    compiled = kiln.compile(CopiesAndConstants().eval(), (x,), backend="llvm")
    image = compiled.executable.program.image
    assert image.output_copies and image.copy_constants  # the case this test is about
    want = compiled(x.numpy())
    lib = export_c(compiled, tmp_path / "lib", threads=2)
    assert "static atomic_int kiln_threads = 2;" in (lib / "model.c").read_text()
    build_example(lib)
    done, got = run_example(lib, [x.numpy()], [(w.shape, w.dtype) for w in want])
    assert done.returncode == 0, done.stderr
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def test_wrong_weights_are_refused(tmp_path: Path) -> None:
    model, inputs = get_model("mlp")
    lib = export_c(kiln.compile(model, inputs), tmp_path / "lib")
    build_example(lib)
    weights = (lib / "model_weights.bin").read_bytes()
    header = (lib / "model.h").read_text()
    assert f"#define MODEL_WEIGHTS_BYTES {len(weights)}ULL" in header
    for bad in (weights[:-64], weights + b"\0"):
        (tmp_path / "bad.bin").write_bytes(bad)
        done, _ = run_example(lib, [inputs[0].numpy()], [((1, 10), np.float32)],
                              weights=tmp_path / "bad.bin")
        assert done.returncode == 1
        assert "is not the weights of this model" in done.stderr
    done, _ = run_example(lib, [inputs[0].numpy()], [((1, 10), np.float32)],
                          weights=tmp_path / "missing.bin")
    assert done.returncode == 1 and "cannot open" in done.stderr


def test_export_c_refuses_a_bad_name_and_a_full_directory(tmp_path: Path) -> None:
    model, inputs = get_model("mlp")
    compiled = kiln.compile(model, inputs)
    with pytest.raises(kiln.KilnError, match="not a C identifier"):
        export_c(compiled, tmp_path / "a", name="my-model")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(kiln.KilnError, match="not empty"):
        export_c(compiled, tmp_path / "full")
    reference = kiln.compile(model, inputs, backend="reference")
    with pytest.raises(kiln.KilnError, match="no native code"):
        export_c(reference, tmp_path / "b")


def test_cli_exports_c_and_keeps_existing_output(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mlp_c"
    assert main(["export", "mlp", "-o", str(out), "--format", "c"]) == 0
    assert {"model.h", "model.c", "model.o", "libmodel.so", "model_weights.bin"} <= {
        p.name for p in out.iterdir()}
    assert main(["export", "mlp", "-o", str(out), "--format", "c"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "mlp", "-o", str(out), "--format", "c", "--overwrite"]) == 0


def test_cli_exports_a_loadable_artifact(tmp_path: Path, capsys) -> None:
    path = tmp_path / "mlp.kiln"
    assert main(["export", "mlp", "-o", str(path), "--batch", "2"]) == 0
    model, inputs = get_model("mlp", batch=2)
    x = inputs[0].numpy()
    assert np.array_equal(kiln.load(path)(x), kiln.compile(model, inputs)(x))
    assert main(["export", "mlp", "-o", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "mlp", "-o", str(tmp_path / "t.kiln"), "--threads", "2"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_cli_onnx_format(tmp_path: Path, capsys, monkeypatch) -> None:
    pytest.importorskip("onnx")
    path = tmp_path / "mlp.onnx"
    assert main(["export", "mlp", "-o", str(path), "--format", "onnx"]) == 0
    assert path.stat().st_size > 0
    # Without kiln.interop.to_onnx the command says so instead of a traceback.
    monkeypatch.setitem(sys.modules, "kiln.interop.to_onnx", None)
    assert main(["export", "mlp", "-o", str(tmp_path / "b.onnx"), "--format", "onnx"]) == 2
    assert "ONNX export is not available" in capsys.readouterr().err


# ---- threads: one handle shared by threads is serialized; separate handles run in parallel --
class CLibrary:
    """A generated library loaded with ctypes (whose calls release the GIL, so Python threads
    call into it at the same time)."""

    def __init__(self, lib_dir: Path) -> None:
        self.lib = ctypes.CDLL(str(lib_dir / "libmodel.so"))
        self.lib.model_load.restype = ctypes.c_void_p
        self.lib.model_load.argtypes = [ctypes.c_char_p]
        self.lib.model_run.restype = ctypes.c_int
        self.lib.model_run.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                       ctypes.POINTER(ctypes.c_void_p)]
        self.lib.model_free.argtypes = [ctypes.c_void_p]
        self.lib.model_error.restype = ctypes.c_char_p
        self.weights = str(lib_dir / "model_weights.bin").encode()

    def load(self) -> int:
        handle = self.lib.model_load(self.weights)
        assert handle, self.lib.model_error()
        return handle

    def run(self, handle: int, x: np.ndarray, out_shape: tuple) -> np.ndarray:
        out = np.empty(out_shape, np.float32)
        ins = (ctypes.c_void_p * 1)(x.ctypes.data)
        outs = (ctypes.c_void_p * 1)(out.ctypes.data)
        assert self.lib.model_run(handle, ins, outs) == 0, self.lib.model_error()
        return out


def hammer(lib: CLibrary, handles: list[int], inputs: list[np.ndarray], want: list[np.ndarray],
           calls: int) -> int:
    """Thread t runs ``calls`` inferences on ``handles[t]``, cycling through ``inputs`` from
    its own offset; returns how many results differ from ``want`` in any bit."""
    wrong = [0] * len(handles)
    start = threading.Barrier(len(handles))

    def work(t: int) -> None:
        start.wait()
        for k in range(calls):
            i = (t + k) % len(inputs)
            if not np.array_equal(lib.run(handles[t], inputs[i], want[i].shape), want[i]):
                wrong[t] += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(handles))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(wrong)


@pytest.fixture(scope="module")
def lenet_library(tmp_path_factory):
    """lenet5 as a C library (one worker thread per call, so the Python threads are what runs
    concurrently), eight different inputs, and each one's single-threaded output. Batch 64
    makes a call long enough (about 1 ms) that concurrent calls overlap: without the mutex,
    4 threads x 50 calls on one handle gave 55 to 146 wrong results in every try."""
    model, (x,) = get_model("lenet5", batch=64)
    lib_dir = export_c(kiln.compile(model, (x,)), tmp_path_factory.mktemp("lenet") / "lib",
                       threads=1)
    lib = CLibrary(lib_dir)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(x.shape, generator=gen).numpy() for _ in range(8)]
    handle = lib.load()
    want = [lib.run(handle, a, (x.shape[0], 10)) for a in inputs]
    lib.lib.model_free(handle)
    with torch.no_grad():
        np.testing.assert_allclose(want[0], model(torch.from_numpy(inputs[0])).numpy(),
                                   rtol=1e-4, atol=1e-5)
    return lib_dir, lib, inputs, want


def test_one_handle_shared_by_threads(lenet_library) -> None:
    lib_dir, lib, inputs, want = lenet_library
    header = " ".join(line.lstrip(" */") for line in (lib_dir / "model.h").read_text().split("\n"))
    assert "run calls are serialized by a mutex of that model" in header
    assert "have their own arenas and mutexes and run in parallel" in header
    assert "pthread_mutex_lock(&model->lock)" in (lib_dir / "model.c").read_text()
    handle = lib.load()
    try:
        assert hammer(lib, [handle] * 4, inputs, want, calls=50) == 0
    finally:
        lib.lib.model_free(handle)


def test_separate_handles_from_separate_threads(lenet_library) -> None:
    _, lib, inputs, want = lenet_library
    handles = [lib.load(), lib.load()]
    try:
        assert hammer(lib, handles, inputs, want, calls=50) == 0
    finally:
        for h in handles:
            lib.lib.model_free(h)


class TensorInfo(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_int), ("ndim", ctypes.c_int32),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("numel", ctypes.c_int64),
                ("nbytes", ctypes.c_size_t)]


def test_dynamic_model_library_takes_sizes(tmp_path: Path) -> None:
    model, (x,) = get_model("lenet5")
    dyn = kiln.compile(model, (x,), dynamic=True)
    batches = (1, 3, 8)
    inputs = {b: torch.randn(b, *x.shape[1:], generator=torch.Generator().manual_seed(b))
              for b in batches}
    for b in batches[1:]:
        dyn.specialize(inputs[b])
    lib_dir = export_c(dyn, tmp_path / "lib")
    header = (lib_dir / "model.h").read_text()
    assert "#define MODEL_NUM_PROGRAMS 3" in header and 'MODEL_SIZE0_NAME "batch"' in header
    lib = ctypes.CDLL(str(lib_dir / "libmodel.so"))
    lib.model_load.restype = ctypes.c_void_p
    lib.model_load.argtypes = [ctypes.c_char_p]
    lib.model_run.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64),
                              ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
    lib.model_input_info.restype = ctypes.POINTER(TensorInfo)
    lib.model_error.restype = ctypes.c_char_p
    lib.model_free.argtypes = [ctypes.c_void_p]
    handle = lib.model_load(str(lib_dir / "model_weights.bin").encode())
    assert handle, lib.model_error()
    try:
        programs = []
        for p in range(3):
            sizes = (ctypes.c_int64 * 1)()
            assert lib.model_program_sizes(p, sizes) == 0
            info = lib.model_input_info(p, 0).contents
            assert info.shape[0] == sizes[0] and info.numel == sizes[0] * 32 * 32
            programs.append(sizes[0])
        assert sorted(programs) == list(batches)
        assert lib.model_program_sizes(3, (ctypes.c_int64 * 1)()) == -1
        def check(xb: torch.Tensor) -> None:
            a, b = xb.numpy(), xb.shape[0]
            out = np.empty((b, 10), np.float32)
            rc = lib.model_run(handle, (ctypes.c_int64 * 1)(b),
                               (ctypes.c_void_p * 1)(a.ctypes.data),
                               (ctypes.c_void_p * 1)(out.ctypes.data))
            assert rc == 0, lib.model_error()
            with torch.no_grad():
                np.testing.assert_allclose(out, model(xb).numpy(), rtol=1e-4, atol=1e-5)

        for b in batches:
            check(inputs[b])
        # Row counts without a program run on row slices: 2 = 1 + 1, 12 = 8 + 3 + 1.
        assert "#define MODEL_ROWS_SIZE 0" in header
        for b in (2, 12):
            check(torch.randn(b, *x.shape[1:], generator=torch.Generator().manual_seed(b)))
        out = np.empty((2, 10), np.float32)
        a = np.zeros((2, 1, 32, 32), np.float32)
        assert lib.model_run(handle, (ctypes.c_int64 * 1)(0), (ctypes.c_void_p * 1)(a.ctypes.data),
                             (ctypes.c_void_p * 1)(out.ctypes.data)) == -1
        assert b"no program for these sizes; this library has: batch=" in lib.model_error()
        assert lib.model_run(handle, (ctypes.c_int64 * 1)(1000), (ctypes.c_void_p * 1)(
            a.ctypes.data), (ctypes.c_void_p * 1)(out.ctypes.data)) == -1   # 125 parts
    finally:
        lib.model_free(handle)


class _Tokens(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, ids):
        return self.emb(ids) * 2.0


@pytest.mark.parametrize("dynamic", [False, True])
def test_out_of_range_token_ids_are_refused(tmp_path: Path, dynamic: bool) -> None:
    """The kernels clamp an index into its axis (memory stays safe); the library's run
    function refuses such an input instead of answering from the clamped index, naming the
    input and the range, and the next good call runs. A dynamic model checks each row slice."""
    torch.manual_seed(0)
    model = _Tokens().eval()
    ids = torch.tensor([[1, 2, 3]])
    compiled = kiln.compile(model, (ids,), dynamic=dynamic)
    if dynamic:
        compiled.specialize(torch.zeros(2, 3, dtype=torch.int64))
    lib_dir = export_c(compiled, tmp_path / "lib")
    lib = ctypes.CDLL(str(lib_dir / "libmodel.so"))
    lib.model_load.restype = ctypes.c_void_p
    lib.model_load.argtypes = [ctypes.c_char_p]
    lib.model_error.restype = ctypes.c_char_p
    lib.model_free.argtypes = [ctypes.c_void_p]
    handle = lib.model_load(str(lib_dir / "model_weights.bin").encode())
    assert handle, lib.model_error()

    def run(x: np.ndarray) -> tuple[int, np.ndarray]:
        out = np.full(x.shape + (4,), np.nan, np.float32)
        args = [ctypes.c_void_p(handle)]
        if dynamic:
            args.append((ctypes.c_int64 * 1)(x.shape[0]))
        args += [(ctypes.c_void_p * 1)(x.ctypes.data), (ctypes.c_void_p * 1)(out.ctypes.data)]
        return lib.model_run(*args), out

    try:
        rows = (1, 3) if dynamic else (1,)   # batch 3 runs as the programs of 2 and 1 rows
        for b in rows:
            good = np.arange(3 * b, dtype=np.int64).reshape(b, 3) % 10
            rc, out = run(good)
            assert rc == 0, lib.model_error()
            with torch.no_grad():
                np.testing.assert_allclose(out, model(torch.from_numpy(good)).numpy())
            for bad in (10, -1):
                x = good.copy()
                x[-1, -1] = bad   # in the last row slice of a split batch
                rc, _ = run(x)
                assert rc == -1
                msg = lib.model_error().decode()
                assert "out of range [0, 10)" in msg and "token ids" in msg, msg
        assert run(np.zeros((1, 3), np.int64))[0] == 0
    finally:
        lib.model_free(handle)
