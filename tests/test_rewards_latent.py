"""Latent rewards (docs/methods.md, LaCoMSA) against hand-worked values and plain per-sample loops written here."""

import math

import numpy as np
import pytest
import torch

from rayalign.rewards.latent import (
    cosine_matrix,
    lacomsa_weight,
    language_centroids,
    language_consistency,
    latent_rewards,
    masked_mean_pool,
    msa_leave_one_out,
    msa_scores,
    prompt_centroids,
    silhouette_by_prompt,
)


def loop_cosine(u, v) -> float:
    dot = sum(float(x) * float(y) for x, y in zip(u, v))
    return dot / (math.sqrt(sum(float(x) ** 2 for x in u)) * math.sqrt(sum(float(y) ** 2 for y in v)))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- masked_mean_pool ---------------------------------------------------------------------------


def test_masked_mean_pool_hand_worked():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
                           [[10.0, 0.0], [20.0, 0.0], [-6.0, 9.0]]])  # (B=2, T=3, H=2)
    mask = torch.tensor([[0, 1, 1], [1, 0, 1]])
    pooled = masked_mean_pool(hidden, mask)
    # row 0: mean of (3, 4) and (5, 6) = (4, 5); row 1: mean of (10, 0) and (-6, 9) = (2, 4.5)
    assert pooled.dtype == torch.float32 and pooled.shape == (2, 2)
    assert torch.equal(pooled, torch.tensor([[4.0, 5.0], [2.0, 4.5]]))


def test_masked_mean_pool_ignores_padding_side():
    torch.manual_seed(0)
    prompt, response = torch.randn(4, 8), torch.randn(3, 8)
    pad = torch.full((2, 8), 1e4)  # garbage in pad positions must not leak in
    right = torch.cat([prompt, response, pad])[None]  # (1, 9, 8)
    left = torch.cat([pad, prompt, response])[None]
    right_mask = torch.tensor([[0] * 4 + [1] * 3 + [0] * 2], dtype=torch.bool)
    left_mask = torch.tensor([[0] * 6 + [1] * 3], dtype=torch.bool)
    expected = response.double().mean(dim=0)
    assert torch.allclose(masked_mean_pool(right, right_mask)[0].double(), expected, atol=1e-6, rtol=0)
    assert torch.allclose(masked_mean_pool(left, left_mask)[0].double(), expected, atol=1e-6, rtol=0)


def test_masked_mean_pool_casts_bfloat16_to_float32_before_summing():
    # bfloat16 keeps 8 significant bits: 259 is not representable (neighbours 258 and 260).
    hidden = torch.tensor([[[256.0], [1.0], [1.0], [1.0]]], dtype=torch.bfloat16)
    pooled = masked_mean_pool(hidden, torch.ones(1, 4))
    assert pooled.dtype == torch.float32
    assert pooled.item() == 259.0 / 4.0  # 64.75 exactly; a bfloat16 sum would give 64.5 or 65


def test_masked_mean_pool_refuses_empty_rows_and_bad_shapes():
    with pytest.raises(ValueError, match=r"rows \[1\] have an empty response mask"):
        masked_mean_pool(torch.ones(2, 3, 4), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="must be"):
        masked_mean_pool(torch.ones(2, 3, 4), torch.ones(2, 4))


# --- cosine, MSA ---------------------------------------------------------------------------------


def test_cosine_matrix_hand_worked():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [3.0, 0.0], [-1.0, -1.0]])
    expected = np.array([[0.0, 1.0, -1 / math.sqrt(2)],
                         [1 / math.sqrt(2), 1 / math.sqrt(2), -1.0]])
    got = cosine_matrix(a, b)
    assert got.dtype == np.float64 and got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_cosine_matrix_matches_loop_and_refuses_zero_vectors():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(3, 7))
    expected = [[loop_cosine(u, v) for v in b] for u in a]
    np.testing.assert_allclose(cosine_matrix(a, b), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="zero vectors"):
        cosine_matrix(np.zeros((1, 3)), b[:, :3])


