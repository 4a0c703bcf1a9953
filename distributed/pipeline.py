"""``kiln.pipeline``: a model split into stages that run as Ray actors, one per stage per
replica, with activations streaming between them through Ray's object store.

    pipe = kiln.pipeline(model, (x,), stages=2, replicas=1)
    y = pipe(x)                      # one input through every stage
    ys = list(pipe.map(inputs))      # many inputs, stages overlapped
    pipe.close()

The model is traced and optimized once here, cut by ``kiln.passes.partition`` (each stage an
ordinary kiln graph), and each actor compiles its stage (llvm, ``threads_per_stage`` threads)
when it starts. A call hands its input to the first stage's actor and the reference to that
actor's result to the next; the driver waits only for the last stage. ``map`` keeps several
inputs in flight, so while stage 2 works on input i, stage 1 works on input i + 1.

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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from kiln.backends.reference import check_inputs
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
    """A Ray actor body: one stage graph compiled by kiln, run on lists of arrays."""

    def __init__(self, graph: Graph, backend: str, threads: int) -> None:
        from kiln.runtime import Executable

        self.exe = Executable(graph, backend, threads)
        self.calls = 0

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
        return self.exe.run(list(arrays))

    def pid(self) -> int:
        import os

        return os.getpid()

    def ready(self) -> bool:
        return True


class Pipeline:
    """Stage actors behind one callable (see the module docstring)."""

    def __init__(self, graphs: Sequence[Graph], *, replicas: int, backend: str,
                 threads_per_stage: int, address: str | None, partition: Any = None) -> None:
        ray = _ray()
        self.partition = partition
        self._started_ray = False
        if not ray.is_initialized():
            if address is None:
                ray.init(include_dashboard=False, log_to_driver=False)
                self._started_ray = True
            else:
                ray.init(address=address, log_to_driver=False)
        need = len(graphs) * replicas * max(threads_per_stage, 1)
        have = ray.cluster_resources().get("CPU", 0)
        if need > have:
            self.close()
            raise KilnError(f"the pipeline needs {need} CPUs ({len(graphs)} stages x {replicas} "
                            f"replicas x {max(threads_per_stage, 1)} threads), the Ray cluster "
                            f"has {have:g}",
                            hint="use fewer stages, replicas or threads_per_stage, or a larger "
                                 "cluster (address=)")
        actor = ray.remote(num_cpus=max(threads_per_stage, 1), max_restarts=MAX_RESTARTS,
                           max_task_retries=MAX_RESTARTS)(_Stage)
        # The stage graphs stay referenced here for the pipeline's life: a restarted actor
        # rebuilds from them.
        self._graph_refs = [ray.put(g) for g in graphs]
        self.chains = [[actor.remote(g, backend, threads_per_stage) for g in self._graph_refs]
                       for _ in range(replicas)]
        ray.get([a.ready.remote() for chain in self.chains for a in chain])
        self._first = graphs[0]
        self._in_flight = [0] * replicas
        self._turn = itertools.count()
        self.num_outputs = len(graphs[-1].outputs)

    def _submit(self, arrays: Sequence[np.ndarray]) -> tuple[int, Any]:
        if not self.chains:
            raise KilnError("this pipeline is closed", hint="create a new one with "
                                                         "kiln.pipeline(...)")
        arrays = check_inputs(self._first, arrays)      # a clear error here, not in an actor
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


def pipeline(model: Any, example_inputs: Sequence[Any], *, stages: int = 2, replicas: int = 1,
             backend: str = "llvm", threads_per_stage: int = 1, address: str | None = None,
             memory_limit: int | None = None, frontend: str = "fx") -> Pipeline:
    """Split ``model`` into ``stages`` pipeline stages on Ray actors (see the module
    docstring); ``replicas`` copies of the chain serve inputs in parallel. ``address=None``
    starts a local Ray instance (unless one is running); otherwise joins that cluster.
    ``memory_limit``: bytes one stage may hold (weights + peak activations).
    The returned Pipeline's ``partition.table()`` reports the stages."""
    from kiln.frontend.api import example_tensors, optimize
    from kiln.frontend.trace import trace_module
    from kiln.passes.partition import partition

    if not isinstance(replicas, int) or replicas < 1:
        raise KilnError(f"replicas must be a positive integer, got {replicas!r}")
    if not isinstance(threads_per_stage, int) or threads_per_stage < 0:
        raise KilnError(f"threads_per_stage must be 0 or more, got {threads_per_stage!r}")
    inputs = example_tensors(example_inputs)
    graph, _ = trace_module(model, inputs, frontend)
    graph, _ = optimize(graph, "O1")
    part = partition(graph, stages, memory_limit=memory_limit)
    return Pipeline(part.graphs, replicas=replicas, backend=backend,
                    threads_per_stage=threads_per_stage, address=address, partition=part)
