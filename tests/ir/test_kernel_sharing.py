"""Kernel IR rewrites share what they do not change, and the structural key of a kernel.

Compile time of large models rests on these: ``map_expr``/``map_stmts`` keep every node whose
operands come back unchanged (no rebuild), ``Binary`` stores its dtype and lanes, and
``structure_key`` names parameters by position while it prints.
"""

from __future__ import annotations

import dataclasses
import pickle

from kiln.ir import kernel as K
from kiln.ir.kernel import (
    INDEX,
    Assign,
    Binary,
    Buffer,
    Cast,
    Const,
    Decl,
    For,
    If,
    Kernel,
    Load,
    Store,
    Var,
)
from kiln.passes.lower.precision import uses_half


def _body() -> tuple:
    i, acc = Var("i"), Var("acc", "f32")
    return (Decl(acc, Const(0.0)),
            For(i, Const(0, INDEX), Const(8, INDEX), (
                Assign(acc, acc + Load("x", (i * 1) + 0)),
                If(Binary("lt", i, Const(4, INDEX)), (Store("y", i, acc),)),)),
            Store("y", Const(0, INDEX), acc))


def test_map_keeps_untouched_nodes() -> None:
    body = _body()
    assert K.map_stmts(body, lambda e: None) == body
    same = K.map_stmts(body, lambda e: None)
    assert all(a is b for a, b in zip(same, body))
    expr = body[1].body[0].value
    assert K.map_expr(expr, lambda e: None) is expr


def test_map_rebuilds_the_path_to_a_change_only() -> None:
    body = _body()
    out = K.map_stmts(body, K.fold_index)
    loop, new_loop = body[1], out[1]
    assert out[0] is body[0] and out[2] is body[2]   # nothing to fold there
    assert new_loop is not loop
    assert K.format_expr(new_loop.body[0].value) == "(acc + x[i])"
    assert new_loop.body[1] is loop.body[1]          # the If had nothing to fold


def test_binary_dtype_and_lanes_are_stored_not_fields() -> None:
    a = Binary("add", Var("i"), Const(1, INDEX))
    assert (a.dtype, a.lanes) == (INDEX, 1)
    assert Binary("lt", Var("x", "f32"), Const(0.0)).dtype == "bool"
    assert a == Binary("add", Var("i"), Const(1, INDEX))
    assert hash(a) == hash(Binary("add", Var("i"), Const(1, INDEX)))
    assert [f.name for f in dataclasses.fields(a)] == ["op", "a", "b"]
    back = pickle.loads(pickle.dumps(a))
    assert back == a and back.dtype == INDEX


def _copy_kernel(name: str, src: str, dst: str, n: int = 8) -> Kernel:
    i = Var("i")
    body = (For(i, Const(0, INDEX), Const(n, INDEX), (Store(dst, i, Load(src, i) * 2.0),)),)
    return Kernel(name, (Buffer(src, "f32", n), Buffer(dst, "f32", n)), body)


def test_structure_key_names_parameters_by_position() -> None:
    a = _copy_kernel("k0_a", "v_x", "v_y")
    b = _copy_kernel("k7_b", "v_p", "v_q")
    assert K.structure_key(a) == K.structure_key(b)
    assert "$p0[i]" in K.structure_key(a) and "v_x" not in K.structure_key(a)
    assert K.structure_key(a) != K.structure_key(_copy_kernel("k0_a", "v_x", "v_y", 9))
    # Swapping the roles of the buffers is another function of them.
    swapped = Kernel("k1", (Buffer("v_y", "f32", 8), Buffer("v_x", "f32", 8)), a.body)
    assert K.structure_key(swapped) != K.structure_key(a)


def test_print_kernel_unchanged_by_key() -> None:
    a = _copy_kernel("k0_a", "v_x", "v_y")
    K.structure_key(a)
    assert str(a) == ("kernel k0_a(v_x: f32[8], v_y: f32[8]) {\n"
                      "  for i in [0, +8):\n"
                      "    v_y[i] = (v_x[i] * 2.0)\n"
                      "}\n")


def test_uses_half_finds_f16_deep_in_an_expression() -> None:
    i = Var("i")
    deep = Binary("add", Load("x", i), Cast(Cast(Load("x", i), "f16"), "f32"))
    k = Kernel("k", (Buffer("x", "f32", 4), Buffer("y", "f32", 4)),
               (For(i, Const(0, INDEX), Const(4, INDEX), (Store("y", i, deep),)),))
    assert uses_half(k)
    plain = Kernel("k", k.params, (For(i, Const(0, INDEX), Const(4, INDEX),
                                        (Store("y", i, Load("x", i) + 1.0),)),))
    assert not uses_half(plain)
