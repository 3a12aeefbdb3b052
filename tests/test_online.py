"""Online RL: rewards and advantages by hand, weight sync to the engines, and a reward that rises."""

import json
import re

import numpy as np
import pyarrow as pa
import pytest

from conftest import REPO
from rayalign.config import ModelConfig, load_config


def samples_table(rows):
    keys = ["prompt_id", "lang", "lang_detected", "num_tokens"]
    return pa.table({k: [r[i] for r in rows] for i, k in enumerate(keys)})


def test_rewards_and_group_advantages_by_hand():
    from rayalign.training.rollouts import group_advantages, rollout_rewards

    table = samples_table([("a", "de", "de", 8), ("a", "de", "en", 16), ("a", "en", "en", 4), ("a", "en", "en", 12)])
    cfg = load_config(None, ["mode=online", "online.length_weight=0.5", "sampling.max_new_tokens=16"])
    rewards = rollout_rewards(table, cfg)
    assert rewards.tolist() == pytest.approx([1 - 0.25, 0 - 0.5, 1 - 0.125, 1 - 0.375])
    # GRPO over (a, de) and (a, en): (r - mean) / (sample std + 1e-6); two members -> +-1/sqrt(2)
    grpo = group_advantages(table, rewards, "grpo")
    assert grpo.tolist() == pytest.approx([2 ** -0.5, -(2 ** -0.5), 2 ** -0.5, -(2 ** -0.5)], abs=1e-5)
    rloo = group_advantages(table, rewards, "rloo")  # r_i - the other member's reward
    assert rloo.tolist() == pytest.approx([1.25, -1.25, 0.25, -0.25])
    cfg = load_config(None, ["mode=online", "online.target_language=de"])
    assert rollout_rewards(table, cfg).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_rewards_weigh_fidelity_and_the_users_file_and_cap_the_length_term():
    from rayalign.training.rollouts import rollout_rewards

    table = samples_table([("a", "de", "de", 16), ("a", "de", "en", 4)]).append_column(
        "response", pa.array(["Hallo", "Hello there"]))
    cfg = load_config(None, ["mode=online", "online.fidelity_weight=2", "online.user_weight=0.5",
                             "online.length_weight=0.5", "sampling.max_new_tokens=8",
                             f"rewards.user.path={REPO / 'examples/rewards/language_fidelity.py'}"])
    # 2 x fidelity + 0.5 x (fidelity - 0.001 x characters) - 0.5 x min(tokens, 8) / 8
    assert rollout_rewards(table, cfg).tolist() == pytest.approx([2 + 0.5 * (1 - 0.005) - 0.5,
                                                                  0 + 0.5 * (0 - 0.011) - 0.25])


def test_rollout_sequences_keep_the_end_of_turn_only_when_generated(tiny_model):
    from rayalign.models import encode_response, load_tokenizer
    from rayalign.training.rollouts import rollout_sequences

    tok = load_tokenizer(tiny_model)
    messages = [{"role": "user", "content": "Hola"}]
    table = pa.table({"messages": [messages, messages], "response": ["Buenos días", "Buenos días"],
                      "finish_reason": ["stop", "length"]})
    stop, cut = rollout_sequences(tok, table)
    prompt, response = encode_response(tok, messages, "Buenos días")
    assert stop == (prompt, response) and cut == (prompt, response[:-1]) and response[-1] == tok.eos_token_id


def greetings(model_path: str) -> list:
    """Four short (prompt ids, response ids) rollouts, templated as every teacher-forced pass sees them."""
    from rayalign.models import encode_response, load_tokenizer

    tok = load_tokenizer(model_path)
    return [encode_response(tok, [{"role": "user", "content": q}], a)
            for q, a in [("Hi", "Hello there"), ("Hallo", "Guten Tag"), ("Hola", "Buenas"), ("Salut", "Bonjour")]]


