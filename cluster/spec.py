"""Cluster specs (shipped by name, or a user's YAML by path), starting or joining Ray, and checking that the
Ray cluster matches the spec. Memory is in GB (1e9 bytes) throughout, as the planner counts it."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rayalign.config.fields import EXPONENT_FLOAT


SPEC_DIR = Path(__file__).parent
GB = 1e9
NOT_SPECS = ("models", "throughput")  # the planner's model sizes and the estimate's figures


class ClusterError(ValueError):
    """A cluster spec that cannot be used, or a Ray cluster that does not match it; the message says where."""


@dataclass
class ClusterSpec:
    name: str
    nodes: int
    cpus_per_node: int
    gpus_per_node: int
    gpu_type: str
    gpu_memory_gb: float
    memory_gb_per_node: float
    description: str = ""
    source: str = ""
    auto_fields: tuple[str, ...] = ()  # fields given as 'auto': measured where the spec runs, never checked
    slice_of: str = ""  # a study's slice of this cluster (rayalign.cluster.slices): the cluster holds at least it
    node_ids: tuple[str, ...] = ()  # a slice of whole nodes: the Ray node ids its actors are pinned to

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def summary(self) -> str:
        gpus = f"{self.gpus_per_node} x {self.gpu_type} ({self.gpu_memory_gb:g} GB)" if self.gpus_per_node else \
            "no GPUs"
        return f"{self.name}: {self.nodes} x [{gpus}, {self.cpus_per_node} CPUs, {self.memory_gb_per_node:g} GB]"


def gpu_actors_fitting(gpus: float, gpus_free: list[float]) -> int:
    """Actors of `gpus` GPUs (> 0) that GPUs with `gpus_free` (each one's share left) hold, as Ray grants them: a
    fraction below 1 from one GPU (floor(1 / 0.3) = 3 per GPU), else whole ones."""
    if gpus < 1:
        return sum(int(share / gpus + 1e-9) for share in gpus_free)
    return sum(share >= 1 - 1e-9 for share in gpus_free) // math.ceil(gpus - 1e-9)


def actors_fitting(cpus: float, gpus: float, cpus_free: float, gpus_free: list[float]) -> int:
    """Actors of `cpus` CPUs and `gpus` GPUs that a node with `cpus_free` CPUs and `gpus_free` holds."""
    count = int(cpus_free / cpus + 1e-9)
    return min(count, gpu_actors_fitting(gpus, gpus_free)) if gpus else count


def take_gpus(gpus_free: list[float], gpus: float) -> None:
    """Take one actor's `gpus` from a node's `gpus_free` (actors_fitting said it fits), as Ray grants them."""
    if gpus and gpus < 1:
        index = next(i for i, share in enumerate(gpus_free) if share >= gpus - 1e-9)
        gpus_free[index] -= gpus
    elif gpus:
        for index in [i for i, share in enumerate(gpus_free) if share >= 1 - 1e-9][:math.ceil(gpus - 1e-9)]:
            gpus_free[index] = 0.0


def shipped_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml") if p.stem not in NOT_SPECS)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _gpu_memory_gb() -> float:
    import torch

    return round(torch.cuda.get_device_properties(0).total_memory / GB, 1)


RAY_OBJECT_STORE_SHARE = 0.3  # ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION


def _memory_gb() -> float:
    """The memory a local Ray instance started now gives its actors (its `memory` resource, which launch checks):
    what is available, less the object store's share of it."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    return round(available * (1 - RAY_OBJECT_STORE_SHARE) / GB, 1)


# field: (type check, expected, minimum, measure for 'auto'); gpu_type and gpu_memory_gb are measured after gpus
MAX_NODES, MAX_GPU_MEMORY_GB = 100_000, 1024
FIELDS = {
    "nodes": (int, f"an integer from 1 to {MAX_NODES:,}", 1, lambda: 1),
    "cpus_per_node": (int, "an integer >= 1", 1, os.cpu_count),
    "gpus_per_node": (int, "an integer >= 0", 0, _gpu_count),
    "gpu_memory_gb": ((int, float), f"a number of GB from 0 to {MAX_GPU_MEMORY_GB:,} (one GPU's memory)", 0, None),
    "memory_gb_per_node": ((int, float), "a number > 0", 1e-9, _memory_gb),
}


def _number(path: Path, key: str, value):
    kind, expected, minimum, _ = FIELDS[key]
    if float in (kind if isinstance(kind, tuple) else (kind,)) and isinstance(value, str) \
            and EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 8e1 as text, as recipes are read
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < minimum or \
            value > {"nodes": MAX_NODES, "gpu_memory_gb": MAX_GPU_MEMORY_GB}.get(key, math.inf):
        raise ClusterError(f"{path}: {key}: expected {expected} or 'auto', got {value!r}")
    return value


def load_cluster_spec(name_or_path: str) -> ClusterSpec:
    """A shipped spec by name (`local`, `a100x8`, ...) or a YAML spec by path; every field is checked."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SPEC_DIR / f"{name_or_path}.yaml"
        if not path.is_file() or name_or_path in NOT_SPECS:
            raise ClusterError(f"unknown cluster {name_or_path!r} (shipped: {', '.join(shipped_specs())}; "
                               "or give the path of a YAML spec)")
    if not path.is_file():
        raise ClusterError(f"{path}: cluster spec not found")
    from rayalign.config.fields import read_yaml_file

    data = read_yaml_file(path, "cluster spec", ClusterError)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        fields = ", ".join(["name", "description", "gpu_type", *FIELDS])
        raise ClusterError(f"{path}: expected a mapping of spec fields ({fields}), got {got}")
    known = {"name", "description", "gpu_type", *FIELDS}
    unknown = sorted(set(data) - known - {"slice_of", "node_ids"})
    if unknown:
        raise ClusterError(f"{path}: {unknown[0]}: unknown key (expected one of: {', '.join(sorted(known))})")
    missing = sorted(known - {"description"} - set(data))
    if missing:
        raise ClusterError(f"{path}: {missing[0]}: missing key")
    for key in ("name", "description", "gpu_type"):
        if key in data and not (isinstance(data[key], str) and (data[key].strip() or key == "description")):
            raise ClusterError(f"{path}: {key}: expected a non-empty string, got {data[key]!r}")

    values, auto = {}, []
    for key in ("nodes", "cpus_per_node", "gpus_per_node", "memory_gb_per_node"):
        if data[key] == "auto":
            values[key], auto = FIELDS[key][3](), [*auto, key]
        else:
            values[key] = _number(path, key, data[key])
    gpus = values["gpus_per_node"]
    gpu_type, gpu_memory = data["gpu_type"], data["gpu_memory_gb"]
    measured = [key for key in ("gpu_type", "gpu_memory_gb") if data[key] == "auto"]
    if gpus and measured:
        import torch

        if not torch.cuda.is_available():
            raise ClusterError(f"{path}: {measured[0]}: 'auto' reads the GPU of this machine, which has none (CUDA "
                               f"not available); name it for gpus_per_node {gpus:g} (e.g. gpu_type: A100-80GB, "
                               "gpu_memory_gb: 80)")
    if gpu_type == "auto":
        gpu_type, auto = (_gpu_name() if gpus else "none"), [*auto, "gpu_type"]
    if gpu_memory == "auto":
        gpu_memory, auto = (_gpu_memory_gb() if gpus else 0.0), [*auto, "gpu_memory_gb"]
    gpu_memory = _number(path, "gpu_memory_gb", gpu_memory)
    if gpus and "gpus_per_node" not in auto:
        if gpu_type.lower() == "none":
            raise ClusterError(f"{path}: gpu_type: gpus_per_node is {gpus}, so name the GPU (e.g. A100-80GB), got "
                               f"{gpu_type!r}")
        if not gpu_memory:
            raise ClusterError(f"{path}: gpu_memory_gb: gpus_per_node is {gpus}, so give each GPU's memory in GB "
                               "(e.g. 80), got 0")
    if not gpus and "gpus_per_node" not in auto and (gpu_memory or gpu_type.lower() != "none"):
        raise ClusterError(f"{path}: gpus_per_node: 0, but gpu_type {gpu_type!r} / gpu_memory_gb {gpu_memory!r} "
                           "describe GPUs (set gpu_type: none and gpu_memory_gb: 0, or give gpus_per_node)")
    node_ids = data.get("node_ids", [])
    if not (isinstance(node_ids, list) and all(isinstance(n, str) and n.strip() for n in node_ids)) or \
            len(set(node_ids)) != len(node_ids):
        raise ClusterError(f"{path}: node_ids: expected a list of distinct Ray node ids, got {node_ids!r}")
    if node_ids and len(node_ids) != values["nodes"]:
        raise ClusterError(f"{path}: node_ids: {len(node_ids)} node id(s) for nodes: {values['nodes']}; give one id "
                           "per node")
    return ClusterSpec(name=data["name"], gpu_type=gpu_type, gpu_memory_gb=float(gpu_memory),
                       nodes=values["nodes"], cpus_per_node=values["cpus_per_node"], gpus_per_node=gpus,
                       memory_gb_per_node=float(values["memory_gb_per_node"]),
                       description=data.get("description", ""), source=str(path), auto_fields=tuple(auto),
                       slice_of=str(data.get("slice_of", "")), node_ids=tuple(node_ids))


# ---- the running Ray cluster ----

def alive_node_resources() -> list[dict]:
    """Each alive Ray node's resources (CPU, GPU, memory in bytes, accelerator_type:<T>)."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def _worker_nodes(nodes: list[dict]) -> list[dict]:
    """The nodes a spec describes: those with GPUs when any has one (a CPU-only head is left out), else those with
    CPUs (a head started with --num-cpus=0 holds no actors)."""
    return [n for n in nodes if n.get("GPU", 0) > 0] or [n for n in nodes if n.get("CPU", 0) > 0] or nodes


def _accelerator_types(nodes: list[dict]) -> set[str]:
    return {key.split(":", 1)[1] for n in nodes for key in n if key.startswith("accelerator_type:")}


def _gpu_family(name: str) -> str:
    """'A100-80GB', 'NVIDIA A100-SXM4-80GB' and Ray's 'A100' all name the A100 family."""
    return name.replace("NVIDIA", "").strip().split("-")[0].split()[0].upper() if name.strip() else ""


def check_cluster(spec: ClusterSpec, node_resources: list[dict], allow_mismatch: bool = False) -> list[str]:
    """Compare the Ray cluster's nodes (`alive_node_resources()`) with the spec: GPU nodes, GPUs and CPUs per
    node, accelerator type. Raises ClusterError listing the differences unless `allow_mismatch` (then warns).

    Fields the spec gives as 'auto' describe whatever it runs on and are not compared. Returns the differences.
    """
    nodes = _worker_nodes(node_resources)
    kind = "GPU nodes" if spec.gpus_per_node else "nodes"
    found = {"nodes": len(nodes), "gpus_per_node": sorted({int(n.get("GPU", 0)) for n in nodes}),
             "cpus_per_node": min((int(n.get("CPU", 0)) for n in nodes), default=0)}
    mismatches = []
    if spec.slice_of:  # a slice: the cluster holds at least its nodes, each at least its GPUs and CPUs (pinned
        # to nodes: those are checked by id in pin_nodes, whatever the other nodes hold)
        if not spec.node_ids and (found["nodes"] < spec.nodes or min(found["gpus_per_node"], default=0) <
                                  spec.gpus_per_node or found["cpus_per_node"] < spec.cpus_per_node):
            mismatches.append(f"slice {spec.name} ({spec.summary()}) is larger than the cluster")
    elif "nodes" not in spec.auto_fields and found["nodes"] != spec.nodes:
        mismatches.append(f"{spec.nodes} {kind} in the spec, {found['nodes']} in the cluster")
    if not spec.slice_of and "gpus_per_node" not in spec.auto_fields and found["gpus_per_node"] != [spec.gpus_per_node]:
        mismatches.append(f"{spec.gpus_per_node} GPUs per node in the spec, "
                          f"{'/'.join(map(str, found['gpus_per_node']))} in the cluster")
    if not spec.slice_of and "cpus_per_node" not in spec.auto_fields and found["cpus_per_node"] < spec.cpus_per_node:
        mismatches.append(f"{spec.cpus_per_node} CPUs per node in the spec, {found['cpus_per_node']} in the cluster")
    types = _accelerator_types(nodes)
    if spec.gpus_per_node and "gpu_type" not in spec.auto_fields and types and \
            _gpu_family(spec.gpu_type) not in {_gpu_family(t) for t in types}:
        mismatches.append(f"GPU type {spec.gpu_type} in the spec, {', '.join(sorted(types))} in the cluster")
    if mismatches:
        message = (f"the Ray cluster does not match cluster spec {spec.name} ({spec.source}): " + "; ".join(mismatches))
        if not allow_mismatch:
            raise ClusterError(message + " (use the spec of this cluster, or --allow-mismatch to run anyway)")
        print(f"warning: {message}; running anyway (--allow-mismatch)", file=sys.stderr)
    return mismatches


def running_cluster_spec(spec: ClusterSpec, node_resources: list[dict] | None = None) -> ClusterSpec:
    """The spec with its 'auto' fields read from the connected Ray cluster (the local spec joined to a cluster
    describes that cluster); other specs come back as they are."""
    if not spec.auto_fields:
        return spec
    nodes = _worker_nodes(node_resources if node_resources is not None else alive_node_resources())
    gpus = min(int(n.get("GPU", 0)) for n in nodes)
    types = sorted(_accelerator_types(nodes))
    measured = {"nodes": len(nodes), "cpus_per_node": min(int(n.get("CPU", 0)) for n in nodes),
                "gpus_per_node": gpus, "memory_gb_per_node": round(min(n.get("memory", 0) for n in nodes) / GB, 1),
                "gpu_type": types[0] if types else spec.gpu_type if gpus else "none",
                "gpu_memory_gb": spec.gpu_memory_gb if gpus else 0.0}
    return dataclasses.replace(spec, **{key: measured[key] for key in spec.auto_fields})


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """ClusterError when nothing answers at a host:port address: Ray itself retries such an address for ever,
    printing warnings. Other forms (auto, ray://..., an unparsable port) are left to Ray."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"could not join the Ray cluster at {address}: nothing answers there ({e.strerror or e}); "
                           "check the address with `ray status` on the cluster's head node (its GCS address, "
                           "host:6379 by default)") from None


def connect(spec: ClusterSpec, address: str | None = None, allow_mismatch: bool = False) -> dict:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), or start a local one for the local spec, and check
    the cluster against the spec (`check_cluster`).

    Returns the cluster's resources. A Ray already initialised in this process (a notebook, a test harness, an
    earlier call) is taken as it is, unchecked.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        pin_nodes(spec)
        return ray.cluster_resources()
    if not address and spec.name != "local":
        raise ClusterError(f"cluster {spec.name!r} runs on an existing Ray cluster: pass --address or set "
                           "RAY_ADDRESS (use --cluster local on one machine)")
    if address:
        check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a new instance even if another runs here
            ray.init(address="local", num_cpus=spec.cpus_per_node, num_gpus=spec.gpus_per_node,
                     include_dashboard=False, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - Ray's start-up and connection errors, said without its traceback
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        if address:
            raise ClusterError(f"could not join the Ray cluster at {address} ({reason}); check the address with "
                               "`ray status --address ADDRESS` on a node of that cluster") from None
        raise ClusterError(f"could not start a local Ray instance ({reason}); Ray gives its processes a fixed "
                           "time to start, which a busy machine can miss: run the same command again, or start Ray "
                           "once with `ray start --head` and pass --address auto") from None
    stop_on_sigterm()
    check_cluster(spec, alive_node_resources(), allow_mismatch)
    pin_nodes(spec)
    return ray.cluster_resources()


def stop_on_sigterm() -> None:
    """After ray.init, whose handler aborts the driver with a stack dump: SIGTERM (kill, a job scheduler, Ray Jobs'
    stop) stops a run as Ctrl-C does, so its actor groups shut down and the message says that relaunching resumes."""
    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


# ---- a slice's nodes: where this process's actors go ----

_PINNED = {"name": "", "node_ids": ()}


def pinned_nodes() -> tuple[str, tuple[str, ...]]:
    """(slice name, Ray node ids) that every actor and placement group of this process's run is kept on (set by
    `connect` from a slice spec's node_ids); ("", ()) when Ray places them anywhere."""
    return _PINNED["name"], _PINNED["node_ids"]


def check_node_ids(spec: ClusterSpec, nodes: list[dict]) -> None:
    """Every node of the spec's node_ids is alive in `nodes` (`ray.nodes()`) with the spec's GPUs and CPUs per node;
    else ClusterError naming the slice and the node (actors pinned to a node that is gone would wait forever)."""
    alive = {n["NodeID"]: n for n in nodes if n["Alive"]}
    for node_id in spec.node_ids:
        node = alive.get(node_id)
        if node is None:
            raise ClusterError(f"slice {spec.name}: node {node_id} is not alive in the Ray cluster (it left, or Ray "
                               "restarted, since the study picked the slice's nodes); run the study again to pick "
                               "its nodes anew")
        gpus, cpus = node["Resources"].get("GPU", 0), node["Resources"].get("CPU", 0)
        if gpus < spec.gpus_per_node or cpus < spec.cpus_per_node:
            raise ClusterError(f"slice {spec.name}: node {node_id} has {gpus:g} GPU(s) and {cpus:g} CPU(s), fewer "
                               f"than the slice's {spec.gpus_per_node} and {spec.cpus_per_node} per node")


def pin_nodes(spec: ClusterSpec, nodes: list[dict] | None = None) -> None:
    """Keep this process's actors on the spec's node_ids (checked alive first, `check_node_ids`); a spec without
    node_ids lets Ray place them anywhere."""
    if spec.node_ids:
        import ray

        check_node_ids(spec, ray.nodes() if nodes is None else nodes)
    _PINNED.update(name=spec.name if spec.node_ids else "", node_ids=tuple(spec.node_ids))


def check_run_dir_visible(run_dir: Path) -> None:
    """Every alive node that can hold an actor must read what the driver writes into the run directory and write
    there what the driver reads: a probe file each way, by a task pinned to each node. ClusterError names the
    nodes that cannot (a node-local path, a mount missing on a node). One node: nothing to check."""
    import secrets
    import shutil

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if len(nodes) < 2:
        return
    probe_dir = Path(run_dir).resolve() / f".probe-{secrets.token_hex(4)}"
    probe_dir.mkdir(parents=True)
    token = secrets.token_hex(8)
    (probe_dir / "driver").write_text(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def probe(directory: str, node_id: str) -> str | None:
        try:
            if Path(directory, "driver").read_text() != token:
                return "reads another file than the driver wrote"
            Path(directory, node_id).write_text(token)
        except OSError as e:
            return f"{type(e).__name__}: {e.strerror or e}"
        return None

    try:
        refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe_dir), n["NodeID"]) for n in nodes}
        problems = []
        for node in nodes:
            problem = ray.get(refs[node["NodeID"]])
            if problem is None and not (probe_dir / node["NodeID"]).is_file():
                problem = "wrote a probe file that the driver does not see"
            if problem:
                problems.append(f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]}): {problem}")
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if problems:
        raise ClusterError(f"{run_dir}: every node must see the run directory at the same path (a shared file "
                           f"system); " + "; ".join(problems) + ". Put --run-dir on a file system all nodes mount")
