"""Scoring, rewards and pairs end to end on the tiny models and the session's Ray instance."""

import json
import math
import re

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner

from conftest import PROMPTS_DIR, REPO
from rayalign.cli import main
from rayalign.config import ConfigError, load_config
from rayalign.data.store import read_dataset, read_manifest
from rayalign.pairs import preference_pairs
from rayalign.rewards.latent import latent_rewards
from rayalign.scoring.rewards import RewardError, check_finite, cross_lingual_messages

USER_REWARD = '''
def reward(group):
    """Longer answers in the prompt's language score higher."""
    return [len(s["response"]) / 100 + (1.0 if s["lang_detected"] == s["lang"] else 0.0) for s in group]
'''


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_lacomsa_weight_changes_the_chosen_pair():
    # 2-d states. English: hub (1, 0) twice, last (0, 1) twice. German A: hub (1, 0.1) close to English,
    # but last (0, 1) looks English; German B: hub (1, 1), last (1, 0) looks German.
    hub = np.array([[1, 0], [1, 0], [1, 0.1], [1, 1]], dtype=float)
    last = np.array([[0, 1], [0, 1], [0, 1], [1, 0]], dtype=float)
    out = latent_rewards(np.array(["p"] * 4), np.array(["en", "en", "de", "de"]), hub, last, anchor="en")
    r_a, r_b = 1 / math.sqrt(1.01), 1 / math.sqrt(2)  # cos to (1, 0)
    # German centroid (0.5, 0.5), English centroid (0, 1): phi_A = cos45 - 1, phi_B = cos45 - 0
    phi_a, phi_b = math.sqrt(0.5) - 1, math.sqrt(0.5)
    w_a, w_b = sigmoid(0.5 * (phi_a - r_a)), sigmoid(0.5 * (phi_b - r_b))
    np.testing.assert_allclose(out["r_msa"], [1, 1, r_a, r_b], atol=1e-12)
    np.testing.assert_allclose(out["phi"], [0, 0, phi_a, phi_b], atol=1e-12)
    np.testing.assert_allclose(out["w"], [1, 1, w_a, w_b], atol=1e-12)
    np.testing.assert_allclose(out["r_lacomsa"], [1, 1, w_a * r_a, w_b * r_b], atol=1e-12)
    frame = pl.DataFrame({
        "prompt_id": ["p", "p"], "lang": ["de", "de"], "sample_idx": [0, 1],
        "messages": [[{"role": "user", "content": "x"}]] * 2, "response": ["A", "B"],
        "r_msa": out["r_msa"][2:], "r_lacomsa": out["r_lacomsa"][2:], "logp_policy": [-1.0, -2.0],
        "score_tokens": [3, 4], "finish_reason": ["stop", "stop"]})
    assert preference_pairs(frame, "lacomsa", 1).to_pylist()[0]["chosen"][0]["content"] == "B"
    assert preference_pairs(frame, "msa", 1).to_pylist()[0]["chosen"][0]["content"] == "A"  # the released ranking


