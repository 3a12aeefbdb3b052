"""rayalign.losses.rl against values worked out by hand with `math` / `statistics`, and GRPO against TRL's own lines."""

from __future__ import annotations

import inspect
import math
import statistics

import pytest
import torch

from rayalign.losses.rl import (
    gae,
    grpo_advantages,
    kl_estimate,
    kl_penalty_loss,
    kl_shaped_rewards,
    masked_mean,
    ppo_policy_loss,
    rloo_advantages,
    value_loss,
)

INF = float("inf")


def ten(values, grad=False, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def flat(values):
    return [x for v in values for x in flat(v)] if isinstance(values, (list, tuple)) else [values]


def close(tensor, expected, tol=1e-9):
    assert list(tensor.shape) == list(torch.tensor(expected).shape)
    assert flat(tensor.detach().tolist()) == pytest.approx(flat(expected), rel=tol, abs=tol)


def mean(values):
    return sum(values) / len(values)


# --- KL estimators ---------------------------------------------------------------------------------------------------
def test_kl_estimators_hand_values():
    logp, ref = [-1.0, -2.0, -0.5], [-1.5, -2.0, 0.0]  # log r = ref - logp = [-0.5, 0, 0.5]
    close(kl_estimate(ten(logp), ten(ref), "k1"), [0.5, 0.0, -0.5])
    close(kl_estimate(ten(logp), ten(ref), "k2"), [0.125, 0.0, 0.125])
    close(kl_estimate(ten(logp), ten(ref), "k3"), [math.exp(-0.5) + 0.5 - 1, 0.0, math.exp(0.5) - 0.5 - 1])


def test_k3_is_non_negative_and_zero_at_equality():
    grid = torch.linspace(-6, 6, 121, dtype=torch.float64)
    logp, ref = torch.meshgrid(grid, grid, indexing="ij")  # any shape
    k3 = kl_estimate(logp, ref, "k3")
    assert (k3 >= 0).all()
    assert k3.diagonal().abs().max().item() == 0.0
    assert (k3[~torch.eye(121, dtype=torch.bool)] > 0).all()


def test_k1_and_k3_are_unbiased_for_kl_on_a_categorical():
    p, q = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]  # pi and pi_ref
    exact_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))  # KL(pi || ref) by enumeration
    logp, ref = ten([math.log(x) for x in p]), ten([math.log(x) for x in q])
    for kind in ("k1", "k3"):  # expectation under pi by enumeration: exact
        assert (ten(p) * kl_estimate(logp, ref, kind)).sum().item() == pytest.approx(exact_kl, rel=1e-12)
    k2_mean = sum(pi * 0.5 * math.log(qi / pi) ** 2 for pi, qi in zip(p, q, strict=True))
    assert (ten(p) * kl_estimate(logp, ref, "k2")).sum().item() == pytest.approx(k2_mean)
    assert abs(k2_mean - exact_kl) > 0.01  # k2 is biased
    draws = torch.multinomial(ten(p), 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):  # Monte Carlo over samples of pi: sd of the mean ~ 0.006
        assert kl_estimate(logp[draws], ref[draws], kind).mean().item() == pytest.approx(exact_kl, abs=0.03)


