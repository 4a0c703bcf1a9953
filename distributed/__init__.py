"""Distributed inference on Ray: a model split into pipeline stages (``kiln.pipeline``),
replicas behind one callable, measured per-node times for balancing the stages
(``profile_nodes``), and a simulator for clusters larger than this machine (``simulate``,
calibrated by ``calibrate``)."""

from kiln.distributed.pipeline import Pipeline, pipeline
from kiln.distributed.profile import NodeProfile, profile_nodes
from kiln.distributed.simulate import Calibration, Plan, Simulation, calibrate, simulate

__all__ = ["Calibration", "NodeProfile", "Pipeline", "Plan", "Simulation", "calibrate",
           "pipeline", "profile_nodes", "simulate"]
