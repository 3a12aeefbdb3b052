"""The README's main job, exactly: `rayalign launch --cluster local examples/quickstart.yaml`."""

import json
import subprocess
import sys

import polars as pl
import pytest

from conftest import REPO
from rayalign.data.store import read_dataset

LANGS = ["en", "es", "de", "fr", "ru"]


def test_quickstart_through_the_console_script(tmp_path):
    run_dir = tmp_path / "quickstart"
    cmd = ["rayalign", "launch", "--cluster", "local", "examples/quickstart.yaml", "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = run_dir / "iter-1" / "samples"
    assert subprocess.run(["rayalign", "validate", str(samples)], capture_output=True).returncode == 0
    table = read_dataset(samples, "samples")
    df = pl.read_parquet(samples / "*.parquet")
    counts = df.group_by("prompt_id", "lang").len()
    assert counts.height == 64 * 5 and set(counts["len"].to_list()) == {4}
    assert table.num_rows == df.height == 64 * 5 * 4
    # the trained tiny model answers in the prompt's language most of the time
    match = df.group_by("lang").agg((pl.col("lang_detected") == pl.col("lang")).mean().alias("share"))
    assert match["share"].min() > 0.5, match
    inspect = subprocess.run(["rayalign", "inspect", str(run_dir)], capture_output=True, text=True)
    assert inspect.returncode == 0 and all(lang in inspect.stdout for lang in LANGS)
    assert json.loads((run_dir / "state.json").read_text())["finished"] == [
        "iter-1/generate", "iter-1/score", "iter-1/pairs"]
    scores = read_dataset(run_dir / "iter-1" / "scores", "scores")
    assert scores.num_rows == 64 * 5 * 4 and scores.column("r_lacomsa").null_count == 0
    datasets = pytest.importorskip("datasets")
    pairs = datasets.load_dataset("parquet", data_files=str(run_dir / "iter-1" / "pairs" / "*.parquet"), split="train")
    assert pairs.num_rows > 0.9 * 64 * 5  # one per (prompt, language) unless best and worst tie
    assert pairs[0]["chosen"][0]["role"] == "assistant" and pairs[0]["prompt"][0]["role"] == "user"


