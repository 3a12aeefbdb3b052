"""Implicit cross-lingual reward (ICR), best/worst pairs and the per-language length penalty search.

The ICR paper (docs/methods.md, section 2). Numpy in, numpy out, float64 math. `N` samples, `G` groups
(one group = one (prompt, language)), `n_max` the largest group.
Group ids are a 1-D array of hashable scalars (str or int), e.g. f"{prompt_id}\\x1f{lang}".
"""

from __future__ import annotations

import numpy as np

CROSS_LINGUAL_PREFIX = (
    "Please answer the following instruction using only {language}, "
    "unless explicitly instructed to respond in a different language.\n\n"
)
DEFAULT_ALPHA_GRID = np.arange(1000) / 1000  # 0, 0.001, ..., 0.999 as in the released code
GRID_CHUNK = 16  # grid values evaluated at once by alpha_search: (GRID_CHUNK, G) arrays, cache-sized


def cross_lingual_prompt(instruction_anchor: str, lang: str, language_name: str, anchor: str = "en") -> str:
    """G(x^l) (docs/methods.md 2): the anchor instruction, prefixed with P(l) unless l is the anchor."""
    if lang == anchor:
        return instruction_anchor
    return CROSS_LINGUAL_PREFIX.format(language=language_name) + instruction_anchor


def _as_vector(x, name: str, n: int | None = None) -> np.ndarray:
    vector = np.asarray(x, dtype=np.float64)
    if vector.ndim != 1 or (n is not None and vector.shape[0] != n):
        raise ValueError(f"{name} must be 1-D" + (f" of length {n}" if n is not None else "") + f"; got {vector.shape}")
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"{name} has non-finite values")
    return vector


def implicit_reward(logp_policy, logp_ref, length, alpha, beta: float = 1.0) -> np.ndarray:
    """R_c (N,) = beta * (logp_policy - logp_ref) - alpha * length (docs/methods.md 2).

    logp_* (N,) are summed response log-probs under G(x); length (N,) in characters or tokens;
    alpha a scalar or (N,) (per-language alphas already looked up per row).
    """
    logp_policy = _as_vector(logp_policy, "logp_policy")
    n = logp_policy.shape[0]
    logp_ref, length = _as_vector(logp_ref, "logp_ref", n), _as_vector(length, "length", n)
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.shape not in ((), (n,)):
        raise ValueError(f"alpha must be a scalar or ({n},); got shape {alpha.shape}")
    return beta * (logp_policy - logp_ref) - alpha * length


def _check_same_length(values: np.ndarray, group_ids, name: str) -> None:
    num_ids = np.shape(group_ids)[0] if np.ndim(group_ids) else 0
    if num_ids != values.shape[0]:
        raise ValueError(f"{name} has {values.shape[0]} rows but group_ids has {num_ids}")


