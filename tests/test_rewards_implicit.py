"""ICR reward, best/worst pairs and the alpha search (docs/methods.md, ICR) against hand-worked values and loops."""


import numpy as np
import pytest

from rayalign.rewards.implicit import (
    CROSS_LINGUAL_PREFIX,
    alpha_per_language,
    alpha_search,
    best_worst,
    cross_lingual_prompt,
    implicit_reward,
)
from rayalign.rewards.implicit import _upper_envelopes


def test_cross_lingual_prompt():
    assert cross_lingual_prompt("Name three fruits.", "en", "English") == "Name three fruits."
    assert cross_lingual_prompt("Name three fruits.", "de", "German") == (
        "Please answer the following instruction using only German, unless explicitly instructed to "
        "respond in a different language.\n\nName three fruits.")
    assert cross_lingual_prompt("Hi", "fr", "French", anchor="fr") == "Hi"
    assert CROSS_LINGUAL_PREFIX.endswith("\n\n")


def test_implicit_reward_hand_worked():
    logp_policy, logp_ref = np.array([-10.0, -20.0]), np.array([-12.0, -15.0])
    length = np.array([5.0, 10.0])
    # beta = 2, alpha = 0.1: [2 * 2 - 0.5, 2 * (-5) - 1] = [3.5, -11]
    np.testing.assert_allclose(implicit_reward(logp_policy, logp_ref, length, alpha=0.1, beta=2.0), [3.5, -11.0],
                               rtol=0, atol=1e-12)
    # per-row alphas 0.2 and 0.0 with beta = 1: [2 - 1, -5 - 0] = [1, -5]
    np.testing.assert_allclose(implicit_reward(logp_policy, logp_ref, length, alpha=np.array([0.2, 0.0])),
                               [1.0, -5.0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="alpha must be a scalar or"):
        implicit_reward(logp_policy, logp_ref, length, alpha=np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="length must be 1-D of length 2"):
        implicit_reward(logp_policy, logp_ref, length[:1], alpha=0.1)


def test_best_worst_hand_worked():
    rewards = np.array([1.0, 5.0, 3.0, 5.0, 2.0, 4.0, 4.0, 0.5])
    group_ids = np.array(["b", "a", "b", "a", "c", "d", "d", "b"])
    groups, best, worst, valid = best_worst(rewards, group_ids)
    # first appearance order: b (rows 0, 2, 7), a (1, 3), c (4), d (5, 6)
    assert list(groups) == ["b", "a", "c", "d"]
    assert list(best) == [2, 1, 4, 5]  # a: rows 1 and 3 tie at 5 -> first index
    assert list(worst) == [7, 1, 4, 5]  # a and d tie everywhere, c has one sample
    assert list(valid) == [True, False, False, False]


def test_best_worst_matches_loop_on_random_groups():
    rng = np.random.default_rng(0)
    group_ids = rng.integers(0, 20, size=150)
    rewards = rng.integers(0, 6, size=150).astype(float)  # many ties
    groups, best, worst, valid = best_worst(rewards, group_ids)
    seen = []
    for g in group_ids:
        if g not in seen:
            seen.append(g)
    assert list(groups) == seen
    for k, g in enumerate(seen):
        rows = [i for i in range(150) if group_ids[i] == g]
        values = [rewards[i] for i in rows]
        assert best[k] == rows[values.index(max(values))]
        assert worst[k] == rows[values.index(min(values))]
        assert valid[k] == (max(values) != min(values))


def test_best_worst_refuses_bad_input():
    with pytest.raises(ValueError, match="rewards has 2 rows but group_ids has 3"):
        best_worst(np.zeros(2), np.array(["a", "a", "b"]))
    with pytest.raises(ValueError, match="non-finite"):
        best_worst(np.array([1.0, np.nan]), np.array(["a", "a"]))


def loop_alpha_search(base, lengths, group_ids, grid):
    """Plain double loop over grid values and groups (np.argmax / np.argmin on each group's rows)."""
    groups = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    objective = []
    for a in grid:
        gaps = []
        for rows in groups.values():
            rewards = np.array([base[i] - a * lengths[i] for i in rows])
            gaps.append(lengths[rows[int(np.argmax(rewards))]] - lengths[rows[int(np.argmin(rewards))]])
        objective.append(abs(sum(gaps) / len(gaps)))
    best = min(range(len(grid)), key=lambda k: (objective[k], k))
    return grid[best], np.array(objective)


def test_alpha_search_answer_known_by_construction():
    # Each group: a short sample (length s, base 0) and a long one (length l, base b). The long one wins
    # while b - l a > -s a, i.e. a < b / (l - s); its flip points lie between grid values.
    #   group 1: s = 10, l = 30 (gap 20), b = 2.01  -> flips at 0.1005
    #   group 2: s = 10, l = 20 (gap 10), b = 3.005 -> flips at 0.3005
    #   group 3: s =  5, l = 15 (gap 10), b = 5.005 -> flips at 0.5005
    # mean(len chosen - len rejected): a <= 0.100: (20 + 10 + 10) / 3 = 40/3; 0.101..0.300: (-20 + 10 + 10) / 3 = 0;
    # 0.301..0.500: (-20 - 10 + 10) / 3 = -20/3; a >= 0.501: -40/3. First zero: a = 0.101.
    base = np.array([0.0, 2.01, 0.0, 3.005, 5.005, 0.0])
    lengths = np.array([10.0, 30.0, 10.0, 20.0, 15.0, 5.0])
    group_ids = np.array([1, 1, 2, 2, 3, 3])
    best_alpha, objective = alpha_search(base, lengths, group_ids)
    assert best_alpha == 0.101
    grid = np.arange(1000) / 1000
    expected = np.select([grid <= 0.1005, grid <= 0.3005, grid <= 0.5005], [40 / 3, 0.0, 20 / 3], 40 / 3)
    assert objective.shape == (1000,)
    np.testing.assert_allclose(objective, expected, rtol=0, atol=1e-12)


def test_alpha_search_returns_first_grid_value_on_objective_ties():
    # Group x: rewards 1 - 10a (length 10) and -20a (length 20): the short one wins at every a >= 0,
    # gap -10. Group y: -10a (length 10) and 2.5 - 20a (length 20): the long one wins while a < 0.25,
    # gap +10, then -10. Objective: a < 0.25: |(-10 + 10) / 2| = 0; a = 0.3: |(-10 - 10) / 2| = 10.
    # Three grid values tie at 0 -> the first, 0.0.
    base = np.array([1.0, 0.0, 0.0, 2.5])
    lengths = np.array([10.0, 20.0, 10.0, 20.0])
    best_alpha, objective = alpha_search(base, lengths, np.array(["x", "x", "y", "y"]), grid=[0.0, 0.1, 0.2, 0.3])
    assert best_alpha == 0.0
    np.testing.assert_allclose(objective, [0.0, 0.0, 0.0, 10.0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_search_matches_double_loop(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, size=25)  # groups of 1 to 6 samples
    group_ids = rng.permutation(np.repeat([f"p{k}|de" for k in range(25)], sizes))
    n = len(group_ids)
    lengths = rng.integers(20, 400, size=n).astype(float)
    base = np.round(rng.normal(scale=40.0, size=n) + 0.1 * lengths)  # integers: ties at a = 0
    grid = np.arange(1000) / 1000
    best_alpha, objective = alpha_search(base, lengths, group_ids)
    expected_alpha, expected_objective = loop_alpha_search(base, lengths, group_ids, grid)
    assert best_alpha == expected_alpha
    np.testing.assert_allclose(objective, expected_objective, rtol=0, atol=1e-9)
    # a custom grid whose length is not a multiple of the chunk size
    custom = np.sort(rng.uniform(0, 2, size=131))
    best_alpha, objective = alpha_search(base, lengths, group_ids, grid=custom)
    expected_alpha, expected_objective = loop_alpha_search(base, lengths, group_ids, custom)
    assert best_alpha == expected_alpha
    np.testing.assert_allclose(objective, expected_objective, rtol=0, atol=1e-9)


def test_upper_envelope_corners_by_hand():
    # One group, lines b - a l as points (l, b): (10, 0), (20, 3), (20, 1), (25, 2), (30, 4), (40, 8).
    # Upper hull: (10, 0) -> (20, 3) slope 0.3, (20, 3) -> (40, 8) slope 0.25; (30, 4) lies under the chord
    # (3 + 10 * 0.25 = 5.5 > 4), (25, 2) too, (20, 1) has a larger twin. So l = 40 wins for a < 0.25
    # (a = 0: 8 against 3), l = 20 for 0.25 < a < 0.3 (a = 0.26: -2.2 against -2.4 and -2.6), l = 10 above.
    lengths = np.array([10.0, 20.0, 20.0, 25.0, 30.0, 40.0])
    base = np.array([0.0, 3.0, 1.0, 2.0, 4.0, 8.0])
    start_x, group, slope, step, gap = _upper_envelopes(lengths, base, np.zeros(6, dtype=np.int64), 1)
    assert start_x.tolist() == [40.0] and group.tolist() == [0, 0]
    np.testing.assert_allclose(slope, [0.3, 0.25], rtol=1e-15)
    assert step.tolist() == [-10.0, -20.0] and gap.tolist() == [5.0]


def grid_brute_force(base, lengths, group_ids, grid):
    """Every (grid value, group) pair: rewards as floats, np.argmax / np.argmin of each group's rows."""
    rows = [np.flatnonzero(group_ids == g) for g in dict.fromkeys(group_ids.tolist())]
    objective = np.empty(len(grid))
    for k, a in enumerate(grid):
        gaps = [lengths[r[np.argmax(base[r] - a * lengths[r])]] - lengths[r[np.argmin(base[r] - a * lengths[r])]]
                for r in rows]
        objective[k] = abs(np.mean(gaps))
    return grid[int(np.argmin(objective))], objective


@pytest.mark.parametrize("seed", range(6))
def test_alpha_search_equals_brute_force_on_ties(seed):
    # Ties everywhere: integer bases and lengths with many repeats and a grid of multiples of 1/64, where
    # b - a l is exact, so several lines meet at one corner and the first index has to win; plus samples
    # placed on a decimal grid value a0 (b = a0 * l + c in floats), where the loop's float rounding decides.
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, size=40)
    group_ids = rng.permutation(np.repeat(np.arange(40), sizes))
    n = group_ids.size
    lengths = rng.integers(1, 8, size=n).astype(float) * 4
    base = rng.integers(-6, 7, size=n).astype(float)
    dyadic = np.arange(-16, 65) / 64
    alpha, objective = alpha_search(base, lengths, group_ids, grid=dyadic)
    expected_alpha, expected = grid_brute_force(base, lengths, group_ids, dyadic)
    assert alpha == expected_alpha
    np.testing.assert_array_equal(objective, expected)
    decimal = np.arange(1000) / 1000
    a0 = decimal[rng.integers(1, 1000)]
    on_a0 = rng.random(n) < 0.5
    base = np.where(on_a0, a0 * lengths + rng.integers(-2, 3, size=n), base)
    alpha, objective = alpha_search(base, lengths, group_ids, grid=rng.permutation(decimal))
    alpha_sorted, objective_sorted = alpha_search(base, lengths, group_ids, grid=decimal)
    expected_alpha, expected = grid_brute_force(base, lengths, group_ids, decimal)
    assert alpha_sorted == expected_alpha
    np.testing.assert_array_equal(objective_sorted, expected)
    assert np.isin(alpha, decimal[expected == expected.min()])


def test_alpha_search_equals_brute_force_on_the_benchmark_data():
    # The distribution of benchmarks/scoring.py (groups of 10, lengths 20..1999, a reward favouring length),
    # 20,000 samples; brute force as one (grid chunk, group, member) array.
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(2000), 10)
    lengths = rng.integers(20, 2000, size=groups.size).astype(np.float64)
    base = rng.normal(size=groups.size) * 50 + 0.3 * lengths
    grid = np.arange(1000) / 1000
    alpha, objective = alpha_search(base, lengths, groups, grid)
    b, l = base.reshape(-1, 10), lengths.reshape(-1, 10)
    expected = np.empty(grid.size)
    for start in range(0, grid.size, 50):
        rewards = b - grid[start:start + 50, None, None] * l  # (50, G, 10)
        chosen = np.take_along_axis(l[None], rewards.argmax(axis=2)[..., None], axis=2)[..., 0]
        rejected = np.take_along_axis(l[None], rewards.argmin(axis=2)[..., None], axis=2)[..., 0]
        expected[start:start + 50] = np.abs((chosen - rejected).mean(axis=1))
    assert alpha == grid[np.argmin(expected)]
    np.testing.assert_array_equal(objective, expected)


def test_alpha_per_language_uses_each_language_alone():
    # German rows: the construction of test_alpha_search_answer_known_by_construction (alpha 0.101).
    # French rows: two groups whose mean gap first reaches 0 at 0.201 (worked out below).
    base = np.array([0.0, 2.01, 0.0, 3.005, 5.005, 0.0,  # de
                     0.0, 4.005, 0.0, 2.005, 2.0])  # fr
    lengths = np.array([10.0, 30.0, 10.0, 20.0, 15.0, 5.0,
                        10.0, 20.0, 10.0, 20.0, 10.0])
    group_ids = np.array(["1|de", "1|de", "2|de", "2|de", "3|de", "3|de",
                          "1|fr", "1|fr", "2|fr", "2|fr", "2|fr"])
    langs = np.array(["de"] * 6 + ["fr"] * 5)
    # fr group 1: -10a (length 10) vs 4.005 - 20a (length 20): the long one wins while a < 0.4005,
    #   gap +10 up to a = 0.400, then -10.
    # fr group 2: S0 = -10a (length 10), L = 2.005 - 20a (length 20), S2 = 2 - 10a (length 10).
    #   Best: L while L > S2, i.e. a < 0.0005 (only a = 0), then S2 (S2 > S0 always).
    #   Worst: S0 while S0 < L, i.e. a < 0.2005, then L.
    #   Gap: a = 0: 20 - 10 = +10; 0.001..0.200: 10 - 10 = 0; >= 0.201: 10 - 20 = -10.
    # Mean over the fr groups: a = 0: 10; 0.001..0.200: 5; 0.201..0.400: 0 -> first zero at 0.201.
    alphas = alpha_per_language(base, lengths, group_ids, langs)
    assert alphas == {"de": 0.101, "fr": 0.201}
