"""`rayalign submit`: run a rayalign command as a Ray Job on a running cluster."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

EXCLUDES = ["runs/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/"]


def job_spec(command: list[str], working_dir: str | Path = ".", pip: list[str] | None = None,
             env: dict[str, str] | None = None) -> dict:
    """The Ray Jobs submission for `rayalign <command>`: the working directory is uploaded (runs and
    caches excluded) and the runtime environment installs what the cluster lacks."""
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": EXCLUDES}
    if pip:
        runtime_env["pip"] = pip
    if env:
        runtime_env["env_vars"] = env
    return {"entrypoint": "rayalign " + shlex.join(command), "runtime_env": runtime_env}


def submit(address: str, spec: dict, wait: bool = False, poll_seconds: float = 2.0, echo=print) -> tuple[str, str]:
    """Submit the job to the cluster's dashboard at `address`; optionally wait and stream its logs.

    Returns (job id, final or current status)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(**spec)
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            echo(logs[shown:], end="")
            shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return job_id, str(status)
        time.sleep(poll_seconds)