def test_generation_engines_take_the_trainers_weights(ray_session, tiny_model):
    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.scorer import ModelRole, ScoringGroup
    from rayalign.actors.rl_trainer import PolicyGroup
    from rayalign.actors.weight_sync import WeightSync

    cfg = load_config(None, [f"policy.path={tiny_model}", "training.micro_batch_size=4", "training.lr=1.0e-3",
                             "training.warmup_ratio=0.0"])
    sequences = greetings(tiny_model)
    generators = GenerationGroup(tiny_model, ModelConfig(path=tiny_model), cfg.engines)
    trainer = PolicyGroup(tiny_model, ModelConfig(path=tiny_model), cfg.training)
    try:
        before = generators.weights()[0]
        trainer.prepare(2, tiny_model)
        stats = trainer.rollout_stats(sequences)
        old, ref = [s["logp"] for s in stats], [s["ref_logp"] for s in stats]
        update = trainer.update(sequences, [1.0, -1.0, 0.5, -0.5], old, ref, 0.1, "k3", 0.2)
        assert update["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the reference
        sync = WeightSync(trainer, generators)
        assert sync.mode == "object store"  # CPU actors
        published = sync.push()  # put by the trainer actor; the driver holds only the reference
        assert isinstance(published, ray_session.ObjectRef)
        after = generators.weights()[0]
        scorers = ScoringGroup({"policy": ModelRole(tiny_model, ModelConfig(path=tiny_model))}, 1, 8, 1, 0)
        scorers.update_weights("policy", published)
        params = trainer.parameters()
        scored = scorers.weights("policy")[0]
        scorers.shutdown()
    finally:
        generators.shutdown()
        trainer.shutdown()
    assert after.keys() == params.keys() == scored.keys()
    assert all(np.array_equal(after[k], params[k]) and np.array_equal(scored[k], params[k]) for k in params)
    assert all(not np.array_equal(after[k], before[k]) for k in params)


def test_second_ppo_epoch_moves_the_ratio_and_the_clip_engages(ray_session, tiny_model):
    """Two updates on one rollout batch against the log-probs recorded before the first: the first sees ratio 1
    (no clipping, approx KL 0); the second, after a large step, sees ratios away from 1 and a tight clip acts."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayalign.actors.rl_trainer import PolicyGroup
    from rayalign.losses.rl import token_entropy

    cfg = load_config(None, [f"policy.path={tiny_model}", "training.micro_batch_size=4", "training.lr=1.0e-2",
                             "training.warmup_ratio=0.0"])
    sequences = greetings(tiny_model)
    trainer = PolicyGroup(tiny_model, ModelConfig(path=tiny_model), cfg.training)
    try:
        trainer.prepare(2, tiny_model)
        stats = trainer.rollout_stats(sequences)
        old, ref = [s["logp"] for s in stats], [s["ref_logp"] for s in stats]
        advantages = [1.0, -1.0, 1.0, -1.0]
        first = trainer.update(sequences, advantages, old, ref, 0.0, "k3", 1e-3)
        second = trainer.update(sequences, advantages, old, ref, 0.0, "k3", 1e-3)
    finally:
        trainer.shutdown()
    assert first["clip_fraction"] == 0.0 and first["approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert second["approx_kl"] > 1e-4 and second["clip_fraction"] > 0.2
    assert first["grad_norm"] > 0 and second["grad_norm"] > 0
    # entropy of the first update: the starting model's next-token distributions over the response positions
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    entropies = []
    with torch.no_grad():
        for prompt, response in sequences:
            logits = model(torch.tensor([prompt + response])).logits[0]
            entropies += token_entropy(logits[len(prompt) - 1:-1]).tolist()
    assert first["entropy"] == pytest.approx(sum(entropies) / len(entropies), rel=1e-4)


def test_online_grpo_raises_an_easily_learnable_reward(ray_session, tiny_model, tmp_path):
    """A length reward (shorter is better) on the tiny model: the engines sample from the updated weights,
    so the mean reward of later steps rises clearly above the first steps'."""
    from rayalign.data.store import read_dataset
    from rayalign.pipelines import online

    cfg = load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={tiny_model}", "online.fidelity_weight=0", "online.length_weight=1.0", "online.steps=8",
        "training.lr=3.0e-4"])
    run_dir = online.run(cfg, tmp_path / "online")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [s["reward_mean"] for s in steps]
    assert len(steps) == 8 and all(s["seconds_train"] > 0 for s in steps)
    # KL to the reference: zero while the policy is the reference (step 1), then the updates move it away
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and min(s["kl"] for s in steps[2:]) > 1e-6
    assert np.mean(rewards[-3:]) > np.mean(rewards[:2]) + 0.1, rewards
    rollouts = read_dataset(run_dir / "online" / "step-0008", "rollouts")
    assert rollouts.num_rows == 2 * 5 * 4 and set(rollouts.column("step").to_pylist()) == {8}
    assert rollouts.column("reward").to_numpy().mean() == pytest.approx(rewards[-1])
    assert (run_dir / "online" / "policy" / "config.json").is_file()


