"""Training data without Ray: encoding, the batch plan (length grouping, batch alignment), log-probs, schedule."""

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from rayalign.config import TrainingConfig
from rayalign.data.store import read_dataset
from rayalign.models import load_causal_lm, load_tokenizer
from rayalign.training.data import (TrainingData, TrainingDataError, batch_plan, collate, compute_loss, encode_dataset,
                               micro_batch, sequence_logps)

LANGS = ["en", "es", "de", "fr", "ru"]


@pytest.fixture(scope="module")
def pairs(pairs_dataset):
    return read_dataset(pairs_dataset, "pairs")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def synthetic(lengths, prompt_ids, langs) -> TrainingData:
    return TrainingData("pairs", [[([1] * n, [2]), ([1] * n, [2])] for n in lengths],
                        {"ref_logp_chosen": np.zeros(len(lengths))}, prompt_ids, langs)


def test_training_log_probs_equal_the_scoring_pass(tiny_model, tokenizer, pairs, pairs_dataset):
    """The trainer's sequences and sums reproduce the engine's scores stored as reference log-probs."""
    data = encode_dataset(pairs, "pairs", tokenizer, max_length=1024, source=pairs_dataset)
    model = load_causal_lm(tiny_model, "float32")
    rows = list(range(0, len(data), 3))
    batch = collate(data, rows, tokenizer.pad_token_id)
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    n = len(rows)
    np.testing.assert_allclose(logps[:n].numpy(), pairs.column("ref_logp_chosen").to_numpy()[rows], atol=2e-4)
    np.testing.assert_allclose(logps[n:].numpy(), pairs.column("ref_logp_rejected").to_numpy()[rows], atol=2e-4)
    assert counts[:n].tolist() == pairs.column("chosen_num_tokens").to_numpy()[rows].tolist()
    # hence a DPO step on the reference itself: log 2 and zero margins
    loss, metrics = compute_loss("dpo", logps, counts, batch, TrainingConfig(loss="dpo"))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-4) and abs(metrics["reward_margin"][0]) < 1e-3


def test_collate_is_sequence_major_and_masks_responses(tokenizer, pairs):
    data = encode_dataset(pairs, "pairs", tokenizer, max_length=1024)
    batch = collate(data, [4, 1], pad_id=0)
    order = [data.sequences[4][0], data.sequences[1][0], data.sequences[4][1], data.sequences[1][1]]
    for b, (p, r) in enumerate(order):
        assert batch["input_ids"][b, :len(p) + len(r)].tolist() == p + r
        assert batch["loss_mask"][b].nonzero().flatten().tolist() == list(range(len(p), len(p) + len(r)))
        assert int(batch["attention_mask"][b].sum()) == len(p) + len(r)
    assert batch["ref_logp_chosen"].tolist() == pytest.approx(data.values["ref_logp_chosen"][[4, 1]].tolist())


def test_encoding_refuses_data_scored_with_another_tokenizer(tokenizer, pairs):
    counts = pairs.column("chosen_num_tokens").to_pylist()
    counts[3] += 1
    bad = pairs.set_column(pairs.column_names.index("chosen_num_tokens"), "chosen_num_tokens",
                           pa.array(counts, pa.int32()))
    with pytest.raises(TrainingDataError, match=r"x row 3 column chosen: .* scored with"):
        encode_dataset(bad, "pairs", tokenizer, max_length=1024, source="x")


def test_missing_reference_is_refused_unless_the_loss_is_reference_free(tokenizer, pairs):
    refs = pairs.column("ref_logp_rejected").to_pylist()
    refs[5] = None
    bad = pairs.set_column(pairs.column_names.index("ref_logp_rejected"), "ref_logp_rejected",
                           pa.array(refs, pa.float64()))
    with pytest.raises(TrainingDataError, match="row 5 column ref_logp_rejected.*simpo, orpo"):
        encode_dataset(bad, "pairs", tokenizer, max_length=1024)
    assert len(encode_dataset(bad, "pairs", tokenizer, max_length=1024, needs_reference=False)) == pairs.num_rows


