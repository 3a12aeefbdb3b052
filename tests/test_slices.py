"""Studies with parallel: N on a cluster: each run on its own slice, planned so the N runs fit side by side."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from rayalign.cli import main
from rayalign.cluster import ClusterError, PlanError, check_cluster, load_cluster_spec
from rayalign.cluster.slices import pin_slices, plan_side_by_side, slice_cluster, slices_text, write_slice_spec
from rayalign.cluster.spec import check_node_ids
from rayalign.config import load_config

LACOMSA = REPO / "examples" / "lacomsa-llama3-8b.yaml"
SCALING = REPO / "examples" / "scaling-study-llama3-8b.yaml"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_whole_nodes_when_the_cluster_has_as_many_nodes_as_runs():
    spec = load_cluster_spec("a100x64")  # 8 nodes x 8 GPUs, 96 CPUs, 1152 GB
    slices = slice_cluster(spec, 4)
    assert len(slices) == 4
    assert {(s.nodes, s.gpus_per_node, s.cpus_per_node, s.memory_gb_per_node) for s in slices} == {(2, 8, 96, 1152)}
    three = slice_cluster(spec, 3)  # 8 // 3 = 2 nodes each, 2 nodes left over
    assert [s.nodes for s in three] == [2, 2, 2]


def test_equal_shares_of_every_node_when_runs_outnumber_nodes():
    spec = load_cluster_spec("a100x8")  # 1 node x 8 GPUs, 96 CPUs, 1152 GB
    slices = slice_cluster(spec, 4)
    assert {(s.nodes, s.gpus_per_node, s.cpus_per_node, s.memory_gb_per_node) for s in slices} == {(1, 2, 24, 288)}
    with pytest.raises(ClusterError, match="leave no whole GPU to each of its 8 GPU.s.; lower parallel to at most 8"):
        slice_cluster(spec, 16)
    with pytest.raises(ClusterError, match="parallel must be at most 2 or a multiple of it"):
        slice_cluster(load_cluster_spec("h100x16"), 3)  # 2 nodes


def test_auto_counts_fill_each_slice_not_the_cluster():
    runs = {"a": load_config(LACOMSA), "b": load_config(LACOMSA, ["languages=[en,de]"])}
    slices, plans = plan_side_by_side(runs, load_cluster_spec("a100x64"), 8)
    for run_plan in plans.values():  # one node each: 8 engines, 8 scorers, 8 ranks (global batch 16 at 2 a rank)
        assert [p.actors for p in run_plan.phases] == [8, 8, 8]
    assert sum(p.actors for run_plan in plans.values() for p in run_plan.phases if p.phase == "generate") <= 64


def test_a_run_that_does_not_fit_its_slice_is_refused_naming_it():
    runs = {"big": load_config(LACOMSA, ["engines.count=4"])}
    plan_side_by_side(runs, load_cluster_spec("a100x8"), 2)  # 4 GPUs a slice: fits
    with pytest.raises(PlanError, match="run big does not fit its slice .slice 1 of 4 of a100x8: 1/4 of a node: "
                                        "1 x .2 x A100-80GB.*set engines.count <= 2; or lower parallel"):
        plan_side_by_side(runs, load_cluster_spec("a100x8"), 4)


def test_a_slice_spec_loads_back_and_checks_against_a_larger_cluster(tmp_path):
    spec = load_cluster_spec("a100x8")
    path = write_slice_spec(slice_cluster(spec, 2)[1], tmp_path / "slice-2.yaml")
    loaded = load_cluster_spec(str(path))
    assert (loaded.name, loaded.slice_of, loaded.gpus_per_node, loaded.cpus_per_node) == ("a100x8-slice-2", "a100x8",
                                                                                          4, 48)
    node = {"CPU": 96.0, "GPU": 8.0, "accelerator_type:A100": 1.0}
    assert check_cluster(loaded, [node]) == []  # the whole node holds the half-node slice
    with pytest.raises(ClusterError, match="slice a100x8-slice-2 .* is larger than the cluster"):
        check_cluster(loaded, [{"CPU": 96.0, "GPU": 2.0}])


def test_study_dry_run_shows_the_slices_and_refuses_when_they_do_not_fit(monkeypatch):
    import rayalign.cli

    monkeypatch.setattr(rayalign.cli.console, "width", 200)
    result = invoke("study", "--dry-run", "--cluster", "a100x8", SCALING)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "2 run(s) side by side on a100x8" in text and "slice 2 of 2 of a100x8: 1/2 of a node" in text
    assert "4 x vllm engine (4 GPUs)" in text
    refused = invoke("study", "--dry-run", "--cluster", "a100x8", "--parallel", "4", SCALING)
    assert refused.exit_code != 0 and "does not fit its slice" in refused.output
    assert yaml.safe_load(SCALING.read_text())["parallel"] == 2


def ray_node(node_id: str, address: str, cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    """A node as ray.nodes() describes it (the fields the slices read)."""
    return {"NodeID": node_id, "NodeManagerAddress": address, "Alive": alive,
            "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_node_ids_of_a_slice_round_trip_through_its_spec_file(tmp_path):
    spec = load_cluster_spec("h100x16")  # 2 nodes x 8 GPUs
    pinned = [dataclasses.replace(s, node_ids=(f"{'ab' * 27}0{i}",)) for i, s in enumerate(slice_cluster(spec, 2))]
    loaded = load_cluster_spec(str(write_slice_spec(pinned[1], tmp_path / "slice-2.yaml")))
    assert loaded.node_ids == pinned[1].node_ids and loaded.nodes == 1 and loaded.slice_of == "h100x16"
    # its own nodes are checked by id (check_node_ids), not the smallest node of the cluster
    assert check_cluster(loaded, [{"CPU": 192.0, "GPU": 8.0}, {"CPU": 192.0, "GPU": 2.0}]) == []
    unpinned = load_cluster_spec(str(write_slice_spec(slice_cluster(spec, 4)[0], tmp_path / "share.yaml")))
    assert unpinned.node_ids == () and "node_ids" not in yaml.safe_load((tmp_path / "share.yaml").read_text())
    data = yaml.safe_load((tmp_path / "slice-2.yaml").read_text())
    for bad, expected in (([], None), (["a", "b"], "2 node id.s. for nodes: 1"), ("a", "expected a list"),
                          ([""], "expected a list"), ([3], "expected a list")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**data, "node_ids": bad}))
        if expected is None:
            assert load_cluster_spec(str(tmp_path / "bad.yaml")).node_ids == ()
        else:
            with pytest.raises(ClusterError, match=f"bad.yaml: node_ids: {expected}"):
                load_cluster_spec(str(tmp_path / "bad.yaml"))


def test_slices_of_whole_nodes_get_alive_nodes_with_the_resources_in_a_fixed_order():
    spec = load_cluster_spec("h100x16")  # 2 nodes x [8 GPUs, 192 CPUs]; 1 node a slice with parallel 2
    nodes = [ray_node("c" * 56, "10.0.0.10", 192, 8), ray_node("h" * 56, "10.0.0.1", 8),  # a CPU-only head
             ray_node("d" * 56, "10.0.0.2", 192, 8, alive=False), ray_node("b" * 56, "10.0.0.9", 192, 8),
             ray_node("s" * 56, "10.0.0.3", 192, 4)]  # too few GPUs
    slices = pin_slices(spec, slice_cluster(spec, 2), nodes)
    assert [s.node_ids for s in slices] == [("b" * 56,), ("c" * 56,)]  # 10.0.0.9 before 10.0.0.10
    assert pin_slices(spec, slice_cluster(spec, 2), list(reversed(nodes))) == slices
    text = slices_text(spec, slices)
    assert "slice 2 of 2 of h100x16: 1 of 2 node(s): 1 x [8 x H100" in text and f"pinned to node(s) {'c' * 12}" in text
    shares = slice_cluster(spec, 4)  # half a node each: budgets, not pinned
    assert pin_slices(spec, shares, nodes) == shares and "pinned" not in slices_text(spec, shares)
    with pytest.raises(ClusterError, match="2 slices of 1 whole node.s. need 2 alive node.s. with at least 8 GPU.s. "
                                           "and 192 CPU.s. each; the Ray cluster has 1"):
        pin_slices(spec, slice_cluster(spec, 2), nodes[:3])


def test_a_slice_node_that_is_gone_or_too_small_is_named():
    spec = dataclasses.replace(slice_cluster(load_cluster_spec("h100x16"), 2)[1], node_ids=("n" * 56,))
    check_node_ids(spec, [ray_node("n" * 56, "10.0.0.2", 192, 8)])
    with pytest.raises(ClusterError, match=f"slice h100x16-slice-2: node {'n' * 56} is not alive in the Ray cluster"):
        check_node_ids(spec, [ray_node("n" * 56, "10.0.0.2", 192, 8, alive=False), ray_node("m" * 56, "x", 192, 8)])
    with pytest.raises(ClusterError, match="has 4 GPU.s. and 192 CPU.s., fewer than the slice's 8 and 192 per node"):
        check_node_ids(spec, [ray_node("n" * 56, "10.0.0.2", 192, 4)])


def test_shares_that_do_not_divide_a_node_say_what_they_leave_unused():
    """Three runs on one 8-GPU node got 2 GPUs each, were each called "1/3 of a node", and 2 GPUs idled unsaid."""
    spec = load_cluster_spec("a100x8")
    slices = slice_cluster(spec, 3)
    assert [(s.gpus_per_node, s.cpus_per_node) for s in slices] == [(2, 32)] * 3
    text = slices_text(spec, slices)
    assert "slice 1 of 3 of a100x8: 2 of 8 GPUs and 32 of 96 CPUs of a node" in text
    assert "2 GPU(s) of every node unused (they do not divide into 3 equal shares)" in text
    assert "unused" not in slices_text(spec, slice_cluster(spec, 2))


def test_the_slice_table_title_shows_a_cpu_node_shape():
    """Rich read "[no GPUs, 1 CPUs, ...]" in the title as markup and printed "each run on a slice: 1 x"."""
    from rich.console import Console

    from rayalign.cluster.slices import slice_table

    cpu = dataclasses.replace(load_cluster_spec("a100x8"), gpus_per_node=0, gpu_type="none", gpu_memory_gb=0)
    console = Console(width=200, record=True)
    console.print(slice_table(slice_cluster(cpu, 2), {}))
    assert "each run on a slice: 1 x [no GPUs, 48 CPUs, 576 GB]" in " ".join(console.export_text().split())


def test_parallel_above_the_runs_goes_to_the_most_runs_that_slice_the_cluster_evenly():
    """12 runs asked 16 side by side on 8 nodes were cut to 12, which cannot slice 8 nodes, and refused."""
    from rayalign.cluster.slices import runs_side_by_side

    a100x64 = load_cluster_spec("a100x64")  # 8 nodes
    assert [runs_side_by_side(16, 12, a100x64), runs_side_by_side(8, 12, a100x64), runs_side_by_side(4, 3, a100x64),
            runs_side_by_side(16, 16, a100x64), runs_side_by_side(5, 1, a100x64)] == [8, 8, 3, 16, 1]
    result = invoke("study", "--dry-run", "--cluster", "a100x64", "--parallel", "16", SCALING)
    assert result.exit_code == 0, result.output
    assert "8 run(s) side by side on a100x64" in " ".join(result.output.split())
    refused = invoke("study", "--dry-run", "--cluster", "a100x64", "--parallel", "12", SCALING)
    assert refused.exit_code != 0 and "parallel must be at most 8 or a multiple of it" in refused.output
