"""What online updates learn from: the tokens the engines generated, and the behaviour log-probs of a step's every
rollout."""

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
    finally:
        trainer.shutdown()
    assert [len(s["logp"]) for s in stats] == [len(r) for _, r in sequences]
