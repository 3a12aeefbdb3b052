"""Online RL, step after step: rollouts -> rewards -> group advantages -> update -> weight sync.

Each step samples `online.prompts_per_step` prompt ids in every language (so rewards can compare languages
within a step) on the GenerationActors, scores the rollouts, computes GRPO or RLOO advantages over the n
samples of each (prompt, language) or PPO advantages (GAE over a CriticGroup's values, with the KL to
the starting policy in the per-token reward), updates the policy on the PolicyGroup (clipped policy gradient;
GRPO and RLOO add the KL penalty to the loss) on the tokens the engines generated, and pushes the new weights
to the generation engines (the trainer publishes them into the Ray object store; NCCL broadcast on CUDA). With
`online.async_train` the next step's rollouts are generated while a step trains (pipelines/online_rollouts.py).
Every step's rollouts are written as an Arrow dataset (`online/step-XXXX/`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from rayalign.config import RunConfig
from rayalign.data.prompts import load_prompts
from rayalign.data.store import DatasetWriter, atomic_write_text, dataset_problems, directory_checksums, trash_dir
from rayalign.engines import check_engine_settings
from rayalign.models import resolve_model_path
from rayalign.progress import console, deepspeed_op_notice, model_build_progress
from rayalign.tracking import Trackers, check_trackers
from rayalign.actors.weight_sync import WeightSync
from rayalign.pipelines.online_rollouts import Rollouts
from rayalign.run_dir import (check_inputs_unchanged, check_prompts_unchanged, check_run_dir_config,
                              kept_output_problems, log_metrics, prepare_run_dir, record_checksums, remove_older_tags,
                              set_aside_untrusted_checkpoint, write_state)
from rayalign.scoring.finish import stage_centroids
from rayalign.scoring.rewards import load_user_reward
from rayalign.scoring.setup import forward_rewards, latent_layers, scoring_setup, with_scoring_prompts


def run(cfg: RunConfig, run_dir: Path | None = None, **options) -> Path:
    """Run the recipe's online steps into `run_dir`, holding the run directory's lock throughout."""
    from rayalign.run_lock import run_dir_lock

    run_dir = Path(run_dir or cfg.resolved_run_dir())
    with run_dir_lock(run_dir, console.print):
        return _run(cfg, run_dir, **options)


def _run(cfg: RunConfig, run_dir: Path, *, cluster: str = "local", address: str | None = None) -> Path:
    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.rl_trainer import CriticGroup, PolicyGroup
    from rayalign.cluster import connect, load_cluster_spec
    from rayalign.cluster.planner import plan, save_plan, with_counts
    from rayalign.cluster.spec import check_run_dir_visible, running_cluster_spec
    from rayalign.training.rollouts import group_advantages, minibatch_order, ppo_advantages, rollout_rewards

    o = cfg.online
    check_trackers(cfg)
    spec = load_cluster_spec(cluster)
    cfg = with_counts(cfg, spec, address)
    prompts = load_prompts(cfg.prompts.path, cfg.languages, **cfg.prompts.load_kwargs())
    rollout_size = cfg.rollouts_per_step(prompts.num_rows)
    tcfg = cfg.online_training(rollout_size)
    updates_per_step = o.ppo_epochs * rollout_size // (o.mini_batch_size or rollout_size)
    prior = check_run_dir_config(cfg, run_dir)
    digest = check_prompts_unchanged(cfg, prior, prompts)  # before models
    inputs = check_inputs_unchanged(cfg, prior)
    if prior and "online/policy" in prior["finished"]:  # a finished run: kept when its saved policy verifies
        problems = kept_output_problems(run_dir, prior, run_dir / "online" / "policy") + rollout_problems(run_dir,
                                                                                                           o.steps)
        if not problems:
            console.print(f"online/policy: finished earlier ({o.steps} steps), kept -> {run_dir / 'online' / 'policy'}")
            return run_dir
        console.print(f"online/policy: not kept ({'; '.join(problems)}); the run resumes from its last checkpoint")
    policy_path = resolve_model_path(cfg.policy.path, model_build_progress(cfg.policy.path))
    check_engine_settings(cfg, policy_path)
    if o.score_weight and cfg.rewards.latent.enabled:
        latent_layers(cfg, policy_path)  # layers beyond the model's are refused before any actor starts
    if o.user_weight and cfg.rewards.user.path:
        load_user_reward(cfg.rewards.user.path, cfg.rewards.user.function)
    connect(spec, address)
    check_run_dir_visible(run_dir)
    run_plan = plan(cfg, running_cluster_spec(spec), strict=True)  # the roles must fit side by side
    console.print(run_plan.table())
    console.print(run_plan.estimate_table())
    ppo = o.algorithm == "ppo"
    # after every check: a refused recipe leaves none
    state = prepare_run_dir(cfg, run_dir, prompts_digest=digest, input_digests=inputs)
    save_plan(run_plan, run_dir)
    resume_step = resumable_step(run_dir, state, o.checkpoint_every, ppo=ppo)
    console.print(f"online {o.algorithm} {cfg.name}: {o.steps} steps of {rollout_size} rollouts "
                  f"({o.prompts_per_step} prompts x {len(cfg.languages)} languages x n={cfg.sampling.n}) -> {run_dir}")
    # every group shuts down (its actors killed, its placement group removed) however the run ends, also when a
    # later one fails to start; the rollout source closes before the engines it uses, the trackers first
    with contextlib.ExitStack() as stack:
        generators = stack.enter_context(GenerationGroup(policy_path, cfg.policy, cfg.engines))
        deepspeed_op_notice()
        trainer = stack.enter_context(PolicyGroup(policy_path, cfg.policy, tcfg))
        critic = stack.enter_context(CriticGroup(policy_path, cfg.policy, dataclasses.replace(tcfg, lr=o.critic_lr))) \
            if ppo else None
        scorers = ScoredReward(cfg, policy_path) if o.score_weight else None
        if scorers is not None:
            stack.enter_context(scorers.group)
        source = Rollouts(cfg, generators, prompts, policy_path)
        stack.callback(source.close)
        sync = WeightSync(trainer, generators, cfg.engines.tensor_parallel_size if cfg.engines.backend == "vllm" else 1)
        console.print(f"weight sync from the trainer to the engines: {sync.mode}")
        tracker = Trackers(cfg, run_dir, purge_step=resume_step + 1)
        stack.callback(tracker.close, ok=False)  # after an error (closed already otherwise)
        try:
            groups = {"policy": trainer, "critic": critic} if ppo else {"policy": trainer}
            for group in groups.values():
                group.prepare(o.steps * updates_per_step, policy_path)
            if resume_step:
                for role, group in groups.items():
                    group.resume(str(run_dir / "online" / CHECKPOINT_DIRS[role]))
                weights = sync.push()
                if scorers is not None:
                    scorers.group.update_weights("policy", weights or trainer.publish_weights())
                source.load_pending(run_dir / "online" / CHECKPOINT_DIRS["policy"]
                                      / state["online_checkpoint"]["policy"]["tag"], resume_step + 1)
                console.print(f"resumed from the checkpoint of step {resume_step}")
            for step in range(resume_step + 1, o.steps + 1):
                timings = {}
                batch, timings["seconds_generate"] = source.take(step)  # one step off: only the wait for them
                samples, sequences = batch.samples, batch.sequences

                started = time.perf_counter()
                rewards = rollout_rewards(samples, cfg)
                if scorers is not None:
                    scored = scorers(samples)
                    rewards = rewards + o.score_weight * scored
                # log-probs of the policy that generated, and the reference
                behaviour = trainer.rollout_stats(sequences)
                if batch.behaviour is not None:  # one step off: the generating engine's, one update behind the trainer
                    for stats, logps in zip(behaviour, batch.behaviour):
                        if len(logps) != len(stats["logp"]):
                            raise RuntimeError("online: the engine's and the trainer's token counts differ for a "
                                               "rollout")
                        stats["logp"] = logps
                if ppo:  # KL goes into the per-token rewards; GAE over the critic's values
                    token_adv, returns, values = ppo_advantages(
                        rewards, behaviour, critic.rollout_stats(sequences), kl_coef=o.kl_coef,
                        kl_estimator=o.kl_estimator, gamma=o.gamma, lam=o.lam)
                    advantages = np.array([np.mean(a) for a in token_adv])
                else:
                    advantages = group_advantages(samples, rewards, o.algorithm)
                rollouts = samples.append_column("step", pa.array([step] * samples.num_rows, pa.int32())) \
                    .append_column("reward", pa.array(rewards)).append_column("advantage", pa.array(advantages))
                write_rollouts(rollouts, run_dir / "online" / f"step-{step:04d}", cfg, step)
                timings["seconds_reward"] = time.perf_counter() - started

                started = time.perf_counter()
                step_adv = token_adv if ppo else advantages.tolist()
                old, ref = [s["logp"] for s in behaviour], [s["ref_logp"] for s in behaviour]
                updates, critic_updates = [], []
                for rows in minibatch_order(len(sequences), o.mini_batch_size or len(sequences), o.ppo_epochs,
                                            seed=[cfg.sampling.seed, step]):
                    pick = lambda values: [values[i] for i in rows]  # noqa: E731
                    updates.append(trainer.update(pick(sequences), pick(step_adv), pick(old), pick(ref),
                                                  0.0 if ppo else o.kl_coef, o.kl_estimator, o.clip_eps))
                    if ppo:
                        critic_updates.append(critic.update(pick(sequences), pick(returns), pick(values), o.clip_eps))
                update = {k: float(np.mean([u[k] for u in updates])) for k in updates[0]
                          if k not in ("step", "seconds")}
                update["lr"] = updates[0]["lr"]
                critic_update = {"value_loss": float(np.mean([u["value_loss"] for u in critic_updates]))} if ppo else {}
                timings["seconds_train"] = time.perf_counter() - started

                started = time.perf_counter()
                source.settle()  # one step off: the next step's rollouts were generated with the weights before
                weights = sync.push()  # no driver hop: NCCL broadcast on CUDA, else published by the trainer
                if scorers is not None:
                    scorers.group.update_weights("policy", weights or trainer.publish_weights())
                timings["seconds_sync"] = time.perf_counter() - started

                langs = np.array(samples.column("lang").to_pylist())
                record = {"step": step, "stage": "online", "reward_mean": float(rewards.mean()),
                          **{f"reward_{lang}": float(rewards[langs == lang].mean()) for lang in cfg.languages},
                          **update, "updates": len(updates), "rollouts": samples.num_rows, **critic_update,
                          **{k: round(v, 3) for k, v in timings.items()}}
                log_metrics(run_dir, record)
                tracker.update()
                state["finished"].append(f"online/step-{step}")
                if o.checkpoint_every and step % o.checkpoint_every == 0:
                    state["online_checkpoint"] = save_checkpoints(run_dir, groups, step, source.save_pending)
                write_state(run_dir, state)
                prune_checkpoints(run_dir, state.get("online_checkpoint"))  # only once the new one is recorded
                console.print(f"step {step}/{o.steps}: reward {record['reward_mean']:.3f}  kl {record['kl']:.4f}  "
                              f"clip {record['clip_fraction']:.3f}  entropy {record['entropy']:.3f}  "
                              + "  ".join(f"{k.removeprefix('seconds_')} {v:.1f}s" for k, v in timings.items()))
            trainer.save(str(run_dir / "online" / "policy"))
            record_checksums(run_dir, state, run_dir / "online" / "policy")
            state["finished"].append("online/policy")
            write_state(run_dir, state)
            tracker.close()
        except ray.exceptions.RayActorError as e:  # generation and scoring actors are retried; a trainer rank is not
            raise trainer_lost(e, state, o.checkpoint_every) from None
    return run_dir


def trainer_lost(error, state: dict, checkpoint_every: int):
    """The message for a trainer (or critic) rank that died: what resumes when the same command runs again."""
    from rayalign.actors.trainer import TrainerLostError

    done = state.get("online_checkpoint", {}).get("step")
    resume = (f"resumes from the checkpoint of step {done} (online.checkpoint_every {checkpoint_every})" if done else
              "starts over from step 1 (no checkpoint yet; set online.checkpoint_every to resume mid-run)")
    return TrainerLostError(f"online: a trainer rank died ({str(error).splitlines()[0][:200]}); DeepSpeed cannot go "
                            f"on without it. Once the cluster is whole, the same command {resume}")


CHECKPOINT_DIRS = {"policy": "train.ckpt", "critic": "critic.ckpt"}


def save_checkpoints(run_dir: Path, groups: dict, step: int, add_to_policy=None) -> dict:
    """Every trainer group's DeepSpeed checkpoint of this step (`add_to_policy(tag_dir)` writes more files into the
    policy's); returns the record (tags and file checksums) that the run state keeps: a relaunch loads only
    checkpoints that match it."""

    record = {"step": step}
    for role, group in groups.items():
        directory = run_dir / "online" / CHECKPOINT_DIRS[role]
        tag = f"step-{group.checkpoint(str(directory))}"
        if role == "policy" and add_to_policy is not None:
            add_to_policy(directory / tag)
        record[role] = {"tag": tag, "files": directory_checksums(directory / tag)}
    return record


def prune_checkpoints(run_dir: Path, record: dict | None) -> None:
    """Every trainer group's checkpoint tags older than the recorded ones (`remove_older_tags`)."""
    for role, entry in (record or {}).items():
        if role != "step":
            remove_older_tags(run_dir / "online" / CHECKPOINT_DIRS[role], entry["tag"])


