"""ICR's R_t variant (rewards.implicit.prompt: translation): the policy's own English translation of y, scored under
x^en, against hand-built tables and direct engine scores."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from rayalign.config import ConfigError, load_config
from rayalign.data.schemas import schema_for
from rayalign.scoring.translation import translation_prompts, with_translation_columns

TRANSLATE = ("Translate the following text into English. Reply with the translation only.\n\n")


def samples_table(rows):
    """Samples schema rows from (prompt_id, lang, sample_idx, user text, response)."""
    return pa.Table.from_pylist([
        {"prompt_id": p, "lang": lang, "messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": text}],
         "reference": None, "source": "test", "sample_idx": k, "response": response, "num_tokens": 3,
         "finish_reason": "stop", "seed": 0, "policy": "tiny", "lang_detected": lang}
        for p, lang, k, text, response in rows], schema=schema_for("samples")[1])


SAMPLES = [("p1", "en", 0, "Name a fruit.", "An apple."), ("p1", "en", 1, "Name a fruit.", "A pear, a sweet fruit."),
           ("p1", "de", 0, "Nenne eine Frucht.", "Ein Apfel."), ("p1", "de", 1, "Nenne eine Frucht.", "Eine Birne.")]


def test_translation_prompts_and_scored_columns_by_hand():
    samples = samples_table(SAMPLES)
    prompts = translation_prompts(samples, "en", {"en": "English", "de": "German"}).to_pylist()
    assert [(p["prompt_id"], p["lang"]) for p in prompts] == [("p1\x1fde\x1f0", "de"), ("p1\x1fde\x1f1", "de")]
    assert prompts[0]["messages"] == [{"role": "user", "content": TRANSLATE + "Ein Apfel."}]
    table = with_translation_columns(samples, {"p1\x1fde\x1f0": "An apple.", "p1\x1fde\x1f1": "A pear."}, "en")
    x_en = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    assert table.column("messages_anchor").to_pylist() == [x_en] * 4
    assert table.column("response_anchor").to_pylist() == ["An apple.", "A pear, a sweet fruit.", "An apple.",
                                                           "A pear."]
    assert table.column("response").to_pylist() == [r[4] for r in SAMPLES]  # y itself is what pairs train on


def test_translation_recipe_key():
    base = ["rewards.implicit.enabled=true", "rewards.implicit.reward_reference.path=ref"]
    assert load_config(None, base + ["rewards.implicit.prompt=translation"]).rewards.implicit.prompt == "translation"
    with pytest.raises(ConfigError, match="expected one of cross_lingual, native, translation"):
        load_config(None, base + ["rewards.implicit.prompt=english"])
    with pytest.raises(ConfigError, match="translation .*offline runs do"):
        load_config(None, base + ["rewards.implicit.prompt=translation", "mode=online"])


@pytest.fixture(scope="module")
def reference_model(tiny_model, tmp_path_factory):
    """pi_I: the tiny model with a perturbed output layer, so log pi_theta - log pi_I is not zero."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.3)
    path = tmp_path_factory.mktemp("reference")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return str(path)


def test_r_t_scores_the_translation_under_the_anchor_prompt(tiny_model, reference_model):
    from rayalign.engines import ScoreRequest
    from rayalign.engines.hf import HFEngine
    from rayalign.scoring.forward import forward_rows
    from rayalign.scoring.setup import forward_rewards, scoring_setup

    torch.set_num_threads(2)
    cfg = load_config(None, [f"policy.path={tiny_model}", "languages=[en,de]", "rewards.implicit.enabled=true",
                             f"rewards.implicit.reward_reference.path={reference_model}",
                             "rewards.implicit.prompt=translation", "rewards.implicit.alpha=0.01"])
    roles, specs, _, _ = scoring_setup(cfg, tiny_model)
    assert [(s.role, s.prompt_column, s.response_column) for s in specs[1:]] == [
        ("policy", "messages_anchor", "response_anchor"), ("reward_reference", "messages_anchor", "response_anchor")]
    engines = {name: HFEngine(role.path, dtype="float32", batch_size=4) for name, role in roles.items()}
    translations = {"p1\x1fde\x1f0": "An apple.", "p1\x1fde\x1f1": "A pear."}
    table = with_translation_columns(samples_table(SAMPLES), translations, "en")
    scores, params = forward_rewards(cfg, forward_rows(engines, table, specs))
    assert params["icr"]["prompt"] == "translation"
    # by hand: beta = 1, alpha = 0.01 per character of y (the response itself, not its translation)
    x_en = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    scored_text = ["An apple.", "A pear, a sweet fruit.", "An apple.", "A pear."]
    policy = [r.logp for r in engines["policy"].score([ScoreRequest(x_en, t) for t in scored_text])]
    reference = [r.logp for r in engines["reward_reference"].score([ScoreRequest(x_en, t) for t in scored_text])]
    expected = [p - r - 0.01 * len(y[4]) for p, r, y in zip(policy, reference, SAMPLES)]
    np.testing.assert_allclose(scores.column("r_icr").to_numpy(), expected, rtol=0, atol=1e-9)
    assert abs(policy[0] - reference[0]) > 1e-3  # the two models differ
    # the German rows score "An apple." exactly as the English row with the same text: their log-ratios agree
    r_icr = scores.column("r_icr").to_numpy()
    assert r_icr[2] + 0.01 * len("Ein Apfel.") == pytest.approx(r_icr[0] + 0.01 * len("An apple."), abs=1e-9)


