"""Generation streaming into scoring: the same datasets as the barrier schedule, the choice of schedule, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from conftest import REPO
from rayalign.actors.pool import split_shards
from rayalign.cli import main
from rayalign.cluster.planner import PlanError, plan
from rayalign.cluster.schedule import choose_schedule, side_by_side
from rayalign.cluster.spec import ClusterSpec, load_cluster_spec
from rayalign.config import load_config
from rayalign.data.store import read_dataset, read_manifest
from rayalign.pipelines.streaming import ScoringCuts

LONG_PROMPT = "word " * 5000  # more tokens than the tiny model's 4096-position context: the row fails alone


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- cutting scoring shards out of samples shards that arrive in any order ----

def test_scoring_cuts_match_the_barrier_split_whatever_the_arrival_order():
    sizes = [4, 2, 4, 0, 3, 4, 1]  # samples per generated shard (rows that failed alone are missing)
    shards, start = [], 0
    for size in sizes:
        shards.append(pa.table({"row": pa.array(range(start, start + size), pa.int64())}))
        start += size
    barrier = split_shards(pa.concat_tables(shards), 4)  # how score_stage cuts the finished dataset
    for order in ([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 3, 6, 4]):
        cuts, got = ScoringCuts(4), []
        for index in order:
            got += cuts.add(index, shards[index])
        got += cuts.finish()
        assert [i for i, _ in got] == list(range(len(barrier)))
        assert [t.column("row").to_pylist() for _, t in got] == [t.column("row").to_pylist() for t in barrier]


def test_scoring_cuts_wait_for_the_samples_shards_before_them():
    cuts = ScoringCuts(2)
    assert cuts.add(1, pa.table({"row": [2, 3]})) == []  # shard 0 not yet in: rows 2, 3 cannot be cut
    got = cuts.add(0, pa.table({"row": [0, 1]}))
    assert [t.column("row").to_pylist() for _, t in got] == [[0, 1], [2, 3]]
    assert cuts.finish() == []


def test_scoring_cuts_drop_whole_prompts_as_the_barrier_does():
    """With a drop rule (here: prompts without an 'en' row), rows are cut once their prompt is complete, and the
    cuts equal split_shards of the whole table after the drop."""
    from rayalign.anchor_groups import drop_prompts_without_anchor

    rows = [("p0", "en"), ("p0", "de"), ("p1", "de"), ("p1", "de"), ("p2", "en"), ("p2", "de"), ("p3", "de"),
            ("p4", "en")]
    table = pa.table({"prompt_id": [p for p, _ in rows], "lang": [lang for _, lang in rows]})
    shards = [table.slice(0, 3), table.slice(3, 2), table.slice(5, 3)]  # p1 spans shards 0 and 1
    last_shard = {"p0": 0, "p1": 1, "p2": 2, "p3": 2, "p4": 2}
    drop = lambda t: drop_prompts_without_anchor(t, "en", 1)  # noqa: E731
    kept, dropped = drop(table)
    cuts, got = ScoringCuts(2, drop, last_shard), []
    got += cuts.add(0, shards[0])
    assert cuts.unsettled[0].column("prompt_id").to_pylist() == ["p1"]  # p1 has rows in shard 1 still to come
    assert [t.column("prompt_id").to_pylist() for _, t in got] == [["p0", "p0"]]
    got += cuts.add(2, shards[2]) + cuts.add(1, shards[1]) + cuts.finish()
    assert [t.to_pylist() for _, t in got] == [t.to_pylist() for t in split_shards(kept, 2)]
    assert sorted(cuts.dropped) == dropped == ["p1", "p3"]


# ---- which schedule ----

def spec(nodes=1, cpus=4, gpus=0) -> ClusterSpec:
    return ClusterSpec("test", nodes, cpus, gpus, "A100-80GB" if gpus else "none", 80.0 if gpus else 0.0, 512.0)


def recipe(*overrides):
    return load_config(None, ["rewards.latent.enabled=true", *overrides])


def test_auto_streams_when_engines_and_scorers_fit_side_by_side():
    cfg = recipe("engines.count=2", "rewards.actors=2")  # 1 CPU each
    assert choose_schedule(cfg, spec(cpus=4)).stream
    chosen = choose_schedule(cfg, spec(cpus=3))  # 4 CPUs wanted at once, 3 present
    assert not chosen.stream
    assert "2 engine(s) + 2 scorer(s) need 4 CPUs at once; test has 3 CPUs" in chosen.reason


def test_gpu_roles_fit_side_by_side_or_colocated_on_shared_gpus():
    on_gpus = ["engines.num_gpus=1", "rewards.num_gpus=1", "engines.count=4", "rewards.actors=4"]
    assert choose_schedule(recipe(*on_gpus), spec(gpus=8, cpus=16)).stream  # 4 + 4 of 8 GPUs
    assert not choose_schedule(recipe(*on_gpus), spec(gpus=4, cpus=16)).stream  # 8 of 4 GPUs
    colocated = ["engines.num_gpus=0.5", "rewards.num_gpus=0.5", "engines.count=4", "rewards.actors=4"]
    assert choose_schedule(recipe(*colocated), spec(gpus=4, cpus=16)).stream  # half a GPU each: 4 of 4 GPUs
    # a tensor-parallel engine takes whole GPUs of one node: 2 x TP-4 leave no GPU for a scorer on 8
    tp = ["engines.backend=vllm", "engines.tensor_parallel_size=4", "engines.num_gpus=4", "engines.count=2",
          "rewards.num_gpus=1", "rewards.actors=1"]
    assert side_by_side(recipe(*tp), spec(gpus=8, cpus=16)) is not None
    assert side_by_side(recipe(*tp), spec(nodes=2, gpus=8, cpus=16)) is None


@pytest.mark.parametrize("nodes, gpus, scorer_gpus", [(1, 8, 1.0), (3, 8, 1.0), (5, 4, 0.5), (2, 8, 0.3)])
def test_the_balanced_split_is_the_best_of_every_pair_that_fits(nodes, gpus, scorer_gpus):
    """The split searched every (engines, scorers) pair, minutes at 64 nodes and unending at 1000: it now bisects
    where the two roles' seconds cross, and must find what checking every pair finds."""
    import dataclasses

    from rayalign.cluster.estimate import one_actor_busy
    from rayalign.cluster.schedule import balanced_counts, side_by_side

    cfg = load_config(REPO / "examples" / "lacomsa-llama3-8b.yaml", [f"rewards.num_gpus={scorer_gpus}"])
    cluster = dataclasses.replace(spec(nodes=nodes, cpus=96, gpus=gpus), memory_gb_per_node=1152.0)
    generate, score = one_actor_busy(cfg, cluster)
    most = nodes * gpus * (3 if scorer_gpus == 0.3 else 2 if scorer_gpus == 0.5 else 1)
    every = [(max(generate / e, score / s), e, s) for e in range(1, nodes * gpus + 1) for s in range(1, most + 1)
             if side_by_side(dataclasses.replace(cfg, engines=dataclasses.replace(cfg.engines, count=e),
                                                 rewards=dataclasses.replace(cfg.rewards, actors=s)), cluster) is None]
    best = min(t for t, _, _ in every)
    engines, scorers = balanced_counts(cfg, cluster, nodes * gpus, most)
    assert max(generate / engines, score / scorers) == pytest.approx(best, rel=1e-12)


