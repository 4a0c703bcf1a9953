"""Convolution lowering: which algorithm a convolution takes, and the dispatch to it.

The algorithms (``tuning.CONV_ALGORITHMS``): Winograd F(4, 3) along the rows (winograd.py);
the batched direct GEMMs over stride phases, plain and transposed, and the padded direct GEMM
per image (conv_direct.py); one GEMM over a batch's im2col columns, or the plain GEMM per
image over im2col or the input itself (conv_gemm.py). Depthwise convolutions have their own
window nest (depthwise.py). The tuning's thresholds pick one; the autotuner may override them
per convolution signature.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiln.ir import Node
from kiln.ir.ops._rules import as_tuple
from kiln.passes.lower import winograd
from kiln.passes.lower.conv_context import ConvContext, ImageLoop
from kiln.passes.lower.conv_direct import (
    direct_batch,
    direct_batch_t,
    direct_batch_waste,
    padded_direct,
)
from kiln.passes.lower.conv_gemm import batched_im2col, image_gemm
from kiln.passes.lower.conv_geometry import ConvGeometry
from kiln.passes.lower.core import Lowering
from kiln.passes.lower.depthwise import lower_depthwise
from kiln.passes.lower.matrix_views import collapsed_views
from kiln.passes.lower.microkernel import PackedA, micro_shape, pack_a


def lower_conv(low: Lowering, node: Node, final: str, inline: set[str],
               width: int) -> list | None:
    """Convolution as GEMM: out[n, g] = W_g[og, K] @ im2col(x[n, g])[K, OH*OW], or one of the
    algorithms that avoid im2col (see the module docstring)."""
    x, w = node.inputs[:2]
    wv = low.constant_value(w)
    if wv is None or low.dtype(x) != "f32":
        return None
    geo = ConvGeometry.of_conv(low, node, wv)
    if geo.og == 1 and geo.cg == 1 and geo.groups > 1:
        return lower_depthwise(low, node, final, geo, wv)
    src = low.stored_view(x)
    if src is None:
        return None  # the im2col and direct paths read the input from memory
    # Maps of fewer pixels than a vector (ResNet-50's last stage at 64x64 inputs: 2x2) run only
    # transposed, pixels as the GEMM's rows and output channels as its vector columns: the
    # other algorithms vectorize along the pixels (the plain nest took 7 ms, 2.7 GFLOP/s,
    # for a 512-channel 3x3 conv there).
    tiny = geo.pixels < width
    if tiny and not (geo.nd == 2 and geo.groups == 1):
        return None
    out = node.outputs[0]
    views = collapsed_views(low, final, out, inline, list(range(2, 2 + geo.nd)))
    if views is None:
        return None
    low.view_shapes.update(views)
    shape = micro_shape(width, geo.og)
    wmat = wv.reshape(geo.groups, geo.og, geo.kd).astype(np.float32, copy=False)

    def packed_a() -> PackedA:  # made only on the paths that read it (else dead weight)
        packed = np.stack([pack_a(wmat[i], shape.mr) for i in range(geo.groups)])
        return PackedA(low.constant(packed, f"{node.name}_packed"), shape, geo.og, geo.kd)

    bias = low.constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    if len(node.inputs) > 2 and bias is None:
        return None
    bias_buf = low.constant(bias.astype(np.float32), f"{node.name}_bias") \
        if bias is not None else None
    job = ConvContext(low, node, geo, low.buffer(src), bias_buf, final, out)
    n_var, g_var = low.fresh("n"), low.fresh("grp")
    loop = ImageLoop(n_var, g_var, (n_var * geo.c + g_var * geo.cg) * geo.in_pixels,
                     _images(job, wv))
    alg = "direct_t" if tiny else choose_algorithm(job, wv, loop.images)
    low.schedule = alg
    if alg == "winograd":
        return winograd.lower_winograd(job, wv, width)
    # Small maps (any batch), several images (unless each thread takes whole images on the
    # per-image path), or a strided convolution: one GEMM over the batch (weights read once
    # per batch), its input split into stride phases instead of im2col; transposed for small
    # maps, whose pixels are then the GEMM's rows (no columns dropped between images).
    if alg == "direct_t":
        return direct_batch_t(job, wv, width)
    if alg == "direct_batch":
        return direct_batch(job, packed_a())
    weights = packed_a()
    if alg == "padded_direct":
        return padded_direct(job, weights, loop)
    if alg == "batched_im2col":
        return batched_im2col(job, weights, width)
    return image_gemm(job, weights, loop, width)


def _images(job: ConvContext, wv: np.ndarray) -> int:
    """How many images the per-image algorithms run at once, one per thread (1: the loops
    inside share the work of one image). Several images cost one thread-pool round trip per
    conv, each with its own workspaces. Only when the weights are small: with large weights,
    threads sharing each image read them once per image, where threads on separate images
    would each stream all of them. Nor when an image's im2col buffer alone outgrows the cache
    (the ImageNet stem): then both threads are better off streaming one image's columns
    together."""
    geo, tn = job.geo, job.low.tuning
    small_weights = wv.nbytes <= tn.image_parallel_max_weight_bytes
    im2col_bytes = 0 if geo.pointwise else geo.kd * geo.pixels * 4
    if (geo.n > 1 and small_weights and im2col_bytes <= tn.image_parallel_max_workspace_bytes
            and job.par() == "parallel"):
        return geo.n
    return 1


def choose_algorithm(job: ConvContext, wv: np.ndarray, images: int) -> str:
    """The algorithm of convolution ``job`` (weights ``wv``): the autotuner's choice where it
    made one that fits, else what the tuning's thresholds pick. ``images``: the images the
    per-image algorithms would run at once."""
    geo, tn = job.geo, job.low.tuning
    direct, nd, stride = geo.pointwise, geo.nd, geo.stride
    structural = not direct and nd == 2 and all(s_ == 1 for s_ in stride)
    padded_ok = (structural
                 and geo.out_sp[0] * (geo.in_sp[1] + 2 * geo.pad[1]) <= 1.25 * geo.pixels)
    fits = {
        "winograd": tn.winograd and not direct and nd == 2 and winograd.fits(geo),
        "direct_t": not direct and nd == 2 and geo.groups == 1,
        "direct_batch": not direct and nd == 2 and geo.groups == 1,
        "padded_direct": structural,
        "batched_im2col": not direct and nd == 2 and geo.groups == 1 and geo.n > 1,
        "gemm": True,
    }
    alg = tn.conv_algorithm(conv_signature(job.node, geo.in_shape, wv))
    if alg is not None and fits[alg]:
        return alg
    if fits["winograd"] and winograd.applies(geo, tn):
        return "winograd"
    if fits["direct_t"] and geo.pixels <= tn.direct_t_max_pixels:
        return "direct_t"
    if (fits["direct_batch"] and (geo.n > 1 or any(s_ > 1 for s_ in stride))
            and not (padded_ok and images > 1)
            and direct_batch_waste(geo) <= tn.direct_batch_max_waste):
        return "direct_batch"
    if padded_ok:
        return "padded_direct"
    if fits["direct_t"] and max(geo.dil) > 1:
        # A dilated conv whose padded rows waste too much for padded_direct: im2col copies
        # every tap (DeepLabV3's ASPP, 2048 -> 256 channels at dilation 12 on 28x28: a 58 MB
        # im2col, 88.7 ms), where the transposed direct GEMM reads the input in place
        # (23.7 ms; ResNet-50's dilation-4 3x3 of DeepLab's layer4: 18.7 -> 11.8 ms).
        return "direct_t"
    if fits["batched_im2col"] and geo.pixels <= tn.batched_im2col_max_pixels:
        return "batched_im2col"
    return "gemm"


def conv_signature(node: Node, in_shape: Sequence[int], wv: np.ndarray) -> str:
    """What a convolution's best algorithm depends on: its input and weight shapes and its
    attributes (the key of ``Tuning.conv_algorithms`` and of the tuning database)."""
    a, nd = node.attrs, wv.ndim - 2  # 1-, 2- or 3-d (a 3-d conv's stride has 3 entries)
    return (f"conv x{list(in_shape)} w{list(wv.shape)} s{list(as_tuple(a['stride'], nd, 's'))}"
            f" p{list(as_tuple(a['padding'], nd, 'p'))}"
            f" d{list(as_tuple(a['dilation'], nd, 'd'))} g{a['groups']}").replace(" ", "")
