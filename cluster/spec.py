"""Cluster specs (shipped by name, or a user's YAML by path) and starting or joining Ray."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

SPEC_DIR = Path(__file__).parent


class ClusterError(ValueError):
    """A cluster spec that cannot be used; the message names the file and field."""


@dataclass
class ClusterSpec:
    name: str
    nodes: int
    cpus_per_node: int
    gpus_per_node: int
    gpu_type: str
    memory_gb_per_node: float
    description: str = ""
    source: str = ""


def shipped_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def _auto(value, measured, key: str, where: str, kind):
    if value == "auto":
        return measured()
    if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
        expected = "number" if isinstance(kind, tuple) else "integer"
        raise ClusterError(f"{where}: {key} expected a non-negative {expected} or 'auto', got {value!r}")
    return value


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _memory_gb() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def load_cluster_spec(name_or_path: str) -> ClusterSpec:
    """A shipped spec by name (`local`, ...) or a YAML spec by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SPEC_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ClusterError(f"unknown cluster {name_or_path!r} (shipped: {', '.join(shipped_specs())}; "
                               "or give the path of a YAML spec)")
    if not path.is_file():
        raise ClusterError(f"{path}: cluster spec not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ClusterError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(data, dict):
        raise ClusterError(f"{path}: expected a mapping")
    known = {"name", "description", "nodes", "cpus_per_node", "gpus_per_node", "gpu_type", "memory_gb_per_node"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ClusterError(f"{path}: unknown key {unknown[0]!r} (expected one of: {', '.join(sorted(known))})")
    missing = sorted(known - {"description"} - set(data))
    if missing:
        raise ClusterError(f"{path}: missing key {missing[0]!r}")
    where = str(path)
    nodes = _auto(data["nodes"], lambda: 1, "nodes", where, int)
    if nodes < 1:
        raise ClusterError(f"{path}: nodes expected >= 1, got {nodes}")
    gpus = _auto(data["gpus_per_node"], _gpu_count, "gpus_per_node", where, int)
    gpu_type = data["gpu_type"]
    if gpu_type == "auto":
        gpu_type = "none" if gpus == 0 else __import__("torch").cuda.get_device_name(0)
    return ClusterSpec(
        name=str(data["name"]), nodes=nodes,
        cpus_per_node=_auto(data["cpus_per_node"], os.cpu_count, "cpus_per_node", where, int),
        gpus_per_node=gpus, gpu_type=str(gpu_type),
        memory_gb_per_node=float(_auto(data["memory_gb_per_node"], _memory_gb, "memory_gb_per_node", where,
                                       (int, float))),
        description=str(data.get("description", "")), source=str(path),
    )


def connect(spec: ClusterSpec, address: str | None = None) -> dict:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), or start a local one for the local spec.

    Returns the cluster's resources. Reuses an already initialised Ray in this process.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        elif spec.name == "local":
            ray.init(num_cpus=spec.cpus_per_node, num_gpus=spec.gpus_per_node, include_dashboard=False,
                     log_to_driver=False)
        else:
            raise ClusterError(f"cluster {spec.name!r} runs on an existing Ray cluster: pass --address or set "
                               "RAY_ADDRESS (use --cluster local on one machine)")
    return ray.cluster_resources()
