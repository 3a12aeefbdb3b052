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


def _pad_groups(group_ids, return_codes: bool = False) -> tuple[np.ndarray, ...]:
    """Groups in order of first appearance (G,), member row indices (G, n_max), and its filled mask
    (and with return_codes each row's group index (N,)).

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
    if return_codes:
        return unique_ids[appearance_order], members, filled, codes
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


def _upper_envelopes(x, y, codes, num_groups):
    """Upper envelopes of the lines y_i - a * x_i over a, one per group: the upper convex hull of (x_i, y_i).

    As a grows the winner moves along the hull towards smaller x; it moves from hull vertex k to k - 1
    when a passes the slope of the edge between them. Monotone chain, all groups one slot at a time:
    O(n log n) per group. Returns (x of the winner as a -> -inf (G,), and per edge: group (E,), slope (E,)
    = the a past which the winner changes, step (E,) = the change of the winner's x, scale (G,) of the
    rounding error of y - a x in units of a, for the windows around each slope).
    """
    order = np.lexsort((-y, x, codes))  # by group, x ascending, the largest y first among equal x
    c, xs, ys = codes[order], x[order], y[order]
    first = np.ones(c.size, dtype=bool)
    first[1:] = (c[1:] != c[:-1]) | (xs[1:] != xs[:-1])  # equal x: only the largest y can win
    c, xs, ys = c[first], xs[first], ys[first]
    sizes = np.bincount(c, minlength=num_groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slot = np.arange(c.size) - starts[c]
    width = int(sizes.max())
    px, py = np.zeros((num_groups, width)), np.zeros((num_groups, width))
    px[c, slot], py[c, slot] = xs, ys
    hx, hy = np.zeros_like(px), np.zeros_like(py)  # hull stacks, hull size per group
    top = np.zeros(num_groups, dtype=np.int64)
    by_size = np.argsort(-sizes, kind="stable")
    for s in range(width):
        rows = by_size[:np.count_nonzero(sizes > s)]
        cx, cy = px[rows, s], py[rows, s]
        pending = np.arange(rows.size)
        while pending.size:  # pop while the stack's top is not above the chord from the one below to the new point
            r = rows[pending]
            t = top[r]
            pending, r, t = pending[t >= 2], r[t >= 2], t[t >= 2]
            ox, oy, ax, ay = hx[r, t - 2], hy[r, t - 2], hx[r, t - 1], hy[r, t - 1]
            pop = (ax - ox) * (cy[pending] - oy) - (ay - oy) * (cx[pending] - ox) >= 0
            pending = pending[pop]
            top[r[pop]] -= 1
        hx[rows, top[rows]], hy[rows, top[rows]] = cx, cy
        top[rows] += 1
    groups = np.arange(num_groups)
    edge = np.arange(1, width)[None, :] < top[:, None]  # (G, width - 1): edge between vertices k - 1 and k
    dx, dy = np.diff(hx, axis=1), np.diff(hy, axis=1)
    edge_group = np.broadcast_to(groups[:, None], edge.shape)[edge]
    slope, step = dy[edge] / dx[edge], -dx[edge]
    # Distinct x within a group differ by at least gap: y - a x of two lines with different x then differ
    # by at least gap * |a - crossing|, so float rounding can only flip an argmax within a window of
    # (rounding of y - a x) / gap around a hull slope (see alpha_search).
    gap = np.full(num_groups, np.inf)
    inner = slot > 0
    np.minimum.at(gap, c[inner], xs[inner] - xs[np.nonzero(inner)[0] - 1])
    return hx[groups, top - 1], edge_group, slope, step, gap


def _winner_x_sums(x, y, codes, members, grid_sorted):
    """Sum over groups of x at argmax_i (y_i - a x_i), the first member on ties, for each a in grid_sorted.

    Exact envelopes give the winner away from their corners; within a rounding window of a corner the
    members' y - a * x are evaluated as floats and compared like np.argmax, so the result equals
    the double loop's, ties included.
    """
    num_groups = members.shape[0]
    start_x, edge_group, slope, step, gap = _upper_envelopes(x, y, codes, num_groups)
    order = np.argsort(slope, kind="stable")
    passed = np.searchsorted(slope[order], grid_sorted, side="right")  # edges with slope <= a
    sums = start_x.sum() + np.concatenate([[0.0], np.cumsum(step[order])])[passed]
    if not slope.size:
        return sums
    eps = np.finfo(np.float64).eps
    reach = np.abs(grid_sorted).max()
    scale = np.zeros(num_groups)
    np.maximum.at(scale, codes, np.abs(y) + reach * np.abs(x))
    window = 64 * eps * (scale[edge_group] / gap[edge_group] + np.abs(slope))
    lo = np.searchsorted(grid_sorted, slope - window, side="left")
    hi = np.searchsorted(grid_sorted, slope + window, side="right")
    count = hi - lo
    if not count.any():
        return sums
    near_grid = np.repeat(lo, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    key = np.unique(np.repeat(edge_group, count) * grid_sorted.size + near_grid)
    g, j = key // grid_sorted.size, key % grid_sorted.size
    a = grid_sorted[j]
    # the envelope's answer there (as counted in sums) ...
    per_group = np.zeros((num_groups, int(np.bincount(edge_group).max())))
    per_group_step = np.zeros_like(per_group)
    rank = np.arange(edge_group.size) - np.searchsorted(edge_group, edge_group)
    per_group[:] = np.inf
    per_group[edge_group, rank], per_group_step[edge_group, rank] = slope, step
    envelope_x = start_x[g] + (per_group_step[g] * (per_group[g] <= a[:, None])).sum(axis=1)
    # ... replaced by the float comparison over the group's members
    rows = members[g]
    winner = rows[np.arange(g.size), np.argmax(y[rows] - a[:, None] * x[rows], axis=1)]
    np.add.at(sums, j, x[winner] - envelope_x)
    return sums


def alpha_search(base_reward, lengths, group_ids, grid=None) -> tuple[float, np.ndarray]:
    """Length penalty alpha that balances chosen and rejected lengths (docs/methods.md 2, paper A.3).

    base_reward (N,) = beta * (logp_policy - logp_ref), lengths (N,), group_ids (N,). For each grid
    value a: rewards = base_reward - a * lengths; per group chosen = argmax, rejected = argmin (first
    index on ties); objective(a) = |mean over groups of (len[chosen] - len[rejected])|.
    Returns (the grid value with the smallest objective, first on ties; objective (len(grid),)).
    As functions of a, the chosen and rejected samples of a group are the upper and lower envelopes of
    the lines base_i - a * len_i: built per group in O(n log n), their corners summed over groups and
    read off at the sorted grid in O(grid). Near a corner the samples are compared as floats, as a loop
    over the grid does, so ties resolve the same. The objective is exact for integer lengths.
    """
    base_reward = _as_vector(base_reward, "base_reward")
    lengths = _as_vector(lengths, "lengths", base_reward.shape[0])
    grid = DEFAULT_ALPHA_GRID if grid is None else _as_vector(grid, "grid")
    if grid.size == 0:
        raise ValueError("grid is empty")
    _check_same_length(base_reward, group_ids, "base_reward")
    _, members, filled, codes = _pad_groups(group_ids, return_codes=True)
    # Pad each group with copies of its first member: a copy never wins a strict comparison against
    # an earlier slot, so the first index still wins ties, and no padding value is needed.
    members = np.where(filled, members, members[:, :1])
    grid_order = np.argsort(grid, kind="stable")
    grid_sorted = grid[grid_order]
    chosen = _winner_x_sums(lengths, base_reward, codes, members, grid_sorted)
    # argmin_i (b_i - a l_i) = argmax_i ((-b_i) - a (-l_i)), and float negation is exact
    rejected = -_winner_x_sums(-lengths, -base_reward, codes, members, grid_sorted)
    objective = np.empty(grid.size)
    objective[grid_order] = np.abs((chosen - rejected) / members.shape[0])
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
