import polars as pl
import pytest
import torch

from rayalign.config import ConfigError, load_config
from rayalign.losses.preference import dco_loss
from rayalign.pairs import dco_tuples, kto_rows, lidr_pairs, lidr_requests, preference_pairs
from rayalign.rewards.consistency import dco_gamma_table


def scores_frame(rows, truncated=()):
    """rows: (prompt_id, lang, sample_idx, reward) -> a scores-like frame with every column pairs use;
    truncated: the (prompt_id, lang, sample_idx) cut at max_new_tokens."""
    return pl.DataFrame([{
        "prompt_id": p, "lang": l, "sample_idx": k, "messages": [{"role": "user", "content": f"{p}-{l}"}],
        "response": f"{p}-{l}-{k}", "r_icr": r, "r_lacomsa": r, "r_msa": -r, "logp_policy": -10.0 - k,
        "score_tokens": 5 + k, "finish_reason": "length" if (p, l, k) in truncated else "stop",
    } for p, l, k, r in rows])


def test_best_vs_worst_with_ties_skipped():
    df = scores_frame([("a", "de", 0, 0.2), ("a", "de", 1, 0.9), ("a", "de", 2, -0.4),
                       ("a", "en", 0, 0.5), ("a", "en", 1, 0.5),  # tie: skipped
                       ("b", "de", 0, 1.0), ("b", "de", 1, 1.0), ("b", "de", 2, 0.0)])  # tie at the top: first wins
    t = preference_pairs(df, "icr", 2).to_pylist()
    assert [(r["prompt_id"], r["lang"]) for r in t] == [("a", "de"), ("b", "de")]
    a, b = t
    assert a["chosen"] == [{"role": "assistant", "content": "a-de-1"}]
    assert a["rejected"] == [{"role": "assistant", "content": "a-de-2"}]
    assert a["prompt"] == [{"role": "user", "content": "a-de"}]
    assert (a["score_chosen"], a["score_rejected"]) == (0.9, -0.4)
    assert (a["ref_logp_chosen"], a["ref_logp_rejected"]) == (-11.0, -12.0)
    assert (a["chosen_num_tokens"], a["rejected_num_tokens"]) == (6, 7)
    assert a["method"] == "icr" and a["iteration"] == 2
    assert b["chosen"][0]["content"] == "b-de-0" and b["rejected"][0]["content"] == "b-de-2"


def test_each_method_ranks_by_its_own_column():
    df = scores_frame([("a", "de", 0, 0.2), ("a", "de", 1, 0.9)])
    assert preference_pairs(df, "lacomsa", 1).to_pylist()[0]["chosen"][0]["content"] == "a-de-1"
    assert preference_pairs(df, "msa", 1).to_pylist()[0]["chosen"][0]["content"] == "a-de-0"  # r_msa = -r


def test_min_margin_and_anchor_filter():
    df = scores_frame([("a", "de", 0, 0.0), ("a", "de", 1, 0.05), ("a", "en", 0, 0.0), ("a", "en", 1, 1.0)])
    assert [r["lang"] for r in preference_pairs(df, "icr", 1, min_margin=0.1).to_pylist()] == ["en"]
    assert [r["lang"] for r in preference_pairs(df, "icr", 1, include_anchor=False).to_pylist()] == ["de"]


