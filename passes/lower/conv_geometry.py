"""The geometry of a sliding-window op (convolution, pooling) as one value: the shapes its
lowerings derive their loop bounds, workspaces and algorithm choice from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kiln.ir import Node
from kiln.ir.ops._rules import as_tuple
from kiln.passes.lower.core import Lowering


@dataclass(frozen=True)
class ConvGeometry:
    """N images of C channels over the spatial extent ``in_sp``, a window of ``kernel`` taps
    (with ``stride``, zero ``pad`` per side and ``dil``) producing K channels over ``out_sp``,
    in ``groups`` groups of channels. Pooling is the case K = C = groups (one channel per
    window, no weights)."""

    n: int
    c: int
    in_sp: tuple[int, ...]
    k: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    dil: tuple[int, ...]
    groups: int
    out_sp: tuple[int, ...]

    @classmethod
    def of_conv(cls, low: Lowering, node: Node, wv: np.ndarray) -> ConvGeometry:
        """The geometry of convolution ``node`` with weights ``wv`` ([K, C/groups, *kernel])."""
        a = node.attrs
        nd = wv.ndim - 2
        in_shape = low.shape(node.inputs[0])
        out_shape = low.graph.types[node.outputs[0]].shape
        return cls(in_shape[0], in_shape[1], tuple(in_shape[2:]), wv.shape[0],
                   tuple(wv.shape[2:]), as_tuple(a["stride"], nd, "stride"),
                   as_tuple(a["padding"], nd, "padding"), as_tuple(a["dilation"], nd, "dilation"),
                   a["groups"], tuple(out_shape[2:]))

    @classmethod
    def of_pool(cls, low: Lowering, node: Node) -> ConvGeometry:
        """The geometry of 2-d pooling ``node`` (its stride defaults to its kernel)."""
        a = node.attrs
        n, c, *in_sp = low.shape(node.inputs[0])
        out_shape = low.graph.types[node.outputs[0]].shape
        stride = as_tuple(a["stride"] if a["stride"] is not None else a["kernel"], 2, "stride")
        return cls(n, c, tuple(in_sp), c, tuple(a["kernel"]), stride,
                   as_tuple(a["padding"], 2, "padding"),
                   as_tuple(a.get("dilation", 1), 2, "dilation"), c, tuple(out_shape[2:]))

    @property
    def nd(self) -> int:
        """Spatial dimensions."""
        return len(self.kernel)

    @property
    def cg(self) -> int:
        """Input channels per group."""
        return self.c // self.groups

    @property
    def og(self) -> int:
        """Output channels per group."""
        return self.k // self.groups

    @property
    def kd(self) -> int:
        """The GEMM's K: the input channels and kernel taps of one group."""
        return self.cg * math.prod(self.kernel)

    @property
    def pixels(self) -> int:
        """Output positions per image and channel."""
        return math.prod(self.out_sp)

    @property
    def in_pixels(self) -> int:
        """Input positions per image and channel."""
        return math.prod(self.in_sp)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The input's shape [N, C, *in_sp]."""
        return (self.n, self.c, *self.in_sp)

    @property
    def pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded convolution: its input is the GEMM's B as it is."""
        return (all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride)
                and not any(self.pad))

    # A 2-d window op over a padded, phase-split copy of each plane (pooling, depthwise
    # convolution): padded row r, column j*sw + ph lands at [(r*sw + ph) * split_cols + j].
    @property
    def split_rows(self) -> int:
        """Padded rows of that copy: all that the windows of every output row read."""
        (h, _), (oh, _), (kh, _) = self.in_sp, self.out_sp, self.kernel
        return max(h + 2 * self.pad[0], (oh - 1) * self.stride[0] + self.dil[0] * (kh - 1) + 1)

    @property
    def split_cols(self) -> int:
        """Columns of each stride phase of that copy (column dilation 1)."""
        (_, w), (_, ow), (_, kw), sw = self.in_sp, self.out_sp, self.kernel, self.stride[1]
        return -(-(max(w + 2 * self.pad[1], (ow - 1) * sw + kw)) // sw)
