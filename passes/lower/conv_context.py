"""What every convolution algorithm works from: the op being lowered, its geometry, the buffers
it reads, and the fused epilogue its results are stored through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kiln.ir import Node
from kiln.ir import kernel as K
from kiln.ir.kernel import Expr, Var
from kiln.passes.lower.anchors import parallel_kind
from kiln.passes.lower.conv_geometry import ConvGeometry
from kiln.passes.lower.core import Lowering


@dataclass(frozen=True)
class ConvContext:
    """One convolution being lowered: ``x`` the buffer of its input, ``bias`` that of its bias
    (None without one); its results go to the group's output ``final`` through the epilogue
    of the anchor's output ``out``."""

    low: Lowering
    node: Node
    geo: ConvGeometry
    x: str
    bias: str | None
    final: str
    out: str

    def par(self) -> str:
        """The loop kind of the op's outermost loops (see ``anchors.parallel_kind``)."""
        return parallel_kind(self.low, self.node)

    def add_bias(self, value: Expr, channel: Expr) -> Expr:
        """``value`` (scalar or vector) plus the bias of output channel ``channel``."""
        if self.bias is None:
            return value
        b = K.Load(self.bias, channel, "f32")
        return value + (K.Broadcast(b, value.lanes) if value.lanes > 1 else b)

    def store(self, idx: Sequence[Expr], value: Expr) -> K.Store:
        """Store the anchor's output ``value`` at ``idx`` through the fused epilogue."""
        return self.low.store_at(self.final, idx, value, self.out)


@dataclass(frozen=True)
class ImageLoop:
    """The loops over images ``n`` and groups ``g`` of the per-image algorithms; ``x_base``:
    where image n's group g starts in the input. With ``images`` > 1 threads take whole
    images, each with its own workspaces."""

    n: Var
    g: Var
    x_base: Expr
    images: int

    @property
    def image(self) -> Var | None:
        """The variable selecting this thread's workspaces, if each image has its own."""
        return self.n if self.images > 1 else None

    @property
    def kind(self) -> str:
        """The kind of the loop over images."""
        return "parallel" if self.images > 1 else "serial"