def test_cross_lingual_prompt_uses_the_anchor_instruction():
    table = pa.table({"prompt_id": ["a", "a"], "lang": ["en", "de"],
                      "messages": [[{"role": "system", "content": "S"}, {"role": "user", "content": "Hello?"}],
                                   [{"role": "system", "content": "S"}, {"role": "user", "content": "Hallo?"}]]})
    en, de = cross_lingual_messages(table, "en")
    assert en == [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello?"}]
    assert de[1]["content"] == ("Please answer the following instruction using only German, unless explicitly "
                                "instructed to respond in a different language.\n\nHello?")


def test_non_finite_rewards_are_refused():
    table = pa.table({"prompt_id": ["a", "b"], "lang": ["en", "de"], "sample_idx": [0, 3],
                      "logp_policy": [-1.0, -2.0], "r_icr": [0.5, float("nan")]})
    with pytest.raises(RewardError, match=r"r_icr is nan for prompt_id 'b' \(de\) sample 3"):
        check_finite(table)


def test_reward_dependencies_and_gamma_checks_in_config():
    with pytest.raises(ConfigError, match="pairs.method: icr needs rewards.implicit.enabled"):
        load_config(None, ["pairs.method=icr"])
    with pytest.raises(ConfigError, match="rewards.implicit.reward_reference: required"):
        load_config(None, ["rewards.implicit.enabled=true"])
    with pytest.raises(ConfigError, match="sampling.n: latent rewards .* n must be >= 2"):
        load_config(None, ["rewards.latent.enabled=true", "sampling.n=1"])
    with pytest.raises(ConfigError, match="rewards.consistency: gammas break the consistency guarantee"):
        load_config(None, ["rewards.consistency.enabled=true", "rewards.consistency.gamma_from_anchor=10"])
    load_config(None, ["rewards.consistency.enabled=true", "rewards.consistency.gamma_from_anchor=10",
                       "rewards.consistency.force=true"])
    load_config(None, ["rewards.consistency.enabled=true", "rewards.consistency.gamma_from_anchor=10",
                       "rewards.consistency.gamma_to_anchor=0.1"])
    # gamma_between is trained only with language_pairs: all (10 x 0.1 = beta^2 = 1 per anchor pair; between two
    # other languages Lemma 3 asks gamma_xy = gamma_{x,en} gamma_{en,y} / beta = 1)
    anchor_stable = ["rewards.consistency.enabled=true", "rewards.consistency.gamma_from_anchor=10",
                     "rewards.consistency.gamma_to_anchor=0.1", "rewards.consistency.gamma_between=2"]
    load_config(None, anchor_stable)
    with pytest.raises(ConfigError, match="rewards.consistency: gammas break the consistency guarantee"):
        load_config(None, anchor_stable + ["rewards.consistency.language_pairs=all"])
    with pytest.raises(ConfigError, match="rewards.consistency: gammas break the consistency guarantee"):
        load_config(None, ["rewards.consistency.enabled=true", "rewards.consistency.gamma_from_anchor=10",
                           "rewards.consistency.gamma_to_anchor=0.2"])
    # one language: no pair to check (the anchor alone was a StopIteration)
    assert load_config(None, ["rewards.consistency.enabled=true", "languages=[en]"]).languages == ["en"]


@pytest.fixture(scope="module")
def weak_model(tmp_path_factory):
    from rayalign.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("weak"), PROMPTS_DIR, train_steps=8))


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model):
    from rayalign.models import build_reward_model_from

    return str(build_reward_model_from(tiny_model, tmp_path_factory.mktemp("rm")))