def test_openrlhf_reward_file_calls_rayalign_rewards(tmp_path):
    """The generated file, imported as OpenRLHF imports it, scores prompt + response strings by hand's numbers."""
    import importlib.util

    from click.testing import CliRunner

    from rayalign.cli import main

    path = tmp_path / "reward_func.py"
    result = CliRunner().invoke(main, ["online", str(REPO / "examples" / "online-grpo-quickstart.yaml"),
                                       "--openrlhf-reward-file", str(path), "-o", "online.length_weight=0.5"])
    assert result.exit_code == 0, result.output
    spec = importlib.util.spec_from_file_location("reward_func", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prompts = ["<user>Wie spät ist es?</s><assistant>", "<user>What time is it?</s><assistant>"]
    responses = ["Es ist schon sehr spät am Abend, wir sollten nach Hause gehen.",
                 "Es ist schon sehr spät am Abend, wir sollten nach Hause gehen."]
    out = module.reward_func([p + r for p, r in zip(prompts, responses)], prompts, ["de", "en"])
    from rayalign.config import TINY_MODEL
    from rayalign.models import load_tokenizer, resolve_model_path

    tokens = len(load_tokenizer(resolve_model_path(TINY_MODEL))(responses[0], add_special_tokens=False)["input_ids"])
    penalty = 0.5 * min(tokens, 32) / 32  # generated tokens over the recipe's max_new_tokens, as online computes it
    assert out["rewards"].tolist() == pytest.approx([1 - penalty, 0 - penalty])
    assert out["extra_logs"]["language_fidelity"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="does not start with its prompt"):
        module.reward_func(["x"], ["y"], ["de"])


def test_ppo_advantages_by_hand():
    """Two sequences (3 and 2 response tokens): KL-shaped token rewards, GAE with gamma 1, lambda 0.5, whitening."""
    import math

    from rayalign.training.rollouts import ppo_advantages

    policy = [{"logp": [-1.0, -2.0, -1.0], "ref_logp": [-1.0, -1.5, -1.0]},
              {"logp": [-0.5, -0.5], "ref_logp": [-0.5, -1.0]}]
    critic = [{"value": [0.1, 0.2, 0.3]}, {"value": [0.0, -0.2]}]
    adv, returns, values = ppo_advantages(np.array([1.0, -1.0]), policy, critic, kl_coef=0.2, kl_estimator="k1",
                                          gamma=1.0, lam=0.5)
    # k1 = logp - ref; token rewards -0.2 * k1, plus the sequence reward at the last token
    r1, r2 = [0.0, 0.1, 1.0], [0.0, -0.1 - 1.0]
    d1 = [r1[0] + 0.2 - 0.1, r1[1] + 0.3 - 0.2, r1[2] + 0.0 - 0.3]
    d2 = [r2[0] - 0.2 - 0.0, r2[1] + 0.0 + 0.2]
    a1 = [d1[0] + 0.5 * (d1[1] + 0.5 * d1[2]), d1[1] + 0.5 * d1[2], d1[2]]
    a2 = [d2[0] + 0.5 * d2[1], d2[1]]
    assert returns == [pytest.approx([a + v for a, v in zip(a1, [0.1, 0.2, 0.3])]),
                       pytest.approx([a + v for a, v in zip(a2, [0.0, -0.2])])]
    flat = a1 + a2
    mean = sum(flat) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / 4)
    assert adv[0] + adv[1] == pytest.approx([(x - mean) / (std + 1e-8) for x in flat])
    assert values == [pytest.approx([0.1, 0.2, 0.3]), pytest.approx([0.0, -0.2])]


def test_online_ppo_runs_with_a_critic(ray_session, tiny_model, tmp_path):
    from rayalign.pipelines import online

    cfg = load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={tiny_model}", "online.algorithm=ppo", "online.steps=4", "online.critic_lr=1.0e-3",
        "online.prompts_per_step=1", "training.micro_batch_size=4"])
    run_dir = online.run(cfg, tmp_path / "ppo")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(np.isfinite(s["value_loss"]) for s in steps)
    # the critic fits the returns; one prompt per step makes single steps noisy, so not every step beats the first
    assert min(s["value_loss"] for s in steps[1:]) < steps[0]["value_loss"]


