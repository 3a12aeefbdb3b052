"""examples/paper-options.yaml through `rayalign launch`: ICR's R_t (rewards.implicit.prompt: translation), LaCoMSA's
centroids from text (rewards.latent.centroid_texts) and DCO over every language pair
(rewards.consistency.language_pairs: all), each checked against values recomputed here from the run's own datasets
(docs/methods.md sections 1-3), not by the reward code."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from conftest import REPO
from rayalign.data.store import read_dataset, read_manifest

RECIPE = REPO / "examples" / "paper-options.yaml"
LANGS = ["en", "de", "ru"]  # the recipe's; en is the anchor
PROMPTS, N = 8, 4
LANGUAGE_PAIRS = {("en", "de"), ("en", "ru"), ("de", "ru")}


# ---- rayalign inspect: DCO tuples by language pair (fast) ----

def test_inspect_counts_dco_tuples_per_language_pair(tmp_path):
    """With language_pairs: all, side 2's language alone merges en-ru with de-ru: inspect groups by the pair."""
    from rayalign.data.inspect import dataset_summary
    from rayalign.data.schemas import schema_for
    from rayalign.data.store import DatasetWriter

    def msg(role, text):
        return [{"role": role, "content": text}]

    rows = [{"prompt_id": f"q{i}", "prompt_1": msg("user", "q"), "chosen_1": msg("assistant", "a"),
             "rejected_1": msg("assistant", "b"), "prompt_2": msg("user", "q"), "chosen_2": msg("assistant", "a"),
             "rejected_2": msg("assistant", "b"), "lang_1": l1, "lang_2": l2, "ref_logp_chosen_1": -1.0,
             "ref_logp_rejected_1": -2.0, "ref_logp_chosen_2": -1.0, "ref_logp_rejected_2": -2.0, "gamma_12": 1.0,
             "gamma_21": 1.0, "method": "dco", "iteration": 1}
            for i, (l1, l2) in enumerate([("en", "de"), ("en", "ru"), ("en", "ru"), ("de", "ru")])]
    writer = DatasetWriter(tmp_path / "pairs", "dco", languages=LANGS)
    writer.write_shard(0, pa.Table.from_pylist(rows, schema=schema_for("dco")[1]))
    writer.finalize(expected_shards=1)
    _, summary = dataset_summary(tmp_path / "pairs")
    assert summary.rows() == [("en", "de", 1), ("en", "ru", 2), ("de", "ru", 1)]


# ---- the recipe, launched (slow) ----

def launch(run_dir, tiny_model, *overrides):
    cmd = [sys.executable, "-m", "rayalign.cli", "launch", "--cluster", "local", str(RECIPE), "--run-dir",
           str(run_dir), "-o", f"policy.path={tiny_model}", *(a for o in overrides for a in ("-o", o))]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    inspect = subprocess.run([sys.executable, "-m", "rayalign.cli", "inspect", str(run_dir)], capture_output=True,
                             text=True, cwd=REPO)
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    return run_dir, inspect.stdout


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_model):
    return launch(tmp_path_factory.mktemp("paper-options") / "run", tiny_model)


@pytest.fixture(scope="module")
def dco_run(tmp_path_factory, tiny_model):
    return launch(tmp_path_factory.mktemp("paper-options") / "dco", tiny_model, "pairs.method=dco")


def scores_frame(run_dir):
    table = read_dataset(run_dir / "iter-1" / "scores", "scores")
    df = pl.from_arrow(table.drop_columns(["h_hub", "h_last"]))
    h_last = np.array(table.column("h_last").to_pylist(), dtype=np.float64)
    return df, h_last, read_manifest(run_dir / "iter-1" / "scores")


def alpha_by_grid_loop(groups, grid=1000):
    """Paper A.3 / the released code, as a plain loop over the grid: the a in 0, 1/G, ..., (G-1)/G minimising
    |mean over prompts (|y_+(a)| - |y_-(a)|)|, y_+/y_- the argmax/argmin (first index on ties) of b - a |y|."""
    best, best_gap = None, None
    for k in range(grid):
        a = k / grid
        diffs = []
        for b, length in groups:
            r = b - a * length
            diffs.append(length[int(np.argmax(r))] - length[int(np.argmin(r))])
        gap = abs(float(np.mean(diffs)))
        if best_gap is None or gap < best_gap:
            best, best_gap = a, gap
    return best


