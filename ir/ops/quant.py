"""Quantized ops: quantize / dequantize and the integer dense anchors qlinear / qconv.

Activations are unsigned 8-bit with a zero point (asymmetric, per tensor); weights are signed
8-bit, symmetric, one scale per output channel. The integer part of qlinear / qconv is exact:

    acc[c] = sum_k (x[k] - x_zero_point) * w[c, k] + bias[c]            (int32)

and the float part is specified step by step in float32 so that every backend can reproduce
it bit for bit (no fused multiply-add, round half to even):

    out_dtype u8:  y = clamp(rint(f32(acc) * scale[c]) + out_zero_point, lo, 255)
                   (lo = out_zero_point with ``relu``, else 0)
    out_dtype f32: y = f32(acc) * scale[c], then max(y, 0) with ``relu``

``scale`` is x_scale * w_scale[c] / out_scale for u8 outputs and x_scale * w_scale[c] for f32
outputs.

Two float-activation forms for linear layers: ``linear_w8`` (weight-only: i8 weights widened
to float in the product, y = (x @ w.T) * scale + bias) and ``dynamic_qlinear`` (x quantized to
int8 on every call with the scale max|x| / 127 (float32), int32 products, then
y = f32(acc) * (x_scale * scale[c]) + bias[c]).

qconv works on channels-last tensors (x [N, H, W, C], weight [Cout, kh, kw, Cin],
output [N, OH, OW, Cout]): each output pixel's inputs are then contiguous runs of channels,
which is what the int8 dot-product instructions want. Padding reads x_zero_point (a real 0).
"""

from __future__ import annotations

import numpy as np

from kiln.ir.errors import ShapeError
from kiln.ir.ops._rules import as_tuple, conv_out_size, want_float
from kiln.ir.registry import REQUIRED, register
from kiln.ir.types import DType, TensorType

QUANT_DTYPES = {"u8": (0, 255), "i8": (-128, 127)}


def _check_qparams(attrs) -> tuple[int, int]:
    dt = attrs["dtype"]
    if dt not in QUANT_DTYPES:
        raise ShapeError(f"quantized dtype must be u8 or i8, got {dt!r}")
    lo, hi = QUANT_DTYPES[dt]
    scale, zp = attrs["scale"], attrs["zero_point"]
    if not (isinstance(scale, float) and np.isfinite(scale) and scale > 0):
        raise ShapeError(f"quantization scale must be a finite float > 0, got {scale!r}")
    if not (isinstance(zp, int) and lo <= zp <= hi):
        raise ShapeError(f"zero point {zp!r} is outside the {dt} range [{lo}, {hi}]")
    return lo, hi


# ---- quantize / dequantize -------------------------------------------------------------------
def _quantize_infer(ins, attrs):
    want_float(ins[0])
    _check_qparams(attrs)
    return [TensorType(ins[0].shape, DType(attrs["dtype"]))]


def quantize_f32(x: np.ndarray, scale: float, zero_point: int, lo: int, hi: int) -> np.ndarray:
    """clamp(rint(x / scale) + zero_point, lo, hi) computed in float32 (NaN maps to lo)."""
    with np.errstate(all="ignore"):
        q = np.rint(x.astype(np.float32) / np.float32(scale)) + np.float32(zero_point)
        q = np.clip(np.nan_to_num(q, nan=lo), lo, hi)
    return q


def _quantize_ref(x, *, scale, zero_point, dtype):
    lo, hi = QUANT_DTYPES[dtype]
    return quantize_f32(x, scale, zero_point, lo, hi).astype(DType(dtype).numpy)


register("quantize", ["x"], infer=_quantize_infer, reference=_quantize_ref, kind="elementwise",
         attrs={"scale": REQUIRED, "zero_point": 0, "dtype": "u8"},
         description="clamp(rint(x / scale) + zero_point) as u8 or i8 (float32 arithmetic)")


def _dequantize_infer(ins, attrs):
    if ins[0].dtype.value not in QUANT_DTYPES:
        raise ShapeError(f"dequantize wants a u8 or i8 tensor, got {ins[0].dtype}")
    _check_qparams({**attrs, "dtype": ins[0].dtype.value})
    return [TensorType(ins[0].shape, DType.f32)]


def _dequantize_ref(q, *, scale, zero_point):
    return (q.astype(np.int32) - np.int32(zero_point)).astype(np.float32) * np.float32(scale)


register("dequantize", ["q"], infer=_dequantize_infer, reference=_dequantize_ref,
         kind="elementwise", attrs={"scale": REQUIRED, "zero_point": 0},
         description="(q - zero_point) * scale in float32")


