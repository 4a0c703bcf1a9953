"""Partition a graph into pipeline stages: k ordinary kiln graphs run one after another.

The graph's nodes, in their topological order, are cut into ``stages`` contiguous runs. Each
stage is an ordinary Graph: its inputs are the values earlier stages (or the model's inputs)
made that it or a later stage needs, its outputs the values later stages or the model's
outputs need (a value passes through a stage that does not use it, so stage k only talks to
stage k + 1). A stage compiles, exports and traces like any graph.

Cuts balance the stages' predicted time: per node, the larger of its FLOPs at
``gflops`` and its bytes at ``bandwidth_gbps`` (the op registry's costs), or measured seconds
per node when given (``kernel_node_seconds`` turns a kernel profile into those: each kernel's
time spread over the nodes it computes); the partition's ``cost`` says which was used. Each
cut is placed where the running time crosses its share of the total; within a window around
that point (``window`` of one stage's share) the cut with the fewest bytes crossing it wins,
since those bytes travel between workers on every call. Every stage must fit
``memory_limit`` bytes (its weights plus its peak of live activations), or the partition is
refused with a KilnError saying by how much.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from kiln.ir import Graph, KilnError, get_op, node_flops
from kiln.passes.fusion import FusionPlan, covered_nodes, plan_fusion

DEFAULT_GFLOPS = 50.0
"""Per-worker compute assumed when nothing is measured (one AVX2 core's fp32 GEMM rate)."""

DEFAULT_BANDWIDTH_GBPS = 10.0
"""Per-worker memory bandwidth assumed when nothing is measured."""


@dataclass
class StageInfo:
    """One stage: its graph and what it costs."""

    graph: Graph
    nodes: int
    flops: int
    weight_bytes: int
    peak_bytes: int
    send_bytes: int
    predicted_s: float

    @property
    def memory_bytes(self) -> int:
        """Weights plus peak live activations."""
        return self.weight_bytes + self.peak_bytes


@dataclass
class Partition:
    """The stages of a partitioned graph, in order."""

    stages: list[StageInfo] = field(default_factory=list)
    cost: str = ""
    """What the predicted times are made of (the model from FLOPs and bytes, or measured)."""

    @property
    def graphs(self) -> list[Graph]:
        """The stage graphs."""
        return [s.graph for s in self.stages]

    def table(self) -> str:
        """The partition report: per stage nodes, GFLOPs, weight MB, peak MB, MB sent on,
        predicted ms; then the cost the predictions come from."""
        rows = [f"{'stage':>5} {'nodes':>6} {'GFLOP':>8} {'weights MB':>11} {'peak MB':>8} "
                f"{'sends MB':>9} {'pred. ms':>9}"]
        for k, s in enumerate(self.stages):
            rows.append(f"{k:>5} {s.nodes:>6} {s.flops / 1e9:>8.3f} {s.weight_bytes / 1e6:>11.2f} "
                        f"{s.peak_bytes / 1e6:>8.2f} {s.send_bytes / 1e6:>9.3f} "
                        f"{s.predicted_s * 1e3:>9.3f}")
        rows.append(f"cost: {self.cost}")
        return "\n".join(rows)


def node_seconds(graph: Graph, gflops: float = DEFAULT_GFLOPS,
                 bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS) -> list[float]:
    """Each node's predicted seconds: max(FLOPs / gflops, bytes / bandwidth)."""
    out = []
    for n in graph.nodes:
        op = get_op(n.op)
        ins = [graph.types[i] for i in n.inputs]
        outs = [graph.types[o] for o in n.outputs]
        flops = node_flops(n, graph.types)
        out.append(max(flops / (gflops * 1e9), op.bytes_moved(ins, outs) / (bandwidth_gbps * 1e9)))
    return out


def kernel_node_seconds(graph: Graph, kernel_seconds: Mapping[str, float],
                        plan: FusionPlan | None = None) -> dict[str, float]:
    """Measured seconds per node of ``graph`` from seconds per kernel (keyed by the kernel's
    root node, as a backend's profile names it; kernels of one root add up).

    A kernel's time is shared among the nodes it computes (``covered_nodes`` under ``plan``,
    by default the fusion the backends use) in proportion to their FLOPs, evenly when none
    has any: inside one kernel the fused nodes' values stay in registers, so the work, not
    the bytes, tells them apart (a conv keeps its kernel's time, its fused relu a sliver). A
    node computed by no kernel (an alias of an input, say) costs 0. Every node of ``graph``
    is a key. A root not in the plan is a KilnError: the profile is of another graph."""
    plan = plan or plan_fusion(graph)
    covered = covered_nodes(graph, plan)
    flops = dict(zip((n.name for n in graph.nodes), _node_flops(graph)))
    out = {n.name: 0.0 for n in graph.nodes}
    for root, seconds in kernel_seconds.items():
        if root not in covered:
            raise KilnError(f"kernel root {root!r} is not a fusion root of {graph.name}",
                            hint="profile the same (optimized) graph that is partitioned")
        nodes = covered[root]
        weights = [flops[v] for v in nodes]
        total = sum(weights)
        for v, w in zip(nodes, weights):
            out[v] += float(seconds) * (w / total if total > 0 else 1 / len(nodes))
    return out


def _node_flops(graph: Graph) -> list[int]:
    return [node_flops(n, graph.types) for n in graph.nodes]


def _crossing(graph: Graph) -> tuple[list[set[str]], list[int]]:
    """For every cut position c (before node c; 0 < c < len(nodes)), the non-constant values
    made before c (or model inputs) that a node at or after c, or the model's outputs, read;
    and their bytes."""
    n = len(graph.nodes)
    made_at = {v: -1 for v in graph.inputs}
    last_use: dict[str, int] = {}
    for k, node in enumerate(graph.nodes):
        for v in node.outputs:
            made_at[v] = k
        for v in node.inputs:
            if v not in graph.constants:
                last_use[v] = k
    for v in graph.outputs:
        if v not in graph.constants:
            last_use[v] = n
    live: list[set[str]] = [set() for _ in range(n + 1)]
    for v, end in last_use.items():
        start = made_at.get(v, -1)
        for c in range(start + 1, end + 1):
            live[c].add(v)
    sizes = [sum(graph.types[v].nbytes for v in s) for s in live]
    return live, sizes


def _stage_graph(graph: Graph, k: int, lo: int, hi: int, live: list[set[str]]) -> Graph:
    """Nodes [lo, hi) as a graph reading what crosses cut ``lo`` and writing what crosses
    ``hi`` (the model's outputs for the last stage)."""
    nodes = graph.nodes[lo:hi]
    order = {v: i for i, v in enumerate(graph.values())}
    inputs = list(graph.inputs) if lo == 0 else sorted(live[lo], key=order.__getitem__)
    outputs = list(graph.outputs) if hi == len(graph.nodes) else sorted(live[hi],
                                                                       key=order.__getitem__)
    used = {v for node in nodes for v in node.inputs} | set(outputs)
    constants = {c: a for c, a in graph.constants.items() if c in used}
    names = set(inputs) | set(constants) | {o for node in nodes for o in node.outputs}
    types = {v: graph.types[v] for v in names}
    return Graph(f"{graph.name}_stage{k}", inputs, outputs, nodes, types, constants)


def _peak(graph: Graph, lo: int, hi: int, sizes: list[int]) -> int:
    return max(sizes[lo:hi + 1]) if hi > lo else sizes[lo]


def partition(graph: Graph, stages: int, *, memory_limit: int | None = None,
              seconds: Sequence[float] | Mapping[str, float] | None = None,
              gflops: float = DEFAULT_GFLOPS, bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS,
              window: float = 0.1, cost: str | None = None) -> Partition:
    """Cut ``graph`` into ``stages`` pipeline stages (see the module docstring).

    ``seconds``: measured time per node (a list in node order, or node name -> seconds, a
    missing name costing 0) in place of the model from FLOPs and bytes; ``cost`` says where
    they come from, for the report. Raises KilnError for fewer nodes than stages or a stage
    over ``memory_limit``."""
    n = len(graph.nodes)
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise KilnError(f"stages must be a positive integer, got {stages!r}")
    if stages > max(n, 1):
        raise KilnError(f"{graph.name} has {n} nodes, too few for {stages} stages",
                        hint=f"use at most {max(n, 1)} stages")
    if isinstance(seconds, Mapping):
        per_node = [float(seconds.get(node.name, 0.0)) for node in graph.nodes]
    elif seconds is not None:
        per_node = [float(s) for s in seconds]
        if len(per_node) != n:
            raise KilnError(f"seconds has {len(per_node)} entries for {n} nodes")
    else:
        per_node = node_seconds(graph, gflops, bandwidth_gbps)
    if seconds is None:
        cost = (f"predicted per node: max(FLOPs at {gflops:g} GFLOP/s, bytes at "
                f"{bandwidth_gbps:g} GB/s)")
    else:
        cost = f"measured seconds per node ({cost or 'given by the caller'})"
    prefix = np.concatenate([[0.0], np.cumsum(per_node)])
    total = float(prefix[-1])
    live, sizes = _crossing(graph)

    cuts = [0]
    for c in range(1, stages):
        target = total * c / stages
        share = total / stages
        lo = cuts[-1] + 1
        hi = n - (stages - c)           # leave a node for every later stage
        candidates = [p for p in range(lo, hi + 1) if abs(prefix[p] - target) <= window * share]
        if not candidates:              # nothing near the target (one huge node): nearest
            candidates = [min(range(lo, hi + 1), key=lambda p: abs(prefix[p] - target))]
        cuts.append(min(candidates, key=lambda p: (sizes[p], abs(prefix[p] - target))))
    cuts.append(n)

    flops = _node_flops(graph)
    result = Partition(cost=cost)
    for k in range(stages):
        lo, hi = cuts[k], cuts[k + 1]
        g = _stage_graph(graph, k, lo, hi, live)
        weight_bytes = int(sum(a.nbytes for a in g.constants.values()))
        peak = _peak(graph, lo, hi, sizes)
        send = sizes[hi] if hi < n else sum(graph.types[v].nbytes for v in graph.outputs)
        info = StageInfo(g, hi - lo, int(sum(flops[lo:hi])), weight_bytes, peak,
                         int(send), float(prefix[hi] - prefix[lo]))
        if memory_limit is not None and info.memory_bytes > memory_limit:
            raise KilnError(
                f"stage {k} of {graph.name} needs {info.memory_bytes / 1e6:.1f} MB (weights "
                f"{weight_bytes / 1e6:.1f} MB + activations {peak / 1e6:.1f} MB), over the "
                f"memory limit of {memory_limit / 1e6:.1f} MB",
                hint=f"use more stages (now {stages}) or raise memory_limit")
        result.stages.append(info)
    return result


def predicted_bottleneck(part: Partition, bandwidth_gbps: float, latency_us: float) -> float:
    """The slowest stage's seconds per input, its send to the next worker included."""
    return max(s.predicted_s + latency_us * 1e-6 + s.send_bytes / (bandwidth_gbps * 1e9)
               for s in part.stages) if part.stages else 0.0

