"""Evaluation metrics as rows of the `eval` schema (numpy and polars in, plain dicts out; no model, no Ray).

A row: {metric, stat, lang, other_lang, layer, value, count}; `lang` "all" aggregates over the languages.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from rayalign.config import ACCURACY_SCORINGS, LIKELIHOODS  # noqa: F401  (the choices live with EvalConfig)
from rayalign.rewards.consistency import candidate_accuracy, candidate_ranking_consistency
from rayalign.rewards.latent import silhouette_by_prompt

REWARD_STATS = ("mean", "std", "min", "p25", "p50", "p75", "max")


def row(metric: str, stat: str, lang: str, value: float, count: int, other_lang: str | None = None,
        layer: int | None = None) -> dict:
    return {"metric": metric, "stat": stat, "lang": lang, "other_lang": other_lang, "layer": layer,
            "value": float(value), "count": int(count)}


def fidelity_rows(langs, detected) -> list[dict]:
    """Language fidelity: the share of responses whose detected language is the prompt's, per language and overall
    (the overall share is the mean of the languages' shares, so every language weighs the same)."""
    df = pl.DataFrame({"lang": list(langs), "detected": list(detected)})
    per_lang = df.group_by("lang").agg((pl.col("lang") == pl.col("detected")).mean().alias("share"),
                                       pl.len().alias("n")).sort("lang")
    rows = [row("fidelity", "share", lang, share, n) for lang, share, n in per_lang.iter_rows()]
    if rows:
        rows.append(row("fidelity", "share", "all", np.mean([r["value"] for r in rows]), df.height))
    return rows


def distribution_rows(metric: str, values, langs) -> list[dict]:
    """mean, std (population), min, quartiles (linear interpolation) and max of `values` per language and overall;
    null and NaN values are left out."""
    values = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    langs = np.asarray(list(langs))
    rows = []
    for lang in [*sorted(set(langs.tolist())), "all"]:
        v = values if lang == "all" else values[langs == lang]
        v = v[~np.isnan(v)]
        if not v.size:
            continue
        p25, p50, p75 = np.percentile(v, [25, 50, 75])
        stats = {"mean": v.mean(), "std": v.std(), "min": v.min(), "p25": p25, "p50": p50, "p75": p75, "max": v.max()}
        rows += [row(metric, stat, lang, stats[stat], v.size) for stat in REWARD_STATS]
    return rows


def silhouette_rows(pooled: dict[int, np.ndarray], prompt_ids) -> list[dict]:
    """Silhouette of the pooled states at each layer, clustered by prompt id (docs/methods.md 1, the hub scan)."""
    prompt_ids = np.asarray(list(prompt_ids))
    count = len(set(prompt_ids.tolist()))
    return [row("silhouette", "score", "all", silhouette_by_prompt(h, prompt_ids), count, layer=layer)
            for layer, h in sorted(pooled.items())]


def silhouette_pair_rows(pooled: dict[int, np.ndarray], prompt_ids, langs, anchor: str) -> list[dict]:
    """Silhouette by prompt of the anchor's and one other language's states only, for each other language and
    layer (LaCoMSA Table 4, en + x): rows with lang = anchor, other_lang = x. A pair with fewer than 2 prompts
    is left out."""
    prompt_ids, langs = np.asarray(list(prompt_ids)), np.asarray(list(langs))
    rows = []
    for other in sorted(set(langs.tolist()) - {anchor}):
        keep = np.isin(langs, [anchor, other])
        count = len(set(prompt_ids[keep].tolist()))
        if not 2 <= count <= keep.sum() - 1:
            continue
        rows += [row("silhouette", "score", anchor, silhouette_by_prompt(h[keep], prompt_ids[keep]), count,
                     other_lang=other, layer=layer) for layer, h in sorted(pooled.items())]
    return rows


def choose_hub_layer(silhouette: dict[int, float], num_layers: int) -> int:
    """The semantic-hub layer: the argmax of the silhouette over layers 1..L-1 (the embeddings, index 0, and the
    language layer L are not candidates); the lower layer wins a tie."""
    candidates = [layer for layer in sorted(silhouette) if 1 <= layer <= num_layers - 1]
    if not candidates:
        raise ValueError(f"hub scan: no silhouette for layers 1..{num_layers - 1} (got layers {sorted(silhouette)})")
    return max(candidates, key=lambda layer: (silhouette[layer], -layer))


def candidate_likelihood(df: pl.DataFrame, mode: str) -> pl.Expr:
    """A candidate's likelihood under its question (docs/methods.md 3, RankC), from `logp` and `num_tokens` (the
    candidate's tokens and the end-of-turn tokens after it) and, for sequence_mean, `logp_prompt` and
    `prompt_tokens` (the templated question):
    sum: logp (default); mean: logp / num_tokens, per candidate token;
    sequence_mean: (logp_prompt + logp) / (prompt_tokens - 1 + num_tokens), the mean over every predicted token of
    the whole sequence, as the RankC code (Qi et al., 2023) scores decoder models: the mean cross-entropy of the
    question with the candidate filled in, its first token not predicted."""
    if mode == "sum":
        return pl.col("logp")
    if mode == "mean":
        return pl.col("logp") / pl.col("num_tokens")
    if mode == "sequence_mean":
        return (pl.col("logp_prompt") + pl.col("logp")) / (pl.col("prompt_tokens") - 1 + pl.col("num_tokens"))
    raise ValueError(f"likelihood: expected one of {', '.join(LIKELIHOODS)}, got {mode!r}")


def continuation_likelihood() -> pl.Expr:
    """The candidate scored as a continuation of the question, without the end-of-turn tokens after it: the summed
    log-prob of the candidate's own tokens, as the DCO paper's evaluation scores multiple choice."""
    return pl.col("logp") - pl.col("logp_end_of_turn")


def _candidate_matrices(df: pl.DataFrame, languages: list[str], anchor: str):
    """Queries grouped by their number of candidates {size: [prompt_id]}, the gold index per query, and per language
    and size the (Q, C) matrix of `score`."""
    sizes = df.filter(pl.col("lang") == anchor).group_by("prompt_id").agg(pl.len().alias("size"), pl.first("gold"))
    groups = {size: sorted(g["prompt_id"].to_list()) for (size,), g in sizes.group_by("size")}
    gold = dict(zip(sizes["prompt_id"].to_list(), sizes["gold"].to_list()))
    matrices = {lang: {size: _score_matrix(df, lang, ids) for size, ids in groups.items()} for lang in languages}
    return groups, gold, matrices


def _score_matrix(df: pl.DataFrame, lang: str, query_ids: list[str]) -> np.ndarray:
    """(Q, C) likelihoods of one language's candidates, queries in `query_ids` order, candidates by index."""
    sub = df.filter(pl.col("lang") == lang).sort(["prompt_id", "candidate_idx"])
    by_query = {q: s for q, s in sub.group_by("prompt_id", maintain_order=True).agg(pl.col("score")).iter_rows()}
    return np.asarray([by_query[q] for q in query_ids], dtype=np.float64)


def candidate_rows(candidates: pl.DataFrame, languages: list[str], anchor: str, likelihood: str = "sum",
                   accuracy: str = "likelihood") -> list[dict]:
    """Accuracy per language, RankC of the anchor with each other language (DCO appendix I) and CLC_all, RankC
    between every two languages (rows `clc_all` for the non-anchor pairs and their mean over all pairs, anchor pairs
    included, as lang "all"; only with two or more non-anchor languages), from one row per
    (prompt_id, lang, candidate_idx) with `gold`, `logp` and `num_tokens` (and the columns `candidate_likelihood`
    and `continuation_likelihood` read for the chosen modes). RankC ranks by `likelihood`; accuracy by the same (accuracy
    "likelihood") or by the continuation's summed log-prob without the end-of-turn tokens ("continuation").
    Queries are grouped by their number of candidates; a pair's RankC is the query-weighted mean over those groups."""
    if accuracy not in ACCURACY_SCORINGS:
        raise ValueError(f"accuracy: expected one of {', '.join(ACCURACY_SCORINGS)}, got {accuracy!r}")
    df = candidates.with_columns(candidate_likelihood(candidates, likelihood).alias("score"))
    groups, gold, matrices = _candidate_matrices(df, languages, anchor)
    accuracy_matrices = matrices if accuracy == "likelihood" else _candidate_matrices(
        df.with_columns(continuation_likelihood().alias("score")), languages, anchor)[2]
    queries = sum(len(ids) for ids in groups.values())

    rows = []
    for lang in languages:
        correct = sum(candidate_accuracy(accuracy_matrices[lang][size], np.asarray([gold[q] for q in ids])) * len(ids)
                      for size, ids in groups.items())
        rows.append(row("accuracy", "share", lang, correct / queries, queries))
    rows.append(row("accuracy", "share", "all", np.mean([r["value"] for r in rows]), queries * len(languages)))
    pair_values = []
    for other in [lang for lang in languages if lang != anchor]:
        total = sum(candidate_ranking_consistency(matrices[anchor][size], matrices[other][size]) * len(ids)
                    for size, ids in groups.items())
        pair_values.append(total / queries)
        rows.append(row("rankc", "score", anchor, pair_values[-1], queries, other_lang=other))
    if pair_values:
        rows.append(row("rankc", "score", "all", np.mean(pair_values), queries * len(pair_values)))
    # CLC_all (DCO paper): RankC over every two languages; rows for the non-anchor pairs, then the mean of all pairs
    others = [lang for lang in languages if lang != anchor]
    all_values = list(pair_values)
    for i, first in enumerate(others):
        for second in others[i + 1:]:
            total = sum(candidate_ranking_consistency(matrices[first][size], matrices[second][size]) * len(ids)
                        for size, ids in groups.items())
            all_values.append(total / queries)
            rows.append(row("clc_all", "score", first, all_values[-1], queries, other_lang=second))
    if len(all_values) > len(pair_values):
        rows.append(row("clc_all", "score", "all", np.mean(all_values), queries * len(all_values)))
    return rows
