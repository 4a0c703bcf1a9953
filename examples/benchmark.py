"""Benchmark kiln against eager PyTorch, torch.compile (inductor) and ONNX Runtime on the zoo.

    python examples/benchmark.py [--models mlp bert] [--batches 1 8] [--threads 2]
        [--repeat 30] [--backend llvm] [--skip torch.compile] [--json results.json]
    python examples/benchmark.py --quick --models mlp      # smoke test: batch 1, 3 repeats
    python examples/benchmark.py --matmul                  # only the 1024^3 fp32 matmul
    python examples/benchmark.py --compression --models resnet18_cifar resnet18 bert \
        --batches 1                                        # compressed variants vs fp32, ORT
    python examples/benchmark.py --backend cuda --batches 1 32 [--dtype float16]
                                                           # on an NVIDIA GPU (see below)
    python examples/benchmark.py --target avx2             # AVX2 code (and AVX2-limited
                                                           # PyTorch) on an AVX-512 host
    python examples/benchmark.py --load 2 --batches 1      # beside 2 busy processes
    python examples/benchmark.py --dynamic --models resnet18_cifar bert --batches 1 8
                                                           # kiln dynamic= vs static per size

Every runtime gets the same thread count (kiln uses at most that many: each call runs with the
count measured fastest, see backends/llvm/threads.py). For each model and batch the table gives
the median and p90 latency, the ratio to ONNX Runtime, the speed-up over eager, the achieved GFLOP/s
(FLOPs counted by kiln's op registry on the imported, unoptimized graph) as a share of the
machine's fp32 GEMM peak (torch.mm on 1024x1024 matrices, measured at startup), and the largest
error against eager relative to the output's largest magnitude. "compile s" is kiln.compile for
kiln, export plus session creation for ONNX Runtime and the first call for torch.compile
(inductor keeps compiled code in an on-disk cache, so a second run compiles much faster).
Timings are only as good as the machine is quiet: the load average is printed at the start.
A runtime that fails on a model is reported as n/a with the reason; the run goes on.

``--compression`` times, per model and batch, kiln fp32, kiln with 50% of the FLOPs pruned
(L1 criterion), kiln int8 and kiln pruned + int8 against ONNX Runtime fp32 in one run. The
zoo's weights are random, so the models are calibrated on random inputs and the error column
only says the outputs stay finite and comparable: accuracy is measured on real data by
examples/digits.py. "saved/removed" is the fraction of kiln fp32's time a variant saves over
the fraction of FLOPs it removes (1.0: time follows FLOPs exactly).

``--target avx2`` compiles kiln for AVX2 CPUs (AMD Zen 1-3, Intel before Ice Lake: no AVX-512,
no VNNI) and limits eager PyTorch, torch.compile and torch.mm's peak to AVX2 as well
(``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``); ONNX Runtime has
no such switch and runs its host kernels. ``--load N`` runs the zoo table beside N processes
that keep a core busy each, and adds kiln on one thread: on a loaded server kiln at all threads
should be no slower than twice that.

``--backend cuda`` runs everything on the GPU: kiln's CUDA backend (compiled from the CPU model,
called with CUDA tensors, which it reads and returns without a copy) against eager PyTorch and
torch.compile on CUDA tensors; every timed call ends with ``torch.cuda.synchronize()``, the
peak is torch.mm's on the GPU, and ONNX Runtime (installed for the CPU) is left out. It needs a
PyTorch that sees a CUDA GPU (this project installs the CPU build: install a CUDA build of the
same version for this). ``--dtype float16`` runs the models in half precision (``model.half()``)
on any backend.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_THREADS = 2
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# What limits each runtime to AVX2 (no AVX-512, no VNNI) for ``--target avx2``: kiln's target,
# PyTorch's own kernels, MKL and oneDNN. ONNX Runtime has no such switch.
AVX2_ENV = {"KILN_TARGET": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def early_options(argv: Sequence[str]) -> argparse.Namespace:
    """``--threads`` and ``--target`` in ``argv``, read before numpy/torch load."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    early.add_argument("--target", default="host")
    return early.parse_known_args(list(argv))[0]


def requested_threads(argv: Sequence[str]) -> int:
    """The ``--threads`` value in ``argv`` (or the default), read before numpy/torch load."""
    return early_options(argv).threads


