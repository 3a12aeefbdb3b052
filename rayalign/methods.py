"""The facts that tie a recipe's methods together, in one place: the reward each method ranks by, the recipe
key that computes it, and the dataset schema each pairs method writes and each loss trains on."""

from __future__ import annotations

REWARD_COLUMN = {"lacomsa": "r_lacomsa", "msa": "r_msa", "icr": "r_icr", "reward_model": "r_rm", "user": "r_user"}
REWARD_KEY = {"lacomsa": "rewards.latent.enabled", "msa": "rewards.latent.enabled",
              "icr": "rewards.implicit.enabled", "dco": "rewards.consistency.enabled",
              "reward_model": "rewards.reward_model.enabled", "user": "rewards.user.path"}
SCHEMA = {"kto": "kto", "dco": "dco"}  # pairs methods and losses of their own schema; every other one: pairs
# (prompt column, response column, reference log-prob column, scored token-count column) per sequence of a
# training example, by schema
SEQUENCES = {
    "pairs": [("prompt", "chosen", "ref_logp_chosen", "chosen_num_tokens"),
              ("prompt", "rejected", "ref_logp_rejected", "rejected_num_tokens")],
    "kto": [("prompt", "completion", "ref_logp", "num_tokens")],
    "dco": [(f"prompt_{s}", f"{name}_{s}", f"ref_logp_{name}_{s}", None) for s in (1, 2) for name in ("chosen", "rejected")],
}


def schema_of(method_or_loss: str) -> str:
    """The dataset schema a pairs method writes, or a loss trains on."""
    return SCHEMA.get(method_or_loss, "pairs")


def reward_enabled(cfg, method: str) -> bool:
    """Whether the recipe computes the reward `method` needs (REWARD_KEY: an `enabled` flag, or a path)."""
    value = cfg
    for part in REWARD_KEY[method].split("."):
        value = getattr(value, part)
    return bool(value)
