"""Preference losses on per-sequence log-probs: DPO (+NLL, cDPO), IPO, SimPO, KTO, ORPO and DCO.

The methods and their papers: docs/methods.md. Pure torch, no model: every log-prob argument is the SUMMED log-prob of
the response tokens, shape (B,); token counts are (B,), int or float. Math runs in at least float32.
`loss` is the batch mean; rewards are per row and detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ORPO_MAX_MEAN_LOGP = -1e-6  # log odds are infinite at mean log-prob 0; clamped there they stay below ~13.8


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, batch mean, differentiable
    chosen_rewards: torch.Tensor  # (B,) detached; KTO: the desirable rows only
    rejected_rewards: torch.Tensor  # (B,) detached; KTO: the undesirable rows only
    metrics: dict[str, float] = field(default_factory=dict)


def _rows(**named: torch.Tensor) -> list[torch.Tensor]:
    """The tensors as (B,) of at least float32; ValueError unless all are 1-D with the same B >= 1."""
    sizes = {}
    for name, value in named.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a 1-D tensor of shape [B]; got {shape}")
        sizes[name] = value.shape[0]
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"all inputs must have the same batch size B >= 1; got {sizes}")
    return [v.to(torch.promote_types(v.dtype, torch.float32)) for v in named.values()]


def _tokens(tokens: torch.Tensor, name: str) -> torch.Tensor:
    if (tokens <= 0).any():
        raise ValueError(f"{name} must be positive token counts")
    return tokens


def _pair_output(loss, chosen_rewards, rejected_rewards, policy_chosen, chosen_tokens, nll_weight, **metrics):
    """Adds ICR's NLL term nll_weight * mean(-log pi(y_w|x) / |y_w|) and the reward metrics."""
    if nll_weight != 0 and chosen_tokens is None:
        raise ValueError("nll_weight != 0 needs chosen_tokens (token counts of the chosen responses)")
    if chosen_tokens is not None:
        (chosen_tokens,) = _rows(chosen_tokens=chosen_tokens)
        nll = (-policy_chosen / _tokens(chosen_tokens, "chosen_tokens")).mean()
        metrics["nll"] = nll.item()
        loss = loss + nll_weight * nll
    margin = (chosen_rewards - rejected_rewards).detach()
    metrics.update(reward_margin=margin.mean().item(), reward_accuracy=(margin > 0).float().mean().item())
    return LossOutput(loss, chosen_rewards.detach(), rejected_rewards.detach(), metrics)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0, nll_weight=0.0,
             chosen_tokens=None) -> LossOutput:
    """DPO (Rafailov et al. 2023, eq. 7); label_smoothing > 0 is conservative DPO (cDPO, Mitchell 2023)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}")
    pc, pr, rc, rr = _rows(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                           ref_rejected=ref_rejected)
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    # h = beta * [(pc - rc) - (pr - rr)];  loss = -(1 - eps) log sigma(h) - eps log sigma(-h)
    h = chosen_rewards - rejected_rewards
    per_row = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return _pair_output(per_row.mean(), chosen_rewards, rejected_rewards, pc, chosen_tokens, nll_weight)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, nll_weight=0.0,
             chosen_tokens=None) -> LossOutput:
    """IPO (Azar et al. 2024, eq. 17) on summed log-probs, beta = tau: (h - 1 / (2 beta))^2."""
    pc, pr, rc, rr = _rows(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                           ref_rejected=ref_rejected)
    h = (pc - rc) - (pr - rr)  # (B,) no beta inside: it sets the target margin 1 / (2 beta)
    per_row = (h - 1 / (2 * beta)) ** 2
    return _pair_output(per_row.mean(), beta * (pc - rc), beta * (pr - rr), pc, chosen_tokens, nll_weight)


def simpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, *, beta, margin,
               nll_weight=0.0) -> LossOutput:
    """SimPO (Meng et al. 2024, eq. 6): -log sigma(beta pc / |y_w| - beta pr / |y_l| - margin); reference-free."""
    pc, pr, nw, nl = _rows(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                           chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    chosen_rewards = beta * pc / _tokens(nw, "chosen_tokens")
    rejected_rewards = beta * pr / _tokens(nl, "rejected_tokens")
    per_row = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    return _pair_output(per_row.mean(), chosen_rewards, rejected_rewards, pc, nw, nll_weight)


def kto_reference_point(policy, ref, all_reduce=None) -> torch.Tensor:
    """KTO's reference point z_ref = max(0, mean of log pi(y|x) - log pi_ref(y|x)), detached (KTO paper, eq. 8).

    The paper's estimate takes (x, y') pairs whose response belongs to ANOTHER prompt (mismatched pairs, see
    `kto_mismatched_rows`) over the whole global batch: pass those log-probs, every micro-batch of this rank, and
    all_reduce = torch.distributed.all_reduce (sums a float64 tensor over the ranks in place) so that the mean is
    over all ranks' rows. The "matched" option passes the micro-batch's own rows and no all_reduce.
    """
    policy, ref = _rows(policy=policy, ref=ref)
    stats = torch.stack([(policy - ref).detach().double().sum(), torch.tensor(float(len(policy)), dtype=torch.float64,
                                                                              device=policy.device)])
    if all_reduce is not None:
        all_reduce(stats)
    return (stats[0] / stats[1]).clamp(min=0).to(policy.dtype)


def kto_kl_estimate(policy, ref) -> torch.Tensor:
    """The "matched" reference point: z_ref from the batch's own rows, on one rank."""
    return kto_reference_point(policy, ref)


