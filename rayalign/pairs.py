"""Scores -> preference data, with polars: pairs (TRL / OpenRLHF columns), KTO rows, DCO tuples, LIDR.

Each (prompt_id, language) gives one pair: the best against the worst sample under the method's
reward; groups whose best and worst tie (or differ by no more than `min_margin`) are skipped.
`truncated` says what a response cut at max_new_tokens (finish_reason "length") may be: keep = any side;
not_chosen = only rejected (training a chosen one would teach its end-of-turn token mid-sentence); drop = neither.
Reference log-probs come along (the generating policy's `logp_policy`, the next DPO step's
reference), so trainers need no reference model.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from rayalign.data.schemas import schema_for
from rayalign.methods import REWARD_COLUMN
from rayalign.rewards.implicit import best_worst


def _assistant(text_col: str) -> pl.Expr:
    return pl.concat_list(pl.struct(pl.lit("assistant").alias("role"), pl.col(text_col).alias("content")))


TRUNCATED = ("keep", "not_chosen", "drop")


def _extremes(rows: pl.DataFrame, reward: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(best, worst) row of each (prompt_id, lang) group; rows sorted by prompt_id, lang, sample_idx."""
    groups = rows.select(pl.concat_str("prompt_id", "lang", separator="\x1f")).to_series().to_numpy()
    _, best_idx, worst_idx, _ = best_worst(rows[reward].to_numpy(), groups)
    return rows[best_idx.tolist()], rows[worst_idx.tolist()]


def _ranked(scores: pl.DataFrame, reward: str, min_margin: float, truncated: str) -> pl.DataFrame:
    """One row per (prompt_id, lang) with the best and worst sample (first by sample_idx on ties)."""
    if scores[reward].null_count():
        raise ValueError(f"column {reward} has {scores[reward].null_count()} null value(s): was the reward computed?")
    if truncated not in TRUNCATED:
        raise ValueError(f"truncated: expected one of {', '.join(TRUNCATED)}, got {truncated!r}")
    ordered = scores.sort("prompt_id", "lang", "sample_idx")
    complete = ordered.filter(pl.col("finish_reason") == "stop") if truncated != "keep" else ordered
    if truncated == "drop":
        ordered = complete
    if not complete.height:
        return complete.join(complete, on=["prompt_id", "lang"], suffix="_rej")
    best, worst = _extremes(complete, reward)[0], _extremes(ordered, reward)[1]
    pairs = best.join(worst, on=["prompt_id", "lang"], suffix="_rej")
    return pairs.filter((pl.col(reward) - pl.col(f"{reward}_rej")) > min_margin).sort("prompt_id", "lang")


def _keep_languages(scores: pl.DataFrame, include_anchor: bool, anchor: str) -> pl.DataFrame:
    return scores if include_anchor else scores.filter(pl.col("lang") != anchor)


def preference_pairs(scores: pl.DataFrame, method: str, iteration: int, *, min_margin: float = 0.0,
                     include_anchor: bool = True, anchor: str = "en", truncated: str = "not_chosen") -> pa.Table:
    """Best-vs-worst pairs under the method's reward column (LaCoMSA ranks by the WEIGHTED reward)."""
    reward = REWARD_COLUMN[method]
    r = _ranked(_keep_languages(scores, include_anchor, anchor), reward, min_margin, truncated)
    df = r.select(
        pl.col("messages").alias("prompt"),
        _assistant("response").alias("chosen"),
        _assistant("response_rej").alias("rejected"),
        "prompt_id", "lang",
        pl.col(reward).alias("score_chosen"), pl.col(f"{reward}_rej").alias("score_rejected"),
        pl.col("logp_policy").alias("ref_logp_chosen"), pl.col("logp_policy_rej").alias("ref_logp_rejected"),
        pl.col("score_tokens").alias("chosen_num_tokens"), pl.col("score_tokens_rej").alias("rejected_num_tokens"),
        pl.lit(method).alias("method"), pl.lit(iteration, pl.Int32).alias("iteration"),
    )
    return df.to_arrow().cast(schema_for("pairs")[1])


def kto_rows(scores: pl.DataFrame, reward_method: str, iteration: int, *, min_margin: float = 0.0,
             include_anchor: bool = True, anchor: str = "en", truncated: str = "not_chosen") -> pa.Table:
    """Unpaired rows: the best sample of each (prompt, language) desirable, the worst undesirable."""
    reward = REWARD_COLUMN[reward_method]
    r = _ranked(_keep_languages(scores, include_anchor, anchor), reward, min_margin, truncated)
    parts = []
    for suffix, label in (("", True), ("_rej", False)):
        parts.append(r.select(
            pl.col("messages").alias("prompt"), _assistant(f"response{suffix}").alias("completion"),
            pl.lit(label).alias("label"), "prompt_id", "lang", pl.col(f"{reward}{suffix}").alias("score"),
            pl.col(f"logp_policy{suffix}").alias("ref_logp"), pl.col(f"score_tokens{suffix}").alias("num_tokens"),
            pl.lit(f"kto-{reward_method}").alias("method"), pl.lit(iteration, pl.Int32).alias("iteration")))
    df = pl.concat(parts).sort("prompt_id", "lang", pl.col("label"), descending=[False, False, True])
    return df.to_arrow().cast(schema_for("kto")[1])


def dco_language_pairs(languages: list[str], anchor: str, which: str = "anchor") -> list[tuple[str, str]]:
    """(side 1, side 2) language pairs of DCO tuples: the anchor with every other language, then with which = all
    every two other languages in recipe order (DCO eq. 10, N languages)."""
    others = [lang for lang in languages if lang != anchor]
    pairs = [(anchor, other) for other in others]
    if which == "all":
        pairs += [(x, y) for i, x in enumerate(others) for y in others[i + 1:]]
    elif which != "anchor":
        raise ValueError(f"language pairs: expected anchor or all, got {which!r}")
    return pairs


