"""Evaluation: metric rows against hand computations, then `rayalign eval`, the hub scan and `hub_layer: auto` on
the tiny model with real Ray actors."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from rayalign.eval.metrics import (candidate_rows, choose_hub_layer, distribution_rows, fidelity_rows,
                                   silhouette_pair_rows, silhouette_rows)
from conftest import REPO
from test_judge import serve  # noqa: F401  (fixture)

MC = REPO / "examples" / "data" / "mc"


def by_key(rows, *keys):
    return {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: r for r in rows}


def test_fidelity_per_language_and_overall():
    rows = by_key(fidelity_rows(["en", "en", "de", "de", "de"], ["en", "fr", "de", "de", "en"]), "lang")
    assert rows["en"]["value"] == 0.5 and rows["en"]["count"] == 2
    assert rows["de"]["value"] == pytest.approx(2 / 3) and rows["de"]["count"] == 3
    assert rows["all"]["value"] == pytest.approx((0.5 + 2 / 3) / 2) and rows["all"]["count"] == 5


def test_distribution_statistics_leave_out_nulls():
    rows = by_key(distribution_rows("r_icr", [1.0, 2.0, None, 3.0, 4.0, 10.0], ["en"] * 5 + ["de"]), "lang", "stat")
    en = {stat: rows[("en", stat)]["value"] for stat in ("mean", "std", "min", "p25", "p50", "p75", "max")}
    assert en == pytest.approx({"mean": 2.5, "std": math.sqrt(1.25), "min": 1.0, "p25": 1.75, "p50": 2.5,
                                "p75": 3.25, "max": 4.0})
    assert rows[("en", "mean")]["count"] == 4
    assert rows[("de", "std")]["value"] == 0.0 and rows[("all", "mean")]["value"] == pytest.approx(4.0)


def test_silhouette_rows_by_hand():
    # Two prompts, two unit vectors each; cosine distances: a1-a2 0.2, a1-b1 1, a1-b2 0.4, a2-b1 0.4, a2-b2 0.04,
    # b1-b2 0.2. s(a1) = (0.7 - 0.2) / 0.7, s(a2) = (0.22 - 0.2) / 0.22, and b1, b2 mirror a1, a2.
    close = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    apart = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # s = 1 for every point
    rows = silhouette_rows({3: close, 1: apart}, ["a", "a", "b", "b"])
    assert [r["layer"] for r in rows] == [1, 3] and all(r["count"] == 2 for r in rows)
    assert rows[0]["value"] == pytest.approx(1.0)
    assert rows[1]["value"] == pytest.approx((0.5 / 0.7 + 0.02 / 0.22) / 2)


def silhouette_by_hand(h, labels):
    """sklearn's definition with the full (N, N) cosine-distance matrix: s = (b - a) / max(a, b), 0 when alone."""
    unit = h / np.linalg.norm(h, axis=1, keepdims=True)
    distance = 1.0 - unit @ unit.T
    labels = np.asarray(labels)
    scores = []
    for i in range(len(h)):
        own = (labels == labels[i]) & (np.arange(len(h)) != i)
        if not own.any():
            scores.append(0.0)
            continue
        a = distance[i, own].mean()
        b = min(distance[i, labels == other].mean() for other in set(labels.tolist()) - {labels[i]})
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def test_silhouette_per_language_pair_against_a_full_distance_matrix():
    # Three prompts in en, de and sw: en and de states sit near their prompt's direction, sw states point
    # elsewhere, so en + de separates the prompts better than en + sw, and the pooled value lies between.
    rng = np.random.default_rng(0)
    directions = np.eye(6)[:3] * 4
    prompts = np.repeat(["p0", "p1", "p2"], 3)
    langs = np.tile(["en", "de", "sw"], 3)
    h = np.where((langs == "sw")[:, None], rng.normal(size=(9, 6)), directions[np.repeat([0, 1, 2], 3)]
                 + 0.3 * rng.normal(size=(9, 6)))
    pooled = {1: h, 2: h[:, ::-1] + 1.0}
    rows = by_key(silhouette_pair_rows(pooled, prompts, langs, "en"), "other_lang", "layer")
    assert set(rows) == {("de", 1), ("de", 2), ("sw", 1), ("sw", 2)}
    for (other, layer), r in rows.items():
        keep = np.isin(langs, ["en", other])
        assert r["lang"] == "en" and r["metric"] == "silhouette" and r["count"] == 3
        assert r["value"] == pytest.approx(silhouette_by_hand(pooled[layer][keep], prompts[keep]), abs=1e-12)
    pooled_value = silhouette_by_hand(h, prompts)
    assert rows[("de", 1)]["value"] > pooled_value > rows[("sw", 1)]["value"]
    # a pair with a single prompt is left out
    assert silhouette_pair_rows({1: h[:2]}, ["p0", "p0"], ["en", "de"], "en") == []


