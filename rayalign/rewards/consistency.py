"""Direct Consistency Optimization targets and checks, and the RankC consistency metric.

The DCO paper (docs/methods.md, section 3: its Lemma 1 and Lemma 3, RankC in appendix I). Numpy in,
numpy out, float64 math. `Q` queries, `C` candidates per query, `L` languages.
"""

from __future__ import annotations

import numpy as np


def dco_targets(ref_w1, ref_l1, ref_w2, ref_l2, gamma_12: float, gamma_21: float) -> tuple[np.ndarray, np.ndarray]:
    """Targets of the DCO reward margins (docs/methods.md 3, loss per tuple), each (B,).

    ref_* (B,) are log pi_ref(y|x) of the chosen (w) and other (l) candidate in language 1 and 2.
    The loss is |margin_1 - target_1| + |margin_2 - target_2| with margin_k = rhat(x_k, y_wk) - rhat(x_k, y_lk);
    target_1 = gamma_12 * (ref_w2 - ref_l2), target_2 = gamma_21 * (ref_w1 - ref_l1).
    """
    ref_w1, ref_l1, ref_w2, ref_l2 = (np.asarray(x, dtype=np.float64) for x in (ref_w1, ref_l1, ref_w2, ref_l2))
    if not ref_w1.shape == ref_l1.shape == ref_w2.shape == ref_l2.shape:
        raise ValueError(f"reference log-probs must have one shape; got {ref_w1.shape}, {ref_l1.shape}, "
                         f"{ref_w2.shape}, {ref_l2.shape}")
    return gamma_12 * (ref_w2 - ref_l2), gamma_21 * (ref_w1 - ref_l1)


def check_gamma_pair(gamma_12: float, gamma_21: float, beta: float, rtol: float = 1e-6) -> None:
    """Refuse (ValueError) a language pair whose DCO optimum is not consistent: needs gamma_12 * gamma_21 = beta**2.

    Lemma 1 of the DCO paper; its proof also needs gamma_12, gamma_21, beta > 0 (monotone power), so
    non-positive values are refused too.
    """
    if not (gamma_12 > 0 and gamma_21 > 0 and beta > 0):
        raise ValueError(f"gamma_12 = {gamma_12}, gamma_21 = {gamma_21} and beta = {beta} must all be > 0")
    product, expected = gamma_12 * gamma_21, beta ** 2
    if not np.isclose(product, expected, rtol=rtol, atol=0.0):
        raise ValueError(f"gamma_12 * gamma_21 = {gamma_12} * {gamma_21} = {product:g} but consistency needs "
                         f"beta**2 = {beta}**2 = {expected:g} (DCO Lemma 1); e.g. gamma_21 = {expected / gamma_12:g}")


def dco_gamma_table(languages, anchor: str, from_anchor: float, to_anchor: float,
                    between: float) -> dict[tuple[str, str], float]:
    """gamma_ij for every ordered language pair, indexed as in DCO eq. 6 and eq. 10: gamma_ij multiplies
    language j's reference margin INSIDE language i's target, and a small gamma_ij keeps language i close
    to pi_ref (Remark 1).

    from_anchor = gamma_{x,anchor} (transfer from the anchor into x), to_anchor = gamma_{anchor,x}
    (transfer from x into the anchor), between = gamma_{x,y} for two non-anchor languages. "Anchor stable"
    (the DCO paper's EN stable, 10 : 0.1) is from_anchor = 10, to_anchor = 0.1.
    """
    return {(i, j): (to_anchor if i == anchor else from_anchor if j == anchor else between)
            for i in languages for j in languages if i != j}