@pytest.fixture(scope="module")
def rewards_run(tmp_path_factory, tiny_model, weak_model, reward_model, ray_session):
    tmp = tmp_path_factory.mktemp("rewards")
    (tmp / "my_reward.py").write_text(USER_REWARD)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"""
name: rewards
languages: [en, de, ru]
policy: {{path: {tiny_model}}}
prompts: {{path: {PROMPTS_DIR}, limit: 4}}
sampling: {{n: 3, max_new_tokens: 12, seed: 5}}
engines: {{count: 1, batch_size: 8, shard_rows: 4}}
rewards:
  latent: {{enabled: true}}
  implicit: {{enabled: true, reward_reference: {{path: {weak_model}}}}}
  reward_model: {{enabled: true, model: {{path: {reward_model}}}}}
  user: {{path: my_reward.py}}
  actors: 2
  batch_size: 8
pairs: {{method: lacomsa, truncated: keep}}  # the tiny model's 12-token answers are mostly cut
""")
    run_dir = tmp / "run"
    result = CliRunner().invoke(main, ["launch", str(recipe), "--run-dir", str(run_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return recipe, run_dir


def test_scores_hold_every_quantity(rewards_run, tiny_model):
    _, run_dir = rewards_run
    scores = read_dataset(run_dir / "iter-1" / "scores", "scores")
    assert scores.num_rows == 4 * 3 * 3
    for column in ("logp_policy", "logp_policy_icr", "logp_reward_ref", "r_msa", "phi", "w", "r_lacomsa", "r_icr",
                   "r_rm", "r_user", "h_hub", "h_last"):
        assert scores.column(column).null_count == 0, column
    assert scores.schema.field("h_hub").type == pa.list_(pa.float16(), 128)
    manifest = read_manifest(run_dir / "iter-1" / "scores")
    assert manifest["params"]["layers"] == {"h_hub": 1, "h_last": 4}  # hub (L - 1) // 2 as the released code
    assert set(manifest["models"]) == {"policy", "reward_reference", "reward_model"}
    df = pl.from_arrow(scores.drop_columns(["h_hub", "h_last"]))
    alphas = manifest["params"]["icr"]["alpha_per_language"]
    expected = (df["logp_policy_icr"] - df["logp_reward_ref"]).to_numpy() - np.array(
        [alphas[lang] for lang in df["lang"]]) * df["response"].str.len_chars().to_numpy()
    np.testing.assert_allclose(df["r_icr"].to_numpy(), expected, atol=1e-9)
    user = [len(r) / 100 + (1.0 if d == l else 0.0) for r, d, l in df.select("response", "lang_detected", "lang").rows()]
    np.testing.assert_allclose(df["r_user"].to_numpy(), user)
    # G(x) differs from the native prompt for non-English rows only
    en = df.filter(pl.col("lang") == "en")
    np.testing.assert_allclose(en["logp_policy_icr"].to_numpy(), en["logp_policy"].to_numpy(), atol=1e-9)
    assert (df.filter(pl.col("lang") != "en").select((pl.col("logp_policy_icr") - pl.col("logp_policy")).abs().min())
            .item() > 0)


def test_scores_match_the_engines_called_directly(rewards_run, tiny_model, reward_model):
    from rayalign.engines import ScoreRequest
    from rayalign.engines.hf import HFEngine
    from rayalign.engines.reward_model import RewardModelEngine

    _, run_dir = rewards_run
    rows = read_dataset(run_dir / "iter-1" / "scores").slice(0, 5).to_pylist()
    direct = HFEngine(tiny_model).score([ScoreRequest(r["messages"], r["response"]) for r in rows], [2, 4])
    for r, d in zip(rows, direct):
        assert abs(r["logp_policy"] - d.logp) < 1e-4 and r["score_tokens"] == d.num_tokens
        np.testing.assert_allclose(np.asarray(r["h_last"], dtype=np.float32), d.pooled[4].astype(np.float16), atol=1e-3)
    rm = RewardModelEngine(reward_model).score([r["messages"] for r in rows], [r["response"] for r in rows])
    np.testing.assert_allclose([r["r_rm"] for r in rows], rm, atol=1e-5)


def test_pairs_are_trl_style_and_carry_reference_logps(rewards_run):
    datasets = pytest.importorskip("datasets")
    _, run_dir = rewards_run
    ds = datasets.load_dataset("parquet", data_files=str(run_dir / "iter-1" / "pairs" / "*.parquet"), split="train")
    assert ds.num_rows > 0
    row = ds[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"] == [{"role": "assistant", "content": row["chosen"][0]["content"]}]
    assert row["rejected"][0]["role"] == "assistant" and row["score_chosen"] > row["score_rejected"]
    scores = pl.from_arrow(read_dataset(run_dir / "iter-1" / "scores").drop_columns(["h_hub", "h_last"]))
    for p in ds.select(range(min(5, ds.num_rows))):
        chosen = scores.filter((pl.col("prompt_id") == p["prompt_id"]) & (pl.col("lang") == p["lang"])
                               & (pl.col("response") == p["chosen"][0]["content"]))
        assert chosen["logp_policy"][0] == p["ref_logp_chosen"]
        assert chosen["r_lacomsa"][0] == p["score_chosen"]
        grp = scores.filter((pl.col("prompt_id") == p["prompt_id"]) & (pl.col("lang") == p["lang"]))
        assert p["score_chosen"] == grp["r_lacomsa"].max() and p["score_rejected"] == grp["r_lacomsa"].min()


def test_rescore_reproduces_and_changes_latent_rewards(rewards_run, tmp_path):
    recipe, run_dir = rewards_run
    scores = run_dir / "iter-1" / "scores"
    same, other = tmp_path / "same", tmp_path / "other"
    runner = CliRunner()
    assert runner.invoke(main, ["rescore", str(scores), "--output", str(same)]).exit_code == 0
    result = runner.invoke(main, ["rescore", str(scores), "--output", str(other), "-o", "rewards.latent.alpha=3.0",
                                  "-o", "rewards.latent.centroid_mode=prompt", "-o", "rewards.implicit.alpha=0.0"])
    assert result.exit_code == 0, result.output
    base, a, b = (read_dataset(p).drop_columns(["h_hub", "h_last"]) for p in (scores, same, other))
    for col in ("r_msa", "phi", "w", "r_lacomsa", "r_icr", "r_rm", "r_user"):
        assert a.column(col).to_pylist() == base.column(col).to_pylist(), col
    assert b.column("r_msa").to_pylist() == base.column("r_msa").to_pylist()
    assert b.column("w").to_pylist() != base.column("w").to_pylist()
    # LaCoMSA eq. 2-4 by hand from the stored final-layer states, centroids per prompt: phi = cos(h, c_lang) -
    # cos(h, c_en), w = sigma(3 (phi - r_msa)) outside English, r_lacomsa = w r_msa
    states = pl.from_arrow(read_dataset(scores).select(["prompt_id", "lang", "h_last"]))
    h = np.asarray(states["h_last"].to_list(), dtype=np.float64)
    keys = list(zip(states["prompt_id"], states["lang"]))
    centroid = {k: h[[i for i, key in enumerate(keys) if key == k]].mean(axis=0) for k in set(keys)}

    def cos(u, v):
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

    r_msa = np.asarray(b.column("r_msa").to_pylist())
    phi = np.array([cos(h[i], centroid[p, lang]) - cos(h[i], centroid[p, "en"]) for i, (p, lang) in enumerate(keys)])
    english = np.array([lang == "en" for _, lang in keys])
    w = np.where(english, 1.0, 1 / (1 + np.exp(-3.0 * (phi - r_msa))))
    np.testing.assert_allclose(np.asarray(b.column("w").to_pylist())[~english], w[~english], atol=1e-5)
    np.testing.assert_allclose(b.column("r_lacomsa").to_pylist(), w * r_msa, atol=1e-5)
    # MSA eq. 1 from the hub states: mean cosine to the prompt's English responses (the others, for English)
    hub = np.asarray(read_dataset(scores).column("h_hub").to_pylist(), dtype=np.float64)
    msa = [np.mean([cos(hub[i], hub[j]) for j, (q, other) in enumerate(keys) if q == p and other == "en" and j != i])
           for i, (p, _) in enumerate(keys)]
    np.testing.assert_allclose(r_msa, msa, atol=1e-5)
    icr0 = (pl.from_arrow(b)["logp_policy_icr"] - pl.from_arrow(b)["logp_reward_ref"]).to_list()
    np.testing.assert_allclose(b.column("r_icr").to_pylist(), icr0, atol=1e-12)
    result = runner.invoke(main, ["rescore", str(scores), "--output", str(scores)])
    assert result.exit_code == 2 and "choose a new directory" in result.output
    # another layer needs another forward pass: refused, not silently ignored
    pooled = json.loads((scores / "manifest.json").read_text())["params"]["layers"]["h_hub"]
    result = runner.invoke(main, ["rescore", str(scores), "--output", str(tmp_path / "layer"),
                                  "-o", f"rewards.latent.hub_layer={pooled + 1}"])
    assert result.exit_code == 2 and f"holds states pooled at layer {pooled}" in " ".join(result.output.split())
    assert not (tmp_path / "layer").exists()


def test_other_pair_methods_from_the_same_scores(rewards_run):
    from rayalign.pipelines.offline import pairs_stage

    recipe, run_dir = rewards_run
    scores = pl.from_arrow(read_dataset(run_dir / "iter-1" / "scores").drop_columns(["h_hub", "h_last"]))
    for method, schema, extra in (("icr", "pairs", []), ("kto", "kto", ["pairs.kto_reward=icr"]),
                                  ("reward_model", "pairs", []), ("user", "pairs", []), ("lidr", "pairs", [])):
        cfg = load_config(recipe, [f"pairs.method={method}", *extra])
        out = run_dir / "iter-1" / f"pairs-{method}"
        pairs_stage(cfg, run_dir, cfg.policy.path, cfg.policy.path, 1, out)
        table = read_dataset(out, schema)
        assert table.num_rows > 0, method
        if schema == "kto":
            assert set(table.column("label").to_pylist()) == {True, False}
        elif method == "lidr":
            assert table.column("ref_logp_chosen").null_count == 0 and table.column("rejected_num_tokens").null_count == 0
        else:
            assert set(table.column("method").to_pylist()) == {method}
        column = {"icr": "r_icr", "kto": "r_icr", "reward_model": "r_rm", "user": "r_user"}.get(method)
        for row in table.to_pylist() if column else []:  # the best and the worst of the group, by the method's column
            group = scores.filter((pl.col("prompt_id") == row["prompt_id"]) & (pl.col("lang") == row["lang"]))
            best, worst = group[column].max(), group[column].min()
            if schema == "kto":
                assert row["score"] == (best if row["label"] else worst), (method, row["prompt_id"])
                continue
            assert (row["score_chosen"], row["score_rejected"]) == (best, worst), (method, row["prompt_id"])
            chosen = group.filter(pl.col("response") == row["chosen"][0]["content"])
            assert chosen[column].max() == best, (method, row["prompt_id"])


def test_pairs_name_the_cut_samples_when_most_are_never_chosen(rewards_run, capsys):
    """With pairs.truncated not_chosen, a run whose samples are mostly cut made few or no pairs, and training then
    said only `pairs: no rows`."""
    from rayalign.pipelines.offline import pairs_stage

    recipe, run_dir = rewards_run
    cut = (read_dataset(run_dir / "iter-1" / "scores").column("finish_reason").to_numpy() == "length").sum()
    cfg = load_config(recipe, ["pairs.truncated=not_chosen"])
    result = pairs_stage(cfg, run_dir, cfg.policy.path, cfg.policy.path, 1, run_dir / "iter-1" / "pairs-not-chosen")
    assert result["truncated_samples"] == cut > 36 / 2
    assert (f"{cut} of 36 samples were cut at sampling.max_new_tokens, and pairs.truncated: not_chosen never chooses "
            f"them ({result['rows']} rows)") in " ".join(capsys.readouterr().err.split())


def test_icr_quickstart_recipe(tmp_path, tiny_model, weak_model, ray_session):
    run_dir = tmp_path / "icr"
    result = CliRunner().invoke(main, [
        "launch", str(REPO / "examples" / "quickstart-icr.yaml"), "--run-dir", str(run_dir),
        "-o", f"policy.path={tiny_model}", "-o", f"rewards.implicit.reward_reference.path={weak_model}",
        "-o", "languages=[en,de]", "-o", "prompts.limit=3", "-o", "sampling.max_new_tokens=10",
        "-o", "engines.count=1", "-o", "rewards.actors=1", "-o", "training.micro_batch_size=2",
        "-o", "training.gradient_accumulation=1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in ("samples", "scores", "pairs"):
        assert read_manifest(run_dir / "iter-1" / name)["rows"] > 0
    assert set(read_dataset(run_dir / "iter-1" / "pairs").column("method").to_pylist()) == {"icr"}
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-2]
    assert train["stage"] == "train" and train["objective"] == "dpo" and train["nll_first"] > 0  # DPO + NLL


def test_dco_quickstart_recipe(tmp_path, tiny_model, ray_session):
    run_dir = tmp_path / "dco"
    result = CliRunner().invoke(main, [
        "launch", str(REPO / "examples" / "quickstart-dco.yaml"), "--run-dir", str(run_dir),
        "-o", f"policy.path={tiny_model}", "-o", "languages=[en,de,fr]", "-o", "rewards.actors=1"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tuples = read_dataset(run_dir / "iter-1" / "pairs", "dco").to_pylist()
    cands = pl.from_arrow(read_dataset(run_dir / "iter-1" / "candidate_scores", "candidate_scores"))
    assert len(tuples) == 32 * 2 * 2 and cands.height == 32 * 3 * 4
    t = tuples[0]
    logp = {(q, l, c): v for q, l, c, v in cands.select("prompt_id", "lang", "candidate", "logp_ref").rows()}
    assert t["ref_logp_chosen_2"] == logp[(t["prompt_id"], t["lang_2"], t["chosen_2"][0]["content"])]
    # EN stable (gamma_from_anchor 10, gamma_to_anchor 0.1): the small gamma sits inside English's own target
    assert (t["lang_1"], t["gamma_12"], t["gamma_21"]) == ("en", 0.1, 10.0)
    assert not (run_dir / "iter-1" / "samples").exists()  # DCO learns from candidate sets
    assert (run_dir / "iter-1" / "policy" / "config.json").is_file()
    # a DCO batch's loss scales with gamma x its reference margins, so compare each step's loss with the same
    # batch's loss at pi_ref: one epoch, each batch unseen before its step, the policy ends below the reference
    log = [json.loads(line) for line in (run_dir / "iter-1" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(log[0]["loss_at_reference"], rel=1e-5)  # step 1 is pi_ref itself
    gaps = [r["loss"] - r["loss_at_reference"] for r in log[1:]]
    assert sum(gaps) / len(gaps) < 0, gaps


def test_shipped_user_reward_file():
    from rayalign.scoring.rewards import user_rewards

    table = pa.table({"prompt_id": ["a", "a", "b"], "lang": ["en", "de", "de"], "response": ["Hi", "Hallo", "Hello"],
                      "lang_detected": ["en", "de", "en"]})
    got = user_rewards(table, str(REPO / "examples" / "rewards" / "language_fidelity.py"), "reward")
    np.testing.assert_allclose(got, [1 - 0.002, 1 - 0.005, -0.005])
    with pytest.raises(ConfigError, match="defines no function 'score'"):
        user_rewards(table, str(REPO / "examples" / "rewards" / "language_fidelity.py"), "score")


@pytest.mark.parametrize("returned, expected", [
    ("1.0", "returned a float for prompt_id 'a'; expected a list of 2 numbers"),
    ("None", "returned a NoneType for prompt_id 'a'; expected a list of 2 numbers"),
    ("(x for x in [1.0, 2.0])", "returned a generator for prompt_id 'a'; expected"),
    ("['a'] * len(samples)", "returned a list for prompt_id 'a' holding values that are not numbers"),
    ("[[1.0, 2.0]] * len(samples)", r"returned a list of shape \(2, 2\) for prompt_id 'a', expected a list of 2"),
    ("[10 ** 400] * len(samples)", "returned a list for prompt_id 'a' holding values that are not numbers"),
    ("{'a': 1.0}", "returned a dict for prompt_id 'a'; expected"),
    ("[1.0]", "returned 1 scores for prompt_id 'a', expected a list of 2 numbers"),
])
def test_a_user_reward_of_the_wrong_kind_is_named(tmp_path, returned, expected):
    """Return values that are not one number per sample ended in TypeError, ValueError or OverflowError
    tracebacks (after generation and scoring, in a launch)."""
    from rayalign.scoring.rewards import user_rewards

    reward = tmp_path / "odd.py"
    reward.write_text(f"def reward(samples):\n    return {returned}\n")
    table = pa.table({"prompt_id": ["a", "a"], "lang": ["en", "de"], "response": ["Hi", "Hallo"]})
    with pytest.raises(RewardError, match=re.escape(f"{reward}:reward ") + expected):
        user_rewards(table, str(reward), "reward")
    reward.write_text("import numpy\ndef reward(samples):\n    return numpy.array([0.5, 1])\n")
    assert user_rewards(table, str(reward), "reward").tolist() == [0.5, 1.0]


def test_user_reward_files_are_checked_for_one_argument_loaded_without_py_and_may_not_exit(tmp_path):
    from rayalign.scoring.rewards import check_user_reward, load_user_reward, user_rewards

    reward = tmp_path / "reward"  # no .py: importlib found no loader for it, an AttributeError after Ray started
    reward.write_text("def reward(samples, scale=2.0, *, bonus=0.0):\n    return [scale] * len(samples)\n")
    check_user_reward(str(reward), "reward")
    assert load_user_reward(str(reward), "reward")([{}]) == [2.0]
    for signature in ("()", "(samples, extra)", "(*, samples)", "(samples, *, extra)"):
        reward.write_text(f"def reward{signature}:\n    return []\n")
        with pytest.raises(ConfigError, match=re.escape(f"rewards.user.function: {reward}:1: reward() must take one "
                                                        "argument, the samples of one prompt_id")):
            check_user_reward(str(reward), "reward")
    reward.write_text("def reward(*samples):\n    return [1.0]\n")
    check_user_reward(str(reward), "reward")
    reward.write_text("raise SystemExit(3)\n")  # exited the command with code 3 and no message
    with pytest.raises(RewardError, match="importing it raised SystemExit: 3"):
        load_user_reward(str(reward), "reward")
    reward.write_text("import sys\ndef reward(samples):\n    sys.exit(4)\n")
    with pytest.raises(RewardError, match="failed on prompt_id 'a': SystemExit: 4"):
        user_rewards(pa.table({"prompt_id": ["a"], "lang": ["en"], "response": ["Hi"]}), str(reward), "reward")


def test_interrupted_scoring_resumes_from_checkpointed_shards(tmp_path, tiny_model, ray_session, monkeypatch):
    from rayalign import run_dir as run_dir_module
    from rayalign.pipelines import offline

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: resume\nlanguages: [en, de]\npolicy: {{path: {tiny_model}}}\n"
                      f"prompts: {{path: {PROMPTS_DIR}, limit: 2}}\nsampling: {{n: 2, max_new_tokens: 8}}\n"
                      "engines: {shard_rows: 1}\nrewards: {latent: {enabled: true}}\npairs: {method: lacomsa}\n")
    runner = CliRunner()
    whole = tmp_path / "whole"
    assert runner.invoke(main, ["launch", str(recipe), "--run-dir", str(whole)]).exit_code == 0

    real_checkpoint, written = offline.checkpoint, []

    def dying_checkpoint(directory, results):
        save = real_checkpoint(directory, results)

        def on_shard(index, table):
            if len(written) == 2:
                raise RuntimeError("killed while scoring")
            save(index, table)
            written.append(index)
        return on_shard

    for module in (offline, run_dir_module):  # the barrier and the streaming schedule both checkpoint through it
        monkeypatch.setattr(module, "checkpoint", dying_checkpoint)
    cut = tmp_path / "cut"
    result = runner.invoke(main, ["launch", str(recipe), "--run-dir", str(cut)])
    assert isinstance(result.exception, RuntimeError) and "killed while scoring" in str(result.exception)
    assert len(list((cut / "iter-1" / "scores.forward").glob("part-*.parquet"))) == 2
    assert not (cut / "iter-1" / "scores" / "manifest.json").exists()
    for module in (offline, run_dir_module):
        monkeypatch.setattr(module, "checkpoint", real_checkpoint)
    result = runner.invoke(main, ["launch", str(recipe), "--run-dir", str(cut)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [m["resumed_shards"] for m in metrics if m["stage"] == "score"] == [2]
    assert not (cut / "iter-1" / "scores.forward").exists()
    for name in ("scores", "pairs"):
        assert read_dataset(cut / "iter-1" / name).equals(read_dataset(whole / "iter-1" / name)), name
