"""DCO targets and gamma checks, RankC and accuracy (docs/methods.md, DCO) against hand-worked values and loops."""

import itertools
import math

import numpy as np
import pytest

from rayalign.rewards.consistency import (
    candidate_accuracy,
    candidate_ranking_consistency,
    check_gamma_pair,
    check_gamma_rank_one,
    dco_targets,
    gamma_matrix,
)


def test_dco_targets_hand_worked():
    # target_1 = gamma_12 (ref_w2 - ref_l2) = 10 * (-3 - -5) = 20
    # target_2 = gamma_21 (ref_w1 - ref_l1) = 0.1 * (-4 - -2) = -0.2
    target_1, target_2 = dco_targets(ref_w1=[-4.0, -1.0], ref_l1=[-2.0, -1.5], ref_w2=[-3.0, -7.0],
                                     ref_l2=[-5.0, -6.0], gamma_12=10.0, gamma_21=0.1)
    np.testing.assert_allclose(target_1, [20.0, -10.0], rtol=0, atol=1e-12)  # 10 * (-7 - -6) = -10
    np.testing.assert_allclose(target_2, [-0.2, 0.05], rtol=0, atol=1e-12)  # 0.1 * (-1 - -1.5) = 0.05
    with pytest.raises(ValueError, match="one shape"):
        dco_targets([0.0], [0.0], [0.0, 1.0], [0.0, 1.0], 1.0, 1.0)


def test_check_gamma_pair():
    check_gamma_pair(1.0, 1.0, beta=1.0)
    check_gamma_pair(10.0, 0.1, beta=1.0)  # "EN stable"
    check_gamma_pair(0.5, 0.5, beta=0.5)
    check_gamma_pair(0.2, 0.2 * (1 + 1e-8), beta=0.2)  # product 0.04 (1 + 1e-8): within rtol 1e-6 of 0.04
    with pytest.raises(ValueError, match="consistency needs"):
        check_gamma_pair(0.2, 0.2 * (1 + 1e-4), beta=0.2)  # 1e-4 off: outside rtol
    expected_message = r"gamma_12 \* gamma_21 = 2.0 \* 2.0 = 4 but consistency needs beta\*\*2 = 1.0\*\*2 = 1"
    with pytest.raises(ValueError, match=expected_message):
        check_gamma_pair(2.0, 2.0, beta=1.0)
    with pytest.raises(ValueError, match="must all be > 0"):
        check_gamma_pair(-1.0, -1.0, beta=1.0)  # product is beta**2, but the lemma needs positive gammas


def test_gamma_matrix_hand_worked():
    gammas = {("en", "de"): 10.0, ("de", "en"): 0.1, ("en", "fr"): 10.0, ("fr", "en"): 0.1,
              ("de", "fr"): 1.0, ("fr", "de"): 1.0, ("en", "ja"): 3.0}  # ja is not in the run: ignored
    matrix = gamma_matrix(["en", "de", "fr"], gammas, beta=2.0)
    expected = [[1.0, 5.0, 5.0], [0.05, 1.0, 0.5], [0.05, 0.5, 1.0]]
    np.testing.assert_allclose(matrix, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"no gamma for the language pair \('fr', 'de'\)"):
        gamma_matrix(["de", "fr"], {("de", "fr"): 1.0}, beta=1.0)


def test_check_gamma_rank_one_accepts_consistent_configs():
    check_gamma_rank_one(np.ones((4, 4)))  # defaults: beta = 1, all gamma = 1
    # EN stable for three languages: Gamma[i, j] = u_i / u_j with u = (10, 1, 1)
    gammas = {("en", "de"): 10.0, ("de", "en"): 0.1, ("en", "fr"): 10.0, ("fr", "en"): 0.1,
              ("de", "fr"): 1.0, ("fr", "de"): 1.0}
    check_gamma_rank_one(gamma_matrix(["en", "de", "fr"], gammas, beta=1.0))
    check_gamma_rank_one(np.array([[1.0]]))


def worst_minor_by_loop(gamma):
    n = len(gamma)
    best = None
    for i, j, k, l in itertools.product(range(n), repeat=4):
        value = abs(gamma[i][k] * gamma[j][l] - gamma[i][l] * gamma[j][k])
        if best is None or value > best[0]:
            best = (value, i, j, k, l)
    return best


