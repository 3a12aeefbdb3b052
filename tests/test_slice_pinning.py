"""A study's slices of whole nodes on a simulated 2-node Ray cluster: each slice is pinned to its own node, and the
actors and placement groups of a run on it (spread actors, a tensor-parallel engine's group, a trainer's group)
all land there; a pinned node that is gone is named, at connect and while actors wait for it.

Runs in a subprocess, because the test session already holds its own Ray instance. Tiny CPU actors, no model.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, sys, types
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group
    from rayalign.actors.pool import bundle_pinning, placement_options, remove_placement, wait_started
    from rayalign.actors.trainer import TrainerGroup
    from rayalign.cluster.slices import pin_slices, slice_cluster, slices_text, write_slice_spec
    from rayalign.cluster.spec import ClusterError, connect, load_cluster_spec, pinned_nodes

    out = Path(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = {name: cluster.add_node(num_cpus=2, num_gpus=2, resources={name: 1}) for name in ("a", "b")}
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    node_of = {name: next(n["NodeID"] for n in ray.nodes() if name in n["Resources"]) for name in workers}
    report = {"node_of": node_of}

    (out / "cluster.yaml").write_text(
        "name: two\\nnodes: 2\\ncpus_per_node: 2\\ngpus_per_node: 2\\ngpu_type: A100-80GB\\ngpu_memory_gb: 80\\n"
        "memory_gb_per_node: 1\\n")
    spec = load_cluster_spec(str(out / "cluster.yaml"))
    slices = pin_slices(spec, slice_cluster(spec, 2), ray.nodes())  # what `rayalign study` does with parallel 2
    report["slices_text"] = slices_text(spec, slices)
    report["slice_nodes"] = [list(s.node_ids) for s in slices]
    paths = [write_slice_spec(s, out / f"slice-{i + 1}.yaml") for i, s in enumerate(slices)]

    class TinyActor:
        def __init__(self, *args):
            pass
        def where(self):
            return ray.get_runtime_context().get_node_id()
        def master(self):
            return "127.0.0.1", 0
        def setup(self, addr, port):
            return self.where()

    Tiny = ray.remote(TinyActor)

    class TinyTrainers(TrainerGroup):
        actor_class = TinyActor

    def nodes_of_a_run():
        spread, _ = placement_options(2, 0.25, 0)  # SPREAD: one per node when unpinned
        actors = [Tiny.options(**o).remote() for o in spread]
        tp, groups = placement_options(1, 0.5, 0, tensor_parallel_size=2)  # STRICT_PACK of 2 GPU bundles
        actors += [Tiny.options(**o).remote() for o in tp]
        nodes = {"spread": ray.get([a.where.remote() for a in actors[:2]], timeout=60),
                 "tensor_parallel": ray.get([a.where.remote() for a in actors[2:]], timeout=60)}
        training = types.SimpleNamespace(num_cpus=0.25, num_gpus=0, world_size=2)  # all fit one node's 2 CPUs
        with TinyTrainers("none", None, training) as trainers:
            nodes["trainer"] = trainers.nodes()
        for a in actors:
            ray.kill(a)
        remove_placement(groups)
        return nodes

    connect(load_cluster_spec(str(out / "cluster.yaml")))  # the whole cluster: not pinned
    report["unpinned"] = nodes_of_a_run()
    slice_2 = load_cluster_spec(str(paths[1]))
    connect(slice_2)  # what the run's `rayalign launch --cluster slice-2.yaml` does
    report["pinned"] = list(pinned_nodes()[1])
    report["slice_2"] = nodes_of_a_run()

    slice_1 = load_cluster_spec(str(paths[0]))
    connect(slice_1)
    stuck = placement_group([{"CPU": 3}], **bundle_pinning(1))  # more CPUs than its node has: waits
    cluster.remove_node(next(workers[name] for name, node in node_of.items() if node in slice_1.node_ids))
    try:
        wait_started([stuck.ready()], "tiny placement groups", {"CPU": 3}, every=1)
        report["waited"] = "started"
    except ClusterError as e:
        report["waited"] = str(e)
    try:
        connect(slice_1)
        report["gone"] = "connected"
    except ClusterError as e:
        report["gone"] = str(e)
    print(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()
""")


