"""HuggingFace transformers models, small and with random weights, compiled by kiln.

Eight architectures built from config objects (BERT, DistilBERT, RoBERTa, GPT-2 with its LM
head, the T5 encoder, ViT, the Whisper encoder and Llama), text models with an attention mask
that pads the last positions. Each goes through kiln's default frontend (``kiln.compile``;
the model sits in ``Positional``, since kiln takes tensors positionally and HuggingFace's
positional order puts ``past_key_values`` second in GPT-2 and Llama) and through
``torch.compile(model, backend="kiln")``, which partitions around ops kiln lacks and warns
which ran in eager PyTorch. CI runs the unmarked subset; the full suite is

    python -m pytest -q -p no:xdist tests/models -m heavy
"""

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import kiln
from kiln.examples.model_coverage import TRANSFORMERS, build_transformers, relative_error

pytest.importorskip("transformers", reason="transformers is not importable "
                    "(pip install transformers)")

TOLERANCE = 1e-4
"""Largest error allowed, relative to the largest magnitude of eager's output."""

CI_SUBSET = ("bert", "gpt2")
"""The architectures CI runs, through both paths."""

REFUSED: dict[str, str] = {}
"""Models ``kiln.compile`` refuses today, with the first line of its KilnError. Each is
tested to still be refused: remove a model from here once kiln compiles it."""

FALLBACK: dict[str, str] = {}
"""Models part of which ``torch.compile(backend="kiln")`` runs in eager PyTorch today, with
what its warning says fell back. Each is tested to still warn; remove a model from here once
kiln runs all of it."""


def assert_matches_eager(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """kiln's main output has eager's shape and is within TOLERANCE of it (and eager's
    output varies, so that the comparison means something)."""
    assert want.std() > 0, f"{name}: eager's output is constant, the comparison proves nothing"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = relative_error(got, want)
    assert error <= TOLERANCE, f"{name}: error {error:.2e} of the output max (> {TOLERANCE})"


def _cases(subset: tuple[str, ...]) -> list:
    return [pytest.param(n, id=n, marks=() if n in subset else pytest.mark.heavy)
            for n in TRANSFORMERS]


@pytest.mark.parametrize("name", _cases(CI_SUBSET))
def test_default_frontend(name):
    """``kiln.compile`` (fx, falling back to torch.export) matches eager, or the model is
    listed in REFUSED and still refused."""
    case = build_transformers(name)
    with torch.no_grad():
        want = case.main(case.model(*case.inputs))
        try:
            compiled = kiln.compile(case.model, case.inputs)
        except kiln.KilnError:
            if name in REFUSED:
                return
            raise
        if name in REFUSED:
            pytest.fail(f"{name} now compiles: remove it from REFUSED in {__file__}")
        got = case.main(compiled(*case.inputs))
    assert_matches_eager(name, got, want)


@pytest.mark.parametrize("name", _cases(CI_SUBSET))
def test_torch_compile(name):
    """``torch.compile(backend="kiln")`` on the HuggingFace model itself, called with keyword
    arguments, gives eager's answer; it warns of a fallback exactly for the models in
    FALLBACK."""
    case = build_transformers(name)
    model, kwargs = case.model.model, dict(zip(case.model.names, case.inputs))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        want = model(**kwargs)[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = torch.compile(model, backend="kiln")(**kwargs)[0]
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith("kiln: ")]
    assert counters["stats"]["unique_graphs"] >= 1, f"{name}: Dynamo handed kiln no graph"
    assert_matches_eager(name, got, want)
    if name in FALLBACK:
        assert fallbacks, f"{name} runs wholly in kiln now: remove it from FALLBACK in {__file__}"
    else:
        assert not fallbacks, f"{name}: {fallbacks[0]}"


def test_model_coverage_row(capsys):
    """examples/model_coverage.py prints a row for BERT: compiled, within tolerance, with
    kiln, eager and ONNX Runtime latencies."""
    from kiln.examples.model_coverage import main

    main(["--suite", "transformers", "--models", "bert", "--repeat", "2"])
    lines = capsys.readouterr().out.splitlines()
    row = [cell.strip() for cell in lines[-1].strip("|").split("|")]
    assert len(lines) == 4 and row[0] == "bert", lines
    assert row[2].startswith("compiled"), row
    assert float(row[3]) <= TOLERANCE
    assert all(float(ms) > 0 for ms in row[5:8]), row
