import os
import signal
import subprocess
import time

import pytest

from rayalign.cluster.submit import EXCLUDES, job_spec


def test_job_spec():
    spec = job_spec(["launch", "--cluster", "a100x64", "my recipe.yaml"], "/work/x", pip=["rayalign[gpu]"],
                    env={"HF_HOME": "/data/hf"})
    assert spec["entrypoint"] == "rayalign launch --cluster a100x64 'my recipe.yaml'"
    assert spec["runtime_env"] == {"working_dir": "/work/x", "excludes": EXCLUDES, "pip": ["rayalign[gpu]"],
                                   "env_vars": {"HF_HOME": "/data/hf"}}


@pytest.mark.slow
def test_submit_runs_a_job_on_a_running_cluster(tmp_path):
    """A real Ray head (its own processes, stopped at the end) runs `rayalign config` as a Ray Job."""
    from click.testing import CliRunner

    from rayalign.cli import main

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--num-cpus=1", "--port=6397",
                             "--dashboard-host=127.0.0.1", "--dashboard-port=8397", "--dashboard-agent-listen-port=52399",
                             "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from conftest import PROMPTS_DIR  # the job checks the prompt set; the working directory holds only the recipe

        (tmp_path / "r.yaml").write_text(f"name: job\nprompts: {{path: {PROMPTS_DIR}}}\nsampling: {{n: 3}}\n")
        deadline = time.time() + 60
        while True:
            result = CliRunner().invoke(main, ["submit", "--address", "http://127.0.0.1:8397", "--working-dir",
                                               str(tmp_path), "--wait", "--", "config", "r.yaml"])
            if result.exit_code == 0 or time.time() > deadline:
                break
            time.sleep(2)  # the dashboard is still starting
        assert result.exit_code == 0, result.output
        assert "SUCCEEDED" in result.output and "n: 3" in result.output
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
