"""The CUDA backend's tests run on Numba's CUDA simulator.

numba reads NUMBA_ENABLE_CUDASIM when it is first imported, so it is set here, when pytest
imports this conftest (in every xdist worker, at collection, before any test runs). No other
part of kiln or its tests imports numba; if something did import it first, its configuration is
re-read, which works as long as ``numba.cuda`` itself was not imported yet. The fixture below
checks, in each worker, that ``numba.cuda`` really is the simulator, so these tests never run
half-configured. Other tests are unaffected: the variable only changes ``numba.cuda``.

The real-GPU test (test_cuda_gpu.py) runs in a subprocess without the variable.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def simulator_problem() -> str | None:
    """None when ``numba.cuda`` in this process is the simulator, else what went wrong."""
    numba = sys.modules.get("numba")
    if numba is not None and not numba.config.ENABLE_CUDASIM:
        if "numba.cuda" in sys.modules:
            return ("numba.cuda was imported before tests/backends/cuda/conftest.py could "
                    "enable the simulator; run these tests in a fresh process")
        numba.config.reload_config()
    import numba
    import numba.cuda

    if not numba.config.ENABLE_CUDASIM or "numba.cuda.simulator" not in sys.modules:
        return "numba.cuda is not the CUDA simulator in this process"
    return None


@pytest.fixture(autouse=True, scope="session")
def cuda_simulator():
    """Fail every CUDA test of a worker where numba.cuda is not the simulator."""
    problem = simulator_problem()
    if problem:
        pytest.fail(problem)
