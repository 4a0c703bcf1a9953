"""The cluster simulator: plans for every stages x replicas split, predictions that follow
the cost model (compute, hops, overhead), and a calibration on a local Ray pipeline."""

from __future__ import annotations

import math
import os

import pytest

from kiln.api import optimize
from kiln.distributed import calibrate, simulate
from kiln.frontend.trace import trace_module
from kiln.ir import KilnError
from kiln.passes.partition import node_seconds, partition
from kiln.zoo import get_model


def graph_of(name: str):
    model, inputs = get_model(name)
    graph, _ = trace_module(model, inputs)
    return optimize(graph, "O1")[0]


def test_one_worker_is_the_model_plus_its_two_hops() -> None:
    graph = graph_of("lenet5")
    sim = simulate(graph, 1, bandwidth_gbps=1.0, latency_us=100.0, per_worker_gflops=20.0,
                   memory_gbps=5.0, overhead_us=200.0)
    (plan,) = sim.plans
    compute = sum(node_seconds(graph, 20.0, 5.0))
    in_bytes = sum(graph.types[v].nbytes for v in graph.inputs)
    out_bytes = sum(graph.types[v].nbytes for v in graph.outputs)
    want = compute + 300e-6 + in_bytes * 8 / 1e9 + 100e-6 + out_bytes * 8 / 1e9
    assert plan.latency_s == pytest.approx(want)
    assert plan.throughput == pytest.approx(1 / (compute + 300e-6 + out_bytes * 8 / 1e9))


def test_more_workers_never_predict_less_throughput() -> None:
    graph = graph_of("resnet18_cifar")
    best = [simulate(graph, n, overhead_us=100.0).highest_throughput.throughput
            for n in (1, 2, 4, 16, 64)]
    assert best == sorted(best) and best[-1] > 10 * best[0]
    sim = simulate(graph, 4, overhead_us=100.0)
    assert {(p.stages, p.replicas) for p in sim.plans} == {(1, 4), (2, 2), (3, 1), (4, 1)}


def test_slow_networks_favour_replicas_over_stages() -> None:
    graph = graph_of("resnet18_cifar")
    slow = simulate(graph, 4, bandwidth_gbps=0.01, latency_us=5000.0)
    assert slow.fastest.stages == 1
    fast = simulate(graph, 4, bandwidth_gbps=100.0, latency_us=1.0, overhead_us=0.0)
    assert fast.fastest.latency_s <= slow.fastest.latency_s


def test_shared_cores_batches_and_short_streams() -> None:
    graph = graph_of("resnet18_cifar")
    kw = dict(bandwidth_gbps=10.0, latency_us=0.0, overhead_us=2000.0, per_worker_gflops=20.0,
              memory_gbps=1e6, max_stages=3)
    own = {p.stages: p for p in simulate(graph, 3, **kw).plans}
    shared = {p.stages: p for p in simulate(graph, 3, cores=2, **kw).plans}
    assert all(shared[k].throughput <= own[k].throughput for k in own)
    # 3 stages on 2 cores: the cores, not the slowest stage, set the pace.
    part = partition(graph, 3, gflops=20.0, bandwidth_gbps=1e6)
    compute = sum(s.predicted_s for s in part.stages)
    sent = sum(s.send_bytes for s in part.stages) + sum(graph.types[v].nbytes
                                                         for v in graph.inputs)
    assert shared[3].throughput == pytest.approx(2 / (compute + 3 * 2e-3 + sent * 8 / 1e10))
    assert shared[3].throughput < own[3].throughput
    # A batch pays a call's overhead once; a short stream also fills and drains the stages.
    batched = {p.stages: p for p in simulate(graph, 3, cores=2, batch=8, **kw).plans}
    assert shared[3].throughput < batched[3].throughput <= 2 / compute
    short = {p.stages: p for p in simulate(graph, 3, cores=2, batch=8, inputs=64, **kw).plans}
    assert short[3].throughput < batched[3].throughput
    assert short[1].throughput == pytest.approx(batched[1].throughput)   # one stage: no fill
    # Measured seconds per node cut the stages and time them.
    seconds = {n.name: 1e-3 for n in graph.nodes}
    timed = simulate(graph, 1, seconds=seconds, overhead_us=0.0, latency_us=0.0,
                     bandwidth_gbps=1e9)
    assert timed.plans[0].throughput == pytest.approx(1 / (1e-3 * len(graph.nodes)), rel=1e-3)


def test_bad_worker_counts_and_impossible_limits_are_kiln_errors() -> None:
    graph = graph_of("mlp")
    with pytest.raises(KilnError, match="positive integer"):
        simulate(graph, 0)
    with pytest.raises(KilnError, match="no partition"):
        simulate(graph, 2, memory_limit=10)


def test_calibration_on_a_local_ray_pipeline() -> None:
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        model, inputs = get_model("mlp")
        cal = calibrate(model, inputs, repeat=5, stream=8)
    finally:
        ray.shutdown()
    assert cal.gflops > 0 and cal.overhead_us >= 0
    assert cal.measured_latency_s > 0 and cal.measured_throughput > 0
    assert math.isfinite(cal.throughput_error)
    # The per-hop overhead is solved from the measured latency, so the latency fits unless
    # the solution was clamped at zero.
    assert abs(cal.latency_error) < 0.05 or cal.overhead_us == 0
    # The prediction it was checked with: measured node times, this machine's cores, the
    # batch map chose for the stream.
    assert cal.seconds and cal.cores >= 1 and cal.batch >= 1 and cal.stream == 8
    graph = graph_of("mlp")
    plan = cal.predict(graph, 2, inputs=8, batch=cal.batch)
    assert plan.throughput == pytest.approx(cal.predicted_throughput)