# ---- requantization shared by qlinear / qconv ------------------------------------------------
def requantize(acc: np.ndarray, scale: np.ndarray, out_dtype: str, out_zero_point: int,
               relu: bool, channel_axis: int = -1) -> np.ndarray:
    """The float32 epilogue of the integer anchors (see the module docstring)."""
    if np.abs(acc).max(initial=0) >= 2 ** 31:
        raise ShapeError("int8 accumulator overflows int32", hint="the layer is too large to "
                         "quantize; leave it in float (quantize.protect)")
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    y = acc.astype(np.int32).astype(np.float32) * scale.astype(np.float32).reshape(shape)
    if out_dtype == "f32":
        return np.maximum(y, np.float32(0)) if relu else y
    lo = out_zero_point if relu else 0
    q = np.rint(y) + np.float32(out_zero_point)
    return np.clip(q, lo, 255).astype(np.uint8)


def _check_anchor(x, w, bias, scale, attrs, op: str) -> None:
    if x.dtype != DType.u8 or w.dtype != DType.i8:
        raise ShapeError(f"{op} wants u8 activations and i8 weights, got {x.dtype} and "
                         f"{w.dtype}", hint="insert quantize before it")
    if bias.dtype != DType.i32 or scale.dtype != DType.f32:
        raise ShapeError(f"{op}: bias must be i32 and scale f32, got {bias.dtype} and "
                         f"{scale.dtype}")
    cout = w.shape[0]
    if bias.shape != (cout,) or scale.shape != (cout,):
        raise ShapeError(f"{op}: bias {list(bias.shape)} and scale {list(scale.shape)} must "
                         f"both be [{cout}]")
    if attrs["out_dtype"] not in ("u8", "f32"):
        raise ShapeError(f"{op}: out_dtype must be 'u8' or 'f32', got {attrs['out_dtype']!r}")
    for key in ("x_zero_point", "out_zero_point"):
        if not 0 <= attrs[key] <= 255:
            raise ShapeError(f"{op}: {key} {attrs[key]} is outside [0, 255]")


_ANCHOR_ATTRS = {"x_zero_point": 0, "out_zero_point": 0, "out_dtype": "u8", "relu": False}


# ---- qlinear ---------------------------------------------------------------------------------
def _qlinear_infer(ins, attrs):
    x, w, bias, scale = ins
    _check_anchor(x, w, bias, scale, attrs, "qlinear")
    if w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[1]:
        raise ShapeError(f"qlinear: input {list(x.shape)} does not fit weight {list(w.shape)}")
    return [TensorType(x.shape[:-1] + (w.shape[0],), DType(attrs["out_dtype"]))]


def _qlinear_ref(x, w, bias, scale, *, x_zero_point, out_zero_point, out_dtype, relu):
    # float64 products and sums of 8-bit values are exact far beyond any real K.
    xs = x.astype(np.float64) - x_zero_point
    acc = np.rint(xs @ w.astype(np.float64).T).astype(np.int64) + bias.astype(np.int64)
    return requantize(acc, scale, out_dtype, out_zero_point, relu)


register("qlinear", ["x", "weight", "bias", "scale"], infer=_qlinear_infer,
         reference=_qlinear_ref, kind="dense", attrs=dict(_ANCHOR_ATTRS),
         description="int8 linear: u8 x [.., K] times i8 weight [N, K], int32 accumulation, "
                     "requantized to u8 or scaled to f32",
         flops=lambda i, o, a: 2 * o[0].numel * i[1].shape[1])


