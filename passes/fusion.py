"""Fusion: decide which graph nodes share a kernel.

Every node gets one role:
- ``root``: it starts a kernel whose loop nest writes its output to memory;
- ``inline``: it is computed inside its consumers' kernels at the index they need (shape ops
  such as permute/slice/reshape cost only index arithmetic, so they inline into every consumer;
  elementwise arithmetic inlines into its single consumer);
- ``epilogue``: an elementwise op applied to an anchor's (matmul, conv, reduction...) result as
  it is stored (bias, activation, residual add, scaling).
The plan records why each node got its role, for the debugger.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.ir import Graph, Node, get_op

# Ops that move or pick data without arithmetic: pure index maps.
SHAPE_OPS = frozenset({"reshape", "permute", "slice", "split", "expand", "pad", "concat"})
# Injective ops computed per output element: elementwise arithmetic and per-channel affine.
ELEMENTWISE_EXTRA = frozenset({"batch_norm", "embedding"})
# Anchors that read each input element a bounded, small number of times: cheap producers may be
# recomputed inside them instead of being written to memory first.
# Anchors whose packed schedules need their input in memory (a permute feeding them is stored).
MATERIALIZE_FOR = frozenset({"conv", "conv_transpose"})
READ_FEW_TIMES = frozenset({"reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "softmax",
                            "log_softmax", "layer_norm", "group_norm"})


def is_shape_op(op: str) -> bool:
    return op in SHAPE_OPS


def is_injective(op: str) -> bool:
    """An op whose output element depends on a fixed element of each input."""
    return op in SHAPE_OPS or op in ELEMENTWISE_EXTRA or get_op(op).kind == "elementwise"


@dataclass
class FusionPlan:
    """Roles of the nodes (by node name), each anchor's epilogue chain, and the values each
    root's kernel writes to memory."""

    roles: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    epilogues: dict[str, list[Node]] = field(default_factory=dict)
    group_outputs: dict[str, list[str]] = field(default_factory=dict)

    def describe(self, graph: Graph) -> str:
        """One line per node: its role and why (the debugger prints this)."""
        lines = []
        for n in graph.nodes:
            lines.append(f"{n.name:<24} {n.op:<18} {self.roles[n.name]:<9} "
                         f"{self.reasons[n.name]}")
        return "\n".join(lines)


def plan_fusion(graph: Graph) -> FusionPlan:
    """Assign every node of ``graph`` a role (see the module docstring)."""
    plan = FusionPlan()
    users = graph.users()
    outputs = set(graph.outputs)

    def single_user(value: str) -> Node | None:
        us = users.get(value, [])
        return us[0] if len(us) == 1 and value not in outputs else None

    # 1. Epilogue chains hang off anchors.
    for n in graph.nodes:
        if is_injective(n.op) or len(n.outputs) != 1:
            continue
        cur = n.outputs[0]
        chain: list[Node] = []
        while True:
            c = single_user(cur)
            if c is None:
                why = "graph output" if cur in outputs else f"{len(users.get(cur, []))} users"
                break
            if c.name in plan.roles:
                why = f"consumer {c.name} is already fused into {plan.reasons[c.name][9:]}"
                break
            if is_shape_op(c.op) or not is_injective(c.op) or len(c.outputs) != 1:
                why = f"consumer {c.name} ({c.op}) is not elementwise"
                break
            if graph.types[c.outputs[0]].shape != graph.types[cur].shape:
                why = f"consumer {c.name} broadcasts to a larger shape"
                break
            chain.append(c)
            plan.roles[c.name] = "epilogue"
            plan.reasons[c.name] = f"fused into {n.name}'s store"
            cur = c.outputs[0]
        plan.roles[n.name] = "root"
        plan.reasons[n.name] = f"anchor ({get_op(n.op).kind}); epilogue stops: {why}"
        plan.epilogues[n.name] = chain
        plan.group_outputs[n.name] = [cur]

    # 2. Injective nodes inline into consumers or become roots of elementwise kernels.
    for n in reversed(graph.nodes):
        if n.name in plan.roles:
            continue
        readers = [u for o in n.outputs for u in users.get(o, [])]
        if any(o in outputs for o in n.outputs):
            role, why = "root", "graph output"
        elif n.op == "permute" and any(u.op in MATERIALIZE_FOR for u in readers):
            # A convolution's schedules read their input from memory in its own layout: a
            # transposed view would leave them the slow unpacked loop nest (as when an int8
            # layer's channels-last output feeds a float depthwise conv).
            role, why = "root", "permute read by a convolution: stored transposed once"
        elif is_shape_op(n.op):
            role, why = "inline", "shape op: index arithmetic in each consumer"
        else:
            us = [u for o in n.outputs for u in users.get(o, [])]
            if len(us) != 1:
                role, why = "root", f"{len(us)} users: computed once and stored"
            else:
                u = us[0]
                urole = plan.roles.get(u.name)
                if is_injective(u.op) or urole == "epilogue" or u.op in READ_FEW_TIMES:
                    role, why = "inline", f"computed inside {u.name}"
                else:
                    role, why = "root", f"consumer {u.name} ({u.op}) reads it many times"
        plan.roles[n.name] = role
        plan.reasons[n.name] = why
        if role == "root":
            plan.epilogues[n.name] = []
            plan.group_outputs[n.name] = list(n.outputs)
    return plan
