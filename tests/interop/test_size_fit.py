"""Size formulas fitted from probe sizes (kiln.interop.size_fit): static numbers stay numbers,
moving ones become c * batch^i * seq^j, anything else has no formula."""

from __future__ import annotations

import pytest

from kiln.interop.size_fit import SizeTerm, fit, fit_shape, probe_sizes
from kiln.ir import KilnError

POINTS = probe_sizes({"batch": (1, 1 << 20), "seq": (1, 512)})


def values(f) -> list[int]:
    return [f(p["batch"], p["seq"]) for p in POINTS]


def test_probes_move_one_size_at_a_time_then_all() -> None:
    base = POINTS[0]
    assert base["batch"] != base["seq"] and 1 not in base.values()
    assert POINTS[1] == {**base, "batch": POINTS[1]["batch"]} != base
    assert POINTS[2] == {**base, "seq": POINTS[2]["seq"]} != base
    assert all(POINTS[-1][n] not in (base[n], POINTS[i][n]) for i, n in ((1, "batch"),
                                                                          (2, "seq")))


@pytest.mark.parametrize(("f", "want"), [
    (lambda b, s: 768, 768),
    (lambda b, s: b, SizeTerm(1, (("batch", 1),))),
    (lambda b, s: b * s, SizeTerm(1, (("batch", 1), ("seq", 1)))),
    (lambda b, s: 4 * s * s, SizeTerm(4, (("seq", 2),))),
    (lambda b, s: -s, SizeTerm(-1, (("seq", 1),))),
])
def test_fits(f, want) -> None:
    assert fit(values(f), POINTS) == want


@pytest.mark.parametrize("f", [lambda b, s: b + s, lambda b, s: s - 1, lambda b, s: b // 2 + 7])
def test_no_formula(f) -> None:
    assert fit(values(f), POINTS) is None


def test_term_names_and_shapes() -> None:
    batch, prod = SizeTerm(1, (("batch", 1),)), SizeTerm(2, (("batch", 1), ("seq", 1)))
    assert batch.name == "batch" and prod.name is None and str(prod) == "2*batch*seq"
    shapes = [(p["batch"], 3, p["batch"] * p["seq"]) for p in POINTS]
    assert fit_shape(shapes, POINTS) == [batch, 3, SizeTerm(1, (("batch", 1), ("seq", 1)))]


def test_tight_bounds() -> None:
    assert {p["n"] for p in probe_sizes({"n": (4, 5)})} == {4, 5}
    with pytest.raises(KilnError, match="no\\s+two sizes"):
        probe_sizes({"n": (3, 3)})
