"""LaCoMSA centroids from the user's monolingual text files (rewards.latent.centroid_texts)."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from rayalign.config import ConfigError, load_config
from rayalign.scoring.centroid_texts import (CENTROID_PROMPT, centroid_spec, centroid_text_rows,
                                             centroids_from_table)
from rayalign.rewards.latent import latent_rewards
from rayalign.scoring.forward import latent_array


def test_clean_centroids_separate_off_target_responses_better_than_run_centroids():
    # Language-layer states: English e0, German e1. Prompt p has 2 English responses and 5 "German" ones, of which
    # 3 are off-target (in English, state e0) and 2 on target (e1). Hub states are all equal, so r_MSA is the same
    # everywhere and phi alone decides.
    e = np.eye(4)
    langs = np.array(["en", "en"] + ["de"] * 5)
    h_last = np.stack([e[0], e[0], e[0], e[0], e[0], e[1], e[1]])
    h_hub = np.ones((7, 4))
    off_target, on_target = np.arange(2, 5), np.arange(5, 7)
    # Run centroids: c_de = (3 e0 + 2 e1) / 5 = 0.6 e0 + 0.4 e1, |c_de| = sqrt(0.52); c_en = e0.
    #   phi(off) = 0.6 / sqrt(0.52) - 1 = -0.1679,  phi(on) = 0.4 / sqrt(0.52) - 0 = 0.5547: a gap of 0.7226.
    run = latent_rewards(["p"] * 7, langs, h_hub, h_last)
    np.testing.assert_allclose(run["phi"][off_target], 0.6 / np.sqrt(0.52) - 1, rtol=1e-12)
    np.testing.assert_allclose(run["phi"][on_target], 0.4 / np.sqrt(0.52), rtol=1e-12)
    # Clean centroids from text lines: German passages near e1, English ones near e0 (a small shared offset).
    texts = pa.table({"lang": ["en", "en", "de", "de", "de"],
                      "h_last": latent_array([e[0] + 0.1 * e[3], e[0] - 0.1 * e[3], e[1] + 0.2 * e[2],
                                              e[1] - 0.2 * e[2], e[1]])})
    clean = centroids_from_table(texts)
    np.testing.assert_allclose(clean["de"], e[1], atol=1e-3)  # the states travel as float16
    np.testing.assert_allclose(clean["en"], e[0], atol=1e-3)
    #   phi(off) = 0 - 1 = -1, phi(on) = 1 - 0 = 1: a gap of 2.
    text = latent_rewards(["p"] * 7, langs, h_hub, h_last, centroids=clean)
    np.testing.assert_allclose(text["phi"][off_target], -1.0, atol=1e-3)
    np.testing.assert_allclose(text["phi"][on_target], 1.0, atol=1e-3)
    gap_run = run["phi"][on_target].mean() - run["phi"][off_target].mean()
    gap_text = text["phi"][on_target].mean() - text["phi"][off_target].mean()
    assert gap_text > 2 * gap_run
    # and the LaCoMSA weight follows: off-target responses lose more of their reward
    assert text["w"][off_target].max() < run["w"][off_target].min()


def test_centroid_text_rows_and_bad_files(tmp_path):
    (tmp_path / "en.txt").write_text("The cat sleeps.\n\n  A dog barks. \n", encoding="utf-8")
    (tmp_path / "de.txt").write_text("Die Katze schläft.\n", encoding="utf-8")
    rows = centroid_text_rows({"en": str(tmp_path / "en.txt"), "de": str(tmp_path / "de.txt")}).to_pylist()
    assert [(r["lang"], r["response"], r["sample_idx"]) for r in rows] == [
        ("en", "The cat sleeps.", 0), ("en", "A dog barks.", 1), ("de", "Die Katze schläft.", 0)]
    assert all(r["messages"] == CENTROID_PROMPT for r in rows) and len({r["prompt_id"] for r in rows}) == 3
    (tmp_path / "bom.txt").write_text("\ufeffThe cat sleeps.\n", encoding="utf-8")  # a BOM was kept in the passage
    assert centroid_text_rows({"en": str(tmp_path / "bom.txt")}).column("response").to_pylist() == ["The cat sleeps."]
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("Schläft".encode("latin-1"))
    (tmp_path / "invisible.txt").write_text("Katze.\n\u200b\u200b\n", encoding="utf-8")  # accepted as a passage
    (tmp_path / "nul.txt").write_text("\0\0\nKatze.\n", encoding="utf-8")
    for path, message in ((tmp_path / "none.txt", "not found"), (tmp_path / "empty.txt", "has no text"),
                          (tmp_path / "latin1.txt", "not valid UTF-8"),
                          (tmp_path / "invisible.txt", ":2: a line of only invisible characters"),
                          (tmp_path / "nul.txt", ":1: a line of only invisible characters")):
        with pytest.raises(ConfigError, match=f"rewards.latent.centroid_texts.sw: {path}.*{message}"):
            centroid_text_rows({"sw": str(path)})


def test_centroid_texts_recipe_keys(tmp_path):
    (tmp_path / "mono").mkdir()
    for lang in ("en", "de"):
        (tmp_path / "mono" / f"{lang}.txt").write_text("text\n", encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("languages: [en, de]\nrewards:\n  latent:\n    enabled: true\n    centroid_texts:\n"
                      "      en: mono/en.txt\n      de: mono/de.txt\n", encoding="utf-8")
    cfg = load_config(recipe)
    assert cfg.rewards.latent.centroid_texts == {"en": str(tmp_path / "mono" / "en.txt"),
                                                 "de": str(tmp_path / "mono" / "de.txt")}
    base = ["languages=[en,de]", "rewards.latent.enabled=true"]
    one = load_config(None, base + ["rewards.latent.centroid_texts.en=a", "rewards.latent.centroid_texts.de=b"])
    assert one.rewards.latent.centroid_texts == {"en": "a", "de": "b"}
    assert load_config(None, base).rewards.latent.centroid_texts is None
    with pytest.raises(ConfigError, match=r"needs one text file for each language .*missing de"):
        load_config(None, base + ["rewards.latent.centroid_texts.en=a"])
    with pytest.raises(ConfigError, match="centroid_mode must be language"):
        load_config(None, base + ["rewards.latent.centroid_texts.en=a", "rewards.latent.centroid_texts.de=b",
                                  "rewards.latent.centroid_mode=prompt"])
    with pytest.raises(ConfigError, match="centroid_texts: expected a mapping of language code to a string"):
        load_config(None, base + ["rewards.latent.centroid_texts=mono"])


def test_text_centroids_on_the_tiny_model_are_mean_pooled_response_states(tiny_model, tmp_path):
    from rayalign.engines import ScoreRequest
    from rayalign.engines.hf import HFEngine
    from rayalign.scoring.forward import forward_rows

    torch.set_num_threads(2)
    lines = {"en": ["The cat sleeps on the mat.", "It rains today."], "de": ["Die Katze schläft.", "Es regnet."]}
    for lang, text in lines.items():
        (tmp_path / f"{lang}.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    rows = centroid_text_rows({lang: str(tmp_path / f"{lang}.txt") for lang in lines})
    engine = HFEngine(tiny_model, dtype="float32", device="cpu", batch_size=4)
    centroids = centroids_from_table(forward_rows({"policy": engine}, rows, [centroid_spec(4)]))
    for lang, text in lines.items():
        # pooled one line at a time, with an empty user turn: the mean of the response states
        pooled = [engine.score([ScoreRequest([{"role": "user", "content": ""}], t)], [4])[0].pooled[4] for t in text]
        np.testing.assert_allclose(centroids[lang], np.mean(pooled, axis=0), rtol=0, atol=5e-3)  # float16 states
