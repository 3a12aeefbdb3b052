"""The shipped 8B recipes carry their papers' settings. The expected values are typed from the papers (as
summarised in docs/methods.md), not read from the code."""

import pytest

from rayalign.config import load_config

# recipe -> {dotted key: the paper's value}
PAPERS = {
    "lacomsa-llama3-8b": {  # LaCoMSA: N = 10, T 0.9, top_p 1, DPO beta 0.1 + NLL 1.0, lr 1e-6, 1 epoch, 2 iterations
        "sampling.n": 10, "sampling.temperature": 0.9, "sampling.top_p": 1.0, "training.loss": "dpo",
        "training.beta": 0.1, "training.nll_weight": 1.0, "training.lr": 1e-6, "training.epochs": 1, "iterations": 2,
        "rewards.latent.hub_layer": 15, "rewards.latent.language_layer": 32,  # released code, 32-layer Llama-3-8B
        "rewards.latent.alpha": 0.5, "rewards.latent.gamma": 1.0},
    "icr-llama3-8b": {  # ICR: N = 10, T 0.9, DPO beta 0.1 + NLL, lr 5e-7, batch 16, warmup 3 %, 1 epoch, 2 iterations
        "sampling.n": 10, "sampling.temperature": 0.9, "sampling.top_p": 1.0, "training.loss": "dpo",
        "training.beta": 0.1, "training.nll_weight": 1.0, "training.lr": 5e-7, "training.global_batch_size": 16,
        "training.warmup_ratio": 0.03, "training.epochs": 1, "iterations": 2},
    "dco-llama3-8b": {  # DCO: beta 1, EN stable (gamma_{x,en} 10, gamma_{en,x} 0.1), lr 1e-5, batch 4, 1 epoch
        "rewards.consistency.beta": 1.0, "rewards.consistency.gamma_from_anchor": 10.0,
        "rewards.consistency.gamma_to_anchor": 0.1, "training.loss": "dco", "training.lr": 1e-5,
        "training.global_batch_size": 4, "training.epochs": 1,
        "rewards.consistency.pairs_per_question": 2},  # two candidate pairs per query (MMMLU, BMLAMA)
    "batch-alignment-llama3-8b": {  # batch alignment: a sampler over DPO, lr 5e-6, 3 epochs, max length 4096,
        # a batch of one topic in every language (batch size 7 for its 7 languages; 5 here)
        "training.batch_alignment": True, "training.loss": "dpo", "training.lr": 5e-6, "training.epochs": 3,
        "training.max_length": 4096, "training.global_batch_size": 5},
}


def value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def differences(recipe: str, overrides=()) -> dict:
    """{key: (the recipe's value, the paper's)} where they differ."""
    cfg = load_config(f"examples/{recipe}.yaml", list(overrides))
    return {k: (value(cfg, k), v) for k, v in PAPERS[recipe].items() if value(cfg, k) != pytest.approx(v)}


@pytest.mark.parametrize("recipe", sorted(PAPERS))
def test_recipe_has_its_papers_settings(recipe):
    assert differences(recipe) == {}


def test_a_changed_setting_is_caught():
    # the first release's LaCoMSA learning rate, and DCO's gammas the wrong way round
    assert differences("lacomsa-llama3-8b", ["training.lr=5e-7"]) == {"training.lr": (5e-7, 1e-6)}
    assert differences("dco-llama3-8b", ["rewards.consistency.gamma_from_anchor=0.1",
                                         "rewards.consistency.gamma_to_anchor=10"]) == {
        "rewards.consistency.gamma_from_anchor": (0.1, 10.0), "rewards.consistency.gamma_to_anchor": (10.0, 0.1)}
