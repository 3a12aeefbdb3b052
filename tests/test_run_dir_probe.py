"""Multi-process Ray clusters on this machine (a head and workers, each its own `ray start`): a worker with a
private file system over the run directory's parent is named by the launch-time probe; worker nodes lost
mid-generation, mid-scoring and mid-training. Only the processes a test starts are stopped, by their process
groups."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

CHECK = textwrap.dedent("""
    import sys, time, ray
    from pathlib import Path
    from rayalign.cluster.spec import ClusterError, check_run_dir_visible
    ray.init(address=sys.argv[1], log_to_driver=False)
    deadline = time.time() + 90
    while sum(1 for n in ray.nodes() if n["Alive"]) < int(sys.argv[3]):
        assert time.time() < deadline, "the worker node did not join"
        time.sleep(0.5)
    try:
        check_run_dir_visible(Path(sys.argv[2]))
        print("VISIBLE")
    except ClusterError as e:
        print("REFUSED", e)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: str, env) -> subprocess.Popen:
    return subprocess.Popen(["sh", "-c", command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def node(cpus: int = 1) -> str:
    """`ray start` options of a node with `cpus` CPUs that stays in the foreground."""
    return f"--num-cpus={cpus} --disable-usage-stats --block"


def start_head(cpus: int = 1):
    """(port, env, process) of a Ray head with `cpus` CPUs, in its own process group."""
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return port, env, start(f"exec ray start --head --port={port} --include-dashboard=false {node(cpus)}", env)


def start_workers(port: int, env, count: int, cpus: int = 1) -> list[subprocess.Popen]:
    """`count` worker nodes, one after another (two `ray start`s at once on one machine can time out)."""
    workers = []
    for _ in range(count):
        workers.append(start(f"exec ray start --address=127.0.0.1:{port} {node(cpus)}", env))
        wait_for_nodes(port, env, len(workers) + 1)
    return workers


def wait_for_nodes(port: int, env, count: int) -> None:
    script = ("import sys, time, ray\nray.init(address=sys.argv[1], log_to_driver=False)\n"
              "while sum(1 for n in ray.nodes() if n['Alive']) < int(sys.argv[2]):\n    time.sleep(0.5)\n")
    subprocess.run([sys.executable, "-c", script, f"127.0.0.1:{port}", str(count)], env=env, check=True,
                   capture_output=True, timeout=120)


def stop(proc: subprocess.Popen) -> None:
    """End a started node's whole process group (idempotent)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=60)
            return
        except ProcessLookupError:
            proc.wait()
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
@pytest.mark.skipif(subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0,
                    reason="needs mount namespaces (unshare -m)")
def test_a_node_that_cannot_see_the_run_directory_is_named(tmp_path):
    shared = tmp_path / "shared"
    run_dir = shared / "run"
    run_dir.mkdir(parents=True)
    port, env, head = start_head()
    workers = []
    try:
        def check(nodes):
            out = subprocess.run([sys.executable, "-c", CHECK, f"127.0.0.1:{port}", str(run_dir), str(nodes)],
                                 capture_output=True, text=True, env=env, timeout=180)
            return out.stdout + out.stderr

        time.sleep(5)
        # a worker that sees the same files: the probe passes
        workers.append(start(f"exec ray start --address=127.0.0.1:{port} {node()}", env))
        assert "VISIBLE" in check(2)
        # a worker with a private (node-local) file system where the run directory's parent is
        workers.append(start(f"exec unshare -m sh -c 'mount -t tmpfs tmpfs {shared} && mkdir -p {run_dir} && "
                             f"exec ray start --address=127.0.0.1:{port} {node()}'", env))
        result = check(3)
        assert "REFUSED" in result and f"{run_dir}: every node must see the run directory" in result, result
        named = result.split("(a shared file system); ")[1].split(". Put --run-dir")[0]
        assert named.count("node ") == 1 and "FileNotFoundError" in named, result  # the private worker only
    finally:
        for proc in [*workers, head]:
            stop(proc)


@pytest.mark.slow
def test_losing_a_worker_node_mid_generation_and_mid_scoring_keeps_the_datasets(tmp_path, tiny_model):
    """A head and two worker nodes, each its own `ray start`; `rayalign launch --address` spreads 3 engines and 3
    scorers over them. One worker is killed (its whole process group) once the first samples shard exists, the
    other once the first scoring checkpoint exists: the run finishes on what is left, with the lost shards retried,
    and its samples and scores equal an uninterrupted run's on the same cluster."""
    import json

    from conftest import PROMPTS_DIR

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: nodes\nlanguages: [en, de]\npolicy: {{path: {tiny_model}}}\n"
                      f"prompts: {{path: {PROMPTS_DIR}, limit: 12}}\nsampling: {{n: 2, max_new_tokens: 16}}\n"
                      "engines: {count: 3, batch_size: 4, shard_rows: 2, num_cpus: 1}\n"
                      "rewards: {latent: {enabled: true}, actors: 2, batch_size: 4, num_cpus: 1}\n")
    port, env, head = start_head()
    workers = []

    def launch(run_dir):
        return subprocess.Popen([sys.executable, "-m", "rayalign.cli", "launch", "--cluster", "local", str(recipe),
                                 "--address", f"127.0.0.1:{port}", "--run-dir", str(run_dir)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_for(pattern_dir, pattern, proc, timeout=600):
        deadline = time.time() + timeout
        while not list(pattern_dir.glob(pattern)):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, f"no {pattern} in {pattern_dir}"
            time.sleep(0.05)

    try:
        time.sleep(5)
        workers = start_workers(port, env, 2)
        straight = launch(tmp_path / "straight")
        out, _ = straight.communicate(timeout=900)
        assert straight.returncode == 0, out[-3000:]

        killed_dir = tmp_path / "killed"
        run = launch(killed_dir)
        wait_for(killed_dir / "iter-1" / "samples", "part-*.parquet", run)
        stop(workers[0])
        wait_for(killed_dir / "iter-1" / "scores.forward", "part-*.parquet", run)
        stop(workers[1])
        out, _ = run.communicate(timeout=900)
        assert run.returncode == 0, out[-3000:]
    finally:
        for proc in [*workers, head]:
            stop(proc)
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    spread = {m["stage"]: len(m["actor_nodes"]) for m in straight if m.get("stage") in ("generate", "score")}
    assert spread == {"generate": 3, "score": 2}, spread  # one engine per one-CPU node, as planned
    metrics = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    retries = {m["stage"]: m.get("retries", 0) for m in metrics if m.get("stage") in ("generate", "score")}
    assert retries["generate"] >= 1 and retries["score"] >= 1, retries
    from rayalign.data.store import read_dataset

    key = [("prompt_id", "ascending"), ("lang", "ascending"), ("sample_idx", "ascending")]
    for name in ("samples", "scores"):
        a, b = (read_dataset(run_dir / "iter-1" / name, name).sort_by(key) for run_dir in (killed_dir, tmp_path / "straight"))
        assert a.equals(b), name


@pytest.mark.slow
def test_losing_the_trainers_node_mid_training_is_a_message_and_the_relaunch_resumes(tmp_path, tiny_model):
    """A head without CPUs and a worker with two, each its own `ray start`: every actor, the trainer rank
    included, runs on the worker. The worker's whole process group is killed once training has recorded a checkpoint: the
    launch ends with a message (no traceback), and a relaunch on a new worker resumes from that checkpoint."""
    import json

    from conftest import PROMPTS_DIR, checkpoint_recorded

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: lost-node\nlanguages: [en, de]\npolicy: {{path: {tiny_model}}}\n"
                      f"prompts: {{path: {PROMPTS_DIR}, limit: 8}}\nsampling: {{n: 2, max_new_tokens: 8}}\n"
                      "engines: {count: 1, num_cpus: 1}\nrewards: {latent: {enabled: true}, actors: 1, num_cpus: 1}\n"
                      "pairs: {method: lacomsa, truncated: keep}\n"
                      "training: {loss: dpo, micro_batch_size: 1, checkpoint_every: 1, world_size: 1, num_cpus: 2}\n")
    run_dir = tmp_path / "run"
    port, env, head = start_head(cpus=0)
    command = [sys.executable, "-m", "rayalign.cli", "launch", "--cluster", "local", str(recipe), "--address",
               f"127.0.0.1:{port}", "--run-dir", str(run_dir)]
    workers = []
    try:
        time.sleep(5)
        workers += start_workers(port, env, 1, cpus=2)
        run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 600
        while not checkpoint_recorded(run_dir):  # a checkpoint written but not yet recorded is set aside
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()[-3000:]
            time.sleep(0.05)
        stop(workers[0])
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 2 and "train iter-1: a trainer rank died" in out, out[-3000:]
        assert "resumes from the last checkpoint" in out and "Traceback" not in out, out[-3000:]
        workers += start_workers(port, env, 1, cpus=2)
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    finally:
        for proc in [*workers, head]:
            stop(proc)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m.get("stage") == "train"]
    assert len(train) == 1 and train[0]["resumed_from_step"] >= 1, train
