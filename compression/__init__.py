"""Compression that chooses its own settings: ``kiln.search`` (``kiln.compression.search``)
tries pruning, low-rank, per-layer int8 and distillation settings with optuna, keeps the
accuracy drop under a budget and minimizes latency, size or FLOPs.

(The package is ``compression``, not ``compress``: a subpackage named ``compress`` would be
bound to the attribute ``kiln.compress`` when imported, hiding the function of that name.)

The folder holds every compression step: pruning analysis and the pruning pass
(``channel_groups``, ``prune_scores``, ``prune``), low-rank factorization (``low_rank``),
calibration and int8 quantization (``calibration``, ``quantize``), distillation (``distill``),
their orchestration behind ``kiln.compress`` (``compress``), and the search. The lossy passes
register themselves with the pass registry when this package is imported.
"""

from kiln.compression import low_rank, prune, quantize  # noqa: E402,F401  (register passes)
