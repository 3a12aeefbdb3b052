"""DeepSpeed trainer actors on CPU (gloo): rank/accumulation equivalence, ZeRO-3, checkpoints, resume."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rayalign.config import ModelConfig, TrainingConfig

# Adam's first steps move each weight by about lr whatever the gradient's scale, so a wrong gradient is
# visible at 1e-3 while reduction-order noise between 1 and 2 ranks stays below 1e-6.
TOL = 1e-5
BASE = TrainingConfig(loss="dpo", lr=1e-3, warmup_ratio=0.0, micro_batch_size=2, gradient_accumulation=1,
                      world_size=1, zero_stage=2, num_cpus=1, nll_weight=0.5)


def fit(model: str, data: str, **changes):
    from rayalign.actors.preference_trainer import PreferenceTrainerGroup as TrainerGroup

    t = dataclasses.replace(BASE, **changes)
    group = TrainerGroup(model, ModelConfig(path=model), t)
    try:
        result = group.fit(data, "pairs", t.loss)
        return result, group.parameters(), group
    except BaseException:
        group.shutdown()
        raise


def fit_side_by_side(model: str, data: str, *variants: dict) -> list:
    """fit() of each variant at once, each its own group (threads here, so Ray starts and runs their actors side by
    side: the actors' start-up dominates these tests). Each group trains alone in its own processes, so the results
    are those of fits one after another. Returns fit()'s triples in the variants' order; the caller shuts the groups
    down."""
    with ThreadPoolExecutor(len(variants)) as pool:
        futures = [pool.submit(fit, model, data, **v) for v in variants]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for f in futures:
            if f.exception() is None:
                f.result()[2].shutdown()
        raise errors[0]
    return [f.result() for f in futures]


def initial_parameters(model: str) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().numpy() for k, v in AutoModelForCausalLM.from_pretrained(model).named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_two_ranks_equal_one_rank_with_double_accumulation(ray_session, tiny_model, pairs_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    (one, params_one, group_one), (two, params_two, group) = fit_side_by_side(  # 1 + 2 of the session's 4 CPUs
        tiny_model, pairs_dataset, dict(world_size=1, gradient_accumulation=2),
        dict(world_size=2, gradient_accumulation=1))
    group_one.shutdown()
    try:
        group.save(str(tmp_path / "policy"))
    finally:
        group.shutdown()
    assert one["prepare"]["steps"] == two["prepare"]["steps"] == 40 // 4
    assert max_diff(params_one, params_two) < TOL
    for a, b in zip(one["steps"], two["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["tokens"] == b["tokens"]
    # the first step sees the reference itself: DPO loss log 2, zero rewards
    assert two["steps"][0]["loss"] == pytest.approx(np.log(2) + 0.5 * two["steps"][0]["nll"], abs=1e-4)
    assert abs(two["steps"][0]["reward_margin"]) < 1e-4
    start = initial_parameters(tiny_model)
    unchanged = [k for k in start if np.abs(params_two[k] - start[k]).max() == 0]
    assert not unchanged, f"parameters never updated: {unchanged}"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert max_diff({k: v.detach().numpy() for k, v in reloaded.named_parameters()}, params_two) == 0
    assert (tmp_path / "policy" / "tokenizer_config.json").is_file()


def test_zero3_two_ranks_match_zero2(ray_session, tiny_model, pairs_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    (_, zero2, group2), (_, zero3, group) = fit_side_by_side(  # 2 + 2 ranks: the session's 4 CPUs
        tiny_model, pairs_dataset, dict(world_size=2, zero_stage=2, epochs=1),
        dict(world_size=2, zero_stage=3, epochs=1))
    group2.shutdown()
    try:
        group.save(str(tmp_path / "policy"))  # gathers every partitioned parameter
    finally:
        group.shutdown()
    assert max_diff(zero2, zero3) < TOL
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert max_diff({k: v.detach().numpy() for k, v in reloaded.named_parameters()}, zero3) == 0


def test_resume_equals_an_uninterrupted_run(ray_session, tiny_model, pairs_dataset, tmp_path):
    import ray

    from rayalign.actors.preference_trainer import PreferenceTrainerGroup as TrainerGroup

    t = dataclasses.replace(BASE, micro_batch_size=4, warmup_ratio=0.2)
    ckpt = str(tmp_path / "train.ckpt")

    def interrupted():
        group = TrainerGroup(tiny_model, ModelConfig(path=tiny_model), t)
        try:  # train 4 of 10 steps, checkpoint, then lose the actors
            group.prepare(pairs_dataset, "pairs", "dpo", None)
            ray.get(group.actors[0].train_steps.remote(4))
            group.checkpoint(ckpt)
        finally:
            group.shutdown()

    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run beside it, in its own group
        first_part = pool.submit(interrupted)
        straight, params_straight, group = fit(tiny_model, pairs_dataset, micro_batch_size=4, warmup_ratio=0.2)
        group.shutdown()
    first_part.result()
    group = TrainerGroup(tiny_model, ModelConfig(path=tiny_model), t)
    try:
        resumed = group.fit(pairs_dataset, "pairs", "dpo", checkpoint_dir=ckpt)
        params_resumed = group.parameters()
    finally:
        group.shutdown()
    assert resumed["resumed_from"] == 4 and [r["step"] for r in resumed["steps"]] == list(range(5, 11))
    assert [r["lr"] for r in resumed["steps"]] == pytest.approx([r["lr"] for r in straight["steps"][4:]])
    assert [r["loss"] for r in resumed["steps"]] == pytest.approx([r["loss"] for r in straight["steps"][4:]], abs=1e-6)
    assert max_diff(params_straight, params_resumed) < 1e-6


def test_every_loss_trains_a_step(ray_session, tiny_model, pairs_dataset):
    """The pair losses run end to end on the trainer (KTO and DCO need their own datasets; see test_training)."""
    start = initial_parameters(tiny_model)
    losses = ("ipo", "cdpo", "simpo", "orpo")  # one group each, side by side on the session's 4 CPUs
    fits = fit_side_by_side(tiny_model, pairs_dataset,
                            *(dict(loss=loss, micro_batch_size=20, gradient_accumulation=1) for loss in losses))
    for _, _, group in fits:
        group.shutdown()
    for loss, (result, params, _) in zip(losses, fits):
        assert result["prepare"]["steps"] == 2 and all(np.isfinite(r["loss"]) for r in result["steps"]), loss
        unchanged = [k for k in start if np.abs(params[k] - start[k]).max() == 0]
        assert not unchanged, f"{loss}: parameters never updated: {unchanged}"


@pytest.fixture(scope="module")
def kto_dataset(pairs_dataset, tmp_path_factory) -> str:
    """KTO rows from the pairs (chosen desirable, rejected undesirable), reference log-probs shifted by -1 so that
    the matched reference point starts at 1 while the mismatched one (pi_ref = the starting weights) starts at 0."""
    import pyarrow as pa

    from rayalign.data.schemas import schema_for
    from rayalign.data.store import DatasetWriter, read_dataset

    rows = []
    for r in read_dataset(pairs_dataset, "pairs").to_pylist():
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append({"prompt": r["prompt"], "completion": r[side], "label": label, "prompt_id": r["prompt_id"],
                         "lang": r["lang"], "score": float(label), "ref_logp": r[f"ref_logp_{side}"] - 1.0,
                         "num_tokens": r[f"{side}_num_tokens"], "method": "kto-icr", "iteration": 1})
    out = tmp_path_factory.mktemp("kto") / "kto"
    writer = DatasetWriter(out, "kto", languages=sorted({r["lang"] for r in rows}), description="test kto rows")
    writer.write_shard(0, pa.Table.from_pylist(rows, schema=schema_for("kto")[1]))
    writer.finalize(expected_shards=1)
    return str(out)


def fit_kto(model: str, data: str, **changes):
    from rayalign.actors.preference_trainer import PreferenceTrainerGroup as TrainerGroup

    t = dataclasses.replace(BASE, loss="kto", micro_batch_size=8, **changes)
    group = TrainerGroup(model, ModelConfig(path=model), t)
    try:
        return group.fit(data, "kto", "kto")["steps"], group.parameters()
    finally:
        group.shutdown()


@pytest.mark.slow
def test_kto_reference_point_from_mismatched_pairs_over_the_global_batch(ray_session, tiny_model, kto_dataset):
    one, params_one = fit_kto(tiny_model, kto_dataset, world_size=1, gradient_accumulation=2)
    # step 1: the policy is pi_ref, so every mismatched log-ratio is 0 (the dataset's shifted ref_logp is not used)
    assert one[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    # z_ref is summed over the ranks: two ranks with one micro-batch each train exactly like one rank with two
    two, params_two = fit_kto(tiny_model, kto_dataset, world_size=2, gradient_accumulation=1)
    assert [r["kl"] for r in two] == pytest.approx([r["kl"] for r in one], abs=1e-5)
    assert max_diff(params_one, params_two) < TOL
    matched, _ = fit_kto(tiny_model, kto_dataset, world_size=1, gradient_accumulation=2, kto_reference_point="matched")
    assert matched[0]["kl"] == pytest.approx(1.0, abs=1e-3)  # the micro-batch's own rows against the dataset's ref
