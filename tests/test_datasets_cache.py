"""Every rayalign dataset directory loads as itself with `datasets.load_dataset(dir)`, also when many
directories share one name (iter-1/samples, iter-2/samples, another run's samples) and one cache."""

import polars as pl
import pytest
from click.testing import CliRunner

from rayalign.cli import main

datasets = pytest.importorskip("datasets")


def launch(tmp, name, seed, tiny_model):
    from conftest import PROMPTS_DIR

    recipe = tmp / f"{name}.yaml"
    recipe.write_text(f"name: {name}\niterations: 2\nlanguages: [en, de]\npolicy: {{path: {tiny_model}}}\n"
                      f"prompts: {{path: {PROMPTS_DIR}, limit: {4 + seed}}}\n"
                      f"sampling: {{n: 2, max_new_tokens: 8, seed: {seed}}}\n"
                      "engines: {count: 1, batch_size: 16, shard_rows: 4}\n"
                      "rewards: {latent: {enabled: true}, actors: 1}\npairs: {method: lacomsa, truncated: keep}\n"
                      "training: {loss: dpo, micro_batch_size: 2, gradient_accumulation: 1, world_size: 1}\n")
    run_dir = tmp / name
    result = CliRunner().invoke(main, ["launch", "--cluster", "local", str(recipe), "--run-dir", str(run_dir)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return run_dir


def test_same_named_dataset_dirs_under_one_cache_load_as_themselves(tmp_path, tiny_model, ray_session,
                                                                    small_tracked_run):
    # two runs of two iterations: conftest's small_tracked_run (4 prompts, seed 0; shared with test_tracking) and
    # one launched here (6 prompts, seed 2)
    runs = [small_tracked_run, launch(tmp_path, "second", 2, tiny_model)]
    cache = tmp_path / "hf-datasets-cache"
    dirs = [run / f"iter-{t}" / kind for run in runs for t in (1, 2) for kind in ("samples", "scores", "pairs")]
    for path in dirs:
        loaded = datasets.load_dataset(str(path), split="train", cache_dir=str(cache)).to_polars()
        expected = pl.read_parquet(path / "*.parquet")
        assert loaded.height == expected.height, path
        key = ["prompt_id", "lang"] + (["sample_idx"] if "sample_idx" in expected.columns else [])
        assert loaded.sort(key).equals(expected.sort(key)), path
    # a stale cache hit would show: the runs differ in size, the iterations of one run in content
    first, second = (pl.read_parquet(run / "iter-1" / "samples" / "*.parquet") for run in runs)
    assert first.height != second.height
    assert not pl.read_parquet(runs[0] / "iter-2" / "samples" / "*.parquet").equals(first)