def test_each_slice_of_whole_nodes_keeps_its_runs_actors_on_its_node(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    one, two = report["slice_nodes"]
    assert sorted(one + two) == sorted(report["node_of"].values())  # a node each
    assert sorted(report["unpinned"]["spread"]) == sorted(one + two)  # without a slice, Ray spreads over both
    assert report["pinned"] == two
    assert f"slice 2 of 2 of two: 1 of 2 node(s): 1 x [2 x A100-80GB (80 GB), 2 CPUs, 1 GB], pinned to node(s) " \
           f"{two[0][:12]}" in report["slices_text"]
    for kind, nodes in report["slice_2"].items():
        assert nodes and set(nodes) == set(two), kind
    assert report["waited"].startswith(f"slice two-slice-1: node {one[0]} is no longer alive, and the tiny placement "
                                       "groups are pinned to the slice's 1 node(s)")
    assert report["gone"].startswith(f"slice two-slice-1: node {one[0]} is not alive in the Ray cluster")


STUDY_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    import ray, yaml
    from ray.cluster_utils import Cluster
    from rayalign.pipelines.study import run_study

    study, spec = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    study_dir = run_study(study, cluster=spec, address=cluster.address, progress=print)
    runs = {}
    for entry in json.loads((study_dir / "study.json").read_text())["runs"]:
        run_dir = Path(entry["run_dir"])
        slice_file = re.search(r"--cluster (\\S+)", (run_dir / "launch.log").read_text()).group(1)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        log = (run_dir / "launch.log").read_text()
        runs[entry["run"]] = {"status": entry["status"], "error": entry["error"],
                              "eval_line": next((l for l in log.splitlines() if l.startswith("eval ")), None),
                              "evaluated": (run_dir / "eval" / "final" / "results").is_dir(),
                              "slice_file": slice_file,
                              "slice_nodes": yaml.safe_load(Path(slice_file).read_text())["node_ids"],
                              "actor_nodes": {m["stage"]: m["actor_nodes"] for m in metrics if "actor_nodes" in m}}
    print(json.dumps(runs))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.slow
def test_a_study_side_by_side_on_two_nodes_runs_each_run_on_its_own_node(tmp_path, tiny_model):
    spec = tmp_path / "two.yaml"
    spec.write_text("name: two\nnodes: 2\ncpus_per_node: 2\ngpus_per_node: 0\ngpu_type: none\ngpu_memory_gb: 0\n"
                    "memory_gb_per_node: 1\n")
    overrides = {"iterations": 1, "languages": ["en", "es"], "policy.path": tiny_model,
                 "sampling": {"n": 2, "max_new_tokens": 8}, "engines.count": 1, "rewards.actors": 1,
                 "training": {"micro_batch_size": 2, "gradient_accumulation": 1, "num_cpus": 1}}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "pinned", "recipe": str(REPO / "examples" / "quickstart.yaml"),
                                     "runs_dir": str(tmp_path / "runs"), "parallel": 2, "overrides": overrides,
                                     "grid": {"prompts.limit": [2, 3]},
                                     "eval": {"prompts_limit": 2, "samples": 2, "silhouette_prompts": 0}},
                                    sort_keys=False))
    done = subprocess.run([sys.executable, "-c", STUDY_SCRIPT, str(study), str(spec)], cwd=REPO, capture_output=True,
                          text=True, timeout=1200, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(runs) == 2 and sorted(n for r in runs.values() for n in r["slice_nodes"]) == sorted(
        {n for r in runs.values() for n in r["slice_nodes"]})  # a node each
    for name, run in runs.items():
        assert run["status"] == "finished", (name, run["error"])
        assert {"generate", "score", "train"} <= set(run["actor_nodes"]), name
        for stage in ("generate", "score"):  # node ids (train records its ranks' addresses: one here)
            assert set(run["actor_nodes"][stage]) == set(run["slice_nodes"]), (name, stage)
        # evaluated after the run, in a subprocess of its own pinned to the run's slice
        assert run["evaluated"], name
        assert run["eval_line"].startswith(f"eval {name}: on slice {Path(run['slice_file']).stem}, pinned to "
                                           f"node(s) {', '.join(run['slice_nodes'])} ("), run["eval_line"]