def test_truncated_responses_are_never_chosen_by_default():
    rows = [("a", "de", 0, 0.2), ("a", "de", 1, 0.9), ("a", "de", 2, -0.4), ("a", "de", 3, -0.9),
            ("b", "de", 0, 0.3), ("b", "de", 1, 0.1),  # both truncated
            ("c", "de", 0, 0.5), ("c", "de", 1, 0.1)]  # the better one complete
    df = scores_frame(rows, truncated={("a", "de", 1), ("a", "de", 3), ("b", "de", 0), ("b", "de", 1), ("c", "de", 1)})

    def chosen_rejected(**kwargs):
        return [(r["chosen"][0]["content"], r["rejected"][0]["content"])
                for r in preference_pairs(df, "icr", 1, **kwargs).to_pylist()]

    # keep: best and worst whatever their finish; not_chosen: the best complete one against the worst of all;
    # drop: complete ones only (c keeps one complete response: no pair)
    assert chosen_rejected(truncated="keep") == [("a-de-1", "a-de-3"), ("b-de-0", "b-de-1"), ("c-de-0", "c-de-1")]
    assert chosen_rejected() == chosen_rejected(truncated="not_chosen") == [("a-de-0", "a-de-3"), ("c-de-0", "c-de-1")]
    assert chosen_rejected(truncated="drop") == [("a-de-0", "a-de-2")]
    kto = kto_rows(df, "icr", 1, truncated="not_chosen").to_pylist()
    assert [(r["completion"][0]["content"], r["label"]) for r in kto] == [
        ("a-de-0", True), ("a-de-3", False), ("c-de-0", True), ("c-de-1", False)]
    all_cut = scores_frame(rows[4:6], truncated={("b", "de", 0), ("b", "de", 1)})
    assert preference_pairs(all_cut, "icr", 1).num_rows == 0


def test_missing_reward_is_refused():
    df = scores_frame([("a", "de", 0, 0.0)]).with_columns(pl.lit(None, pl.Float64).alias("r_icr"))
    with pytest.raises(ValueError, match="column r_icr has 1 null value"):
        preference_pairs(df, "icr", 1)


def test_kto_rows():
    df = scores_frame([("a", "de", 0, 0.2), ("a", "de", 1, 0.9), ("a", "de", 2, -0.4), ("a", "en", 0, 1), ("a", "en", 1, 1)])
    rows = kto_rows(df, "icr", 1).to_pylist()
    assert [(r["completion"][0]["content"], r["label"], r["score"]) for r in rows] == [
        ("a-de-1", True, 0.9), ("a-de-2", False, -0.4)]
    assert rows[0]["ref_logp"] == -11.0 and rows[0]["method"] == "kto-icr"


def test_dco_tuples_use_the_same_random_pair_in_both_languages():
    cands = pl.DataFrame([{"prompt_id": q, "lang": l, "messages": [{"role": "user", "content": f"{q}?{l}"}],
                           "candidate_idx": c, "candidate": f"{q}-{l}-{c}", "gold": 0,
                           "logp_ref": -(10 * c + (1 if l == "de" else 0)), "num_tokens": 3}
                          for q in ("q1", "q2") for l in ("en", "de", "fr") for c in range(4)])
    gammas = dco_gamma_table(["en", "de", "fr"], "en", from_anchor=10.0, to_anchor=0.1, between=1.0)
    # paper indexing: gamma_{i,j} weighs j's reference margin inside i's target
    assert gammas == {("en", "de"): 0.1, ("en", "fr"): 0.1, ("de", "en"): 10.0, ("fr", "en"): 10.0,
                      ("de", "fr"): 1.0, ("fr", "de"): 1.0}
    t = dco_tuples(cands, ["en", "de", "fr"], "en", gammas, pairs_per_question=3, seed=0, iteration=1).to_pylist()
    assert len(t) == 2 * 2 * 3
    seen_pairs = set()
    for row in t:
        w1, l1 = row["chosen_1"][0]["content"], row["rejected_1"][0]["content"]
        w2, l2 = row["chosen_2"][0]["content"], row["rejected_2"][0]["content"]
        q, _, cw = w1.split("-")
        assert row["lang_1"] == "en" and w2 == f"{q}-{row['lang_2']}-{cw}" and l1.split("-")[2] == l2.split("-")[2]
        assert cw != l1.split("-")[2]
        cl = int(l1.split("-")[2])
        assert row["ref_logp_chosen_1"] == -10 * int(cw) and row["ref_logp_rejected_1"] == -10 * cl
        assert row["ref_logp_chosen_2"] == -(10 * int(cw) + (1 if row["lang_2"] == "de" else 0))
        assert (row["gamma_12"], row["gamma_21"]) == (0.1, 10.0)  # English (side 1) stable: small gamma in its target
        seen_pairs.add((int(cw), cl))
    assert len(seen_pairs) > 3  # random pairs, not always correct-vs-wrong
    again = dco_tuples(cands, ["en", "de", "fr"], "en", gammas, pairs_per_question=3, seed=0, iteration=1)
    assert again.to_pylist() == t


