"""Fusion: decide which graph nodes share a kernel.

Every node gets one role:
- ``root``: it starts a kernel whose loop nest writes its output to memory;
- ``inline``: it is computed inside its consumers' kernels at the index they need (shape ops
  such as permute/slice/reshape cost only index arithmetic, so they inline into every consumer;
  elementwise arithmetic inlines into its single consumer);
- ``epilogue``: an elementwise op applied to an anchor's (matmul, conv, reduction...) result as
  it is stored (bias, activation, residual add, scaling).
The plan records why each node got its role, for the debugger.

A fused value's expression is bounded (``MAX_FUSED_OPS``): a node whose expression would hold
more ops becomes a root, so a chain of any length compiles as a sequence of kernels whose
expressions stay shallow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.ir import Graph, Node, get_op
from kiln.ir.decompose import decomposition_repeats

# Injective ops computed per output element: elementwise arithmetic and per-channel affine.
ELEMENTWISE_EXTRA = frozenset({"batch_norm", "embedding"})
# Anchors whose packed schedules need their input in memory, in its own row-major layout: an
# injective producer feeding them (a permute, a channel shuffle, a split, a concat, a slice) is
# stored once by a copy kernel, never recomputed inside their loops. A reshape needs no copy: it
# is the same memory, and their lowerings read through it (``Lowering.stored_view``).
MATERIALIZE_FOR = frozenset({"conv", "conv_transpose"})
# Anchors whose packed schedules view their output and its epilogue as one [rows, columns]
# matrix (``collapsed_views``): a side operand of the epilogue computed by a shape op (a
# permute, slice or reshape of another value) indexes by its own axes, which that view cannot
# express, so the anchor fell back to its scalar loop nest (MaxViT's 1x1 convs adding a
# grid-permuted residual: 29 ms for 103 MFLOP, 3.5 GFLOP/s). Such a side operand is stored.
PACKED_EPILOGUE = frozenset({"conv", "linear", "qlinear", "qconv", "dynamic_qlinear"})
# Anchors that read each input element a bounded, small number of times: cheap producers may be
# recomputed inside them instead of being written to memory first.
READ_FEW_TIMES = frozenset({"reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "softmax",
                            "log_softmax", "layer_norm", "group_norm"})

# Kernel expressions are trees that lowering, the kernel passes, code generation and the kernel
# interpreter build and walk recursively (a Python frame or two per level), and an operand that
# an op's expression uses twice (x * sigmoid(x)) is a subtree written twice. So the expression
# of a value computed inside its consumers' kernel holds at most this many op applications,
# each operand's count multiplied by how often its consumer repeats it; a node past that is
# stored instead (a root), and its consumers load it. A kernel's own expression then holds at
# most one op over the bound per operand of its root. Ordinary models fuse far fewer: the zoo's
# largest inlined expression holds 8 (5 after O1), the random test graphs' 21. A chain of N
# elementwise ops becomes about N / (MAX_FUSED_OPS + 1) kernels.
MAX_FUSED_OPS = 32
# How many times an op's kernel expression repeats each operand, where more than once (the
# element rules in passes/lower/elementwise.py; tests/passes/test_deep_chains.py checks them).
# Composite ops count it from their decomposition; quantize and embedding are hand-written rules.
OPERAND_REPEATS = {"quantize": 2, "embedding": 3, **decomposition_repeats()}


def is_shape_op(op: str) -> bool:
    """An op that moves or picks data without arithmetic (the registry's kind ``shape``): a pure
    index map."""
    return get_op(op).kind == "shape"


def is_injective(op: str) -> bool:
    """An op whose output element depends on a fixed element of each input."""
    return is_shape_op(op) or op in ELEMENTWISE_EXTRA or get_op(op).kind == "elementwise"


@dataclass
class FusionPlan:
    """Roles of the nodes (by node name), each anchor's epilogue chain, and the values each
    root's kernel writes to memory."""

    roles: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    epilogues: dict[str, list[Node]] = field(default_factory=dict)
    group_outputs: dict[str, list[str]] = field(default_factory=dict)
    # The anchor of each epilogue node (nodes that leave an epilogue leave this map) and each
    # anchor's op.
    epilogue_anchor: dict[str, str] = field(default_factory=dict)
    anchor_ops: dict[str, str] = field(default_factory=dict)

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
            plan.epilogue_anchor[c.name] = n.name
            plan.roles[c.name] = "epilogue"
            plan.reasons[c.name] = f"fused into {n.name}'s store"
            cur = c.outputs[0]
        plan.roles[n.name] = "root"
        plan.reasons[n.name] = f"anchor ({get_op(n.op).kind}); epilogue stops: {why}"
        plan.epilogues[n.name] = chain
        plan.anchor_ops[n.name] = n.op
        plan.group_outputs[n.name] = [cur]

    # 2. Injective nodes inline into consumers or become roots of elementwise kernels.
    for n in reversed(graph.nodes):
        if n.name in plan.roles:
            continue
        _place_injective(n, plan, users, outputs)

    # 3. Bound every kernel's expression.
    _bound_expressions(graph, plan, users, outputs)
    return plan


def _place_injective(n: Node, plan: FusionPlan, users, outputs) -> None:
    """Give the injective node ``n`` its role: inlined into its consumer, or the root of an
    elementwise kernel of its own."""
    role, why = _injective_role(n, plan, users, outputs)
    plan.roles[n.name] = role
    plan.reasons[n.name] = why
    if role == "root":
        plan.epilogues[n.name] = []
        plan.group_outputs[n.name] = list(n.outputs)


def _injective_role(n: Node, plan: FusionPlan, users: dict[str, list[Node]],
                    outputs: set[str]) -> tuple[str, str]:
    """The role of injective node ``n`` (inline or root) and why, given its consumers' roles."""
    readers = [u for o in n.outputs for u in users.get(o, [])]
    if any(o in outputs for o in n.outputs):
        return "root", "graph output"
    anchor = _memory_reader(readers, plan, users)
    if anchor is not None and n.op != "reshape":
        # A convolution's schedules read their input from memory in its own layout: a
        # permuted, split, sliced or concatenated view would leave them the unpacked loop nest,
        # recomputing the view's index arithmetic at every tap (ShuffleNet's channel shuffles
        # ran its 1x1 convs at 0.4 GFLOP/s; an int8 layer's channels-last output feeding a
        # float depthwise conv likewise). One copy kernel stores it instead.
        return "root", f"{n.op} read by the convolution {anchor.name}: stored once, in its layout"
    if is_shape_op(n.op):
        # (A split's pieces stay inline: an injective root kernel writes one output.)
        for u in readers if len(n.outputs) == 1 else ():
            anchor = plan.epilogue_anchor.get(u.name)
            if plan.roles.get(u.name) == "epilogue" and \
                    plan.anchor_ops.get(anchor) in PACKED_EPILOGUE:
                return "root", (f"{n.op} read beside {anchor}'s output in its epilogue: stored, "
                                f"so the packed schedule can view the epilogue as a matrix")
        return "inline", "shape op: index arithmetic in each consumer"
    if len(readers) != 1:
        return "root", f"{len(readers)} users: computed once and stored"
    u = readers[0]
    if is_injective(u.op) or plan.roles.get(u.name) == "epilogue" or u.op in READ_FEW_TIMES:
        return "inline", f"computed inside {u.name}"
    return "root", f"consumer {u.name} ({u.op}) reads it many times"


def _memory_reader(readers: list[Node], plan: FusionPlan,
                   users: dict[str, list[Node]]) -> Node | None:
    """The first anchor of MATERIALIZE_FOR among ``readers``, or among the readers of the
    inline reshapes among them (a reshape is the same memory: its input is what they read)."""
    stack, seen = list(readers), set()
    while stack:
        u = stack.pop()
        if u.name in seen:
            continue
        seen.add(u.name)
        if u.op in MATERIALIZE_FOR:
            return u
        if u.op == "reshape" and plan.roles.get(u.name) == "inline":
            stack.extend(r for o in u.outputs for r in users.get(o, []))
    return None


def _bound_expressions(graph: Graph, plan: FusionPlan, users: dict[str, list[Node]],
                       outputs: set[str]) -> None:
    """Make roots of the nodes whose fused expression would pass ``MAX_FUSED_OPS`` (one walk
    in topological order: each node's count depends only on its producers')."""
    anchor_of = plan.epilogue_anchor   # kept current: nodes leaving an epilogue leave it
    producers = graph.producers()
    fused_ops: dict[str, int] = {}  # node -> op applications in its expression
    for n in graph.nodes:
        role = plan.roles[n.name]
        if role not in ("inline", "epilogue"):
            continue  # a root's output is stored: its consumers load it
        repeats = OPERAND_REPEATS.get(n.op, 1)
        count = 1
        for v in n.inputs:
            p = producers.get(v)
            if p is not None and plan.roles[p.name] in ("inline", "epilogue"):
                count += repeats * fused_ops[p.name]
        if count <= MAX_FUSED_OPS:
            fused_ops[n.name] = count
            continue
        why = (f"its fused expression would hold {count} ops (more than {MAX_FUSED_OPS}): "
               f"stored, so kernel expressions stay shallow")
        if role == "epilogue":
            _end_epilogue_before(n, anchor_of.pop(n.name), plan, users, outputs, anchor_of)
        plan.roles[n.name] = "root"
        plan.reasons[n.name] = why
        plan.epilogues[n.name] = []
        plan.group_outputs[n.name] = list(n.outputs)


def _end_epilogue_before(n: Node, anchor: str, plan: FusionPlan, users: dict[str, list[Node]],
                         outputs: set[str], anchor_of: dict[str, str]) -> None:
    """End ``anchor``'s epilogue before its node ``n``; the nodes after ``n`` in the chain
    take the roles of injective nodes outside any epilogue."""
    chain = plan.epilogues[anchor]
    k = next(i for i, c in enumerate(chain) if c is n)
    plan.epilogues[anchor] = chain[:k]
    # An anchor has one output, named like the anchor itself.
    plan.group_outputs[anchor] = [chain[k - 1].outputs[0] if k else anchor]
    kind = plan.reasons[anchor].split(";")[0]
    plan.reasons[anchor] = (f"{kind}; epilogue stops: consumer {n.name} would make the fused "
                            f"expression too large")
    for c in reversed(chain[k + 1:]):  # consumers first, as in the plan's second step
        del anchor_of[c.name]
        _place_injective(c, plan, users, outputs)


def covered_nodes(graph: Graph, plan: FusionPlan) -> dict[str, tuple[str, ...]]:
    """For each fusion root, the nodes its kernel computes: the root, its epilogue chain and
    the inline nodes it recomputes, in graph order (the debugger checks a kernel against
    them; the partition shares a kernel's measured time over them)."""
    producers = graph.producers()
    covered: dict[str, tuple[str, ...]] = {}
    for root in plan.group_outputs:
        names = {root} | {n.name for n in plan.epilogues.get(root, [])}
        stack = [i for n in graph.nodes if n.name in names for i in n.inputs]
        while stack:
            node = producers.get(stack.pop())
            if node is not None and plan.roles.get(node.name) == "inline" \
                    and node.name not in names:
                names.add(node.name)
                stack.extend(node.inputs)
        covered[root] = tuple(n.name for n in graph.nodes if n.name in names)
    return covered