# --- masked_mean -----------------------------------------------------------------------------------------------------
def test_masked_mean_all_per_row_and_padding_ignored():
    x = ten([[1.0, 2.0, 3.0], [4.0, INF, float("nan")], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    close(masked_mean(x, mask), (1 + 2 + 3 + 4) / 4)
    close(masked_mean(x, mask.bool(), dim=-1), [2.0, 4.0, 0.0])  # an empty row gives 0
    close(masked_mean(x, mask, dim=0), [2.5, 2.0, 3.0])
    with pytest.raises(ValueError, match="shape"):
        masked_mean(x, mask[:, :2])


# --- group advantages ------------------------------------------------------------------------------------------------
def test_grpo_hand_values_sample_std_interleaved_groups():
    rewards, groups = [1.0, 2.0, 0.0, 4.0, 1.0, 3.0], [7, 3, 7, 3, 7, 5]
    out = grpo_advantages(ten(rewards), torch.tensor(groups), eps=0.0)
    m7, s7 = 2 / 3, math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)  # sample std, n - 1 = 2
    m3, s3 = 3.0, math.sqrt((1 + 1) / 1)
    assert s7 == pytest.approx(statistics.stdev([1.0, 0.0, 1.0]))
    close(out, [(1 - m7) / s7, (2 - m3) / s3, (0 - m7) / s7, (4 - m3) / s3, (1 - m7) / s7, 0.0])  # group of one: 0
    close(grpo_advantages(ten(rewards), torch.tensor(groups), normalize_std=False), [1 / 3, -1, -2 / 3, 1, 1 / 3, 0])
    eps = grpo_advantages(ten(rewards), torch.tensor(groups), eps=0.5)
    close(eps[:2], [(1 - m7) / (s7 + 0.5), (2 - m3) / (s3 + 0.5)])
    close(grpo_advantages(ten([2.0, 2.0]), torch.tensor([0, 0])), [0.0, 0.0])  # equal rewards: 0, not nan


def test_grpo_matches_trl_group_normalisation():
    # TRL 1.16 computes GRPO advantages inline in GRPOTrainer._generate_and_score_completions (no callable function):
    # we check that those lines are still there and run them here with TRL's own nanstd, on contiguous groups.
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    source = inspect.getsource(grpo.GRPOTrainer._generate_and_score_completions)
    for line in ("mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
                 "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)",
                 "advantages = rewards - mean_grouped_rewards",
                 "advantages = advantages / (std_rewards + 1e-4)"):
        assert line in source
    num_generations, rewards = 4, ten([0.0, 1.0, 1.0, 0.5, 3.0, -1.0, 2.0, 2.0, 0.2, 0.2, 0.2, 0.2])
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = grpo.nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    theirs = (rewards - mean_grouped_rewards) / (std_rewards + 1e-4)
    ours = grpo_advantages(rewards, torch.arange(3).repeat_interleave(num_generations), eps=1e-4)
    close(ours, theirs.tolist(), tol=1e-7)  # nanstd's Bessel factor n / (n - 1) is computed in float32


def test_rloo_hand_values_and_group_of_one():
    out = rloo_advantages(ten([1.0, 5.0, 0.0, 3.0, 1.0]), torch.tensor([0, 3, 0, 3, 0]))
    close(out, [1 - (0 + 1) / 2, 5 - 3, 0 - (1 + 1) / 2, 3 - 5, 1 - (1 + 0) / 2])
    with pytest.raises(ValueError, match="group 9"):
        rloo_advantages(ten([1.0, 2.0, 3.0]), torch.tensor([4, 4, 9]))


# --- GAE -------------------------------------------------------------------------------------------------------------
def test_gae_four_step_episode_and_padded_row():
    gamma, lam = 0.9, 0.8
    rewards = ten([[0.1, -0.2, 0.0, 1.0], [0.5, 2.0, 9.0, 9.0]])
    values = ten([[0.5, 0.4, 0.6, 0.3], [1.0, 0.7, INF, 3.0]])  # row 1: two valid tokens, garbage after
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    # row 0: delta_t = r_t + 0.9 V_{t+1} - V_t with V_4 = 0
    d3, d2, d1, d0 = 1.0 - 0.3, 0.0 + 0.9 * 0.3 - 0.6, -0.2 + 0.9 * 0.6 - 0.4, 0.1 + 0.9 * 0.4 - 0.5
    a3 = d3
    a2 = d2 + 0.72 * a3
    a1 = d1 + 0.72 * a2
    a0 = d0 + 0.72 * a1
    # row 1: V_2 = 0 (past the last valid token)
    b1 = 2.0 - 0.7
    b0 = 0.5 + 0.9 * 0.7 - 1.0 + 0.72 * b1
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    close(advantages, [[a0, a1, a2, a3], [b0, b1, 0.0, 0.0]])
    close(returns, [[a0 + 0.5, a1 + 0.4, a2 + 0.6, a3 + 0.3], [b0 + 1.0, b1 + 0.7, 0.0, 0.0]])
    _, mc_returns = gae(rewards, values, mask, gamma=gamma, lam=1.0)  # lam = 1: discounted Monte Carlo returns
    close(mc_returns[0], [0.1 - 0.9 * 0.2 + 0.81 * 0.0 + 0.729, -0.2 + 0.0 + 0.81, 0.9, 1.0])
    with pytest.raises(ValueError, match="right-padded"):
        gae(rewards, values, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]), gamma=gamma, lam=lam)


# --- PPO policy loss -------------------------------------------------------------------------------------------------
# eps = 0.2. token: ratio, A  ->  -min(ratio A, clip(ratio) A), clipped (zero gradient)?
PPO_TOKENS = [(1.1, 2.0, -2.2, False),  # inside the range
              (1.5, 1.0, -1.2, True),  # above, A > 0: clipped at 1.2
              (1.5, -1.0, 1.5, False),  # above, A < 0: the unclipped term is the min
              (0.5, -1.0, 0.8, True),  # below, A < 0: clipped at 0.8
              (0.5, 1.0, -0.5, False),  # below, A > 0: unclipped
              (0.9, -0.5, 0.45, False)]


