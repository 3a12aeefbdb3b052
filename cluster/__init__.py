"""Cluster specs, connecting to Ray, and the placement planner (installed as rayalign.cluster)."""

from rayalign.cluster.planner import ModelInfo, Plan, PlanError, model_info, plan, save_plan
from rayalign.cluster.spec import ClusterError, ClusterSpec, check_cluster, connect, load_cluster_spec

__all__ = ["ClusterError", "ClusterSpec", "ModelInfo", "Plan", "PlanError", "check_cluster", "connect",
           "load_cluster_spec", "model_info", "plan", "save_plan"]
