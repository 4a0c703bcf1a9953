"""The MODEL argument of the ``kiln`` tool: a zoo name or ``path/to/file.py:factory``."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kiln.examples.models import ZOO
from kiln.ir import KilnError

SPEC_HELP = ("a zoo model name (" + ", ".join(ZOO) + ") or path/to/file.py:factory, where "
             "factory() returns (module, example_inputs)")


def load_model(spec: str, batch: int | None = None
               ) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], str]:
    """Build the model named by ``spec``; returns ``(module, example_inputs, name)``.

    ``spec`` is a zoo model name (see ``kiln.examples.models.ZOO``) or ``file.py:factory``.
    ``batch`` goes to the zoo factory (default 1); a file factory gets ``batch=batch`` only
    when it is given.

    Raises:
        KilnError: for an unknown zoo name, a missing file or function, or a factory that
            raises or does not return ``(module, example_inputs)``.
    """
    if ":" in spec or spec.endswith(".py"):
        factory, name = _file_factory(spec)
    elif spec in ZOO:
        factory, name = ZOO[spec], spec
        batch = 1 if batch is None else batch
    else:
        raise KilnError(f"unknown model {spec!r}", hint=f"MODEL is {SPEC_HELP}")
    try:
        result = factory() if batch is None else factory(batch=batch)
    except Exception as e:
        raise KilnError(f"model factory {spec!r} raised {type(e).__name__}: {e}",
                        hint="fix the factory so it returns (module, example_inputs)") from e
    module, inputs = _check_result(result, spec)
    return module, inputs, name


def _file_factory(spec: str) -> tuple[Callable[..., Any], str]:
    """Import ``file.py`` of ``file.py:factory`` by path and return the factory function."""
    path_text, _, func_name = spec.rpartition(":")
    if not path_text or not func_name:
        raise KilnError(f"model spec {spec!r} names no factory function",
                        hint="write path/to/file.py:factory")
    path = Path(path_text)
    if not path.is_file():
        raise KilnError(f"model file {str(path)!r} does not exist",
                        hint=f"MODEL is {SPEC_HELP}")
    module_name = f"kiln_debug_model_{path.stem}"
    import_spec = importlib.util.spec_from_file_location(module_name, path)
    if import_spec is None or import_spec.loader is None:
        raise KilnError(f"cannot import {str(path)!r} as Python", hint="give a .py file")
    module = importlib.util.module_from_spec(import_spec)
    # Registered before running so dataclasses and pickling inside the file can find it.
    sys.modules[module_name] = module
    try:
        import_spec.loader.exec_module(module)
    except Exception as e:
        raise KilnError(f"importing {str(path)!r} raised {type(e).__name__}: {e}",
                        hint="fix the error in the model file") from e
    factory = getattr(module, func_name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        raise KilnError(f"{str(path)!r} has no function {func_name!r}",
                        hint=f"functions defined there: {', '.join(found) or 'none'}")
    return factory, f"{path.stem}:{func_name}"


def _check_result(result: Any, spec: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Validate a factory's ``(module, example_inputs)``; a single tensor becomes a 1-tuple."""
    hint = "the factory must return (torch.nn.Module, tensor or tuple of tensors)"
    if not (isinstance(result, tuple) and len(result) == 2):
        raise KilnError(f"model factory {spec!r} returned {type(result).__name__}, "
                        "not a (module, example_inputs) pair", hint=hint)
    module, inputs = result
    if not isinstance(module, torch.nn.Module):
        raise KilnError(f"model factory {spec!r} returned a {type(module).__name__} "
                        "instead of a torch.nn.Module", hint=hint)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not (isinstance(inputs, (tuple, list)) and inputs
            and all(isinstance(x, torch.Tensor) for x in inputs)):
        raise KilnError(f"model factory {spec!r} returned example inputs that are not "
                        "tensors", hint=hint)
    return module, tuple(inputs)
