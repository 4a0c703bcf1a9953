"""kiln's pass-level debugger, as the ``kiln`` command and from Python.

    kiln.debug.show("resnet18", after="fold_batchnorm")   # IR text after that pass
    kiln.debug.profile("mlp", threads=4)                  # per-kernel rows, slowest first
"""

from kiln.debug.model_arg import load_model
from kiln.debug.profiling import measure_peaks, profile
from kiln.debug.stages import show

__all__ = ["load_model", "measure_peaks", "profile", "show"]
