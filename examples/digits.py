"""What kiln's compression costs in accuracy on a real task: a small CNN on scikit-learn's digits.

Trains a CNN on the 8x8 handwritten digits bundled with scikit-learn (1797 images, no download),
then compiles it with kiln (llvm backend) plain and compressed, and measures, on the held-out
test set, each variant's accuracy, parameters, constant bytes, FLOPs and latency:

    fp32            kiln.compile, no compression
    pruned          50% of the FLOPs removed by channel pruning, no fine-tuning (the plan
                    closest to 50%: kept channel counts are whole SIMD vectors, so on a model
                    this small the steps are coarse)
    pruned+distill  the same, then distilled against the trained model on the training set
    int8            static int8, activation ranges calibrated on training samples
    low-rank        the big linear layer factorized to at most half its parameters (SVD)
    all             pruning + low-rank + distillation + int8

    python examples/digits.py [--quick] [--json results.json]

Accuracy is measured with a batch-1 compiled model (one call per test image, which is also
the latency of the table). ``--batch N`` adds the latency of a batch-N model compiled with the
same recipe (a separate compilation: its distillation runs again).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import kiln
from kiln.compression.prune import graph_flops
from kiln.ir import Graph

SEED = 0
TEST_SIZE = 360
DENSE_OPS = ("linear", "qlinear")


@dataclass
class Row:
    """One compiled variant and what it measured."""

    name: str
    accuracy: float
    parameters: int
    linear_parameters: int
    kib: float
    flops: int
    ms_batch1: float
    ms_batch: float | None
    compile_s: float


# ---- data and model --------------------------------------------------------------------------
def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 [n, 1, 8, 8] in [0, 1], split into train / test (stratified, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None]
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=TEST_SIZE, random_state=SEED,
                            stratify=labels)


def make_model() -> nn.Sequential:
    """Three conv/BN/ReLU blocks (one max pool) and a two-layer classifier head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def train(x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int = 32,
          lr: float = 2e-3) -> nn.Sequential:
    """A freshly seeded model trained with Adam and cross-entropy; returned in eval mode."""
    torch.manual_seed(SEED)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    order = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=order)
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


# ---- measurements ----------------------------------------------------------------------------
def linear_parameters(graph: Graph) -> int:
    """Elements of the weights of the graph's dense (linear / qlinear) layers."""
    return int(sum(graph.constants[n.inputs[1]].size for n in graph.nodes
                   if n.op in DENSE_OPS and n.inputs[1] in graph.constants))


def constant_kib(graph: Graph) -> float:
    """KiB held in the graph's constants (int8 weights count one byte each)."""
    return sum(a.nbytes for a in graph.constants.values()) / 1024


