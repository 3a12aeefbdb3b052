"""Faults in the online loop (slow): a generation or scoring actor killed mid-step is replaced by the others and
the run equals an undisturbed one; a trainer rank killed mid-run is a message, and the same command resumes from
the last online checkpoint to the undisturbed run's rollouts and policy."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import ray

from conftest import REPO
from rayalign.config import load_config

pytestmark = pytest.mark.slow
STEPS = 3


def config(model: str):
    """Two engines and two scoring actors on half a CPU each, the LaCoMSA score as part of the reward."""
    return load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={model}", "languages=[en,de]", f"online.steps={STEPS}", "online.checkpoint_every=1",
        "online.prompts_per_step=1", "engines.count=2", "engines.num_cpus=0.5", "engines.shard_rows=1",
        "online.score_weight=1.0", "rewards.latent.enabled=true", "rewards.actors=2", "rewards.num_cpus=0.5"])


def rollouts(run_dir: Path) -> list:
    from rayalign.data.store import read_dataset

    return [read_dataset(run_dir / "online" / f"step-{s:04d}", "rollouts") for s in range(1, STEPS + 1)]


def policy(run_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(run_dir / "online" / "policy" / "model.safetensors")


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, tiny_model, ray_session):
    from rayalign.pipelines import online

    run_dir = online.run(config(tiny_model), tmp_path_factory.mktemp("online") / "undisturbed")
    return rollouts(run_dir), policy(run_dir)


def kill_in_step(monkeypatch, group_class, step: int, delay: float) -> list:
    """Kill actor 0 of `group_class` `delay` seconds after the group's `step`-th `run` call starts."""
    original, calls, killed = group_class.run, [], []

    def run(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            victim = self.actors[0]
            threading.Timer(delay, lambda: (ray.kill(victim, no_restart=True), killed.append(1))).start()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(group_class, "run", run)
    return killed


@pytest.mark.parametrize("kind, delay", [("generation", 0.0), ("generation", 1.0), ("scoring", 0.5)])
def test_an_actor_killed_mid_step_leaves_the_online_run_equal_to_an_undisturbed_one(tmp_path, tiny_model,
                                                                                 undisturbed, monkeypatch, kind,
                                                                                 delay):
    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.scorer import ScoringGroup
    from rayalign.pipelines import online

    killed = kill_in_step(monkeypatch, GenerationGroup if kind == "generation" else ScoringGroup, 2, delay)
    run_dir = online.run(config(tiny_model), tmp_path / "run")
    assert killed, "the actor was not killed"
    expected_rollouts, expected_policy = undisturbed
    for step, (got, want) in enumerate(zip(rollouts(run_dir), expected_rollouts), 1):
        assert got.equals(want), step
    got = policy(run_dir)
    assert max(float(np.abs(got[k] - expected_policy[k]).max()) for k in got) <= 1e-6


def test_a_trainer_rank_killed_mid_run_is_a_message_and_the_same_command_resumes(tmp_path, tiny_model, undisturbed,
                                                                                monkeypatch):
    """The trainer actor is killed during step 3 (step 2's checkpoint recorded): TrainerLostError names the
    checkpoint the relaunch resumes from; the relaunch's rollouts and policy equal the undisturbed run's."""
    from rayalign.actors.rl_trainer import RolloutGroup
    from rayalign.pipelines import online
    from rayalign.actors.trainer import TrainerLostError

    original, calls = RolloutGroup.rollout_stats, []

    def rollout_stats(self, sequences):
        calls.append(1)
        if len(calls) == 3:
            ray.kill(self.actors[0], no_restart=True)
        return original(self, sequences)

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(RolloutGroup, "rollout_stats", rollout_stats)
        with pytest.raises(TrainerLostError, match=r"online: a trainer rank died .* the same command resumes from "
                                                   r"the checkpoint of step 2 \(online.checkpoint_every 1\)"):
            online.run(config(tiny_model), run_dir)
    assert json.loads((run_dir / "state.json").read_text())["online_checkpoint"]["step"] == 2
    online.run(config(tiny_model), run_dir)
    expected_rollouts, expected_policy = undisturbed
    for step, (got, want) in enumerate(zip(rollouts(run_dir), expected_rollouts), 1):
        assert got.equals(want), step
    got = policy(run_dir)
    assert max(float(np.abs(got[k] - expected_policy[k]).max()) for k in got) <= 1e-6