def test_msa_scores_hand_worked():
    h = np.array([[1.0, 0.0], [0.0, 5.0]])
    anchors = np.array([[2.0, 0.0], [1.0, 1.0]])
    # row 0: (cos 0 + cos 45deg) / 2 = (1 + 1/sqrt2) / 2; row 1: (0 + 1/sqrt2) / 2
    expected = [(1 + 1 / math.sqrt(2)) / 2, (1 / math.sqrt(2)) / 2]
    np.testing.assert_allclose(msa_scores(h, anchors), expected, rtol=0, atol=1e-12)


def test_msa_leave_one_out_matches_loop():
    rng = np.random.default_rng(2)
    anchors = rng.normal(size=(4, 6))
    expected = [np.mean([loop_cosine(anchors[i], anchors[j]) for j in range(4) if j != i]) for i in range(4)]
    np.testing.assert_allclose(msa_leave_one_out(anchors), expected, rtol=0, atol=1e-12)
    # two anchors: each one's score is their mutual cosine
    pair = np.array([[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(msa_leave_one_out(pair), [1 / math.sqrt(2)] * 2, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        msa_leave_one_out(anchors[:1])


# --- language consistency and centroids ----------------------------------------------------------


def test_language_consistency_hand_worked_and_broadcast():
    h = np.array([[1.0, 0.0], [0.0, 1.0]])
    c_lang, c_anchor = np.array([1.0, 1.0]), np.array([0.0, 3.0])
    # row 0: cos((1,0),(1,1)) - cos((1,0),(0,3)) = 1/sqrt2 - 0; row 1: 1/sqrt2 - 1
    expected = [1 / math.sqrt(2), 1 / math.sqrt(2) - 1]
    np.testing.assert_allclose(language_consistency(h, c_lang, c_anchor), expected, rtol=0, atol=1e-12)
    per_row = language_consistency(h, np.tile(c_lang, (2, 1)), np.tile(c_anchor, (2, 1)))
    np.testing.assert_allclose(per_row, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="centroid_lang"):
        language_consistency(h, np.ones(3), c_anchor)


def test_language_centroids_hand_worked():
    h = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [5.0, 6.0]])
    centroids = language_centroids(h, np.array(["de", "de", "en", "de"]))
    assert set(centroids) == {"de", "en"}
    np.testing.assert_allclose(centroids["de"], [3.0, 4.0], rtol=0, atol=1e-12)  # (1+3+5)/3, (2+4+6)/3
    np.testing.assert_allclose(centroids["en"], [10.0, 0.0], rtol=0, atol=1e-12)


def test_prompt_centroids_match_loop():
    rng = np.random.default_rng(3)
    prompt_ids = np.array(["p1", "p2", "p1", "p1", "p2", "p2", "p1", "p2"])
    langs = np.array(["en", "en", "de", "en", "fr", "de", "de", "en"])
    h = rng.normal(size=(8, 5))
    c_lang, c_anchor = prompt_centroids(h, prompt_ids, langs, anchor="en")
    for i in range(8):
        same_lang = [h[j] for j in range(8) if prompt_ids[j] == prompt_ids[i] and langs[j] == langs[i]]
        same_anchor = [h[j] for j in range(8) if prompt_ids[j] == prompt_ids[i] and langs[j] == "en"]
        np.testing.assert_allclose(c_lang[i], sum(same_lang) / len(same_lang), rtol=0, atol=1e-12)
        np.testing.assert_allclose(c_anchor[i], sum(same_anchor) / len(same_anchor), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="'p3' has no anchor"):
        prompt_centroids(h[:3], np.array(["p1", "p3", "p1"]), np.array(["en", "de", "de"]))


# --- weight --------------------------------------------------------------------------------------


def test_lacomsa_weight_hand_worked():
    phi, r_msa = np.array([0.2, 0.9]), np.array([0.6, 0.5])  # d = -0.4, +0.4
    # gamma = 1: sigma(0.5 * d) in both forms
    expected = [sigmoid(-0.2), sigmoid(0.2)]
    np.testing.assert_allclose(lacomsa_weight(phi, r_msa), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lacomsa_weight(phi, r_msa, form="code"), expected, rtol=0, atol=1e-12)
    # paper, gamma = 0.5: spow(-0.4, 0.5) = -sqrt(0.4); alpha = 2
    np.testing.assert_allclose(lacomsa_weight(phi, r_msa, alpha=2.0, gamma=0.5),
                               [sigmoid(-2 * math.sqrt(0.4)), sigmoid(2 * math.sqrt(0.4))], rtol=0, atol=1e-12)
    # code, gamma = 2: sigma(0.5 * d) ** 2
    np.testing.assert_allclose(lacomsa_weight(phi, r_msa, gamma=2.0, form="code"),
                               [sigmoid(-0.2) ** 2, sigmoid(0.2) ** 2], rtol=0, atol=1e-12)
    # paper, gamma = 3: sign(d) |d|^3 = -0.064, +0.064
    np.testing.assert_allclose(lacomsa_weight(phi, r_msa, gamma=3.0),
                               [sigmoid(-0.032), sigmoid(0.032)], rtol=0, atol=1e-12)


def test_lacomsa_weight_validates_and_does_not_overflow():
    with pytest.raises(ValueError, match="unknown weight form 'paperr'"):
        lacomsa_weight(np.zeros(1), np.zeros(1), form="paperr")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        lacomsa_weight(np.zeros(1), np.zeros(1), gamma=0.0)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        w = lacomsa_weight(np.array([-1e6, 1e6]), np.zeros(2), alpha=1.0)
    assert w[0] == 0.0 and w[1] == 1.0


# --- latent_rewards -------------------------------------------------------------------------------


def loop_latent_rewards(prompt_ids, langs, h_hub, h_last, anchor, alpha, gamma, centroid_mode, weight_form,
                        centroids=None):
    """Per-sample reference of the LaCoMSA paper (eq. 1-4), written without the implementation's helpers."""
    n = len(prompt_ids)
    mean = lambda rows: sum(rows) / len(rows)  # noqa: E731
    out = {key: [] for key in ("r_msa", "phi", "w", "r_lacomsa")}
    for i in range(n):
        anchor_rows = [j for j in range(n) if prompt_ids[j] == prompt_ids[i] and langs[j] == anchor]
        if langs[i] == anchor:
            r = np.mean([loop_cosine(h_hub[i], h_hub[j]) for j in anchor_rows if j != i])
            phi, w = 0.0, 1.0
        else:
            r = np.mean([loop_cosine(h_hub[i], h_hub[j]) for j in anchor_rows])
            if centroid_mode == "prompt":
                c_lang = mean([h_last[j] for j in range(n) if prompt_ids[j] == prompt_ids[i] and langs[j] == langs[i]])
                c_anchor = mean([h_last[j] for j in anchor_rows])
            elif centroids is not None:
                c_lang, c_anchor = centroids[langs[i]], centroids[anchor]
            else:
                c_lang = mean([h_last[j] for j in range(n) if langs[j] == langs[i]])
                c_anchor = mean([h_last[j] for j in range(n) if langs[j] == anchor])
            phi = loop_cosine(h_last[i], c_lang) - loop_cosine(h_last[i], c_anchor)
            d = phi - r
            if weight_form == "paper":
                w = sigmoid(alpha * math.copysign(abs(d) ** gamma, d))
            else:
                w = sigmoid(alpha * d) ** gamma
        for key, value in zip(out, (r, phi, w, w * r)):
            out[key].append(value)
    return {key: np.array(values) for key, values in out.items()}


def random_run(seed: int, hidden: int = 6):
    rng = np.random.default_rng(seed)
    prompt_ids, langs = [], []
    for prompt in ("q1", "q2", "q3"):
        for lang, count in (("en", 3), ("de", 2), ("fr", 4)):
            prompt_ids += [prompt] * count
            langs += [lang] * count
    order = rng.permutation(len(langs))  # rows in no particular order
    prompt_ids, langs = np.array(prompt_ids)[order], np.array(langs)[order]
    n = len(langs)
    return prompt_ids, langs, rng.normal(size=(n, hidden)), rng.normal(size=(n, hidden))


@pytest.mark.parametrize("centroid_mode", ["language", "prompt"])
@pytest.mark.parametrize("weight_form,alpha,gamma", [("paper", 0.5, 1.0), ("paper", 1.5, 0.5), ("code", 2.0, 3.0)])
def test_latent_rewards_match_per_sample_loop(centroid_mode, weight_form, alpha, gamma):
    prompt_ids, langs, h_hub, h_last = random_run(seed=4)
    got = latent_rewards(prompt_ids, langs, h_hub, h_last, anchor="en", alpha=alpha, gamma=gamma,
                         centroid_mode=centroid_mode, weight_form=weight_form)
    expected = loop_latent_rewards(prompt_ids, langs, h_hub, h_last, "en", alpha, gamma, centroid_mode, weight_form)
    assert set(got) == {"r_msa", "phi", "w", "r_lacomsa"}
    for key in expected:
        assert got[key].shape == (len(langs),)
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-12, err_msg=key)
    is_anchor = langs == "en"
    assert np.all(got["w"][is_anchor] == 1.0) and np.all(got["phi"][is_anchor] == 0.0)


def test_latent_rewards_with_user_centroids():
    prompt_ids, langs, h_hub, h_last = random_run(seed=5)
    rng = np.random.default_rng(6)
    centroids = {lang: rng.normal(size=6) for lang in ("en", "de", "fr")}
    got = latent_rewards(prompt_ids, langs, h_hub, h_last, centroids=centroids)
    expected = loop_latent_rewards(prompt_ids, langs, h_hub, h_last, "en", 0.5, 1.0, "language", "paper", centroids)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-12, err_msg=key)
    with pytest.raises(ValueError, match="no centroid for language"):
        latent_rewards(prompt_ids, langs, h_hub, h_last, centroids={"en": centroids["en"]})
    with pytest.raises(ValueError, match="only be given with centroid_mode='language'"):
        latent_rewards(prompt_ids, langs, h_hub, h_last, centroid_mode="prompt", centroids=centroids)


