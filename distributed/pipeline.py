"""``kiln.pipeline``: a model split into stages that run as Ray actors, one per stage per
replica, with activations streaming between them through Ray's object store.

    pipe = kiln.pipeline(model, (x,), stages=2, replicas=1)
    y = pipe(x)                      # one input through every stage
    ys = list(pipe.map(inputs))      # many inputs, stages overlapped
    pipe.close()

The model is traced and optimized once here, cut by ``kiln.passes.partition`` (each stage an
ordinary kiln graph; the cuts balance FLOPs and bytes, or with ``profile=True`` the kernel
times measured here, see ``kiln.distributed.profile``), and each actor compiles its stage
(llvm, ``threads_per_stage`` threads) when it starts. A call hands its input to the first
stage's actor and the reference to that actor's result to the next; the driver waits only for
the last stage. ``map`` keeps several inputs in flight, so while stage 2 works on input i,
stage 1 works on input i + 1.

Failures: actors are created with Ray's restart options (``max_restarts``) and their calls
with ``max_task_retries``, so a stage whose process dies is restarted (recompiling its stage)
and the calls it had are run again. Stages are pure functions of their inputs: a retried call
gives the same answer, and each input's answer is read once from the last stage. Before any
actor starts, the CPUs the stages ask for are compared with the cluster's: a pipeline that
cannot be placed is a KilnError, not a hang.

Replicas (data parallel): ``replicas`` copies of the stage chain; each input goes to the chain
with the fewest inputs in flight (round robin among equals).
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.ir import Graph, KilnError

MAX_RESTARTS = 3
"""How often Ray restarts a stage actor that died (and retries the calls it had)."""


def _ray():
    try:
        import ray
    except ModuleNotFoundError:
        raise KilnError("kiln.pipeline runs on Ray, which is not installed",
                        hint="pip install 'kiln[distributed]' (or pip install ray)") from None
    return ray


class _Stage:
    """A Ray actor body: one stage, a kiln graph compiled here or an artifact (its bytes)
    loaded here, run on lists of arrays."""

    def __init__(self, stage: Graph | bytes, backend: str, threads: int) -> None:
        if isinstance(stage, Graph):
            from kiln.runtime import Executable

            exe = Executable(stage, backend, threads)
            self.image = getattr(exe.program, "image", None)
            self.fn = exe.run
        else:
            from kiln.runtime.artifact import load

            loaded = load(stage, threads=threads)
            self.image = None
            self.fn = lambda arrays: list(loaded(*arrays)) if len(loaded.outputs) > 1 \
                else [loaded(*arrays)]
        self.calls = 0

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
        return self.fn(list(arrays))

    def artifact(self) -> bytes:
        """This stage as a kiln artifact (llvm-compiled stages only)."""
        import tempfile

        from kiln.runtime.artifact import save

        if self.image is None:
            raise KilnError("this stage has no native code to export",
                            hint="build the pipeline with backend='llvm'")
        with tempfile.TemporaryDirectory() as d:
            path = save(f"{d}/stage.kiln", self.image)
            return path.read_bytes()

    def pid(self) -> int:
        import os

        return os.getpid()

    def ready(self) -> bool:
        return True


class Pipeline:
    """Stage actors behind one callable (see the module docstring)."""

    def __init__(self, stages: Sequence[Graph | bytes], *, replicas: int, backend: str,
                 threads_per_stage: int, address: str | None, partition: Any = None,
                 first_inputs: Sequence[tuple[str, Any]] = ()) -> None:
        ray = _ray()
        self.partition = partition
        self._started_ray = False
        if not ray.is_initialized():
            if address is None:
                ray.init(include_dashboard=False, log_to_driver=False)
                self._started_ray = True
            else:
                ray.init(address=address, log_to_driver=False)
        need = len(stages) * replicas * max(threads_per_stage, 1)
        have = ray.cluster_resources().get("CPU", 0)
        if need > have:
            self.close()
            raise KilnError(f"the pipeline needs {need} CPUs ({len(stages)} stages x {replicas} "
                            f"replicas x {max(threads_per_stage, 1)} threads), the Ray cluster "
                            f"has {have:g}",
                            hint="use fewer stages, replicas or threads_per_stage, or a larger "
                                 "cluster (address=)")
        actor = ray.remote(num_cpus=max(threads_per_stage, 1), max_restarts=MAX_RESTARTS,
                           max_task_retries=MAX_RESTARTS)(_Stage)
        # The stages stay referenced here for the pipeline's life: a restarted actor rebuilds
        # from them.
        self._stage_refs = [ray.put(g) for g in stages]
        self.chains = [[actor.remote(g, backend, threads_per_stage) for g in self._stage_refs]
                       for _ in range(replicas)]
        ray.get([a.ready.remote() for chain in self.chains for a in chain])
        self._first = first_inputs
        self._in_flight = [0] * replicas
        self._turn = itertools.count()

    def export(self, folder: str | os.PathLike) -> list[Path]:
        """Write every stage as a kiln artifact ``stage<k>.kiln`` in ``folder`` (which must
        exist); ``kiln.pipeline(artifacts=...)`` runs them again, without PyTorch on the
        workers."""
        out = Path(folder)
        if not out.is_dir():
            raise KilnError(f"{out} is not a directory", hint="create it first")
        paths = []
        for k, stage in enumerate(self.chains[0] if self.chains else []):
            path = out / f"stage{k}.kiln"
            if path.exists():
                raise KilnError(f"{path} already exists", hint="export into an empty folder")
            path.write_bytes(_ray().get(stage.artifact.remote()))
            paths.append(path)
        return paths

    def _submit(self, arrays: Sequence[np.ndarray]) -> tuple[int, Any]:
        if not self.chains:
            raise KilnError("this pipeline is closed", hint="create a new one with "
                                                         "kiln.pipeline(...)")
        arrays = _check_inputs(self._first, arrays)     # a clear error here, not in an actor
        start, n = next(self._turn), len(self.chains)
        r = min(((start + i) % n for i in range(n)), key=lambda i: self._in_flight[i])
        ref: Any = arrays
        for stage in self.chains[r]:
            ref = stage.run.remote(ref)
        self._in_flight[r] += 1
        return r, ref

    def _result(self, r: int, ref: Any) -> Any:
        try:
            outs = _ray().get(ref)
        finally:
            self._in_flight[r] -= 1
        return outs[0] if len(outs) == 1 else tuple(outs)

    @staticmethod
    def _arrays(x: Any) -> list[np.ndarray]:
        items = x if isinstance(x, (tuple, list)) else (x,)
        return [np.ascontiguousarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)
                for a in items]

    def __call__(self, *inputs: Any) -> Any:
        """Run one input (the model's positional inputs) through every stage."""
        return self._result(*self._submit(self._arrays(inputs)))

    def map(self, inputs: Iterable[Any], window: int | None = None) -> Iterator[Any]:
        """The outputs for each of ``inputs`` (a tensor, array or tuple of them per item), in
        order; up to ``window`` inputs in flight (default: two per stage per replica)."""
        window = window or 2 * sum(len(c) for c in self.chains)
        pending: collections.deque = collections.deque()
        for x in inputs:
            pending.append(self._submit(self._arrays(x)))
            if len(pending) >= window:
                yield self._result(*pending.popleft())
        while pending:
            yield self._result(*pending.popleft())

    def close(self) -> None:
        """Stop the actors (and the local Ray instance this pipeline started)."""
        ray = _ray()
        for chain in getattr(self, "chains", []):
            for a in chain:
                ray.kill(a)
        self.chains = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_inputs(expected: Sequence[tuple[str, Any]], arrays: Sequence[Any]
                  ) -> list[np.ndarray]:
    """``arrays`` against the first stage's (name, TensorType) inputs."""
    if len(arrays) != len(expected):
        raise KilnError(f"the pipeline takes {len(expected)} inputs, got {len(arrays)}")
    out = []
    for (name, t), a in zip(expected, arrays):
        a = np.ascontiguousarray(a)
        if a.shape != tuple(t.shape) or a.dtype != t.dtype.numpy:
            raise KilnError(f"input %{name} expects {t}, got {a.dtype}{list(a.shape)}")
        out.append(a)
    return out


def pipeline(model: Any = None, example_inputs: Sequence[Any] = (), *, stages: int = 2,
             replicas: int = 1, backend: str = "llvm", threads_per_stage: int = 1,
             address: str | None = None, memory_limit: int | None = None,
             frontend: str = "fx", artifacts: Sequence[str | os.PathLike] | None = None,
             profile: bool = False, seconds: Mapping[str, float] | None = None) -> Pipeline:
    """Split ``model`` into ``stages`` pipeline stages on Ray actors (see the module
    docstring); ``replicas`` copies of the chain serve inputs in parallel. ``address=None``
    starts a local Ray instance (unless one is running); otherwise joins that cluster.
    ``memory_limit``: bytes one stage may hold (weights + peak activations). Or, with no
    model, ``artifacts``: the stage files a pipeline's ``export`` wrote, in order (workers
    then need no PyTorch). The returned Pipeline's ``partition.table()`` reports the
    stages and the cost they were balanced on (None for artifacts).

    The cuts balance FLOPs and bytes unless times are measured: ``profile=True`` compiles
    the whole model here once (llvm, ``threads_per_stage`` threads) and balances its kernel
    profile on the example inputs (``kiln.distributed.profile``); ``seconds`` gives them
    instead, node name of the optimized graph -> seconds."""
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise KilnError(f"replicas must be a positive integer, got {replicas!r}")
    if not isinstance(threads_per_stage, int) or threads_per_stage < 0:
        raise KilnError(f"threads_per_stage must be 0 or more, got {threads_per_stage!r}")
    if profile and seconds is not None:
        raise KilnError("pass profile=True or seconds, not both",
                        hint="profile=True measures the seconds itself")
    if artifacts is not None:
        if model is not None:
            raise KilnError("pass a model or artifacts, not both")
        if profile or seconds is not None:
            raise KilnError("artifacts are already partitioned; profile and seconds need a "
                            "model")
        return _from_artifacts(artifacts, replicas, threads_per_stage, address)
    from kiln.api import example_tensors, optimize
    from kiln.frontend.trace import trace_module
    from kiln.passes.partition import partition

    inputs = example_tensors(example_inputs)
    graph, _ = trace_module(model, inputs, frontend)
    graph, _ = optimize(graph, "O1")
    cost = None
    if profile:
        from kiln.distributed.profile import profile_nodes

        measured = profile_nodes(graph, inputs, threads_per_stage)
        seconds, cost = measured.seconds, measured.describe()
    part = partition(graph, stages, memory_limit=memory_limit, seconds=seconds, cost=cost)
    first = [(v, part.graphs[0].types[v]) for v in part.graphs[0].inputs]
    return Pipeline(part.graphs, replicas=replicas, backend=backend,
                    threads_per_stage=threads_per_stage, address=address, partition=part,
                    first_inputs=first)


def _from_artifacts(paths: Sequence[str | os.PathLike], replicas: int, threads: int,
                    address: str | None) -> Pipeline:
    """A pipeline of exported stages, each checked here (read_image) before any worker
    loads it; consecutive stages must agree on what passes between them."""
    from kiln.ir.types import DType, TensorType
    from kiln.runtime.artifact import read_image

    if not paths:
        raise KilnError("artifacts is empty", hint="pass the stage files in order")
    blobs, images = [], []
    for p in paths:
        data = Path(p).read_bytes() if not isinstance(p, bytes) else p
        images.append(read_image(data)[0])
        blobs.append(data)
    for k in range(1, len(images)):
        sent = [(d, tuple(s)) for _, d, s in images[k - 1].outputs]
        taken = [(d, tuple(s)) for _, d, s in images[k].inputs]
        if sent != taken:
            raise KilnError(f"stage {k - 1} sends {sent}, stage {k} takes {taken}",
                            hint="pass the stage files of one export, in order")
    first = [(n, TensorType(tuple(s), DType(d))) for n, d, s in images[0].inputs]
    return Pipeline(blobs, replicas=replicas, backend="llvm", threads_per_stage=threads,
                    address=address, first_inputs=first)
