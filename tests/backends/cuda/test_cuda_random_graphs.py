"""Random valid graphs (tests/fuzz/generate.py) on the CUDA backend (simulator) agree with the
reference interpreter, and every launch with more than one iteration runs on many threads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from kiln.backends.cuda import compile_graph_cuda
from kiln.backends.reference import run_graph

_NAME = "kiln_tests_fuzz_generate"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        _NAME, Path(__file__).parents[2] / "fuzz" / "generate.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module  # dataclasses look their module up there
    _spec.loader.exec_module(_module)
fuzz = sys.modules[_NAME]

# All of the first 1000 seeds pass; 80 keep this file to a few seconds in the simulator.
SEEDS = range(80)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("seed", SEEDS)
def test_cuda_backend_agrees_with_reference(seed: int) -> None:
    graph, inputs = fuzz.generate_graph(seed)
    program = compile_graph_cuda(graph)
    fuzz.assert_outputs_close(run_graph(graph, inputs), program.run(*inputs),
                              f"seed {seed}, cuda")
    serial = [lc.name for lc in program.launches() if lc.work > 1 and not lc.bound]
    assert not serial, f"seed {seed}: launches left in one thread: {serial}"
