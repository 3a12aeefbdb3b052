"""Slices of a cluster for runs side by side (`rayalign study` with parallel: N): N equal parts that fit at once,
whole nodes when the cluster has at least N nodes, else equal shares of every node. Each run is planned on its
slice (its auto counts fill the slice, not the cluster), so the N runs' actors fit the cluster together. Slices of
whole nodes are pinned to concrete Ray nodes (`pin_slices`: their node_ids, which keep every actor of the run on
them); shares of every node are budgets, and Ray places their actors wherever the resources are free."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from rayalign.cluster.spec import ClusterError, ClusterSpec


def slice_cluster(spec: ClusterSpec, parallel: int) -> list[ClusterSpec]:
    """`parallel` equal slices of `spec`; ClusterError when it cannot be cut so (say 3 runs on 2 nodes)."""
    if parallel <= 1:
        return [spec]
    if spec.nodes >= parallel:
        nodes, share = spec.nodes // parallel, 1
        how = f"{nodes} of {spec.nodes} node(s)"
    else:
        if parallel % spec.nodes:
            raise ClusterError(f"parallel {parallel} on {spec.name} ({spec.nodes} node(s)): runs get whole nodes, or "
                               f"equal shares of every node, so parallel must be at most {spec.nodes} or a multiple "
                               "of it")
        nodes, share = 1, parallel // spec.nodes
    gpus, cpus = spec.gpus_per_node // share, spec.cpus_per_node // share
    if share > 1:
        how = (f"1/{share} of a node" if gpus * share == spec.gpus_per_node and cpus * share == spec.cpus_per_node
               else f"{gpus} of {spec.gpus_per_node} GPUs and {cpus} of {spec.cpus_per_node} CPUs of a node")
    if spec.gpus_per_node and not gpus:
        raise ClusterError(f"parallel {parallel} on {spec.name}: {share} runs per node leave no whole GPU to each of "
                           f"its {spec.gpus_per_node} GPU(s); lower parallel to at most "
                           f"{spec.nodes * spec.gpus_per_node}")
    if not cpus:
        raise ClusterError(f"parallel {parallel} on {spec.name}: {share} runs per node leave no whole CPU to each of "
                           f"its {spec.cpus_per_node} CPU(s); lower parallel")
    return [dataclasses.replace(spec, name=f"{spec.name}-slice-{i + 1}", nodes=nodes, gpus_per_node=gpus,
                                cpus_per_node=cpus, memory_gb_per_node=round(spec.memory_gb_per_node / share, 3),
                                description=f"slice {i + 1} of {parallel} of {spec.name}: {how}",
                                source="", auto_fields=(), slice_of=spec.name)
            for i in range(parallel)]


def runs_side_by_side(parallel: int, runs: int, spec: ClusterSpec) -> int:
    """The runs of a study of `runs` that go side by side when `parallel` is asked: `parallel` when the study has as
    many (slice_cluster refuses what cannot be cut), else the most of its runs that slice `spec` evenly (12 runs
    asked 16 on 8 nodes: 8)."""
    if parallel <= runs:
        return parallel
    for count in range(runs, 1, -1):
        try:
            slice_cluster(spec, count)
            return count
        except ClusterError:
            continue
    return 1


def _node_order(node: dict) -> tuple:
    """Nodes by address (numerically for IPs), then id: the same nodes go to the same slices on every call."""
    import ipaddress

    address = node.get("NodeManagerAddress", "")
    try:
        key = (0, int(ipaddress.ip_address(address)), "")
    except ValueError:
        key = (1, 0, address)
    return (*key, node["NodeID"])


def pin_slices(spec: ClusterSpec, slices: list[ClusterSpec], nodes: list[dict]) -> list[ClusterSpec]:
    """The slices with the Ray node ids each gets (node_ids), when they are slices of whole nodes: the alive nodes of
    `nodes` (`ray.nodes()`) that hold a slice's GPUs and CPUs per node, in a fixed order (address, then id), taken
    in turn. Shares of every node (more runs than nodes) come back unpinned. ClusterError when fewer such nodes are
    alive than the slices need."""
    if len(slices) <= 1 or spec.nodes < len(slices):
        return slices
    first = slices[0]
    fit = sorted((n for n in nodes if n["Alive"] and n["Resources"].get("GPU", 0) >= first.gpus_per_node
                  and n["Resources"].get("CPU", 0) >= first.cpus_per_node), key=_node_order)
    need = first.nodes * len(slices)
    if len(fit) < need:
        raise ClusterError(f"{len(slices)} slices of {first.nodes} whole node(s) need {need} alive node(s) with at "
                           f"least {first.gpus_per_node} GPU(s) and {first.cpus_per_node} CPU(s) each; the Ray cluster "
                           f"has {len(fit)} (lower parallel, or use the spec of this cluster)")
    return [dataclasses.replace(s, node_ids=tuple(n["NodeID"] for n in fit[i * s.nodes:(i + 1) * s.nodes]))
            for i, s in enumerate(slices)]


def slices_text(spec: ClusterSpec, slices: list[ClusterSpec]) -> str:
    """One line per slice (with the nodes it is pinned to), and what the cluster leaves unused."""
    lines = [f"{len(slices)} run(s) side by side on {spec.summary()}, each on its own slice:"]
    lines += [f"  {s.description}: {s.summary().split(': ', 1)[1]}"
              + (f", pinned to node(s) {', '.join(n[:12] for n in s.node_ids)}" if s.node_ids else "")
              for s in slices]
    first = slices[0]
    if spec.nodes >= len(slices):
        idle_nodes = spec.nodes - first.nodes * len(slices)
        if idle_nodes > 0:
            lines.append(f"  {idle_nodes} node(s) unused (nodes do not divide into {len(slices)} equal slices)")
        return "\n".join(lines)
    share = len(slices) // spec.nodes
    idle = [f"{n} {unit}" for n, unit in ((spec.gpus_per_node - first.gpus_per_node * share, "GPU(s)"),
                                          (spec.cpus_per_node - first.cpus_per_node * share, "CPU(s)")) if n]
    if idle:
        lines.append(f"  {' and '.join(idle)} of every node unused (they do not divide into {share} equal shares)")
    return "\n".join(lines)


def write_slice_spec(slice_spec: ClusterSpec, path: Path) -> Path:
    """The slice as a cluster spec file, for `rayalign launch --cluster PATH`."""
    data = {"name": slice_spec.name, "description": slice_spec.description, "slice_of": slice_spec.slice_of,
            "nodes": slice_spec.nodes, "cpus_per_node": slice_spec.cpus_per_node,
            "gpus_per_node": slice_spec.gpus_per_node, "gpu_type": slice_spec.gpu_type,
            "gpu_memory_gb": slice_spec.gpu_memory_gb, "memory_gb_per_node": slice_spec.memory_gb_per_node,
            **({"node_ids": list(slice_spec.node_ids)} if slice_spec.node_ids else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def plan_side_by_side(configs: dict, spec: ClusterSpec, parallel: int) -> tuple[list[ClusterSpec], dict]:
    """(slices, plan of each run on a slice) for `parallel` runs at once; ClusterError when the cluster cannot be
    sliced so, PlanError naming the run that does not fit its slice."""
    from rayalign.cluster.planner import PlanError, plan

    slices = slice_cluster(spec, parallel)
    plans = {}
    for name, cfg in configs.items():
        try:
            plans[name] = plan(cfg, slices[0], strict=True)
        except PlanError as e:
            where = f"its slice ({slices[0].description}: {slices[0].summary().split(': ', 1)[1]})" \
                if parallel > 1 else f"cluster {spec.name}"
            raise PlanError(f"run {name} does not fit {where}: {e.reason}",
                            (e.suggestion + "; or " if e.suggestion else "") +
                            ("lower parallel" if parallel > 1 else "")) from None
    return slices, plans


def slice_table(slices: list[ClusterSpec], plans: dict):
    """A rich table: per run, its actors per phase on its slice (or on the whole cluster with one slice)."""
    from rich.markup import escape
    from rich.table import Table

    shape = slices[0].summary().split(": ", 1)[1]
    title = escape(f"each run on a slice: {shape}" if len(slices) > 1 else f"each run on {slices[0].summary()}")
    table = Table("run", "generate", "score", "train", title=title)
    for name, run_plan in plans.items():
        cells = []
        for phase in ("generate", "score", "train"):
            p = run_plan.phase(phase)
            used = p.actors * (p.gpus_per_actor if p.device == "gpu" else p.cpus_per_actor) if p else 0
            unit = "GPUs" if p and p.device == "gpu" else "CPUs"
            cells.append(f"{p.actors} x {p.role} ({used:g} {unit})" if p else "-")
        table.add_row(name, *cells)
    return table