def gamma_matrix(langs, gammas: dict, beta: float) -> np.ndarray:
    """Gamma (L, L) of DCO Lemma 3: 1 on the diagonal, gammas[(l_i, l_j)] / beta off it.

    langs (L,) language codes in row order; gammas maps every ordered pair (l_i, l_j), i != j, to
    gamma_ij. Entries for languages not in `langs` are ignored.
    """
    langs = [str(lang) for lang in langs]
    if len(set(langs)) != len(langs):
        raise ValueError(f"duplicate languages in {langs}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    matrix = np.eye(len(langs))
    for i, lang_i in enumerate(langs):
        for j, lang_j in enumerate(langs):
            if i == j:
                continue
            if (lang_i, lang_j) not in gammas:
                raise ValueError(f"no gamma for the language pair ({lang_i!r}, {lang_j!r})")
            matrix[i, j] = gammas[(lang_i, lang_j)] / beta
    return matrix


def check_gamma_rank_one(gamma, tol: float = 1e-6, langs=None) -> None:
    """Refuse (ValueError) a Gamma (L, L) whose rank is not 1 (DCO Lemma 3: consistency for N languages).

    Rank 1 means second singular value / first <= tol. The message names the 2x2 minor farthest from
    zero, i.e. the languages (names from `langs` (L,), else row indices) whose gammas disagree most.
    """
    gamma = np.asarray(gamma, dtype=np.float64)
    if gamma.ndim != 2 or gamma.shape[0] != gamma.shape[1]:
        raise ValueError(f"Gamma must be square (L, L); got shape {gamma.shape}")
    if not np.all(np.isfinite(gamma)):
        raise ValueError("Gamma has non-finite values")
    names = [str(lang) for lang in langs] if langs is not None else [str(i) for i in range(gamma.shape[0])]
    if len(names) != gamma.shape[0]:
        raise ValueError(f"{len(names)} language names for a Gamma of shape {gamma.shape}")
    singular_values = np.linalg.svd(gamma, compute_uv=False)
    if singular_values.size == 0 or singular_values[0] == 0:
        raise ValueError("Gamma is zero; it needs rank 1")
    if singular_values.size == 1 or singular_values[1] / singular_values[0] <= tol:
        return
    # minors[i, j, k, l] = Gamma[i, k] Gamma[j, l] - Gamma[i, l] Gamma[j, k]: rows (i, j), columns (k, l).
    minors = np.einsum("ik,jl->ijkl", gamma, gamma) - np.einsum("il,jk->ijkl", gamma, gamma)
    i, j, k, l = np.unravel_index(np.argmax(np.abs(minors)), minors.shape)
    raise ValueError(
        f"Gamma has rank > 1 (singular values {singular_values[0]:g}, {singular_values[1]:g}; ratio "
        f"{singular_values[1] / singular_values[0]:g} > tol {tol:g}), so DCO's optimum is not consistent "
        f"(Lemma 3). Worst 2x2 minor: rows ({names[i]}, {names[j]}), columns ({names[k]}, {names[l]}): "
        f"Gamma[{names[i]},{names[k]}] * Gamma[{names[j]},{names[l]}] = {gamma[i, k] * gamma[j, l]:g} but "
        f"Gamma[{names[i]},{names[l]}] * Gamma[{names[j]},{names[k]}] = {gamma[i, l] * gamma[j, k]:g}")


def _as_scores(scores, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"{name} must be (Q, C) with Q, C >= 1; got shape {scores.shape}")
    if np.any(np.isnan(scores)):
        raise ValueError(f"{name} has NaN values")
    return scores


def candidate_ranking_consistency(scores_1, scores_2) -> float:
    """RankC (DCO appendix I) of candidate scores in two languages, scores_1 (Q, C) and scores_2 (Q, C).

    Per query, rank candidates by score descending (ties: lower candidate index first) in each
    language; P@j = |top_j(L1) & top_j(L2)| / j; w_j = exp(C - j) / sum_k exp(C - k);
    consist = sum_j w_j P@j. RankC = mean of consist over the Q queries.
    """
    scores_1, scores_2 = _as_scores(scores_1, "scores_1"), _as_scores(scores_2, "scores_2")
    if scores_1.shape != scores_2.shape:
        raise ValueError(f"scores_1 {scores_1.shape} and scores_2 {scores_2.shape} must have one shape")
    num_queries, num_candidates = scores_1.shape
    query_index = np.arange(num_queries)[:, None]
    rank_1 = np.empty((num_queries, num_candidates), dtype=np.int64)  # rank_1[q, c]: 0-based rank of c
    rank_1[query_index, np.argsort(-scores_1, axis=1, kind="stable")] = np.arange(num_candidates)
    rank_2 = np.empty_like(rank_1)
    rank_2[query_index, np.argsort(-scores_2, axis=1, kind="stable")] = np.arange(num_candidates)
    # Candidate c is in both top-j lists iff max(rank_1, rank_2) < j; count those per j.
    joint_rank = np.maximum(rank_1, rank_2)  # (Q, C)
    joint_rank_counts = np.zeros((num_queries, num_candidates))
    np.add.at(joint_rank_counts, (np.broadcast_to(query_index, joint_rank.shape), joint_rank), 1.0)
    overlap = np.cumsum(joint_rank_counts, axis=1)  # (Q, C): |top_j(L1) & top_j(L2)| at column j - 1
    depth = np.arange(1, num_candidates + 1)
    precision_at_j = overlap / depth  # (Q, C)
    weights = np.exp(-(depth - 1.0))  # exp(C - j) / exp(C - 1), same ratios, no overflow for large C
    weights /= weights.sum()
    return float(np.mean(precision_at_j @ weights))


def candidate_accuracy(scores, gold) -> float:
    """Share of queries whose highest-scoring candidate (first on ties) is the gold one: scores (Q, C), gold (Q,)."""
    scores = _as_scores(scores, "scores")
    gold = np.asarray(gold)
    if gold.shape != (scores.shape[0],) or not np.issubdtype(gold.dtype, np.integer):
        raise ValueError(f"gold must be ({scores.shape[0]},) integer candidate indices; got {gold.shape} {gold.dtype}")
    if np.any((gold < 0) | (gold >= scores.shape[1])):
        raise ValueError(f"gold indices must lie in [0, {scores.shape[1]})")
    return float(np.mean(np.argmax(scores, axis=1) == gold))