def ppo_batch(grad=False):
    """Row 0 holds tokens 0-3, row 1 tokens 4-5 then two padded slots holding inf."""
    ratios, advs = [t[0] for t in PPO_TOKENS], [t[1] for t in PPO_TOKENS]
    old = [[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.7, INF, -INF]]
    new = [[o + math.log(r) for o, r in zip(old[0], ratios[:4], strict=True)],
           [old[1][0] + math.log(ratios[4]), old[1][1] + math.log(ratios[5]), -INF, INF]]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    return ten(new, grad=grad), ten(old), ten([advs[:4], advs[4:] + [INF, 0.0]]), mask


def test_ppo_clipping_loss_gradient_and_metrics_sequence_mean():
    logp, old, advantages, mask = ppo_batch(grad=True)
    loss, metrics = ppo_policy_loss(logp, old, advantages, mask, clip_eps=0.2)
    per_token = [t[2] for t in PPO_TOKENS]
    close(loss, (mean(per_token[:4]) + mean(per_token[4:])) / 2)
    assert metrics["clip_fraction"] == pytest.approx(2 / 6)
    kl = [r - 1 - math.log(r) for r, *_ in PPO_TOKENS]  # k3 of old vs new, samples from old
    assert metrics["approx_kl"] == pytest.approx(mean(kl))
    loss.backward()
    # d/dlogp of -ratio A = -ratio A on unclipped tokens, 0 where clipped; scaled by 1 / (B * n_row)
    grads = [0.0 if clipped else -r * a for r, a, _, clipped in PPO_TOKENS]
    close(logp.grad, [[g / 8 for g in grads[:4]], [g / 4 for g in grads[4:]] + [0.0, 0.0]])


def test_ppo_token_aggregation_is_dapo_token_mean():
    logp, old, advantages, mask = ppo_batch(grad=True)
    loss, _ = ppo_policy_loss(logp, old, advantages, mask, aggregation="token")
    close(loss, mean([t[2] for t in PPO_TOKENS]))
    loss.backward()
    close(logp.grad[1, :2], [-0.5 * 1.0 / 6, 0.9 * 0.5 / 6])


def test_ppo_sequence_advantages_broadcast_and_clip_higher():
    ratios = [[1.25, 0.7], [1.25, 1.0]]
    logp = ten([[math.log(r) for r in row] for row in ratios])
    old, mask = torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, 2)
    advantages = ten([1.0, -2.0])  # (B,): one per sequence
    loss, metrics = ppo_policy_loss(logp, old, advantages, mask, clip_eps=0.2)
    # row 0, A = 1: 1.25 -> 1.2, 0.7 -> 0.7;  row 1, A = -2: min(-2.5, -2.4) = -2.5, -2
    close(loss, (-(1.2 + 0.7) / 2 + (2.5 + 2.0) / 2) / 2)
    assert metrics["clip_fraction"] == pytest.approx(1 / 4)
    loss_high, metrics_high = ppo_policy_loss(logp, old, advantages, mask, clip_eps=0.2, clip_eps_high=0.28)
    close(loss_high, (-(1.25 + 0.7) / 2 + (2.5 + 2.0) / 2) / 2)  # 1.25 < 1.28: not clipped
    assert metrics_high["clip_fraction"] == 0.0


