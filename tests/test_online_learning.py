"""Online RL learns on the tiny model, through the CLI: GRPO with the language-fidelity reward raises the language
fidelity that `rayalign eval` measures on held-out prompts (never trained on), and PPO with a critic raises the
reward mean. Updates train on the tokens the engines generated."""

import json

import numpy as np
import pytest

from conftest import PROMPTS_DIR, REPO

RECIPE = str(REPO / "examples" / "online-grpo-quickstart.yaml")
TRAIN_PROMPTS = 48  # p000-p047 train; p048-p063 are held out for evaluation


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