@pytest.mark.slow
def test_r_t_in_the_scores_and_icr_pairs(scored_run):
    run_dir, inspect = scored_run
    df, _, manifest = scores_frame(run_dir)
    assert df.height == PROMPTS * len(LANGS) * N and sorted(df["lang"].unique()) == sorted(LANGS)
    icr = manifest["params"]["icr"]
    assert icr["prompt"] == "translation" and icr["beta"] == 1.0 and icr["length_unit"] == "chars"
    for column in ("logp_policy_icr", "logp_reward_ref", "r_icr"):
        assert df[column].null_count() == 0, column
    # English rows: y itself under x^en, its native prompt (the policy's log-prob of the scoring pass); the others:
    # the translation t(y) under x^en, another text under another prompt
    en, other = df.filter(pl.col("lang") == "en"), df.filter(pl.col("lang") != "en")
    np.testing.assert_allclose(en["logp_policy_icr"].to_numpy(), en["logp_policy"].to_numpy(), atol=1e-3)
    assert (np.abs(other["logp_policy_icr"].to_numpy() - other["logp_policy"].to_numpy()) > 1e-3).all()

    # alpha_l: recomputed by the grid loop over each language's prompts (samples in sample_idx order)
    for lang in LANGS:
        part = df.filter(pl.col("lang") == lang).sort("prompt_id", "sample_idx")
        groups = [((g["logp_policy_icr"] - g["logp_reward_ref"]).to_numpy(),
                   np.array([len(y) for y in g["response"]], dtype=np.float64))
                  for _, g in part.group_by("prompt_id", maintain_order=True)]
        assert alpha_by_grid_loop(groups) == pytest.approx(icr["alpha_per_language"][lang], abs=1e-12), lang
    # R_t(y) = beta [log pi_theta(t(y)|x^en) - log pi_I(t(y)|x^en)] - alpha_l |y|, |y| in characters of y
    alpha = np.array([icr["alpha_per_language"][lang] for lang in df["lang"]])
    length = np.array([len(y) for y in df["response"]], dtype=np.float64)
    expected = 1.0 * (df["logp_policy_icr"].to_numpy() - df["logp_reward_ref"].to_numpy()) - alpha * length
    np.testing.assert_allclose(df["r_icr"].to_numpy(), expected, rtol=1e-9, atol=1e-9)

    # ICR pairs (pairs.truncated: not_chosen, the default): the best R_t among the responses that ended on their own
    # against the worst of all, per (prompt, language); none where they tie or no response ended on its own
    pairs = read_dataset(run_dir / "iter-1" / "pairs", "pairs").to_pylist()
    by_group = {(r["prompt_id"], r["lang"]): r for r in pairs}
    assert len(by_group) == len(pairs) and {r["method"] for r in pairs} == {"icr"}
    expected_groups = 0
    for (prompt_id, lang), g in df.group_by("prompt_id", "lang"):
        g = g.sort("sample_idx")
        r, complete = g["r_icr"].to_numpy(), (g["finish_reason"] == "stop").to_numpy()
        if not complete.any() or r[complete].max() == r.min():
            assert (prompt_id, lang) not in by_group
            continue
        expected_groups += 1
        pair = by_group[(prompt_id, lang)]
        best = int(np.flatnonzero(complete)[np.argmax(r[complete])])
        assert pair["score_chosen"] == pytest.approx(r[best]) and pair["score_rejected"] == pytest.approx(r.min())
        assert pair["chosen"][0]["content"] == g["response"][best]
        assert pair["rejected"][0]["content"] == g["response"][int(np.argmin(r))]
    assert len(pairs) == expected_groups > 0 and expected_groups < df.select("prompt_id", "lang").n_unique()
    assert "r_icr" in inspect and "icr" in inspect