def test_schedule_key_forces_either_and_stream_is_refused_where_it_cannot_fit():
    assert not choose_schedule(recipe("cluster.schedule=barrier"), spec(cpus=64)).stream
    assert choose_schedule(recipe("cluster.schedule=stream"), spec(cpus=2)).stream
    with pytest.raises(PlanError, match="cluster.schedule: stream holds engines and scorers at once, but 1 "
                                        "engine.s. \\+ 1 scorer.s. need 2 CPUs at once; test has 1 CPUs"):
        choose_schedule(recipe("cluster.schedule=stream"), spec(cpus=1))
    no_scores = load_config(None, [])  # nothing to score: nothing to stream into
    assert not choose_schedule(no_scores, spec(cpus=64)).stream


def test_the_schedule_does_not_change_the_config_hash():
    assert recipe("cluster.schedule=stream").config_hash() == recipe("cluster.schedule=barrier").config_hash()


# ---- streamed and barrier runs give the same datasets ----

CENTROID_TEXTS = {"en": ["The cat sleeps on the mat.", "It rains today."],
                  "de": ["Die Katze schläft auf der Matte.", "Heute regnet es."]}


@pytest.fixture(scope="module")
def streamed_and_barrier(tmp_path_factory, tiny_model, ray_session):
    """Generate + score (LaCoMSA with centroids from text files, and ICR's cross-lingual prompt) over 4 ids x 2
    languages, p1/de longer than the context (so generated shards differ in size), once streamed and once with
    the barrier."""
    tmp = tmp_path_factory.mktemp("streaming")
    for lang, text in CENTROID_TEXTS.items():
        (tmp / f"{lang}.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    with open(tmp / "prompts.jsonl", "w", encoding="utf-8") as f:
        for i in range(4):
            for lang in ("en", "de"):
                text = LONG_PROMPT if (i, lang) == (1, "de") else f"Say something about number {i}."
                f.write(json.dumps({"prompt_id": f"p{i}", "lang": lang, "instruction": text}) + "\n")
    recipe_path = tmp / "recipe.yaml"
    recipe_path.write_text(
        f"name: streaming\nlanguages: [en, de]\npolicy: {{path: {tiny_model}}}\n"
        f"prompts: {{path: {tmp / 'prompts.jsonl'}}}\nsampling: {{n: 2, max_new_tokens: 8, seed: 5}}\n"
        "engines: {count: 1, batch_size: 8, shard_rows: 2, max_failed_share: 0.2}\n"
        f"rewards: {{latent: {{enabled: true, centroid_texts: {{en: en.txt, de: de.txt}}}}, "
        f"implicit: {{enabled: true, prompt: cross_lingual, "
        f"reward_reference: {{path: {tiny_model}}}}}, actors: 1, batch_size: 4}}\n")
    runs = {}
    for schedule in ("stream", "barrier"):
        runs[schedule] = tmp / schedule
        result = invoke("launch", recipe_path, "--run-dir", runs[schedule], "-o", f"cluster.schedule={schedule}")
        assert result.exit_code == 0, result.output
    return recipe_path, runs


@pytest.mark.slow
def test_streamed_datasets_equal_the_barrier_schedules_row_for_row(streamed_and_barrier):
    _, runs = streamed_and_barrier
    for dataset in ("samples", "scores", "errors"):
        streamed = read_dataset(runs["stream"] / "iter-1" / dataset)
        barrier = read_dataset(runs["barrier"] / "iter-1" / dataset)
        assert streamed.num_rows and streamed.equals(barrier), dataset
    assert read_dataset(runs["stream"] / "iter-1" / "errors").column("prompt_id").to_pylist() == ["p1"]
    records = {m["stage"]: m for m in metrics(runs["stream"]) if m.get("iteration") == 1}
    assert records["generate"]["schedule"] == records["score"]["schedule"] == "stream"
    recipe_path = streamed_and_barrier[0]
    for run in runs.values():
        latent = read_manifest(run / "iter-1" / "scores")["params"]["latent"]
        assert latent["centroids"] == "centroid_texts"
        assert latent["centroid_texts"] == {lang: str(recipe_path.parent / f"{lang}.txt") for lang in CENTROID_TEXTS}


@pytest.mark.slow
def test_streamed_lacomsa_uses_the_centroids_of_the_text_files(streamed_and_barrier, tiny_model):
    """phi of the streamed scores, recomputed from their stored states with centroids pooled here by the engine from
    the text lines (an empty user turn, each line as the response), and not with the run's own centroids."""
    import numpy as np

    from rayalign.engines import ScoreRequest
    from rayalign.engines.hf import HFEngine
    from rayalign.rewards.latent import latent_rewards
    from rayalign.scoring.forward import latent_matrix

    _, runs = streamed_and_barrier
    scores = read_dataset(runs["stream"] / "iter-1" / "scores")
    layer = read_manifest(runs["stream"] / "iter-1" / "scores")["params"]["layers"]["h_last"]
    engine = HFEngine(tiny_model, dtype="float32", device="cpu", batch_size=4)
    centroids = {lang: np.mean([r.pooled[layer] for r in engine.score(
        [ScoreRequest([{"role": "user", "content": ""}], line) for line in lines], [layer])], axis=0)
        for lang, lines in CENTROID_TEXTS.items()}
    states = [np.asarray(scores.column(c).to_pylist()) for c in ("prompt_id", "lang")] + [
        latent_matrix(scores.column(c)) for c in ("h_hub", "h_last")]
    expected, run_own = latent_rewards(*states, centroids=centroids), latent_rewards(*states)
    np.testing.assert_allclose(scores.column("phi").to_numpy(), expected["phi"], atol=5e-3)
    np.testing.assert_allclose(scores.column("r_lacomsa").to_numpy(), expected["r_lacomsa"], atol=5e-3)
    assert np.abs(run_own["phi"] - expected["phi"]).max() > 0.05
    assert "schedule" not in {m["stage"]: m for m in metrics(runs["barrier"])}["score"]


@pytest.mark.slow
def test_streamed_resume_verifies_kept_shards_and_forward_results(streamed_and_barrier, tmp_path):
    """An interrupted stream: a samples shard and a forward checkpoint changed on disk are not kept, and the
    resumed stream still ends with the barrier run's datasets."""
    import shutil

    recipe_path, runs = streamed_and_barrier
    run_dir = tmp_path / "run"
    shutil.copytree(runs["stream"], run_dir)
    it_dir = run_dir / "iter-1"
    state = json.loads((run_dir / "state.json").read_text())
    state["finished"] = []
    (run_dir / "state.json").write_text(json.dumps(state))
    (it_dir / "samples" / "manifest.json").unlink()
    shutil.rmtree(it_dir / "scores")
    with open(it_dir / "samples" / "part-00002.parquet", "ab") as f:
        f.write(b"changed")
    forward = it_dir / "scores.forward"
    forward.mkdir()
    kept = split_shards(read_dataset(runs["stream"] / "iter-1" / "scores").select(["prompt_id"]), 4)[0]
    from rayalign.data.store import checksum_path, write_parquet_atomic

    write_parquet_atomic(kept, forward / "part-00000.parquet", checksum=True)
    checksum_path(forward / "part-00000.parquet").write_text("0" * 64)  # not what was written

    result = invoke("launch", recipe_path, "--run-dir", run_dir, "-o", "cluster.schedule=stream")
    assert result.exit_code == 0, result.output
    assert "part-00002.parquet" in result.output and "part-00000.parquet" in result.output
    for dataset in ("samples", "scores"):
        assert read_dataset(it_dir / dataset).equals(read_dataset(runs["barrier"] / "iter-1" / dataset)), dataset
    generate = [m for m in metrics(run_dir) if m["stage"] == "generate"][-1]
    score = [m for m in metrics(run_dir) if m["stage"] == "score"][-1]
    assert generate["resumed_shards"] == 3 and score["resumed_shards"] == 0


def test_scorers_that_stop_mid_stream_stop_generation_at_the_next_shard(tmp_path, tiny_model, ray_session,
                                                                         monkeypatch):
    """Scorers lost at the start of a stream were reported only once every sample was generated (hours on a
    cluster): generation now stops at its next finished shard, and the shards written are kept for the resume."""
    from rayalign.actors.scorer import ScoringGroup
    from rayalign.generation import ActorsLostError

    def lost(self, *args, **kwargs):
        raise ActorsLostError("shard 0 failed 1 time(s) as its actor died, 0 actor(s) left (killed)")

    monkeypatch.setattr(ScoringGroup, "run", lost)
    with open(tmp_path / "prompts.jsonl", "w", encoding="utf-8") as f:
        for i in range(6):
            for lang in ("en", "de"):
                f.write(json.dumps({"prompt_id": f"p{i}", "lang": lang, "instruction": f"Count to {i}."}) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: lost\nlanguages: [en, de]\npolicy: {{path: {tiny_model}}}\n"
                      f"prompts: {{path: {tmp_path / 'prompts.jsonl'}}}\nsampling: {{n: 2, max_new_tokens: 8}}\n"
                      "engines: {count: 1, batch_size: 4, shard_rows: 2}\n"
                      "rewards: {latent: {enabled: true}, actors: 1}\n")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["launch", str(recipe), "--run-dir", str(run_dir), "-o", "cluster.schedule=stream"])
    assert result.exit_code != 0
    assert "0 actor(s) left (killed)" in " ".join(result.output.split())
    written = sorted((run_dir / "iter-1" / "samples").glob("part-*.parquet"))
    assert 1 <= len(written) < 6, written  # 6 shards of 2 rows: stopped at the first finished one
    assert not (run_dir / "iter-1" / "samples" / "manifest.json").exists()