def test_latent_rewards_permute_with_their_rows():
    prompt_ids, langs, h_hub, h_last = random_run(seed=7)
    order = np.random.default_rng(8).permutation(len(langs))
    for mode in ("language", "prompt"):
        got = latent_rewards(prompt_ids, langs, h_hub, h_last, centroid_mode=mode)
        permuted = latent_rewards(prompt_ids[order], langs[order], h_hub[order], h_last[order], centroid_mode=mode)
        for key in got:
            np.testing.assert_allclose(permuted[key], got[key][order], rtol=0, atol=1e-12)


def test_latent_rewards_hand_worked():
    # One prompt; English anchors at the hub layer e1 = (1, 0), e2 = (1, 1), 45 deg apart, so each
    # anchor's leave-one-out r_MSA is cos 45 = 1/sqrt2. Two German samples at the hub layer:
    #   A = (1, 0): r_MSA = (cos 0 + cos 45) / 2 = (1 + 1/sqrt2) / 2
    #   B = (0, 1): r_MSA = (cos 90 + cos 45) / 2 = (1/sqrt2) / 2
    # Last layer, prompt centroids: c_en = mean((0, 1), (0, 1)) = (0, 1), c_de = mean((1, 0), (1, 0.2)).
    h_hub = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    h_last = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.2]])
    prompt_ids = np.array(["p"] * 4)
    langs = np.array(["en", "en", "de", "de"])
    got = latent_rewards(prompt_ids, langs, h_hub, h_last, centroid_mode="prompt", alpha=0.5)
    r_a, r_b = (1 + 1 / math.sqrt(2)) / 2, (1 / math.sqrt(2)) / 2
    c_de = np.array([1.0, 0.1])  # mean of (1, 0) and (1, 0.2)
    phi_a = loop_cosine([1, 0], c_de) - 0.0  # c_en = (0, 1) is orthogonal to A
    phi_b = loop_cosine([1, 0.2], c_de) - loop_cosine([1, 0.2], [0, 1])
    w_a, w_b = sigmoid(0.5 * (phi_a - r_a)), sigmoid(0.5 * (phi_b - r_b))
    np.testing.assert_allclose(got["r_msa"], [1 / math.sqrt(2), 1 / math.sqrt(2), r_a, r_b], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["phi"], [0.0, 0.0, phi_a, phi_b], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["w"], [1.0, 1.0, w_a, w_b], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["r_lacomsa"], [1 / math.sqrt(2), 1 / math.sqrt(2), w_a * r_a, w_b * r_b],
                               rtol=0, atol=1e-12)


