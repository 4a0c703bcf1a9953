"""Lowering: each fused group of the graph becomes one kernel (a loop nest over buffers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

import kiln.passes.lower.recurrent  # noqa: F401  (lstm_seq, gru_seq anchor rules)
from kiln.ir import Graph, KilnError, Node, get_op
from kiln.ir import kernel as K
from kiln.ir.kernel import Kernel
from kiln.passes.fusion import FusionPlan, is_injective, is_shape_op, plan_fusion
from kiln.passes.lower import elementwise, indexing  # noqa: F401  (register element/anchor rules)
from kiln.passes.lower.anchors import ANCHOR_RULES
from kiln.passes.lower.conv import lower_conv
from kiln.passes.lower.core import (
    KernelNodes,
    Lowering,
    buffer_name,
    default_kinds,
    flat_index,
    loop_nest,
)
from kiln.passes.lower.elementwise import reshape_groups
from kiln.passes.lower.matmul import lower_linear, lower_matmul
from kiln.passes.lower.pool import lower_pool
from kiln.passes.lower.precision import compute_f16_in_f32
from kiln.passes.lower.qgemm import (
    lower_dynamic_qlinear,
    lower_linear_w8,
    lower_qconv,
    lower_qlinear,
)
from kiln.passes.target import Target
from kiln.passes.tuning import DEFAULT as DEFAULT_TUNING
from kiln.passes.tuning import Tuning

DENSE_SCHEDULES = {"linear": lower_linear, "conv": lower_conv, "matmul": lower_matmul,
                   "max_pool": lower_pool, "avg_pool": lower_pool, "qconv": lower_qconv,
                   "qlinear": lower_qlinear, "linear_w8": lower_linear_w8,
                   "dynamic_qlinear": lower_dynamic_qlinear}


@dataclass
class KernelStep:
    """One kernel and the graph values (or lowering-made constants) bound to its buffers."""

    kernel: Kernel
    reads: dict[str, str]
    writes: dict[str, str]
    root: str
    temps: dict[str, int] = field(default_factory=dict)  # workspace buffer -> bytes


@dataclass
class LoweredGraph:
    """A graph as a sequence of kernels. ``constants`` holds the graph's constants and those
    made while lowering (packed weights), by buffer binding name."""

    graph: Graph
    plan: FusionPlan
    steps: list[KernelStep]
    constants: dict[str, np.ndarray] = field(default_factory=dict)

    def text(self) -> str:
        """Every kernel as text, in execution order."""
        return "\n".join(K.print_kernel(s.kernel) for s in self.steps)


def _walk_group(graph: Graph, producers: dict[str, Node], inline: set[str], out: str,
                split: bool) -> tuple[set[str], list[Node]] | None:
    """The values of the elementwise group computing ``out`` (each of ``out``'s shape, or a
    one-element value broadcast), and with ``split`` the inline reshapes to ``out``'s shape
    where the walk stopped; None where the group holds another shape or another shape op."""
    shape = graph.types[out].shape
    seen: set[str] = set()
    reshapes: list[Node] = []
    stack = [out]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        vshape = graph.types[v].shape
        if vshape != shape and math.prod(vshape) != 1:
            return None
        node = producers.get(v)
        if node is None or node.name not in inline:
            continue
        if split and vshape != shape:   # a one-element value, broadcast: read as it is
            continue
        if split and node.op == "reshape":
            reshapes.append(node)
            continue
        if is_shape_op(node.op) or get_op(node.op).kind != "elementwise":
            return None
        stack.extend(node.inputs)
    return seen, reshapes


def _flat_ok(graph: Graph, producers: dict[str, Node], inline: set[str], out: str) -> set[str]:
    """Values of an elementwise group that may be seen as 1-d (all same shape or scalars).

    Returns the set of those values, or an empty set when the group needs real indices."""
    walked = _walk_group(graph, producers, inline, out, split=False)
    if walked is None:
        return set()
    shape = graph.types[out].shape
    return {v for v in walked[0] if graph.types[v].shape == shape}


def _split_view(graph: Graph, producers: dict[str, Node], inline: set[str], out: str
                ) -> tuple[tuple[int, ...], set[str]] | None:
    """A finer shape to iterate an elementwise group over, where it reads through a reshape
    that merges dims (``[1, 32, 4, 64] -> [1, 32, 256]``, attention heads back to the hidden
    size): the reshape's input shape, and the group's values seen in it. Iterating the merged
    shape would split each index back with a division and a modulo (no vector loads); the
    finer one reads the reshape's input with affine indices. None where the group has other
    shapes (broadcasts), other shape ops, or reshapes of differing input shapes."""
    walked = _walk_group(graph, producers, inline, out, split=True)
    if walked is None or not walked[1]:
        return None
    shape = graph.types[out].shape
    finer = {graph.types[n.inputs[0]].shape for n in walked[1]}
    if len(finer) != 1:
        return None
    (src,) = finer
    if math.prod(src) != math.prod(shape) or \
            not all(len(gj) == 1 for _, gj in reshape_groups(src, shape)):
        return None
    return src, {v for v in walked[0] if graph.types[v].shape == shape}


def lower_group(graph: Graph, plan: FusionPlan, root: Node, producers: dict[str, Node],
                index: int, width: int = 1, target: Target | None = None,
                tuning: Tuning = DEFAULT_TUNING, inlined: set[str] | None = None
                ) -> tuple[KernelStep, dict[str, np.ndarray]]:
    """Lower the group rooted at ``root`` to a kernel; ``width`` is the target's f32 vector
    width (1: no packed dense schedules); ``target`` the CPU (None: no ISA-specific
    schedules); ``inlined`` the plan's inline nodes, when the caller has them."""
    epilogue = {n.name for n in plan.epilogues.get(root.name, [])}
    if inlined is None:
        inlined = _inline_nodes(plan)
    inline = KernelNodes(inlined, epilogue)
    low = Lowering(graph, inline, producers, target=target, tuning=tuning)
    outs = plan.group_outputs[root.name]
    writes = {buffer_name(o): o for o in outs}
    body: list
    if not is_injective(root.op):
        rule = ANCHOR_RULES.get(root.op)
        if rule is None:
            raise KilnError(f"no lowering for {root.op}", node=root.name, op=root.op)
        anchor_out, final = root.outputs[0], outs[0]
        final_shape = graph.types[final].shape

        def store(idx, value):
            low.overrides[anchor_out] = lambda _idx, v=value: v
            try:
                v = low.element(final, idx)
            finally:
                del low.overrides[anchor_out]
            return K.Store(buffer_name(final), flat_index(idx, final_shape), v)

        fast = DENSE_SCHEDULES.get(root.op)
        body = fast(low, root, final, low.inline, width) if fast and width > 1 else None
        if body is None:
            low.view_shapes = {}
            body = rule(low, root, store)
    else:
        low.inline = inline | {root.name}
        out_shape = graph.types[outs[0]].shape
        flat = _flat_ok(graph, producers, low.inline, outs[0]) if len(outs) == 1 else set()
        split = (_split_view(graph, producers, low.inline, outs[0])
                 if len(outs) == 1 and not flat else None)
        if flat and len(out_shape) != 1:
            low.view_shapes = {v: (math.prod(graph.types[v].shape),) for v in flat}
            out_shape = (math.prod(out_shape),)
        elif split is not None:
            out_shape, values = split
            low.view_shapes = dict.fromkeys(values, out_shape)

        def body_fn(idx):
            stmts = []
            for o in outs:
                shape = low.shape(o)
                stmts.append(K.Store(buffer_name(o), flat_index(idx, shape), low.element(o, idx)))
            return stmts

        if len(outs) == 1:
            body = loop_nest(low, out_shape, body_fn, default_kinds(out_shape))
        else:  # a multi-output shape op stored as graph outputs: one nest per output
            body = []
            for o in outs:
                shape = graph.types[o].shape

                def one(idx, o=o, shape=shape):
                    return [K.Store(buffer_name(o), flat_index(idx, shape), low.element(o, idx))]

                body += loop_nest(low, shape, one, default_kinds(shape))
    params = []
    for b, v in low.reads.items():
        if b in low.new_constants:
            arr = low.new_constants[b]
            params.append(K.Buffer(b, _kdtype(arr.dtype), arr.size))
        else:
            t = graph.types[v]
            params.append(K.Buffer(b, t.dtype.value, t.numel))
    for b, v in writes.items():
        t = graph.types[v]
        params.append(K.Buffer(b, t.dtype.value, t.numel))
    params.extend(low.workspaces)
    flops = get_op(root.op).flops([graph.types[i] for i in root.inputs],
                                  [graph.types[o] for o in root.outputs], root.attrs)
    name = buffer_name(f"k{index}_{root.name}")[2:]
    kernel = Kernel(name, tuple(params), tuple(_simplify_stmts(body)), tuple(low.scratch),
                    flops=int(flops), meta={"root": root.name, "op": root.op,
                                            **({"algorithm": low.algorithm} if low.algorithm
                                               else {}),
                                            **({"schedule": low.schedule} if low.schedule
                                               else {})})
    kernel = compute_f16_in_f32(kernel)
    reads = {b: v for b, v in low.reads.items()}
    temps = {b.name: b.nbytes for b in low.workspaces}
    return KernelStep(kernel, reads, writes, root.name, temps), low.new_constants


