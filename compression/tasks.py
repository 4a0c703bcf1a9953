"""Data for ``kiln search MODEL``: a validation task for a model that brings none.

- ``synthetic_task``: seeded random inputs shaped like the model's (token ids within its
  embedding tables), labelled by the float32 model's own top-1 class; the metric is the
  agreement of a candidate's top-1 with it (1.0 for the model itself). It ranks candidates by
  how much they change the model, not by real accuracy.
- ``digits_task``: scikit-learn's 8x8 handwritten digits (bundled, no download) for a model
  whose input holds 64 values per sample (the zoo ``mlp``, or a CNN of ``[1, 8, 8]`` images);
  the model can be trained on it first (zoo weights are random).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from kiln.compression.search import accuracy_metric
from kiln.ir import KilnError

DIGITS_FEATURES = 64


@dataclass
class Task:
    """What ``kiln.search`` needs besides the model: ``data`` and ``labels`` for calibration
    and distillation, and the validation ``metric``."""

    data: Any
    labels: Any
    metric: Callable[[Any], float]
    description: str


def _top1(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        out = pytree.tree_leaves(model(*batch))[0]
    return out.reshape(-1, out.shape[-1]).argmax(-1)


def synthetic_task(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
                   samples: int = 256, seed: int = 0) -> Task:
    """``samples`` seeded random batches for calibration and distillation and as many again
    for validation, labelled by ``model``'s top-1 class."""
    from kiln.debug.model_arg import random_inputs
    from kiln.frontend.trace import trace_module

    graph, _ = trace_module(model, example_inputs, "fx")

    def batches(first: int) -> list[tuple[torch.Tensor, ...]]:
        return [tuple(torch.from_numpy(a) for a in random_inputs(graph, seed=first + i))
                for i in range(samples)]

    train, valid = batches(seed * 2 * samples), batches(seed * 2 * samples + samples)
    train_labels = [_top1(model, b) for b in train]
    valid_labels = [_top1(model, b).numpy() for b in valid]
    return Task(train, train_labels, accuracy_metric(valid, valid_labels),
                f"synthetic: {samples} random batches, metric = top-1 agreement with fp32")


def load_digits(seed: int = 0, test_size: int = 360
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 ``[n, 64]`` in [0, 1]: ``x_train, x_test, y_train, y_test``
    (stratified, seeded)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise KilnError("the digits data needs scikit-learn", hint="pip install scikit-learn, "
                        "or use --data synthetic") from e
    digits = sk_digits()
    x = (digits.data.astype(np.float32) / 16.0)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
          seed: int = 0, batch_size: int = 32, lr: float = 2e-3) -> torch.nn.Module:
    """``model`` trained in place with Adam and cross-entropy; returned in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def digits_task(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
                train_epochs: int = 0, seed: int = 0) -> Task:
    """The digits, reshaped to ``model``'s sample shape; ``model`` is first trained
    ``train_epochs`` epochs on the training split (in place). The metric is top-1 accuracy
    (a fraction) on the 360 held-out images."""
    if len(example_inputs) != 1 or example_inputs[0][0].numel() != DIGITS_FEATURES:
        shapes = [list(x.shape) for x in example_inputs]
        raise KilnError(f"the digits task needs one input of {DIGITS_FEATURES} values per "
                        f"sample; this model takes {shapes}",
                        hint="use --data synthetic, or a model of [n, 64] or [n, 1, 8, 8] "
                             "inputs (the zoo mlp, kiln/examples/search.py:digits_cnn)")
    sample_shape = example_inputs[0].shape[1:]
    x_train, x_test, y_train, y_test = load_digits(seed)
    x_tr = torch.from_numpy(x_train).reshape(-1, *sample_shape)
    x_te = torch.from_numpy(x_test).reshape(-1, *sample_shape)
    y_tr = torch.from_numpy(y_train)
    if train_epochs > 0:
        train(model, x_tr, y_tr, train_epochs, seed)
    return Task(x_tr, y_tr, accuracy_metric(x_te, y_test),
                f"digits: {len(x_tr)} train / {len(x_te)} test images, metric = top-1 accuracy")


def run_command(args: Any) -> int:
    """``kiln search MODEL``: load MODEL, build its task (``args.data``), search, print the
    trials and the best configuration, write the HTML report (``args.report``). Returns 0, or
    raises the KilnError of a search that found no candidate within the budget (after the
    report is written)."""
    from kiln.compression.search import search
    from kiln.debug.model_arg import load_model

    model, inputs, name = load_model(args.model)
    if args.data == "digits":
        task = digits_task(model, inputs, args.train_epochs, args.seed)
    else:
        task = synthetic_task(model, inputs, args.samples, args.seed)
    print(f"{name}: {task.description}")
    options: dict[str, Any] = {"threads": args.threads}
    if args.prune_multiple is not None:
        options["prune"] = {"multiple": args.prune_multiple}
    result = search(model, inputs, data=task.data, labels=task.labels, metric=task.metric,
                    max_drop=args.max_drop, budget_s=args.budget, objective=args.objective,
                    method=args.method, seed=args.seed, storage=args.storage,
                    study_name=args.study_name, n_trials=args.trials, options=options,
                    progress=not args.quiet)
    b = result.baseline
    print(f"fp32: score {b.score:.4f}, {b.latency_ms:.4f} ms, {b.size_bytes / 1024:.1f} KiB, "
          f"{b.flops / 1e6:.3f} MFLOPs; {len(result.trials)} trials in "
          f"{result.elapsed_s:.0f} s")
    print(result.table())
    if args.report:
        print(f"report: {result.report(args.report)}")
    best = result.best_trial
    print(f"best: trial {best.number}, score {best.score:.4f}, speedup "
          f"{best.speedup:.2f}x, {best.size_bytes / 1024:.1f} KiB, "
          f"{best.flops / 1e6:.3f} MFLOPs")
    print("best_config:", json.dumps(result.best_config))
    return 0
