"""Online RL math: KL estimators, group advantages (GRPO, RLOO), GAE, PPO policy and value losses.

docs/methods.md, section 4 "Online". Pure torch, no model. Token tensors are (B, T) over response tokens with a mask (B, T),
bool or 0/1, True on valid tokens (right-padded for GAE and kl_shaped_rewards); padded entries may hold anything, even
inf: they are zeroed before any math. Math runs in at least float32. Losses return (scalar, metrics of floats);
aggregation="sequence" averages each row over its tokens, then the rows (GRPO, Shao et al. 2024 eq. 3), "token"
averages over all valid tokens of the batch (DAPO, Yu et al. 2025 eq. 8).
"""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3")
AGGREGATIONS = ("sequence", "token")


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _tokens(mask: torch.Tensor, right_padded=False, **named: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mask as bool, *the tensors as float, 0 on padding); ValueError unless mask is (B, T) 0/1 and all share it."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D tensor of shape [B, T]; got {getattr(mask, 'shape', type(mask))}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must be bool or hold only 0 and 1")
    if right_padded and (mask[:, 1:].bool() & ~mask[:, :-1].bool()).any():
        raise ValueError("mask must be right-padded: no valid token after a padded one")
    for name, value in named.items():
        if not isinstance(value, torch.Tensor) or value.shape != mask.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must have the mask's shape {tuple(mask.shape)}; got {shape}")
    mask = mask.bool()
    return (mask, *(torch.where(mask, _float(v), 0.0) for v in named.values()))  # padding zeroed: no inf/nan grads


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) on tokens sampled from pi (Schulman 2020, "Approximating KL divergence"):

    r = pi_ref / pi; k1 = -log r (unbiased), k2 = (log r)^2 / 2 (biased, >= 0), k3 = r - 1 - log r (unbiased, >= 0)."""
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}; got {kind!r}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp must share a shape; got {tuple(logp.shape)}, {tuple(ref_logp.shape)}")
    log_ratio = _float(ref_logp) - _float(logp)  # log r, any shape
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(log_ratio) - log_ratio - 1  # Bregman form: >= 0, = 0 iff pi = pi_ref


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last axis, float32: (..., V) -> (...)."""
    logp = torch.log_softmax(_float(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the valid entries (mask has x's shape), all of them or along dim; an empty row gives 0."""
    if mask.shape != x.shape:
        raise ValueError(f"mask must have x's shape {tuple(x.shape)}; got {tuple(mask.shape)}")
    total = torch.where(mask.bool(), _float(x), 0.0)
    if dim is None:
        return total.sum() / mask.sum().clamp(min=1)
    return total.sum(dim) / mask.sum(dim).clamp(min=1)


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    if aggregation == "sequence":
        return masked_mean(per_token, mask, dim=-1).mean()
    if aggregation == "token":
        return masked_mean(per_token, mask)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")


def _groups(rewards: torch.Tensor, group_ids: torch.Tensor):
    """(rewards as float, each row's group index (B,), and per group: size, reward sum, id (G,))."""
    if rewards.dim() != 1 or rewards.numel() == 0 or group_ids.shape != rewards.shape or group_ids.is_floating_point():
        raise ValueError(f"rewards (B,) float and group_ids (B,) int, B >= 1; got {tuple(rewards.shape)}, "
                         f"{tuple(group_ids.shape)} {group_ids.dtype}")
    rewards = _float(rewards)
    ids, index = torch.unique(group_ids, return_inverse=True)
    counts = torch.bincount(index)
    sums = torch.zeros(len(ids), dtype=rewards.dtype, device=rewards.device).index_add_(0, index, rewards)
    return rewards, index, counts, sums, ids


def grpo_advantages(rewards, group_ids, *, normalize_std=True, eps=1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024, sec. 4.1.2): A_i = (r_i - mean_g) / (std_g + eps), (B,); groups need not be contiguous.

    std_g is the SAMPLE std (n - 1) as in TRL 1.16's GRPOTrainer (trl.trainer.utils.nanstd; its eps is 1e-4). A group
    of one gets A = 0. normalize_std=False gives r_i - mean_g (Dr. GRPO, Liu et al. 2025)."""
    rewards, index, counts, sums, _ = _groups(rewards, group_ids)
    centered = rewards - (sums / counts)[index]
    if not normalize_std:
        return centered
    squares = torch.zeros_like(sums).index_add_(0, index, centered**2)
    std = (squares / (counts - 1).clamp(min=1)).sqrt()  # (G,) sample std
    return torch.where(counts[index] > 1, centered / (std[index] + eps), 0.0)


def rloo_advantages(rewards, group_ids) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, eq. 6): A_i = r_i - mean_{j != i, j in g} r_j, shape (B,); groups need >= 2 rows."""
    rewards, index, counts, sums, ids = _groups(rewards, group_ids)
    if (counts < 2).any():
        raise ValueError(f"RLOO needs at least 2 samples per group; group {ids[counts < 2][0].item()} has 1")
    return rewards - (sums[index] - rewards) / (counts[index] - 1)  # leave-one-out mean of the other n - 1


def gae(rewards, values, mask, *, gamma, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016, eq. 16) per token: (advantages, returns = advantages + V), both (B, T), 0 on padding.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; V and A past the last valid token are 0."""
    mask, rewards, values = _tokens(mask, right_padded=True, rewards=rewards, values=values)
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):  # r = V = 0 on padding, so there delta = 0 and A = 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = advantages[:, t] = delta + gamma * lam * next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def ppo_policy_loss(logp, old_logp, advantages, mask, *, clip_eps=0.2, clip_eps_high=None, aggregation="sequence"):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token: -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A).

    rho = exp(logp - old_logp); advantages (B,) broadcast over tokens (GRPO, RLOO) or (B, T) (PPO + GAE); clip_eps_high
    is DAPO's clip-higher. Metrics: clip_fraction, share of valid tokens where the clip is active (rho > 1 + eps_high
    with A > 0 or rho < 1 - eps with A < 0: zero gradient), approx_kl, token mean of k3 for KL(old || new)."""
    mask, logp, old_logp = _tokens(mask, logp=logp, old_logp=old_logp)
    if advantages.dim() == 1 and advantages.shape == mask.shape[:1]:
        advantages = advantages[:, None].expand(mask.shape)
    elif advantages.shape != mask.shape:
        raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(mask.shape)}; got {tuple(advantages.shape)}")
    advantages = _tokens(mask, advantages=advantages)[1]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)  # (B, T), 1 on padding
    per_token = -torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + high) * advantages)
    clipped = ((ratio > 1 + high) & (advantages > 0)) | ((ratio < 1 - clip_eps) & (advantages < 0))
    metrics = {"clip_fraction": masked_mean(clipped, mask).item(),  # approx_kl: k3, tokens sampled from old
               "approx_kl": masked_mean(kl_estimate(old_logp, logp, "k3").detach(), mask).item()}
    return _aggregate(per_token, mask, aggregation), metrics


