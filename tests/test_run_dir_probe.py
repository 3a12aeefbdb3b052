"""A multi-process Ray cluster on this machine (a head and a worker, each its own `ray start`), where the worker
runs in its own mount namespace with a private file system over the run directory's parent: the launch-time
probe must name that node. Only the processes this test starts are stopped, by their process groups."""

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


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0,
                    reason="needs mount namespaces (unshare -m)")
def test_a_node_that_cannot_see_the_run_directory_is_named(tmp_path):
    shared = tmp_path / "shared"
    run_dir = shared / "run"
    run_dir.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    common = "--num-cpus=1 --disable-usage-stats --block"
    head = start(f"exec ray start --head --port={port} --include-dashboard=false {common}", env)
    workers = []
    try:
        def check(nodes):
            out = subprocess.run([sys.executable, "-c", CHECK, f"127.0.0.1:{port}", str(run_dir), str(nodes)],
                                 capture_output=True, text=True, env=env, timeout=180)
            return out.stdout + out.stderr

        time.sleep(5)
        # a worker that sees the same files: the probe passes
        workers.append(start(f"exec ray start --address=127.0.0.1:{port} {common}", env))
        assert "VISIBLE" in check(2)
        # a worker with a private (node-local) file system where the run directory's parent is
        workers.append(start(f"exec unshare -m sh -c 'mount -t tmpfs tmpfs {shared} && mkdir -p {run_dir} && "
                             f"exec ray start --address=127.0.0.1:{port} {common}'", env))
        result = check(3)
        assert "REFUSED" in result and f"{run_dir}: every node must see the run directory" in result, result
        named = result.split("(a shared file system); ")[1].split(". Put --run-dir")[0]
        assert named.count("node ") == 1 and "FileNotFoundError" in named, result  # the private worker only
    finally:
        for proc in [*workers, head]:
            stop(proc)