if __name__ == "__main__":
    # OpenMP and the BLAS under NumPy (which kiln's reference backend calls) size their thread
    # pools from these variables when first loaded, and PyTorch, MKL and oneDNN pick their
    # instruction set then, so they are set before importing either.
    _early = early_options(sys.argv[1:])
    os.environ.update(dict.fromkeys(THREAD_ENV_VARS, str(_early.threads)))
    if _early.target == "avx2":
        os.environ.update(AVX2_ENV)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

import kiln  # noqa: E402
from kiln.backends import backend_names  # noqa: E402
from kiln.frontend.trace import trace_module  # noqa: E402
from kiln.ir import Graph, graph_flops  # noqa: E402
from kiln.zoo import ZOO, get_model  # noqa: E402

EAGER, KILN, TORCH_COMPILE, ORT = "eager", "kiln", "torch.compile", "onnxruntime"
KILN_1T = "kiln 1 thread"  # with --load: how kiln at all threads degrades against one thread
RUNTIMES = (EAGER, KILN, TORCH_COMPILE, ORT)
MATMUL_N = 1024


@dataclass
class Prepared:
    """A runtime ready to run one model: ``run()`` does one inference."""

    run: Callable[[], Any]
    compile_s: float
    source_graph: Graph | None = None  # kiln's imported graph, for counting FLOPs


@dataclass
class Result:
    """One runtime on one model at one batch size; the timing fields stay None when it failed."""

    model: str
    batch: int
    runtime: str
    flops: int | None = None
    compile_s: float | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    ratio_to_ort: float | None = None
    speedup_vs_eager: float | None = None
    gflops: float | None = None
    pct_peak: float | None = None
    max_rel_err: float | None = None
    error: str | None = None
    times_ms: list[float] | None = None


