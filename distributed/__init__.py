"""Distributed inference on Ray: a model split into pipeline stages (``kiln.pipeline``), and
replicas behind one callable. See ``kiln.distributed.pipeline``."""

from kiln.distributed.pipeline import Pipeline, pipeline

__all__ = ["Pipeline", "pipeline"]
