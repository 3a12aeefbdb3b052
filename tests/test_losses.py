"""rayalign.losses.preference against values worked out by hand with `math`, and dpo_loss against TRL's own DPO loss code."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rayalign.losses.preference import (
    dco_loss,
    dpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_mismatched_rows,
    kto_reference_point,
    kto_loss,
    orpo_loss,
    simpo_loss,
)


def vec(*values, grad=False, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def mean(values):
    return sum(values) / len(values)


def close(tensor, expected, tol=1e-9):
    assert tensor.detach().tolist() == pytest.approx(expected, rel=tol, abs=tol)


# --- DPO / cDPO / DPO + NLL ------------------------------------------------------------------------------------------
# rows: (pc - rc) = [1, -1, 1], (pr - rr) = [-1, 1, -2]  ->  h / beta = [2, -2, 3]
DPO_ROWS = {"policy_chosen": [-10.0, -20.0, -5.0], "policy_rejected": [-12.0, -18.0, -9.0],
            "ref_chosen": [-11.0, -19.0, -6.0], "ref_rejected": [-11.0, -19.0, -7.0]}


def dpo_inputs(grad=False):
    return {k: vec(*v, grad=grad and k.startswith("policy")) for k, v in DPO_ROWS.items()}


def test_dpo_hand_values_and_gradient_signs():
    inputs = dpo_inputs(grad=True)
    out = dpo_loss(**inputs, beta=0.5)
    h = [1.0, -1.0, 1.5]
    close(out.loss, mean([-logsigmoid(x) for x in h]))
    close(out.chosen_rewards, [0.5, -0.5, 0.5])
    close(out.rejected_rewards, [-0.5, 0.5, -1.0])
    assert not out.chosen_rewards.requires_grad
    assert out.metrics["reward_accuracy"] == pytest.approx(2 / 3)
    out.loss.backward()
    # d/dpc = -beta * (1 - sigma(h)) / B < 0, and the opposite for pr
    close(inputs["policy_chosen"].grad, [-0.5 * (1 - sigmoid(x)) / 3 for x in h])
    assert (inputs["policy_chosen"].grad < 0).all() and (inputs["policy_rejected"].grad > 0).all()


def test_cdpo_label_smoothing():
    out = dpo_loss(**dpo_inputs(), beta=0.5, label_smoothing=0.2)
    close(out.loss, mean([-0.8 * logsigmoid(x) - 0.2 * logsigmoid(-x) for x in [1.0, -1.0, 1.5]]))
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(**dpo_inputs(), beta=0.5, label_smoothing=0.5)


def test_dpo_nll_term():
    inputs = dpo_inputs(grad=True)
    tokens = torch.tensor([5, 10, 2])  # int counts: -pc / |y_w| = [2, 2, 2.5]
    out = dpo_loss(**inputs, beta=0.5, nll_weight=0.3, chosen_tokens=tokens)
    h = [1.0, -1.0, 1.5]
    close(out.loss, mean([-logsigmoid(x) for x in h]) + 0.3 * 6.5 / 3)
    assert out.metrics["nll"] == pytest.approx(6.5 / 3)
    out.loss.backward()
    expected_grad = [-0.5 * (1 - sigmoid(x)) / 3 - 0.3 / (3 * n) for x, n in zip(h, [5, 10, 2], strict=True)]
    close(inputs["policy_chosen"].grad, expected_grad)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(**dpo_inputs(), beta=0.5, nll_weight=0.3)
    with pytest.raises(ValueError, match="positive"):
        dpo_loss(**dpo_inputs(), beta=0.5, nll_weight=0.3, chosen_tokens=torch.tensor([5, 0, 2]))


# --- IPO -------------------------------------------------------------------------------------------------------------
def test_ipo_hand_values_and_gradient():
    inputs = dpo_inputs(grad=True)
    out = ipo_loss(**inputs, beta=0.25)  # target margin 1 / (2 * 0.25) = 2; h = [2, -2, 3]
    close(out.loss, (0 + 16 + 1) / 3)
    close(out.chosen_rewards, [0.25, -0.25, 0.25])
    out.loss.backward()
    close(inputs["policy_chosen"].grad, [0.0, 2 * -4 / 3, 2 * 1 / 3])  # below the target margin: push pc up
    out = ipo_loss(**dpo_inputs(), beta=0.25, nll_weight=1.0, chosen_tokens=vec(5, 10, 2))
    close(out.loss, 17 / 3 + 6.5 / 3)


# --- SimPO -----------------------------------------------------------------------------------------------------------
def test_simpo_hand_values_and_gradient_signs():
    pc, pr = vec(-10.0, -20.0, grad=True), vec(-12.0, -25.0, grad=True)
    out = simpo_loss(pc, pr, torch.tensor([5, 10]), torch.tensor([4, 10]), beta=2.0, margin=0.5)
    # rewards 2 * p / |y|: chosen [-4, -4], rejected [-6, -5]; margins after gamma: [1.5, 0.5]
    close(out.chosen_rewards, [-4.0, -4.0])
    close(out.rejected_rewards, [-6.0, -5.0])
    close(out.loss, mean([-logsigmoid(1.5), -logsigmoid(0.5)]))
    out.loss.backward()
    close(pc.grad, [-(1 - sigmoid(1.5)) * 2 / 5 / 2, -(1 - sigmoid(0.5)) * 2 / 10 / 2])
    assert (pr.grad > 0).all()
    out = simpo_loss(vec(-10.0, -20.0), vec(-12.0, -25.0), vec(5, 10), vec(4, 10), beta=2.0, margin=0.5,
                     nll_weight=0.5)
    close(out.loss, mean([-logsigmoid(1.5), -logsigmoid(0.5)]) + 0.5 * 2.0)


# --- KTO -------------------------------------------------------------------------------------------------------------
def test_kto_hand_values_with_batch_kl_estimate():
    policy, ref = vec(-10.0, -12.0, -8.0, -15.0, grad=True), vec(-12.0, -11.0, -9.0, -15.5)
    labels = torch.tensor([True, False, True, False])
    out = kto_loss(policy, ref, labels, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    z = (2 - 1 + 1 + 0.5) / 4  # r = [2, -1, 1, 0.5]
    expected = [1 - sigmoid(0.5 * (2 - z)), 1.5 * (1 - sigmoid(0.5 * (z + 1))),
                1 - sigmoid(0.5 * (1 - z)), 1.5 * (1 - sigmoid(0.5 * (z - 0.5)))]
    close(out.loss, mean(expected))
    assert out.metrics["kl"] == pytest.approx(0.625)
    close(out.chosen_rewards, [1.0, 0.5])
    close(out.rejected_rewards, [-0.5, 0.25])
    out.loss.backward()
    # z is detached: d/dr = -w_D beta s(1-s) / B (desirable) and +w_U beta s(1-s) / B (undesirable)
    ds = [sigmoid(0.5 * (2 - z)), sigmoid(0.5 * (-z - 1)), sigmoid(0.5 * (1 - z)), sigmoid(0.5 * (z - 0.5))]
    ds = [s * (1 - s) for s in ds]
    close(policy.grad, [-0.5 * ds[0] / 4, 1.5 * 0.5 * ds[1] / 4, -0.5 * ds[2] / 4, 1.5 * 0.5 * ds[3] / 4])


def test_kto_mismatched_rows_pair_each_prompt_with_another_prompts_response():
    assert kto_mismatched_rows(["a", "a", "b", "b", "c"]) == [2, 2, 4, 4, 0]
    assert kto_mismatched_rows(["a", "b"]) == [1, 0]
    assert kto_mismatched_rows(["a", "a"]) == [1, 0]  # one prompt only: the next row


def _reference_point_on_rank(rank, world, port, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # rank 0: log-ratios [3, -1]; rank 1: [0.5, 0.5, 2]
    policy = [vec(-7.0, -9.0), vec(-5.0, -5.0, -4.0)][rank]
    ref = [vec(-10.0, -8.0), vec(-5.5, -5.5, -6.0)][rank]
    queue.put((rank, kto_reference_point(policy, ref, all_reduce=dist.all_reduce).item()))
    dist.destroy_process_group()


def test_kto_reference_point_is_the_global_batch_mean_over_ranks():
    import socket

    import torch.multiprocessing as mp

    # one process: mean of [3, -1, 0.5] = 2.5 / 3; negative means clamp at 0
    close(kto_reference_point(vec(-7.0, -9.0, -5.0), vec(-10.0, -8.0, -5.5)), 2.5 / 3)
    assert kto_reference_point(vec(-3.0), vec(-1.0)).item() == 0.0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_reference_point_on_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # the 5 rows of both ranks: (3 - 1 + 0.5 + 0.5 + 2) / 5 = 1.0 (a mean of the ranks' means would be 1.5)
    assert got == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}


def test_kto_kl_estimate_clamp_and_given_kl():
    close(kto_kl_estimate(vec(-10.0, -12.0, -8.0, -15.0), vec(-12.0, -11.0, -9.0, -15.5)), 0.625)
    policy = vec(-12.0, -10.0, grad=True)
    z = kto_kl_estimate(policy, vec(-10.0, -11.0))  # mean(r) = -0.5 -> clamped to 0
    assert z.item() == 0.0 and not z.requires_grad
    out = kto_loss(vec(-12.0, -10.0), vec(-10.0, -11.0), torch.tensor([True, True]), beta=1.0, kl=0.3)
    assert out.metrics["kl"] == pytest.approx(0.3)
    close(out.loss, mean([1 - sigmoid(-2 - 0.3), 1 - sigmoid(1 - 0.3)]))
    assert out.rejected_rewards.numel() == 0
    with pytest.raises(ValueError, match="labels"):
        kto_loss(vec(-1.0, -2.0), vec(-1.0, -2.0), torch.tensor([1, 0]), beta=1.0)


# --- ORPO ------------------------------------------------------------------------------------------------------------
def log_odds(m):  # log(P / (1 - P)) with P = exp(m)
    return m - math.log(1 - math.exp(m))


def test_orpo_hand_values_and_gradient_signs():
    pc, pr = vec(-6.0, -2.0, grad=True), vec(-12.0, -9.0, grad=True)
    out = orpo_loss(pc, pr, torch.tensor([3, 4]), torch.tensor([4, 3]), lam=0.1)
    m_w, m_l = [-2.0, -0.5], [-3.0, -3.0]
    ratios = [log_odds(w) - log_odds(lose) for w, lose in zip(m_w, m_l, strict=True)]
    close(out.loss, mean([-w - 0.1 * logsigmoid(r) for w, r in zip(m_w, ratios, strict=True)]))
    assert out.metrics["nll"] == pytest.approx(1.25)
    assert out.metrics["log_odds_ratio"] == pytest.approx(mean(ratios))
    close(out.chosen_rewards, m_w)
    out.loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chosen_logp", [0.0, -1e-9, -1e-4, -5000.0])
def test_orpo_stable_near_zero_and_very_negative(dtype, chosen_logp):
    pc, pr = vec(chosen_logp, grad=True, dtype=dtype), vec(-3000.0, grad=True, dtype=dtype)
    out = orpo_loss(pc, pr, torch.tensor([1]), torch.tensor([1]), lam=0.5)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    m_w = min(chosen_logp, -1e-6)  # the documented clamp, inside the odds only
    expected = -chosen_logp - 0.5 * logsigmoid(log_odds(m_w) - log_odds(-3000.0))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert pr.grad.item() >= 0


# --- DCO -------------------------------------------------------------------------------------------------------------
def dco_refs(n=1):  # ref diffs d1 = ref_w1 - ref_l1 = 2, d2 = ref_w2 - ref_l2 = -1
    return {"ref_chosen_1": vec(*[-10.0] * n), "ref_rejected_1": vec(*[-12.0] * n),
            "ref_chosen_2": vec(*[-9.0] * n), "ref_rejected_2": vec(*[-8.0] * n)}


def test_dco_asymmetric_gammas_hand_values():
    policy = {"policy_chosen_1": vec(-9.0, -9.0, grad=True), "policy_rejected_1": vec(-13.0, -13.0, grad=True),
              "policy_chosen_2": vec(-10.0, -10.0, grad=True), "policy_rejected_2": vec(-7.0, -7.0, grad=True)}
    # beta = 1: rhat diffs 2 (side 1) and -2 (side 2).
    # row 0, gammas (10, 0.1): |2 - 10 * (-1)| + |-2 - 0.1 * 2| = 12 + 2.2;  row 1, gammas (1, 1): 3 + 4
    out = dco_loss(**policy, **dco_refs(2), gamma_12=vec(10.0, 1.0), gamma_21=vec(0.1, 1.0), beta=1.0)
    close(out.loss, (14.2 + 7.0) / 2)
    # at pi_ref: row 0 |10 * (-1)| + |0.1 * 2| = 10.2, row 1 |1 * (-1)| + |1 * 2| = 3
    assert out.metrics["loss_at_reference"] == pytest.approx((10.2 + 3.0) / 2)
    close(out.chosen_rewards, [1.0, 1.0, -1.0, -1.0])
    close(out.rejected_rewards, [-1.0, -1.0, 1.0, 1.0])
    out.loss.backward()
    close(policy["policy_chosen_1"].grad, [0.5, 0.5])  # beta * sign(12 and 3) / B
    close(policy["policy_chosen_2"].grad, [-0.5, -0.5])  # beta * sign(-2.2 and -4) / B
    single = {k: v[:1].detach() for k, v in policy.items()}
    close(dco_loss(**single, **dco_refs(), gamma_12=10.0, gamma_21=0.1, beta=1.0).loss, 14.2)


def test_dco_consistent_optimum_when_gamma_product_is_beta_squared():
    beta, g12, g21 = 0.5, 0.25, 1.0  # g12 * g21 = beta^2 (Lemma 1)
    # zero loss needs policy diffs  side 1: d1 + g12 d2 / beta = 1.5,  side 2: d2 + g21 d1 / beta = 3
    policy = {"policy_chosen_1": vec(-10.0), "policy_rejected_1": vec(-11.5),
              "policy_chosen_2": vec(-5.0), "policy_rejected_2": vec(-8.0)}
    out = dco_loss(**policy, **dco_refs(), gamma_12=vec(g12), gamma_21=vec(g21), beta=beta)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)
    # trained from the reference, the policy reaches that optimum: margin_2 = (beta / g12) * margin_1 (Lemma 1)
    params = [vec(-10.0, grad=True), vec(-12.0, grad=True), vec(-9.0, grad=True), vec(-8.0, grad=True)]
    opt = torch.optim.Adam(params, lr=0.01)
    for step in range(3000):
        for group in opt.param_groups:
            group["lr"] = 0.01 * (1 - step / 3000)
        opt.zero_grad()
        dco_loss(*params, **dco_refs(), gamma_12=g12, gamma_21=g21, beta=beta).loss.backward()
        opt.step()
    margin_1, margin_2 = (params[0] - params[1]).item(), (params[2] - params[3]).item()
    assert margin_1 == pytest.approx(1.5, abs=0.02) and margin_2 == pytest.approx(beta / g12 * margin_1, abs=0.05)
    moved = dict(policy, policy_chosen_1=vec(-9.0))  # side 1 off by beta * 1
    close(dco_loss(**moved, **dco_refs(), gamma_12=g12, gamma_21=g21, beta=beta).loss, 0.5)


# --- batch sharding and shapes ---------------------------------------------------------------------------------------
def test_equal_shards_average_to_the_full_batch():
    inputs = dpo_inputs()
    halves = [dpo_loss(**{k: v[s] for k, v in inputs.items()}, beta=0.5).loss for s in (slice(0, 1), slice(1, 3))]
    close(dpo_loss(**inputs, beta=0.5).loss, (halves[0].item() + 2 * halves[1].item()) / 3)


def test_shape_errors():
    good = dpo_inputs()
    with pytest.raises(ValueError, match="same batch size"):
        dpo_loss(**dict(good, ref_rejected=vec(1.0, 2.0)), beta=0.1)
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(**dict(good, policy_chosen=good["policy_chosen"][None]), beta=0.1)
    with pytest.raises(ValueError, match="1-D"):
        simpo_loss(vec(-1.0), vec(-2.0), 3, torch.tensor([2]), beta=1.0, margin=0.0)
    with pytest.raises(ValueError, match="B >= 1"):
        ipo_loss(vec(), vec(), vec(), vec(), beta=0.1)
    with pytest.raises(ValueError, match="same batch size"):
        orpo_loss(vec(-1.0, -2.0), vec(-2.0, -3.0), torch.tensor([1, 2, 3]), torch.tensor([1, 2]), lam=0.1)
    with pytest.raises(ValueError, match="labels"):
        kto_loss(vec(-1.0, -2.0), vec(-1.0, -2.0), torch.tensor([True]), beta=1.0)
    with pytest.raises(ValueError, match="same batch size"):
        dco_loss(*[vec(-1.0, -2.0)] * 8, vec(1.0, 1.0, 1.0), 1.0, beta=1.0)


# --- against TRL -----------------------------------------------------------------------------------------------------
class _FakePolicy:
    """Stands in for the model in DPOTrainer._compute_loss: per-token log-probs whose row sums are the given logps."""

    training = True

    def __init__(self, logps):  # (2B,) chosen rows, then rejected rows
        self.logps = logps

    def __call__(self, input_ids, **kwargs):
        rows, width = input_ids.shape[0], input_ids.shape[1] - 1
        zeros = torch.zeros(rows, width, dtype=self.logps.dtype)
        log_probs = torch.cat([self.logps[:, None], zeros[:, 1:]], dim=1)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_dpo(loss_type, beta, label_smoothing, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """DPOTrainer._compute_loss of the installed TRL, called on a minimal object with precomputed reference logps."""
    trl_dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    policy = _FakePolicy(torch.cat([policy_chosen, policy_rejected]))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=policy, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    n = 2 * policy_chosen.shape[0]
    inputs = {"input_ids": torch.zeros(n, 4, dtype=torch.long), "attention_mask": torch.ones(n, 4, dtype=torch.long),
              "completion_mask": torch.ones(n, 4, dtype=torch.long), "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}
    loss = trl_dpo_trainer.DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_matches_trl_sigmoid(beta):
    ours_in, trl_in = dpo_inputs(grad=True), dpo_inputs(grad=True)
    ours = dpo_loss(**ours_in, beta=beta)
    theirs, metrics = trl_dpo("sigmoid", beta, 0.0, *trl_in.values())
    assert ours.loss.item() == pytest.approx(theirs.item(), rel=1e-12)
    ours.loss.backward()
    theirs.backward()
    for key in ("policy_chosen", "policy_rejected"):
        close(ours_in[key].grad, trl_in[key].grad.tolist(), tol=1e-12)
    assert metrics["rewards/chosen"][0] == pytest.approx(ours.chosen_rewards.mean().item())
    assert metrics["rewards/margins"][0] == pytest.approx(ours.metrics["reward_margin"])


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_cdpo_matches_trl_label_smoothing(label_smoothing):
    # TRL 1.16's "sigmoid" loss ignores label_smoothing; its cDPO formula -(1-e) log s(h) - e log s(-h) lives in the
    # "aot" loss, which sorts (pc - pr) and (rc - rr) separately. Rows where both orders agree make it plain cDPO.
    inputs = dict(dpo_inputs(), ref_rejected=vec(-11.5, -18.0, -9.0))  # pc - pr = [2, -2, 4], rc - rr = [.5, -1, 3]
    assert torch.equal((inputs["policy_chosen"] - inputs["policy_rejected"]).argsort(),
                       (inputs["ref_chosen"] - inputs["ref_rejected"]).argsort())
    ours = dpo_loss(**inputs, beta=0.5, label_smoothing=label_smoothing)
    theirs, _ = trl_dpo("aot", 0.5, label_smoothing, *inputs.values())
    assert ours.loss.item() == pytest.approx(theirs.item(), rel=1e-12)


def test_orpo_odds_ratio_matches_trl():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    pc, pr, nw, nl = vec(-6.0, -2.0, -0.3), vec(-12.0, -9.0, -40.0), vec(3, 4, 2), vec(4, 3, 8)
    fake = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, _, _, _, log_odds_mean = orpo.ORPOTrainer.odds_ratio_loss(fake, pc / nw, pr / nl)
    ours = orpo_loss(pc, pr, nw, nl, lam=0.1)
    assert ours.loss.item() == pytest.approx(((-pc / nw) - losses).mean().item(), rel=1e-6)
    assert ours.metrics["log_odds_ratio"] == pytest.approx(log_odds_mean.item(), rel=1e-6)


# --- the training step's dispatch: each loss gets the recipe's settings -----------------------------------------------
@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo", "simpo", "orpo"])
def test_training_step_hands_each_loss_the_recipes_settings(loss):
    from rayalign.config import TrainingConfig
    from rayalign.training.data import compute_loss

    t = TrainingConfig(loss=loss, beta=0.5, label_smoothing=0.2, nll_weight=0.5, simpo_margin=0.5, orpo_lambda=0.3)
    pc, pr = DPO_ROWS["policy_chosen"], DPO_ROWS["policy_rejected"]
    nc, nr = [5, 10, 4], [6, 9, 8]
    logps = vec(*pc, *pr, dtype=torch.float32)
    counts = torch.tensor(nc + nr)
    batch = {"ref_logp_chosen": vec(*DPO_ROWS["ref_chosen"]), "ref_logp_rejected": vec(*DPO_ROWS["ref_rejected"])}
    nll = mean([2.0, 2.0, 1.25])  # -pc / nc
    h = [1.0, -1.0, 1.5]  # beta * [2, -2, 3]
    log_odds = [m - math.log(1 - math.exp(m)) for m in (-2.0, -2.0, -1.25, -2.0, -2.0, -1.125)]  # pc/nc, pr/nr
    expected = {
        "dpo": mean([-logsigmoid(x) for x in h]) + 0.5 * nll,
        "cdpo": mean([-0.8 * logsigmoid(x) - 0.2 * logsigmoid(-x) for x in h]) + 0.5 * nll,
        "ipo": mean([1.0, 9.0, 4.0]) + 0.5 * nll,  # ([2, -2, 3] - 1 / (2 beta))^2
        "simpo": mean([-logsigmoid(x) for x in (-0.5, -0.5, -0.5625)]) + 0.5 * nll,  # 0.5 * (pc/nc - pr/nr) - 0.5
        "orpo": mean([-m - 0.3 * logsigmoid(log_odds[i] - log_odds[i + 3]) for i, m in enumerate([-2.0, -2.0, -1.25])]),
    }[loss]
    value, metrics = compute_loss(loss, logps, counts, batch, t)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["loss"] == (pytest.approx(expected, rel=1e-6), 1)


def test_kto_logs_no_pair_margin_or_accuracy():
    """KTO's desirable and undesirable rows are separate rows: the margin and accuracy paired unrelated rows
    whenever a micro-batch held as many of each (here -5.0 and 0.0, against chosen minus rejected of -4.33)."""
    from rayalign.config import TrainingConfig
    from rayalign.training.data import compute_loss

    t = TrainingConfig(loss="kto", beta=0.1)
    batch = {"ref_logp": torch.tensor([-11.0, -11.0]), "label": torch.tensor([1, 0])}
    _, metrics = compute_loss("kto", torch.tensor([-10.0, -12.0]), torch.tensor([3, 3]), batch, t,
                              kto_kl=torch.tensor(0.0))
    assert "reward_margin" not in metrics and "accuracy" not in metrics
    assert metrics["reward_chosen"] == (pytest.approx(0.1 * (-10.0 + 11.0)), 1)  # beta x (logp - ref)
    assert metrics["reward_rejected"] == (pytest.approx(0.1 * (-12.0 + 11.0)), 1)
