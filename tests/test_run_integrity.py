"""Runs that cannot be fooled: outputs never written over other data, kept shards verified against the checksums
recorded when they were written, damaged ones recomputed."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import PROMPTS_DIR
from rayalign.cli import main
from rayalign.data.store import read_dataset, read_manifest

DATASETS = ("samples", "scores", "pairs")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line(output: str) -> str:
    return "".join(output.split("\n"))


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def recipe_file(path: Path, model: str) -> Path:
    """4 prompt ids x 2 languages, n = 2, one prompt row per shard: 8 samples shards, 8 scores shards, 1 pairs."""
    path.write_text(f"name: integrity\nlanguages: [en, de]\npolicy: {{path: {model}}}\n"
                    f"prompts: {{path: {PROMPTS_DIR}, limit: 4}}\nsampling: {{n: 2, max_new_tokens: 8, seed: 3}}\n"
                    "engines: {count: 1, batch_size: 8, shard_rows: 1}\n"
                    "rewards: {latent: {enabled: true}, actors: 1}\npairs: {method: lacomsa}\n")
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, ray_session):
    """An uninterrupted run (generate, score, pairs) and its recipe; tests work on copies."""
    tmp = tmp_path_factory.mktemp("integrity")
    recipe = recipe_file(tmp / "recipe.yaml", tiny_model)
    result = invoke("launch", recipe, "--run-dir", tmp / "run")
    assert result.exit_code == 0, result.output
    return tmp / "run", recipe


def copy_run(finished_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    return run_dir


def tables(run_dir: Path) -> dict:
    return {name: read_dataset(run_dir / "iter-1" / name, name) for name in DATASETS}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- outputs never replace another dataset ----

def test_rescore_refuses_an_output_holding_another_dataset_or_other_files(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    samples = run_dir / "iter-1" / "samples"
    before = snapshot(samples)
    result = invoke("rescore", run_dir / "iter-1" / "scores", "--output", samples, "-o", "rewards.latent.alpha=1.0")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{samples}: exists and is not empty" in one_line(result.output) and "--replace" in result.output
    assert snapshot(samples) == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    result = invoke("rescore", run_dir / "iter-1" / "scores", "--output", notes)
    assert result.exit_code == 2 and (notes / "todo.txt").read_text() == "mine" and len(list(notes.iterdir())) == 1
    result = invoke("rescore", run_dir / "iter-1" / "scores", "--output", run_dir / "iter-1")  # holds the input
    assert result.exit_code == 2 and snapshot(samples) == before


def test_launch_refuses_a_directory_of_other_files(finished_run, tmp_path):
    """A launch wrote its config, state and iterations into any folder, such as another run's policy checkpoint."""
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    before = snapshot(folder)
    result = invoke("launch", finished_run[1], "--run-dir", folder)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"{folder}: not empty (config.json, model.safetensors) and not a run (no state.json)"
            in one_line(result.output)), result.output
    assert snapshot(folder) == before


def test_redo_without_the_runs_config_yaml_recomputes(finished_run, tmp_path):
    """The outputs went to the trash, then copying the missing config.yaml failed; every retry failed the same way."""
    run_dir = copy_run(finished_run, tmp_path)
    (run_dir / "config.yaml").unlink()
    result = invoke("launch", finished_run[1], "--run-dir", run_dir, "-o", "pairs.method=msa", "--redo", "pairs")
    assert result.exit_code == 0, result.output
    assert read_manifest(run_dir / "iter-1" / "pairs")["params"]["method"] == "msa"
    assert (run_dir / "config.yaml").is_file() and len(list(run_dir.glob("trash-*/iter-1/pairs"))) == 1