# --- KL penalty and shaped rewards -----------------------------------------------------------------------------------
def test_kl_penalty_loss_hand_values():
    logp = ten([[-1.0, -2.0, -0.5], [-0.3, 5.0, -INF]], grad=True)
    ref = ten([[-1.5, -2.0, 0.0], [-0.1, INF, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    k3 = [math.exp(-0.5) + 0.5 - 1, 0.0, math.exp(0.5) - 0.5 - 1, math.exp(0.2) - 0.2 - 1]
    loss, metrics = kl_penalty_loss(logp, ref, mask, coef=0.04)
    close(loss, 0.04 * (mean(k3[:3]) + k3[3]) / 2)
    assert metrics["kl"] == pytest.approx(mean(k3))
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[1, 1:].abs().sum() == 0  # inf padding does not leak
    close(kl_penalty_loss(logp, ref, mask, coef=1.0, kind="k1", aggregation="token")[0], (0.5 + 0 - 0.5 - 0.2) / 4)


def test_kl_shaped_rewards_put_the_sequence_reward_on_the_last_valid_token():
    logp = ten([[-1.0, -2.0, -0.5], [-0.3, 5.0, 7.0]])
    ref = ten([[-1.5, -2.0, 0.0], [-0.1, INF, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = kl_shaped_rewards(ten([1.0, -2.0]), logp, ref, mask, coef=0.1)
    close(out, [[-0.1 * 0.5, 0.0, -0.1 * -0.5 + 1.0], [-0.1 * -0.2 - 2.0, 0.0, 0.0]])
    assert not out.requires_grad
    k3 = kl_shaped_rewards(ten([0.0, 0.0]), logp, ref, mask, coef=1.0, kind="k3")
    close(k3[0], [-(math.exp(-0.5) + 0.5 - 1), 0.0, -(math.exp(0.5) - 0.5 - 1)])


# --- value loss ------------------------------------------------------------------------------------------------------
def test_value_loss_clipping_hand_values_and_gradient():
    # V_old = 1, eps = 0.2. token: V, R -> 0.5 max((V - R)^2, (clip(V) - R)^2), clipped term wins?
    tokens = [(1.1, 2.0, 0.5 * 0.81, False),  # inside the range: both terms equal
              (1.5, 1.0, 0.5 * 0.25, False),  # outside, clipped term smaller (0.04)
              (1.5, 2.0, 0.5 * 0.64, True),  # outside, clip(V) = 1.2 is further from R
              (0.5, 0.0, 0.5 * 0.64, True)]  # below, clip(V) = 0.8
    values = ten([[t[0] for t in tokens] + [INF]], grad=True)
    returns = ten([[t[1] for t in tokens] + [0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = value_loss(values, torch.ones(1, 5, dtype=torch.float64), returns, mask, clip_eps=0.2)
    close(loss, mean([t[2] for t in tokens]))
    assert metrics["clip_fraction"] == pytest.approx(2 / 4)
    loss.backward()
    close(values.grad, [[0.0 if t[3] else (t[0] - t[1]) / 4 for t in tokens] + [0.0]])


# --- shapes ----------------------------------------------------------------------------------------------------------
def test_shape_and_argument_errors():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(x, x, "k4")
    with pytest.raises(ValueError, match="same shape|share a shape"):
        kl_estimate(x, x[:, :2], "k1")
    with pytest.raises(ValueError, match="mask must be a 2-D"):
        kl_penalty_loss(x, x, mask[0], coef=0.1)
    with pytest.raises(ValueError, match="0 and 1"):
        kl_penalty_loss(x, x, 2 * mask, coef=0.1)
    with pytest.raises(ValueError, match="ref_logp must have the mask's shape"):
        kl_penalty_loss(x, x[:1], mask, coef=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        kl_penalty_loss(x, x, mask, coef=0.1, aggregation="batch")
    with pytest.raises(ValueError, match=r"advantages must be \(B,\) or \(B, T\)"):
        ppo_policy_loss(x, x, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(x, x.T, x, mask)
    with pytest.raises(ValueError, match="values must have"):
        gae(x, torch.zeros(2, 4), mask, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        rloo_advantages(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="seq_rewards"):
        kl_shaped_rewards(torch.zeros(3), x, x, mask, coef=0.1)
    with pytest.raises(ValueError, match="valid token"):
        kl_shaped_rewards(torch.zeros(2), x, x, torch.tensor([[1, 1, 0], [0, 0, 0]]), coef=0.1)
    with pytest.raises(ValueError, match="right-padded"):
        kl_shaped_rewards(torch.zeros(2), x, x, torch.tensor([[0, 1, 1], [1, 1, 1]]), coef=0.1)


def test_token_entropy_hand_values():
    from rayalign.losses.rl import token_entropy

    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]])  # p = (1/2, 1/2), (1/4, 3/4), (1/2, 1/2)
    expected = [math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2)]
    assert token_entropy(logits).tolist() == pytest.approx(expected, abs=1e-6)
    assert token_entropy(torch.tensor([[0.0, -1e4, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)


def test_minibatch_order_covers_every_row_once_per_epoch():
    from rayalign.training.rollouts import minibatch_order

    assert minibatch_order(6, 6, 1, seed=0) == [[0, 1, 2, 3, 4, 5]]
    updates = minibatch_order(6, 2, 3, seed=[1, 2])
    assert len(updates) == 9 and all(len(u) == 2 for u in updates)
    for epoch in range(3):
        assert sorted(i for u in updates[3 * epoch:3 * epoch + 3] for i in u) == list(range(6))
    assert updates == minibatch_order(6, 2, 3, seed=[1, 2]) and updates != minibatch_order(6, 2, 3, seed=[1, 3])
    with pytest.raises(ValueError, match="does not divide"):
        minibatch_order(6, 4, 1, seed=0)


def test_value_loss_aggregates_per_sequence_or_per_token():
    # two sequences, no clipping (V = V_old): row 1 has one token with 0.5 (1)^2, row 2 three tokens with 0.5 (2)^2
    values = ten([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    returns = ten([[2.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    by_sequence, _ = value_loss(values, values, returns, mask)
    by_token, _ = value_loss(values, values, returns, mask, aggregation="token")
    close(by_sequence, (0.5 + 2.0) / 2)  # the mean of each row's token mean
    close(by_token, (0.5 + 3 * 2.0) / 4)  # every token counts once
