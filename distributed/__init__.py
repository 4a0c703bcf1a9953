"""Distributed inference on Ray: a model split into pipeline stages (``kiln.pipeline``),
replicas behind one callable, and a simulator for clusters larger than this machine
(``simulate``, calibrated by ``calibrate``)."""

from kiln.distributed.pipeline import Pipeline, pipeline
from kiln.distributed.simulate import Calibration, Plan, Simulation, calibrate, simulate

__all__ = ["Calibration", "Pipeline", "Plan", "Simulation", "calibrate", "pipeline", "simulate"]
