"""The ``kiln`` command: list passes, show a model's IR after any pass, profile its kernels.

    kiln passes
    kiln show resnet18 --after fold_batchnorm
    kiln show mlp --after vectorize            # kernel IR; llvm_ir / object: the code
    kiln profile mlp --threads 4
    kiln bisect resnet18_cifar --pipeline O1
    kiln bisect resnet18_cifar --backend llvm  # down to the first wrong kernel and its stage
    kiln minify mlp --passes fold_batchnorm,my_pass -o /tmp/repro
    kiln trace resnet18_cifar -o /tmp/trace
    kiln export resnet18 -o /tmp/resnet18_c --format c
    kiln export resnet18_cifar -o /tmp/r.onnx --format onnx --prune 0.5 --quantize percentile
    kiln export bert -o /tmp/bert.onnx --format onnx --dynamic '0=batch,1=seq<=512'
    kiln export resnet18_cifar -o /tmp/r_gpu.kiln --format cuda
    kiln compare resnet18_cifar --prune 0.3 --quantize minmax
    kiln tune resnet18 --budget 60
    kiln search mlp --data digits --train-epochs 10 --max-drop 0.01 --budget 120 -o s.html

Errors a user can cause (a bad model or option, an output path that cannot or must not be
written) print ``kiln: error: <message>`` on stderr, no traceback, and exit with status 2;
``bisect`` and ``minify`` exit with status 1 when they find a failing pass.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kiln.debug.bisect import bisect, parse_pass_list, resolve_passes
from kiln.debug.minify import check_failure, minify, write_repro
from kiln.debug.model_arg import SPEC_HELP, is_onnx_spec, load_graph, load_model
from kiln.debug.profiling import format_table, measure_peaks, profile
from kiln.debug.stages import INPUT_STAGE, show
from kiln.debug.trace import check_output_dir, trace
from kiln.debug.trace import format_table as format_trace_table
from kiln.frontend.trace import FRONTENDS
from kiln.ir import KilnError
from kiln.passes import PIPELINES, PassManager, all_passes


def _cmd_passes(args: argparse.Namespace) -> None:
    passes = all_passes()
    width = max(len(name) for name in passes)
    print("passes:")
    for name, pass_ in passes.items():
        print(f"  {name:<{width}}  {pass_.numerics:<7}  {pass_.description}")
    print("pipelines:")
    for name, names in PIPELINES.items():
        print(f"  {name}: {' -> '.join(names) if names else '(no passes)'}")


def _cmd_show(args: argparse.Namespace) -> None:
    print(show(args.model, args.after, args.pipeline, args.frontend, args.backend))


def _cmd_profile(args: argparse.Namespace) -> None:
    rows = profile(args.model, args.threads, args.repeat, args.batch)
    print(format_table(rows, measure_peaks(args.threads)))


def _cmd_tune(args: argparse.Namespace) -> None:
    import time

    import torch

    import kiln

    model, inputs, _ = load_model(args.model, batch=args.batch)
    options = {"budget_s": args.budget, "progress": not args.quiet}
    t0 = time.perf_counter()
    untuned = kiln.compile(model, inputs, threads=args.threads, target=args.target)
    tuned = kiln.compile(model, inputs, threads=args.threads, target=args.target, tune=options)
    print(tuned.tuning.table())
    print(f"compile with tuning (untuned compile included): {time.perf_counter() - t0:.1f} s")
    with torch.no_grad():
        for compiled in (untuned, tuned):
            compiled.executable.program.threads(args.threads, adaptive=False)
        times = {"untuned": [], "tuned": []}
        for _ in range(args.repeat):
            for name, compiled in (("untuned", untuned), ("tuned", tuned)):
                compiled(*inputs)
                t = time.perf_counter()
                compiled(*inputs)
                times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"median of {args.repeat} interleaved runs: untuned {med['untuned']:.3f} ms, tuned "
          f"{med['tuned']:.3f} ms ({med['untuned'] / med['tuned']:.2f}x)")


def _cmd_bisect(args: argparse.Namespace) -> int:
    result = bisect(args.model, args.pipeline, parse_pass_list(args.passes), args.frontend)
    print(result.report())
    if result.failed or args.backend == "reference":
        return 1 if result.failed else 0
    # The graph passes are right: check every kernel the backend makes, on the example inputs.
    from kiln.debug.kernels import bisect_kernels
    from kiln.debug.model_arg import load_checked

    graph, arrays, _, _ = load_checked(args.model, frontend=args.frontend)
    graph = PassManager(resolve_passes(args.pipeline, parse_pass_list(args.passes))).run(graph)
    kernels = bisect_kernels(graph, arrays, args.backend)
    print(f"kernels of the {args.backend} backend against the reference:")
    print(kernels.report())
    return 1 if kernels.failed else 0


def _cmd_minify(args: argparse.Namespace) -> int:
    # The repro's three files replace their namesakes in the folder; nothing else is touched.
    check_output_dir(Path(args.output), overwrite=True)
    passes = resolve_passes(args.pipeline, parse_pass_list(args.passes))
    graph, _, _ = load_graph(args.model, frontend=args.frontend)
    if args.backend != "reference":
        return _minify_kernels(args, PassManager(passes).run(graph))
    failure = check_failure(graph, passes, args.seed)
    if failure is None:
        print(f"no failure: {', '.join(p.name for p in passes) or 'the empty pipeline'} "
              "runs and matches the unoptimized graph; nothing to minify")
        return 0
    print(f"failure ({failure.kind}): {failure.message}")
    small = minify(graph, passes, seed=args.seed)
    repro = write_repro(small, passes, args.output, args.seed)
    print(f"minified {len(graph.nodes)} -> {len(small.nodes)} nodes:")
    print(small, end="")
    print(f"wrote {repro.parent / 'minified.txt'}, {repro.parent / 'constants.npz'}, {repro}")
    return 1


def _minify_kernels(args: argparse.Namespace, graph) -> int:
    """``kiln minify --backend llvm``: shrink a graph (graph passes already run) while the
    backend still makes a wrong kernel at the same stage."""
    from kiln.debug.minify import kernel_failure_predicate

    try:
        predicate, stage = kernel_failure_predicate(graph, args.seed)
    except KilnError as e:
        print(f"no failure: {e.message}; nothing to minify")
        return 0
    print(f"failure: a kernel of the {args.backend} backend is wrong after stage {stage}")
    small = minify(graph, predicate=predicate)
    repro = write_repro(small, [], args.output, args.seed)
    print(f"minified {len(graph.nodes)} -> {len(small.nodes)} nodes:")
    print(small, end="")
    print(f"wrote {repro.parent / 'minified.txt'}, {repro.parent / 'constants.npz'}, {repro}")
    return 1


def _cmd_trace(args: argparse.Namespace) -> None:
    check_output_dir(Path(args.output), args.overwrite, "--overwrite")
    kernels: list = []
    backend = None if args.backend == "reference" else args.backend
    rows = trace(args.model, args.output, args.pipeline, args.frontend,
                 overwrite=args.overwrite, backend=backend, kernels=kernels,
                 partition_stages=args.stages)
    print(format_trace_table(rows))
    if kernels:
        from kiln.debug.trace_kernels import format_kernels

        print(format_kernels(kernels))
    print(f"wrote {len(rows)} stages (.txt, .diff), table.tsv and report.html to {args.output}")
    if args.dynamic is not None:
        _write_symbolic(args)


def _write_symbolic(args: argparse.Namespace) -> None:
    """``kiln trace --dynamic``: the optimized graph for every size (named sizes in its types,
    kiln.ir.sizes) as ``symbolic.txt``, and whether the rows of a size run apart."""
    import kiln

    if is_onnx_spec(args.model):
        raise KilnError("--dynamic declares dimensions of a PyTorch model; an ONNX model "
                        "keeps its own dim_params", hint="leave --dynamic out")
    module, inputs, _ = load_model(args.model, None)
    model = kiln.compile(module, inputs, dynamic=_dynamic_dims(args.dynamic),
                         frontend=args.frontend, pipeline=args.pipeline)
    graph = model.symbolic_graph()
    path = Path(args.output) / "symbolic.txt"
    path.write_text(str(graph))
    sizes = ", ".join(f"{lo} <= {n} <= {hi}" for n, (lo, hi) in graph.sizes.items())
    name, why = model.rows
    print(f"wrote the graph for every size ({sizes}) to {path}; rows: {why}")


def _cmd_export(args: argparse.Namespace) -> None:
    import kiln
    from kiln.api import check_output_file

    out = Path(args.output)
    # Checked before compiling, and again by the writer: an existing output is replaced only
    # with --overwrite, and only a regular file (or, for --format c, a folder) ever is.
    if args.format == "c":
        check_output_dir(out, args.overwrite, "--overwrite")
    elif out.is_dir():
        raise KilnError(f"{out} is a directory", hint=f"--format {args.format} writes one file")
    else:
        check_output_file(out, args.overwrite, "--overwrite")
    if args.sign_key and args.format not in ("kiln", "cuda"):
        raise KilnError(f"--sign-key signs kiln artifacts; --format {args.format} writes none",
                        hint="use --format kiln or cuda")
    if args.sign_key:  # a bad key fails now, not after compiling
        from kiln.runtime.artifact.signing import private_key

        private_key(args.sign_key)
    if args.dynamic is not None and args.format != "onnx":
        raise KilnError("--dynamic writes an ONNX file whose dynamic dimensions are dim_params",
                        hint="use --format onnx; a kiln artifact holds the sizes it was "
                             "compiled for (kiln.compile(..., dynamic=...), then kiln.export)")
    if args.threads and args.format != "c":
        raise KilnError("--threads is baked into C libraries only",
                        hint="a kiln artifact takes its threads at kiln.load(path, threads=N)")
    if args.format == "onnx":
        try:
            to_onnx = importlib.import_module("kiln.interop.to_onnx")
        except ModuleNotFoundError as e:
            if e.name != "kiln.interop.to_onnx":
                raise
            raise KilnError("ONNX export is not available in this kiln (kiln.interop.to_onnx "
                            "is missing)", hint="use --format kiln or --format c") from None
    if is_onnx_spec(args.model):
        if args.dynamic is not None:
            raise KilnError("--dynamic declares dimensions of a PyTorch model; an ONNX model "
                            "keeps its own dim_params", hint="leave --dynamic out")
        if args.prune or args.low_rank or args.quantize:
            raise KilnError("compression options need the PyTorch model (calibration, "
                            "distillation teacher)", hint="pass a zoo name or file.py:factory")
        from kiln.api import CompiledModel, optimize
        from kiln.runtime import Executable

        graph, _, name = load_graph(args.model, args.batch)
        graph, timing = optimize(graph, "O1")
        backend = "reference" if args.format == "cuda" else "llvm"
        compiled = CompiledModel(graph, Executable(graph, backend, 0), None, graph, timing)
    else:
        module, inputs, name = load_model(args.model, args.batch)
        # A CUDA artifact is rendered from the optimized graph: no CPU code is needed.
        compiled = kiln.compile(module, inputs,
                                backend="reference" if args.format == "cuda" else "llvm",
                                dynamic=_dynamic_dims(args.dynamic),
                                **_compression_kwargs(args, inputs))
    if args.format == "kiln":
        path = kiln.export(compiled, out, overwrite=args.overwrite, sign_key=args.sign_key)
    elif args.format == "cuda":
        from kiln.runtime.artifact.cuda import export_cuda

        path = export_cuda(compiled, out, overwrite=args.overwrite, sign_key=args.sign_key)
    elif args.format == "c":
        from kiln.interop.c_library import export_c

        path = export_c(compiled, out, threads=args.threads, overwrite=args.overwrite)
    else:
        path = to_onnx.export_onnx(compiled, out, overwrite=args.overwrite)
    print(f"exported {name} ({args.format}) to {path}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from kiln.debug.compare import check_options, compare

    check_options(args.prune, args.low_rank)
    _check_prune_multiple(args)
    result = compare(args.model, prune=args.prune, low_rank=args.low_rank,
                     quantize=args.quantize, calibration_batches=args.calibration_batches,
                     backend=not args.no_codegen, prune_multiple=args.prune_multiple)
    print(result.table())


def _cmd_search(args: argparse.Namespace) -> int:
    from kiln.compression.tasks import run_command

    return run_command(args)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction in (0, 1)")
    return value


def _add_compression_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prune", type=_fraction, metavar="FRACTION",
                   help="structured pruning: remove this fraction of the FLOPs (L1 criterion)")
    p.add_argument("--prune-multiple", type=_positive, metavar="N",
                   help="keep a multiple of N channels in every pruned group (default: the "
                        "target's vector width, 16 with AVX-512; 1 removes any channel, for "
                        "small models such as LeNet)")
    p.add_argument("--low-rank", type=_fraction, metavar="ENERGY",
                   help="low-rank factorization keeping this fraction of each layer's "
                        "singular-value energy")
    p.add_argument("--quantize", choices=("minmax", "percentile", "entropy"),
                   help="int8 quantization with this calibration method (calibrated on "
                        "seeded random inputs shaped like the model's)")
    p.add_argument("--calibration-batches", type=_positive, default=4,
                   help="random calibration batches (default 4)")


def _check_prune_multiple(args: argparse.Namespace) -> None:
    if args.prune_multiple is not None and args.prune is None:
        raise KilnError("--prune-multiple applies to pruning", hint="pass --prune FRACTION too")


def _dynamic_dims(spec: str | None):
    """``--dynamic`` as kiln.compile's ``dynamic=``: "" is True (the batch dimension of every
    input); else comma-separated ``[INPUT:]DIM=NAME[<=MAX]`` (INPUT by name or index, input 0
    when left out; MAX bounds the size)."""
    import torch

    if spec is None:
        return None
    if not spec.strip():
        return True
    usage = "for example --dynamic '0=batch,1=seq<=512' or --dynamic 'input_ids:1=seq'"
    out: dict = {}
    for entry in spec.split(","):
        where, _, name = entry.strip().partition("=")
        where, _, dim = where.rpartition(":")
        name, _, top = name.partition("<=")
        try:
            key: int | str = int(where) if where.strip().isdigit() else (where.strip() or 0)
            size = torch.export.Dim(name.strip(), max=int(top)) if top else name.strip()
            out.setdefault(key, {})[int(dim)] = size
        except (ValueError, TypeError) as e:
            raise KilnError(f"--dynamic entry {entry.strip()!r} is not [INPUT:]DIM=NAME[<=MAX]"
                            f" ({e})", hint=usage) from None
    return out


def _compression_kwargs(args: argparse.Namespace, inputs) -> dict:
    import torch

    _check_prune_multiple(args)
    if args.prune is None and args.low_rank is None and args.quantize is None:
        return {}
    gen = torch.Generator().manual_seed(0)
    data = [tuple(torch.randn(x.shape, generator=gen) if x.is_floating_point() else x
                  for x in inputs) for _ in range(args.calibration_batches)]
    prune = args.prune
    if prune is not None and args.prune_multiple is not None:
        prune = {"flops_target": prune, "multiple": args.prune_multiple}
    return {"prune": prune, "low_rank": args.low_rank, "data": data,
            "quantize": {"method": args.quantize} if args.quantize else None}


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    p.add_argument("--pipeline", default="O1", help="named pipeline (default: O1; "
                   f"one of {', '.join(PIPELINES)})")
    p.add_argument("--passes", metavar="P1,P2,...",
                   help="run these registered passes in order instead of --pipeline")
    p.add_argument("--frontend", default="fx", choices=FRONTENDS,
                   help="how the model is traced (default: fx)")
    p.add_argument("--backend", default="reference", choices=("reference", "llvm"),
                   help="reference (default): check the graph passes on the reference "
                        "interpreter; llvm: then run every kernel the LLVM backend makes alone "
                        "on reference inputs and trace the first wrong one to the stage that "
                        "made it wrong (lowering, a schedule, codegen)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kiln`` command, one subcommand per tool."""
    parser = argparse.ArgumentParser(
        prog="kiln", description="kiln's pass-level debugger: inspect what each pass does "
                                 "to a model and where its compiled code spends its time.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("passes", help="list every registered pass and every pipeline",
                       description="List every registered pass (name, numerics class, "
                                   "description) and every named pipeline.")
    p.set_defaults(func=_cmd_passes)

    p = sub.add_parser("show", help="print a model's IR after any stage",
                       description="Print the IR text of MODEL after one stage: a graph pass "
                                   "of the pipeline, or a stage of the one pipeline to machine "
                                   "code (fuse, lower, parallel, unroll, vectorize, "
                                   "memory_plan, llvm_ir, llvm_opt, object; cuda_source with "
                                   "--backend cuda).")
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    p.add_argument("--after", metavar="STAGE",
                   help=f"stop after this stage ('{INPUT_STAGE}': the imported graph; 'name#2': "
                        "the second occurrence of a pass; a kernel or code stage such as "
                        "lower, vectorize or llvm_ir; default: the whole graph pipeline)")
    p.add_argument("--pipeline", default="O1", help="named pipeline (default: O1; "
                   f"one of {', '.join(PIPELINES)})")
    p.add_argument("--frontend", default="fx", choices=FRONTENDS,
                   help="how the model is traced (default: fx)")
    p.add_argument("--backend", default="llvm", choices=("llvm", "cuda"),
                   help="whose kernel and code stages --after may name (default: llvm)")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("profile", help="time each kernel of a compiled model",
                       description="Compile MODEL for this CPU and print each kernel's time, "
                                   "GFLOP/s, GB/s, and whether it is compute- or memory-bound "
                                   "against this machine's measured peaks.")
    p.add_argument("model", metavar="MODEL",
                   help=SPEC_HELP + ", or an exported .kiln artifact")
    p.add_argument("--threads", type=_non_negative, default=0,
                   help="worker threads (default 0: all cores)")
    p.add_argument("--repeat", type=_positive, default=10,
                   help="runs to take the median of (default 10)")
    p.add_argument("--batch", type=_positive, default=None,
                   help="batch size of the example inputs (default: the model's own)")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("tune", help="time each convolution's algorithms, keep the fastest",
                       description="Compile MODEL with tune=True: every convolution's candidate "
                                   "algorithms are compiled and timed on this machine, the "
                                   "fastest kept in the tuning database (KILN_TUNING_DB, "
                                   "default ~/.cache/kiln/tuning.json) for later compiles. "
                                   "Prints each convolution's choice and why, and the tuned "
                                   "model's time against the untuned one.")
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    p.add_argument("--budget", type=_positive_float, default=60.0,
                   help="seconds the tuner may measure (default 60)")
    p.add_argument("--threads", type=_non_negative, default=0,
                   help="worker threads (default 0: all cores)")
    p.add_argument("--target", default=None,
                   help="instruction set to compile for (avx2, avx512, sse2; default: host)")
    p.add_argument("--batch", type=_positive, default=None,
                   help="batch size of the example inputs (default: the model's own)")
    p.add_argument("--repeat", type=_positive, default=20,
                   help="interleaved runs of each model to time (default 20)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("bisect", help="find the first pass that breaks a model's outputs",
                       description="Run the pipeline on MODEL one pass at a time and compare "
                                   "each stage's outputs (reference backend, example inputs) "
                                   "with eager PyTorch. Prints the first pass whose outputs "
                                   "leave tolerance (exact passes: 1e-5 + 1e-4 x max|output|; "
                                   "lossy passes: plus their error budget) or crash, and the "
                                   "first node it changed. With --backend llvm, when the graph "
                                   "passes are right, every kernel of the compiled model is "
                                   "then run alone on reference inputs; the first wrong one is "
                                   "named with its graph nodes, its schedule and the stage "
                                   "that made it wrong. Exit status 1 when something fails.")
    _add_pipeline_args(p)
    p.set_defaults(func=_cmd_bisect)

    p = sub.add_parser("minify", help="shrink a failing graph to a small reproducer",
                       description="Find how the pipeline fails on MODEL (a pass raises, the "
                                   "verifier rejects its output, or the result differs from "
                                   "the unoptimized graph on seeded random inputs), shrink the "
                                   "graph while it fails the same way, and write minified.txt, "
                                   "constants.npz and a runnable repro.py into DIR. Exit "
                                   "status 1 when a failure was minified, 0 when none occurs.")
    _add_pipeline_args(p)
    p.add_argument("-o", "--output", metavar="DIR", required=True,
                   help="directory for minified.txt, constants.npz and repro.py")
    p.add_argument("--seed", type=_non_negative, default=0,
                   help="seed of the random inputs (default 0)")
    p.set_defaults(func=_cmd_minify)

    p = sub.add_parser("trace", help="record every stage of a pipeline, with an HTML report",
                       description="Run the pipeline on MODEL one pass at a time (stage 0: the "
                                   "imported graph) and write into DIR each stage's IR "
                                   "(NNN_<pass>.txt), its diff against the previous stage "
                                   "(NNN_<pass>.diff), table.tsv (per stage: pass time, nodes, "
                                   "parameters, FLOPs, bytes, max|diff| of the outputs against "
                                   "eager PyTorch) and report.html (the table, and per stage a "
                                   "picture of the graph coloured by fused kernel, and the "
                                   "diff). Prints the table.")
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    p.add_argument("-o", "--output", metavar="DIR", required=True,
                   help="directory for the stage files, table.tsv and report.html")
    p.add_argument("--pipeline", default="O1", help="named pipeline (default: O1; "
                   f"one of {', '.join(PIPELINES)})")
    p.add_argument("--frontend", default="fx", choices=FRONTENDS,
                   help="how the model is traced (default: fx)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty DIR, replacing the trace's files "
                        "there (other files are kept; without it such a DIR is refused)")
    p.add_argument("--dynamic", metavar="SPEC", nargs="?", const="", default=None,
                   help="also write symbolic.txt: the optimized graph for every size of these "
                        "dimensions (alone: the batch of every input; or "
                        "[INPUT:]DIM=NAME[<=MAX],...), and say whether the rows of a size run "
                        "apart")
    p.add_argument("--backend", default="llvm", choices=("llvm", "reference"),
                   help="llvm (default): go on through fusion, lowering, each schedule, the "
                        "memory plan and codegen, with a per-kernel table (schedule, time, "
                        "GFLOP/s, roofline class, numeric check); reference: graph passes only")
    p.add_argument("--stages", type=_non_negative, default=0, metavar="K",
                   help="also cut the final graph into K pipeline stages as kiln.pipeline "
                        "does: stage_<i>.txt per stage and partition.txt (the report)")
    p.set_defaults(func=_cmd_trace)

    p = sub.add_parser("export", help="compile a model ahead of time to a file or C library",
                       description="Compile MODEL (llvm backend, this CPU) and write it as "
                                   "a kiln artifact (one file that kiln.load runs without "
                                   "PyTorch), a C library (a directory with model.h, "
                                   "libmodel.so and model_weights.bin; see examples/c) or an "
                                   "ONNX file; or (--format cuda) as a CUDA artifact of PTX "
                                   "for NVIDIA GPUs, which kiln.load runs on a machine with "
                                   "one. Existing outputs are kept unless --overwrite.")
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    p.add_argument("-o", "--output", metavar="PATH", required=True,
                   help="the artifact or ONNX file, or the C library's directory")
    p.add_argument("--format", default="kiln", choices=("kiln", "c", "onnx", "cuda"),
                   help="what to write (default: kiln; cuda: PTX for NVIDIA GPUs, loaded by "
                        "kiln.load on a machine with one; needs numba and the CUDA toolkit's "
                        "libNVVM, not a GPU)")
    p.add_argument("--threads", type=_non_negative, default=0,
                   help="worker threads the C library starts with (--format c only; "
                        "default 0: all cores)")
    p.add_argument("--batch", type=_positive, default=None,
                   help="batch size the model is compiled for (default: the model's own)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output")
    p.add_argument("--dynamic", metavar="SPEC", nargs="?", const="", default=None,
                   help="--format onnx: write these dimensions as dim_params, so the file "
                        "runs at any size: alone, the batch dimension of every input; or "
                        "[INPUT:]DIM=NAME[<=MAX],... (e.g. '0=batch,1=seq<=512': a sequence "
                        "length at most the position table)")
    p.add_argument("--sign-key", metavar="PEM", default=None,
                   help="sign the artifact with this Ed25519 private key (--format kiln or "
                        "cuda; kiln.load(path, trusted_keys=[public key]) then checks who "
                        "wrote it; make one with: openssl genpkey -algorithm ed25519)")
    _add_compression_args(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("compare", help="per-layer error of each compression stage",
                       description="Compress MODEL (pruning, low-rank, int8: each only when "
                                   "asked for), then compile it (fusion, codegen), and print "
                                   "one table: for each layer, the error of its output after "
                                   "each stage against the imported model, so the layer and "
                                   "the stage that lost the accuracy stand out. The last line "
                                   "compares the final outputs with eager PyTorch.")
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    _add_compression_args(p)
    p.add_argument("--no-codegen", action="store_true",
                   help="leave out the llvm (fusion + codegen) column")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("search", help="search compression settings under an accuracy budget",
                       description="Search pruning, low-rank, per-layer int8 and distillation "
                                   "settings of MODEL with optuna (kiln.search): candidates "
                                   "are compiled and measured on this machine, the fastest "
                                   "(or smallest) within --max-drop of the fp32 score wins. "
                                   "Prints every trial and the best kiln.compile options; "
                                   "exits 2 when no candidate met the budget.")
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    p.add_argument("--data", choices=("synthetic", "digits"), default="synthetic",
                   help="synthetic: seeded random inputs, scored by top-1 agreement with the "
                        "fp32 model; digits: scikit-learn's digits for a model of 64 inputs "
                        "per sample (default synthetic)")
    p.add_argument("--train-epochs", type=_non_negative, default=0,
                   help="train MODEL on the digits first (--data digits; zoo weights are "
                        "random; default 0)")
    p.add_argument("--samples", type=_positive, default=256,
                   help="synthetic batches for calibration and for validation (default 256)")
    p.add_argument("--max-drop", type=float, default=0.01,
                   help="largest allowed fall of the score from fp32's (default 0.01)")
    p.add_argument("--budget", type=_positive_float, default=120.0,
                   help="seconds the search may take (default 120)")
    p.add_argument("--objective", choices=("latency", "size", "flops"), default="latency",
                   help="what to minimize (default latency)")
    p.add_argument("--method", choices=("bayes", "grid", "genetic"), default="bayes",
                   help="optuna TPE, GridSampler or NSGA-II (default bayes)")
    p.add_argument("--trials", type=_positive, default=None,
                   help="the most trials to run (default: until the budget is spent)")
    p.add_argument("--seed", type=_non_negative, default=0, help="sampler seed (default 0)")
    p.add_argument("--storage", default=None,
                   help="optuna storage to keep and resume the study (sqlite:///search.db)")
    p.add_argument("--study-name", default=None, help="study name inside --storage")
    p.add_argument("--prune-multiple", type=_positive, metavar="N", default=None,
                   help="keep a multiple of N channels in every pruned group")
    p.add_argument("--threads", type=_non_negative, default=1,
                   help="threads of every compiled candidate (default 1)")
    p.add_argument("-o", "--report", metavar="HTML", default=None,
                   help="write the HTML report (Pareto plot, trials) here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_search)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kiln`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit
    status: 0 on success (and for ``--help``), 1 when ``bisect``/``minify`` find a failing
    pass, 2 for a usage or model error."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits for --help (0) and for usage errors (2)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    try:
        status = args.func(args)
        sys.stdout.flush()
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (`kiln show ... | head`) closed the pipe: stop quietly, as Unix tools do,
        # and keep the interpreter's final flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        # A file the command reads or writes (a full disk, a folder it may not write ...):
        # the system's reason, not a traceback.
        print(f"kiln: error: {_os_error(e)}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


def _os_error(e: OSError) -> str:
    """``e`` as one line: the path(s) it names and the system's reason."""
    reason = e.strerror or str(e) or type(e).__name__
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


if __name__ == "__main__":
    sys.exit(main())