def test_latent_rewards_refuse_prompts_without_enough_anchors():
    h = np.eye(3)
    with pytest.raises(ValueError, match="prompt_id 'p2' has no anchor"):
        latent_rewards(np.array(["p1", "p1", "p2"]), np.array(["en", "en", "de"]), h, h)
    with pytest.raises(ValueError, match="prompt_id 'p1' has 1 anchor-language response"):
        latent_rewards(np.array(["p1", "p1", "p1"]), np.array(["en", "de", "de"]), h, h)
    with pytest.raises(ValueError, match="unknown centroid mode"):
        latent_rewards(np.array(["p1"] * 3), np.array(["en", "en", "de"]), h, h, centroid_mode="lang")
    with pytest.raises(ValueError, match="unknown weight form"):
        latent_rewards(np.array(["p1"] * 3), np.array(["en", "en", "de"]), h, h, weight_form="x")


# --- silhouette -----------------------------------------------------------------------------------


def loop_silhouette(h, labels) -> float:
    n = len(labels)
    dist = [[1.0 - loop_cosine(h[i], h[j]) for j in range(n)] for i in range(n)]
    scores = []
    for i in range(n):
        own = [j for j in range(n) if labels[j] == labels[i] and j != i]
        if not own:
            scores.append(0.0)
            continue
        a = sum(dist[i][j] for j in own) / len(own)
        b = min(np.mean([dist[i][j] for j in range(n) if labels[j] == other])
                for other in set(labels) if other != labels[i])
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def test_silhouette_hand_worked():
    # Two tight clusters of identical directions: a = 0, b = 1 -> s = 1 everywhere.
    h = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert silhouette_by_prompt(h, np.array(["a", "a", "b", "b"])) == pytest.approx(1.0, abs=1e-12)
    # Cluster A = {e1, e2}, B = {-e1}: d(e1, e2) = 1, d(e1, -e1) = 2, d(e2, -e1) = 1.
    # e1: a = 1, b = 2 -> 0.5; e2: a = 1, b = 1 -> 0; -e1 alone -> 0. Mean = 0.5 / 3.
    h = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert silhouette_by_prompt(h, np.array([7, 7, 9])) == pytest.approx(0.5 / 3, abs=1e-12)


