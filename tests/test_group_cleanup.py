"""An actor group whose constructor fails halfway removes its own placement groups and kills the actors it started
(the callers' with blocks and ExitStacks only cover groups that finished constructing). Real local Ray."""

import dataclasses

import pytest
import ray
from ray.exceptions import RayActorError
from ray.util import placement_group_table

from rayalign.config import EnginesConfig, ModelConfig, TrainingConfig

TRAINING = TrainingConfig(loss="dpo", lr=1e-3, warmup_ratio=0.0, micro_batch_size=2, gradient_accumulation=1,
                          world_size=2, zero_stage=2, num_cpus=1)


def live_groups() -> dict[str, str]:
    """Placement groups not removed: id -> state (CREATED, PENDING, RESCHEDULING...)."""
    return {k: v["state"] for k, v in placement_group_table().items() if v["state"] != "REMOVED"}


def assert_dead(method) -> None:
    """Calling the actor's `method` finds it gone (it would answer if it had been left running)."""
    with pytest.raises(RayActorError):
        ray.get(method.remote(), timeout=120)


def ctrl_c_while_waiting(monkeypatch, seen: list) -> None:
    """Ctrl-C while a group waits for placement groups the cluster cannot place (GPUs on this CPU-only cluster,
    more CPUs than it has): the wait is interrupted after the groups exist, PENDING."""
    from rayalign.actors import pool

    def interrupted(refs, what, each, every=30.0):
        seen.append(dict(live_groups()))
        raise KeyboardInterrupt

    monkeypatch.setattr(pool, "wait_started", interrupted)


@pytest.mark.parametrize("group_class", ["PreferenceTrainerGroup", "PolicyGroup", "CriticGroup"])
def test_trainer_group_interrupted_while_waiting_removes_its_placement_group(ray_session, monkeypatch, group_class):
    from rayalign.actors import preference_trainer, rl_trainer

    cls = getattr(preference_trainer, group_class, None) or getattr(rl_trainer, group_class)
    before, seen = live_groups(), []
    ctrl_c_while_waiting(monkeypatch, seen)
    too_big = dataclasses.replace(TRAINING, num_cpus=64)  # the 4-CPU cluster cannot place it: PENDING
    with pytest.raises(KeyboardInterrupt):
        cls("/no/such/model", ModelConfig(path="/no/such/model"), too_big)
    assert [v for k, v in seen[0].items() if k not in before] == ["PENDING"]  # the group's own, waiting
    assert live_groups() == before


def test_generation_group_interrupted_while_waiting_removes_its_tensor_parallel_groups(ray_session, monkeypatch):
    from rayalign.actors.generator import GenerationGroup

    before, seen = live_groups(), []
    ctrl_c_while_waiting(monkeypatch, seen)
    engines = EnginesConfig(backend="vllm", count=2, tensor_parallel_size=2, num_gpus=2.0)
    with pytest.raises(KeyboardInterrupt):
        GenerationGroup("/no/such/model", ModelConfig(path="/no/such/model"), engines)
    made = {k: v for k, v in seen[0].items() if k not in before}
    assert list(made.values()) == ["PENDING", "PENDING"]  # one per engine, waiting for GPUs
    assert live_groups() == before


@pytest.mark.parametrize("kind", ["scoring", "generation"])
def test_group_whose_second_actor_fails_to_start_kills_the_first(ray_session, monkeypatch, kind):
    """The second actor's start raises (Ctrl-C between the two): the first, already started and healthy, is
    killed. Each start here is a ScoringActor without models (up at once, and it would stay up)."""
    from rayalign.actors import generator, scorer

    started, real = [], scorer.ScoringActor.options

    class Start:
        def __init__(self, o):
            self.o = {k: v for k, v in o.items() if k != "max_concurrency"}

        def remote(self, *_):
            if started:
                raise KeyboardInterrupt
            started.append(real(**self.o).remote({}, 1, 1))
            return started[-1]

    if kind == "scoring":
        monkeypatch.setattr(scorer.ScoringActor, "options", lambda **o: Start(o))
        with pytest.raises(KeyboardInterrupt):
            scorer.ScoringGroup({}, count=2, batch_size=1, num_cpus=0.5, num_gpus=0.0)
    else:
        monkeypatch.setattr(generator.GenerationActor, "options", lambda **o: Start(o))
        with pytest.raises(KeyboardInterrupt):
            generator.GenerationGroup("/no/such/model", ModelConfig(path="/no/such/model"),
                                      EnginesConfig(count=2, num_cpus=0.5))
    assert len(started) == 1
    assert_dead(started[0].ready)


def test_trainer_rank_that_fails_in_setup_takes_its_ranks_and_placement_group(ray_session, monkeypatch, tmp_path):
    """Both ranks start, join the process group, then fail to load a model that is not there: the group's ranks
    are killed and its placement group removed before the error goes on."""
    from rayalign.actors.preference_trainer import PreferenceTrainerGroup

    killed, real_kill = [], ray.kill
    monkeypatch.setattr(ray, "kill", lambda actor, **kw: (killed.append(actor), real_kill(actor, **kw))[1])
    before = live_groups()
    missing = str(tmp_path / "no-model")
    with pytest.raises(ray.exceptions.RayTaskError, match="no-model"):
        PreferenceTrainerGroup(missing, ModelConfig(path=missing), TRAINING)
    assert live_groups() == before
    assert len(killed) == 2
    for actor in killed:
        assert_dead(actor.master)
