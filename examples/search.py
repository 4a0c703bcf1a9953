"""kiln.search on a real task: the digits CNN of examples/digits.py, compressed under a 1-point
accuracy budget, as fast as the search can make it on this machine.

    python examples/search.py [--budget 600] [--method bayes] [--report search.html]
    kiln search kiln/examples/search.py:digits_cnn --data digits --budget 600 -o search.html

``digits_cnn`` is also a MODEL factory for ``kiln search``: it returns the trained CNN and a
batch-1 example input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from kiln.examples import digits


def digits_cnn(batch: int = 1, seed: int = 0, epochs: int = 8
               ) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The digits CNN trained ``epochs`` epochs on the training split (seeded; ``seed`` picks
    the example input), and an example input of ``batch`` images."""
    x_train, x_test, y_train, _ = digits.load_data()
    model = digits.train(x_train, y_train, epochs)
    start = seed % (len(x_test) - batch + 1)
    return model, (torch.from_numpy(x_test[start:start + batch]),)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the CNN, search, print the trials and the best config; returns the summary."""
    from kiln.compression.search import accuracy_metric, search

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--method", default="bayes", choices=("bayes", "grid", "genetic"))
    parser.add_argument("--objective", default="latency", choices=("latency", "size", "flops"))
    parser.add_argument("--max-drop", type=float, default=0.01,
                        help="accuracy drop allowed, as a fraction (default 0.01)")
    parser.add_argument("--storage", default=None, help="optuna storage (sqlite:///x.db)")
    parser.add_argument("--report", default=None, help="write the HTML report here")
    parser.add_argument("--json", default=None, help="write the summary here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = digits.load_data()
    model, inputs = digits_cnn()
    result = search(model, inputs, data=torch.from_numpy(x_train),
                    labels=torch.from_numpy(y_train), metric=accuracy_metric(x_test, y_test),
                    max_drop=args.max_drop, budget_s=args.budget, objective=args.objective,
                    method=args.method, storage=args.storage,
                    study_name="digits_cnn" if args.storage else None,
                    options={"threads": 1, "quantize": {"max_batches": 256}})
    print(result.table())
    if args.report:
        print("report:", result.report(args.report))
    best = result.best_trial
    summary = {
        "baseline": vars(result.baseline),
        "trials": len(result.trials),
        "elapsed_s": result.elapsed_s,
        "best": {"trial": best.number, "accuracy": best.score, "speedup": best.speedup,
                 "kib": best.size_bytes / 1024, "mflops": best.flops / 1e6},
        "best_config": result.best_config,
        "pareto": [{"trial": r.number, "accuracy": r.score, "speedup": r.speedup,
                    "kib": r.size_bytes / 1024} for r in result.pareto],
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