def kto_mismatched_rows(prompt_ids) -> list[int]:
    """For each row i, the row j whose response pairs with x_i in KTO's mismatched estimate: the next row (cyclic)
    with another prompt id; the next row when every row shares one prompt."""
    n = len(prompt_ids)
    out = []
    for i in range(n):
        out.append(next((j % n for j in range(i + 1, i + n) if prompt_ids[j % n] != prompt_ids[i]), (i + 1) % n))
    return out


def kto_loss(policy, ref, labels, *, beta, desirable_weight=1.0, undesirable_weight=1.0, kl=None) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, eq. 8): mean over rows of lambda_y - v(x, y), on unpaired rows.

    labels (B,) bool, True = desirable. kl: the reference point z (float or scalar tensor, see `kto_reference_point`);
    None = the "matched" estimate from these rows.
    """
    policy, ref = _rows(policy=policy, ref=ref)
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.bool or labels.shape != policy.shape:
        raise ValueError(f"labels must be a bool tensor of shape {tuple(policy.shape)}")
    z = kto_kl_estimate(policy, ref) if kl is None else torch.as_tensor(kl, dtype=policy.dtype).detach()
    r = policy - ref  # (B,) log pi / pi_ref
    # desirable: w_D * (1 - sigma(beta (r - z)));  undesirable: w_U * (1 - sigma(beta (z - r)))
    per_row = torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                          undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))
    rewards = (beta * r).detach()
    return LossOutput(per_row.mean(), rewards[labels], rewards[~labels], {"kl": z.item()})


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, *, lam) -> LossOutput:
    """ORPO (Hong et al. 2024, eq. 6-7): NLL(y_w) - lam * log sigma(log odds(y_w) - log odds(y_l)).

    P(y|x) is the mean per-token probability: m = log P = logp / |y|, log odds = m - log(1 - exp(m)).
    m is clamped to ORPO_MAX_MEAN_LOGP inside the odds only (no gradient from the odds term above it; the NLL
    keeps the raw m). Rewards are m, detached.
    """
    pc, pr, nw, nl = _rows(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                           chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    mean_chosen, mean_rejected = pc / _tokens(nw, "chosen_tokens"), pr / _tokens(nl, "rejected_tokens")

    def log_odds(m):
        m = m.clamp(max=ORPO_MAX_MEAN_LOGP)
        return m - _log1mexp(m)

    log_odds_ratio = log_odds(mean_chosen) - log_odds(mean_rejected)  # (B,)
    nll = -mean_chosen
    per_row = nll - lam * F.logsigmoid(log_odds_ratio)
    metrics = {"nll": nll.mean().item(), "log_odds_ratio": log_odds_ratio.mean().item()}
    return LossOutput(per_row.mean(), mean_chosen.detach(), mean_rejected.detach(), metrics)


def dco_loss(policy_chosen_1, policy_rejected_1, policy_chosen_2, policy_rejected_2, ref_chosen_1, ref_rejected_1,
             ref_chosen_2, ref_rejected_2, gamma_12, gamma_21, *, beta) -> LossOutput:
    """DCO (DCO paper, eq. 11) on parallel tuples (x1, yw1, yl1, x2, yw2, yl2); gammas are (B,) tensors or floats.

    The consistency condition gamma_12 * gamma_21 = beta^2 (Lemma 1) is checked where the config is loaded.
    """
    pw1, pl1, pw2, pl2, rw1, rl1, rw2, rl2 = _rows(
        policy_chosen_1=policy_chosen_1, policy_rejected_1=policy_rejected_1, policy_chosen_2=policy_chosen_2,
        policy_rejected_2=policy_rejected_2, ref_chosen_1=ref_chosen_1, ref_rejected_1=ref_rejected_1,
        ref_chosen_2=ref_chosen_2, ref_rejected_2=ref_rejected_2)
    g12, g21 = (torch.as_tensor(g, dtype=pw1.dtype).expand_as(pw1) if not torch.is_tensor(g) or g.dim() == 0 else g
                for g in (gamma_12, gamma_21))
    g12, g21, _ = _rows(gamma_12=g12, gamma_21=g21, batch=pw1)
    rhat_w1, rhat_l1, rhat_w2, rhat_l2 = beta * (pw1 - rw1), beta * (pl1 - rl1), beta * (pw2 - rw2), beta * (pl2 - rl2)
    # |(rhat(x1,yw1) - rhat(x1,yl1)) - g12 (ref_w2 - ref_l2)| + |(rhat(x2,yw2) - rhat(x2,yl2)) - g21 (ref_w1 - ref_l1)|
    term_1 = ((rhat_w1 - rhat_l1) - g12 * (rw2 - rl2)).abs()
    term_2 = ((rhat_w2 - rhat_l2) - g21 * (rw1 - rl1)).abs()
    # the loss these tuples have at pi_ref (rhat = 0): its scale varies from batch to batch with the reference
    # margins, so compare a batch's loss with it, not with another batch's loss
    at_reference = (g12 * (rw2 - rl2)).abs() + (g21 * (rw1 - rl1)).abs()
    metrics = {"term_1": term_1.mean().item(), "term_2": term_2.mean().item(),
               "loss_at_reference": at_reference.mean().item()}
    chosen_rewards, rejected_rewards = torch.cat([rhat_w1, rhat_w2]), torch.cat([rhat_l1, rhat_l2])
    return LossOutput((term_1 + term_2).mean(), chosen_rewards.detach(), rejected_rewards.detach(), metrics)
