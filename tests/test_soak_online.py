"""Faults in the online loop (slow): a generation or scoring actor killed mid-step is replaced by the others and
the run equals an undisturbed one; a trainer rank killed mid-run is a message, and the same command resumes from
the last online checkpoint to the undisturbed run's rollouts and policy."""

from __future__ import annotations

import inspect
import json
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


def kill_in_step(monkeypatch, group_class, step: int, after: int) -> list:
    """Kill actor 0 of `group_class` in the group's `step`-th `run` call, once `after` of that call's shards have
    been handed over (0: as the call starts, before any is done; 1: with the step's other shards still in flight).
    Counted in shards, not seconds: a step of the tiny model takes a fraction of a second (generation 0.2 s,
    scoring 0.1 s), so a timer set to fire 1 s into a step fires after the run has ended, or not at all."""
    original, calls, killed = group_class.run, [], []
    at = list(inspect.signature(original).parameters).index("on_shard") - 1  # its place in `args` (after self)

    def run(self, *args, **kwargs):
        calls.append(1)
        if len(calls) != step:
            return original(self, *args, **kwargs)
        victim, deliver, delivered = self.actors[0], args[at], []

        def kill():
            ray.kill(victim, no_restart=True)
            killed.append(len(delivered))

        def on_shard(index, table):
            deliver(index, table)
            delivered.append(index)
            if len(delivered) == after:
                kill()

        if after == 0:
            kill()
        return original(self, *args[:at], on_shard, *args[at + 1:], **kwargs)

    monkeypatch.setattr(group_class, "run", run)
    return killed


@pytest.mark.parametrize("kind, after", [("generation", 0), ("generation", 1), ("scoring", 1)])
def test_an_actor_killed_mid_step_leaves_the_online_run_equal_to_an_undisturbed_one(tmp_path, tiny_model,
                                                                                 undisturbed, monkeypatch, kind,
                                                                                 after):
    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.scorer import ScoringGroup
    from rayalign.pipelines import online

    killed = kill_in_step(monkeypatch, GenerationGroup if kind == "generation" else ScoringGroup, 2, after)
    run_dir = online.run(config(tiny_model), tmp_path / "run")
    assert killed == [after], "the actor was not killed in step 2"
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