def test_hub_layer_is_the_argmax_between_embeddings_and_language_layer():
    # the embeddings (0) and the language layer (L) are excluded; a tie goes to the lower layer
    assert choose_hub_layer({0: 0.9, 1: 0.1, 2: 0.3, 3: 0.3, 4: 0.95}, num_layers=4) == 2
    assert choose_hub_layer({1: -0.2, 2: -0.1, 3: -0.3}, num_layers=4) == 2
    with pytest.raises(ValueError, match="layers 1..3"):
        choose_hub_layer({0: 0.1, 4: 0.2}, num_layers=4)


def candidates_frame(scores: dict, gold: dict, tokens: dict | None = None) -> pl.DataFrame:
    rows = []
    for (query, lang), logps in scores.items():
        for i, logp in enumerate(logps):
            rows.append({"prompt_id": query, "lang": lang, "candidate_idx": i, "gold": gold[query], "logp": logp,
                         "num_tokens": (tokens or {}).get((query, lang), [1] * len(logps))[i]})
    return pl.DataFrame(rows)


def test_rankc_and_accuracy_by_hand():
    # w_j = exp(C - j) / sum_k exp(C - k). C = 3: e^2, e, 1 over their sum; C = 2: e / (e + 1), 1 / (e + 1).
    w3 = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    w2 = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    scores = {("q1", "en"): [-1, -2, -3], ("q1", "de"): [-2, -1, -3],  # top-1 differs: P@1 0, P@2 1, P@3 1
              ("q2", "en"): [-3, -1, -2], ("q2", "de"): [-3, -1, -2],  # same ranking: consist 1
              ("q3", "en"): [-1, -2], ("q3", "de"): [-2, -1]}  # two candidates, swapped: P@1 0, P@2 1
    gold = {"q1": 0, "q2": 2, "q3": 0}
    rows = by_key(candidate_rows(candidates_frame(scores, gold), ["en", "de"], "en"), "metric", "lang", "other_lang")
    expected_rankc = ((w3[1] + w3[2]) + 1.0 + w2[1]) / 3
    assert rows[("rankc", "en", "de")]["value"] == pytest.approx(expected_rankc)
    assert rows[("rankc", "all", None)]["value"] == pytest.approx(expected_rankc)
    assert rows[("accuracy", "en", None)]["value"] == pytest.approx(2 / 3)  # q1 and q3 right, q2 wrong
    assert rows[("accuracy", "de", None)]["value"] == 0.0
    assert rows[("accuracy", "all", None)]["value"] == pytest.approx(1 / 3)


def test_clc_all_covers_every_two_languages_by_hand():
    # One query, three candidates. en and fr rank 0, 1, 2; de ranks 1, 0, 2: against it P@1 = 0, P@2 = P@3 = 1.
    w3 = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    swapped = w3[1] + w3[2]
    scores = {("q1", "en"): [-1, -2, -3], ("q1", "de"): [-2, -1, -3], ("q1", "fr"): [-1, -2, -3]}
    rows = by_key(candidate_rows(candidates_frame(scores, {"q1": 0}), ["en", "de", "fr"], "en"),
                  "metric", "lang", "other_lang")
    assert rows[("rankc", "en", "de")]["value"] == pytest.approx(swapped)
    assert rows[("rankc", "en", "fr")]["value"] == pytest.approx(1.0)
    assert rows[("rankc", "all", None)]["value"] == pytest.approx((swapped + 1.0) / 2)  # anchor pairs only
    assert rows[("clc_all", "de", "fr")]["value"] == pytest.approx(swapped)
    assert rows[("clc_all", "all", None)]["value"] == pytest.approx((swapped + 1.0 + swapped) / 3)
    assert rows[("clc_all", "all", None)]["count"] == 3
    assert [k for k in rows if k[0] == "clc_all"] == [("clc_all", "de", "fr"), ("clc_all", "all", None)]
    two = candidate_rows(candidates_frame({k: v for k, v in scores.items() if k[1] != "fr"}, {"q1": 0}),
                         ["en", "de"], "en")
    assert not [r for r in two if r["metric"] == "clc_all"]  # with one other language CLC_all is RankC