def test_too_long_rows_are_left_out_and_counted(tokenizer, pairs):
    full = encode_dataset(pairs, "pairs", tokenizer, max_length=1024)
    limit = int(np.median(full.lengths))
    cut = encode_dataset(pairs, "pairs", tokenizer, max_length=limit)
    assert cut.dropped_too_long == int((full.lengths > limit).sum()) > 0
    assert len(cut) + cut.dropped_too_long == pairs.num_rows and cut.lengths.max() <= limit
    with pytest.raises(TrainingDataError, match="no row fits training.max_length 8"):
        encode_dataset(pairs, "pairs", tokenizer, max_length=8)


def test_batch_plan_covers_each_row_once_per_epoch_and_groups_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=103).tolist()
    data = synthetic(lengths, [f"p{i}" for i in range(103)], ["en"] * 103)
    plan = batch_plan(data, 8, seed=1, epoch=0, length_grouping=True)
    rows = [i for b in plan for i in b]
    assert len(plan) == 103 // 8 and len(set(rows)) == len(rows) == 12 * 8
    assert plan == batch_plan(data, 8, seed=1, epoch=0, length_grouping=True)  # the same on every rank
    assert plan != batch_plan(data, 8, seed=1, epoch=1, length_grouping=True)
    # padding: every batch's rows lie within a narrow length band compared with random batches
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan])
    random_plan = batch_plan(data, 8, seed=1, epoch=0, length_grouping=False)
    random_spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in random_plan])
    assert spread < 0.5 * random_spread
    for b in plan:  # sorted inside, so micro-batches hold neighbours
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_micro_batches_split_each_global_batch_over_ranks_and_steps():
    batch = list(range(100, 112))  # W=2, G=3, micro 2
    taken = [micro_batch(batch, rank, step, 2, 2) for step in range(3) for rank in range(2)]
    assert [i for m in taken for i in m] == batch
    assert micro_batch(batch, 1, 0, 2, 2) == [102, 103] and micro_batch(batch, 0, 1, 2, 2) == [104, 105]


def test_batch_alignment_puts_one_prompt_group_in_all_languages_in_each_batch():
    ids = [f"q{i}" for i in range(7) for _ in LANGS]
    langs = [lang for _ in range(7) for lang in LANGS]
    rows = list(range(len(ids)))
    drop = {(ids[i], langs[i]) for i in rows if ids[i] == "q3" and langs[i] == "fr"}  # q3 lacks French
    keep = [i for i in rows if (ids[i], langs[i]) not in drop]
    rng = np.random.default_rng(3)
    keep = [keep[i] for i in rng.permutation(len(keep))]  # rows in any order
    data = synthetic([10] * len(keep), [ids[i] for i in keep], [langs[i] for i in keep])
    for size in (5, 10):
        plan = batch_plan(data, size, seed=0, epoch=0, length_grouping=False, aligned_languages=LANGS)
        assert len(plan) == 6 // (size // 5)
        for b in plan:
            groups = Counter(data.prompt_ids[i] for i in b)
            assert all(count == 5 for count in groups.values()) and "q3" not in groups
            for pid in groups:
                assert [data.langs[i] for i in b if data.prompt_ids[i] == pid] == LANGS
    with pytest.raises(TrainingDataError, match="not a multiple of 5 languages"):
        batch_plan(data, 4, seed=0, epoch=0, aligned_languages=LANGS)
    with pytest.raises(TrainingDataError, match="6 prompt groups complete in all 5 languages, fewer than one global"):
        batch_plan(data, 35, seed=0, epoch=0, aligned_languages=LANGS)


def test_batch_alignment_plan_keeps_the_anchor_in_every_group():
    from rayalign.config import load_config
    from rayalign.training.data import batch_alignment_languages

    cfg = load_config(None, ["languages=[de,en,fr]", "training.batch_alignment=true", "training.micro_batch_size=3"])
    t = cfg.training
    aligned = batch_alignment_languages(cfg.languages, cfg.anchor_language, t.batch_alignment)
    assert aligned == ["en", "de", "fr"]
    assert batch_alignment_languages(cfg.languages, cfg.anchor_language, False) is None
    ids = [f"q{i}" for i in range(4) for _ in range(3)]
    data = synthetic([10] * 12, ids, ["de", "en", "fr"] * 4)
    plan = batch_plan(data, t.micro_batch_size * t.gradient_accumulation * t.world_size, seed=0, epoch=0,
                      aligned_languages=aligned)
    assert len(plan) == 4
    for b in plan:  # each batch: one prompt in German, English and French
        assert len({data.prompt_ids[i] for i in b}) == 1 and sorted(data.langs[i] for i in b) == ["de", "en", "fr"]


