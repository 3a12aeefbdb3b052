"""Cluster specs and connecting to Ray (installed as rayalign.cluster)."""

from rayalign.cluster.spec import ClusterSpec, connect, load_cluster_spec

__all__ = ["ClusterSpec", "connect", "load_cluster_spec"]
