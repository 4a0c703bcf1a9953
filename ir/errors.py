"""Errors a user can cause. Every one names what went wrong, where, and what to do."""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error kiln raises for bad input.

    ``node`` / ``op`` / ``source`` say where the problem is (the IR node, its op and, when the
    node came from PyTorch, the user's source line); ``hint`` says what to do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        op: str | None = None,
        source: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.node = node
        self.op = op
        self.source = source
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [self.message]
        where = []
        if self.node:
            where.append(f"node {self.node}")
        if self.op:
            where.append(f"op {self.op}")
        if where:
            parts.append("at " + ", ".join(where))
        if self.source:
            parts.append(f"from {self.source}")
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n  ".join(parts)


class UnsupportedOpError(KilnError):
    """The model uses an operation kiln cannot compile."""


class ShapeError(KilnError):
    """Operand shapes or dtypes do not fit an op's rule."""


class VerificationError(KilnError):
    """A graph breaks an IR invariant (SSA, order, types)."""


class ParseError(KilnError):
    """IR text that cannot be parsed."""


class NumericsError(KilnError):
    """A stage's outputs left the tolerance against the previous stage."""


REPORT_HINT = ("this is a kiln bug, not a mistake in your model: please report it with a "
               "reproducer; `kiln minify MODEL --backend llvm` (or kiln.debug.minify) shrinks "
               "the failing graph to a few nodes and writes one")


class InternalError(KilnError):
    """A kiln bug: the compiler broke one of its own invariants (invalid kernel IR, invalid
    LLVM IR, a schedule that cannot be generated). Its hint says so and how to report it; a
    subclass of KilnError, so callers that handle kiln's errors handle it too."""

    def __init__(self, message: str, *, node: str | None = None, op: str | None = None,
                 source: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, node=node, op=op, source=source,
                         hint=f"{hint}; {REPORT_HINT}" if hint else REPORT_HINT)
