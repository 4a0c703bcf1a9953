"""kiln's pass-level debugger, as the ``kiln`` command and from Python.

    kiln.debug.show("resnet18", after="fold_batchnorm")   # IR text after that pass
    kiln.debug.profile("mlp", threads=4)                  # per-kernel rows, slowest first
    kiln.debug.bisect("resnet18_cifar", pipeline="O1")    # first pass that breaks the outputs
    kiln.debug.minify(graph, passes)                      # a small graph the passes still break
    kiln.debug.trace("resnet18_cifar", "/tmp/trace")      # every stage's IR, diff, costs, report
"""

from kiln.debug.bisect import BisectResult, bisect
from kiln.debug.minify import check_failure, minify, write_repro
from kiln.debug.model_arg import load_model
from kiln.debug.profiling import measure_peaks, profile
from kiln.debug.stages import show
from kiln.debug.trace import trace

__all__ = ["BisectResult", "bisect", "check_failure", "load_model", "measure_peaks", "minify",
           "profile", "show", "trace", "write_repro"]