def test_rescore_replace_moves_the_old_output_to_the_runs_trash(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    rescored = run_dir / "iter-1" / "scores-alpha1"
    assert invoke("rescore", run_dir / "iter-1" / "scores", "--output", rescored).exit_code == 0
    before = snapshot(rescored)
    result = invoke("rescore", run_dir / "iter-1" / "scores", "--output", rescored, "--replace", "-o",
                    "rewards.latent.alpha=1.0")
    assert result.exit_code == 0, result.output
    (trashed,) = run_dir.glob("trash-*/iter-1/scores-alpha1")
    assert snapshot(trashed) == before  # nothing lost
    assert read_dataset(rescored, "scores").num_rows == 16

    # a dataset of another kind is not replaced: the run's samples and pairs were (a scores dataset in their place)
    for name in ("samples", "pairs"):
        kept = snapshot(run_dir / "iter-1" / name)
        result = invoke("rescore", run_dir / "iter-1" / "scores", "--output", run_dir / "iter-1" / name, "--replace")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert (f"{run_dir / 'iter-1' / name}: holds a {name} dataset; --replace replaces only a scores dataset"
                in one_line(result.output))
        assert snapshot(run_dir / "iter-1" / name) == kept
    assert len(list(run_dir.glob("trash-*/iter-1/*"))) == 1

    other = copy_run(finished_run, tmp_path / "other")  # another run's iteration is not a dataset: never moved
    iteration, before = other / "iter-1", snapshot(other)
    result = invoke("rescore", run_dir / "iter-1" / "scores", "--output", iteration, "--replace")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{iteration}: --replace replaces only a dataset" in one_line(result.output)
    assert snapshot(other) == before
    # nor a run's own scores: its relaunch kept them, and the pairs and policy made from the old ones
    for output in (other / "iter-1" / "scores", other / "iter-2" / "scores"):
        result = invoke("rescore", run_dir / "iter-1" / "scores", "--output", output, "--replace")
        assert result.exit_code == 2 and "a run's own stage directory" in one_line(result.output), result.output
    assert snapshot(other) == before and not (other / "iter-2").exists()


def test_rescore_refuses_a_recipe_of_other_languages_before_writing(finished_run, tmp_path):
    """--recipe of another run: its anchor absent from the scores was a ValueError traceback; a subset of the
    languages wrote a dataset whose manifest named the wrong ones."""
    run_dir = copy_run(finished_run, tmp_path)
    for i, languages in enumerate(("[zh,ja]", "[en]", "[en,de,fr]")):
        out = tmp_path / f"out{i}"
        result = invoke("rescore", run_dir / "iter-1" / "scores", "--output", out, "-o", f"languages={languages}",
                        "-o", f"anchor_language={languages[1:3]}")
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "differ from the languages of" in one_line(result.output) and "-o languages=[de,en]" in result.output
        assert not out.exists()

def test_writer_refuses_a_directory_of_other_files_or_another_schema(tmp_path):
    from rayalign.data.store import DatasetError, DatasetWriter

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(DatasetError, match="thesis.tex"):
        DatasetWriter(tmp_path / "mine", "samples")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"schema": "samples"}))
    with pytest.raises(DatasetError, match="holds a samples dataset"):
        DatasetWriter(tmp_path / "other", "scores")


# ---- verified resumes ----