def test_online_lacomsa_reward_equals_the_offline_scoring_of_the_same_rollouts(ray_session, tiny_model, tmp_path):
    """Step 1 (still the starting policy): each rollout's reward = fidelity + 0.5 r_lacomsa, where r_lacomsa comes
    from scoring the step's rollouts with the offline score stage (English anchors of the same prompt in the step)."""
    from rayalign.data.store import DatasetWriter, read_dataset
    from rayalign.pipelines import offline, online

    cfg = load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={tiny_model}", "online.steps=1", "online.score_weight=0.5", "rewards.latent.enabled=true",
        "rewards.actors=1", "training.micro_batch_size=8"])
    run_dir = online.run(cfg, tmp_path / "online")
    rollouts = read_dataset(run_dir / "online" / "step-0001", "rollouts")
    writer = DatasetWriter(tmp_path / "samples", "samples")
    writer.write_shard(0, rollouts)
    writer.finalize(expected_shards=1)
    offline.score_stage(cfg, tmp_path / "samples", tiny_model, 1, tmp_path / "scores")
    scores = read_dataset(tmp_path / "scores", "scores")
    key = lambda t: list(zip(*(t.column(k).to_pylist() for k in ("prompt_id", "lang", "sample_idx"))))  # noqa: E731
    r_lacomsa = dict(zip(key(scores), scores.column("r_lacomsa").to_pylist()))
    fidelity = [float(a == b) for a, b in zip(rollouts.column("lang").to_pylist(),
                                               rollouts.column("lang_detected").to_pylist())]
    expected = [f + 0.5 * r_lacomsa[k] for f, k in zip(fidelity, key(rollouts))]
    assert rollouts.column("reward").to_pylist() == pytest.approx(expected, abs=1e-4)
    assert max(abs(e - f) for e, f in zip(expected, fidelity)) > 1e-3


@pytest.mark.parametrize("overrides, expected", [
    (["online.algorithm=rloo", "sampling.n=1"], "sampling.n: online.algorithm rloo compares the samples of a prompt"),
    (["sampling.n=1"], "sampling.n: online.algorithm grpo compares the samples of a prompt (group advantages), so n "
                       "must be >= 2, got 1"),
    (["online.fidelity_weight=0"], "online.fidelity_weight: 0, and so are online.user_weight, score_weight and "
                                   "length_weight: every rollout gets the same reward"),
    (["online.lam=0.9", "online.critic_lr=0.001"], "online.lam, online.critic_lr: PPO settings (the critic and GAE), "
                                                   "unused by online.algorithm grpo"),
    (["online.steps=3", "online.checkpoint_every=4"], "online.checkpoint_every: 4 is more than online.steps 3, so no "
                                                      "checkpoint would be saved"),
])
def test_online_recipes_that_cannot_learn_are_refused(overrides, expected):
    """RLOO with one sample per prompt failed after Ray started ("group 0 has 1"); GRPO with one, or no reward,
    trained on zero advantages; GAE settings with GRPO, and checkpoints past the last step, were silently unused."""
    from rayalign.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(REPO / "examples" / "online-grpo-quickstart.yaml", overrides)
    load_config(REPO / "examples" / "online-grpo-quickstart.yaml", ["online.algorithm=ppo", "sampling.n=1",
                                                                     "online.lam=0.9", "online.checkpoint_every=0"])


def test_recipes_mixing_offline_and_online_settings_are_refused_with_the_keys():
    from rayalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"^-o 'online.kl_coef=0.1': online.steps, online.kl_coef: online settings "
                                          r"in an offline recipe; set mode: online"):
        load_config(None, ["online.steps=3", "online.kl_coef=0.1"])
    with pytest.raises(ConfigError, match=r"^-o 'training.loss=dpo': iterations, pairs.method, training.loss: offline "
                                          r"settings in an online recipe"):
        load_config(None, ["mode=online", "iterations=2", "pairs.method=msa", "training.loss=dpo"])
    assert load_config(REPO / "examples" / "online-grpo-quickstart.yaml").mode == "online"
    offline = load_config(REPO / "examples" / "quickstart.yaml")
    assert offline.mode == "offline" and "mode" not in offline.to_dict()["online"]


