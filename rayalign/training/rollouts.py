"""Online RL without Ray: rewards of a step's rollouts, group advantages, and the token sequences to train on."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from rayalign.models import encode_response, end_of_turn_ids
from rayalign.losses.rl import gae, grpo_advantages, kl_shaped_rewards, rloo_advantages


def rollout_rewards(samples: pa.Table, cfg) -> np.ndarray:
    """The configured mix per sample: language fidelity (+1 when detected in the target language), the user's
    reward file, minus a length term (docs/methods.md section 4, online)."""
    o = cfg.online
    langs, detected = samples.column("lang").to_pylist(), samples.column("lang_detected").to_pylist()
    target = [o.target_language or lang for lang in langs]
    rewards = o.fidelity_weight * np.array([float(d == t) for d, t in zip(detected, target)])
    if o.user_weight:
        from rayalign.scoring.rewards import user_rewards

        rewards = rewards + o.user_weight * user_rewards(samples, cfg.rewards.user.path, cfg.rewards.user.function)
    if o.length_weight:
        rewards = rewards - length_penalty(samples.column("num_tokens").to_numpy(), cfg.sampling.max_new_tokens,
                                           o.length_weight)
    if not np.isfinite(rewards).all():
        bad = int(np.flatnonzero(~np.isfinite(rewards))[0])
        raise ValueError(f"online reward of row {bad} (prompt_id {samples.column('prompt_id')[bad]}) is "
                         f"{rewards[bad]}; rewards must be finite")
    return rewards


def length_penalty(num_tokens, max_new_tokens: int, weight: float) -> np.ndarray:
    """The online length term: weight x generated tokens / sampling.max_new_tokens (at most weight)."""
    return weight * np.minimum(np.asarray(num_tokens, dtype=np.float64), max_new_tokens) / max_new_tokens


def group_advantages(samples: pa.Table, rewards: np.ndarray, algorithm: str) -> np.ndarray:
    """GRPO or RLOO advantages over the n samples of each (prompt_id, language)."""
    keys = list(zip(samples.column("prompt_id").to_pylist(), samples.column("lang").to_pylist()))
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    groups = torch.tensor([index[k] for k in keys])
    r = torch.as_tensor(rewards, dtype=torch.float64)
    adv = grpo_advantages(r, groups) if algorithm == "grpo" else rloo_advantages(r, groups)
    return adv.numpy()


def rollout_sequences(tokenizer, samples: pa.Table) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) as generated: the end-of-turn token only where the response stopped on it."""
    out = []
    for messages, response, finish in zip(samples.column("messages").to_pylist(), samples.column("response").to_pylist(),
                                          samples.column("finish_reason").to_pylist()):
        prompt, tokens = encode_response(tokenizer, messages, response)
        cut = len(tokens) - len(end_of_turn_ids(tokenizer))
        out.append((prompt, tokens if finish == "stop" else tokens[:cut] or tokens))
    return out


def _padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    values = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, :len(r)] = torch.tensor(r, dtype=torch.float64)
        mask[i, :len(r)] = True
    return values, mask


def ppo_advantages(rewards: np.ndarray, policy_stats: list[dict], critic_stats: list[dict], *, kl_coef: float,
                   kl_estimator: str, gamma: float, lam: float) -> tuple[list[list[float]], list[list[float]], list]:
    """PPO-RLHF: per-token rewards (-kl_coef x KL each token, the sequence reward at the last), GAE over the
    critic's values, advantages whitened over the batch's tokens. Returns (advantages, returns, values) as one
    list per sequence with a value per response token."""
    logp, mask = _padded([s["logp"] for s in policy_stats])
    ref, _ = _padded([s["ref_logp"] for s in policy_stats])
    values, value_mask = _padded([s["value"] for s in critic_stats])
    if not torch.equal(mask, value_mask):
        raise ValueError("ppo: the critic's token counts differ from the policy's for the same rollouts")
    token_rewards = kl_shaped_rewards(torch.as_tensor(rewards, dtype=torch.float64), logp, ref, mask, coef=kl_coef,
                                      kind=kl_estimator)
    adv, returns = gae(token_rewards, values, mask, gamma=gamma, lam=lam)
    valid = adv[mask]
    spread = valid.std() if valid.numel() > 1 else torch.zeros((), dtype=valid.dtype)  # one token: centred to 0
    adv = torch.where(mask, (adv - valid.mean()) / (spread + 1e-8), 0.0)
    rows = lambda x: [x[i][mask[i]].tolist() for i in range(len(x))]  # noqa: E731
    return rows(adv), rows(returns), rows(values)


def minibatch_order(size: int, mini_batch_size: int, epochs: int, seed) -> list[list[int]]:
    """Row indices of each optimizer update of a step: `epochs` passes over the rollout batch, each a fresh seeded
    shuffle cut into mini-batches (one pass over one mini-batch keeps the rollout order)."""
    if size % mini_batch_size:
        raise ValueError(f"mini-batch size {mini_batch_size} does not divide the rollout batch {size}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        order = np.arange(size) if mini_batch_size == size and epochs == 1 else rng.permutation(size)
        out += [order[i:i + mini_batch_size].tolist() for i in range(0, size, mini_batch_size)]
    return out


def step_prompts(prompts: pa.Table, step: int, per_step: int, seed: int) -> pa.Table:
    """The step's prompt ids (a fresh shuffle of all ids each pass over them), every language of each."""
    ids = sorted(set(prompts.column("prompt_id").to_pylist()))
    per_pass = max(1, len(ids) // per_step)
    order = np.random.default_rng([seed, (step - 1) // per_pass]).permutation(len(ids))
    start = ((step - 1) % per_pass) * per_step
    chosen = {ids[i] for i in order[start:start + per_step]}
    return prompts.filter(pa.compute.is_in(prompts.column("prompt_id"), pa.array(sorted(chosen))))
