"""The simulator's shared arrays are created once per block even when a block's threads reach
``cuda.shared.array`` together (numba's simulator alone does not lock that; tiled kernels
then gave wrong results a few runs in ten)."""

from __future__ import annotations

import sys
import threading

import numpy as np

from kiln.backends.cuda.device import _serialize_simulated_shared_arrays


def test_threads_of_a_block_get_one_shared_array():
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    _serialize_simulated_shared_arrays()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):
            shared = FakeCUDAShared(0)
            start = threading.Barrier(8)
            got = []

            def thread(shared=shared, start=start, got=got):
                start.wait()
                got.append(shared.array((4, 4), np.float32))

            threads = [threading.Thread(target=thread) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(got) == 8 and all(a is got[0] for a in got)
            assert shared.array((2,), np.int32) is not got[0]   # another line, another array
    finally:
        sys.setswitchinterval(old)
