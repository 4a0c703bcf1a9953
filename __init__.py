"""kiln: a compiler that makes trained PyTorch models fast and small for inference.

    compiled = kiln.compile(model.eval(), (example_input,))
    y = compiled(x)
    kiln.export(compiled, "model.kiln")       # later, without PyTorch: kiln.load("model.kiln")

or ``torch.compile(model, backend="kiln")``.

The PyTorch-facing API is imported on first use, so ``kiln.load`` works where PyTorch is not
installed.
"""

from kiln.ir import InternalError, KilnError

__version__ = "0.1.0"

_LAZY = {
    "CompiledModel": "kiln.api",
    "compile": "kiln.api",
    "compress": "kiln.api",
    "optimize": "kiln.api",
    "export": "kiln.api",
    "load": "kiln.runtime.artifact",
    "pipeline": "kiln.distributed.pipeline",
    "search": "kiln.compression.search",
}

__all__ = ["InternalError", "KilnError", "MissingDependencyError", "__version__", *_LAZY]


class MissingDependencyError(KilnError, ImportError):
    """A part of kiln's API was used whose dependency (PyTorch) is not installed; an
    ImportError too, so ``from kiln import compile`` fails the way imports fail."""


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as e:
            if (e.name or "").partition(".")[0] != "torch":
                raise
            raise MissingDependencyError(
                f"kiln.{name} needs PyTorch, which is not installed",
                hint="pip install torch; kiln.load runs exported artifacts without it") from e
        return getattr(module, name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