def test_under_stream_one_auto_count_fills_what_the_other_role_leaves_and_utilisation_counts_both():
    """Streamed phases run at once: with 44 engines fixed, rewards.actors auto asked for 64 scorers (108 GPUs on a
    64-GPU cluster), and each phase's utilisation alone advised `auto` for a cluster already full."""
    cluster = load_cluster_spec("a100x64")
    lacomsa = REPO / "examples" / "lacomsa-llama3-8b.yaml"
    result = plan(load_config(lacomsa, ["cluster.schedule=stream", "engines.count=44", "rewards.actors=auto"]),
                  cluster)
    assert (result.phase("generate").actors, result.phase("score").actors) == (44, 20)  # 64 GPUs, 1 each
    result = plan(load_config(lacomsa, ["cluster.schedule=stream", "engines.count=auto", "rewards.actors=30"]),
                  cluster)
    assert (result.phase("generate").actors, result.phase("score").actors) == (34, 30)
    notes = plan(load_config(lacomsa, ["cluster.schedule=stream", "engines.count=44", "rewards.actors=20"]),
                 cluster).notes
    assert "generate + score: 64 of 64 GPUs (100%)" in notes and not any("idles" in n for n in notes[:-1] if
                                                                         n.startswith("generate"))
    notes = plan(load_config(lacomsa, ["cluster.schedule=stream", "engines.count=10", "rewards.actors=5"]),
                 cluster).notes
    assert ("generate + score: 15 of 64 GPUs (23%); most of the cluster idles in this phase: set engines.count: auto "
            "and rewards.actors: auto to fill it") in notes