def _pad_groups(group_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups in order of first appearance (G,), member row indices (G, n_max), and its filled mask.

    Members of a group keep their original order, so an argmax over a row returns the first of tied
    members, as np.argmax does on the group's own rows. Unfilled slots hold index 0.
    """
    group_ids = np.asarray(group_ids)
    if group_ids.ndim != 1:
        raise ValueError(f"group_ids must be 1-D; got shape {group_ids.shape}")
    if group_ids.size == 0:
        raise ValueError("no samples")
    unique_ids, first_row, codes = np.unique(group_ids, return_index=True, return_inverse=True)
    appearance_order = np.argsort(first_row, kind="stable")
    code_by_appearance = np.empty_like(appearance_order)
    code_by_appearance[appearance_order] = np.arange(len(unique_ids))
    codes = code_by_appearance[codes.reshape(-1)]  # (N,) group index in order of first appearance

    rows_by_group = np.argsort(codes, kind="stable")  # (N,) grouped, original order inside a group
    sizes = np.bincount(codes)  # (G,)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sorted_codes = codes[rows_by_group]
    slot = np.arange(len(codes)) - starts[sorted_codes]
    members = np.zeros((len(sizes), sizes.max()), dtype=np.int64)
    filled = np.zeros(members.shape, dtype=bool)
    members[sorted_codes, slot] = rows_by_group
    filled[sorted_codes, slot] = True
    return unique_ids[appearance_order], members, filled


def best_worst(rewards, group_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best and worst sample of each group (docs/methods.md 2, pairs).

    rewards (N,), group_ids (N,) -> (groups (G,), best_idx (G,), worst_idx (G,), valid (G,)), groups in
    order of first appearance, indices into the N samples (first index on ties), valid False where
    max == min (no preference: skip the group).
    """
    rewards = _as_vector(rewards, "rewards")
    _check_same_length(rewards, group_ids, "rewards")
    groups, members, filled = _pad_groups(group_ids)
    padded = rewards[members]  # (G, n_max)
    best_slot = np.argmax(np.where(filled, padded, -np.inf), axis=1)
    worst_slot = np.argmin(np.where(filled, padded, np.inf), axis=1)
    group_index = np.arange(len(groups))
    best_idx, worst_idx = members[group_index, best_slot], members[group_index, worst_slot]
    valid = rewards[best_idx] != rewards[worst_idx]
    return groups, best_idx, worst_idx, valid


def alpha_search(base_reward, lengths, group_ids, grid=None) -> tuple[float, np.ndarray]:
    """Length penalty alpha that balances chosen and rejected lengths (docs/methods.md 2, paper A.3).

    base_reward (N,) = beta * (logp_policy - logp_ref), lengths (N,), group_ids (N,). For each grid
    value a: rewards = base_reward - a * lengths; per group chosen = argmax, rejected = argmin (first
    index on ties); objective(a) = |mean over groups of (len[chosen] - len[rejected])|.
    Returns (the grid value with the smallest objective, first on ties; objective (len(grid),)).
    Vectorised: groups padded to (G, n_max); GRID_CHUNK grid values x all groups at once, one pass per slot.
    """
    base_reward = _as_vector(base_reward, "base_reward")
    lengths = _as_vector(lengths, "lengths", base_reward.shape[0])
    grid = DEFAULT_ALPHA_GRID if grid is None else _as_vector(grid, "grid")
    if grid.size == 0:
        raise ValueError("grid is empty")
    _check_same_length(base_reward, group_ids, "base_reward")
    _, members, filled = _pad_groups(group_ids)
    # Pad each group with copies of its first member: a copy never wins a strict comparison against
    # an earlier slot, so the first index still wins ties, and no padding value is needed.
    members = np.where(filled, members, members[:, :1])
    group_base, group_len = base_reward[members].T.copy(), lengths[members].T.copy()  # (n_max, G)

    objective = np.empty(grid.size)
    for start in range(0, grid.size, GRID_CHUNK):
        alphas = grid[start:start + GRID_CHUNK, None]  # (C, 1)
        best = group_base[0] - alphas * group_len[0]  # (C, G) running max / min of the reward
        worst = best.copy()
        best_len = np.broadcast_to(group_len[0], best.shape).copy()
        worst_len = best_len.copy()
        reward, wins = np.empty_like(best), np.empty(best.shape, dtype=bool)
        for slot_base, slot_len in zip(group_base[1:], group_len[1:]):  # in place: (C, G) stays in cache
            np.subtract(slot_base, np.multiply(alphas, slot_len, out=reward), out=reward)
            slot_len = np.broadcast_to(slot_len, reward.shape)
            np.greater(reward, best, out=wins)  # strict: the first index wins ties
            np.copyto(best, reward, where=wins)
            np.copyto(best_len, slot_len, where=wins)
            np.less(reward, worst, out=wins)
            np.copyto(worst, reward, where=wins)
            np.copyto(worst_len, slot_len, where=wins)
        objective[start:start + GRID_CHUNK] = np.abs((best_len - worst_len).mean(axis=1))
    best = int(np.argmin(objective))
    return float(grid[best]), objective


def alpha_per_language(base_reward, lengths, group_ids, langs, grid=None) -> dict[str, float]:
    """alpha_l per language (docs/methods.md 2): alpha_search on each language's rows -> {lang: alpha}."""
    base_reward = _as_vector(base_reward, "base_reward")
    langs = np.asarray(langs)
    group_ids = np.asarray(group_ids)
    if langs.shape != base_reward.shape or group_ids.shape != base_reward.shape:
        raise ValueError(f"langs {langs.shape} and group_ids {group_ids.shape} must match base_reward "
                         f"{base_reward.shape}")
    lengths = _as_vector(lengths, "lengths", base_reward.shape[0])
    alphas = {}
    for lang in np.unique(langs):
        rows = langs == lang
        alphas[str(lang)], _ = alpha_search(base_reward[rows], lengths[rows], group_ids[rows], grid)
    return alphas