def test_warmup_then_cosine_schedule():
    from rayalign.actors.trainer import warmup_cosine

    f = warmup_cosine(10, 0.2)  # 2 warmup steps
    assert [f(0), f(1)] == pytest.approx([1 / 3, 2 / 3])
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(10) == pytest.approx(0.0, abs=1e-12)


def kto_table(pairs: pa.Table) -> pa.Table:
    rows = []
    for r in pairs.to_pylist():
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append({"prompt": r["prompt"], "completion": r[side], "label": label, "prompt_id": r["prompt_id"],
                         "lang": r["lang"], "score": 0.0, "ref_logp": r[f"ref_logp_{side}"],
                         "num_tokens": r[f"{side}_num_tokens"], "method": "kto-icr", "iteration": 1})
    return pa.Table.from_pylist(rows)


def dco_table(pairs: pa.Table) -> pa.Table:
    by_id = {}
    for r in pairs.to_pylist():
        by_id.setdefault(r["prompt_id"], {})[r["lang"]] = r
    rows = []
    for pid, langs in by_id.items():
        a, b = langs["en"], langs["de"]
        row = {"prompt_id": pid, "lang_1": "en", "lang_2": "de", "gamma_12": 1.0, "gamma_21": 1.0, "method": "dco",
               "iteration": 1}
        for side, r in ((1, a), (2, b)):
            row |= {f"prompt_{side}": r["prompt"], f"chosen_{side}": r["chosen"], f"rejected_{side}": r["rejected"],
                    f"ref_logp_chosen_{side}": r["ref_logp_chosen"], f"ref_logp_rejected_{side}": r["ref_logp_rejected"]}
        rows.append(row)
    return pa.Table.from_pylist(rows)


def test_kto_mismatched_pairs_take_another_prompts_response(tokenizer, pairs):
    from rayalign.training.data import kto_mismatched_data

    data = encode_dataset(kto_table(pairs), "kto", tokenizer, max_length=1024)
    mismatched = kto_mismatched_data(data)
    for i, [(prompt, response)] in enumerate(mismatched.sequences):
        j = next(j for j, [(_, r)] in enumerate(data.sequences) if r == response and data.prompt_ids[j] != data.prompt_ids[i])
        assert prompt == data.sequences[i][0][0] and data.sequences[j][0][0] != prompt


@pytest.mark.parametrize("schema", ["kto", "dco"])
def test_kto_and_dco_data_train_from_the_reference(tiny_model, tokenizer, pairs, schema):
    """At the reference itself KTO's loss is (w_D + w_U)/2 * (1 - sigmoid(0)); DCO's rhat are 0, so its loss is
    mean |gamma_12 * ref margin in language 2| + |gamma_21 * ref margin in language 1|."""
    table = kto_table(pairs) if schema == "kto" else dco_table(pairs)
    data = encode_dataset(table, schema, tokenizer, max_length=1024)
    model = load_causal_lm(tiny_model, "float32")
    rows = list(range(6))
    batch = collate(data, rows, tokenizer.pad_token_id)
    logps, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    t = TrainingConfig(loss=schema, kto_desirable_weight=1.0, kto_undesirable_weight=1.0)
    loss, metrics = compute_loss(schema, logps, counts, batch, t, dco_beta=1.0)
    v = data.values
    expected = 0.5 if schema == "kto" else float(np.mean([
        abs(v["ref_logp_chosen_2"][i] - v["ref_logp_rejected_2"][i]) + abs(v["ref_logp_chosen_1"][i] -
                                                                             v["ref_logp_rejected_1"][i]) for i in rows]))
    assert float(loss.detach()) == pytest.approx(expected, abs=2e-3)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if schema == "kto":
        assert data.values["label"][rows].tolist() == [1.0, 0.0] * 3 and metrics["kl"][0] < 1e-3
    else:
        assert len(logps) == 4 * len(rows) and data.langs[:2] == ["de", "de"]

