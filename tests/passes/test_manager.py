"""PassManager, instruments, pass registry and pipelines."""

from __future__ import annotations

import numpy as np
import pytest
from passes_testlib import fingerprint, random_inputs

from kiln.backends.reference import run_graph
from kiln.ir import (
    Graph,
    GraphBuilder,
    KilnError,
    NumericsError,
    TensorType,
    VerificationError,
    parse_graph,
    print_graph,
)
from kiln.passes import (
    PIPELINES,
    DumpIR,
    ErrorBudget,
    NumericCheck,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    Timing,
    Verify,
    all_passes,
    get_pass,
    get_pipeline,
    register_pass,
    run_pipeline,
)


def model() -> Graph:
    """conv + batch_norm + an identity reshape + a constant subexpression + dead code."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("model")
    x = b.input("x", TensorType((1, 2, 4, 4)))
    w = b.constant(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
    c = b.op("conv", [x, w], {"padding": 1}, name="conv")
    params = [b.constant(a.astype(np.float32), n) for a, n in
              [(rng.standard_normal(3), "mean"), (rng.random(3) + 0.5, "var"),
               (rng.standard_normal(3), "gamma"), (rng.standard_normal(3), "beta")]]
    y = b.op("batch_norm", [c, *params], name="bn")
    half = b.constant(np.array(0.5, np.float32), "half")
    quarter = b.op("mul", [half, half], name="quarter")
    r = b.op("reshape", [y], {"shape": [1, 3, 4, 4]}, name="r")
    b.op("neg", [r], name="unused")
    b.output(b.op("add", [r, quarter], name="out"))
    return b.build()


# ---- passes written wrong on purpose -------------------------------------------------------
class FlipConstantSign(Pass):
    """Negates the first constant: a miscompile the numeric check must catch."""

    name = "flip_sign"
    description = "negate the first constant (wrong on purpose)"

    def apply(self, graph, ctx):
        out = graph.copy()
        first = next(iter(out.constants))
        flipped = -out.constants[first]
        flipped.setflags(write=False)
        out.constants[first] = flipped
        return PassResult(out, True)


class DropFirstNode(Pass):
    """Removes the first node, leaving its users reading an undefined value."""

    name = "drop_first_node"
    description = "delete the first node (wrong on purpose)"

    def apply(self, graph, ctx):
        out = graph.copy()
        out.nodes = out.nodes[1:]
        return PassResult(out, True)


class MutateInput(Pass):
    """Edits the graph it was given instead of a copy."""

    name = "mutate_input"
    description = "rename the graph in place (wrong on purpose)"

    def apply(self, graph, ctx):
        graph.name = "changed"
        return PassResult(graph, True)


class AddNoise(Pass):
    """A lossy pass: scales the first constant by (1 + eps)."""

    name = "add_noise"
    description = "scale the first constant by 1 + eps"
    numerics = "lossy"
    error_budget = ErrorBudget(rtol=1e-2, atol=1e-2)

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def apply(self, graph, ctx):
        out = graph.copy()
        first = next(iter(out.constants))
        scaled = (out.constants[first] * np.float32(1 + self.eps)).astype(np.float32)
        scaled.setflags(write=False)
        out.constants[first] = scaled
        return PassResult(out, True)


# ---- the manager ---------------------------------------------------------------------------
def test_o1_on_the_model():
    g = model()
    before = fingerprint(g)
    out = run_pipeline(g, "O1", [Verify()])
    assert fingerprint(g) == before
    assert [n.op for n in out.nodes] == ["conv", "add"]
    assert out.outputs == ["out"]
    inputs = random_inputs(g)
    np.testing.assert_allclose(run_graph(out, inputs)[0], run_graph(g, inputs)[0],
                               rtol=1e-5, atol=1e-5)


def test_pipelines_and_names():
    assert PIPELINES["O0"] == []
    assert PIPELINES["O1"] == ["fold_constants", "simplify_algebra", "dce", "fold_batchnorm",
                               "cse", "dce"]
    # Other tests in the same process may register passes of their own; kiln's are these.
    import kiln.compression  # noqa: F401  (registers the lossy passes)

    builtin = {n: p for n, p in all_passes().items()
               if type(p).__module__.startswith(("kiln.passes", "kiln.compression"))}
    exact = {"fold_constants", "simplify_algebra", "dce", "fold_batchnorm", "cse",
             "sink_permutes"}
    lossy = {"prune_channels", "low_rank", "quantize_int8"}
    assert set(builtin) == exact | lossy
    for name, p in builtin.items():
        assert p.numerics == ("lossy" if name in lossy else "exact")
        assert p.description and "\n" not in p.description
        assert (p.error_budget is not None) == (name in lossy)
    g = model()
    assert print_graph(run_pipeline(g, "O0")) == print_graph(g)
    assert [p.name for p in get_pipeline("O1")] == PIPELINES["O1"]


def test_unknown_pipeline_and_pass():
    with pytest.raises(KilnError, match="O3") as e:
        get_pipeline("O3")
    assert "O0, O1" in str(e.value)
    with pytest.raises(KilnError, match="no pass named 'fold_everything'"):
        PassManager(["fold_everything"])


def test_register_pass_checks_declarations():
    class Lossy(Pass):
        name = "unbudgeted"
        description = "a lossy pass without a budget"
        numerics = "lossy"

        def apply(self, graph, ctx):
            return PassResult(graph, False)

    class Duplicate(Lossy):
        name = "dce"
        numerics = "exact"

    class TwoLines(Duplicate):
        name = "two_lines"
        description = "first line\nsecond line"

    for cls in (Lossy, Duplicate, TwoLines):
        with pytest.raises(KilnError):
            register_pass(cls)
    assert "unbudgeted" not in all_passes()


def test_pass_must_return_a_pass_result():
    class Sloppy(Pass):
        name = "sloppy"
        description = "returns the graph itself"

        def apply(self, graph, ctx):
            return graph

    with pytest.raises(KilnError, match="sloppy returned Graph"):
        Sloppy().run(model())


def test_timing_records_every_pass():
    timing = Timing()
    run_pipeline(model(), "O1", [timing])
    assert [r.name for r in timing.records] == PIPELINES["O1"]
    first, last = timing.records[0], timing.records[-1]
    assert first.nodes_before == 6 and first.changed  # mul(half, half) folds
    assert last.nodes_after == 2
    assert all(r.seconds >= 0 for r in timing.records)
    assert timing.total_seconds == pytest.approx(sum(r.seconds for r in timing.records))
    table = timing.table()
    assert all(name in table for name in PIPELINES["O1"]) and "total" in table
    assert "6 -> 5" in table


def test_dump_ir_writes_every_stage(tmp_path):
    dump = DumpIR(tmp_path / "dump")
    g = model()
    out = run_pipeline(g, ["fold_constants", "simplify_algebra", "dce"], [dump])
    names = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert names == ["000_input.txt", "001_fold_constants.txt", "002_simplify_algebra.txt",
                     "003_dce.txt"]
    assert (tmp_path / "dump" / "000_input.txt").read_text() == print_graph(g)
    final = (tmp_path / "dump" / "003_dce.txt").read_text()
    assert final == print_graph(out)
    assert print_graph(parse_graph(final, out.constants)) == final


@pytest.mark.parametrize("broken, message", [
    (DropFirstNode(), "after pass drop_first_node: operand %conv is used before it is defined"),
    (MutateInput(), "pass mutate_input modified its input graph"),
])
def test_verify_names_the_broken_pass(broken, message):
    with pytest.raises(VerificationError, match=message):
        run_pipeline(model(), ["fold_constants", broken, "dce"], [Verify()])


def test_verify_rejects_writable_constants():
    class Writable(Pass):
        name = "writable"
        description = "add a writable constant"

        def apply(self, graph, ctx):
            out = graph.copy()
            out.constants["w"] = np.array(out.constants["w"])
            return PassResult(out, True)

    with pytest.raises(VerificationError, match="writable left writable constants"):
        run_pipeline(model(), [Writable()], [Verify()])


def test_verify_rejects_an_invalid_input():
    g = model()
    g.outputs.append("nowhere")
    with pytest.raises(VerificationError, match="input graph is invalid"):
        run_pipeline(g, "O1", [Verify()])


def test_numeric_check_names_the_wrong_pass():
    g = model()
    check = NumericCheck(run_graph, random_inputs(g))
    with pytest.raises(NumericsError, match=r"pass flip_sign \(exact\) moved output 0 by"):
        run_pipeline(g, ["fold_constants", FlipConstantSign(), "dce"], [check])
    assert [s.name for s in check.stages] == ["fold_constants", "flip_sign"]
    assert check.stages[0].checked and check.stages[0].max_abs_diff < 1e-5
    assert check.stages[1].max_abs_diff > 0.1


def test_numeric_check_records_each_stage():
    g = model()
    check = NumericCheck(run_graph, random_inputs(g))
    run_pipeline(g, "O1", [check])
    assert [s.name for s in check.stages] == PIPELINES["O1"]
    # The first dce drops the unused neg; cse and the last dce find nothing to do.
    assert [s.checked for s in check.stages] == [True, True, True, True, False, False]
    assert all(s.max_abs_diff < 1e-4 for s in check.stages)


def test_numeric_check_uses_the_lossy_budget():
    g = model()
    inputs = random_inputs(g)
    run_pipeline(g, [AddNoise(1e-3)], [NumericCheck(run_graph, inputs)])
    with pytest.raises(NumericsError, match="add_noise"):
        run_pipeline(g, [AddNoise(0.5)], [NumericCheck(run_graph, inputs)])
    # An exact pass making the same small change is over the exact tolerance...
    AddNoise.numerics = "exact"
    try:
        with pytest.raises(NumericsError):
            run_pipeline(g, [AddNoise(1e-3)], [NumericCheck(run_graph, inputs)])
        # ...unless the caller loosens it.
        run_pipeline(g, [AddNoise(1e-3)], [NumericCheck(run_graph, inputs, rtol=1e-2,
                                                        atol=1e-2)])
    finally:
        AddNoise.numerics = "lossy"


def test_context_options_reach_passes():
    ctx = PassContext(options={"fold_constants.max_elements": 0})
    assert ctx.option("fold_constants", "max_elements", 65536) == 0
    assert ctx.option("cse", "anything", "default") == "default"
    assert get_pass("fold_constants").run(model(), ctx).changed