def test_dco_tuples_between_every_two_languages():
    # en, de, fr, sw; reference log-prob of candidate c in language l: -(10 c + k_l) with k = 0, 1, 2, 3.
    langs = ["en", "de", "fr", "sw"]
    cands = pl.DataFrame([{"prompt_id": q, "lang": l, "messages": [{"role": "user", "content": f"{q}?{l}"}],
                           "candidate_idx": c, "candidate": f"{q}-{l}-{c}", "gold": 0,
                           "logp_ref": -(10 * c + langs.index(l)), "num_tokens": 3}
                          for q in ("q1", "q2") for l in langs for c in range(3)])
    gammas = dco_gamma_table(langs, "en", from_anchor=10.0, to_anchor=0.1, between=2.5)
    anchor_only = dco_tuples(cands, langs, "en", gammas, pairs_per_question=2, seed=0, iteration=1).to_pylist()
    assert {(r["lang_1"], r["lang_2"]) for r in anchor_only} == {("en", "de"), ("en", "fr"), ("en", "sw")}
    rows = dco_tuples(cands, langs, "en", gammas, pairs_per_question=2, seed=0, iteration=1,
                      language_pairs="all").to_pylist()
    assert len(rows) == 2 * 6 * 2  # questions x language pairs x random pairs per question
    pairs = [(r["lang_1"], r["lang_2"]) for r in rows[:12]]  # one question, pairs in recipe order
    assert pairs == [p for p in [("en", "de"), ("en", "fr"), ("en", "sw"), ("de", "fr"), ("de", "sw"),
                                 ("fr", "sw")] for _ in range(2)]
    for r in rows:
        between = r["lang_1"] != "en"
        assert (r["gamma_12"], r["gamma_21"]) == ((2.5, 2.5) if between else (0.1, 10.0))
        cw, cl = int(r["chosen_1"][0]["content"][-1]), int(r["rejected_1"][0]["content"][-1])
        assert r["chosen_2"][0]["content"] == f"{r['prompt_id']}-{r['lang_2']}-{cw}" and cw != cl
        k1, k2 = langs.index(r["lang_1"]), langs.index(r["lang_2"])
        assert (r["ref_logp_chosen_1"], r["ref_logp_rejected_1"]) == (-(10 * cw + k1), -(10 * cl + k1))
        assert (r["ref_logp_chosen_2"], r["ref_logp_rejected_2"]) == (-(10 * cw + k2), -(10 * cl + k2))
    # the anchor pairs come first and draw the same random pairs, so the anchor-only tuples of q1 are a prefix
    assert rows[:6] == anchor_only[:6]


def test_dco_language_pairs_recipe_key():
    cfg = load_config(None, ["languages=[en,de,fr]", "rewards.consistency.enabled=true",
                             "rewards.consistency.language_pairs=all"])
    assert cfg.rewards.consistency.language_pairs == "all"
    assert load_config(None, ["languages=[en,de]"]).rewards.consistency.language_pairs == "anchor"
    with pytest.raises(ConfigError, match="rewards.consistency.language_pairs: expected one of anchor, all"):
        load_config(None, ["rewards.consistency.language_pairs=every"])