def test_mean_likelihood_divides_by_candidate_tokens():
    scores = {("q1", "en"): [-1.0, -2.0, -3.0], ("q1", "de"): [-1.0, -2.0, -3.0]}
    tokens = {("q1", "en"): [1, 4, 1], ("q1", "de"): [1, 1, 1]}  # en per token: -1, -0.5, -3 -> candidate 1 first
    frame = candidates_frame(scores, {"q1": 0}, tokens)
    summed = by_key(candidate_rows(frame, ["en", "de"], "en", "sum"), "metric", "lang")
    mean = by_key(candidate_rows(frame, ["en", "de"], "en", "mean"), "metric", "lang")
    assert summed[("accuracy", "en")]["value"] == 1.0 and summed[("rankc", "en")]["value"] == pytest.approx(1.0)
    assert mean[("accuracy", "en")]["value"] == 0.0
    w3 = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    assert mean[("rankc", "en")]["value"] == pytest.approx(w3[1] + w3[2])
    with pytest.raises(ValueError, match="sum, mean, sequence_mean"):
        candidate_rows(frame, ["en", "de"], "en", "max")


def test_sequence_mean_and_continuation_accuracy_by_hand():
    # One query, three candidates; both languages' templated question: 5 tokens, log-prob -0.4 over tokens 1..4.
    #            logp (candidate + eot)  tokens  eot logp | sum    mean    sequence_mean         continuation
    # en cand 0: -6.0                    3       -4.0     | -6.0   -2.0    -6.4 / 7  = -0.914    -2.0
    # en cand 1: -5.0                    6       -0.5     | -5.0   -0.833  -5.4 / 10 = -0.540    -4.5
    # en cand 2: -9.0                    12      -0.2     | -9.0   -0.75   -9.4 / 16 = -0.5875   -8.8
    # de cand 1: -5.6 instead            6       -0.5     |                -6.0 / 10 = -0.600
    # Top: sum 1, mean 2, sequence_mean en 1 (de 2), continuation 0 = the gold answer.
    rows = []
    for lang, logps in (("en", [-6.0, -5.0, -9.0]), ("de", [-6.0, -5.6, -9.0])):
        for i, (logp, tokens, eot) in enumerate(zip(logps, [3, 6, 12], [-4.0, -0.5, -0.2])):
            rows.append({"prompt_id": "q1", "lang": lang, "candidate_idx": i, "gold": 0, "logp": logp,
                         "num_tokens": tokens, "logp_end_of_turn": eot, "logp_prompt": -0.4, "prompt_tokens": 5})
    frame = pl.DataFrame(rows)
    w3 = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    sequence = by_key(candidate_rows(frame, ["en", "de"], "en", "sequence_mean"), "metric", "lang")
    # en ranks 1, 2, 0 and de 2, 1, 0: P@1 = 0, P@2 = P@3 = 1
    assert sequence[("rankc", "en")]["value"] == pytest.approx(w3[1] + w3[2])
    assert sequence[("accuracy", "en")]["value"] == 0.0
    mean = by_key(candidate_rows(frame, ["en", "de"], "en", "mean"), "metric", "lang")  # both rank 2, 1, 0
    assert mean[("rankc", "en")]["value"] == pytest.approx(1.0)
    for likelihood in ("sum", "mean", "sequence_mean"):
        continuation = by_key(candidate_rows(frame, ["en", "de"], "en", likelihood, accuracy="continuation"),
                              "metric", "lang")
        assert continuation[("accuracy", "en")]["value"] == 1.0 and continuation[("accuracy", "de")]["value"] == 1.0
        plain = by_key(candidate_rows(frame, ["en", "de"], "en", likelihood), "metric", "lang")
        assert plain[("accuracy", "en")]["value"] == 0.0
        assert continuation[("rankc", "en")]["value"] == plain[("rankc", "en")]["value"]  # RankC keeps --likelihood
    with pytest.raises(ValueError, match="likelihood, continuation"):
        candidate_rows(frame, ["en", "de"], "en", accuracy="best")