def pooled_text_centroids(model_path, files, layer):
    """c^lang: the mean over the file's lines of hidden_states[layer], averaged over the assistant turn's tokens
    (the end-of-turn token included) after an empty user turn, the conversation templated as a whole."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    user = [{"role": "user", "content": ""}]
    start = len(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False))
    centroids = {}
    for lang, path in files.items():
        states = []
        for line in (REPO / "examples" / path).read_text(encoding="utf-8").splitlines():
            ids = tok.apply_chat_template(user + [{"role": "assistant", "content": line.strip()}], tokenize=True,
                                          return_dict=False)
            end = ids.index(eot, start) + 1
            with torch.no_grad():
                hidden = model(torch.tensor([ids[:end]]), output_hidden_states=True).hidden_states[layer]
            states.append(hidden[0, start:end].mean(0).double().numpy())
        centroids[lang] = np.mean(states, axis=0)
    return centroids


def cos(h, c):
    return h @ c / (np.linalg.norm(h, axis=1) * np.linalg.norm(c))


@pytest.mark.slow
def test_centroids_from_the_shipped_text_files(scored_run, tiny_model):
    run_dir, _ = scored_run
    df, h_last, manifest = scores_frame(run_dir)
    latent = manifest["params"]["latent"]
    assert latent["centroids"] == "centroid_texts" and latent["centroid_mode"] == "language"
    files = {lang: f"data/centroids/{lang}.txt" for lang in LANGS}
    assert {lang: path.replace("\\", "/").rsplit("examples/", 1)[-1] for lang, path in
            latent["centroid_texts"].items()} == files
    layer = manifest["params"]["layers"]["h_last"]
    assert layer == 4  # the tiny model's last hidden state
    centroids = pooled_text_centroids(tiny_model, files, layer)
    langs = df["lang"].to_numpy()
    other = langs != "en"
    # phi(y) = cos(h_L(y), c^lang) - cos(h_L(y), c^en) for non-anchor rows; 0 (and w = 1) for English
    phi = np.zeros(len(df))
    for lang in ("de", "ru"):
        rows = langs == lang
        phi[rows] = cos(h_last[rows], centroids[lang]) - cos(h_last[rows], centroids["en"])
    np.testing.assert_allclose(df["phi"].to_numpy(), phi, atol=5e-3)  # the stored states are float16
    # the run's own centroids (the default) would give another phi: the option changed the reward
    own = {lang: h_last[langs == lang].mean(0) for lang in LANGS}
    phi_own = np.zeros(len(df))
    for lang in ("de", "ru"):
        rows = langs == lang
        phi_own[rows] = cos(h_last[rows], own[lang]) - cos(h_last[rows], own["en"])
    assert np.abs(phi_own - phi)[other].max() > 0.05
    # w = sigma(alpha (phi - r_MSA)) with alpha 0.5, gamma 1; r_LaCoMSA = w r_MSA
    r_msa = df["r_msa"].to_numpy()
    w = np.where(other, 1 / (1 + np.exp(-0.5 * (df["phi"].to_numpy() - r_msa))), 1.0)
    np.testing.assert_allclose(df["w"].to_numpy(), w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(df["r_lacomsa"].to_numpy(), w * r_msa, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_dco_tuples_over_every_language_pair(dco_run):
    run_dir, inspect = dco_run
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] == ["iter-1/pairs", "iter-1/summary"]  # DCO: no generation, no sample scores
    # the bundled candidate sets, read here: candidate text -> index, per language and question
    index = {}
    for lang in LANGS:
        for line in (REPO / "examples" / "data" / "mc" / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines():
            q = json.loads(line)
            index[(lang, q["question_id"])] = {c: i for i, c in enumerate(q["candidates"])}
    questions = len({q for _, q in index})
    tuples = read_dataset(run_dir / "iter-1" / "pairs", "dco").to_pylist()
    pairs_seen = [(t["lang_1"], t["lang_2"]) for t in tuples]
    assert set(pairs_seen) == LANGUAGE_PAIRS  # anchor pairs and the non-anchor de-ru pair, nothing else
    assert all(pairs_seen.count(p) == questions * 2 for p in LANGUAGE_PAIRS)  # pairs_per_question: 2
    for t in tuples:
        l1, l2, q = t["lang_1"], t["lang_2"], t["prompt_id"]
        # the gammas of the recipe (EN stable): gamma_12 weighs side 2's margin inside side 1's target
        if l1 == "en":
            assert (t["gamma_12"], t["gamma_21"]) == (0.1, 10.0)
        else:
            assert (t["gamma_12"], t["gamma_21"]) == (1.0, 1.0)
        chosen = [index[(lang, q)][t[f"chosen_{s}"][0]["content"]] for s, lang in ((1, l1), (2, l2))]
        rejected = [index[(lang, q)][t[f"rejected_{s}"][0]["content"]] for s, lang in ((1, l1), (2, l2))]
        assert chosen[0] == chosen[1] != rejected[0] == rejected[1]  # the same two candidates on both sides
    for l1, l2 in sorted(LANGUAGE_PAIRS):  # inspect: one row per language pair
        assert re.search(rf"\b{l1}\W+{l2}\W+{questions * 2}\b", inspect), (l1, l2)