def time_ms(fn: Callable[[], Any], warmup: int, repeat: int,
            sync: Callable[[], Any] | None = None) -> list[float]:
    """Wall times of ``repeat`` calls of ``fn`` in milliseconds, after ``warmup`` untimed calls;
    ``sync`` (a GPU's synchronize) runs inside each timed call, so queued work counts."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def as_arrays(output: Any) -> list[np.ndarray]:
    """The tensors in a (possibly nested) model output, as NumPy arrays on the host (half
    precision widened to float32, which NumPy's error arithmetic needs)."""
    out = []
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.detach().cpu()
            out.append((leaf.float() if leaf.dtype in (torch.float16, torch.bfloat16)
                        else leaf).numpy())
        else:
            out.append(np.asarray(leaf))
    return out


def place(model: torch.nn.Module, inputs: tuple, args: argparse.Namespace
          ) -> tuple[torch.nn.Module, tuple]:
    """``model`` and ``inputs`` in the run's dtype, on its device (``--dtype``, ``--backend``)."""
    if args.dtype == "float16":
        model = model.half()
        inputs = tuple(x.half() if x.is_floating_point() else x for x in inputs)
    return model.to(args.device), tuple(x.to(args.device) for x in inputs)


def on_host(model: torch.nn.Module, inputs: tuple) -> tuple[torch.nn.Module, tuple]:
    """A host copy of ``model`` and ``inputs`` (kiln traces and compiles on the host)."""
    if all(x.device.type == "cpu" for x in inputs):
        return model, inputs
    return copy.deepcopy(model).cpu(), tuple(x.cpu() for x in inputs)


def max_rel_error(got: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> float:
    """Largest |got - expected| over all outputs, relative to that output's largest |expected|."""
    if len(got) != len(expected):
        raise ValueError(f"{len(got)} outputs, expected {len(expected)}")
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape:
            raise ValueError(f"output shape {g.shape}, expected {e.shape}")
        e64 = e.astype(np.float64)
        scale = max(float(np.abs(e64).max(initial=0.0)), 1e-12)
        worst = max(worst, float(np.abs(g.astype(np.float64) - e64).max(initial=0.0)) / scale)
    return worst


def kiln_compile_options(threads: int) -> dict[str, Any]:
    """Extra ``kiln.compile`` keywords: ``threads`` when this kiln version accepts it."""
    accepts = "threads" in inspect.signature(kiln.compile).parameters
    return {"threads": threads} if accepts else {}


def prepare_eager(model: torch.nn.Module, inputs: tuple, args: argparse.Namespace,
                  workdir: Path) -> Prepared:
    """Eager PyTorch: nothing to compile."""
    return Prepared(lambda: model(*inputs), 0.0)


def prepare_kiln(model: torch.nn.Module, inputs: tuple, args: argparse.Namespace,
                 workdir: Path) -> Prepared:
    """``kiln.compile`` on the chosen backend, called with torch tensors like eager (CUDA tensors
    on the cuda backend)."""
    t0 = time.perf_counter()
    compiled = kiln.compile(*on_host(model, inputs), backend=args.backend,
                            **kiln_compile_options(args.threads))
    compile_s = time.perf_counter() - t0
    return Prepared(lambda: compiled(*inputs), compile_s, compiled.source_graph)


def prepare_torch_compile(model: torch.nn.Module, inputs: tuple, args: argparse.Namespace,
                          workdir: Path) -> Prepared:
    """``torch.compile`` with inductor; it compiles on the first call, which is timed here."""
    torch._dynamo.reset()  # start each model with fresh caches and recompile limits
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    compiled(*inputs)
    return Prepared(lambda: compiled(*inputs), time.perf_counter() - t0)


def prepare_onnxruntime(model: torch.nn.Module, inputs: tuple, args: argparse.Namespace,
                        workdir: Path) -> Prepared:
    """Export with the TorchScript ONNX exporter (opset 17), open an ORT_ENABLE_ALL session."""
    import onnxruntime as ort

    path = str(workdir / "model.onnx")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(model, inputs, path, dynamo=False, opset_version=17)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise RuntimeError(f"the exported model takes {len(names)} inputs, not {len(inputs)}")
    feeds = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
    compile_s = time.perf_counter() - t0
    return Prepared(lambda: session.run(None, feeds), compile_s)


def prepare_kiln_one_thread(model: torch.nn.Module, inputs: tuple, args: argparse.Namespace,
                            workdir: Path) -> Prepared:
    """kiln on one thread, the baseline of ``--load``."""
    return prepare_kiln(model, inputs, argparse.Namespace(**{**vars(args), "threads": 1}),
                        workdir)


PREPARERS: dict[str, Callable[..., Prepared]] = {
    EAGER: prepare_eager,
    KILN: prepare_kiln,
    KILN_1T: prepare_kiln_one_thread,
    TORCH_COMPILE: prepare_torch_compile,
    ORT: prepare_onnxruntime,
}


def short_error(exc: BaseException) -> str:
    """A one-line description of ``exc`` for the table and the JSON."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}"[:300]


def bench_runtime(runtime: str, model: torch.nn.Module, inputs: tuple,
                  expected: list[np.ndarray] | None, args: argparse.Namespace,
                  workdir: Path, result: Result) -> tuple[list[np.ndarray], Graph | None]:
    """Prepare, check and time one runtime, filling ``result``; returns its outputs and, for
    kiln, the imported graph. Raises whatever the runtime raises."""
    with torch.no_grad():
        prepared = PREPARERS[runtime](model, inputs, args, workdir)
        result.compile_s = prepared.compile_s
        outputs = as_arrays(prepared.run())
        result.max_rel_err = max_rel_error(outputs, outputs if expected is None else expected)
        times = time_ms(prepared.run, args.warmup, args.repeat, args.sync)
    result.median_ms = statistics.median(times)
    result.p90_ms = float(np.percentile(times, 90))
    result.times_ms = times
    return outputs, prepared.source_graph


def bench_model(name: str, batch: int, args: argparse.Namespace,
                peak_gflops: float) -> list[Result]:
    """Every requested runtime on zoo model ``name`` at ``batch``. A runtime that fails gets a
    result with its error; eager runs first and is the reference for the others."""
    runtimes = [r for r in RUNTIMES if r not in args.skip]
    if args.load:
        runtimes.insert(runtimes.index(KILN) + 1, KILN_1T)
    results = [Result(name, batch, r) for r in runtimes]
    try:
        model, inputs = place(*get_model(name, batch=batch), args)
    except Exception as exc:
        for result in results:
            result.error = short_error(exc)
        return results

    expected: list[np.ndarray] | None = None
    source_graph: Graph | None = None
    with tempfile.TemporaryDirectory(prefix="kiln_bench_") as tmp:
        for result in results:
            if result.runtime != EAGER and expected is None:
                result.error = "no eager reference to check against"
                continue
            try:
                outputs, graph = bench_runtime(result.runtime, model, inputs, expected, args,
                                               Path(tmp), result)
            except Exception as exc:  # one runtime failing must not stop the benchmark
                result.error = short_error(exc)
                if args.verbose:
                    traceback.print_exc()
                continue
            if result.runtime == EAGER:
                expected = outputs
            source_graph = source_graph or graph

    try:
        flops = graph_flops(source_graph or trace_module(*on_host(model, inputs))[0])
    except Exception as exc:
        flops = None
        print(f"# no FLOP count for {name}: {short_error(exc)}", file=sys.stderr)
    fill_ratios(results, flops, peak_gflops)
    return results


def fill_ratios(results: Sequence[Result], flops: int | None, peak_gflops: float) -> None:
    """Set the ratio to ONNX Runtime, the speed-up over eager, GFLOP/s and % of peak."""
    by_runtime = {r.runtime: r.median_ms for r in results}
    ort_ms, eager_ms = by_runtime.get(ORT), by_runtime.get(EAGER)
    for r in results:
        r.flops = flops
        if r.median_ms is None:
            continue
        if ort_ms:
            r.ratio_to_ort = r.median_ms / ort_ms
        if eager_ms:
            r.speedup_vs_eager = eager_ms / r.median_ms
        if flops is not None:
            r.gflops = flops / (r.median_ms * 1e-3) / 1e9
            r.pct_peak = 100.0 * r.gflops / peak_gflops


def measure_mm_gflops(warmup: int, repeat: int, device: str = "cpu",
                      sync: Callable[[], Any] | None = None) -> tuple[float, float]:
    """GFLOP/s of torch.mm on two fp32 1024x1024 matrices, the machine's GEMM peak, at the
    median time and at the best time (the two part when other processes compete for the CPU)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(MATMUL_N, MATMUL_N, generator=gen).to(device)
    b = torch.randn(MATMUL_N, MATMUL_N, generator=gen).to(device)
    times = time_ms(lambda: torch.mm(a, b), warmup, repeat, sync)
    flops = 2 * MATMUL_N**3
    return flops / (statistics.median(times) * 1e-3) / 1e9, flops / (min(times) * 1e-3) / 1e9


class MatMulByConstant(torch.nn.Module):
    """``a @ b`` with ``b`` a constant weight, the shape of a dense layer's GEMM."""

    def __init__(self, b: torch.Tensor) -> None:
        super().__init__()
        self.b = torch.nn.Parameter(b, requires_grad=False)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a @ self.b


def bench_matmul(args: argparse.Namespace) -> dict[str, Any]:
    """torch.mm against kiln on a 1024x1024x1024 fp32 matmul (GFLOP/s and their ratio), on
    the run's device."""
    gen = torch.Generator().manual_seed(1)
    a_host = torch.randn(MATMUL_N, MATMUL_N, generator=gen)
    b_host = torch.randn(MATMUL_N, MATMUL_N, generator=gen)
    a, b = a_host.to(args.device), b_host.to(args.device)
    flops = 2 * MATMUL_N**3
    expected = torch.mm(a, b)
    torch_ms = statistics.median(time_ms(lambda: torch.mm(a, b), args.warmup, args.repeat,
                                         args.sync))
    report: dict[str, Any] = {"n": MATMUL_N, "flops": flops, "torch_ms": torch_ms,
                              "torch_gflops": flops / (torch_ms * 1e-3) / 1e9}
    try:
        module = MatMulByConstant(b_host).eval()
        t0 = time.perf_counter()
        compiled = kiln.compile(module, (a_host,), backend=args.backend,
                                **kiln_compile_options(args.threads))
        report["kiln_compile_s"] = time.perf_counter() - t0
        report["kiln_max_rel_err"] = max_rel_error(as_arrays(compiled(a)), as_arrays(expected))
        kiln_ms = statistics.median(time_ms(lambda: compiled(a), args.warmup, args.repeat,
                                            args.sync))
    except Exception as exc:
        report["kiln_error"] = short_error(exc)
        return report
    report["kiln_ms"] = kiln_ms
    report["kiln_gflops"] = flops / (kiln_ms * 1e-3) / 1e9
    report["kiln_over_torch"] = report["kiln_gflops"] / report["torch_gflops"]
    return report


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """CPU name, LLVM's name for the host CPU, core and thread counts, load, library versions.

    The 1-minute load average is there because other processes on the machine skew timings.
    """
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import llvmlite.binding as llvm

        from kiln.backends.llvm.compiler import default_target

        llvm_cpu = llvm.get_host_cpu_name()
        kiln_target = f"{default_target().name} ({default_target().cpu})"
    except Exception as exc:  # llvmlite is optional until the LLVM backend needs it
        llvm_cpu = kiln_target = f"n/a ({short_error(exc)})"
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    return {
        "cpu": cpu, "llvm_host_cpu": llvm_cpu, "logical_cpus": os.cpu_count(),
        "threads": args.threads, "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__, "onnxruntime": ort_version, "kiln": kiln.__version__,
        "kiln_backend": args.backend, "device": args.device_name, "dtype": args.dtype,
        "target": args.target, "kiln_target": kiln_target, "load_processes": args.load,
    }


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` when missing."""
    return "-" if value is None else format(value, spec)


HEADER = (f"{'model':<24}{'batch':>5}  {'runtime':<14}{'compile s':>9}{'median ms':>11}"
          f"{'p90 ms':>10}{'/ORT':>8}{'vs eager':>9}{'GFLOP/s':>9}{'%peak':>7}{'max rel err':>12}")


def format_row(r: Result) -> str:
    """One table line for ``r``; a failed runtime shows its error instead of numbers."""
    lead = f"{r.model:<24}{r.batch:>5}  {r.runtime:<14}"
    if r.error is not None:
        return lead + f"n/a: {r.error}"[:120]
    return lead + (f"{fmt(r.compile_s, '.2f'):>9}{fmt(r.median_ms, '.3f'):>11}"
                   f"{fmt(r.p90_ms, '.3f'):>10}{fmt(r.ratio_to_ort, '.2f'):>8}"
                   f"{fmt(r.speedup_vs_eager, '.2f') + 'x':>9}{fmt(r.gflops, '.1f'):>9}"
                   f"{fmt(r.pct_peak, '.1f'):>7}{fmt(r.max_rel_err, '.1e'):>12}")


def kiln_vs_ort_summary(results: Sequence[Result]) -> dict[str, Any]:
    """Geometric mean and worst of kiln's latency over ONNX Runtime's, over every model/batch
    where both ran."""
    ratios = [(r.ratio_to_ort, r.model, r.batch) for r in results
              if r.runtime == KILN and r.ratio_to_ort is not None]
    if not ratios:
        return {"pairs": 0}
    worst = max(ratios)
    return {"pairs": len(ratios),
            "geomean_kiln_over_ort": math.exp(statistics.fmean(math.log(x[0]) for x in ratios)),
            "worst_kiln_over_ort": worst[0], "worst_model": worst[1], "worst_batch": worst[2]}


def print_matmul(report: dict[str, Any]) -> None:
    """The matmul section of the report."""
    n = report["n"]
    print(f"\n{n}x{n}x{n} fp32 matmul (b constant)")
    print(f"  torch.mm  {report['torch_ms']:9.3f} ms  {report['torch_gflops']:8.1f} GFLOP/s")
    if "kiln_error" in report:
        print(f"  kiln      n/a: {report['kiln_error']}")
        return
    print(f"  kiln      {report['kiln_ms']:9.3f} ms  {report['kiln_gflops']:8.1f} GFLOP/s"
          f"  (compiled in {report['kiln_compile_s']:.2f} s,"
          f" max rel err {report['kiln_max_rel_err']:.1e})")
    print(f"  kiln/torch GFLOP/s ratio  {report['kiln_over_torch']:.3f}")


COMPRESSION_VARIANTS = {
    "kiln fp32": {},
    "kiln pruned 50%": {"prune": 0.5},
    "kiln int8": {"quantize": True},
    "kiln pruned+int8": {"prune": 0.5, "quantize": True},
}


def bench_compression(name: str, batch: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """kiln's compressed variants of one zoo model and ONNX Runtime fp32, timed in one run."""
    model, inputs = get_model(name, batch=batch)
    gen = torch.Generator().manual_seed(0)
    data = [tuple(torch.randn(x.shape, generator=gen) if x.is_floating_point() else x
                  for x in inputs) for _ in range(8)]
    with torch.no_grad():
        expected = as_arrays(model(*inputs))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kiln_bench_") as tmp:
        prepared = prepare_onnxruntime(model, inputs, args, Path(tmp))
        with torch.no_grad():
            err = max_rel_error(as_arrays(prepared.run()), expected)
            times = time_ms(prepared.run, args.warmup, args.repeat)
        rows.append({"model": name, "batch": batch, "variant": "onnxruntime fp32",
                     "median_ms": statistics.median(times), "flops": None, "max_rel_err": err})
        del prepared  # ORT's thread pool must not share the cores with kiln's timings
    for variant, options in COMPRESSION_VARIANTS.items():
        row: dict[str, Any] = {"model": name, "batch": batch, "variant": variant}
        try:
            t0 = time.perf_counter()
            compiled = kiln.compile(model, inputs, data=data if options else None,
                                    **options, **kiln_compile_options(args.threads))
            row["compile_s"] = time.perf_counter() - t0
            with torch.no_grad():
                row["max_rel_err"] = max_rel_error(as_arrays(compiled(*inputs)), expected)
                times = time_ms(lambda c=compiled: c(*inputs), args.warmup, args.repeat)
            row["median_ms"] = statistics.median(times)
            row["flops"] = graph_flops(compiled.graph)
            row["params"] = compiled.graph.num_parameters()
        except Exception as exc:  # one variant failing must not stop the benchmark
            row["error"] = short_error(exc)
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
    base = next(r for r in rows if r["variant"] == "kiln fp32")
    ort = rows[0]
    for r in rows:
        if r.get("median_ms") is None or base.get("median_ms") is None:
            continue
        r["speedup_vs_kiln_fp32"] = base["median_ms"] / r["median_ms"]
        r["speedup_vs_ort"] = ort["median_ms"] / r["median_ms"]
        if r.get("flops") and base.get("flops"):
            removed = 1.0 - r["flops"] / base["flops"]
            saved = 1.0 - r["median_ms"] / base["median_ms"]
            r["flops_removed"] = removed
            r["time_saved"] = saved
            r["saved_over_removed"] = saved / removed if removed > 0.01 else None
    return rows


COMPRESSION_HEADER = (f"{'model':<16}{'batch':>5}  {'variant':<18}{'median ms':>10}"
                      f"{'vs kiln fp32':>13}{'vs ORT fp32':>12}{'FLOPs -':>8}{'time -':>8}"
                      f"{'saved/removed':>14}{'max rel err':>12}")


def format_compression_row(r: dict[str, Any]) -> str:
    lead = f"{r['model']:<16}{r['batch']:>5}  {r['variant']:<18}"
    if "error" in r:
        return lead + f"n/a: {r['error']}"[:120]

    def pct(key: str) -> str:
        return "-" if r.get(key) is None else f"{100 * r[key]:.0f}%"

    return lead + (f"{fmt(r.get('median_ms'), '.3f'):>10}"
                   f"{fmt(r.get('speedup_vs_kiln_fp32'), '.2f') + 'x':>13}"
                   f"{fmt(r.get('speedup_vs_ort'), '.2f') + 'x':>12}{pct('flops_removed'):>8}"
                   f"{pct('time_saved'):>8}{fmt(r.get('saved_over_removed'), '.2f'):>14}"
                   f"{fmt(r.get('max_rel_err'), '.1e'):>12}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` changes the defaults of --repeat, --warmup, --batches."""
    names = backend_names()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(ZOO), default=list(ZOO),
                        metavar="MODEL", help=f"zoo models to run (default all: {list(ZOO)})")
    parser.add_argument("--batches", nargs="+", type=int,
                        help="batch sizes (default 1 8; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="threads for every runtime (default %(default)s)")
    parser.add_argument("--repeat", type=int, help="timed runs (default 30; 3 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 3; 1 --quick)")
    parser.add_argument("--backend", choices=names,
                        default="llvm" if "llvm" in names else "reference",
                        help="kiln backend (default %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="run the models in this precision (default %(default)s)")
    parser.add_argument("--skip", nargs="+", default=[], choices=[r for r in RUNTIMES
                                                                   if r != EAGER],
                        help="runtimes to leave out (eager is the reference and always runs)")
    parser.add_argument("--matmul", action="store_true",
                        help="run only the 1024^3 matmul comparison, not the zoo")
    parser.add_argument("--compression", action="store_true",
                        help="run the compression comparison (pruned / int8 variants of kiln "
                             "against kiln fp32 and ONNX Runtime fp32) instead of the zoo table")
    parser.add_argument("--target", choices=["host", "avx2"], default="host",
                        help="avx2: kiln compiles for AVX2 (no AVX-512/VNNI) and PyTorch, MKL "
                             "and oneDNN are limited to AVX2 too (ONNX Runtime cannot be)")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="time the zoo with N busy processes running beside it (one per "
                             "core: a loaded server), adding kiln on one thread as a baseline")
    parser.add_argument("--dynamic", action="store_true",
                        help="time kiln.compile(dynamic=...) against kiln compiled statically "
                             "for each size (interleaved), instead of the zoo table")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: batch 1, 3 repeats, 1 warm-up")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write all results here")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    args.batches = args.batches or ([1] if args.quick else [1, 8])
    args.repeat = args.repeat or (3 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.device, args.sync, args.device_name = "cpu", None, "cpu"
    if args.target == "avx2" and os.environ.get("KILN_TARGET") != "avx2":
        parser.error("--target avx2 must be seen before torch loads: run this file as a "
                     "script (python examples/benchmark.py --target avx2)")
    if args.compression and args.dtype != "float32":
        parser.error("--compression compares float32 variants; leave out --dtype")
    if args.backend == "cuda":
        if args.compression:
            parser.error("--compression compares variants on the CPU; leave out --backend cuda")
        if not torch.cuda.is_available():
            parser.error("--backend cuda benchmarks on a GPU, and PyTorch sees none "
                         "(torch.cuda.is_available() is False); this needs an NVIDIA GPU and a "
                         "CUDA build of torch (the project installs the CPU build)")
        args.device, args.sync = "cuda", torch.cuda.synchronize
        args.device_name = torch.cuda.get_device_name()
        if ORT not in args.skip:  # installed for the CPU: no GPU numbers to compare with
            args.skip.append(ORT)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark, print the report and optionally write it as JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args)
    print("command:", " ".join([sys.executable, *sys.argv]))
    print("machine:", ", ".join(f"{k} {v}" for k, v in info.items()))
    if info["load_avg_1m"] >= 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {info['load_avg_1m']} on {os.cpu_count()} CPUs before "
              "starting; other processes will make these timings noisy")
    peak, best = measure_mm_gflops(3, 20, args.device, args.sync)
    where = args.device_name if args.device == "cuda" else f"{args.threads} threads"
    print(f"fp32 GEMM peak (torch.mm {MATMUL_N}^3, {where}): {peak:.1f} GFLOP/s "
          f"median (best run {best:.1f}); %peak below is against the median")
    if args.device == "cuda":
        print("on the GPU: every runtime gets CUDA tensors and each timed call synchronizes; "
              "ONNX Runtime is left out (CPU build)")

    if args.target == "avx2":
        print("target avx2: kiln, PyTorch, MKL and oneDNN use AVX2 only "
              f"({', '.join(f'{k}={v}' for k, v in AVX2_ENV.items())}); ONNX Runtime still "
              "uses every instruction set of this CPU")
    busy = start_load(args.load)
    try:
        run_report(args, info, peak, best)
    finally:
        for p in busy:
            p.terminate()


def _spin() -> None:
    while True:
        pass


def start_load(n: int) -> list:
    """``n`` busy processes, each spinning on a core until terminated."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_spin, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    if procs:
        time.sleep(1.0)  # let them start and take their cores
        print(f"under load: {n} busy processes running beside the benchmark")
    return procs


def load_summary(results: Sequence[Result]) -> list[tuple[str, int, float, float | None]]:
    """Per model and batch: kiln at all threads over kiln at one thread, and ORT over kiln at
    one thread (both under the same load)."""
    out = []
    by_key: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        by_key.setdefault((r.model, r.batch), {})[r.runtime] = r
    for (model, batch), rs in by_key.items():
        one, allt, ort = rs.get(KILN_1T), rs.get(KILN), rs.get(ORT)
        if one and allt and one.median_ms and allt.median_ms:
            ort_ratio = ort.median_ms / one.median_ms if ort and ort.median_ms else None
            out.append((model, batch, allt.median_ms / one.median_ms, ort_ratio))
    return out


def dynamic_spec(name: str, inputs: tuple) -> dict:
    """What varies for a zoo model: the batch (and, for token inputs, the sequence)."""
    if inputs[0].dtype == torch.int64 and inputs[0].dim() == 2:
        # Bounded by the example's length (the zoo models' position tables): the model then
        # has one graph for every size (its table is sliced to the call's length).
        return {0: {0: "batch", 1: torch.export.Dim("seq", max=int(inputs[0].shape[1]))}}
    return {i: {0: "batch"} for i in range(len(inputs))}


def bench_dynamic(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """For each batch: one DynamicModel (compiled once, called at every batch) against kiln
    compiled statically at that batch; medians of interleaved rounds."""
    model, inputs = get_model(name, batch=args.batches[0])
    dyn = kiln.compile(model, inputs, dynamic=dynamic_spec(name, inputs),
                       **kiln_compile_options(args.threads))
    # Timed as a new size runs (power-of-two programs on row slices); a size called often
    # gets its own program in the background, and then times as a power of two does.
    dyn.compile_hot = 0
    rows = []
    for batch in args.batches:
        _, x = get_model(name, batch=batch)
        static = kiln.compile(model, x, **kiln_compile_options(args.threads))
        dyn(*x)
        times: dict[str, list[float]] = {"static": [], "dynamic": []}
        for _ in range(args.repeat):
            for key, fn in (("static", static), ("dynamic", dyn)):
                times[key] += time_ms(lambda f=fn, a=x: f(*a), 0, 5)
        st, dy = statistics.median(times["static"]), statistics.median(times["dynamic"])
        with dyn._lock:
            exact = any(k[0] == batch for k in dyn._programs)
        rows.append({"model": name, "batch": batch, "static_ms": st, "dynamic_ms": dy,
                     "ratio": dy / st, "runs": "own program" if exact else "row slices"})
    return rows


def run_report(args: argparse.Namespace, info: dict, peak: float, best: float) -> None:
    """The zoo table (or the compression table), the matmul comparison, the JSON report."""
    results: list[Result] = []
    if args.dynamic:
        print(f"\ndynamic vs static kiln, {args.repeat} interleaved rounds of 5 calls\n"
              f"{'model':<24}{'batch':>6}{'static ms':>11}{'dynamic ms':>12}{'ratio':>7}"
              "  dynamic runs on")
        for name in args.models:
            for r in bench_dynamic(name, args):
                print(f"{r['model']:<24}{r['batch']:>6}{r['static_ms']:>11.3f}"
                      f"{r['dynamic_ms']:>12.3f}{r['ratio']:>7.2f}  {r['runs']}", flush=True)
        return
    if args.compression:
        print(f"\nrepeat {args.repeat} after {args.warmup} warm-up\n{COMPRESSION_HEADER}")
        rows = []
        for name in args.models:
            for batch in args.batches:
                for r in bench_compression(name, batch, args):
                    rows.append(r)
                    print(format_compression_row(r), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"command": [sys.executable, *sys.argv],
                                             "machine": info, "compression": rows}, indent=2))
            print(f"\nwrote {args.json}")
        return
    if not args.matmul:
        print(f"\nrepeat {args.repeat} after {args.warmup} warm-up; "
              f"kiln backend {args.backend}, {args.dtype}\n{HEADER}")
        for name in args.models:
            for batch in args.batches:
                rows = bench_model(name, batch, args, peak)
                results.extend(rows)
                for r in rows:
                    print(format_row(r), flush=True)
    summary = kiln_vs_ort_summary(results)
    if args.load:
        print(f"\nunder load ({args.load} busy processes), relative to kiln on one thread:")
        for model, batch, ratio, ort_ratio in load_summary(results):
            ort_text = "n/a" if ort_ratio is None else f"{ort_ratio:.2f}x"
            print(f"  {model:<24} batch {batch:>3}: kiln {args.threads} threads {ratio:.2f}x, "
                  f"ORT {args.threads} threads {ort_text}")
    if summary["pairs"]:
        print(f"\nkiln/ORT latency over {summary['pairs']} model/batch pairs: geomean "
              f"{summary['geomean_kiln_over_ort']:.2f}, worst {summary['worst_kiln_over_ort']:.2f}"
              f" ({summary['worst_model']} batch {summary['worst_batch']})")

    matmul = bench_matmul(args)
    print_matmul(matmul)

    if args.json:
        report = {"command": [sys.executable, *sys.argv], "machine": info,
                  "peak_gflops": peak,
                  "peak_gflops_best_run": best, "load_avg_1m_at_end": os.getloadavg()[0],
                  "repeat": args.repeat, "warmup": args.warmup,
                  "results": [asdict(r) for r in results], "summary": summary,
                  "matmul": matmul}
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
