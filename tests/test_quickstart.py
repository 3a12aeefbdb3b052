"""The README's main job, exactly: `rayalign launch --cluster local examples/quickstart.yaml`."""

import json
import subprocess

import polars as pl
import pytest

from conftest import REPO
from rayalign.data.store import read_dataset

LANGS = ["en", "es", "de", "fr", "ru"]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "quickstart"
    cmd = ["rayalign", "launch", "--cluster", "local", "examples/quickstart.yaml", "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_quickstart_through_the_console_script(quickstart_run):
    run_dir = quickstart_run
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
        f"iter-{t}/{stage}" for t in (1, 2) for stage in ("generate", "score", "pairs", "train", "summary")]
    assert "iterations" in inspect.stdout and "iter 2" in inspect.stdout and "pair accuracy" in inspect.stdout
    scores = read_dataset(run_dir / "iter-1" / "scores", "scores")
    assert scores.num_rows == 64 * 5 * 4 and scores.column("r_lacomsa").null_count == 0
    datasets = pytest.importorskip("datasets")
    pairs = datasets.load_dataset("parquet", data_files=str(run_dir / "iter-1" / "pairs" / "*.parquet"), split="train")
    assert pairs.num_rows > 0.9 * 64 * 5  # one per (prompt, language) unless best and worst tie
    assert pairs[0]["chosen"][0]["role"] == "assistant" and pairs[0]["prompt"][0]["role"] == "user"


def test_iteration_two_starts_from_iteration_one(quickstart_run):
    """Iteration 2 generates with iter-1/policy (a Hugging Face checkpoint), and its pairs carry iter-1/policy's
    log-probs as the training reference."""
    from rayalign.engines import ScoreRequest
    from rayalign.engines.hf import HFEngine
    from rayalign.models import resolve_model_path

    run_dir = quickstart_run
    samples = pl.from_arrow(read_dataset(run_dir / "iter-2" / "samples", "samples"))
    assert set(samples["policy"]) == {"iter-1/policy"}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summaries = [m for m in metrics if m["stage"] == "iteration"]
    assert [m["policy"] for m in summaries] == ["builtin:tiny-multilingual", "iter-1/policy"]
    # the summary's fidelity is the share of iteration 1's samples detected in the prompt's language, which the
    # tiny model keeps above one half in every language
    df = pl.read_parquet(run_dir / "iter-1" / "samples" / "*.parquet")
    share = dict(df.group_by("lang").agg((pl.col("lang_detected") == pl.col("lang")).mean()).iter_rows())
    assert {lang: summaries[0][f"fidelity_{lang}"] for lang in LANGS} == pytest.approx(share, abs=1e-4)
    assert all(m[f"fidelity_{lang}"] > 0.5 for m in summaries for lang in LANGS)
    train = [m for m in metrics if m["stage"] == "train"]
    assert len(train) == 2 and all(m["loss_first"] == pytest.approx(0.693147, abs=1e-3) for m in train)

    pairs = read_dataset(run_dir / "iter-2" / "pairs", "pairs").slice(0, 6).to_pylist()
    requests = [ScoreRequest(r["prompt"], r["chosen"][0]["content"]) for r in pairs]
    reference = [r["ref_logp_chosen"] for r in pairs]
    by_iter1 = [s.logp for s in HFEngine(str(run_dir / "iter-1" / "policy"), dtype="float32").score(requests)]
    by_start = [s.logp for s in HFEngine(resolve_model_path("builtin:tiny-multilingual"), dtype="float32")
                .score(requests)]
    assert by_iter1 == pytest.approx(reference, abs=1e-3)
    assert max(abs(a - b) for a, b in zip(by_start, reference)) > 1e-2  # training moved the policy
