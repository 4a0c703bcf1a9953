"""``kiln.pipeline``: a model split into stages that run as Ray actors, one per stage per
replica, with activations streaming between them through Ray.

    pipe = kiln.pipeline(model, (x,), stages=2, replicas=1)
    y = pipe(x)                      # one input through every stage
    ys = list(pipe.map(inputs))      # many inputs, stages overlapped, sent in batches
    pipe.close()

The model is traced and optimized once here, cut by ``kiln.passes.partition`` (each stage an
ordinary kiln graph; by default the cuts balance the kernel times measured here with the llvm
backend, see ``kiln.distributed.profile``; ``profile=False`` balances FLOPs and bytes), and
each actor compiles its stage (llvm, ``threads_per_stage`` threads) when it starts. A call
hands its input to the first stage's actor and the reference to that actor's result to the
next (the data goes from actor to actor, not through the driver); the driver waits only for
the last stage.

Hops cost more than small stages: on this 2-core machine one actor call whose object goes
through Ray's object store costs about 3-4 ms of CPU (a third each in the driver, the raylet
and the actor: task submission and dependency resolution, the object's creation, sealing and
pinning, its (de)serialization), one whose object is small enough for Ray to pass inline
(under 100 KiB) about 1.3 ms. So ``map`` sends inputs in batches: one call per stage carries
``batch`` inputs, each still run through the stage's compiled program on its own (the answers
are bit-identical to ``pipe(x)``'s); a batch's activations travel as objects of at most
``INLINE_BYTES`` (several inputs each) where one input fits, else as one object. The batch
size (``Pipeline.batch_size``) weighs the hops saved against the time the pipeline takes to
fill and drain, from each stage's time and the hop cost measured on the actors when the
pipeline starts (``stage_s``, ``hop_s``). Two batches per stage per replica are kept in
flight, so while stage 2 works on batch i, stage 1 works on batch i + 1.

Failures: actors are created with Ray's restart options (``max_restarts``) and their calls
with ``max_task_retries``, so a stage whose process dies is restarted (recompiling its stage)
and the calls it had are run again. Stages are pure functions of their inputs: a retried call
gives the same answer, and each input's answer is read once from the last stage. Before any
actor starts, the CPUs the stages ask for are compared with the cluster's: a pipeline that
cannot be placed is a KilnError, not a hang.

Replicas (data parallel): ``replicas`` copies of the stage chain; each batch goes to the chain
with the fewest batches in flight (round robin among equals).
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np

from kiln.ir import Graph, KilnError

MAX_RESTARTS = 3
"""How often Ray restarts a stage actor that died (and retries the calls it had)."""

HOP_S = 2.5e-3
"""Seconds one hop costs when none was measured: an actor call whose argument or result
goes through Ray's object store, on a 2-core machine (CPU of the driver, the raylet and the
two actors together)."""

INLINE_BYTES = int(os.environ.get("RAY_max_direct_call_object_size", 100 * 1024))
"""Ray passes an object this small inside the call (through the caller), a larger one
through the object store: an object store hop costs the raylet, the caller and the actor
about 3-4 ms of CPU on this machine, an inline one about 1.3 ms."""

MAX_BATCH = 32
"""The most inputs ``map`` sends in one actor call."""

STREAM_GUESS = 64
"""The stream length ``map`` sizes its batches for when the inputs have no len()."""


def _ray():
    try:
        import ray
    except ModuleNotFoundError:
        raise KilnError("kiln.pipeline runs on Ray, which is not installed",
                        hint="pip install 'kiln[distributed]' (or pip install ray)") from None
    return ray


class _Stage:
    """A Ray actor body: one stage, a kiln graph compiled here or an artifact (its bytes)
    loaded here, run on lists of arrays.

    The stage itself comes with every call, as ``[ObjectRef]`` (a reference nested in a small
    inlined argument: fetched and built on the first call, free after), not through the
    constructor: a restarted actor then rebuilds from the retried call (the driver holds the
    reference for the pipeline's life), and Ray has no object-store constructor arguments of
    a restartable actor to log an error-level notice about at every pipeline start
    (ray-project/ray#53727)."""

    def __init__(self, backend: str, threads: int) -> None:
        self.backend, self.threads = backend, threads
        self.fn = self.fn_checked = None
        self.image = None
        self.calls = 0

    def _load(self, stage: list) -> None:
        if self.fn is not None:
            return
        stage = _ray().get(stage[0])
        if isinstance(stage, Graph):
            from kiln.runtime import Executable

            exe = Executable(stage, self.backend, self.threads)
            self.image = getattr(exe.program, "image", None)
            self.fn = exe.run
            # Inputs reach a stage checked (the driver checks the first stage's, an earlier
            # stage made the others): the batch path skips checking them again.
            self.fn_checked = exe.run_checked
        else:
            from kiln.runtime.artifact import load

            loaded = load(stage, threads=self.threads)
            self.image = None
            self.fn = lambda arrays: list(loaded(*arrays)) if len(loaded.outputs) > 1 \
                else [loaded(*arrays)]
            self.fn_checked = self.fn

    def run(self, stage: list, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        self._load(stage)
        self.calls += 1
        return self.fn(list(arrays))

    def run_batch(self, stage: list, per: int, *chunks: Sequence[Sequence[np.ndarray]]) -> Any:
        """Several inputs in one call, each run through the stage on its own (the same
        answers as ``run``, bit for bit). The inputs come as chunks (lists of inputs, one
        argument each) and their outputs go back ``per`` to a chunk, one return value each
        (``per`` 0: all in one): ``_chunks`` sizes them for Ray to pass inline."""
        self._load(stage)
        self.calls += 1
        fn = self.fn_checked
        outs = [fn(list(arrays)) for chunk in chunks for arrays in chunk]
        if per <= 0 or per >= len(outs):
            return outs
        return tuple(outs[i:i + per] for i in range(0, len(outs), per))

    def probe(self, stage: list, carried: tuple[Sequence[np.ndarray], list[float]],
              repeat: int = 3) -> tuple[list[np.ndarray], list[float]]:
        """``run`` timed: (outputs, the seconds of the earlier stages plus this one's, the
        fastest of ``repeat`` runs)."""
        self._load(stage)
        arrays, times = carried
        best, out = float("inf"), []
        for _ in range(max(repeat, 1)):
            t0 = time.perf_counter()
            out = self.fn(list(arrays))
            best = min(best, time.perf_counter() - t0)
        return out, [*times, best]

    def artifact(self, stage: list) -> bytes:
        """This stage as a kiln artifact (llvm-compiled stages only)."""
        import tempfile

        self._load(stage)
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

    def ready(self, stage: list) -> bool:
        self._load(stage)
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
        self.chains = [[actor.remote(backend, threads_per_stage) for _ in self._stage_refs]
                       for _ in range(replicas)]
        ray.get([a.ready.remote(self._stage(k)) for chain in self.chains
                 for k, a in enumerate(chain)])
        self._first = first_inputs
        # What one input weighs entering each stage and leaving it: batches travel in
        # objects small enough to go inline where they can (_per_chunk).
        self._per_in = _per_chunk(sum(t.nbytes for _, t in first_inputs))
        self._per_out = [_per_chunk(_output_bytes(g)) for g in stages]
        self._in_flight = [0] * replicas
        self._turn = itertools.count()
        try:
            self.stage_s, self.hop_s = self._probe()
        except Exception:  # zeros the model cannot take: size batches on the partition's
            self.stage_s = [s.predicted_s for s in partition.stages] if partition else \
                [HOP_S] * len(stages)
            self.hop_s = HOP_S

    def _probe(self, trips: int = 5) -> tuple[list[float], float]:
        """Time the first chain on zeros of the input types, ``trips`` times: each stage's
        seconds per input (the fastest trip's) and the cost of one hop (one actor call and
        the object it hands on: the round trip's time not spent computing, over the hops,
        fastest trip). ``map`` sizes its batches on these; the calls also warm every
        actor."""
        ray = _ray()
        if not self._first:
            return [0.0] * len(self.chains[0]), HOP_S
        zeros = [np.zeros(tuple(t.shape), t.dtype.numpy) for _, t in self._first]
        stage_s = [float("inf")] * len(self.chains[0])
        hop_s = float("inf")
        for _ in range(trips):
            t0 = time.perf_counter()
            ref: Any = (zeros, [])
            for k, stage in enumerate(self.chains[0]):
                ref = stage.probe.remote(self._stage(k), ref, 1)
            _, times = ray.get(ref)
            wall = time.perf_counter() - t0
            stage_s = [min(a, b) for a, b in zip(stage_s, times)]
            hop_s = min(hop_s, max(wall - sum(times), 0.0) / (len(times) + 1))
        return stage_s, hop_s

    def _stage(self, k: int) -> list:
        """Stage ``k`` as its actors' calls carry it: its object-store reference in a list."""
        return [self._stage_refs[k]]

    def batch_size(self, inputs: int | None = None) -> int:
        """How many inputs ``map`` sends per actor call for a stream of ``inputs`` (None:
        unknown, taken as STREAM_GUESS). A batch of k costs one hop instead of k, but the
        last stage starts only once the first batch has passed the others, and the stream
        ends one batch after the first stage finishes: about (stages - 1) x k inputs' time
        of the slowest stage is lost filling and draining the pipeline, while n / k hops
        are paid. k = sqrt(n x hop / ((stages - 1) x slowest stage)) balances the two;
        capped so every stage of every replica gets two batches, and at MAX_BATCH."""
        stages, replicas = len(self.chains[0]) if self.chains else 1, max(len(self.chains), 1)
        per_chain = (STREAM_GUESS if inputs is None else inputs) / replicas
        slowest = max(max(self.stage_s, default=0.0), 1e-6)
        k = math.sqrt(per_chain * self.hop_s / (max(stages - 1, 1) * slowest))
        k = min(k, per_chain / (2 * stages), MAX_BATCH)
        return max(1, int(round(k)))

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
            path.write_bytes(_ray().get(stage.artifact.remote(self._stage(k))))
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
        for k, stage in enumerate(self.chains[r]):
            ref = stage.run.remote(self._stage(k), ref)
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

    def _submit_batch(self, batch: list[list[np.ndarray]]) -> tuple[int, Any]:
        """Send ``batch`` (checked inputs) down the least-loaded chain: one call per stage,
        each handed the reference to the previous stage's result (the data moves between
        the actors through the object store, not through this process)."""
        if not self.chains:
            raise KilnError("this pipeline is closed", hint="create a new one with "
                                                         "kiln.pipeline(...)")
        start, n = next(self._turn), len(self.chains)
        r = min(((start + i) % n for i in range(n)), key=lambda i: self._in_flight[i])
        refs: list[Any] = _chunks(batch, self._per_in)
        for k, (stage, per) in enumerate(zip(self.chains[r], self._per_out)):
            returns = len(_chunks(batch, per))
            out = stage.run_batch.options(num_returns=returns).remote(self._stage(k), per,
                                                                       *refs)
            refs = [out] if returns == 1 else list(out)
        self._in_flight[r] += 1
        return r, refs

    def _results(self, r: int, refs: list[Any]) -> list[Any]:
        try:
            chunks = _ray().get(refs)
        finally:
            self._in_flight[r] -= 1
        return [o[0] if len(o) == 1 else tuple(o) for chunk in chunks for o in chunk]

    def map(self, inputs: Iterable[Any], window: int | None = None,
            batch: int | None = None) -> Iterator[Any]:
        """The outputs for each of ``inputs`` (a tensor, array or tuple of them per item), in
        order. Inputs travel ``batch`` to an actor call (default: ``batch_size`` for this
        many inputs), each still run through the stages on its own; up to ``window``
        inputs are in flight (default: two batches per stage per replica)."""
        if batch is None:
            batch = self.batch_size(len(inputs) if isinstance(inputs, Sized) else None)
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise KilnError(f"batch must be a positive integer, got {batch!r}")
        calls = sum(len(c) for c in self.chains)
        window = max(window or 2 * calls * batch, batch)
        pending: collections.deque = collections.deque()
        group: list[list[np.ndarray]] = []
        for x in inputs:
            group.append(_check_inputs(self._first, self._arrays(x)))
            if len(group) == batch:
                pending.append(self._submit_batch(group))
                group = []
                if len(pending) * batch >= window:
                    yield from self._results(*pending.popleft())
        if group:
            pending.append(self._submit_batch(group))
        while pending:
            yield from self._results(*pending.popleft())

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


def _output_bytes(stage: Graph | bytes) -> int:
    """Bytes of one input's outputs of ``stage`` (a graph or an artifact's bytes)."""
    if isinstance(stage, Graph):
        return sum(stage.types[v].nbytes for v in stage.outputs)
    from kiln.ir.types import DType, TensorType
    from kiln.runtime.artifact import read_image

    return sum(TensorType(tuple(shape), DType(d)).nbytes
               for _, d, shape in read_image(stage)[0].outputs)


def _per_chunk(nbytes: int) -> int:
    """How many inputs of ``nbytes`` each one Ray object may hold and still be passed inline
    (0: even one is too large; a batch of them then travels as one object through the
    object store, one store hop instead of one per input)."""
    return max(INLINE_BYTES - 4096, 0) // (nbytes + 512)


def _chunks(items: list, per: int) -> list[list]:
    """``items`` cut into runs of ``per`` (all in one when ``per`` is 0 or large)."""
    if per <= 0 or per >= len(items):
        return [items]
    return [items[i:i + per] for i in range(0, len(items), per)]


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
             profile: bool | None = None, seconds: Mapping[str, float] | None = None
             ) -> Pipeline:
    """Split ``model`` into ``stages`` pipeline stages on Ray actors (see the module
    docstring); ``replicas`` copies of the chain serve inputs in parallel. ``address=None``
    starts a local Ray instance (unless one is running); otherwise joins that cluster.
    ``memory_limit``: bytes one stage may hold (weights + peak activations). Or, with no
    model, ``artifacts``: the stage files a pipeline's ``export`` wrote, in order (workers
    then need no PyTorch). The returned Pipeline's ``partition.table()`` reports the
    stages and the cost they were balanced on (None for artifacts).

    The cuts balance measured times: ``profile`` (default: on with the llvm backend unless
    ``seconds`` is given) compiles the whole model here once (llvm, ``threads_per_stage``
    threads) and balances its kernel profile on the example inputs
    (``kiln.distributed.profile``); ``seconds`` gives them instead, node name of the
    optimized graph -> seconds; ``profile=False`` balances FLOPs and bytes, which on
    resnet18_cifar leaves the second stage twice the first's time."""
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise KilnError(f"replicas must be a positive integer, got {replicas!r}")
    if not isinstance(threads_per_stage, int) or threads_per_stage < 0:
        raise KilnError(f"threads_per_stage must be 0 or more, got {threads_per_stage!r}")
    if profile is None:
        profile = backend == "llvm" and seconds is None and artifacts is None
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
