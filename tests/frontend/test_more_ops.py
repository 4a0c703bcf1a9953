"""Products, determinants, scatters and gathers, the normalizations and the resampling ops
that both frontends decompose (frontend/handlers_shared.py, handlers_more.py and
onnx_import_more.py), against NumPy and against eager PyTorch, on the reference and LLVM
backends; and the errors for what they refuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import kiln
from kiln.backends.llvm import compile_graph
from kiln.backends.reference import run_graph
from kiln.frontend.onnx_import import import_onnx
from kiln.ir import KilnError

RNG = np.random.default_rng(0)


# ---- PyTorch -------------------------------------------------------------------------------------
class _Fn1(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, a):
        return self.fn(a)


class _Fn2(_Fn1):
    def forward(self, a, b):
        return self.fn(a, b)


class _Fn3(_Fn1):
    def forward(self, a, b, c):
        return self.fn(a, b, c)


def Fn(fn) -> nn.Module:
    """A module computing ``fn(*inputs)`` (fx needs a fixed arity), in eval mode."""
    arity = fn.__code__.co_argcount if hasattr(fn, "__code__") else 1
    return {1: _Fn1, 2: _Fn2, 3: _Fn3}[arity](fn).eval()


def _scatter_inplace(x, i, s):
    y = x.clone()
    y.scatter_(1, i, s)
    return y + 1


def _index(*shape, high):
    return torch.from_numpy(RNG.integers(0, high, shape))


TORCH_CASES = {
    "prod_dim": (lambda x: torch.prod(x, 1) + x.prod(dim=-1, keepdim=True).sum(),
                 (torch.rand(3, 7, 5) + 0.5,)),
    "prod_all_int": (lambda x: x.prod(), (torch.arange(1, 11, dtype=torch.int32),)),
    "cumprod": (lambda x: torch.cumprod(x, 1) + x.cumprod(dim=0), (torch.rand(4, 9) + 0.5,)),
    "det": (lambda x: torch.linalg.det(x) + torch.det(x[:, :3, :3]), (torch.randn(2, 5, 5),)),
    "scatter": (lambda x, i, s: torch.scatter(x, 1, i, s),
                (torch.randn(3, 6), _index(3, 4, high=6), torch.randn(3, 5))),
    "scatter_value": (lambda x, i: x.scatter(0, i, 2.5), (torch.randn(4, 3), _index(2, 3, high=4))),
    "scatter_inplace": (_scatter_inplace,
                        (torch.randn(2, 5), _index(2, 3, high=5), torch.randn(2, 3))),
    "scatter_add": (lambda x, i, s: x.scatter_add(0, i, s),
                    (torch.randn(4, 3), _index(6, 3, high=4), torch.randn(6, 3))),
    "scatter_reduce": (lambda x, i, s: x.scatter_reduce(1, i, s, "amax")
                       + x.scatter_reduce(1, i, s, "prod"),
                       (torch.randn(3, 4), _index(3, 6, high=4), torch.randn(3, 6))),
    "trig_inplace": (lambda x: x.clone().sin_() + x.clone().atan_(), (torch.randn(3, 4),)),
    "grid_sample": (lambda x, g: F.grid_sample(x, g, align_corners=False)
                    + F.grid_sample(x, g, mode="nearest", padding_mode="border",
                                    align_corners=True)
                    + F.grid_sample(x, g, padding_mode="reflection", align_corners=False),
                    (torch.randn(2, 3, 5, 6), torch.rand(2, 4, 7, 2) * 2.6 - 1.3)),
    "grid_sample_3d": (lambda x, g: F.grid_sample(x, g, padding_mode="reflection",
                                                  align_corners=True),
                       (torch.randn(1, 2, 3, 4, 5), torch.rand(1, 2, 3, 4, 3) * 3 - 1.5)),
    "affine_grid": (lambda t: F.affine_grid(t, [2, 3, 4, 5], align_corners=False)
                    + F.affine_grid(t, [2, 1, 4, 5], align_corners=True),
                    (torch.randn(2, 2, 3),)),
}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_torch_matches_eager(case: str, frontend: str) -> None:
    fn, inputs = TORCH_CASES[case]
    model = Fn(fn).eval()
    compiled = kiln.compile(model, inputs, frontend=frontend, pipeline="O0",
                            backend="reference")
    torch.testing.assert_close(compiled(*inputs), model(*inputs))


@pytest.mark.parametrize("case", ["prod_dim", "cumprod", "det", "scatter", "scatter_reduce"])
def test_torch_on_llvm(case: str) -> None:
    fn, inputs = TORCH_CASES[case]
    model = Fn(fn).eval()
    torch.testing.assert_close(kiln.compile(model, inputs)(*inputs), model(*inputs))


def test_det_of_singular_and_permuted_matrices() -> None:
    a = torch.tensor([[[0.0, 2.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]],
                      [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0]]])
    got = kiln.compile(Fn(torch.linalg.det), (a,))(a)
    torch.testing.assert_close(got, torch.tensor([-6.0, 0.0]))


def test_scatter_refusals_name_the_problem() -> None:
    x, i = torch.randn(3, 4), _index(3, 4, high=4)
    with pytest.raises(KilnError, match="include_self"):
        kiln.compile(Fn(lambda x, i: x.scatter_reduce(1, i, x, "amax", include_self=False)),
                     (x, i))
    with pytest.raises(KilnError, match="mean"):
        kiln.compile(Fn(lambda x, i: x.scatter_reduce(1, i, x, "mean")), (x, i))


# ---- ONNX ----------------------------------------------------------------------------------------
def _model(node, inputs: dict, consts: dict | None = None, outputs=("y",), opset=18,
           types=None, shapes=None):
    """A one-node model; its outputs have the first input's element type unless ``types``
    (numpy dtypes) says otherwise, and the shapes ONNX's reference run gives them unless
    ``shapes`` does."""
    consts = consts or {}

    def elem(dtype) -> int:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    vis = [helper.make_tensor_value_info(k, elem(v.dtype), v.shape) for k, v in inputs.items()]
    init = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    types = types or [next(iter(inputs.values())).dtype] * len(outputs)
    opsets = [helper.make_opsetid("", opset)]
    # The outputs' shapes, from ONNX's own reference run of the node.
    outs = [helper.make_tensor_value_info(o, elem(t), None) for o, t in zip(outputs, types)]
    probe = helper.make_model(helper.make_graph([node], "g", vis, outs, init),
                              opset_imports=opsets)
    shapes = shapes or [a.shape for a in ReferenceEvaluator(probe).run(None, inputs)]
    outs = [helper.make_tensor_value_info(o, elem(t), shape)
            for o, t, shape in zip(outputs, types, shapes)]
    return helper.make_model(helper.make_graph([node], "g", vis, outs, init), opset_imports=opsets)


def _run(model, inputs: dict) -> list[np.ndarray]:
    """Outputs on the reference and LLVM backends (checked to agree)."""
    graph = import_onnx(model)
    arrays = list(inputs.values())
    ref = [np.asarray(a) for a in run_graph(graph, arrays)]
    native = [np.asarray(a) for a in compile_graph(graph)(arrays)]
    for r, n in zip(ref, native):
        np.testing.assert_allclose(n, r, rtol=1e-5, atol=1e-6)
    return ref


def _scatter_elements_np(data, idx, upd, axis, reduction):
    out = data.copy()
    for pos in np.ndindex(*idx.shape):
        target = list(pos)
        target[axis] = idx[pos] % data.shape[axis]
        target = tuple(target)
        if reduction == "none":
            out[target] = upd[pos]
        elif reduction == "add":
            out[target] += upd[pos]
        elif reduction == "mul":
            out[target] *= upd[pos]
        else:
            out[target] = (max if reduction == "max" else min)(out[target], upd[pos])
    return out


@pytest.mark.parametrize("constant", [True, False], ids=["constant", "computed"])
@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_elements_both_paths(reduction: str, constant: bool) -> None:
    data = RNG.standard_normal((4, 5, 3)).astype(np.float32)
    idx = RNG.integers(-5, 5, (4, 6, 2))
    if reduction == "none":  # without a reduction, duplicates are undefined in ONNX
        idx = np.stack([RNG.permutation(5)[:4] for _ in range(8)]).reshape(4, 2, 4)
        idx = np.moveaxis(idx, 2, 1)
    upd = RNG.standard_normal(idx.shape).astype(np.float32)
    node = helper.make_node("ScatterElements", ["d", "i", "u"], ["y"], axis=1,
                            reduction=reduction)
    inputs = {"d": data, "u": upd} if constant else {"d": data, "i": idx, "u": upd}
    model = _model(node, inputs, {"i": idx} if constant else None)
    (got,) = _run(model, inputs)
    np.testing.assert_allclose(got, _scatter_elements_np(data, idx, upd, 1, reduction),
                               rtol=1e-6)


@pytest.mark.parametrize("constant", [True, False], ids=["constant", "computed"])
@pytest.mark.parametrize("reduction", ["none", "add", "mul"])
def test_scatter_nd_both_paths(reduction: str, constant: bool) -> None:
    data = RNG.standard_normal((4, 3, 5)).astype(np.float32)
    idx = np.array([[[0, 1], [3, -1]], [[2, 2], [0, 1] if reduction != "none" else [1, 0]]])
    upd = RNG.standard_normal((2, 2, 5)).astype(np.float32)
    want = data.copy()
    for m in np.ndindex(2, 2):
        at = tuple(int(v) for v in idx[m])
        if reduction == "none":
            want[at] = upd[m]
        elif reduction == "add":
            want[at] += upd[m]
        else:
            want[at] *= upd[m]
    node = helper.make_node("ScatterND", ["d", "i", "u"], ["y"], reduction=reduction)
    inputs = {"d": data, "u": upd} if constant else {"d": data, "i": idx, "u": upd}
    (got,) = _run(_model(node, inputs, {"i": idx} if constant else None), inputs)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_scatter_with_too_many_computed_pairs_is_refused() -> None:
    data = np.zeros((1 << 13, 1 << 12), np.float32)
    idx = np.zeros((1 << 13, 1 << 12), np.int64)
    node = helper.make_node("ScatterElements", ["d", "i", "u"], ["y"], axis=1)
    model = _model(node, {"d": data, "i": idx, "u": data})
    with pytest.raises(KilnError, match="initializer"):
        import_onnx(model)


def test_gather_nd_with_batch_dims_and_negative_indices() -> None:
    data = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    idx = np.array([[[-1, 0], [2, 3]], [[0, -4], [1, 1]]])
    node = helper.make_node("GatherND", ["d", "i"], ["y"], batch_dims=1)
    (got,) = _run(_model(node, {"d": data, "i": idx}), {"d": data, "i": idx})
    want = np.stack([np.stack([data[b][tuple(i)] for i in idx[b]]) for b in range(2)])
    np.testing.assert_array_equal(got, want)


def test_reduce_prod_and_cum_prod_of_integers_are_exact() -> None:
    x = RNG.integers(-3, 4, (3, 7, 2)).astype(np.int32)
    node = helper.make_node("ReduceProd", ["x", "axes"], ["y"], keepdims=0)
    (got,) = _run(_model(node, {"x": x}, {"axes": np.array([1, 2])}), {"x": x})
    np.testing.assert_array_equal(got, x.prod(axis=(1, 2)))
    node = helper.make_node("CumProd", ["x", "axis"], ["y"], exclusive=1, reverse=1)
    (got,) = _run(_model(node, {"x": x}, {"axis": np.array(1)}, opset=26), {"x": x})
    want = np.flip(np.cumprod(np.flip(x, 1), 1), 1)
    want = np.concatenate([want[:, 1:], np.ones_like(want[:, :1])], 1)
    np.testing.assert_array_equal(got, want)


def test_det_matches_numpy() -> None:
    x = RNG.standard_normal((3, 6, 6)).astype(np.float32)
    x[1, 2] = x[1, 4]  # singular
    (got,) = _run(_model(helper.make_node("Det", ["x"], ["y"]), {"x": x}, opset=22), {"x": x})
    np.testing.assert_allclose(got, np.linalg.det(x.astype(np.float64)), rtol=1e-4, atol=1e-5)


def test_col2im_is_torch_fold() -> None:
    x = RNG.standard_normal((2, 2 * 6, 6)).astype(np.float32)
    node = helper.make_node("Col2Im", ["x", "image", "block"], ["y"], strides=[2, 1],
                            pads=[1, 0, 0, 1], dilations=[1, 2])
    consts = {"image": np.array([6, 5]), "block": np.array([2, 3])}
    (got,) = _run(_model(node, {"x": x}, consts), {"x": x})
    # torch folds with symmetric padding: pad (1, 1) x (0, 1), then drop the extra bottom row
    want = F.fold(torch.from_numpy(x), (7, 6), (2, 3), dilation=(1, 2), padding=0,
                  stride=(2, 1)).numpy()[:, :, 1:7, 0:5]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("align", [0, 1])
def test_affine_grid_is_torch_affine_grid(align: int) -> None:
    theta = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    node = helper.make_node("AffineGrid", ["t", "size"], ["y"], align_corners=align)
    (got,) = _run(_model(node, {"t": theta}, {"size": np.array([2, 1, 3, 4, 5])}, opset=20),
                  {"t": theta})
    want = F.affine_grid(torch.from_numpy(theta), [2, 1, 3, 4, 5], align_corners=bool(align))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_instance_and_lp_normalization() -> None:
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    s, bias = RNG.standard_normal(3).astype(np.float32), RNG.standard_normal(3).astype(np.float32)
    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-3)
    (got,) = _run(_model(node, {"x": x}, {"s": s, "b": bias}), {"x": x})
    want = F.instance_norm(torch.from_numpy(x), weight=torch.from_numpy(s),
                           bias=torch.from_numpy(bias), eps=1e-3)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    for shape in [(2, 3, 7), (1, 3, 2, 3, 4)]:  # 1-d and 3-d instances too
        v = RNG.standard_normal(shape).astype(np.float32)
        (got_v,) = _run(_model(node, {"x": v}, {"s": s, "b": bias}), {"x": v})
        want_v = F.instance_norm(torch.from_numpy(v), weight=torch.from_numpy(s),
                                 bias=torch.from_numpy(bias), eps=1e-3)
        np.testing.assert_allclose(got_v, want_v.numpy(), rtol=1e-4, atol=1e-5)
    x[0, :, 1, 2] = 0
    (got,) = _run(_model(helper.make_node("LpNormalization", ["x"], ["y"], axis=1, p=2),
                         {"x": x}), {"x": x})
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(1, keepdims=True))
    np.testing.assert_allclose(got, np.where(norm == 0, 0, x / np.where(norm == 0, 1, norm)),
                               rtol=1e-6)


@pytest.mark.parametrize("opset", [9, 13])
@pytest.mark.parametrize("axes", [None, [1, 3]])
def test_mean_variance_normalization(opset: int, axes) -> None:
    # From opset 13 on, ONNX's shape inference fails on the op's function body unless the
    # node spells out its axes: the importer writes the default in.
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    node = helper.make_node("MeanVarianceNormalization", ["x"], ["y"],
                            **({} if axes is None else {"axes": axes}))
    (got,) = _run(_model(node, {"x": x}, opset=opset, shapes=[x.shape]), {"x": x})
    over = tuple(axes or (0, 2, 3))
    mean = x.mean(over, keepdims=True)
    want = (x - mean) / (np.sqrt(((x - mean) ** 2).mean(over, keepdims=True)) + 1e-9)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_upsample_linear_is_asymmetric_resize() -> None:
    x = RNG.standard_normal((1, 2, 3, 4)).astype(np.float32)
    node = helper.make_node("Upsample", ["x", "scales"], ["y"], mode="linear")
    consts = {"scales": np.array([1, 1, 2, 3], np.float32)}
    (got,) = _run(_model(node, {"x": x}, consts, opset=9, shapes=[(1, 2, 6, 12)]), {"x": x})
    ys, xs = np.arange(6) / 2, np.arange(12) / 3
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, 2), np.minimum(x0 + 1, 3)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    want = (x[..., y0[:, None], x0] * (1 - fy) * (1 - fx) + x[..., y0[:, None], x1] * (1 - fy) * fx
            + x[..., y1[:, None], x0] * fy * (1 - fx) + x[..., y1[:, None], x1] * fy * fx)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixed", "positive", "zeros"])
def test_dynamic_quantize_linear_matches_onnx_reference(kind: str) -> None:
    x = {"mixed": RNG.standard_normal((5, 7)) * 3 + 1, "positive": RNG.random((5, 7)) + 2,
         "zeros": np.zeros((5, 7))}[kind].astype(np.float32)
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zp"])
    model = _model(node, {"x": x}, outputs=("y", "scale", "zp"), opset=11,
                   types=[np.uint8, np.float32, np.uint8])
    got = _run(model, {"x": x})
    if kind == "zeros":  # ONNX's reference divides 0 by 0 here; kiln gives zeros
        assert [a.tolist() for a in got] == [np.zeros((5, 7)).tolist(), 0.0, 0]
        return
    want = ReferenceEvaluator(model).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-7)
    np.testing.assert_array_equal(got[2], want[2])


def test_max_unpool_needs_constant_indices() -> None:
    x = RNG.standard_normal((1, 1, 2, 2)).astype(np.float32)
    idx = np.array([[[[5, 7], [13, 15]]]])
    node = helper.make_node("MaxUnpool", ["x", "i"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    with pytest.raises(KilnError, match="must be a constant"):
        import_onnx(_model(node, {"x": x, "i": idx}, opset=22))
    (got,) = _run(_model(node, {"x": x}, {"i": idx}, opset=22), {"x": x})
    want = np.zeros(16, np.float32)
    want[idx.reshape(-1)] = x.reshape(-1)
    np.testing.assert_array_equal(got, want.reshape(1, 1, 4, 4))


@pytest.mark.parametrize(("op", "fn", "lo", "hi"), [
    ("Sin", np.sin, -50, 50), ("Cos", np.cos, -50, 50), ("Tan", np.tan, -1.5, 1.5),
    ("Asin", np.arcsin, -1, 1), ("Acos", np.arccos, -1, 1), ("Atan", np.arctan, -50, 50)])
def test_trigonometric_ops(op: str, fn, lo: float, hi: float) -> None:
    x = RNG.uniform(lo, hi, (4, 33)).astype(np.float32)
    (got,) = _run(_model(helper.make_node(op, ["x"], ["y"]), {"x": x}), {"x": x})
    np.testing.assert_allclose(got, fn(x.astype(np.float64)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("equation", "shapes"), [
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]), ("ij->ji", [(3, 4)]), ("i,i", [(5,), (5,)]),
    ("bhqd,bhkd->bhqk", [(1, 2, 3, 4), (1, 2, 5, 4)]), ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)])])
def test_einsum_matches_numpy(equation: str, shapes) -> None:
    inputs = {f"x{k}": RNG.standard_normal(s).astype(np.float32) for k, s in enumerate(shapes)}
    node = helper.make_node("Einsum", list(inputs), ["y"], equation=equation)
    (got,) = _run(_model(node, inputs, opset=12), inputs)
    np.testing.assert_allclose(got, np.einsum(equation, *inputs.values()), rtol=1e-5, atol=1e-6)


def test_einsum_with_an_ellipsis_is_refused() -> None:
    inputs = {"x": RNG.standard_normal((2, 3)).astype(np.float32)}
    node = helper.make_node("Einsum", ["x"], ["y"], equation="...i->...")
    with pytest.raises(KilnError, match="'...'"):
        import_onnx(_model(node, inputs, opset=12))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_bitwise_ops_on_every_8_bit_pair(dtype) -> None:
    info = np.iinfo(dtype)
    grid = np.arange(info.min, info.max + 1).astype(dtype)
    a, b = np.repeat(grid, 256), np.tile(grid, 256)  # every pair of values
    for op, fn in (("BitwiseAnd", np.bitwise_and), ("BitwiseOr", np.bitwise_or),
                   ("BitwiseXor", np.bitwise_xor)):
        inputs = {"a": a, "b": b}
        (got,) = _run(_model(helper.make_node(op, ["a", "b"], ["y"]), inputs), inputs)
        np.testing.assert_array_equal(got, fn(a, b), err_msg=op)
    (got,) = _run(_model(helper.make_node("BitwiseNot", ["a"], ["y"]), {"a": grid}),
                  {"a": grid})
    np.testing.assert_array_equal(got, np.invert(grid))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("direction", ["LEFT", "RIGHT"])
def test_bit_shift_of_8_bit_integers(dtype, direction: str) -> None:
    info = np.iinfo(dtype)
    low = -3 if dtype == np.int8 else 0
    shifts = np.arange(low, 12).astype(dtype)
    x = np.repeat(np.arange(info.min, info.max + 1).astype(dtype), len(shifts))
    y = np.tile(shifts, 256)
    inputs = {"x": x, "y": y}
    node = helper.make_node("BitShift", ["x", "y"], ["z"], direction=direction)
    model = _model(node, inputs, outputs=("z",), opset=18, shapes=[x.shape])
    (got,) = _run(model, inputs)
    wide, s = x.astype(np.int64), y.astype(np.int64)
    out = (s < 0) | (s >= 8)
    if direction == "LEFT":
        want = np.where(out, 0, (wide << np.clip(s, 0, 7)) & 0xFF)
        want = want.astype(np.uint8).view(dtype) if dtype == np.int8 else want
    else:
        want = np.where(out, np.where(wide < 0, -1, 0), wide >> np.clip(s, 0, 7))
    np.testing.assert_array_equal(got, want.astype(dtype))


def test_bitwise_of_int32_is_refused_with_the_reason() -> None:
    a = np.arange(6, dtype=np.int32)
    inputs = {"a": a, "b": a}
    with pytest.raises(KilnError, match="8-bit integers"):
        import_onnx(_model(helper.make_node("BitwiseAnd", ["a", "b"], ["y"]), inputs))


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_is_torch_grid_sample(mode: str, padding: str, align: int) -> None:
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    grid = (RNG.random((2, 6, 7, 2)) * 3.4 - 1.7).astype(np.float32)
    grid[0, 0, :3] = [[np.nan, 0.0], [np.inf, 0.5], [-np.inf, -np.inf]]
    node = helper.make_node("GridSample", ["x", "g"], ["y"], mode=mode, padding_mode=padding,
                            align_corners=align)
    inputs = {"x": x, "g": grid}
    (got,) = _run(_model(node, inputs, opset=22, shapes=[(2, 3, 6, 7)]), inputs)
    want = F.grid_sample(torch.from_numpy(x), torch.from_numpy(grid),
                         mode="bilinear" if mode == "linear" else "nearest",
                         padding_mode=padding, align_corners=bool(align)).numpy()
    finite = np.isfinite(grid).all(-1)[:, None].repeat(3, 1)  # NaN / inf points: see docstring
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["linear", "circular"])
def test_tensor_scatter_writes_each_batch_entry_at_its_index(mode: str) -> None:
    cache = RNG.standard_normal((3, 2, 6, 4)).astype(np.float32)
    update = RNG.standard_normal((3, 2, 3, 4)).astype(np.float32)
    write = np.array([0, 3, 5 if mode == "circular" else 2])
    inputs = {"c": cache, "u": update, "w": write}
    node = helper.make_node("TensorScatter", ["c", "u", "w"], ["y"], mode=mode)
    (got,) = _run(_model(node, inputs, opset=24, shapes=[cache.shape]), inputs)
    want = cache.copy()
    for b in range(3):
        for s in range(3):
            want[b, :, (write[b] + s) % 6] = update[b, :, s]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "i8"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qlinear_conv_matches_onnx_reference(signed: bool, per_channel: bool) -> None:
    qtype = np.int8 if signed else np.uint8
    lo, hi = (-128, 128) if signed else (0, 256)
    x = RNG.integers(lo, hi, (1, 3, 7, 6)).astype(qtype)
    inputs = {"x": x}
    cout = 4
    consts = {
        "xs": np.array(0.02, np.float32), "xz": np.array(3 if signed else 120, qtype),
        "w": RNG.integers(lo, hi, (cout, 3, 3, 3)).astype(qtype),
        "ws": (RNG.random(cout if per_channel else 1) * 0.01 + 0.002).astype(np.float32),
        "wz": np.full(cout if per_channel else 1, -2 if signed else 130, qtype),
        "ys": np.array(0.15, np.float32), "yz": np.array(-5 if signed else 128, qtype),
        "b": RNG.integers(-500, 500, cout).astype(np.int32),
    }
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                            ["y"], pads=[1, 0, 1, 2], strides=[2, 1])
    model = _model(node, inputs, consts, opset=10)
    (got,) = _run(model, inputs)
    want = ReferenceEvaluator(model).run(None, inputs)[0]
    assert got.dtype == want.dtype
    # float32 against the reference's float64 product: at most one step off, on a half step
    assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
    assert (got == want).mean() > 0.99


@pytest.mark.parametrize("onesided", [None, 0])
@pytest.mark.parametrize("windowed", [False, True])
def test_stft_is_numpy_fft_of_windowed_frames(onesided, windowed: bool) -> None:
    x = RNG.standard_normal((2, 100, 1)).astype(np.float32)
    window = np.hanning(20).astype(np.float32)
    consts = {"step": np.array(7), "len": np.array(20)}
    names = ["x", "step", "w" if windowed else "", "len"]
    if windowed:
        consts["w"] = window
    attrs = {} if onesided is None else {"onesided": onesided}
    node = helper.make_node("STFT", names, ["y"], **attrs)
    bins = 11 if onesided is None else 20
    model = _model(node, {"x": x}, consts, opset=17, shapes=[(2, 12, bins, 2)])
    (got,) = _run(model, {"x": x})
    frames = np.stack([x[:, 7 * f:7 * f + 20, 0] for f in range(12)], 1)
    if windowed:
        frames = frames * window
    spectrum = (np.fft.rfft if onesided is None else np.fft.fft)(frames.astype(np.float64))
    np.testing.assert_allclose(got[..., 0], spectrum.real, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[..., 1], spectrum.imag, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("coords", ["half_pixel", "output_half_pixel"])
def test_roi_align_matches_onnx_reference(mode: str, coords: str) -> None:
    x = RNG.standard_normal((2, 3, 9, 11)).astype(np.float32)
    rois = np.array([[0.5, 1.0, 7.2, 6.3], [-3.0, -2.0, 4.0, 12.5], [8.0, 7.5, 13.0, 10.0],
                     [2.0, 2.0, 2.5, 2.2]], np.float32)
    batch = np.array([1, 0, 1, 0])
    inputs = {"x": x, "rois": rois, "b": batch}
    node = helper.make_node("RoiAlign", ["x", "rois", "b"], ["y"], mode=mode,
                            coordinate_transformation_mode=coords, output_height=3,
                            output_width=4, sampling_ratio=2, spatial_scale=0.8)
    model = _model(node, inputs, opset=16)
    (got,) = _run(model, inputs)
    want = ReferenceEvaluator(model).run(None, inputs)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_roi_align_with_adaptive_sampling_is_refused() -> None:
    inputs = {"x": np.zeros((1, 1, 4, 4), np.float32), "rois": np.zeros((1, 4), np.float32),
              "b": np.zeros(1, np.int64)}
    node = helper.make_node("RoiAlign", ["x", "rois", "b"], ["y"], sampling_ratio=0)
    with pytest.raises(KilnError, match="sampling_ratio"):
        import_onnx(_model(node, inputs, opset=16, shapes=[(1, 1, 1, 1)]))
