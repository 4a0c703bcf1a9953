"""The kiln model zoo: small, self-contained model definitions with seeded weights and inputs.

Every factory has the signature ``factory(batch=1, seed=0)`` and returns
``(model.eval(), example_inputs)``. The same seed gives the same weights at any batch size, and
building a model leaves the global RNG untouched. No model downloads anything.
"""

from __future__ import annotations

from collections.abc import Callable

from ._common import ModelAndInputs
from .bert import bert
from .gpt2 import gpt2_block, gpt2_block_manual_mask
from .lenet import lenet5
from .mlp import mlp
from .mobilenet import mobilenetv2
from .resnet import resnet18, resnet18_cifar

ZOO: dict[str, Callable[..., ModelAndInputs]] = {
    "mlp": mlp,
    "lenet5": lenet5,
    "resnet18_cifar": resnet18_cifar,
    "resnet18": resnet18,
    "mobilenetv2": mobilenetv2,
    "bert": bert,
    "gpt2_block": gpt2_block,
    "gpt2_block_manual_mask": gpt2_block_manual_mask,
}


def get_model(name: str, batch: int = 1, seed: int = 0) -> ModelAndInputs:
    """Build zoo model ``name``; returns ``(model, example_inputs)``. Raises KeyError if unknown."""
    try:
        factory = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; choose one of {sorted(ZOO)}") from None
    return factory(batch=batch, seed=seed)


__all__ = ["ZOO", "ModelAndInputs", "get_model"]
