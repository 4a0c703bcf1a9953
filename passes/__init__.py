"""Graph passes, the PassManager with its instruments, and named pipelines.

Importing this package registers every pass by name (see ``all_passes``).
"""

from kiln.passes.base import (
    EXACT,
    LOSSY,
    ErrorBudget,
    Pass,
    PassContext,
    PassResult,
    all_passes,
    get_pass,
    register_pass,
)
from kiln.passes.cse import CommonSubexpressionElimination
from kiln.passes.dce import DeadCodeElimination
from kiln.passes.fold_batchnorm import FoldBatchNorm
from kiln.passes.fold_constants import FoldConstants
from kiln.passes.instruments import DumpIR, NumericCheck, StageDiff, Timing, Verify
from kiln.passes.layout import SinkPermutes
from kiln.passes.manager import Instrument, PassManager
from kiln.passes.pipelines import PIPELINES, get_pipeline, run_pipeline
from kiln.passes.rewrite import ANY_OP, Rewriter, RuleTable, rewrite_graph
from kiln.passes.simplify_algebra import SimplifyAlgebra

__all__ = [
    "ANY_OP", "EXACT", "LOSSY", "PIPELINES", "CommonSubexpressionElimination",
    "DeadCodeElimination", "DumpIR", "ErrorBudget", "FoldBatchNorm", "FoldConstants",
    "Instrument", "NumericCheck", "Pass", "PassContext", "PassManager", "PassResult",
    "Rewriter", "RuleTable", "SimplifyAlgebra", "SinkPermutes",
    "StageDiff", "Timing", "Verify", "all_passes",
    "get_pass", "get_pipeline", "register_pass", "rewrite_graph", "run_pipeline",
]
