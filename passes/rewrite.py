"""The local-rewrite driver: rules declared per op name, applied until nothing changes.

A rule is a function ``rule(node, rw) -> list of values | None``. It looks at ``node`` (its
operands already renamed to the values they stand for now) and at its surroundings through the
``Rewriter`` ``rw``; it returns ``None`` when it does not apply, or one value per node output
that replaces that output. It may emit new nodes and constants through ``rw`` first, and may
give the first of them the rewritten node's own output name, so that names (graph outputs
included) survive the rewrite.

The driver owns everything else: the walk in topological order, the renaming of later uses,
the use counts rules consult, the fixed point (sweeps until a sweep fires no rule, with a cap
that turns a cycle into a KilnError), removal of the code the rewrites left dead, and the names
of the graph outputs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.ir import DType, Graph, KilnError, Node, TensorType, get_op, infer_types
from kiln.passes.dce import live_values, remove_dead

ANY_OP = "*"
"""Rules declared for this op name are tried on every node, after the op's own rules."""

RuleFn = Callable[[Node, "Rewriter"], Sequence[str] | None]


@dataclass(frozen=True)
class Rule:
    """One rewrite: its name (for logs and cycle reports) and its function."""

    name: str
    fn: RuleFn


class RuleTable:
    """Rewrite rules keyed by op name, tried in declaration order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._rules: dict[str, list[Rule]] = {}

    def rule(self, *ops: str) -> Callable[[RuleFn], RuleFn]:
        """Decorator: declare ``fn`` as a rule for nodes of the given ops (or ``ANY_OP``)."""
        for op in ops:
            if op != ANY_OP:
                get_op(op)  # a typo in an op name fails at import, not silently never fires

        def declare(fn: RuleFn) -> RuleFn:
            for op in ops:
                self._rules.setdefault(op, []).append(Rule(fn.__name__, fn))
            return fn

        return declare

    def rules_for(self, op: str) -> list[Rule]:
        """The rules to try on a node of ``op``."""
        return self._rules.get(op, []) + self._rules.get(ANY_OP, [])


class Rewriter:
    """One sweep over a graph; what rules see of the graph being rebuilt."""

    def __init__(self, source: Graph) -> None:
        self.graph = source.copy()
        self.graph.nodes = []
        self._producers: dict[str, Node] = {}
        self._defined: set[str] = set(source.inputs) | set(source.constants)
        self._subst: dict[str, str] = {}
        # References to each value in the graph as it will be once the sweep ends: nodes already
        # emitted, source nodes not yet visited, and graph outputs.
        self._uses: Counter[str] = Counter(source.outputs)
        for n in source.nodes:
            self._uses.update(n.inputs)
        self._current: Node | None = None
        self._emitted = 0

    # ---- what rules use ----------------------------------------------------------------------
    def type_of(self, value: str) -> TensorType:
        """The type of a value."""
        return self.graph.type_of(value)

    def constant(self, value: str) -> np.ndarray | None:
        """The array of a constant value, or None for any other value."""
        return self.graph.constants.get(value)

    def producer(self, value: str) -> Node | None:
        """The node that makes ``value``, or None for graph inputs and constants."""
        return self._producers.get(value)

    def num_uses(self, value: str) -> int:
        """How many operand slots and graph outputs refer to ``value``."""
        return self._uses[value]

    def emit(self, op: str, inputs: Sequence[str], attrs: dict[str, Any] | None = None, *,
             name: str | None = None, source: str | None = None) -> str:
        """Add a single-output node and return its output.

        ``name`` may only be one of the rewritten node's outputs (default: a fresh name).
        ``source`` is the user's source line to carry; by default the rewritten node's.
        """
        node = self._rewriting()
        undefined = [i for i in inputs if i not in self._defined]
        if undefined:
            raise KilnError(f"a rule emitted {op} reading values not defined yet: {undefined}",
                            node=node.name, op=node.op)
        attrs = get_op(op).normalize_attrs(attrs, node=node.name)
        types = infer_types(op, [self.type_of(i) for i in inputs], attrs, node=node.name)
        if len(types) != 1:
            raise KilnError(f"emit() makes single-output nodes; {op} has {len(types)} outputs",
                            node=node.name, op=op)
        out = self._claim(name, types[0], node.name)
        new = Node(op, tuple(inputs), (out,), attrs, source or node.source)
        self.graph.nodes.append(new)
        self._producers[out] = new
        self._uses.update(new.inputs)
        return out

    def add_constant(self, array: np.ndarray, *, name: str | None = None,
                     hint: str = "const") -> str:
        """Add a read-only constant; returns its value. ``name`` as for ``emit``."""
        arr = np.array(array, order="C", copy=True)
        if DType.from_numpy(arr.dtype).numpy != arr.dtype:
            raise KilnError(f"constant of NumPy dtype {arr.dtype} has no kiln dtype",
                            node=self._rewriting().name, hint="round it with astype first")
        arr.setflags(write=False)
        out = self._claim(name, TensorType.of(arr), hint)
        self.graph.constants[out] = arr
        return out

    # ---- the sweep ---------------------------------------------------------------------------
    def _rewriting(self) -> Node:
        if self._current is None:
            raise KilnError("emit()/add_constant() called outside a rewrite rule")
        return self._current

    def _claim(self, name: str | None, t: TensorType, hint: str) -> str:
        node = self._rewriting()
        if name is None:
            name = self.graph.fresh_name(hint)
        elif name not in node.outputs or name in self._defined:
            raise KilnError(f"a rule may reuse only an output name of the node it rewrites, "
                            f"once; %{name} is not free", node=node.name, op=node.op)
        elif self.graph.types[name] != t:
            raise KilnError(f"a rule gave %{name} the type {t}, it had {self.graph.types[name]}",
                            node=node.name, op=node.op)
        self.graph.types[name] = t
        self._defined.add(name)
        self._emitted += 1
        return name

    def _visit(self, node: Node, rules: Iterable[Rule]) -> str | None:
        """Rewrite ``node`` with the first rule that applies (returning its name) or keep it."""
        inputs = tuple(self._subst.get(i, i) for i in node.inputs)
        if inputs != node.inputs:
            node = node.with_(inputs=inputs)
        for rule in rules:
            self._current, self._emitted = node, 0
            replacement = rule.fn(node, self)
            self._current = None
            if replacement is None:
                if self._emitted:
                    raise KilnError(f"rule {rule.name} emitted code but returned no replacement",
                                    node=node.name, op=node.op)
                continue
            self._replace(node, list(replacement), rule.name)
            return rule.name
        self.graph.nodes.append(node)
        for out in node.outputs:
            self._producers[out] = node
            self._defined.add(out)
        return None

    def _replace(self, node: Node, values: list[str], rule: str) -> None:
        if len(values) != len(node.outputs):
            raise KilnError(f"rule {rule} gave {len(values)} values for {len(node.outputs)} "
                            "outputs", node=node.name, op=node.op)
        for old, new in zip(node.outputs, values):
            if new not in self._defined or self.graph.types[new] != self.graph.types[old]:
                raise KilnError(f"rule {rule} replaced %{old}: {self.graph.types[old]} by "
                                f"%{new}, which is undefined or of another type",
                                node=node.name, op=node.op)
        self._uses.subtract(node.inputs)
        for old, new in zip(node.outputs, values):
            if new != old:
                self._subst[old] = new
                self._uses[new] += self._uses.pop(old, 0)

    def _finish(self) -> Graph:
        g = self.graph
        g.outputs = [self._subst.get(o, o) for o in g.outputs]
        g.types = {k: t for k, t in g.types.items() if k in self._defined}
        return g


def rewrite_graph(graph: Graph, table: RuleTable, *, max_sweeps: int = 50
                  ) -> tuple[Graph, Counter]:
    """Apply ``table``'s rules to ``graph`` until a sweep fires none.

    Returns the new graph and how often each rule fired. Code the rewrites left dead is
    removed; dead code that was already in ``graph`` is DCE's business and stays. Raises
    KilnError when ``max_sweeps`` sweeps still fire rules: some rules undo each other.
    """
    fired: Counter[str] = Counter()
    current = graph
    for _ in range(max_sweeps):
        rw = Rewriter(current)
        this_sweep: Counter[str] = Counter()
        for node in current.nodes:
            name = rw._visit(node, table.rules_for(node.op))
            if name is not None:
                this_sweep[name] += 1
        current = rw._finish()
        if not this_sweep:
            break
        fired.update(this_sweep)
    else:
        raise KilnError(
            f"{table.name}: rewrites still change the graph after {max_sweeps} sweeps",
            hint=f"rules {', '.join(sorted(this_sweep))} keep firing; one undoes another")
    if not fired:
        return current, fired
    already_dead = set(graph.values()) - live_values(graph)
    return restore_output_names(remove_dead(current, keep=already_dead), graph.outputs), fired


def restore_output_names(graph: Graph, names: Sequence[str]) -> Graph:
    """Give graph outputs back the names ``names`` they had before a pass replaced them.

    When a pass replaces output ``%out`` by another value ``%v`` (``out = x * 1`` becomes
    ``x``), the output list says ``%v``. If ``%out`` is free again and ``%v`` is a node output
    or constant that is not itself a graph input or an original output, ``%v`` is renamed
    ``%out`` everywhere, so callers see the outputs they named. Otherwise ``%v`` stays.
    """
    defined = set(graph.values())
    protected = set(graph.inputs) | set(names)
    rename: dict[str, str] = {}
    for want, have in zip(names, graph.outputs):
        if have == want or want in defined or have in protected or have in rename:
            continue
        rename[have] = want
        defined.add(want)
    if not rename:
        return graph

    def r(v: str) -> str:
        return rename.get(v, v)

    out = graph.copy()
    out.nodes = [n if not (set(n.inputs) | set(n.outputs)) & rename.keys()
                 else n.with_(inputs=tuple(map(r, n.inputs)), outputs=tuple(map(r, n.outputs)))
                 for n in graph.nodes]
    out.constants = {r(k): v for k, v in graph.constants.items()}
    out.types = {r(k): t for k, t in graph.types.items()}
    out.outputs = [r(o) for o in graph.outputs]
    return out
