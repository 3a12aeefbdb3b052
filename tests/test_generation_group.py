"""GenerationActors on a real local Ray instance and the tiny model."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest
import ray

from conftest import PROMPTS_DIR
from rayalign.actors.generator import GenerationGroup
from rayalign.actors.pool import split_shards
from rayalign.config import load_config
from rayalign.data.prompts import load_prompts


@pytest.fixture(scope="module")
def setup(tiny_model, ray_session):
    cfg = load_config(None, ["languages=[en,de,ru]", "sampling.n=2", "sampling.max_new_tokens=10",
                             "engines.batch_size=8", "engines.shard_rows=1", f"policy.path={tiny_model}"])
    prompts = load_prompts(PROMPTS_DIR, cfg.languages, limit=3)  # 9 rows -> 9 shards
    return cfg, prompts, tiny_model


@pytest.fixture(scope="module")
def baseline(setup):
    return run_group(*setup, 1)


def run_group(cfg, prompts, model, count, seed=None, on_shard_hook=None):
    engines = dataclasses.replace(cfg.engines, count=count)  # cfg itself unchanged: groups may run side by side
    sampling = cfg.sampling if seed is None else type(cfg.sampling)(**{**cfg.sampling.__dict__, "seed": seed})
    shards = split_shards(prompts, engines.shard_rows)
    out = {}
    group = GenerationGroup(model, cfg.policy, engines)

    def on_shard(index, table):
        out[index] = table
        if on_shard_hook:
            on_shard_hook(group, index)

    try:
        stats = group.run(shards, sampling, 1, "tiny", on_shard)
    finally:
        group.shutdown()
    return pa.concat_tables([out[i] for i in sorted(out)]), stats


def test_every_prompt_row_gets_n_samples(setup, baseline):
    cfg, prompts, model = setup
    table, stats = baseline
    assert table.num_rows == prompts.num_rows * 2 == stats.rows_out
    keys = [(r["prompt_id"], r["lang"], r["sample_idx"]) for r in table.select(["prompt_id", "lang", "sample_idx"]).to_pylist()]
    assert len(set(keys)) == len(keys) and {k[2] for k in keys} == {0, 1}
    assert set(table.column("finish_reason").to_pylist()) <= {"stop", "length"}


def test_k2_equals_k1_and_seed_decides(setup, baseline):
    cfg, prompts, model = setup
    k1, _ = baseline
    with ThreadPoolExecutor(2) as pool:  # two groups side by side (3 of the session's 4 CPUs), each on its own
        k2_run = pool.submit(run_group, cfg, prompts, model, 2)
        other_run = pool.submit(run_group, cfg, prompts, model, 1, seed=cfg.sampling.seed + 1)
    (k2, stats), (other, _) = k2_run.result(), other_run.result()
    assert len(stats.shards_by_actor) == 2  # both actors did work
    assert k2.equals(k1)
    assert other.column("seed").to_pylist() != k1.column("seed").to_pylist()
    changed = sum(a != b for a, b in zip(other.column("response").to_pylist(), k1.column("response").to_pylist()))
    assert changed >= k1.num_rows // 2


def test_dead_actor_shard_is_retried_elsewhere(setup, baseline):
    cfg, prompts, model = setup
    killed = []

    def kill_one(group, index):
        if not killed:
            victim = group.actors[1] if 1 in group.alive else group.actors[0]
            ray.kill(victim)
            killed.append(index)

    table, stats = run_group(cfg, prompts, model, 2, on_shard_hook=kill_one)
    assert stats.retries >= 1
    assert table.equals(baseline[0])


def test_the_last_actor_lost_ends_with_a_message_that_says_how_to_resume(setup):
    """It was a RuntimeError traceback quoting Ray's whole actor error ("0 actor(s) left: ...")."""
    from rayalign.generation import ActorsLostError

    cfg, prompts, model = setup

    def kill_it(group, index):
        ray.kill(group.actors[0])

    with pytest.raises(ActorsLostError) as lost:
        run_group(cfg, prompts, model, 1, on_shard_hook=kill_it)
    message = str(lost.value)
    assert "failed 1 time(s) as its actor died, 0 actor(s) left (" in message and "Traceback" not in message
    assert message.endswith("finished shards are kept: fix the cause (or free the resources) and run the same "
                            "command again to resume")


def test_dead_scoring_actor_shard_is_retried_elsewhere(setup, baseline):
    """The same for ScoringActors: a killed actor's shard is scored by the other, with the same numbers."""
    from rayalign.actors.scorer import ModelRole, ScoringGroup
    from rayalign.scoring.forward import ForwardSpec

    cfg, _, model = setup
    samples = baseline[0]
    shards = split_shards(samples, 2)
    specs = [ForwardSpec("policy", "messages", "logp_policy", tokens_column="score_tokens")]

    def score(count, kill):
        group = ScoringGroup({"policy": ModelRole(model, cfg.policy)}, count, 8, 1, 0)
        out = {}

        def on_shard(index, table):
            out[index] = table
            if kill and len(out) == 1:
                ray.kill(group.actors[1] if 1 in group.alive else group.actors[0])

        try:
            stats = group.run(shards, specs, None, on_shard)
        finally:
            group.shutdown()
        return pa.concat_tables([out[i] for i in sorted(out)]), stats

    with ThreadPoolExecutor(2) as pool:  # two groups side by side (3 of the session's 4 CPUs), each on its own
        undisturbed_run, killed_run = pool.submit(score, 1, kill=False), pool.submit(score, 2, kill=True)
    (undisturbed, _), (table, stats) = undisturbed_run.result(), killed_run.result()
    assert stats.retries >= 1 and table.num_rows == samples.num_rows
    assert table.column("logp_policy").to_pylist() == pytest.approx(undisturbed.column("logp_policy").to_pylist(),
                                                                    abs=1e-6)


def test_actors_that_cannot_start_are_reported_while_waited_for(ray_session, capfd):
    import threading

    from rayalign.actors.pool import wait_started

    @ray_session.remote(num_cpus=64)
    class TooBig:
        def ready(self):
            return True

    actor = TooBig.remote()
    threading.Timer(2.5, lambda: ray_session.kill(actor)).start()
    with pytest.raises(ray_session.exceptions.RayActorError):
        wait_started([actor.ready.remote()], "big actors", {"CPU": 64, "GPU": 0}, every=1.0)
    err = capfd.readouterr().err
    assert "waiting 1 s for 1 of 1 big actors to start (64 CPU each); the cluster has" in err
    assert "A lost node or a cluster smaller than the recipe keeps them waiting" in err
