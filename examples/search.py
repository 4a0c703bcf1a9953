"""kiln.search on a real task: the digits CNN of examples/digits.py (or, with --task signals, a
1-D CNN on synthetic signals), compressed under a 1-point accuracy budget, as fast as the
search can make it on this machine.

    python examples/search.py [--task signals] [--budget 600] [--method bayes] [--report x.html]
    kiln search kiln/examples/search.py:digits_cnn --data digits --budget 600 -o search.html

``digits_cnn`` is also a MODEL factory for ``kiln search``: it returns the trained CNN and a
batch-1 example input.
"""

from __future__ import annotations

import argparse
import json
import math
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


# ---- a harder task: 1-D signals ----------------------------------------------------------------
SIGNAL_CLASSES, SIGNAL_CHANNELS, SIGNAL_LENGTH = 10, 3, 128


def signal_data(seed: int = 0, train: int = 3000, test: int = 600
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic 3-channel signals of 128 steps in 10 classes (generated, nothing downloaded):
    class c is a chirp whose start frequency and sweep come from c, with a random phase and
    amplitude per channel, a random delay, one channel carrying a class-dependent harmonic, and
    noise; neighbouring classes overlap, so a small 1-D CNN reaches about 98%, not 100%."""
    g = torch.Generator().manual_seed(seed)
    n = train + test
    labels = torch.randint(0, SIGNAL_CLASSES, (n,), generator=g)
    t = torch.arange(SIGNAL_LENGTH, dtype=torch.float32) / SIGNAL_LENGTH
    f0 = 3.0 + 1.1 * labels.float() + 0.25 * torch.randn(n, generator=g)
    sweep = 2.0 * (labels % 3).float() + 0.5 * torch.randn(n, generator=g)
    delay = 0.15 * torch.rand(n, generator=g)
    tt = (t[None] - delay[:, None]).clamp(min=0)
    phase = 2 * torch.pi * (f0[:, None] * tt + 0.5 * sweep[:, None] * tt ** 2)
    x = torch.empty(n, SIGNAL_CHANNELS, SIGNAL_LENGTH)
    for ch in range(SIGNAL_CHANNELS):
        shift = 2 * torch.pi * torch.rand(n, 1, generator=g)
        amp = 0.5 + torch.rand(n, 1, generator=g)
        x[:, ch] = amp * torch.sin(phase * (1 + ch) + shift)
    x[:, 2] += 0.5 * torch.sin(phase * (2 + (labels[:, None] % 2))) * (labels[:, None] > 4)
    x += 0.55 * torch.randn(x.shape, generator=g)
    return x[:train], x[train:], labels[:train], labels[train:]


def signal_cnn_module() -> torch.nn.Module:
    """Four Conv1d / BatchNorm / ReLU blocks, global average pooling, a linear head."""
    nn = torch.nn

    class SignalCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv1d(SIGNAL_CHANNELS, 32, 7, padding=3), nn.BatchNorm1d(32), nn.ReLU(),
                nn.Conv1d(32, 64, 5, stride=2, padding=2), nn.BatchNorm1d(64), nn.ReLU(),
                nn.Conv1d(64, 64, 3, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
                nn.Conv1d(64, 128, 3, stride=2, padding=1), nn.BatchNorm1d(128), nn.ReLU())
            self.head = nn.Linear(128, SIGNAL_CLASSES)

        def forward(self, x):
            return self.head(self.features(x).mean(-1))

    return SignalCNN()


def signal_cnn(batch: int = 1, seed: int = 0, epochs: int = 10
               ) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The 1-D CNN trained ``epochs`` epochs on ``signal_data``'s training split (seeded), and
    an example input of ``batch`` signals."""
    x_train, x_test, y_train, _ = signal_data()
    torch.manual_seed(seed)
    model = signal_cnn_module()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    _train(model, x_train, y_train, epochs, seed, opt)
    return model.eval(), (x_test[:batch],)


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
           opt: torch.optim.Optimizer, sched: Any = None) -> None:
    """``epochs`` epochs of cross-entropy training in shuffled batches of 64 (seeded order),
    stepping ``sched`` after every batch when given."""
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()


SIGNAL_PATCH = 8


def signal_transformer_module(d_model: int = 64, heads: int = 4, d_ffn: int = 128,
                              layers: int = 2) -> torch.nn.Module:
    """A small pre-norm transformer over ``signal_data``: patches of 8 steps x 3 channels
    embedded by a linear layer, learned positions, ``layers`` blocks (attention with separate
    q/k/v projections, a GELU MLP), a final layer norm, mean over the patches, a linear head.
    Its residual stream (``d_model``, shared by the embedding, every block's output
    projections, every norm and the head) is the channel group kiln prunes with
    ``prune={"norms": True}`` (the default)."""
    nn = torch.nn
    patches = SIGNAL_LENGTH // SIGNAL_PATCH

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
            self.v, self.o = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = (f(x).view(b, n, heads, d // heads).transpose(1, 2)
                       for f in (self.q, self.k, self.v))
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), -1)
            return self.o((a @ v).transpose(1, 2).reshape(b, n, d))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(d_model), Attention()
            self.norm2 = nn.LayerNorm(d_model)
            self.mlp = nn.Sequential(nn.Linear(d_model, d_ffn), nn.GELU(),
                                     nn.Linear(d_ffn, d_model))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class SignalTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(SIGNAL_CHANNELS * SIGNAL_PATCH, d_model)
            self.pos = nn.Parameter(0.02 * torch.randn(1, patches, d_model))
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, SIGNAL_CLASSES)

        def forward(self, x):
            b = x.shape[0]
            p = x.view(b, SIGNAL_CHANNELS, patches, SIGNAL_PATCH).permute(0, 2, 1, 3)
            z = self.embed(p.reshape(b, patches, SIGNAL_CHANNELS * SIGNAL_PATCH)) + self.pos
            for block in self.blocks:
                z = block(z)
            return self.head(self.norm(z).mean(1))

    return SignalTransformer()


def signal_transformer(batch: int = 1, seed: int = 0, epochs: int = 40,
                       data: Sequence[torch.Tensor] | None = None
                       ) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """``signal_transformer_module`` trained ``epochs`` epochs (AdamW, one-cycle learning
    rate) on the training split of ``data`` (default ``signal_data()``), seeded, and an
    example input of ``batch`` test signals."""
    x_train, x_test, y_train, _ = data if data is not None else signal_data()
    torch.manual_seed(seed)
    model = signal_transformer_module()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    per_epoch = -(-len(x_train) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * per_epoch)
    _train(model, x_train, y_train, epochs, seed, opt, sched)
    return model.eval(), (x_test[:batch],)


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
    parser.add_argument("--task", default="digits", choices=("digits", "signals"),
                        help="digits: examples/digits.py's CNN; signals: a 1-D CNN on "
                             "synthetic 3-channel signals (harder, about 98%% in fp32)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    if args.task == "digits":
        x_train, x_test, y_train, y_test = (torch.from_numpy(a) for a in digits.load_data())
        model, inputs = digits_cnn()
    else:
        x_train, x_test, y_train, y_test = signal_data()
        model, inputs = signal_cnn()
    result = search(model, inputs, data=x_train, labels=y_train,
                    metric=accuracy_metric(x_test.numpy(), y_test.numpy()),
                    max_drop=args.max_drop, budget_s=args.budget, objective=args.objective,
                    method=args.method, storage=args.storage,
                    study_name=f"{args.task}_cnn" if args.storage else None,
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
