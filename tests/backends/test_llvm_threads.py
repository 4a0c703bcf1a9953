"""Thread counts chosen by measurement (backends/llvm/threads.py), driven with made-up call
times; and outputs that do not depend on the thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.backends.llvm import compile_graph
from kiln.backends.llvm.threads import (
    MIN_GAP,
    TRIAL_CALLS,
    TRIAL_GAP,
    ThreadChooser,
    thread_counts,
)
from kiln.zoo import get_model


class Clock:
    """Calls of a program whose time per thread count the test sets."""

    def __init__(self, most: int, times: dict[int, float]) -> None:
        self.times = times
        self.now = 0.0
        self.applied: list[int] = []
        self.used: list[int] = []
        self.chooser = ThreadChooser(most, self.applied.append)

    def call(self, count: int = 1) -> None:
        for _ in range(count):
            n = self.chooser.current
            self.used.append(n)
            self.now += self.times[n]
            self.chooser.after_call(self.times[n], self.now)


def test_counts_halve_down_to_one():
    assert thread_counts(8) == [8, 4, 2, 1]
    assert thread_counts(6) == [6, 3, 1]
    assert thread_counts(1) == [1] and thread_counts(0) == [1]


def test_tries_each_count_then_keeps_the_fastest():
    clock = Clock(4, {4: 3e-3, 2: 2e-3, 1: 5e-3})
    clock.call(30)
    assert set(clock.used[:10]) == {4, 2, 1}
    assert clock.used[-5:] == [2] * 5 and clock.chooser.best == 2
    # apply() runs only when the count changes.
    assert all(a != b for a, b in zip(clock.applied, clock.applied[1:]))


def test_a_loaded_machine_moves_calls_to_one_thread_and_trials_stay_rare():
    """Two threads fast at first; then the machine gets busy and two threads take 100x one
    thread's time: within a few calls every call runs on one thread, and the slow count is
    tried again only after TRIAL_GAP times its duration."""
    clock = Clock(2, {2: 1e-3, 1: 1.6e-3})
    clock.call(200)
    # Mostly two threads; one thread is tried again (TRIAL_CALLS calls) every TRIAL_GAP x
    # its 1.6 ms.
    assert clock.used[-100:].count(2) >= 100 - 2 * TRIAL_CALLS
    clock.times = {2: 0.1, 1: 1.6e-3}         # busy processes arrive
    start = len(clock.used)
    clock.call(3000)
    after = clock.used[start:]
    assert after[3:50] == [1] * 47
    trials = [i for i, n in enumerate(after) if n == 2 and after[i - 1] != 2]
    # Trials start TRIAL_GAP x what a trial costs (TRIAL_CALLS x 0.1 s) apart.
    gap_calls = TRIAL_GAP * TRIAL_CALLS * 0.1 / 1.6e-3
    assert all(b - a >= 0.9 * gap_calls for a, b in zip(trials[1:], trials[2:])), trials
    total = sum(clock.times[n] for n in after)
    assert total <= 1.1 * len(after) * 1.6e-3 + (len(trials) + 1) * TRIAL_CALLS * 0.1
    clock.times = {2: 1e-3, 1: 1.6e-3}         # the load goes away
    clock.call(int(2 * gap_calls) + 100)
    assert clock.used[-50:].count(2) >= 50 - TRIAL_CALLS


def test_noise_does_not_flip_between_counts():
    """A count is left only when another is clearly (SWITCH_MARGIN) faster."""
    rng = np.random.default_rng(0)
    clock = Clock(2, {2: 1e-3, 1: 1.03e-3})
    for _ in range(2000):
        clock.times = {2: 1e-3 * rng.uniform(0.98, 1.02), 1: 1.03e-3}
        clock.call()
    switches = sum(a != b for a, b in zip(clock.applied, clock.applied[1:]))
    trials_max = clock.now / MIN_GAP * 2 + 10
    assert switches <= trials_max


@pytest.mark.parametrize("name", ["lenet5", "gpt2_block"])
def test_outputs_do_not_depend_on_the_thread_count(name):
    model, inputs = get_model(name, batch=2)
    graph = kiln.compile(model, inputs, backend="reference").graph
    prog = compile_graph(graph)
    x = [t.numpy() for t in inputs]
    results = []
    for n in (1, 2, 3):
        prog.threads(n, adaptive=False)
        results.append(prog(x)[0])
    prog.threads(0)
    for _ in range(20):
        results.append(prog(x)[0])
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def _hammer(fn, inputs, callers: int, calls: int) -> list:
    import threading

    results: list = []
    errors: list = []

    def work():
        try:
            for _ in range(calls):
                results.append(fn(*inputs))
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_concurrent_calls_are_bit_identical(tmp_path):
    """8 Python threads x 200 calls on one compiled ResNet-18 (CIFAR), then on its exported
    artifact: every result equals a single-threaded call bit for bit (each call has its own
    arena and argument arrays)."""
    model, inputs = get_model("resnet18_cifar")
    compiled = kiln.compile(model, inputs)
    with torch.no_grad():
        want = compiled(*inputs).numpy()
    for out in _hammer(compiled, inputs, 8, 200):
        np.testing.assert_array_equal(out.numpy(), want)
    loaded = kiln.load(kiln.export(compiled, tmp_path / "r.kiln"))
    x = [t.numpy() for t in inputs]
    for out in _hammer(loaded, x, 8, 200):
        np.testing.assert_array_equal(out, want)


_FORKED: dict = {}  # what forked pool workers inherit


def _run_forked(x):
    return _FORKED["program"](x)[0]


@pytest.mark.parametrize("start", ["fork", "os.fork"])
def test_calls_in_a_forked_child_finish_and_agree(start):
    """After the parent has run the model on its thread pool, fork()ed children (as
    multiprocessing's fork start method, gunicorn's preload or DataLoader workers make)
    still get the right answers instead of hanging on libgomp's missing pool."""
    import multiprocessing
    import os

    model, inputs = get_model("resnet18_cifar")
    compiled = kiln.compile(model, inputs, threads=2)
    compiled.executable.program.threads(2, adaptive=False)
    x = [t.numpy() for t in inputs]
    want = compiled.executable.program(x)[0]
    if start == "fork":
        _FORKED["program"] = compiled.executable.program
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as pool:  # a hang fails the test after 120 s
            outs = pool.map_async(_run_forked, [x] * 4, chunksize=1).get(timeout=120)
        for out in outs:
            np.testing.assert_array_equal(out, want)
        return
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, never return into pytest
        code = 1
        try:
            got = compiled.executable.program(x)[0]
            os.write(write, b"ok" if np.array_equal(got, want) else b"wrong")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    import time

    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.05)
    assert os.read(read, 16) == b"ok" and done[1] == 0