def test_check_gamma_rank_one_names_the_worst_languages():
    # Every pair satisfies gamma_ij gamma_ji = beta**2, but en->de->fr is not transitive:
    # Gamma[de, en] Gamma[en, fr] = 0.1 * 1 != Gamma[de, fr] = 1 -> rank 2.
    langs = ["en", "de", "fr"]
    gammas = {("en", "de"): 10.0, ("de", "en"): 0.1, ("en", "fr"): 1.0, ("fr", "en"): 1.0,
              ("de", "fr"): 1.0, ("fr", "de"): 1.0}
    matrix = gamma_matrix(langs, gammas, beta=1.0)
    _, i, j, k, l = worst_minor_by_loop(matrix.tolist())
    expected = (f"rows ({langs[i]}, {langs[j]}), columns ({langs[k]}, {langs[l]}): "
                f"Gamma[{langs[i]},{langs[k]}] * Gamma[{langs[j]},{langs[l]}] = {matrix[i, k] * matrix[j, l]:g}")
    with pytest.raises(ValueError, match="Gamma has rank > 1") as error:
        check_gamma_rank_one(matrix, langs=langs)
    assert expected in str(error.value)
    # two languages: rank 1 exactly when Lemma 1 holds
    with pytest.raises(ValueError, match=r"rows \(0, 1\)"):
        check_gamma_rank_one(np.array([[1.0, 2.0], [2.0, 1.0]]))
    check_gamma_rank_one(np.array([[1.0, 4.0], [0.25, 1.0]]))


# --- RankC -------------------------------------------------------------------------------------------


def test_rankc_hand_worked():
    # C = 3: w = (e^2, e^1, e^0) / (e^2 + e + 1).
    # Query 0: L1 order (0, 1, 2), L2 order (2, 1, 0): P@1 = |{0} & {2}| / 1 = 0, P@2 = |{0,1} & {2,1}| / 2 = 1/2,
    #   P@3 = 1 -> consist = (0 e^2 + e / 2 + 1) / (e^2 + e + 1).
    # Query 1: identical orders -> P@j = 1 for all j -> consist = 1.
    # Query 2 (ties, broken by lower index first): L1 (1, 1, 0) -> order (0, 1, 2); L2 (0, 1, 1) -> (1, 2, 0):
    #   P@1 = 0, P@2 = |{0,1} & {1,2}| / 2 = 1/2, P@3 = 1 -> the same as query 0.
    e = math.e
    consist_0 = (e / 2 + 1) / (e ** 2 + e + 1)
    scores_1 = np.array([[3.0, 2.0, 1.0], [-1.0, -5.0, -2.0], [1.0, 1.0, 0.0]])
    scores_2 = np.array([[1.0, 2.0, 3.0], [-3.0, -9.0, -4.0], [0.0, 1.0, 1.0]])
    expected = (consist_0 + 1.0 + consist_0) / 3
    assert candidate_ranking_consistency(scores_1, scores_2) == pytest.approx(expected, abs=1e-12)
    assert candidate_ranking_consistency(scores_2, scores_1) == pytest.approx(expected, abs=1e-12)


def test_rankc_hand_worked_four_candidates():
    # C = 4, w_j = e^(4 - j) / (e^3 + e^2 + e + 1). L1 order (0, 1, 2, 3), L2 order (1, 0, 3, 2):
    # P@1 = 0, P@2 = 2/2 = 1, P@3 = |{0,1,2} & {1,0,3}| / 3 = 2/3, P@4 = 1.
    e = math.e
    expected = (0 * e ** 3 + 1 * e ** 2 + (2 / 3) * e + 1) / (e ** 3 + e ** 2 + e + 1)
    got = candidate_ranking_consistency([[4.0, 3.0, 2.0, 1.0]], [[3.0, 4.0, 1.0, 2.0]])
    assert got == pytest.approx(expected, abs=1e-12)
    assert candidate_ranking_consistency([[0.3]], [[-7.0]]) == 1.0  # one candidate: always consistent


def loop_rankc(scores_1, scores_2) -> float:
    values = []
    for s1, s2 in zip(scores_1, scores_2):
        c = len(s1)
        order_1 = sorted(range(c), key=lambda k: (-s1[k], k))
        order_2 = sorted(range(c), key=lambda k: (-s2[k], k))
        denominator = sum(math.exp(c - k) for k in range(1, c + 1))
        values.append(sum(math.exp(c - j) / denominator * len(set(order_1[:j]) & set(order_2[:j])) / j
                          for j in range(1, c + 1)))
    return sum(values) / len(values)


def test_rankc_matches_set_loop_on_random_scores():
    rng = np.random.default_rng(0)
    scores_1 = rng.integers(0, 4, size=(40, 6)).astype(float)  # ties included
    scores_2 = rng.normal(size=(40, 6))
    expected = loop_rankc(scores_1.tolist(), scores_2.tolist())
    assert candidate_ranking_consistency(scores_1, scores_2) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        candidate_ranking_consistency(scores_1, scores_2[:, :5])


def test_candidate_accuracy():
    scores = np.array([[0.1, 0.9, 0.0], [2.0, 2.0, 1.0], [-1.0, -3.0, -0.5], [0.0, 0.0, 0.0]])
    # argmax (first on ties): 1, 0, 2, 0; gold 1, 1, 2, 0 -> 3 of 4
    assert candidate_accuracy(scores, np.array([1, 1, 2, 0])) == 0.75
    with pytest.raises(ValueError, match="gold indices"):
        candidate_accuracy(scores, np.array([1, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer candidate indices"):
        candidate_accuracy(scores, np.array([1.0, 1.0, 2.0, 0.0]))
