"""What online updates learn from (the tokens the engines generated, the behaviour log-probs of a step's every
rollout) and that they learn: GRPO with the language-fidelity reward raises the fidelity `rayalign eval` measures
on held-out prompts, and PPO with a critic raises the training reward."""

import json

import pytest

from conftest import PROMPTS_DIR, REPO

RECIPE = str(REPO / "examples" / "online-grpo-quickstart.yaml")


def test_rollouts_train_on_the_generated_tokens(tiny_model):
    """Decoding and re-encoding a sampled response gives other tokens for some rows (byte-level BPE merges, split
    multi-byte characters); the online update takes the engine's own tokens."""
    from rayalign.config import load_config
    from rayalign.data.prompts import load_prompts
    from rayalign.engines.hf import HFEngine
    from rayalign.generation import generate_samples
    from rayalign.models import load_tokenizer
    from rayalign.pipelines.online_rollouts import generated_sequences

    cfg = load_config(RECIPE, [f"policy.path={tiny_model}"])
    prompts = load_prompts(PROMPTS_DIR, cfg.languages, limit=2)
    engine = HFEngine(tiny_model, dtype="float32", device="cpu", batch_size=40)
    samples = generate_samples(engine, prompts, cfg.sampling, 1, "policy", token_ids=True)
    tok = load_tokenizer(tiny_model)
    ids = samples.column("response_ids").to_pylist()
    assert [len(r) for r in ids] == samples.column("num_tokens").to_pylist()
    assert [tok.decode(r, skip_special_tokens=True) for r in ids] == samples.column("response").to_pylist()
    for r, finish in zip(ids, samples.column("finish_reason").to_pylist()):
        assert (r[-1] == tok.eos_token_id) == (finish == "stop")
    sequences = generated_sequences(tok, samples)
    assert [s[1] for s in sequences] == ids
    assert sequences[0][0] == engine.encode_prompt(samples.column("messages")[0].as_py())
    reencoded = [tok(text, add_special_tokens=False)["input_ids"] for text in samples.column("response").to_pylist()]
    assert any(a != b[:len(a)] for a, b in zip(reencoded, ids))  # the case the generated tokens are kept for


def test_rollout_stats_cover_the_whole_step_when_mini_batches_are_smaller(ray_session, tiny_model):
    """A trainer set up for mini-batches of 2 (one micro-batch of 2 per update) records the behaviour and reference
    log-probs of all 4 rollouts of the step, not of the first mini-batch only."""
    from test_online import greetings

    from rayalign.actors.rl_trainer import PolicyGroup
    from rayalign.config import ModelConfig, load_config

    cfg = load_config(None, [f"policy.path={tiny_model}", "training.micro_batch_size=2"])
    sequences = greetings(tiny_model)
    trainer = PolicyGroup(tiny_model, ModelConfig(path=tiny_model), cfg.training)
    try:
        trainer.prepare(2, tiny_model)
        stats = trainer.rollout_stats(sequences)
        # the first update starts at the behaviour and reference policy: ratio 1, so the clipped surrogate is
        # -mean over sequences of A = -(1 + 0) / 2, no clipping, and no KL
        first = trainer.update(sequences[:2], [1.0, 0.0], [s["logp"] for s in stats[:2]],
                               [s["ref_logp"] for s in stats[:2]], 0.1, "k3", 0.2)
    finally:
        trainer.shutdown()
    assert [len(s["logp"]) for s in stats] == [len(r) for _, r in sequences]
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():  # before any update the policy is the reference: both equal a plain forward
        for (prompt, response), row in zip(sequences, stats):
            logits = model(torch.tensor([prompt + response])).logits[0].double()
            expected = [float(torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t]) for i, t in enumerate(response)]
            assert list(row["logp"]) == pytest.approx(expected, abs=1e-4)
            assert list(row["ref_logp"]) == pytest.approx(expected, abs=1e-4)
    assert first["policy_loss"] == pytest.approx(-0.5, abs=1e-5)
    assert first["clip_fraction"] == 0 and first["kl"] == pytest.approx(0, abs=1e-6)


FIDELITY_RECIPE = str(REPO / "examples" / "online-grpo-fidelity.yaml")
MARGIN = 0.08  # measured: 0.156 -> 0.241 on the 40-step test model (a086db3; 0.150 -> 0.287 earlier)


def cli(*args):
    from click.testing import CliRunner

    from rayalign.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def held_out_fidelity(tiny_model, run_dir, policy, out) -> tuple[float, set]:
    """`rayalign eval` of `policy` on the held-out prompts (p048-p063): overall fidelity and the prompt ids seen."""
    from rayalign.data.store import read_dataset

    cli("eval", FIDELITY_RECIPE, "--policy", policy, "--run-dir", run_dir, "--out", out, "--samples", 4,
        "--silhouette-prompts", 0, "-o", f"policy.path={tiny_model}", "-o", "prompts.skip=48")
    rows = read_dataset(out / "results", "eval").to_pylist()
    fidelity = next(r["value"] for r in rows if r["metric"] == "fidelity" and r["lang"] == "all")
    return fidelity, set(read_dataset(out / "samples", "samples").column("prompt_id").to_pylist())


@pytest.mark.slow
def test_grpo_raises_held_out_language_fidelity(ray_session, tiny_model, tmp_path):
    """examples/online-grpo-fidelity.yaml trains on prompts p000-p047; `rayalign eval` before and after on the 16
    held-out prompts (4 samples per prompt and language, the same seeds both times)."""
    from rayalign.data.store import read_dataset

    run_dir = tmp_path / "grpo"
    before, held_out = held_out_fidelity(tiny_model, run_dir, "initial", tmp_path / "before")
    cli("launch", FIDELITY_RECIPE, "--run-dir", run_dir, "-o", f"policy.path={tiny_model}")
    after, _ = held_out_fidelity(tiny_model, run_dir, run_dir / "online" / "policy", tmp_path / "after")
    trained = {p for step in (run_dir / "online").glob("step-*")
               for p in read_dataset(step, "rollouts").column("prompt_id").to_pylist()}
    assert len(held_out) == 16 and len(trained) > 16 and not trained & held_out
    print(f"held-out fidelity {before:.3f} -> {after:.3f}")
    assert after >= before + MARGIN, (before, after)


PPO_RECIPE = str(REPO / "examples" / "online-ppo-fidelity.yaml")
PPO_MARGIN = 0.05  # measured: reward mean 0.162 over steps 1-5 -> 0.250 over steps 16-20 on the 40-step test model


@pytest.mark.slow
def test_ppo_with_a_critic_raises_the_fidelity_reward(ray_session, tiny_model, tmp_path):
    """examples/online-ppo-fidelity.yaml: the training reward mean of the last five steps exceeds the first five's."""
    run_dir = tmp_path / "ppo"
    cli("launch", PPO_RECIPE, "--run-dir", run_dir, "-o", f"policy.path={tiny_model}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward_mean"] for m in steps if m.get("stage") == "online"]
    assert len(rewards) == 20 and all("value_loss" in m for m in steps if m.get("stage") == "online")
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"ppo reward mean {first:.3f} -> {last:.3f}")
    assert last >= first + PPO_MARGIN, rewards