def test_launch_runs_an_online_recipe_online_after_a_refusal_for_its_cpus(ray_session, tiny_model, tmp_path):
    """First a launch refused for its CPUs: the CPU check needs the cluster, and the run directory is written only
    after it, so it leaves no run behind and the next launch into the same directory, with another config, runs
    (it was refused as 'holds a run with another config')."""
    from click.testing import CliRunner

    from rayalign.cli import main

    run_dir = tmp_path / "online"
    args = ["launch", str(REPO / "examples" / "online-grpo-quickstart.yaml"), "--run-dir", str(run_dir),
            "-o", f"policy.path={tiny_model}"]
    refused = CliRunner().invoke(main, args + ["-o", "online.steps=1", "-o", "online.algorithm=ppo",
                                               "-o", "engines.num_cpus=2", "-o", "training.num_cpus=2"])
    assert refused.exit_code == 2 and "need 6 CPUs; the cluster has 4" in " ".join(refused.output.split())
    assert not (run_dir / "state.json").exists() and not (run_dir / "config.yaml").exists()
    # trainer ranks auto: 40 rollouts in micro-batches of 4 allow 1, 2, 5 or 10 ranks; beside the engine, 2 fit
    result = CliRunner().invoke(main, args + ["-o", "online.steps=2", "-o", "training.world_size=auto",
                                              "-o", "training.micro_batch_size=4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    phases = {p["phase"]: p["actors"] for p in json.loads((run_dir / "plan.json").read_text())["phases"]}
    assert phases == {"generate": 1, "train": 2}
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert {"reward_mean", "kl", "clip_fraction", "seconds_generate", "seconds_reward", "seconds_train",
                "seconds_sync"} <= set(s)
        assert {f"reward_{lang}" for lang in ("en", "es", "de", "fr", "ru")} <= set(s)
    # the plan it ran on, per step; inspect sets the measured steps beside it, validate checks every step's rollouts
    estimate = json.loads((run_dir / "plan.json").read_text())["estimate"]
    assert estimate["unit"] == "step" and set(estimate["phases"]) == {"generate", "reward", "train"}
    shown = CliRunner().invoke(main, ["inspect", str(run_dir)], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    table = shown.output.split("online steps")[1]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.strip()}
    assert float(rows["1"][0]) == pytest.approx(steps[0]["reward_mean"], rel=1e-3)
    mean_generate = sum(s["seconds_generate"] for s in steps) / 2
    assert float(rows["mean"][4]) == pytest.approx(mean_generate, rel=1e-2)
    assert rows["estimate"] == [f"{estimate['phases'][p]['seconds']:.3g}" for p in ("generate", "reward", "train")]
    checked = CliRunner().invoke(main, ["validate", str(run_dir)], catch_exceptions=False)
    assert checked.exit_code == 0 and checked.output.count("rollouts v1") == 2, checked.output


def test_online_run_resumes_from_its_last_checkpoint(ray_session, tiny_model, tmp_path, capsys):
    """A run interrupted after step 2's checkpoint (step 3 not recorded) continues from it: step 3's rollouts equal
    the uninterrupted run's exactly, the final policy within 1e-6."""
    import shutil

    from safetensors.numpy import load_file

    from rayalign.data.store import read_dataset
    from rayalign.pipelines import online

    cfg = load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={tiny_model}", "languages=[en,de]", "online.steps=3", "online.checkpoint_every=2",
        "online.prompts_per_step=1"])
    run_dir = online.run(cfg, tmp_path / "run")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["online_checkpoint"]["step"] == 2 and state["finished"][-2:] == ["online/step-3", "online/policy"]
    expected_rollouts = read_dataset(run_dir / "online" / "step-0003", "rollouts")
    expected_policy = load_file(run_dir / "online" / "policy" / "model.safetensors")

    finished = run_dir / "state.json", run_dir / "metrics.jsonl", run_dir / "online" / "policy" / "model.safetensors"
    before = {f: f.read_bytes() for f in finished}
    capsys.readouterr()
    online.run(cfg, run_dir)  # a finished run is kept: nothing runs again, nothing moves
    assert "online/policy: finished earlier (3 steps), kept" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in finished} == before and not list(run_dir.glob("trash-*"))
    from rayalign.pipelines.evaluate import run_policy

    assert run_policy(cfg, run_dir) == (str(run_dir / "online" / "policy"), "online/policy", "online")  # eval's default

    state["finished"].remove("online/step-3")  # as if killed during step 3, after step 2's checkpoint
    state["finished"].remove("online/policy")
    (run_dir / "state.json").write_text(json.dumps(state))
    shutil.rmtree(run_dir / "online" / "policy")
    online.run(cfg, run_dir)

    assert read_dataset(run_dir / "online" / "step-0003", "rollouts").equals(expected_rollouts)
    resumed = load_file(run_dir / "online" / "policy" / "model.safetensors")
    assert resumed.keys() == expected_policy.keys()
    assert max(float(np.abs(resumed[k] - expected_policy[k]).max()) for k in resumed) <= 1e-6
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("stage") == "online"]
    assert steps == [1, 2, 3]  # step 3's first record went with the interrupted outputs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()  # both launches' event files: step 3 of the first was dropped with its metrics line
    assert [e.step for e in events.Scalars("online/reward_mean")] == [1, 2, 3]


def test_an_online_checkpoint_that_was_changed_is_not_loaded(ray_session, tiny_model, tmp_path):
    from rayalign.pipelines import online

    cfg = load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={tiny_model}", "languages=[en,de]", "online.steps=1", "online.checkpoint_every=1",
        "online.prompts_per_step=1"])
    run_dir = online.run(cfg, tmp_path / "run")
    tag = json.loads((run_dir / "state.json").read_text())["online_checkpoint"]["policy"]["tag"]
    planted = next((run_dir / "online" / "train.ckpt" / tag).glob("*model_states.pt"))
    planted.write_bytes(planted.read_bytes() + b"tampered")
    state = json.loads((run_dir / "state.json").read_text())
    state["finished"].remove("online/policy")  # as if killed before the final policy was saved
    (run_dir / "state.json").write_text(json.dumps(state))
    online.run(cfg, run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] == ["online/step-1", "online/policy"] and state["online_checkpoint"]["step"] == 1
    assert list(run_dir.glob("trash-*/online/train.ckpt"))  # the changed checkpoint was set aside, not loaded