def rollout_problems(run_dir: Path, last_step: int) -> list[str]:
    """What is wrong with the rollout datasets of steps 1..last_step (missing, or failing their checksums)."""
    problems = []
    for step in range(1, last_step + 1):
        path = run_dir / "online" / f"step-{step:04d}"
        problems += [message for _, message in dataset_problems(path)] if path.is_dir() else [f"{path}: missing"]
    return problems


def resumable_step(run_dir: Path, state: dict, checkpoint_every: int, ppo: bool) -> int:
    """The step a relaunch continues after: the last recorded checkpoint's, when every checkpoint it needs and the
    rollouts of every step up to it are intact (0 otherwise). Outputs of later steps (rollouts, metrics, the final
    policy) are moved to the run's trash, so that the relaunch writes them again exactly as an uninterrupted run
    would; so are those of a run that recorded nothing (stopped in its first step, or its state.json lost)."""
    from rayalign.data.inspect import read_metrics

    online, metrics = run_dir / "online", run_dir / "metrics.jsonl"
    bad_lines = []
    records = read_metrics(run_dir, on_bad_line=lambda path, number: bad_lines.append(number))
    if not online.exists() and not bad_lines and not any(r.get("stage") == "online" for r in records):
        return 0  # a new run
    record = state.get("online_checkpoint") or {}
    roles = ("policy", "critic") if ppo else ("policy",)
    for role in roles:
        set_aside_untrusted_checkpoint(online / CHECKPOINT_DIRS[role], record.get(role), checkpoint_every, run_dir)
    intact = all((online / CHECKPOINT_DIRS[role]).is_dir() for role in roles)
    step = record.get("step", 0) if intact and record else 0
    trash = trash_dir(run_dir) / "online"
    damaged = rollout_problems(run_dir, step)
    if damaged:  # a kept step's rollouts cannot be written again from a later checkpoint: start over
        console.print(f"[yellow]{run_dir}: the rollouts of a step before the checkpoint of step {step} cannot be "
                      f"trusted[/] ({'; '.join(damaged[:3])}); starting over from step 1")
        step = 0
        for role in roles:
            if (online / CHECKPOINT_DIRS[role]).exists():
                trash.mkdir(parents=True, exist_ok=True)
                shutil.move(online / CHECKPOINT_DIRS[role], trash / CHECKPOINT_DIRS[role])
    later = [p for p in sorted(online.glob("step-*")) if int(p.name[5:]) > step]
    for path in later + [p for p in [online / "policy"] if p.exists()]:
        trash.mkdir(parents=True, exist_ok=True)
        shutil.move(path, trash / path.name)
    kept = [r for r in records if r.get("stage") != "online" or r.get("step", 0) <= step]
    if bad_lines or len(kept) < len(records):
        if bad_lines:  # a line cut short by a kill, or edited: the file as it was goes to the trash
            trash.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(metrics, trash.parent / "metrics.jsonl")
            console.print(f"{metrics}: line(s) {', '.join(map(str, bad_lines[:5]))} not a metrics record (a write "
                          f"cut short); dropped, the file as it was copied to {trash.parent}")
        atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))
    state["finished"] = [f"online/step-{s}" for s in range(1, step + 1)]
    if step:
        console.print(f"{run_dir}: continuing after step {step} (its checkpoint verified)")
    else:
        console.print(f"{run_dir}: no usable checkpoint (online.checkpoint_every {checkpoint_every}); starting over "
                      f"from step 1, earlier outputs moved to {trash.parent}")
        state.pop("online_checkpoint", None)
    return step