def flip_bit(path: Path, rng: random.Random, done: set) -> None:
    """Flip one bit of `path` that was not flipped before (so no two flips cancel)."""
    size = path.stat().st_size
    while True:
        bit = rng.randrange(size * 8)
        if (path, bit) not in done:
            break
    done.add((path, bit))
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def test_validate_reports_a_dataset_without_a_manifest_and_a_damaged_shard(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    assert invoke("validate", run_dir).exit_code == 0
    iteration = invoke("inspect", run_dir / "iter-1")  # the datasets directly inside a directory are found too
    assert iteration.exit_code == 0 and all(f"iter-1/{name}{name}v1" in "".join(iteration.output.split())
                                            for name in ("samples", "scores"))  # "<dir>  <schema> v1"
    (run_dir / "iter-1" / "samples" / "manifest.json").unlink()
    flip_bit(run_dir / "iter-1" / "pairs" / "part-00000.parquet", random.Random(0), set())
    result = invoke("validate", run_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    output = one_line(result.output)
    assert f"{run_dir / 'iter-1' / 'samples' / 'manifest.json'}: missing" in output
    assert f"{run_dir / 'iter-1' / 'pairs' / 'part-00000.parquet'}: sha256 does not match" in output
    assert f"ok  {run_dir / 'iter-1' / 'scores'}" in output
    # a scores dataset where the run keeps its samples (as `rescore --output .../samples --replace` would leave it)
    shutil.rmtree(run_dir / "iter-1" / "samples")
    shutil.copytree(run_dir / "iter-1" / "scores", run_dir / "iter-1" / "samples")
    output = one_line(invoke("validate", run_dir).output)
    assert f"{run_dir / 'iter-1' / 'samples'}: holds a scores dataset where a run keeps its samples" in output
    assert invoke("validate", run_dir / "iter-1" / "samples").exit_code == 0  # the dataset alone is intact
    # a stray parquet in a dataset: datasets.load_dataset(dir) reads every .parquet there
    shutil.copy(run_dir / "iter-1" / "scores" / "part-00000.parquet", run_dir / "iter-1" / "scores" / "extra.parquet")
    result = invoke("validate", run_dir / "iter-1" / "scores")
    assert result.exit_code == 2 and (f"{run_dir / 'iter-1' / 'scores'}: holds files that are not this dataset's "
                                      "(extra.parquet)") in one_line(result.output)
    (run_dir / "iter-1" / "scores" / "extra.parquet").unlink()
    shutil.rmtree(run_dir / "iter-1" / "pairs")  # a finished stage's dataset deleted
    result = invoke("validate", run_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"{run_dir / 'iter-1' / 'pairs'}: missing, though state.json records iter-1/pairs as finished"
            in one_line(result.output)) and "2 of 3 dataset(s) failed" in one_line(result.output)


def damage_and_relaunch(run_dir: Path, recipe: Path, rng: random.Random, flips: int, done: set,
                        drop_manifests: bool = False) -> set[Path]:
    """Flip `flips` random bits in random finished shards of every dataset (at least one each), relaunch, and
    return the damaged shards."""
    shards = {name: sorted((run_dir / "iter-1" / name).glob("part-*.parquet")) for name in DATASETS}
    targets = [rng.choice(shards[name]) for name in DATASETS]
    targets += [rng.choice(shards[rng.choice(DATASETS)]) for _ in range(flips - len(targets))]
    for shard in targets:
        flip_bit(shard, rng, done)
    if drop_manifests:  # a lost manifest must not turn damaged shards into trusted ones
        for name in DATASETS:
            (run_dir / "iter-1" / name / "manifest.json").unlink()
    result = invoke("launch", recipe, "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    output = one_line(result.output)
    for shard in set(targets):
        assert f"not kept: {shard}: sha256 does not match" in output, (shard, output)
    return set(targets)


def test_damaged_shards_of_finished_stages_are_detected_and_recomputed(finished_run, tmp_path):
    """One relaunch after flipping bits in samples, scores and pairs shards and deleting every manifest."""
    run_dir, recipe = copy_run(finished_run, tmp_path), finished_run[1]
    expected = tables(finished_run[0])
    damaged = damage_and_relaunch(run_dir, recipe, random.Random(7), 4, set(), drop_manifests=True)
    recomputed = [m for m in metrics(run_dir) if m["stage"] == "verify"]
    assert {m["output"] for m in recomputed} == {f"iter-1/{d.parent.name}" for d in damaged}
    got = tables(run_dir)
    for name in DATASETS:
        assert got[name].equals(expected[name]), name
    assert invoke("validate", run_dir).exit_code == 0
    assert invoke("launch", recipe, "--run-dir", run_dir).output.count("finished earlier, kept") == 3


@pytest.mark.slow
def test_fault_injection_fifty_random_bit_flips_are_all_detected_and_recomputed(finished_run, tmp_path):
    """Seeded: 5 relaunches, each after 10 random bit flips in random finished shards of samples, scores and
    pairs; every damaged shard is named and recomputed, and the datasets end equal to the uninterrupted run's."""
    run_dir, recipe = copy_run(finished_run, tmp_path), finished_run[1]
    expected = tables(finished_run[0])
    rng, done, damaged = random.Random(2024), set(), 0
    for relaunch in range(5):
        damaged += len(damage_and_relaunch(run_dir, recipe, rng, 10, done, drop_manifests=relaunch == 2))
        got = tables(run_dir)
        for name in DATASETS:
            assert got[name].equals(expected[name]), (relaunch, name)
    assert len(done) == 50 and damaged >= 15


def test_rescore_outside_a_run_names_the_dataset_and_asks_for_a_recipe(tmp_path, monkeypatch):
    scores = tmp_path / "loose" / "scores"
    scores.mkdir(parents=True)
    result = invoke("rescore", scores, "--output", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"{scores}: no config.yaml of a run found for it (looked for {tmp_path / 'config.yaml'}, as in "
            "RUN/iter-N/scores), so no recipe to start from; pass --recipe RECIPE") in one_line(result.output)
    run_dir = tmp_path / "run"  # SCORES given relative to iter-N: the run's config.yaml is found, not ./config.yaml
    (run_dir / "iter-1" / "scores").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: run\nlanguages: [en, de]\n")
    monkeypatch.chdir(run_dir / "iter-1")
    result = invoke("rescore", "scores", "--output", tmp_path / "out")
    assert result.exit_code == 2 and "recipe file not found" not in result.output
    assert "scores" in result.output and "manifest" in result.output


def test_rescore_names_the_user_reward_file_it_runs_before_running_it(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    reward = tmp_path / "reward.py"
    reward.write_text("import sys\nprint('USER CODE RAN', file=sys.stderr)\n\ndef reward(group):\n"
                      "    return [1.0 for _ in group]\n")
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("user:\n    path: null", f"user:\n    path: {reward}"))
    assert str(reward) in config.read_text()
    result = invoke("rescore", run_dir / "iter-1" / "scores", "--output", tmp_path / "rescored")
    output = one_line(result.output)
    notice = f"runs the user reward file {reward} as code, named by {config} (the scored run's config)"
    assert notice in output


def test_a_kept_policy_needs_the_checksums_recorded_when_it_was_saved(tmp_path):
    from rayalign.data.store import directory_checksums
    from rayalign.run_dir import kept_output_problems

    policy = tmp_path / "iter-1" / "policy"
    policy.mkdir(parents=True)
    (policy / "config.json").write_text("{}")
    (policy / "model.safetensors").write_bytes(b"weights")
    state = {"finished": ["iter-1/train"]}
    assert "no checksums recorded for it" in kept_output_problems(tmp_path, state, policy)[0]
    state["checksums"] = {"iter-1/policy": directory_checksums(policy)}
    assert kept_output_problems(tmp_path, state, policy) == []
    (policy / "model.safetensors").write_bytes(b"weightz")
    assert kept_output_problems(tmp_path, state, policy)


def test_a_resume_from_edited_prompt_files_is_refused_before_any_work(tmp_path, tiny_model):
    """Samples kept by a run (finished or partial) came from its prompt rows: relaunching after the prompt files
    were edited is refused with both digests, unless generate is redone or nothing is kept."""
    from rayalign.config import ConfigError, load_config
    from rayalign.data.prompts import load_prompts
    from rayalign.run_dir import check_prompts_unchanged, prompt_digest

    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: edited\npolicy: {{path: {tiny_model}}}\nprompts: {{path: {prompts}, limit: 2}}\n")
    cfg = load_config(recipe)
    before = prompt_digest(load_prompts(prompts, cfg.languages, limit=2))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = {"config_hash": cfg.config_hash(), "finished": [], "prompts_digest": before}  # mid-generation
    (run_dir / "state.json").write_text(json.dumps(state))
    (run_dir / "config.yaml").write_text(recipe.read_text())
    first = (prompts / "de.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(first[0])
    row["instruction"] = "EDITED " + row["instruction"]
    (prompts / "de.jsonl").write_text("\n".join([json.dumps(row, ensure_ascii=False), *first[1:]]) + "\n",
                                      encoding="utf-8")
    edited = load_prompts(prompts, cfg.languages, limit=2)
    after = prompt_digest(edited)
    assert after != before
    result = CliRunner().invoke(main, ["launch", str(recipe), "--run-dir", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert f"the prompt rows differ from those this run started with (digest {before}, now {after})" in \
        one_line(result.output)
    assert json.loads((run_dir / "state.json").read_text()) == state  # nothing touched
    assert check_prompts_unchanged(cfg, state, edited, redo=("generate",)) == after
    assert check_prompts_unchanged(cfg, {**state, "config_hash": "0" * 16}, edited) == after  # nothing kept
    with pytest.raises(ConfigError, match="prompt rows differ"):
        check_prompts_unchanged(cfg, {**state, "config_hash": "0" * 16, "finished": ["iter-1/generate"]}, edited)
    assert check_prompts_unchanged(cfg, {k: v for k, v in state.items() if k != "prompts_digest"}, edited) == after


def test_nothing_is_written_into_another_datasets_directory_or_over_a_users_files(tmp_path, tiny_model):
    """A run directory, an export, a rescore output or a model inside a dataset's directory is refused (it would
    load as part of that dataset), and so is replacing a model directory or a file rayalign did not write."""
    from rayalign.data.store import DatasetError, claim_output_dir

    (tmp_path / "manifest.json").write_text('{"name": "a web app", "start_url": "/"}')  # not a dataset's: ignored
    dataset = tmp_path / "pairs"
    dataset.mkdir()
    (dataset / "manifest.json").write_text('{"schema": "pairs", "schema_version": 1, "shards": []}')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: nest\npolicy: {{path: {tiny_model}}}\n")
    refused = CliRunner().invoke(main, ["launch", str(recipe), "--run-dir", str(dataset / "run")])
    assert refused.exit_code == 2 and f"the run directory would lie in the dataset {dataset}" in one_line(refused.output)
    assert not (dataset / "run").exists()
    refused = CliRunner().invoke(main, ["export", "--format", "verl", str(recipe), str(dataset / "sub")])
    assert refused.exit_code == 2 and f"inside the dataset {dataset}" in one_line(refused.output)
    with pytest.raises(DatasetError, match=f"inside the dataset {dataset}"):
        claim_output_dir(dataset / "scores2", "scores")
    assert claim_output_dir(tmp_path / "scores2", "scores") is None  # beside it, under the web app's manifest: fine
    refused = CliRunner().invoke(main, ["build-tiny-model", str(dataset / "model"), "--steps", "1"])
    assert refused.exit_code == 2 and f"inside the dataset {dataset}" in one_line(refused.output)
    model = tmp_path / "policy"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"trained weights")
    refused = CliRunner().invoke(main, ["build-tiny-model", str(model), "--steps", "1"])
    assert refused.exit_code == 2 and "exists and is not empty" in refused.output
    assert (model / "model.safetensors").read_bytes() == b"trained weights"
    assert CliRunner().invoke(main, ["build-tiny-model", str(tmp_path / "m"), "--steps", "-5"]).exit_code == 2
    precious = tmp_path / "precious.py"
    precious.write_text("print('mine')\n")
    online = Path(__file__).parents[1] / "examples" / "online-grpo-quickstart.yaml"
    args = ["online", str(online), "-o", f"policy.path={tiny_model}", "--openrlhf-reward-file"]
    refused = CliRunner().invoke(main, args + [str(precious)])
    assert refused.exit_code == 2 and "exists and was not written by rayalign" in one_line(refused.output)
    assert precious.read_text() == "print('mine')\n"
    ours = tmp_path / "reward.py"
    assert CliRunner().invoke(main, args + [str(ours)]).exit_code == 0
    assert CliRunner().invoke(main, args + [str(ours)]).exit_code == 0  # its own file is written again


def test_a_recipe_whose_pairs_cannot_fill_one_batch_is_refused_before_generation(tmp_path, tiny_model):
    """It was refused by the trainer, after generation and scoring had run."""
    recipe = recipe_file(tmp_path / "recipe.yaml", tiny_model)
    result = invoke("launch", recipe, "--run-dir", tmp_path / "run", "-o", "training.loss=dpo",
                    "-o", "training.micro_batch_size=4", "-o", "training.gradient_accumulation=4")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("the pairs stage makes at most 8 rows from 4 prompt(s) in 2 languages (pairs.method lacomsa), fewer than "
            "one global batch of 16") in " ".join(result.output.split())
    assert not (tmp_path / "run" / "iter-1").exists()


def test_a_resume_refuses_a_user_reward_file_edited_since_its_scores(tmp_path):
    """The config hash names the file's path only: an edited reward function kept the scores (and pairs) of the old
    one on resume."""
    from rayalign.config import ConfigError, load_config
    from rayalign.run_dir import check_inputs_unchanged, prepare_run_dir, read_state

    reward = tmp_path / "reward.py"
    reward.write_text((Path(__file__).parents[1] / "examples" / "rewards" / "language_fidelity.py").read_text())
    cfg = load_config(None, [f"rewards.user.path={reward}", "pairs.method=user", f"prompts.path={PROMPTS_DIR}"])
    run_dir = tmp_path / "run"
    prepare_run_dir(cfg, run_dir, input_digests=check_inputs_unchanged(cfg, None))
    state = read_state(run_dir)
    state["finished"] = ["iter-1/generate", "iter-1/score"]
    assert check_inputs_unchanged(cfg, state) == state["input_digests"]  # unchanged: resumes
    reward.write_text(reward.read_text() + "\n# edited\n")
    with pytest.raises(ConfigError, match=f"rewards.user.path: {reward}: its content differs from the one this run "
                                          "started with .* --redo score"):
        check_inputs_unchanged(cfg, state)
    assert check_inputs_unchanged(cfg, state, ("score",)) != state["input_digests"]  # scored again: fine


def test_a_resume_refuses_a_model_directory_replaced_since_its_samples(tmp_path, tiny_model):
    """The config hash names a model's path only: a checkpoint copied over the policy's (or the reward reference's)
    directory after a kill was resumed with the old model's samples kept."""
    import numpy as np
    from rayalign.config import ConfigError, load_config
    from rayalign.run_dir import check_inputs_unchanged, model_fingerprint

    policy, reference = tmp_path / "policy", tmp_path / "reference"
    shutil.copytree(tiny_model, policy)
    shutil.copytree(tiny_model, reference)
    big = policy / "extra.bin"  # over 8 MiB: sampled, not read whole
    big.write_bytes(np.random.default_rng(0).bytes(9 << 20))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: replaced\npolicy: {{path: {policy}}}\nprompts: {{path: {PROMPTS_DIR}, limit: 2}}\n"
                      f"rewards: {{implicit: {{enabled: true, reward_reference: {{path: {reference}}}}}}}\n")
    cfg = load_config(recipe)
    digests = check_inputs_unchanged(cfg, None)
    assert set(digests) == {"policy.path", "rewards.implicit.reward_reference.path"}
    assert digests["policy.path"] != digests["rewards.implicit.reward_reference.path"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = {"config_hash": cfg.config_hash(), "finished": [], "input_digests": digests}  # mid-generation
    (run_dir / "state.json").write_text(json.dumps(state))
    (run_dir / "config.yaml").write_text(recipe.read_text())
    assert check_inputs_unchanged(cfg, state) == digests  # untouched: resumes

    big.write_bytes(np.random.default_rng(1).bytes(9 << 20))  # another checkpoint of the same size
    result = CliRunner().invoke(main, ["launch", str(recipe), "--run-dir", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert (f"policy.path: {policy}: its model's files differ from those this run started with (digest "
            f"{digests['policy.path']}, now {model_fingerprint(str(policy))}), and its kept samples came from that; "
            "restore it, or relaunch with --redo generate") in one_line(result.output)
    assert json.loads((run_dir / "state.json").read_text()) == state  # nothing touched
    assert check_inputs_unchanged(cfg, state, ("generate",))["policy.path"] != digests["policy.path"]
    assert check_inputs_unchanged(cfg, {**state, "config_hash": "0" * 16}, ())  # another config, nothing kept

    big.write_bytes(np.random.default_rng(0).bytes(9 << 20))  # the policy restored; the reference edited
    (reference / "config.json").write_text((reference / "config.json").read_text().replace("{", '{"edited": 1, ', 1))
    with pytest.raises(ConfigError, match="rewards.implicit.reward_reference.path: .* its model's files differ .* "
                                          "kept scores .* --redo score"):
        check_inputs_unchanged(cfg, state, ("pairs",))
    assert check_inputs_unchanged(cfg, state, ("score",))["policy.path"] == digests["policy.path"]


def test_rescore_replace_takes_over_the_shards_of_a_stopped_rescore(finished_run, tmp_path):
    """A rescore stopped mid-write (a full disk) left shards without a manifest: the rerun was refused ("not
    empty") and --replace refused it too ("a directory of other things")."""
    run_dir = copy_run(finished_run, tmp_path)
    out = run_dir / "iter-1" / "scores-a1"
    assert invoke("rescore", run_dir / "iter-1" / "scores", "--output", out).exit_code == 0
    (out / "manifest.json").unlink()
    (out / "README.md").unlink()
    stopped = snapshot(out)
    assert invoke("rescore", run_dir / "iter-1" / "scores", "--output", out).exit_code == 2
    result = invoke("rescore", run_dir / "iter-1" / "scores", "--output", out, "--replace")
    assert result.exit_code == 0, result.output
    (trashed,) = run_dir.glob("trash-*/iter-1/scores-a1")
    assert snapshot(trashed) == stopped and read_dataset(out, "scores").num_rows == 16