def test_silhouette_matches_loop_and_chunking():
    rng = np.random.default_rng(9)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 3, 1, 2, 2, 0])
    h = rng.normal(size=(12, 5)) + 2.0 * np.eye(5)[labels]
    expected = loop_silhouette(h, list(labels))
    assert silhouette_by_prompt(h, labels) == pytest.approx(expected, abs=1e-12)
    assert silhouette_by_prompt(h, labels, chunk_rows=5) == pytest.approx(expected, abs=1e-12)


def test_silhouette_refuses_degenerate_clusterings():
    with pytest.raises(ValueError, match="number of prompts"):
        silhouette_by_prompt(np.eye(3), np.array(["a", "a", "a"]))
    with pytest.raises(ValueError, match="number of prompts"):
        silhouette_by_prompt(np.eye(3), np.array(["a", "b", "c"]))


@pytest.mark.parametrize("num_layers, hub", [(32, 15), (4, 1), (2, 1)])
def test_default_hub_layer_is_the_released_codes_layer(tmp_path, num_layers, hub):
    """hidden_states[15] on the 32-layer Llama-3-8B (the released LaCoMSA code); 4 layers is the tiny model."""
    from transformers import LlamaConfig

    from rayalign.config import load_config
    from rayalign.models import TINY_DEFAULTS
    from rayalign.scoring.setup import latent_layers
    from rayalign.rewards.latent import default_hub_layer

    assert TINY_DEFAULTS["num_hidden_layers"] == 4
    LlamaConfig(num_hidden_layers=num_layers, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                vocab_size=32).save_pretrained(tmp_path)
    cfg = load_config(None, ["rewards.latent.enabled=true"])
    assert cfg.rewards.latent.hub_layer is None
    assert default_hub_layer(num_layers) == hub
    assert latent_layers(cfg, str(tmp_path)) == {"h_hub": hub, "h_last": num_layers}