# ---- on the tiny model, with Ray ----

LANGS = "[en,es,de]"


def eval_args(tiny_model, run_dir, *extra):
    return ["eval", str(REPO / "examples" / "quickstart.yaml"), "--run-dir", str(run_dir), "--prompts", "4",
            "--samples", "2", "--candidates", str(MC), "-o", f"policy.path={tiny_model}", "-o", f"languages={LANGS}",
            "-o", "engines.count=1", "-o", "rewards.actors=1", "-o", "sampling.max_new_tokens=16", *extra]


@pytest.fixture(scope="module")
def evaluated(tiny_model, ray_session, tmp_path_factory):
    from rayalign.cli import main

    run_dir = tmp_path_factory.mktemp("eval-run")
    result = CliRunner().invoke(main, eval_args(tiny_model, run_dir), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return run_dir / "eval" / "initial", result.output


def test_eval_writes_results_that_match_its_own_datasets(evaluated):
    from rayalign.data.store import read_dataset

    from rayalign.eval.confusion import confusion_metrics

    out, printed = evaluated
    results = pl.from_arrow(read_dataset(out / "results", "eval"))
    samples = pl.from_arrow(read_dataset(out / "samples", "samples").select(["lang", "lang_detected", "num_tokens",
                                                                              "response"]))
    scores = pl.from_arrow(read_dataset(out / "scores", "scores").select(["lang", "r_lacomsa"]))
    assert samples.height == 4 * 3 * 2 and scores.height == samples.height

    def value(metric, stat, lang):
        return results.filter((pl.col("metric") == metric) & (pl.col("stat") == stat) & (pl.col("lang") == lang))[
            "value"].item()

    for lang in ("en", "es", "de"):
        mine = samples.filter(pl.col("lang") == lang)
        assert value("fidelity", "share", lang) == pytest.approx((mine["lang"] == mine["lang_detected"]).mean())
        assert value("response_tokens", "mean", lang) == pytest.approx(mine["num_tokens"].mean())
        confusion = confusion_metrics(mine["response"].to_list(), lang)  # worked by hand in test_confusion
        assert value("lpr", "share", lang) == confusion["lpr"] and value("lcpr", "share", lang) == confusion["lcpr"]
        rewards = scores.filter(pl.col("lang") == lang)["r_lacomsa"].to_numpy()
        assert value("r_lacomsa", "mean", lang) == pytest.approx(rewards.mean())
        assert value("r_lacomsa", "p75", lang) == pytest.approx(np.percentile(rewards, 75))
    layers = results.filter((pl.col("metric") == "silhouette") & (pl.col("lang") == "all")).sort("layer")
    assert layers["layer"].to_list() == [0, 1, 2, 3, 4]  # every hidden_states index of the 4-layer model
    assert set(layers["count"]) == {4}  # values: test_eval_silhouette_matches_pooled_states_computed_directly
    per_pair = results.filter((pl.col("metric") == "silhouette") & (pl.col("lang") == "en"))
    assert sorted(set(per_pair["other_lang"])) == ["de", "es"] and per_pair.height == 10  # en + x, every layer
    pairs = results.filter(pl.col("metric") == "rankc")
    assert sorted(zip(pairs["lang"], pairs["other_lang"].fill_null("-"))) == [("all", "-"), ("en", "de"), ("en", "es")]
    clc = results.filter(pl.col("metric") == "clc_all")
    assert sorted(zip(clc["lang"], clc["other_lang"].fill_null("-"))) == [("all", "-"), ("es", "de")]
    assert "eval of" in printed and "silhouette by layer" in printed and "lcpr" in printed


def test_eval_accuracy_matches_direct_engine_scores(evaluated, tiny_model):
    from rayalign.data.prompts import load_candidate_sets
    from rayalign.data.store import read_dataset
    from rayalign.engines import ScoreRequest
    from rayalign.engines.hf import HFEngine

    out, _ = evaluated
    results = pl.from_arrow(read_dataset(out / "results", "eval")).filter(pl.col("metric") == "accuracy")
    cands = load_candidate_sets(MC, ["en", "es", "de"]).to_pylist()
    engine = HFEngine(tiny_model, dtype="float32", device="cpu", batch_size=64)
    logps = [r.logp for r in engine.score([ScoreRequest(c["messages"], c["candidate"]) for c in cands])]
    for lang in ("en", "es", "de"):
        per_query: dict[str, list] = {}
        for c, logp in zip(cands, logps):
            if c["lang"] == lang:
                per_query.setdefault(c["prompt_id"], []).append((logp, c["candidate_idx"], c["gold"]))
        correct = [max(v, key=lambda t: (t[0], -t[1]))[1] == v[0][2] for v in per_query.values()]
        assert results.filter(pl.col("lang") == lang)["value"].item() == pytest.approx(np.mean(correct))


def test_eval_rerun_keeps_results_and_bad_options_are_named(evaluated, tiny_model, tmp_path):
    from rayalign.cli import main

    out, _ = evaluated
    before = (out / "results" / "manifest.json").read_text()
    rerun = CliRunner().invoke(main, eval_args(tiny_model, out.parent.parent), catch_exceptions=False)
    assert rerun.exit_code == 0 and "finished earlier, kept" in rerun.output
    assert (out / "results" / "manifest.json").read_text() == before
    beyond = CliRunner().invoke(main, eval_args(tiny_model, out.parent.parent, "-o", "rewards.latent.hub_layer=9",
                                                "--out", str(out.parent / "beyond")))
    assert beyond.exit_code == 2 and "beyond the model's 4 layers" in beyond.output
    assert not (out.parent / "beyond").exists()  # refused before generating
    missing = CliRunner().invoke(main, eval_args(tiny_model, out.parent.parent, "--policy", "iter-3"))
    assert missing.exit_code == 2 and "iter-3" in missing.output and "no checkpoint" in missing.output
    for lang in ("en", "es", "de"):  # prompts without reference answers
        (tmp_path / f"{lang}.jsonl").write_text("".join(json.dumps({"instruction_id": f"p{i}", "instruction": "Hi?"})
                                                        + "\n" for i in range(3)))
    no_refs = CliRunner().invoke(main, eval_args(tiny_model, out.parent.parent, "--judge-url", "http://127.0.0.1:9/v1",
                                                 "--judge-model", "j", "-o", f"prompts.path={tmp_path}",
                                                 "--out", str(tmp_path / "out")))
    assert no_refs.exit_code == 2 and "reference answers" in no_refs.output and "p0" in no_refs.output
    assert not (tmp_path / "out").exists()


def test_eval_with_other_settings_recomputes_and_keeps_the_old_results_aside(evaluated, tiny_model):
    from rayalign.cli import main
    from rayalign.data.store import read_dataset

    out, _ = evaluated
    samples_manifest = (out / "samples" / "manifest.json").read_text()
    again = CliRunner().invoke(main, eval_args(tiny_model, out.parent.parent, "--likelihood", "mean",
                                               "--silhouette-prompts", "0"), catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert (out / "samples" / "manifest.json").read_text() == samples_manifest  # same samples: kept
    stale = list(out.glob("results.stale-*"))
    assert len(stale) == 1 and read_dataset(stale[0], "eval").num_rows > 0
    results = pl.from_arrow(read_dataset(out / "results", "eval"))
    assert results.filter(pl.col("metric") == "silhouette").height == 0
    assert results.filter(pl.col("metric") == "rankc").height == 3
    stale[0].rename(out / "results.old")  # the other tests read the first evaluation
    (out / "results").rename(out / "results.mean")
    (out / "results.old").rename(out / "results")


def test_eval_silhouette_matches_pooled_states_computed_directly(evaluated, tiny_model):
    from rayalign.config import load_config
    from rayalign.data.store import read_dataset
    from rayalign.engines import ScoreRequest
    from rayalign.engines.hf import HFEngine
    from rayalign.scoring.hub_scan import hub_scan

    out, _ = evaluated
    samples = read_dataset(out / "samples", "samples").to_pylist()
    engine = HFEngine(tiny_model, dtype="float32", device="cpu")
    direct = engine.score([ScoreRequest(r["messages"], r["response"]) for r in samples], list(range(5)))
    prompt_ids = [r["prompt_id"] for r in samples]
    rows = pl.from_arrow(read_dataset(out / "results", "eval")).filter(pl.col("metric") == "silhouette")
    langs = np.array([r["lang"] for r in samples])
    for layer, value, other in zip(rows["layer"], rows["value"], rows["other_lang"]):
        keep = np.ones(len(samples), bool) if other is None else np.isin(langs, ["en", other])
        expected = silhouette_by_hand(np.stack([d.pooled[layer] for d in direct])[keep].astype(np.float64),
                                      np.asarray(prompt_ids)[keep])
        assert value == pytest.approx(expected, abs=2e-3)  # the scan keeps float16 states

    cfg = load_config(REPO / "examples" / "quickstart.yaml", [f"policy.path={tiny_model}", f"languages={LANGS}",
                                                             "rewards.actors=1"])
    result = hub_scan(cfg, tiny_model, "tiny", read_dataset(out / "samples", "samples"), max_prompts=3)
    assert result["prompts"] == 3 and result["samples"] == 3 * 3 * 2
    silhouette = {int(k): v for k, v in result["silhouette"].items()}
    assert sorted(silhouette) == [0, 1, 2, 3, 4]
    assert result["hub_layer"] == max((1, 2, 3), key=lambda k: (silhouette[k], -k))


def test_launch_with_hub_layer_auto_scores_at_the_scanned_layer(tiny_model, ray_session, tmp_path):
    from rayalign.config import load_config
    from rayalign.data.store import read_dataset, read_manifest
    from rayalign.engines import ScoreRequest
    from rayalign.engines.hf import HFEngine
    from rayalign.pipelines import offline
    from rayalign.scoring.forward import latent_matrix

    cfg = load_config(REPO / "examples" / "quickstart.yaml", [
        f"policy.path={tiny_model}", f"languages={LANGS}", "prompts.limit=4", "sampling.n=2", "iterations=1",
        "sampling.max_new_tokens=12", "engines.count=1", "rewards.actors=1", "rewards.latent.hub_layer=auto",
        "rewards.latent.hub_scan_prompts=3", "training.loss=null"])
    run_dir = offline.run(cfg, tmp_path / "run")
    scan = json.loads((run_dir / "hub-scan.json").read_text())
    silhouette = {int(k): v for k, v in scan["silhouette"].items()}
    assert scan["hub_layer"] == max((1, 2, 3), key=lambda k: (silhouette[k], -k)) and scan["prompts"] == 3
    manifest = read_manifest(run_dir / "iter-1" / "scores")
    assert manifest["params"]["layers"] == {"h_hub": scan["hub_layer"], "h_last": 4}
    scores = read_dataset(run_dir / "iter-1" / "scores", "scores").slice(0, 3).to_pylist()
    engine = HFEngine(tiny_model, dtype="float32", device="cpu")
    direct = engine.score([ScoreRequest(r["messages"], r["response"]) for r in scores], [scan["hub_layer"]])
    stored = latent_matrix(read_dataset(run_dir / "iter-1" / "scores", "scores").column("h_hub").slice(0, 3))
    np.testing.assert_allclose(stored, np.stack([d.pooled[scan["hub_layer"]] for d in direct]), atol=2e-3, rtol=2e-3)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["hub_layer"] for r in records if r["stage"] == "hub-scan"] == [scan["hub_layer"]]
    def scans():
        return [json.loads(x)["stage"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()].count("hub-scan")

    offline.run(cfg, run_dir)  # resumed: the scan is not redone
    assert scans() == 1
    offline.run(cfg, run_dir, redo=("score",))  # the scan precedes scoring: redone, the old one in the trash
    assert scans() == 2 and len(list(run_dir.glob("trash-*/hub-scan.json"))) == 1
    assert json.loads((run_dir / "hub-scan.json").read_text())["hub_layer"] == scan["hub_layer"]


def test_judge_win_rate_of_eval_samples_against_references(evaluated, serve):  # noqa: F811 (the fixture)
    from rayalign.data.store import read_dataset
    from rayalign.eval.judge import JudgeSettings
    from rayalign.pipelines.evaluate import judge_metrics
    from test_judge import ANSWER, chat_reply

    def prefers_longer(request):
        a, b = (len(text) for _, text in sorted(ANSWER.findall(request["messages"][-1]["content"])))
        return chat_reply("[[A]]" if a > b else "[[B]]" if b > a else "[[C]]")

    url, calls = serve(prefers_longer)
    samples = read_dataset(evaluated[0] / "samples", "samples")
    rows = by_key(judge_metrics(samples, JudgeSettings(url=url, model="judge", backoff_s=0.01)), "metric", "lang")
    first = [r for r in samples.to_pylist() if r["sample_idx"] == 0]
    assert len(calls) == 2 * len(first)  # each item judged in both orders
    rates = []
    for lang in ("en", "es", "de"):
        wins = [np.sign(len(r["response"]) - len(r["reference"])) / 2 + 0.5 for r in first if r["lang"] == lang]
        rates.append(np.mean(wins))
        assert rows[("judge_win_rate", lang)]["value"] == pytest.approx(rates[-1])
        assert rows[("judge_win_rate", lang)]["count"] == len(wins)
    # "all" as every metric's: the mean of the languages (it was pooled over items)
    assert rows[("judge_win_rate", "all")]["value"] == pytest.approx(np.mean(rates))
    assert rows[("judge_win_rate", "all")]["count"] == len(first)
    assert (rows[("judge_invalid", "all")]["value"], rows[("judge_invalid", "all")]["count"]) == (0.0, 0)


def test_eval_outside_the_repository_skips_the_default_candidates_and_refuses_bad_options_before_ray(
        tiny_model, tmp_path, monkeypatch):
    """From another directory the default candidate set (examples/data/mc, relative to the repository root) is not
    there: eval says so and skips RankC instead of failing; a bad option is refused before Ray starts."""
    import ray

    from rayalign.cli import main
    from rayalign.config import load_config
    from rayalign.pipelines.evaluate import eval_setup

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: away\npolicy: {{path: {tiny_model}}}\nprompts: {{path: {REPO / 'examples/data/prompts'}, "
                      "limit: 2}\nrewards: {latent: {enabled: true}}\n")
    monkeypatch.chdir(tmp_path)
    notes = []
    _, settings, _ = eval_setup(load_config(recipe), tiny_model, "initial", say=notes.append)
    assert settings["candidates_path"] is None
    assert notes == ["eval: no candidate set at examples/data/mc (the default, relative to the current directory): "
                     "RankC and accuracy skipped; pass --candidates DIR to compute them"]
    was_running = ray.is_initialized()
    result = CliRunner().invoke(main, ["eval", str(recipe), "--policy", "initial", "--samples", "1"])
    assert result.exit_code == 2 and "latent rewards need at least 2 samples per prompt, got 1" in result.output
    assert ray.is_initialized() == was_running  # refused before connecting


def test_eval_out_in_a_run_or_an_empty_candidate_set_is_refused_before_ray(tiny_model, tmp_path):
    """--out RUN/iter-1 replaced the run's samples and overwrote its scores; an empty candidate set failed with a
    pyarrow traceback after generation and scoring."""
    from rayalign.cli import main

    run_dir = tmp_path / "run"
    (run_dir / "iter-1" / "samples").mkdir(parents=True)
    (run_dir / "state.json").write_text(json.dumps({"config_hash": "0" * 16, "finished": ["iter-1/generate"]}))
    for out, said in ((run_dir / "iter-1", f"part of the run {run_dir}"), (run_dir, "a run directory")):
        result = CliRunner().invoke(main, eval_args(tiny_model, tmp_path / "other", "--out", str(out)))
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert sorted(p.name for p in (run_dir / "iter-1").iterdir()) == ["samples"]
    empty = tmp_path / "mc"
    empty.mkdir()
    for lang in ("en", "es", "de"):
        (empty / f"{lang}.jsonl").write_text("")
    result = CliRunner().invoke(main, eval_args(tiny_model, tmp_path / "other", "--candidates", str(empty)))
    assert result.exit_code == 2 and f"{empty}: no questions in en.jsonl, es.jsonl, de.jsonl" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "other").exists()


def test_kept_eval_outputs_are_verified_and_partial_ones_carry_their_settings(evaluated, tmp_path):
    """A damaged kept dataset was 'finished earlier, kept' and then failed its checksum on every rerun; the shards of
    an interrupted eval were resumed under other settings (a changed temperature kept the old responses)."""
    import shutil

    from rayalign.data.store import read_manifest
    from rayalign.pipelines.evaluate import key_file, kept

    out, _ = evaluated
    results = tmp_path / "results"
    shutil.copytree(out / "results", results)
    key = read_manifest(results)["params"]["eval_key"]
    assert kept(results, key)
    shard = results / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert not kept(results, key) and not results.exists() and len(list(tmp_path.glob("results.stale-*"))) == 1
    samples = tmp_path / "samples"
    shutil.copytree(out / "samples", samples)
    (samples / "manifest.json").unlink()  # as interrupted: shards, no manifest
    key_file(samples).write_text("k1")
    assert not kept(samples, "k1") and samples.is_dir()  # the same settings: its shards are resumed
    assert not kept(samples, "k2") and not samples.exists()  # other settings: set aside with its key file
    assert [p.read_text() for p in tmp_path.glob("samples.stale-*.eval_key")] == ["k1"]


def test_an_edited_candidate_set_is_evaluated_again(tiny_model, tmp_path):
    import shutil

    from rayalign.config import load_config
    from rayalign.pipelines.evaluate import eval_setup

    cfg = load_config(REPO / "examples" / "quickstart.yaml", [f"policy.path={tiny_model}", f"languages={LANGS}"])
    shutil.copytree(MC, tmp_path / "mc")
    before = eval_setup(cfg, tiny_model, "initial", candidates_path=str(tmp_path / "mc"), say=lambda _: None)[2]
    lines = (tmp_path / "mc" / "en.jsonl").read_text().splitlines()
    (tmp_path / "mc" / "en.jsonl").write_text("\n".join([lines[0].replace('"question": "', '"question": "Q: ')]
                                                         + lines[1:]) + "\n")
    after = eval_setup(cfg, tiny_model, "initial", candidates_path=str(tmp_path / "mc"), say=lambda _: None)[2]
    assert before != after


def test_the_summary_keeps_whole_numbers_where_the_terminal_is_narrow(monkeypatch):
    """Piped (80 columns) with ten metrics, cells read '0.8…' and headers 'ran…'."""
    import pyarrow as pa

    from rayalign.pipelines.evaluate import print_summary
    from rayalign.progress import console

    monkeypatch.setattr(console, "width", 60)
    rows = [{"policy": "p", "metric": m, "stat": "mean" if m.startswith(("r_", "response")) else "share",
             "lang": lang, "other_lang": None, "value": 0.123456, "layer": None}
            for m in ("fidelity", "lpr", "wpr", "lcpr", "response_tokens", "r_lacomsa", "r_msa", "r_icr", "accuracy",
                      "judge_win_rate") for lang in ("en", "es", "all")]
    with console.capture() as captured:
        print_summary(pa.Table.from_pylist(rows), ["en", "es"], "en")
    text = captured.get()
    assert "…" not in text and "r_lacomsa" in text and text.count("0.123") == 30 and console.width == 60


def test_validate_and_inspect_of_a_run_cover_its_evaluations(evaluated, tmp_path):
    """`rayalign validate RUN` printed only ok lines over a damaged eval/<label>/results."""
    import shutil

    from rayalign.cli import main

    out, _ = evaluated
    run_dir = tmp_path / "run"
    shutil.copytree(out.parent.parent, run_dir, ignore=shutil.ignore_patterns("*.stale-*", "results.mean"))
    ok = CliRunner().invoke(main, ["validate", str(run_dir)])
    joined = "".join(ok.output.split())  # paths wrapped at the terminal width
    assert ok.exit_code == 0 and all(f"eval/initial/{d}" in joined for d in ("samples", "scores", "results"))
    shard = run_dir / "eval" / "initial" / "results" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    bad = CliRunner().invoke(main, ["validate", str(run_dir)])
    assert bad.exit_code != 0 and "FAILED" in bad.output and "results/part-00000.parquet" in "".join(bad.output.split())