def kl_penalty_loss(logp, ref_logp, mask, *, coef, kind="k3", aggregation="sequence"):
    """coef * mean of the per-token KL estimate: GRPO's penalty in the loss (Shao et al. 2024, eq. 3-4, k3)."""
    mask, logp, ref_logp = _tokens(mask, logp=logp, ref_logp=ref_logp)
    per_token = kl_estimate(logp, ref_logp, kind)
    return coef * _aggregate(per_token, mask, aggregation), {"kl": masked_mean(per_token.detach(), mask).item()}


def kl_shaped_rewards(seq_rewards, logp, ref_logp, mask, *, coef, kind="k1") -> torch.Tensor:
    """PPO-RLHF token rewards (Ouyang et al. 2022, eq. 2): r_t = -coef * k_t, plus the sequence reward at the last
    valid token; (B, T), 0 on padding, detached. mask right-padded with >= 1 valid token per row."""
    mask, logp, ref_logp = _tokens(mask, right_padded=True, logp=logp, ref_logp=ref_logp)
    lengths = mask.sum(-1)  # (B,)
    if seq_rewards.shape != lengths.shape or (lengths == 0).any():
        raise ValueError(f"seq_rewards must be (B,) = ({len(lengths)},) and every row needs a valid token; got "
                         f"{tuple(seq_rewards.shape)}, lengths {lengths.tolist()}")
    rewards = (-coef * kl_estimate(logp, ref_logp, kind)).detach()  # (B, T), 0 on padding where logp = ref_logp = 0
    return rewards.scatter_add(1, (lengths - 1)[:, None], _float(seq_rewards).detach()[:, None].to(rewards.dtype))


def value_loss(values, old_values, returns, mask, *, clip_eps=0.2, aggregation="sequence"):
    """Clipped value loss (PPO2, OpenAI baselines): 0.5 max((V - R)^2, (clip(V, V_old -+ eps) - R)^2) per token.

    Metrics: clip_fraction, the share of valid tokens where the clipped term is strictly larger (zero gradient)."""
    mask, values, old_values, returns = _tokens(mask, values=values, old_values=old_values, returns=returns)
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    loss_plain, loss_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    per_token = 0.5 * torch.max(loss_plain, loss_clipped)
    metrics = {"clip_fraction": masked_mean(loss_clipped > loss_plain, mask).item()}
    return _aggregate(per_token, mask, aggregation), metrics