@pytest.mark.slow
def test_sigkill_mid_online_run_resumes_to_the_uninterrupted_result(ray_session, tiny_model, tmp_path):
    """`rayalign launch` of an online recipe SIGKILLed (driver, local Ray, actors) once step 2's checkpoint exists,
    then launched again: the later steps' rollouts equal an uninterrupted run's, the final policy within 1e-6."""
    import sys

    from safetensors.numpy import load_file
    from test_resilience import launch_and_kill, launch_subprocess

    from rayalign.data.store import read_dataset

    def command(run_dir):
        return [sys.executable, "-m", "rayalign.cli", "launch", "--cluster", "local",
                str(REPO / "examples" / "online-grpo-quickstart.yaml"), "--run-dir", str(run_dir),
                "-o", f"policy.path={tiny_model}", "-o", "languages=[en,de]", "-o", "online.steps=4",
                "-o", "online.checkpoint_every=2", "-o", "online.prompts_per_step=1"]

    killed, straight, log = tmp_path / "killed", tmp_path / "straight", tmp_path / "launch.log"
    launch_and_kill(command(killed), log, killed / "online" / "train.ckpt" / "latest", timeout=600)
    assert not (killed / "online" / "policy").exists()
    launch_subprocess(command(killed), log)
    launch_subprocess(command(straight), log)
    for step in (3, 4):
        path = f"online/step-{step:04d}"
        assert read_dataset(killed / path, "rollouts").equals(read_dataset(straight / path, "rollouts")), step
    a, b = (load_file(run / "online" / "policy" / "model.safetensors") for run in (killed, straight))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def test_online_scored_lacomsa_takes_its_centroids_from_the_text_files(ray_session, tiny_model, tmp_path):
    """ScoredReward pools rewards.latent.centroid_texts on its own scoring actors (the policy of the step): its
    r_lacomsa equals the rewards of the same rollouts scored here by the engine, with centroids pooled here from the
    text lines, and differs from the run-centroid rewards."""
    import torch

    from rayalign.data.schemas import schema_for
    from rayalign.engines.hf import HFEngine
    from rayalign.pipelines.online import ScoredReward
    from rayalign.scoring.centroid_texts import centroid_spec, centroid_text_rows, centroids_from_table
    from rayalign.scoring.forward import forward_rows
    from rayalign.scoring.setup import forward_rewards, scoring_setup

    torch.set_num_threads(2)
    texts = {"en": "The cat sleeps on the mat.\nIt rains today.\n", "de": "Die Katze schläft.\nHeute regnet es.\n"}
    for lang, text in texts.items():
        (tmp_path / f"{lang}.txt").write_text(text, encoding="utf-8")
    cfg = load_config(None, ["mode=online", "languages=[en,de]", f"policy.path={tiny_model}", "online.score_weight=1",
                             "rewards.latent.enabled=true", "rewards.latent.alpha=2", "rewards.actors=1",
                             "rewards.batch_size=4", *(f"rewards.latent.centroid_texts.{lang}={tmp_path / f'{lang}.txt'}" for lang in texts)])
    answers = {("p1", "en"): ["An apple.", "A pear."], ("p1", "de"): ["Ein Apfel.", "An apple."],
               ("p2", "en"): ["Red.", "Blue sky."], ("p2", "de"): ["Rot.", "Blau."]}
    samples = pa.Table.from_pylist([
        {"prompt_id": p, "lang": lang, "messages": [{"role": "user", "content": f"Question {p} in {lang}"}],
         "reference": None, "source": "test", "sample_idx": k, "response": response, "num_tokens": 3,
         "finish_reason": "stop", "seed": 0, "policy": "tiny", "lang_detected": lang}
        for (p, lang), responses in answers.items() for k, response in enumerate(responses)],
        schema=schema_for("samples")[1])
    scorer = ScoredReward(cfg, tiny_model)
    try:
        got = scorer(samples)
    finally:
        scorer.group.shutdown()
    _, specs, _, layers = scoring_setup(cfg, tiny_model)
    engines = {"policy": HFEngine(tiny_model, batch_size=4)}
    forward = forward_rows(engines, samples, specs)
    centroids = centroids_from_table(forward_rows(engines, centroid_text_rows(cfg.rewards.latent.centroid_texts),
                                                  [centroid_spec(layers["h_last"])]))
    expected = forward_rewards(cfg, forward, centroids)[0].column("r_lacomsa").to_numpy()
    run_own = forward_rewards(cfg, forward)[0].column("r_lacomsa").to_numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # the tiny model's states are nearly parallel, so phi moves little; alpha 2 is near w's steepest point
    assert np.abs(run_own - expected).max() > 5e-4


