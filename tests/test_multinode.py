"""The quickstart on a simulated 4-node Ray cluster with logical GPUs: actors spread over the nodes, scoring
streaming behind generation.

Runs in a subprocess, because the test session already holds its own Ray instance.
"""

import json
import subprocess
import sys
import textwrap


from conftest import REPO


SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from click.testing import CliRunner
    from rayalign.cli import main

    model, run_dir = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(4):
        cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU"))
    result = CliRunner().invoke(main, [
        "launch", "examples/quickstart.yaml", "--run-dir", run_dir, "--address", cluster.address,
        "-o", f"policy.path={model}", "-o", "prompts.limit=4", "-o", "sampling.max_new_tokens=8",
        "-o", "engines.count=4", "-o", "engines.num_gpus=1", "-o", "engines.shard_rows=2",
        "-o", "rewards.actors=4", "-o", "rewards.num_gpus=1", "-o", "iterations=1",
        "-o", "training.micro_batch_size=2", "-o", "training.gradient_accumulation=1"], catch_exceptions=False)
    print(json.dumps({"exit": result.exit_code, "gpu_nodes": nodes, "output": result.output[-2000:]}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_quickstart_on_four_simulated_nodes(tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", SCRIPT, tiny_model, str(run_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["exit"] == 0, report["output"]
    metrics = {m["stage"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    # 4 engines + 4 scorers of one GPU each fit the 8 GPUs at once: scoring streams behind generation across nodes
    assert metrics["generate"]["schedule"] == "stream" and metrics["score"]["schedule"] == "stream"
    for stage in ("generate", "score"):
        # one actor per GPU node, as planned: SPREAD over the four nodes that hold GPUs
        assert sorted(metrics[stage]["actor_nodes"]) == report["gpu_nodes"], stage
    assert (run_dir / "iter-1" / "pairs" / "manifest.json").is_file()
    assert len(metrics["train"]["actor_nodes"]) == 1 and (run_dir / "iter-1" / "policy" / "config.json").is_file()