def _inline_nodes(plan: FusionPlan) -> set[str]:
    return {name for name, role in plan.roles.items() if role == "inline"}


def _kdtype(dt: np.dtype) -> str:
    from kiln.ir.types import DType

    return DType.from_numpy(dt).value


def _simplify_stmts(stmts):
    # map_stmts rebuilds bottom-up, so folding each node once simplifies every expression.
    return K.map_stmts(stmts, K.fold_index)


def lower_graph(graph: Graph, plan: FusionPlan | None = None, width: int = 1,
                target: Target | None = None, tuning: Tuning = DEFAULT_TUNING) -> LoweredGraph:
    """Fuse (unless a plan is given) and lower every group of ``graph`` to a kernel.

    ``width`` is the target's f32 vector width; above 1 the dense ops get packed GEMM
    schedules built for it. ``target``: the CPU, for schedules that depend on more than the
    width (the int8 dot-product instructions, cache blocking); ``tuning``: the thresholds and
    measured choices of the schedules."""
    plan = plan or plan_fusion(graph)
    producers = graph.producers()
    steps: list[KernelStep] = []
    constants: dict[str, np.ndarray] = {buffer_name(k): v for k, v in graph.constants.items()}
    # A group runs where its last node (the end of its epilogue) stands in the graph's order,
    # so every value its epilogue reads has been computed by then.
    by_last: dict[str, Node] = {}
    for n in graph.nodes:
        if plan.roles[n.name] == "root":
            by_last[producers[plan.group_outputs[n.name][-1]].name] = n
    # Once for all groups (each kernel adds its own nodes to it without a copy): a set per
    # group made lowering quadratic in the graph's size.
    inlined = _inline_nodes(plan)
    for n in graph.nodes:
        root = by_last.get(n.name)
        if root is None:
            continue
        step, new_consts = lower_group(graph, plan, root, producers, len(steps), width,
                                        target, tuning, inlined)
        steps.append(step)
        constants.update(new_consts)
    return LoweredGraph(graph, plan, steps, constants)


def run_lowered(lowered: LoweredGraph, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Execute the kernels with the kernel-IR interpreter (slow; small shapes in tests)."""
    g = lowered.graph
    values: dict[str, np.ndarray] = {}
    for name, arr in zip(g.inputs, inputs):
        values[name] = np.ascontiguousarray(arr).reshape(-1)
    for name, arr in g.constants.items():
        values[name] = np.ascontiguousarray(arr).reshape(-1)
    for step in lowered.steps:
        bufs = {}
        for b, v in step.reads.items():
            bufs[b] = (values[v] if v in values
                       else np.ascontiguousarray(lowered.constants[b]).reshape(-1))
        for b, v in step.writes.items():
            t = g.types[v]
            values[v] = bufs[b] = np.zeros(t.numel, t.dtype.numpy)
        for buf in step.kernel.params:
            if buf.name in step.temps:
                bufs[buf.name] = np.zeros(buf.size, K.np_dtype(buf.dtype))
        K.run_kernel(step.kernel, bufs)
    return [values[o].reshape(g.types[o].shape) for o in g.outputs]