def _dco_margins_after_training(gamma_from_anchor, gamma_to_anchor, steps=40):
    """Recipe gammas -> DCO tuple -> Adam on dco_loss with the policy's log-probs as free parameters.

    Reference margins: English +2, Swahili -1 (they disagree). Returns the (en, sw) policy margins after training.
    """
    cfg = load_config(None, ["languages=[en,sw]", "rewards.consistency.enabled=true",
                             f"rewards.consistency.gamma_from_anchor={gamma_from_anchor}",
                             f"rewards.consistency.gamma_to_anchor={gamma_to_anchor}"])
    c = cfg.rewards.consistency
    gammas = dco_gamma_table(cfg.languages, cfg.anchor_language, c.gamma_from_anchor, c.gamma_to_anchor,
                             c.gamma_between)
    ref = {("en", 0): -3.0, ("en", 1): -5.0, ("sw", 0): -6.0, ("sw", 1): -5.0}
    cands = pl.DataFrame([{"prompt_id": "q", "lang": lang, "messages": [{"role": "user", "content": lang}],
                           "candidate_idx": k, "candidate": f"{lang}{k}", "gold": 0, "logp_ref": ref[(lang, k)],
                           "num_tokens": 2} for lang in ("en", "sw") for k in (0, 1)])
    row = dco_tuples(cands, cfg.languages, "en", gammas, pairs_per_question=1, seed=0, iteration=1).to_pylist()[0]
    sign = 1.0 if row["chosen_1"][0]["content"] == "en0" else -1.0  # margins reported as candidate 0 - candidate 1
    refs = [torch.tensor([row[k]]) for k in ("ref_logp_chosen_1", "ref_logp_rejected_1", "ref_logp_chosen_2",
                                             "ref_logp_rejected_2")]
    params = [r.clone().requires_grad_(True) for r in refs]
    opt = torch.optim.Adam(params, lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        dco_loss(*params, *refs, row["gamma_12"], row["gamma_21"], beta=c.beta).loss.backward()
        opt.step()
    pw1, pl1, pw2, pl2 = (p.item() for p in params)
    return sign * (pw1 - pl1), sign * (pw2 - pl2)


def test_dco_direction_control_en_stable_keeps_english_and_moves_the_other_language():
    en, sw = _dco_margins_after_training(gamma_from_anchor=10.0, gamma_to_anchor=0.1)  # EN stable (paper 10 : 0.1)
    assert abs(en - 2.0) < 0.5 < 1.0 < abs(sw - (-1.0))
    assert en > 0 and sw > -1.0 + 3.0  # English keeps its preference; Swahili moved toward it
    en, sw = _dco_margins_after_training(gamma_from_anchor=0.1, gamma_to_anchor=10.0)  # the other language stable
    assert abs(sw - (-1.0)) < 0.5 < 1.0 < abs(en - 2.0)
    assert sw < 0 and en < 2.0 - 3.0


def test_lidr_requests_and_pairs():
    samples = pl.DataFrame([{"prompt_id": "a", "lang": l, "sample_idx": k, "messages": [{"role": "user", "content": l}],
                             "response": f"{l}{k}"} for l in ("en", "de") for k in range(2)])
    req = lidr_requests(samples, "en", {"en": "English", "de": "German"}).to_dicts()
    assert [(r["lang"], r["messages"][0]["content"].split("\n\n")[1]) for r in req] == [("de", "en0"), ("en", "de0")]
    assert "into German" in req[0]["messages"][0]["content"] and "into English" in req[1]["messages"][0]["content"]
    translations = pl.DataFrame([{"prompt_id": "a", "lang": "de", "response": "de-from-en0"},
                                 {"prompt_id": "a", "lang": "en", "response": "en-from-de0"}])
    rows = {r["lang"]: r for r in lidr_pairs(samples, translations, "en", 1).to_pylist()}
    assert rows["de"]["chosen"][0]["content"] == "de-from-en0" and rows["de"]["rejected"][0]["content"] == "de0"
    assert rows["en"]["chosen"][0]["content"] == "en0" and rows["en"]["rejected"][0]["content"] == "en-from-de0"