def accuracy(fn: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent of ``fn`` called on one sample at a time."""
    inputs = torch.from_numpy(x)
    pred = np.array([int(fn(inputs[i:i + 1]).argmax()) for i in range(len(x))])
    return float((pred == y).mean() * 100)


def median_ms(fn: Any, x: torch.Tensor, repeat: int) -> float:
    """Median wall time of ``fn(x)`` in milliseconds, after a few warm-up calls."""
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def recipes(x_train: np.ndarray, y_train: np.ndarray, model: nn.Module,
            distill_epochs: int) -> dict[str, dict[str, Any]]:
    """The compression options of every variant, as keyword arguments of ``kiln.compile``."""
    data, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
    # Only the linear layers are factorized: min_size sits above every conv weight.
    conv_sizes = [m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d)]
    low_rank = {"param_ratio": 0.5, "min_size": max(conv_sizes) + 1}
    distill = {"epochs": distill_epochs, "lr": 1e-3, "progress": False}
    # Batch 1 graphs calibrate on one sample per batch: take every training sample.
    quantize = {"method": "percentile", "max_batches": len(x_train)}
    return {
        "fp32": {},
        "pruned": {"prune": 0.5},
        "pruned+distill": {"prune": 0.5, "distill": distill, "data": data, "labels": labels},
        "int8": {"quantize": quantize, "data": data},
        "low-rank": {"low_rank": low_rank},
        "all": {"prune": 0.5, "low_rank": low_rank, "distill": distill, "quantize": quantize,
                "data": data, "labels": labels},
    }


def measure(model: nn.Module, name: str, options: dict[str, Any], x_test: np.ndarray,
            y_test: np.ndarray, batch: int, repeat: int) -> Row:
    """Compile ``model`` with ``options`` at batch 1 (and ``batch`` when > 1) and measure it."""
    t0 = time.perf_counter()
    compiled = kiln.compile(model, (torch.from_numpy(x_test[:1]),), threads=1, **options)
    compile_s = time.perf_counter() - t0
    graph = compiled.graph
    acc = accuracy(compiled, x_test, y_test)
    ms1 = median_ms(compiled, torch.from_numpy(x_test[:1]), repeat)
    ms_batch = None
    if batch > 1:
        xb = torch.from_numpy(x_test[:batch])
        batched = kiln.compile(model, (xb,), threads=1, **options)
        ms_batch = median_ms(batched, xb, repeat)
    return Row(name, acc, graph.num_parameters(), linear_parameters(graph), constant_kib(graph),
               graph_flops(graph), ms1, ms_batch, compile_s)


# ---- report ----------------------------------------------------------------------------------
def markdown_table(rows: Sequence[Row], batch: int) -> str:
    """The rows as a Markdown table, accuracy also as a difference to the fp32 row."""
    base = rows[0].accuracy
    head = ["model", "test acc %", "vs fp32", "params", "linear params", "KiB", "MFLOPs",
            "ms (batch 1)"]
    if batch > 1:
        head.append(f"ms (batch {batch})")
    head.append("compile s")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r.name, f"{r.accuracy:.2f}", f"{r.accuracy - base:+.2f}", f"{r.parameters:,}",
                 f"{r.linear_parameters:,}", f"{r.kib:.1f}", f"{r.flops / 1e6:.3f}",
                 f"{r.ms_batch1:.3f}"]
        if batch > 1:
            cells.append(f"{r.ms_batch:.3f}")
        cells.append(f"{r.compile_s:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns what ``--json`` writes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer training and distillation epochs, fewer timing repeats")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 8)")
    parser.add_argument("--distill-epochs", type=int, default=None,
                        help="distillation epochs (default 5)")
    parser.add_argument("--batch", type=int, default=None,
                        help="also time a model compiled at this batch size (0: off; "
                             "default 32, off with --quick)")
    parser.add_argument("--repeat", type=int, default=None, help="timing repeats")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    epochs = args.epochs or (5 if args.quick else 8)
    distill_epochs = args.distill_epochs or (2 if args.quick else 5)
    batch = args.batch if args.batch is not None else (0 if args.quick else 32)
    repeat = args.repeat or (20 if args.quick else 200)

    # One thread: the model is tiny, training and timing are deterministic and do not fight
    # other processes for cores. The caller's setting comes back afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(args.quick, epochs, distill_epochs, batch, repeat)
    finally:
        torch.set_num_threads(threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def run(quick: bool, epochs: int, distill_epochs: int, batch: int, repeat: int
        ) -> dict[str, Any]:
    """Train, compile every variant, print the table; the results as a JSON-ready dict."""
    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data()
    t0 = time.perf_counter()
    model = train(x_train, y_train, epochs)
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        eager_acc = accuracy(model, x_test, y_test)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images; trained {epochs} epochs "
          f"in {train_s:.1f} s, eager test accuracy {eager_acc:.2f}%")

    rows = []
    for name, options in recipes(x_train, y_train, model, distill_epochs).items():
        rows.append(measure(model, name, options, x_test, y_test, batch, repeat))
        print(f"  {name:<15} {rows[-1].accuracy:6.2f}%", flush=True)
    table = markdown_table(rows, batch)
    total_s = time.perf_counter() - start
    print()
    print(table)
    print(f"\nllvm backend, 1 thread; latency: median of {repeat} calls; total {total_s:.1f} s")

    return {
        "config": {"quick": quick, "epochs": epochs, "distill_epochs": distill_epochs,
                   "batch": batch, "repeat": repeat, "seed": SEED,
                   "train": len(x_train), "test": len(x_test)},
        "eager_accuracy": eager_acc,
        "train_seconds": train_s,
        "total_seconds": total_s,
        "rows": [asdict(r) for r in rows],
        "table": table,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
