"""Helpers shared by the zoo factories: seeded construction and non-trivial norm parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

ModelAndInputs = tuple[nn.Module, tuple[torch.Tensor, ...]]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[torch.Generator]:
    """Seed the global CPU RNG for the block and restore it afterwards.

    Module constructors draw their default initialisation from the global RNG, so building a
    model inside this block is deterministic and leaves the caller's RNG untouched. The yielded
    generator, seeded with the same seed, is for explicit draws (norm parameters, inputs).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm and LayerNorm in ``model`` non-trivial parameters and statistics.

    Freshly built norms are the identity in eval mode (mean 0, var 1, weight 1, bias 0), which
    would let a compiler that folds or fuses them wrongly pass every test.
    """
    for module in model.modules():
        if isinstance(module, _BATCH_NORMS):
            module.running_mean.normal_(0.0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
            module.weight.uniform_(0.5, 1.5, generator=generator)
            module.bias.normal_(0.0, 0.1, generator=generator)
        elif isinstance(module, nn.LayerNorm):
            module.weight.uniform_(0.8, 1.2, generator=generator)
            module.bias.normal_(0.0, 0.05, generator=generator)


@torch.no_grad()
def lecun_normal_init(model: nn.Module, generator: torch.Generator) -> None:
    """Redraw every Conv and Linear weight from N(0, 1/fan_in); biases keep their default init.

    Eval-mode BatchNorm with fixed statistics does not renormalise activations, so the init sets
    the scale: PyTorch's default (variance 1/(3 fan_in)) shrinks them layer by layer to ~0.07 at
    the logits, and He init (2/fan_in) makes ResNet-18 logits ~100. LeCun init keeps every
    activation in the zoo's CNNs between ~0.3 and ~3.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="linear", generator=generator)