def dco_tuples(candidates: pl.DataFrame, languages: list[str], anchor: str, gammas: dict[tuple[str, str], float],
               pairs_per_question: int, seed: int, iteration: int, language_pairs: str = "anchor") -> pa.Table:
    """DCO tuples (x1, yw1, yl1, x2, yw2, yl2): the same question in two languages and the same RANDOM
    pair of candidates on both sides (not correct vs wrong; DCO paper, section 3), with pi_ref log-probs.

    Language pairs: `dco_language_pairs` (the anchor as side 1 with every other language; with "all" also every
    two non-anchor languages). gammas: dco_gamma_table's gamma_ij (j's reference margin inside i's target), so
    gamma_12 = gammas[(side 1, side 2)] and gamma_21 = gammas[(side 2, side 1)].
    """
    rng = np.random.default_rng(seed)
    by_key = {(r["prompt_id"], r["lang"], r["candidate_idx"]): r for r in candidates.iter_rows(named=True)}
    counts = candidates.group_by("prompt_id").agg(pl.col("candidate_idx").n_unique().alias("c")).sort("prompt_id")
    rows = []
    for qid, n_cand in counts.iter_rows():
        for first, other in dco_language_pairs(languages, anchor, language_pairs):
            for _ in range(pairs_per_question):
                w, l = rng.choice(n_cand, size=2, replace=False)
                row = {"prompt_id": qid}
                for side, lang in ((1, first), (2, other)):
                    cw, cl = by_key[(qid, lang, int(w))], by_key[(qid, lang, int(l))]
                    row |= {f"prompt_{side}": cw["messages"], f"lang_{side}": lang,
                            f"chosen_{side}": [{"role": "assistant", "content": cw["candidate"]}],
                            f"rejected_{side}": [{"role": "assistant", "content": cl["candidate"]}],
                            f"ref_logp_chosen_{side}": cw["logp_ref"], f"ref_logp_rejected_{side}": cl["logp_ref"]}
                row |= {"gamma_12": gammas[(first, other)], "gamma_21": gammas[(other, first)], "method": "dco",
                        "iteration": iteration}
                rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema_for("dco")[1])


TRANSLATE_PROMPT = ("Translate the following text into {language}. Reply with the translation only.\n\n{text}")


def lidr_requests(samples: pl.DataFrame, anchor: str, language_names: dict[str, str]) -> pl.DataFrame:
    """Self-translation prompts for LIDR (the ICR paper's self-translation baseline), one per (prompt_id, language), sample 0:
    non-anchor rows translate the anchor response into the row's language (the chosen side); anchor rows
    back-translate one non-anchor response into the anchor language (the rejected side)."""
    first = samples.filter(pl.col("sample_idx") == 0).sort("prompt_id", "lang")
    anchor_resp = dict(first.filter(pl.col("lang") == anchor).select("prompt_id", "response").iter_rows())
    other = first.filter(pl.col("lang") != anchor).group_by("prompt_id", maintain_order=True).first()
    other_resp = {pid: resp for pid, resp in other.select("prompt_id", "response").iter_rows()}
    rows = []
    for r in first.iter_rows(named=True):
        if r["lang"] == anchor:
            if r["prompt_id"] not in other_resp:
                continue
            text, target = other_resp[r["prompt_id"]], language_names[anchor]
        else:
            text, target = anchor_resp[r["prompt_id"]], language_names[r["lang"]]
        rows.append({"prompt_id": r["prompt_id"], "lang": r["lang"],
                     "messages": [{"role": "user", "content": TRANSLATE_PROMPT.format(language=target, text=text)}]})
    return pl.DataFrame(rows)


def lidr_pairs(samples: pl.DataFrame, translations: pl.DataFrame, anchor: str, iteration: int) -> pa.Table:
    """Non-anchor: chosen = translation of the anchor response, rejected = native response.
    Anchor: chosen = the anchor response, rejected = back-translation of a non-anchor response.
    Scores are 1 for chosen and 0 for rejected; reference log-probs are left null here (the pipeline
    fills them with the policy's teacher-forced scores)."""
    first = samples.filter(pl.col("sample_idx") == 0).select("prompt_id", "lang", "messages", "response")
    df = first.join(translations.select("prompt_id", "lang", pl.col("response").alias("translation")),
                    on=["prompt_id", "lang"]).sort("prompt_id", "lang")
    is_anchor = pl.col("lang") == anchor
    out = df.select(
        pl.col("messages").alias("prompt"),
        pl.when(is_anchor).then(_assistant("response")).otherwise(_assistant("translation")).alias("chosen"),
        pl.when(is_anchor).then(_assistant("translation")).otherwise(_assistant("response")).alias("rejected"),
        "prompt_id", "lang", pl.lit(1.0).alias("score_chosen"), pl.lit(0.0).alias("score_rejected"),
        pl.lit(None, pl.Float64).alias("ref_logp_chosen"), pl.lit(None, pl.Float64).alias("ref_logp_rejected"),
        pl.lit(None, pl.Int32).alias("chosen_num_tokens"), pl.lit(None, pl.Int32).alias("rejected_num_tokens"),
        pl.lit("lidr").alias("method"), pl.lit(iteration, pl.Int32).alias("iteration"),
    ).filter(pl.col("chosen") != pl.col("rejected"))
    return out.to_arrow().cast(schema_for("pairs")[1])
