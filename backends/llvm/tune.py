"""Autotuning: time each convolution's candidate algorithms on this machine and keep the
winners in a tuning database that later compiles, models and processes reuse.

For every convolution of a graph (after cleanups: batch norms folded), the tuner compiles the
convolution alone once per algorithm that fits it (Winograd, the transposed and batched direct
GEMMs, the padded direct GEMM, batched or per-image im2col: see ``passes/lower/conv.py``), runs
each on random inputs of its shape, checks its output against the untuned default's, and times
it (median of interleaved runs). Another algorithm replaces the default only when it is
``MARGIN`` faster; a candidate whose output differs is dropped (and said so). The choices become
``Tuning.conv_algorithms``, which lowering follows and the compile cache hashes.

The database (JSON, ``KILN_TUNING_DB`` or ``~/.cache/kiln/tuning.json``) is keyed by the machine
(CPU model name, LLVM's CPU name and features, the target's instruction set, the thread count)
and by the convolution's signature (shapes and attributes). This is TVM MetaSchedule's idea at
the scale of seconds: a few candidates per kernel, measured rather than searched.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kiln.backends.llvm.cache import writable_root
from kiln.backends.llvm.compiler import compile_graph
from kiln.ir import Graph
from kiln.passes.lower.conv import conv_signature
from kiln.passes.target import Target
from kiln.passes.tuning import CONV_ALGORITHMS, Tuning

DB_FORMAT = 1
MARGIN = 0.03          # another algorithm must be at least 3% faster than the default
MIN_RUNS, MAX_RUNS = 5, 40  # rounds of the candidate programs (more while the budget lasts)
DEFAULT_BUDGET_S = 60.0


def database_path() -> Path:
    """Where the tuning database lives: ``KILN_TUNING_DB``, else ``~/.cache/kiln``."""
    env = os.environ.get("KILN_TUNING_DB")
    if env:
        return Path(env)
    return Path(os.path.expanduser("~")) / ".cache" / "kiln" / "tuning.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


def machine_key(target: Target, threads: int, tuning: Tuning) -> str:
    """The database's key for this machine, target and thread count (and the Winograd
    switch, which removes a candidate)."""
    features = hashlib.sha256(target.features.encode()).hexdigest()[:12]
    switch = "" if tuning.winograd else " | winograd off"
    return f"{_cpu_model()} | {target.cpu} {target.name} {features} | {threads} threads{switch}"


class TuningDatabase:
    """Measured choices per machine and kernel signature, kept in a JSON file. A damaged or
    foreign file is ignored (and replaced on the next save), never fatal."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or database_path()
        self.entries: dict[str, dict[str, dict]] = self._read()

    def _read(self) -> dict[str, dict[str, dict]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != DB_FORMAT:
            return {}
        machines = data.get("machines")
        if not isinstance(machines, dict):
            return {}
        return {m: {s: e for s, e in sigs.items() if _valid(e)}
                for m, sigs in machines.items() if isinstance(sigs, dict)}

    def get(self, machine: str, signature: str) -> dict | None:
        return self.entries.get(machine, {}).get(signature)

    def put(self, machine: str, signature: str, entry: dict) -> None:
        self.entries.setdefault(machine, {})[signature] = entry

    def save(self) -> None:
        """Write atomically, merged with what other processes saved meanwhile."""
        merged = self._read()
        for machine, sigs in self.entries.items():
            merged.setdefault(machine, {}).update(sigs)
        self.entries = merged
        if not self.path.parent.exists():
            writable_root(self.path.parent)  # a new folder: kiln's (tagged), the user's only
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tuning-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": DB_FORMAT, "machines": merged}, f, indent=1,
                          sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _valid(entry: Any) -> bool:
    return (isinstance(entry, dict) and entry.get("choice") in CONV_ALGORITHMS
            and isinstance(entry.get("ms", {}), dict))


@dataclass
class KernelTuning:
    """One convolution's result: the candidates' median times (ms, in the model), the
    default, the choice and why."""

    signature: str
    layers: list[str]
    default: str
    choice: str
    ms: dict[str, float] = field(default_factory=dict)
    why: str = ""


@dataclass
class TuneReport:
    """What the tuner did for one graph."""

    kernels: list[KernelTuning] = field(default_factory=list)
    seconds: float = 0.0
    measured: int = 0          # programs (one per algorithm) compiled and timed in this run
    from_database: int = 0     # convolutions whose choice the database already held

    def table(self) -> str:
        """One line per convolution: its layers, the time of each candidate, the choice."""
        lines = [f"tuned {len(self.kernels)} convolutions in {self.seconds:.1f} s "
                 f"({self.measured} programs timed, {self.from_database} from the database)"]
        for k in self.kernels:
            times = ", ".join(f"{a} {ms:.3f}" for a, ms in sorted(k.ms.items(),
                                                                    key=lambda kv: kv[1]))
            more = f" (+{len(k.layers) - 1} alike)" if k.layers[1:] else ""
            lines.append(f"  {k.layers[0]}{more}: {k.choice} (default {k.default}; {k.why})"
                         + (f"  [ms: {times}]" if times else ""))
        return "\n".join(lines)


def _inputs(graph: Graph, rng: np.random.Generator) -> list[np.ndarray]:
    """Random inputs of the graph's signature (zeros for integer inputs: ids, masks)."""
    out = []
    for name in graph.inputs:
        t = graph.types[name]
        if t.dtype.value in ("f32", "f16"):
            out.append(rng.standard_normal(t.shape).astype(t.dtype.numpy))
        else:
            out.append(np.zeros(t.shape, t.dtype.numpy))
    return out


def _kernel_ms(program, inputs: list[np.ndarray]) -> dict[str, float]:
    """Milliseconds of each kernel (by its root node) in one run of the whole program."""
    from kiln.backends.llvm.compiler import cycles_per_second

    cycles = program._cycles()
    cycles[:] = 0
    program(inputs)
    scale = 1e3 / cycles_per_second()
    out: dict[str, float] = {}
    for step, c in zip(program.image.steps, cycles):
        out[step["root"]] = out.get(step["root"], 0.0) + float(c) * scale
    return out


def tune_graph(graph: Graph, target: Target, tuning: Tuning, *, threads: int = 0,
               budget_s: float = DEFAULT_BUDGET_S, progress: bool = True,
               database: TuningDatabase | None = None) -> tuple[Tuning, TuneReport]:
    """``tuning`` with the measured best algorithm of every convolution of ``graph``: from the
    database when it holds one for this machine, else measured here, in ``budget_s`` seconds
    at most (what the budget does not reach keeps its default).

    Kernels are timed in context, not alone: the whole graph is compiled once per algorithm
    (each convolution that fits it takes it), the programs run in turn, and each kernel's
    time is read from the program's cycle counters. (Timed alone, ResNet-18's last 3x3 convs
    looked 20% faster with Winograd; inside the model they were 30% slower.) Then the mix is
    compiled and checked against the untuned program: if it is not faster, every choice made
    here goes back to the default. Returns the tuning and a report."""
    t_start = time.perf_counter()
    threads = threads or target.cores
    db = database or TuningDatabase()
    machine = machine_key(target, threads, tuning)
    convs: dict[str, list[str]] = {}
    for n in graph.nodes:
        if n.op == "conv" and all(v in graph.constants for v in n.inputs[1:]):
            shape = graph.types[n.inputs[0]].shape
            convs.setdefault(conv_signature(n, shape, graph.constants[n.inputs[1]]),
                             []).append(n.name)
    report = TuneReport()
    known: dict[str, str] = {}
    for sig, names in convs.items():
        entry = db.get(machine, sig)
        if entry is not None:
            known[sig] = entry["choice"]
            report.from_database += 1
            report.kernels.append(KernelTuning(sig, names, entry["default"], entry["choice"],
                                               dict(entry["ms"]), "from the tuning database"))
    todo = [sig for sig in convs if sig not in known]
    if todo:
        chosen, lines, programs = _measure(graph, target, tuning.with_conv_algorithms(known),
                                           threads, {s: convs[s] for s in todo},
                                           t_start + budget_s, progress)
        report.kernels += lines
        report.measured += programs
        for k in report.kernels:
            if k.signature in chosen:
                db.put(machine, k.signature, {"choice": k.choice, "default": k.default,
                                              "ms": k.ms})
        known.update(chosen)
        try:
            db.save()
        except OSError as e:
            import warnings

            warnings.warn(f"kiln: could not save the tuning database {db.path}: {e}",
                          stacklevel=2)
    report.seconds = time.perf_counter() - t_start
    return tuning.with_conv_algorithms(known), report


def _measure(graph: Graph, target: Target, base: Tuning, threads: int,
             convs: dict[str, list[str]], deadline: float, progress: bool
             ) -> tuple[dict[str, str], list[KernelTuning], int]:
    """Time the convolutions ``convs`` (signature -> layer names) under each algorithm in
    context; returns their choices, their report lines and the programs timed."""
    todo = list(convs)
    rng = np.random.default_rng(0)
    inputs = _inputs(graph, rng)
    bar = tqdm(total=len(CONV_ALGORITHMS) + 2, desc="kiln tune", unit="program",
               disable=not progress, leave=False)
    try:
        default = compile_graph(graph, target=target, tuning=base)
        default.threads(threads, adaptive=False)
        expected = default(inputs)
        scale = [max(float(np.abs(e).max()), 1e-30) for e in expected]
        took = _schedules_of(default)
        bar.update(1)
        programs = {"default": (default, took)}
        dropped = []
        for alg in CONV_ALGORITHMS:
            if time.perf_counter() > deadline:
                break
            prog = compile_graph(graph, target=target,
                                 tuning=base.with_conv_algorithms(dict.fromkeys(todo, alg)))
            prog.threads(threads, adaptive=False)
            bar.update(1)
            took = _schedules_of(prog)
            if not any(took.get(name) == alg for sig in todo for name in convs[sig]):
                continue  # no convolution to tune fits this algorithm
            outs = prog(inputs)
            if any(np.abs(o - e).max() > 1e-4 * sc for o, e, sc in zip(outs, expected, scale)):
                dropped.append(alg)  # kept out, and said so in the report
                continue
            programs[alg] = (prog, took)
        # Kernel times in context, the programs taking turns so that the machine's drift
        # touches them alike.
        samples: dict[str, list[dict[str, float]]] = {k: [] for k in programs}
        rounds = 0
        while rounds < MIN_RUNS or (rounds < MAX_RUNS and time.perf_counter() < deadline):
            for k, (prog, _) in programs.items():
                samples[k].append(_kernel_ms(prog, inputs))
            rounds += 1
        bar.update(1)
    finally:
        bar.close()
    median = {k: {root: statistics.median(s[root] for s in runs) for root in runs[0]}
              for k, runs in samples.items() if runs}
    chosen: dict[str, str] = {}
    lines: list[KernelTuning] = []
    default_took = programs["default"][1]
    for sig in todo:
        names = convs[sig]
        default_alg = default_took.get(names[0], "gemm") or "gemm"
        ms: dict[str, float] = {}
        for k, (_, took) in programs.items():
            alg = default_alg if k == "default" else k
            if k != "default" and any(took.get(n) != alg for n in names):
                continue
            if alg in ms and k != "default":
                continue
            ms[alg] = sum(median[k].get(n, 0.0) for n in names) / len(names)
        best = min(ms, key=ms.get)
        choice = best if ms[best] < (1 - MARGIN) * ms[default_alg] else default_alg
        why = ("fastest in the model" if choice != default_alg else
               "the default was fastest" if best == default_alg else
               f"{best} only {100 * (1 - ms[best] / ms[default_alg]):.1f}% faster")
        if dropped:
            why += f"; {', '.join(dropped)} left out (outputs differ)"
        chosen[sig] = choice
        lines.append(KernelTuning(sig, names, default_alg, choice, ms, why))
    changed = [k for k in lines if k.choice != k.default]
    if changed and not _mix_is_faster(graph, target, base.with_conv_algorithms(chosen),
                                      programs["default"][0], inputs, threads):
        for k in changed:
            k.choice, chosen[k.signature] = k.default, k.default
            k.why = "kept the default: the measured choices together were not faster"
    return chosen, lines, len(programs)


def _mix_is_faster(graph, target, tuned: Tuning, default, inputs, threads) -> bool:
    """Whether the program with every measured choice beats the untuned one (median of
    interleaved calls), so that tuning never makes a model slower."""
    mix = compile_graph(graph, target=target, tuning=tuned)
    mix.threads(threads, adaptive=False)
    times: dict[str, list[float]] = {"default": [], "mix": []}
    for _ in range(max(MIN_RUNS, 15)):
        for name, prog in (("default", default), ("mix", mix)):
            prog(inputs)
            t0 = time.perf_counter()
            prog(inputs)
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["mix"]) < statistics.median(times["default"])


def _schedules_of(program) -> dict[str, str]:
    """Each kernel's schedule, from the program's step records (a program from the cache)."""
    return {s["root"]: s.get("schedule", "") for s in program.image.steps}
