"""kiln: a compiler that makes trained PyTorch models fast and small for inference.

    compiled = kiln.compile(model.eval(), (example_input,))
    y = compiled(x)

or ``torch.compile(model, backend="kiln")``.
"""

from kiln.frontend.api import CompiledModel, compile, optimize
from kiln.ir import KilnError

__version__ = "0.1.0"

__all__ = ["CompiledModel", "KilnError", "compile", "optimize", "__version__"]
