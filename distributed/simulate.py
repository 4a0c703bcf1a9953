"""Predict pipeline- and data-parallel inference on clusters larger than this machine.

``simulate(graph, workers=N, bandwidth_gbps=, latency_us=, per_worker_gflops=)`` considers
every way to use N workers as ``stages`` x ``replicas`` (stages of one chain on separate
workers, replicas of the chain side by side), partitions the graph for each stage count with
the same pass ``kiln.pipeline`` uses, and predicts

- latency of one input: every stage's compute, plus for every hop between workers (the input
  to the first stage, each stage to the next, the output back) the network latency, the bytes
  over the bandwidth and a fixed per-hop overhead (the runtime's cost of a remote call);
- throughput with inputs streaming: replicas over the slowest stage's time (its compute, plus
  sending its output and the per-hop overhead: a worker is busy until its result is handed
  on). Inputs sent ``batch`` to a call pay the overhead and the latency once per batch. When
  the workers share ``cores`` CPU cores (a local pipeline: 3 stage actors on a 2-core
  machine), throughput is also at most the cores over one input's CPU time in all, every
  stage's compute and hops. A stream of ``inputs`` inputs also waits for the first batch to
  reach the slowest stage and the last to leave the stages after it.

A stage's compute is its nodes' time: measured seconds per node where given (``seconds``, as
``kiln.pipeline`` cuts by default), else predicted (partition.node_seconds: FLOPs at
``per_worker_gflops``, bytes at ``memory_gbps``, the larger per node), plus the runtime's
fixed cost of a call (``call_us``). ``calibrate`` measures this machine: kiln's effective
GFLOP/s on a model (compiled, one thread), its seconds per node and per-call cost, and the
per-hop overhead of a local Ray pipeline, and reports how far the simulator's prediction for
the measured pipeline is from the measurement.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kiln.ir import Graph, KilnError
from kiln.passes.partition import partition

LOCAL_GBPS = 4.0
"""Gigabits per second of an object between two local Ray processes: serializing, copying
and reading it back, measured with a batch's bytes on this machine's local Ray (each 64 KiB
more in a call cost about 0.2 ms of CPU)."""


@dataclass(frozen=True)
class Plan:
    """One way to use the workers, and what it is predicted to do."""

    stages: int
    replicas: int
    latency_s: float
    throughput: float
    bottleneck_stage: int

    def __str__(self) -> str:
        return (f"{self.stages} stage(s) x {self.replicas} replica(s): latency "
                f"{self.latency_s * 1e3:.3f} ms, {self.throughput:.1f} inputs/s "
                f"(bottleneck: stage {self.bottleneck_stage})")


@dataclass(frozen=True)
class Simulation:
    """Every plan considered for ``workers`` workers, and the best for each goal."""

    workers: int
    plans: list[Plan]

    @property
    def fastest(self) -> Plan:
        """The plan with the lowest latency (ties: higher throughput)."""
        return min(self.plans, key=lambda p: (p.latency_s, -p.throughput))

    @property
    def highest_throughput(self) -> Plan:
        """The plan with the most inputs per second (ties: lower latency)."""
        return max(self.plans, key=lambda p: (p.throughput, -p.latency_s))


def _hop(nbytes: int, bandwidth_gbps: float, latency_us: float, overhead_us: float) -> float:
    """Seconds to send ``nbytes`` over a link of ``bandwidth_gbps`` gigabits per second."""
    return (latency_us + overhead_us) * 1e-6 + nbytes * 8 / (bandwidth_gbps * 1e9)


def simulate(graph: Graph, workers: int, *, bandwidth_gbps: float = 10.0,
             latency_us: float = 50.0, per_worker_gflops: float = 50.0,
             memory_gbps: float = 10.0, overhead_us: float = 300.0,
             memory_limit: int | None = None, max_stages: int | None = None,
             seconds: Mapping[str, float] | None = None, call_us: float = 0.0,
             batch: int = 1, inputs: int | None = None, cores: int | None = None
             ) -> Simulation:
    """Predict every stages x replicas plan for ``workers`` workers (see the module
    docstring): ``bandwidth_gbps`` is the network's gigabits per second, ``latency_us`` its
    one-way latency, ``memory_gbps`` a worker's memory bandwidth in gigabytes per second.
    Stage counts whose stages do not fit ``memory_limit``, or that exceed the
    graph's nodes or ``max_stages``, are left out.

    ``seconds``: measured seconds per node (``kiln.distributed.profile_nodes``) for both the
    cuts and the stages' compute, as ``kiln.pipeline`` cuts by default; ``call_us``: the
    runtime's fixed cost of running one stage on one input. Throughput is for a stream of
    ``inputs`` inputs (None: an endless one) sent ``batch`` to a call, so a call's
    ``overhead_us`` and ``latency_us`` are paid once per batch; ``cores``: the CPU cores all
    the workers share (None: each worker has its own), which bounds throughput by the CPU
    time one input costs in all (every stage's compute and hops) over ``cores``."""
    if not isinstance(workers, int) or workers < 1:
        raise KilnError(f"workers must be a positive integer, got {workers!r}")
    if not isinstance(batch, int) or batch < 1:
        raise KilnError(f"batch must be a positive integer, got {batch!r}")
    in_bytes = sum(graph.types[v].nbytes for v in graph.inputs)
    plans = []
    limit = min(workers, len(graph.nodes), max_stages or workers)
    for stages in range(1, limit + 1):
        try:
            part = partition(graph, stages, memory_limit=memory_limit, seconds=seconds,
                             gflops=per_worker_gflops, bandwidth_gbps=memory_gbps)
        except KilnError:
            continue
        replicas = workers // stages
        compute = [s.predicted_s + call_us * 1e-6 for s in part.stages]
        hops_in = [in_bytes] + [s.send_bytes for s in part.stages[:-1]]
        latency = sum(compute) + sum(
            _hop(b, bandwidth_gbps, latency_us, overhead_us) for b in hops_in) + _hop(
            part.stages[-1].send_bytes, bandwidth_gbps, latency_us, 0.0)
        # Streaming: a worker is busy with an input until its result is handed on; a call
        # (its overhead and the link's latency) carries a whole batch.
        busy = [c + _hop(s.send_bytes, bandwidth_gbps, latency_us / batch, overhead_us / batch)
                for c, s in zip(compute, part.stages)]
        slowest = max(range(stages), key=busy.__getitem__)
        period = busy[slowest] / replicas
        if cores is not None:
            # Stages x replicas processes on fewer cores: every stage's CPU time, its hop
            # (the call's overhead and its bytes' copies) included, comes out of the same
            # cores, and so does sending the input.
            cpu = sum(c + _hop(s.send_bytes, bandwidth_gbps, 0.0, overhead_us / batch)
                      for c, s in zip(compute, part.stages))
            period = max(period, (cpu + _hop(in_bytes, bandwidth_gbps, 0.0, 0.0)) / cores)
        throughput = 1 / period
        if inputs is not None:
            # The first batch passes every stage before the slowest works flat out, and the
            # last leaves it only after the stages behind it: the stages' time besides the
            # slowest's, once per batch.
            per_chain = min(batch, inputs / replicas)
            fill = per_chain * (sum(busy) - busy[slowest])
            throughput = inputs / (fill + inputs * period)
        plans.append(Plan(stages, replicas, latency, throughput, slowest))
    if not plans:
        raise KilnError(f"no partition of {graph.name} fits {workers} workers with "
                        f"memory_limit={memory_limit}", hint="raise memory_limit or add workers")
    return Simulation(workers, plans)


@dataclass(frozen=True)
class Calibration:
    """What this machine measured, and the simulator's error on the measured pipeline."""

    gflops: float
    overhead_us: float
    measured_latency_s: float
    predicted_latency_s: float
    measured_throughput: float
    predicted_throughput: float
    seconds: dict[str, float] = field(default_factory=dict)
    """Measured seconds per node of the optimized graph (one thread)."""
    call_us: float = 0.0
    """The runtime's cost of one call besides its kernels."""
    cores: int | None = None
    """The cores the local pipeline's actors shared."""
    batch: int = 1
    """Inputs per actor call in the measured stream."""
    stream: int = 0
    """Inputs in the measured stream."""

    @property
    def latency_error(self) -> float:
        """(predicted - measured) / measured latency."""
        return self.predicted_latency_s / self.measured_latency_s - 1

    @property
    def throughput_error(self) -> float:
        """(predicted - measured) / measured throughput."""
        return self.predicted_throughput / self.measured_throughput - 1

    def predict(self, graph: Graph, stages: int, *, inputs: int | None = None,
                batch: int = 1) -> Plan:
        """The simulator's plan for ``stages`` local stages (one replica) with these numbers:
        a stream of ``inputs`` sent ``batch`` to a call, on this machine's cores."""
        sim = simulate(graph, stages, per_worker_gflops=self.gflops,
                       overhead_us=self.overhead_us, latency_us=0.0,
                       bandwidth_gbps=LOCAL_GBPS,
                       memory_gbps=1e6, max_stages=stages, seconds=self.seconds or None,
                       call_us=self.call_us, batch=batch, inputs=inputs, cores=self.cores)
        return next(p for p in sim.plans if p.stages == stages)


def _best_s(fn: Any, repeat: int) -> float:
    """The fastest of ``repeat`` calls of ``fn``, in seconds: on a machine others share, the
    fastest call is the one least slowed by them (on a quiet one it is within a few percent
    of the median)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def calibrate(model: Any, example_inputs: Sequence[Any], *, repeat: int = 20,
              stream: int = 32, stages: int = 2) -> Calibration:
    """Measure this machine (see the module docstring): ``model`` compiled on one thread for
    the effective GFLOP/s, and profiled for its seconds per node (the cost ``kiln.pipeline``
    cuts on) and the runtime's per-call cost besides the kernels; then a local Ray pipeline of
    ``stages`` stages (one thread each) for one input's latency, from which the per-hop
    overhead is solved, and for throughput over ``stream`` inputs through ``map`` (times:
    the fastest of ``repeat``). The throughput prediction uses the fitted numbers, the batch
    ``map`` chose and the cores of this machine, and is checked against that measurement (on
    one machine: bandwidth is memory copies at LOCAL_GBPS, latency 0)."""
    import kiln
    from kiln.api import example_tensors, optimize
    from kiln.compression.prune import graph_flops
    from kiln.distributed.pipeline import pipeline
    from kiln.distributed.profile import profile_nodes
    from kiln.frontend.trace import trace_module

    inputs = example_tensors(example_inputs)
    graph, _ = trace_module(model, inputs, "fx")
    graph, _ = optimize(graph, "O1")
    compiled = kiln.compile(model, inputs, threads=1)
    compiled(*inputs)
    one = _best_s(lambda: compiled(*inputs), repeat)
    gflops = graph_flops(graph) / one / 1e9
    measured = profile_nodes(graph, inputs, 1, repeat=max(repeat, 5))
    # The profile is a median per kernel: where others slowed it past the fastest whole
    # call, it is scaled down to that call.
    scale = min(1.0, one / max(measured.total_s, 1e-12))
    seconds = {k: v * scale for k, v in measured.seconds.items()}
    call_us = max(one - measured.total_s * scale, 0.0) * 1e6
    base = Calibration(gflops, 0.0, 1.0, 1.0, 1.0, 1.0, seconds, call_us, _cores())
    with pipeline(model, inputs, stages=stages, threads_per_stage=1,
                  seconds=measured.seconds) as pipe:
        pipe(*inputs)
        latency = _best_s(lambda: pipe(*inputs), repeat)
        batch = pipe.batch_size(stream)
        t0 = time.perf_counter()
        answered = sum(1 for _ in pipe.map([inputs] * stream, batch=batch))
        throughput = answered / (time.perf_counter() - t0)
    # Latency: the stages' compute + stages + 1 hops, of which ``stages`` carry the call
    # overhead.
    overhead_us = max((latency - base.predict(graph, stages).latency_s) / stages * 1e6, 0.0)
    fitted = replace(base, overhead_us=overhead_us)
    plan = fitted.predict(graph, stages, inputs=stream, batch=batch)
    return replace(fitted, measured_latency_s=latency, predicted_latency_s=plan.latency_s,
                   measured_throughput=throughput, predicted_throughput=plan.throughput,
                   batch=batch, stream=stream)
