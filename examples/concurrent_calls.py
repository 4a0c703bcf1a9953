"""Calls per second of one compiled model called from 1, 2 and 4 Python threads at once.

    python examples/concurrent_calls.py [--models resnet18_cifar bert] [--seconds 2]

Every thread calls the same compiled model (as a web server's request threads would); the
script prints the median of 3 rounds and checks that every result equals a single call's.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

import kiln
from kiln.zoo import ZOO, get_model


def calls_per_second(compiled, arrays, callers: int, seconds: float, want) -> float:
    stop = time.perf_counter() + seconds
    counts, wrong = [0] * callers, []

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            out = compiled(*arrays)
            if not np.array_equal(out, want):
                wrong.append(i)
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if wrong:
        raise SystemExit(f"{len(wrong)} calls gave another result than a single call")
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(ZOO),
                        default=["resnet18_cifar", "bert"])
    parser.add_argument("--callers", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    for name in args.models:
        model, inputs = get_model(name)
        compiled = kiln.compile(model, inputs)
        arrays = [x.numpy() for x in inputs]
        want = compiled(*arrays)
        for _ in range(10):
            compiled(*arrays)
        for callers in args.callers:
            rates = [calls_per_second(compiled, arrays, callers, args.seconds, want)
                     for _ in range(3)]
            print(f"{name:<16} {callers} calling thread(s): {statistics.median(rates):8.0f} "
                  "calls/s", flush=True)


if __name__ == "__main__":
    main()
