"""Compression that chooses its own settings: ``kiln.search`` (``kiln.compression.search``)
tries pruning, low-rank, per-layer int8 and distillation settings with optuna, keeps the
accuracy drop under a budget and minimizes latency, size or FLOPs.

(The package is ``compression``, not ``compress``: a subpackage named ``compress`` would be
bound to the attribute ``kiln.compress`` when imported, hiding the function of that name.)
"""
