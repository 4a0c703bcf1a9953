"""What a pass is: a named, described transformation from one Graph to a new Graph.

A pass never mutates its input: nodes are immutable, ``Graph.copy`` gives new lists and dicts,
and constant arrays are read-only, so a pass builds its result from a copy and shares what it
does not change. Passes register themselves by name; pipelines (kiln.passes.pipelines) are
flat lists of those names.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kiln.ir import Graph, KilnError

EXACT = "exact"
LOSSY = "lossy"


@dataclass(frozen=True)
class ErrorBudget:
    """How far a lossy pass may move the outputs: |new - old| <= atol * max|old| + rtol * |old|."""

    rtol: float
    atol: float


@dataclass(frozen=True)
class PassResult:
    """A pass's output graph and whether it differs from the input."""

    graph: Graph
    changed: bool


@dataclass
class PassContext:
    """What a pass may consult besides the graph: options (``"<pass>.<option>"`` keys), a
    logger for what it did, and ``notes`` where it leaves results for its caller
    (``"<pass>.<what>"`` keys; e.g. quantize_int8's per-layer precision decisions)."""

    options: dict[str, Any] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("kiln.passes"))
    notes: dict[str, Any] = field(default_factory=dict)

    def option(self, pass_name: str, key: str, default: Any) -> Any:
        """The value of option ``<pass_name>.<key>``, or ``default`` when it is not set."""
        return self.options.get(f"{pass_name}.{key}", default)


class Pass(ABC):
    """A graph-to-graph transformation.

    Subclasses set ``name`` (used in pipelines and dumps), a one-line ``description``, and
    ``numerics``: ``"exact"`` (same math up to float reassociation) or ``"lossy"`` (opt-in;
    such a pass states its ``error_budget``). They implement ``apply``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    numerics: ClassVar[str] = EXACT
    error_budget: ClassVar[ErrorBudget | None] = None

    def run(self, graph: Graph, ctx: PassContext | None = None) -> PassResult:
        """Transform ``graph`` (left untouched) into a new graph."""
        result = self.apply(graph, ctx if ctx is not None else PassContext())
        if not isinstance(result, PassResult):
            raise KilnError(f"pass {self.name} returned {type(result).__name__}, not a PassResult")
        return result

    @abstractmethod
    def apply(self, graph: Graph, ctx: PassContext) -> PassResult:
        """The transformation itself; must not modify ``graph``."""

    def __repr__(self) -> str:
        return f"<pass {self.name} ({self.numerics})>"


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name to pipelines and ``get_pass``."""
    name = getattr(cls, "name", None)
    description = getattr(cls, "description", "")
    if not name or not description or "\n" in description:
        raise KilnError(f"pass class {cls.__name__} needs a name and a one-line description")
    if cls.numerics not in (EXACT, LOSSY):
        raise KilnError(f"pass {name}: numerics must be {EXACT!r} or {LOSSY!r}, "
                        f"got {cls.numerics!r}")
    if cls.numerics == LOSSY and cls.error_budget is None:
        raise KilnError(f"lossy pass {name} must state an error_budget")
    if name in _PASSES:
        raise KilnError(f"pass {name} is registered twice")
    _PASSES[name] = cls
    return cls


def get_pass(name: str) -> Pass:
    """A new instance of the pass registered as ``name``."""
    try:
        return _PASSES[name]()
    except KeyError:
        raise KilnError(f"no pass named {name!r}",
                        hint=f"known passes: {', '.join(sorted(_PASSES))}") from None


def all_passes() -> dict[str, Pass]:
    """An instance of every registered pass, by name."""
    return {name: cls() for name, cls in sorted(_PASSES.items())}