def test_online_groups_started_before_a_failing_one_are_shut_down(ray_session, tiny_model, tmp_path):
    """W&B starts after the engines and the trainer did: when it cannot start (a project name it refuses), the run
    stops, and the engines' CPUs and the trainer's placement group are given back (while the error, and so the
    groups' handles, are still held)."""
    import time

    import ray
    from ray.util import placement_group_table

    from rayalign.config import ConfigError
    from rayalign.pipelines import online

    cfg = load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={tiny_model}", "online.steps=1", "logging.wandb.project=team/project",
        "logging.wandb.mode=offline", "training.micro_batch_size=8"])
    before = set(placement_group_table())
    cpus = ray.available_resources().get("CPU", 0)
    with pytest.raises(ConfigError, match="logging.wandb: W&B could not start the run") as stopped:
        online.run(cfg, tmp_path / "online")
    started = {k: v for k, v in placement_group_table().items() if k not in before}
    assert started and all(v["state"] == "REMOVED" for v in started.values()), started  # the trainer's
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= cpus, (ray.available_resources(), cpus)
    assert stopped.value.__traceback__ is not None  # the frames holding the groups were alive throughout


def test_online_scored_reward_layers_are_checked_before_any_actor_starts(ray_session, tiny_model, tmp_path):
    from ray.util import placement_group_table

    from rayalign.config import ConfigError
    from rayalign.pipelines import online

    cfg = load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={tiny_model}", "online.steps=1", "online.score_weight=1.0", "rewards.latent.enabled=true",
        "rewards.latent.hub_layer=99", "rewards.actors=1"])
    before = set(placement_group_table())
    with pytest.raises(ConfigError, match="rewards.latent.hub_layer: 99 is beyond the model's"):
        online.run(cfg, tmp_path / "online")
    assert set(placement_group_table()) == before and not (tmp_path / "online" / "state.json").exists()


class Stop(Exception):
    """Raised where a killed run would have stopped."""


def test_an_online_run_stopped_between_a_checkpoint_and_its_record_resumes_from_the_one_before(
        ray_session, tiny_model, tmp_path, monkeypatch, capsys):
    """Stopped after step 2's checkpoint was saved, before state.json recorded it: the recorded step-1 checkpoint
    had already been deleted, so the relaunch started over (and step 2's metrics line stayed twice). Then a damaged
    rollout shard of a kept step and a metrics line cut short: a traceback, or the damage kept."""
    from safetensors.numpy import load_file

    from rayalign.pipelines import online

    cfg = load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={tiny_model}", "languages=[en,de]", "online.steps=2", "online.checkpoint_every=1",
        "online.prompts_per_step=1"])
    run_dir, write_state, calls = tmp_path / "run", online.write_state, []

    def stop_at_step_2(path, state):
        calls.append(1)
        if len(calls) == 2:  # the record of step 2, after its checkpoint was saved
            raise Stop
        write_state(path, state)

    monkeypatch.setattr(online, "write_state", stop_at_step_2)
    with pytest.raises(Stop):
        online.run(cfg, run_dir)
    monkeypatch.setattr(online, "write_state", write_state)
    tags = lambda: sorted(p.name for p in (run_dir / "online" / "train.ckpt").iterdir() if p.is_dir())  # noqa: E731
    assert tags() == ["step-1", "step-2"]
    capsys.readouterr()
    online.run(cfg, run_dir)
    assert "continuing after step 1 (its checkpoint verified)" in " ".join(capsys.readouterr().err.split())
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2]
    assert tags() == ["step-2"]
    policy = load_file(run_dir / "online" / "policy" / "model.safetensors")

    shard = run_dir / "online" / "step-0001" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "stage": "onl')
    online.run(cfg, run_dir)
    err = " ".join(capsys.readouterr().err.split())
    assert "online/policy: not kept" in err and "step-0001/part-00000.parquet" in "".join(err.split())
    assert "starting over from step 1" in err and "line(s) 3 not a metrics record" in err
    assert [p.read_text().count("\n") for p in run_dir.glob("trash-*/metrics.jsonl")] == [2]
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2]
    again = load_file(run_dir / "online" / "policy" / "model.safetensors")
    assert max(float(np.abs(again[k] - policy[k]).max()) for k in policy) <= 1e-6


