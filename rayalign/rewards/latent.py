"""Latent rewards from pooled hidden states: MSA, language consistency and LaCoMSA (the LaCoMSA paper; see
docs/methods.md). All functions take numpy arrays and compute in float64, except `masked_mean_pool`,
which runs on the model's torch tensors. `N` responses, `M` anchor responses, `H` hidden size.
"""

from __future__ import annotations

import numpy as np
import torch

WEIGHT_FORMS = ("paper", "code")


def default_hub_layer(num_layers: int) -> int:
    """The semantic-hub layer as HF hidden_states index (0 = the embeddings, num_layers = the last layer, after the
    final norm): floor((num_layers - 1) / 2), at least 1. On the 32-layer Llama-3-8B this is hidden_states[15], the
    layer the released LaCoMSA code pools (the paper's "floor(L/2)" counts the last layer as L = 31)."""
    return max(1, (num_layers - 1) // 2)
CENTROID_MODES = ("language", "prompt")


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` (B, T, H) over the positions where `mask` (B, T) is set -> (B, H) float32.

    `mask` marks the RESPONSE tokens only (docs/methods.md 1: offsets from the templated prompt, end-of-turn
    token included), so the result does not depend on the padding side. A row with no response token
    is an error, not a silent zero or NaN.
    """
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (B, T, H) and mask (B, T); got {tuple(hidden.shape)} and {tuple(mask.shape)}")
    response_mask = mask.to(device=hidden.device, dtype=torch.float32)  # (B, T)
    if torch.any((response_mask != 0) & (response_mask != 1)):
        raise ValueError("mask must be boolean or 0/1")
    token_counts = response_mask.sum(dim=1)  # (B,)
    empty_rows = torch.nonzero(token_counts == 0).flatten().tolist()
    if empty_rows:
        raise ValueError(f"rows {empty_rows} have an empty response mask; nothing to pool")
    summed = torch.einsum("bth,bt->bh", hidden.to(torch.float32), response_mask)  # (B, H)
    return summed / token_counts[:, None]


def _as_matrix(x, name: str) -> np.ndarray:
    matrix = np.asarray(x, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, H); got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{name} has non-finite values")
    return matrix


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    """Rows of `x` (..., H) scaled to unit L2 norm; a zero row has no direction and is an error."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{name} has zero vectors; cosine similarity is undefined for them")
    return x / norms


def cosine_matrix(a, b) -> np.ndarray:
    """Cosine similarity of every row of `a` (N, H) with every row of `b` (M, H) -> (N, M), float64."""
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"hidden sizes differ: a {a.shape}, b {b.shape}")
    return _unit_rows(a, "a") @ _unit_rows(b, "b").T


def msa_scores(h, h_anchor) -> np.ndarray:
    """r_MSA (N,): mean cosine of each row of `h` (N, H) to the anchor responses `h_anchor` (M, H).

    LaCoMSA paper, eq. 1: r_MSA(y) = (1/M) sum_i cos(h_l(y), h_l(e_i)), at the semantic-hub layer l.
    """
    return cosine_matrix(h, h_anchor).mean(axis=1)


def msa_leave_one_out(h_anchor) -> np.ndarray:
    """r_MSA (N,) of anchor responses `h_anchor` (N, H), each against the OTHER N-1 (N >= 2).

    rayalign's choice for English responses (docs/methods.md 1); the paper does not score them.
    """
    h_anchor = _as_matrix(h_anchor, "h_anchor")
    n = h_anchor.shape[0]
    if n < 2:
        raise ValueError(f"leave-one-out MSA needs at least 2 anchor responses; got {n}")
    similarity = cosine_matrix(h_anchor, h_anchor)  # (N, N)
    return (similarity.sum(axis=1) - np.diag(similarity)) / (n - 1)


def _rowwise_cosine(h: np.ndarray, centroid, name: str) -> np.ndarray:
    """cos(h[i], centroid[i]) (N,) for `centroid` (N, H), or cos(h[i], centroid) for `centroid` (H,)."""
    centroid = np.asarray(centroid, dtype=np.float64)
    if centroid.shape not in (h.shape, h.shape[1:]):
        raise ValueError(f"{name} must be (N, H) = {h.shape} or (H,) = {h.shape[1:]}; got {centroid.shape}")
    return np.sum(_unit_rows(h, "h_last") * _unit_rows(centroid, name), axis=-1)


def language_consistency(h_last, centroid_lang, centroid_anchor) -> np.ndarray:
    """phi (N,) = cos(h_L(y), c^lang) - cos(h_L(y), c^anchor) (docs/methods.md 1, language consistency).

    h_last (N, H) are last-layer pooled states; each centroid is (N, H) (one per row) or (H,) (shared).
    """
    h_last = _as_matrix(h_last, "h_last")
    return (_rowwise_cosine(h_last, centroid_lang, "centroid_lang")
            - _rowwise_cosine(h_last, centroid_anchor, "centroid_anchor"))


def _group_codes(*keys) -> tuple[np.ndarray, int]:
    """Integer code (N,) of each row's combination of `keys` (each (N,)), and the number of codes."""
    codes = np.zeros(len(keys[0]), dtype=np.int64)
    for key in keys:
        _, key_codes = np.unique(np.asarray(key), return_inverse=True)
        codes = codes * (key_codes.max(initial=-1) + 1) + key_codes.reshape(-1)
    _, codes = np.unique(codes, return_inverse=True)
    codes = codes.reshape(-1)
    return codes, int(codes.max(initial=-1)) + 1


def _group_means(x: np.ndarray, codes: np.ndarray, num_groups: int) -> np.ndarray:
    """Mean of the rows of `x` (N, H) per group code -> (num_groups, H)."""
    sums = np.zeros((num_groups, x.shape[1]))
    np.add.at(sums, codes, x)
    counts = np.bincount(codes, minlength=num_groups)
    return sums / counts[:, None]


def _check_rows(n: int, **columns) -> dict[str, np.ndarray]:
    arrays = {name: np.asarray(col) for name, col in columns.items()}
    for name, col in arrays.items():
        if col.shape != (n,):
            raise ValueError(f"{name} must be ({n},) like the hidden states; got shape {col.shape}")
    return arrays


def language_centroids(h_last, langs) -> dict[str, np.ndarray]:
    """Centroid mode `language` (the paper): the mean (H,) of the last-layer states of each language.

    h_last (N, H), langs (N,) -> {lang: (H,)}.
    """
    h_last = _as_matrix(h_last, "h_last")
    langs = _check_rows(h_last.shape[0], langs=langs)["langs"]
    names, codes = np.unique(langs, return_inverse=True)
    means = _group_means(h_last, codes.reshape(-1), len(names))
    return {str(lang): means[i] for i, lang in enumerate(names)}


def prompt_centroids(h_last, prompt_ids, langs, anchor: str = "en") -> tuple[np.ndarray, np.ndarray]:
    """Centroid mode `prompt` (the released code): per-row centroids (c_lang (N, H), c_anchor (N, H)).

    c_lang[i] is the mean of the rows with the same prompt id and language as row i; c_anchor[i] the
    mean of that prompt's `anchor`-language rows. A prompt without anchor rows is an error.
    """
    h_last = _as_matrix(h_last, "h_last")
    cols = _check_rows(h_last.shape[0], prompt_ids=prompt_ids, langs=langs)
    prompt_ids, langs = cols["prompt_ids"], cols["langs"]
    is_anchor = langs == anchor
    _check_anchor_rows(prompt_ids, is_anchor)

    pair_codes, num_pairs = _group_codes(prompt_ids, langs)
    c_lang = _group_means(h_last, pair_codes, num_pairs)[pair_codes]  # (N, H)

    prompt_names, prompt_codes = np.unique(prompt_ids, return_inverse=True)
    prompt_codes = prompt_codes.reshape(-1)
    anchor_sums = np.zeros((len(prompt_names), h_last.shape[1]))
    np.add.at(anchor_sums, prompt_codes[is_anchor], h_last[is_anchor])
    anchor_counts = np.bincount(prompt_codes[is_anchor], minlength=len(prompt_names))
    c_anchor = (anchor_sums / anchor_counts[:, None])[prompt_codes]  # (N, H)
    return c_lang, c_anchor


def _check_anchor_rows(prompt_ids: np.ndarray, is_anchor: np.ndarray) -> None:
    missing = np.setdiff1d(np.unique(prompt_ids), np.unique(prompt_ids[is_anchor]))
    if missing.size:
        shown = ", ".join(repr(p.item() if hasattr(p, "item") else p) for p in missing[:5])
        raise ValueError(f"prompt_id {shown} has no anchor-language responses"
                         + (f" ({missing.size} prompts in all)" if missing.size > 5 else ""))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow for large |x|."""
    exp_neg_abs = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + exp_neg_abs), exp_neg_abs / (1.0 + exp_neg_abs))


def lacomsa_weight(phi, r_msa, alpha: float = 0.5, gamma: float = 1.0, form: str = "paper") -> np.ndarray:
    """LaCoMSA weight w (N,) from phi (N,) and r_MSA (N,) (docs/methods.md 1, weight).

    form "paper": w = sigma(alpha * spow(phi - r_MSA, gamma)), spow(d, g) = sign(d) * |d| ** g.
    form "code":  w = sigma(alpha * (phi - r_MSA)) ** gamma (the released code). Equal at gamma = 1.
    """
    if form not in WEIGHT_FORMS:
        raise ValueError(f"unknown weight form {form!r} (known: {', '.join(WEIGHT_FORMS)})")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0; got {gamma}")
    difference = np.asarray(phi, dtype=np.float64) - np.asarray(r_msa, dtype=np.float64)
    if form == "paper":
        return _sigmoid(alpha * np.sign(difference) * np.abs(difference) ** gamma)
    return _sigmoid(alpha * difference) ** gamma


def _rows_by_key(keys: np.ndarray):
    """Yield (key, row indices in original order) per distinct key, without an O(N) scan per key."""
    names, codes = np.unique(keys, return_inverse=True)
    codes = codes.reshape(-1)
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(names)))])
    for i, name in enumerate(names):
        yield (name.item() if hasattr(name, "item") else name), order[bounds[i]:bounds[i + 1]]


def latent_rewards(prompt_ids, langs, h_hub, h_last, anchor: str = "en", alpha: float = 0.5,
                   gamma: float = 1.0, centroid_mode: str = "language", weight_form: str = "paper",
                   centroids: dict | None = None) -> dict[str, np.ndarray]:
    """MSA and LaCoMSA rewards of N responses (docs/methods.md 1) -> {"r_msa", "phi", "w", "r_lacomsa"}, each (N,).

    prompt_ids (N,), langs (N,); h_hub (N, H) pooled at the semantic-hub layer, h_last (N, H) at the
    last layer. Non-anchor rows: r_MSA against the same prompt's anchor rows, phi with `centroid_mode`
    ("language": one centroid per language over these rows, or `centroids` {lang: (H,)} when given;
    "prompt": per-prompt centroids), w = lacomsa_weight(...), r_lacomsa = w * r_msa. Anchor rows:
    leave-one-out r_MSA among the prompt's anchor rows, phi = 0, w = 1, r_lacomsa = r_msa.
    """
    h_hub, h_last = _as_matrix(h_hub, "h_hub"), _as_matrix(h_last, "h_last")
    n = h_hub.shape[0]
    if h_last.shape[0] != n:
        raise ValueError(f"h_hub has {n} rows but h_last has {h_last.shape[0]}")
    cols = _check_rows(n, prompt_ids=prompt_ids, langs=langs)
    prompt_ids, langs = cols["prompt_ids"], cols["langs"]
    if centroid_mode not in CENTROID_MODES:
        raise ValueError(f"unknown centroid mode {centroid_mode!r} (known: {', '.join(CENTROID_MODES)})")
    if centroids is not None and centroid_mode != "language":
        raise ValueError("centroids can only be given with centroid_mode='language'")
    is_anchor = langs == anchor
    _check_anchor_rows(prompt_ids, is_anchor)

    # r_MSA at the hub layer, one prompt at a time (the math inside is vectorised).
    r_msa = np.empty(n)
    for prompt_id, rows in _rows_by_key(prompt_ids):
        anchor_rows, other_rows = rows[is_anchor[rows]], rows[~is_anchor[rows]]
        if anchor_rows.size < 2:
            raise ValueError(f"prompt_id {prompt_id!r} has {anchor_rows.size} anchor-language response; "
                             "leave-one-out MSA of the anchor rows needs at least 2")
        r_msa[anchor_rows] = msa_leave_one_out(h_hub[anchor_rows])
        if other_rows.size:
            r_msa[other_rows] = msa_scores(h_hub[other_rows], h_hub[anchor_rows])

    # phi at the last layer.
    if centroid_mode == "prompt":
        c_lang, c_anchor = prompt_centroids(h_last, prompt_ids, langs, anchor)
    else:
        by_lang = language_centroids(h_last, langs) if centroids is None else centroids
        missing = sorted({str(lang) for lang in np.unique(langs)} - set(by_lang))
        if missing:
            raise ValueError(f"no centroid for language(s) {', '.join(missing)}")
        names = np.unique(langs)
        centroid_table = np.stack([np.asarray(by_lang[str(lang)], dtype=np.float64) for lang in names])
        c_lang = centroid_table[np.searchsorted(names, langs)]  # (N, H)
        c_anchor = np.asarray(by_lang[anchor], dtype=np.float64)  # (H,)
    phi = language_consistency(h_last, c_lang, c_anchor)
    phi[is_anchor] = 0.0

    w = lacomsa_weight(phi, r_msa, alpha=alpha, gamma=gamma, form=weight_form)
    w[is_anchor] = 1.0
    return {"r_msa": r_msa, "phi": phi, "w": w, "r_lacomsa": w * r_msa}


def silhouette_by_prompt(h, prompt_ids, chunk_rows: int = 4096) -> float:
    """Mean silhouette (cosine distance) of states `h` (N, H) clustered by `prompt_ids` (N,).

    The semantic-hub scan (docs/methods.md 1, paper Figure 2). Per sample: a = mean distance to the other
    members of its cluster, b = the smallest mean distance to another cluster, s = (b - a) / max(a, b),
    and s = 0 for a sample alone in its cluster (sklearn's convention). Distance = 1 - cos is linear in
    the unit vectors, so the sum of distances to a cluster is size_k - u_i . (sum of the cluster's unit
    vectors): O(N K H) with K prompts, never an (N, N) matrix.
    """
    h = _as_matrix(h, "h")
    n = h.shape[0]
    prompt_ids = _check_rows(n, prompt_ids=prompt_ids)["prompt_ids"]
    _, codes = np.unique(prompt_ids, return_inverse=True)
    codes = codes.reshape(-1)
    num_clusters = int(codes.max(initial=-1)) + 1
    if not 2 <= num_clusters <= n - 1:
        raise ValueError(f"silhouette needs 2 <= number of prompts <= N - 1; got {num_clusters} prompts, N = {n}")
    unit = _unit_rows(h, "h")  # (N, H)
    cluster_sizes = np.bincount(codes, minlength=num_clusters).astype(np.float64)  # (K,)
    cluster_unit_sums = np.zeros((num_clusters, h.shape[1]))  # (K, H)
    np.add.at(cluster_unit_sums, codes, unit)
    self_distance = 1.0 - np.sum(unit * unit, axis=1)  # (N,), 0 up to rounding

    scores = np.empty(n)
    for start in range(0, n, chunk_rows):
        rows = np.arange(start, min(start + chunk_rows, n))
        local = np.arange(rows.size)
        distance_sums = cluster_sizes - unit[rows] @ cluster_unit_sums.T  # (R, K)
        own = codes[rows]
        own_size = cluster_sizes[own]
        a = (distance_sums[local, own] - self_distance[rows]) / np.maximum(own_size - 1, 1)
        mean_to_cluster = distance_sums / cluster_sizes
        mean_to_cluster[local, own] = np.inf
        a, b = np.maximum(a, 0.0), np.maximum(mean_to_cluster.min(axis=1), 0.0)
        denominator = np.maximum(a, b)
        s = np.divide(b - a, denominator, out=np.zeros(rows.size), where=denominator > 0)
        scores[rows] = np.where(own_size > 1, s, 0.0)
    return float(scores.mean())