@pytest.mark.parametrize("bad", [-1, 2 ** 31, 2 ** 40, 1.5, "4", True])
def test_bad_thread_counts_are_refused(bad):
    model, inputs = get_model("mlp")
    program = kiln.compile(model, inputs).executable.program
    with pytest.raises(kiln.KilnError, match="threads must be an integer"):
        program.threads(bad)
    with pytest.raises(kiln.KilnError, match="threads"):
        kiln.compile(model, inputs, threads=bad)


def _os_threads() -> int:
    import os

    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="needs /proc")
def test_calls_from_many_threads_share_one_openmp_pool():
    """libgomp grows a worker pool for every thread that starts a parallel region, and once
    the pools outnumber the cores every region waits for the OS to wake its workers (3x
    slower calls from a server's request threads). Multi-threaded calls go to one thread
    that owns the only pool: 4 live calling threads add their own 4 threads, the pool
    thread and its workers, not a pool each."""
    import threading

    from kiln.backends.llvm import compiler

    model, _ = get_model("lenet5")
    x = torch.randn(16, 1, 32, 32)
    compiled = kiln.compile(model, (x,), threads=2)
    compiled.executable.program.threads(2, adaptive=False)
    with torch.no_grad():
        want = compiled(x).numpy()
    compiled(x)   # the pool thread and its pool exist from here on
    before = _os_threads()
    started, finish = threading.Barrier(5), threading.Event()
    outs = []

    def call():
        for _ in range(20):
            outs.append(compiled(x).numpy())
        started.wait()
        finish.wait()

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    grown = _os_threads() - before
    finish.set()
    for t in threads:
        t.join()
    assert grown == 4, f"{grown} threads for 4 callers"
    assert all(np.array_equal(o, want) for o in outs)
    assert compiler._POOL_THREAD._thread is not None


def test_kiln_has_its_own_openmp_runtime_beside_pytorchs():
    """PyTorch ships a libgomp.so.1 of its own; kiln loads the system's by path, so PyTorch's
    intra-op pool and kiln's do not count against one runtime's thread budget."""
    import ctypes

    import llvmlite.binding as llvm

    from kiln.backends.llvm import compiler

    if compiler._gomp_path() is None:
        pytest.skip("no system libgomp: kiln shares the process's")
    compiler._init_llvm()
    ours = ctypes.cast(compiler._GOMP.GOMP_parallel, ctypes.c_void_p).value
    assert llvm.address_of_symbol("GOMP_parallel") == ours
    torch_gomp = [line.split()[-1] for line in open("/proc/self/maps")
                  if "torch" in line and "libgomp" in line]
    if torch_gomp:
        theirs = ctypes.CDLL(torch_gomp[0])
        assert ctypes.cast(theirs.GOMP_parallel, ctypes.c_void_p).value != ours
