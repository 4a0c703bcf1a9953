"""Predict pipeline- and data-parallel inference on clusters larger than this machine.

``simulate(graph, workers=N, bandwidth_gbps=, latency_us=, per_worker_gflops=)`` considers
every way to use N workers as ``stages`` x ``replicas`` (stages of one chain on separate
workers, replicas of the chain side by side), partitions the graph for each stage count with
the same pass ``kiln.pipeline`` uses, and predicts

- latency of one input: every stage's compute, plus for every hop between workers (the input
  to the first stage, each stage to the next, the output back) the network latency, the bytes
  over the bandwidth and a fixed per-hop overhead (the runtime's cost of a remote call);
- throughput with inputs streaming: replicas over the slowest stage's time (its compute, plus
  sending its output and the per-hop overhead: a worker is busy until its result is handed on).

A stage's compute is its nodes' predicted time (partition.node_seconds: FLOPs at
``per_worker_gflops``, bytes at ``memory_gbps``, the larger per node). ``calibrate`` measures
this machine: kiln's effective GFLOP/s on a model (compiled, one thread) and the per-hop
overhead of a local Ray pipeline, and reports how far the simulator's prediction for the
measured pipeline is from the measurement.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kiln.ir import Graph, KilnError
from kiln.passes.partition import partition


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
             memory_limit: int | None = None, max_stages: int | None = None) -> Simulation:
    """Predict every stages x replicas plan for ``workers`` workers (see the module
    docstring): ``bandwidth_gbps`` is the network's gigabits per second, ``latency_us`` its
    one-way latency, ``memory_gbps`` a worker's memory bandwidth in gigabytes per second.
    Stage counts whose stages do not fit ``memory_limit``, or that exceed the
    graph's nodes or ``max_stages``, are left out."""
    if not isinstance(workers, int) or workers < 1:
        raise KilnError(f"workers must be a positive integer, got {workers!r}")
    in_bytes = sum(graph.types[v].nbytes for v in graph.inputs)
    plans = []
    limit = min(workers, len(graph.nodes), max_stages or workers)
    for stages in range(1, limit + 1):
        try:
            part = partition(graph, stages, memory_limit=memory_limit,
                             gflops=per_worker_gflops, bandwidth_gbps=memory_gbps)
        except KilnError:
            continue
        replicas = workers // stages
        hops_in = [in_bytes] + [s.send_bytes for s in part.stages[:-1]]
        busy = [s.predicted_s + _hop(s.send_bytes, bandwidth_gbps, latency_us, overhead_us)
                for s in part.stages]
        latency = sum(s.predicted_s for s in part.stages) + sum(
            _hop(b, bandwidth_gbps, latency_us, overhead_us) for b in hops_in) + _hop(
            part.stages[-1].send_bytes, bandwidth_gbps, latency_us, 0.0)
        slowest = max(range(stages), key=busy.__getitem__)
        plans.append(Plan(stages, replicas, latency, replicas / busy[slowest], slowest))
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

    @property
    def latency_error(self) -> float:
        """(predicted - measured) / measured latency."""
        return self.predicted_latency_s / self.measured_latency_s - 1

    @property
    def throughput_error(self) -> float:
        """(predicted - measured) / measured throughput."""
        return self.predicted_throughput / self.measured_throughput - 1


def _median_s(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(model: Any, example_inputs: Sequence[Any], *, repeat: int = 20,
              stream: int = 32) -> Calibration:
    """Measure this machine (see the module docstring): ``model`` compiled on one thread for
    the effective GFLOP/s; then a local 2-stage Ray pipeline (one thread per stage) for one
    input's latency, from which the per-hop overhead is solved, and for throughput over
    ``stream`` inputs. The throughput prediction uses the fitted numbers and is checked
    against that measurement (on one machine: bandwidth is memory, latency 0)."""
    import kiln
    from kiln.api import example_tensors, optimize
    from kiln.compression.prune import graph_flops
    from kiln.distributed.pipeline import pipeline
    from kiln.frontend.trace import trace_module

    inputs = example_tensors(example_inputs)
    graph, _ = trace_module(model, inputs, "fx")
    graph, _ = optimize(graph, "O1")
    compiled = kiln.compile(model, inputs, threads=1)
    compiled(*inputs)
    one = _median_s(lambda: compiled(*inputs), repeat)
    gflops = graph_flops(graph) / one / 1e9
    sim = simulate(graph, 2, per_worker_gflops=gflops, overhead_us=0.0, latency_us=0.0,
                   bandwidth_gbps=10.0, memory_gbps=1e6, max_stages=2)
    two = next(p for p in sim.plans if p.stages == 2)
    with pipeline(model, inputs, stages=2, threads_per_stage=1) as pipe:
        pipe(*inputs)
        measured = _median_s(lambda: pipe(*inputs), repeat)
        t0 = time.perf_counter()
        answered = sum(1 for _ in pipe.map([inputs] * stream))
        throughput = answered / (time.perf_counter() - t0)
    # Latency: 2 stages' compute + 3 hops, of which 2 carry the call overhead.
    overhead_us = max((measured - two.latency_s) / 2 * 1e6, 0.0)
    fitted = simulate(graph, 2, per_worker_gflops=gflops, overhead_us=overhead_us,
                      latency_us=0.0, bandwidth_gbps=10.0, memory_gbps=1e6, max_stages=2)
    plan = next(p for p in fitted.plans if p.stages == 2)
    return Calibration(gflops, overhead_us, measured, plan.latency_s, throughput,
                       plan.throughput)