# ---- qconv (channels last) -------------------------------------------------------------------
def _qconv_geometry(x: TensorType, w: TensorType, attrs):
    if x.rank != 4 or w.rank != 4:
        raise ShapeError(f"qconv is 2-d channels-last: x [N, H, W, C] and weight "
                         f"[Cout, kh, kw, C], got {list(x.shape)} and {list(w.shape)}")
    stride = as_tuple(attrs["stride"], 2, "stride")
    padding = as_tuple(attrs["padding"], 2, "padding")
    dilation = as_tuple(attrs["dilation"], 2, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ShapeError("qconv: stride and dilation must be >= 1 and padding >= 0")
    return stride, padding, dilation


def _qconv_infer(ins, attrs):
    x, w, bias, scale = ins
    _check_anchor(x, w, bias, scale, attrs, "qconv")
    stride, padding, dilation = _qconv_geometry(x, w, attrs)
    if x.shape[3] != w.shape[3]:
        raise ShapeError(f"qconv: input has {x.shape[3]} channels, weight {list(w.shape)} "
                         f"wants {w.shape[3]}")
    oh, ow = (conv_out_size(x.shape[1 + i], w.shape[1 + i], stride[i], padding[i], padding[i],
                            dilation[i]) for i in range(2))
    return [TensorType((x.shape[0], oh, ow, w.shape[0]), DType(attrs["out_dtype"]))]


def _qconv_ref(x, w, bias, scale, *, stride, padding, dilation, x_zero_point, out_zero_point,
               out_dtype, relu):
    stride = as_tuple(stride, 2, "stride")
    padding = as_tuple(padding, 2, "padding")
    dilation = as_tuple(dilation, 2, "dilation")
    n, h, wd, c = x.shape
    cout, kh, kw, _ = w.shape
    ph, pw = padding
    # Padding holds the zero point: after subtracting it, a real zero.
    xs = np.pad(x.astype(np.float64) - x_zero_point, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
    oh = (h + 2 * ph - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * pw - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = np.empty((n, oh, ow, kh, kw, c))
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            cols[:, :, :, i, j] = xs[:, r0:r0 + stride[0] * (oh - 1) + 1:stride[0],
                                     c0:c0 + stride[1] * (ow - 1) + 1:stride[1]]
    acc = np.rint(cols.reshape(n, oh, ow, -1) @ w.reshape(cout, -1).astype(np.float64).T)
    acc = acc.astype(np.int64) + bias.astype(np.int64)
    return requantize(acc, scale, out_dtype, out_zero_point, relu)


register("qconv", ["x", "weight", "bias", "scale"], infer=_qconv_infer, reference=_qconv_ref,
         kind="dense",
         attrs={"stride": 1, "padding": 0, "dilation": 1, **_ANCHOR_ATTRS},
         description="int8 2-d convolution, channels last: u8 x [N, H, W, C] with i8 weight "
                     "[Cout, kh, kw, C], int32 accumulation, requantized to u8 or scaled to f32",
         flops=lambda i, o, a: 2 * o[0].numel * i[1].shape[1] * i[1].shape[2] * i[1].shape[3])


# ---- int8 weights with float activations -----------------------------------------------------
def _w8_infer(ins, attrs, op: str):
    x, w, scale = ins[:3]
    want_float(x)
    if w.dtype != DType.i8 or scale.dtype != DType.f32:
        raise ShapeError(f"{op} wants i8 weights and f32 scales, got {w.dtype} and {scale.dtype}")
    if w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[1]:
        raise ShapeError(f"{op}: input {list(x.shape)} does not fit weight {list(w.shape)}")
    n = w.shape[0]
    if scale.shape != (n,) or (len(ins) == 4 and ins[3].shape != (n,)):
        raise ShapeError(f"{op}: scale and bias must be [{n}]")
    if len(ins) == 4 and ins[3].dtype != DType.f32:
        raise ShapeError(f"{op}: bias must be f32, got {ins[3].dtype}")
    return [TensorType(x.shape[:-1] + (n,), DType.f32)]


def _linear_w8_ref(x, w, scale, bias=None):
    y = (x.astype(np.float64) @ w.astype(np.float64).T) * scale.astype(np.float64)
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y.astype(np.float32)


register("linear_w8", ["x", "weight", "scale", "bias?"],
         infer=lambda ins, attrs: _w8_infer(ins, attrs, "linear_w8"),
         reference=_linear_w8_ref, kind="dense",
         description="weight-only int8 linear: (x @ weight.T) * scale + bias, float activations",
         flops=lambda i, o, a: 2 * o[0].numel * i[1].shape[1])


def dynamic_scale(x: np.ndarray) -> np.float32:
    """The activation scale of dynamic_qlinear: max |x| / 127 in float32 (1 for all zeros)."""
    with np.errstate(all="ignore"):
        amax = np.float32(np.abs(x.astype(np.float32)).max(initial=np.float32(0)))
        return np.float32(1) if amax == 0 else np.float32(amax / np.float32(127))


def _dynamic_qlinear_ref(x, w, scale, bias=None):
    s = dynamic_scale(x)
    with np.errstate(all="ignore"):
        xq = np.clip(np.rint(x.astype(np.float32) / s), -127, 127)
    xq = np.nan_to_num(xq)  # a NaN input makes the scale NaN: every output is NaN anyway
    acc = np.rint(xq.astype(np.float64) @ w.astype(np.float64).T).astype(np.int64)
    y = acc.astype(np.int32).astype(np.float32) * (s * scale.astype(np.float32))
    if bias is not None:
        y = y + bias.astype(np.float32)
    return y


register("dynamic_qlinear", ["x", "weight", "scale", "bias?"],
         infer=lambda ins, attrs: _w8_infer(ins, attrs, "dynamic_qlinear"),
         reference=_dynamic_qlinear_ref, kind="dense",
         description="dynamically quantized int8 linear: x quantized per call to int8 with "
                     "scale max|x|/127, int32 products with the i8 weights, scaled back to f32",
         flops=lambda i, o, a: 2 * o[0].numel * i[1].shape[1])