def write_samples(path, rows, languages=("en", "de")):
    from rayalign.data.store import DatasetWriter

    writer = DatasetWriter(path, "samples", languages=list(languages))
    writer.write_shard(0, samples_table(rows))
    writer.finalize(expected_shards=1)
    return path


def translation_recipe(tiny_model, reference_model, *overrides):
    return load_config(None, [f"policy.path={tiny_model}", "languages=[en,de]", "rewards.implicit.enabled=true",
                              f"rewards.implicit.reward_reference.path={reference_model}",
                              "rewards.implicit.prompt=translation", "rewards.implicit.alpha=0.01",
                              "sampling.n=2", "sampling.max_new_tokens=8", "engines.count=1", "engines.shard_rows=2",
                              "rewards.actors=1", "rewards.batch_size=4", *overrides])


def test_a_prompt_whose_anchor_rows_failed_is_dropped_before_translation(tiny_model, reference_model, ray_session,
                                                                         tmp_path):
    """p1's English rows failed in generation: R_t has no x^en to score its German translations under, so p1 is
    dropped whole (named and counted) and the stage scores the other prompts."""
    from rayalign.data.store import read_dataset
    from rayalign.engines import ScoreRequest
    from rayalign.engines.hf import HFEngine
    from rayalign.pipelines.offline import score_stage

    torch.set_num_threads(2)
    cfg = translation_recipe(tiny_model, reference_model)
    rows = SAMPLES + [("p2", "de", 0, "Nenne eine Farbe.", "Rot."), ("p2", "de", 1, "Nenne eine Farbe.", "Blau.")]
    it_dir = tmp_path / "iter-1"
    write_samples(it_dir / "samples", rows)
    result = score_stage(cfg, it_dir / "samples", tiny_model, 1, it_dir / "scores")
    assert (result["dropped_prompts"], result["dropped_rows"], result["samples"]) == (1, 2, 4)
    scores = read_dataset(it_dir / "scores", "scores")
    assert list(zip(scores.column("prompt_id").to_pylist(), scores.column("lang").to_pylist())) == [
        ("p1", "en"), ("p1", "en"), ("p1", "de"), ("p1", "de")]
    # the English rows score y itself under x^en: beta = 1, alpha = 0.01 per character
    x_en = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    english = [r[4] for r in SAMPLES[:2]]
    policy, reference = ([r.logp for r in HFEngine(path).score([ScoreRequest(x_en, y)
                                                                                  for y in english])]
                         for path in (tiny_model, reference_model))
    np.testing.assert_allclose(scores.column("r_icr").to_numpy()[:2],
                               [p - r - 0.01 * len(y) for p, r, y in zip(policy, reference, english)], atol=1e-4)
    from rayalign.anchor_groups import anchor_rows_before_scoring, anchor_rows_needed

    assert anchor_rows_before_scoring(cfg) == anchor_rows_needed(cfg) == 1  # as the cross-lingual prompt


def test_failed_translations_count_against_max_failed_share_under_the_samples_names(tiny_model, reference_model,
                                                                                     ray_session, tmp_path):
    """A German response too long to translate within the model's context fails by itself: within
    engines.max_failed_share its sample is left out and named in the errors dataset (stage translate); past it
    the stage stops, naming the count and the share, as generation does."""
    from rayalign.data.store import read_dataset
    from rayalign.generation import FailedRowsError
    from rayalign.pipelines.offline import score_stage

    long = "word " * 5000  # more tokens than the tiny model's 4096-position context
    rows = SAMPLES + [("p2", "en", 0, "Name a colour.", "Red."), ("p2", "en", 1, "Name a colour.", "Blue."),
                      ("p2", "de", 0, "Nenne eine Farbe.", "Rot."), ("p2", "de", 1, "Nenne eine Farbe.", long)]
    it_dir = tmp_path / "iter-1"
    write_samples(it_dir / "samples", rows)
    # 1 of the 4 German samples fails to translate; the default share (0.01 x 4 rows) allows none
    with pytest.raises(FailedRowsError) as stopped:
        score_stage(translation_recipe(tiny_model, reference_model), it_dir / "samples", tiny_model, 1,
                    it_dir / "scores")
    message = " ".join(str(stopped.value).split())
    assert "translate iter-1: 1 of 4 rows (25.00%) failed by themselves" in message
    assert "engines.max_failed_share=0.01" in message
    errors = read_dataset(it_dir / "errors", "errors").to_pylist()
    assert [(e["stage"], e["prompt_id"], e["lang"], e["sample_idx"]) for e in errors] == [("translate", "p2", "de", 1)]
    assert "exceeds the model's context of 4096 tokens" in errors[0]["reason"]
    assert not (it_dir / "scores").exists()

    cfg = translation_recipe(tiny_model, reference_model, "engines.max_failed_share=0.25")
    result = score_stage(cfg, it_dir / "samples", tiny_model, 1, it_dir / "scores")
    assert result["translate_failed_rows"] == 1 and result["samples"] == 7
    scores = read_dataset(it_dir / "scores", "scores")
    assert list(zip(scores.column("prompt_id").to_pylist(), scores.column("lang").to_pylist(),
                    scores.column("sample_idx").to_pylist())) == [(p, lang, k) for p, lang, k, _, _ in rows[:-1]]
    errors = read_dataset(it_dir / "errors", "errors").to_pylist()
    assert [(e["stage"], e["prompt_id"], e["lang"], e["sample_idx"]) for e in errors] == [("translate", "p2", "de", 1)]