def test_outputs_of_an_online_run_that_recorded_no_step_are_set_aside(tmp_path):
    """Stopped in step 1 before its record (or state.json lost): the relaunch kept the old step-1 metrics line
    beside the new one and wrote over the old rollouts in place."""
    from rayalign.pipelines.online import resumable_step

    run_dir = tmp_path / "run"
    (run_dir / "online" / "step-0001").mkdir(parents=True)
    (run_dir / "online" / "step-0001" / "part-00000.parquet").write_bytes(b"rows of the stopped step")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "stage": "online", "reward_mean": 0.5}) + "\n")
    state = {"config_hash": "0" * 16, "finished": []}
    assert resumable_step(run_dir, state, checkpoint_every=1, ppo=False) == 0
    assert not (run_dir / "online" / "step-0001").exists() and (run_dir / "metrics.jsonl").read_text() == ""
    assert [p.read_bytes() for p in run_dir.glob("trash-*/online/step-0001/part-00000.parquet")] == \
        [b"rows of the stopped step"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert resumable_step(fresh, {"finished": []}, checkpoint_every=1, ppo=False) == 0
    assert sorted(p.name for p in fresh.iterdir()) == []  # a new run: nothing to set aside


def test_one_response_token_whitens_to_zero_advantage():
    """Whitening one token divided by the std of one value: NaN advantages, a NaN loss, and nothing learned."""
    from rayalign.training.rollouts import ppo_advantages

    adv, returns, _ = ppo_advantages(np.array([1.0]), [{"logp": [-1.0], "ref_logp": [-1.0]}], [{"value": [0.25]}],
                                     kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=1.0)
    assert adv == [[0.0]] and returns == [[pytest.approx(1.0)]]  # return = reward; delta 0.75 centred to 0


def test_the_critic_value_head_starts_from_the_training_seed(tiny_model):
    """The value head was initialised from the unseeded global RNG: two PPO runs of one recipe differed."""
    import torch

    from rayalign.actors.rl_trainer import CriticTrainer
    from rayalign.config import TrainingConfig

    def head(seed: int, noise: int):
        torch.manual_seed(noise)  # whatever the actor's RNG held before
        critic = object.__new__(CriticTrainer)
        critic.model_path, critic.device, critic.model_cfg = tiny_model, "cpu", ModelConfig(path=tiny_model)
        critic.t = TrainingConfig(seed=seed)
        return critic._load_model("float32").score.weight.detach().clone()

    assert torch.equal(head(0, noise=1), head(0, noise=2))
    assert not torch.equal(head(0, noise=1), head(1, noise=1))


def test_trainers_forward_without_dropout(tiny_model, tmp_path):
    """The critic's token-classification head has classifier_dropout 0.1 by default and trainers run in train mode:
    two value forwards of one batch differed, so PPO's advantages were noise and a resumed run diverged. A policy
    whose config asks for attention dropout trains without it too (its first ratio is 1)."""
    import shutil

    import torch
    from transformers import AutoModelForTokenClassification

    from rayalign.actors.rl_trainer import CriticTrainer, PolicyTrainer
    from rayalign.config import TrainingConfig

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    raw = AutoModelForTokenClassification.from_pretrained(str(model), num_labels=1).train()
    assert not torch.equal(raw(input_ids=ids).logits, raw(input_ids=ids).logits)  # as transformers loads it
    for role in (PolicyTrainer, CriticTrainer):
        trainer = object.__new__(role)
        trainer.model_path, trainer.device, trainer.model_cfg = str(model), "cpu", ModelConfig(path=str(model))
        trainer.t = TrainingConfig()
        loaded = trainer._load_model("float32").train()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, loaded(input_ids=ids).logits), role.__name__


def test_a_loss_that_is_not_finite_stops_training_before_the_weights(tmp_path):
    """A NaN loss went through backward and the optimizer step: NaN weights, 'done', and NaN in metrics.jsonl."""
    import torch
    import torch.distributed as dist

    from rayalign.actors.trainer import TrainerActor
    from rayalign.failures import NonFiniteLossError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        trainer = object.__new__(TrainerActor)
        trainer.device, trainer.step, trainer.engine = "cpu", 4, None  # never reached: the loss is refused first
        for loss in (torch.tensor(float("nan")), torch.tensor([1.0, float("inf")])):
            with pytest.raises(NonFiniteLossError, match="the policy loss is not finite .NaN or infinite. at "
                                                         "optimizer step 5; it was not applied"):
                trainer.backward_step(loss, "policy")
    finally:
        dist.destroy_process_group()