class ScoredReward:
    """The recipe's scored reward on each step's rollouts, by ScoringActors that hold the models (their policy
    copy is synced with the trainer after every update, like the generation engines). LaCoMSA's centroids from
    rewards.latent.centroid_texts are pooled again on every step, by the policy that scores its rollouts, as each
    offline iteration pools them by its own policy."""

    def __init__(self, cfg: RunConfig, policy_path: str):
        from rayalign.actors.scorer import ScoringGroup
        from rayalign.methods import REWARD_COLUMN

        self.cfg, self.column = cfg, REWARD_COLUMN[cfg.online.score_reward]
        roles, self.specs, self.reward_model, self.layers = scoring_setup(cfg, policy_path)
        self.group = ScoringGroup.for_recipe(roles, cfg.rewards)

    def __call__(self, samples: pa.Table) -> np.ndarray:
        from rayalign.actors.pool import split_shards

        cfg = self.cfg
        samples = with_scoring_prompts(cfg, samples)
        shards = split_shards(samples, max(1, samples.num_rows // max(1, cfg.rewards.actors)))
        table = self.group.gather(shards, self.specs, self.reward_model)
        table, _ = forward_rewards(cfg, table, stage_centroids(cfg, self.group, self.layers))
        keys = ("prompt_id", "lang", "sample_idx")
        if list(zip(*(table.column(k).to_pylist() for k in keys))) != list(zip(*(samples.column(k).to_pylist()
                                                                               for k in keys))):
            raise RuntimeError("online: scored rows came back in another order than the rollouts")
        values = table.column(self.column).to_numpy(zero_copy_only=False).astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"online: {self.column} has non-finite values on this step's rollouts")
        return values


def write_rollouts(table: pa.Table, out_dir: Path, cfg: RunConfig, step: int) -> dict:
    writer = DatasetWriter(out_dir, "rollouts", config_hash=cfg.config_hash(), languages=cfg.languages,
                           models={"policy": cfg.policy.path}, seeds={"run_seed": cfg.sampling.seed, "step": step},
                           description=f"Online {cfg.online.algorithm} rollouts of step {step} with rewards and "
                                       "advantages.", params={"online": json.loads(json.dumps(
                                           dataclasses.asdict(cfg.online)))})
    writer.write_shard(0, table)
    return writer.finalize(expected_shards=1)
