"""Random graphs with a dynamic batch: each fuzz graph becomes a torch module (to_torch);
where PyTorch itself runs that module at other leading sizes, kiln.compile(dynamic=...) on the
original size must give PyTorch's answers at those sizes too."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

import kiln
from kiln.backends.reference.interpreter import run_graph
from kiln.interop.to_torch import graph_to_module
from kiln.ir import specialize, verify

_spec = importlib.util.spec_from_file_location(
    "kiln_tests_fuzz_generate", Path(__file__).parent / "fuzz" / "generate.py")
fuzz = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = fuzz
    _spec.loader.exec_module(fuzz)

SEEDS = range(36)
SIZES = (1, 3)


def _resized(inputs: list[np.ndarray], dims: dict[int, dict[int, str]], n: int,
             rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for i, a in enumerate(inputs):
        if i not in dims:
            out.append(a)
            continue
        shape = (n, *a.shape[1:])
        if a.dtype.kind == "f":
            out.append(rng.standard_normal(shape).astype(a.dtype))
        else:                              # integers and bools: tile the example's values
            reps = -(-n // a.shape[0])
            out.append(np.concatenate([a] * reps)[:n])
    return out


def _eager(module: torch.nn.Module, arrays: list[np.ndarray]) -> list[np.ndarray] | None:
    """PyTorch's outputs, or None when PyTorch cannot run the module at these sizes (a shape
    baked into the graph): such a graph has no batch to vary."""
    try:
        with torch.no_grad():
            out = module(*[torch.from_numpy(a.copy()) for a in arrays])
    except (RuntimeError, IndexError, ValueError):
        return None
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.numpy() for o in outs]


def test_dynamic_batch_matches_torch_on_random_graphs() -> None:
    tried = symbolic_runs = 0
    for seed in SEEDS:
        graph, inputs = fuzz.generate_graph(seed)
        if not inputs or not inputs[0].ndim:
            continue
        # The first input's leading dimension is the batch, shared by every input of that
        # size there; the others keep their sizes.
        b0 = inputs[0].shape[0]
        dims = {i: {0: "batch"} for i, a in enumerate(inputs) if a.ndim and a.shape[0] == b0}
        module = graph_to_module(graph, trainable=False).eval()
        rng = np.random.default_rng(seed)
        cases = [(n, _resized(inputs, dims, n, rng)) for n in SIZES if n != b0]
        cases = [(n, arrays, _eager(module, arrays)) for n, arrays in cases]
        cases = [c for c in cases if c[2] is not None]
        if not cases:
            continue
        try:
            compiled = kiln.compile(module, [torch.from_numpy(a.copy()) for a in inputs],
                                    dynamic=dims)
        except kiln.KilnError:
            # to_torch's spelling of some graphs does not import back (nan_to_num, tensor
            # slice bounds): a round-trip gap, not the subject here (test_to_torch's)
            continue
        for n, arrays, want in cases:
            got = compiled(*arrays)
            got = list(got) if isinstance(got, tuple) else [got]
            fuzz.assert_outputs_close(want, got, f"seed {seed}, batch {n}")
        tried += 1
        # The same model as one graph whose batch is a named size, specialized per size and
        # run by the reference interpreter, must give PyTorch's answers too.
        try:
            symbolic = compiled.symbolic_graph()
        except kiln.KilnError:
            continue                      # a constant folded from the batch (refused by name)
        assert "batch" in symbolic.sizes
        for n, arrays, want in cases:
            graph = specialize(symbolic, {"batch": n})
            verify(graph)
            fuzz.assert_outputs_close(want, run_graph(graph, arrays), f"seed {seed}, batch {n}")
        symbolic_runs += 1
    # Most fuzz graphs keep a batch PyTorch can vary and import back; the test must not
    # pass on none.
    print(f"{tried} of {len(SEEDS)} graphs run at other batch sizes, {symbolic_runs} as one "
          "symbolic graph")
    assert tried >= len(SEEDS) // 3, tried
    assert symbolic_runs >= tried // 2, (symbolic_runs, tried)
