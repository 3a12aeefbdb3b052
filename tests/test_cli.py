"""The real CLI end to end on the tiny model and the session's Ray instance."""

import json
import shutil

import polars as pl
import pytest
from click.testing import CliRunner

from rayalign.cli import main
from rayalign.data.store import read_dataset


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model, ray_session):
    """One `rayalign launch` shared by the tests below (K = 2 actors, 4 prompts x 3 languages, n = 2)."""
    tmp = tmp_path_factory.mktemp("cli")
    from conftest import PROMPTS_DIR

    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"name: clitest\nlanguages: [en, de, ru]\npolicy: {{path: {tiny_model}}}\n"
                      f"prompts: {{path: {PROMPTS_DIR}, limit: 4}}\n"
                      "sampling: {n: 2, max_new_tokens: 12, seed: 3}\n"
                      "engines: {count: 2, batch_size: 8, shard_rows: 4}\n")
    run_dir = tmp / "run"
    result = invoke("launch", "--cluster", "local", recipe, "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    return recipe, run_dir, result


def test_launch_writes_a_valid_samples_dataset(launched):
    recipe, run_dir, result = launched
    samples = run_dir / "iter-1" / "samples"
    table = read_dataset(samples, "samples")
    df = pl.read_parquet(samples / "*.parquet")
    assert df.height == table.num_rows == 4 * 3 * 2
    counts = df.group_by("prompt_id", "lang").len()
    assert counts.height == 12 and counts["len"].to_list() == [2] * 12
    assert (run_dir / "config.yaml").is_file() and json.loads((run_dir / "state.json").read_text())["finished"] == [
        "iter-1/generate", "iter-1/summary"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["stage"] == "generate" and metrics[0]["samples"] == 24 and metrics[0]["samples_per_s"] > 0
    manifest = json.loads((samples / "manifest.json").read_text())
    assert manifest["rows"] == 24 and len(manifest["shards"]) == 3 and manifest["seeds"]["run_seed"] == 3


def test_datasets_library_reads_the_shards(launched):
    datasets = pytest.importorskip("datasets")
    _, run_dir, _ = launched
    ds = datasets.load_dataset("parquet", data_files=str(run_dir / "iter-1" / "samples" / "part-*.parquet"),
                               split="train")
    assert ds.num_rows == 24 and ds[0]["messages"][0]["role"] == "user"
    local = datasets.load_dataset(str(run_dir / "iter-1" / "samples"), split="train")
    assert local.num_rows == 24


def test_validate_and_inspect(launched):
    _, run_dir, _ = launched
    result = invoke("validate", run_dir / "iter-1" / "samples")
    assert result.exit_code == 0 and "24 rows" in result.output and "checksums match" in result.output
    result = invoke("inspect", run_dir)
    assert result.exit_code == 0
    for column in ("lang", "rows", "chars", "tokens", "stopped", "lang_match"):
        assert column in result.output
    assert "generate" in result.output  # metrics table


def test_relaunch_resumes_and_keeps_finished_stage(launched, monkeypatch):
    import rayalign.data.prompts

    recipe, run_dir, _ = launched
    before = (run_dir / "iter-1" / "samples" / "manifest.json").read_text()
    parsed, real = [], rayalign.data.prompts._read

    def counted(path):
        parsed.append(path.name)
        return real(path)

    monkeypatch.setattr(rayalign.data.prompts, "_read", counted)
    monkeypatch.setattr(rayalign.data.prompts, "_LOADED", {})  # as a new process starts
    result = invoke("launch", recipe, "--run-dir", run_dir)
    assert result.exit_code == 0 and "finished earlier, kept" in result.output
    assert (run_dir / "iter-1" / "samples" / "manifest.json").read_text() == before
    # the recipe check, the digest check before Ray, the plan's estimate and the run share one parse of each file
    assert parsed and len(parsed) == len(set(parsed)), parsed


def test_interrupted_generation_redoes_only_missing_shards(launched, tmp_path):
    recipe, run_dir, _ = launched
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    samples = copy / "iter-1" / "samples"
    full = read_dataset(samples)
    (samples / "manifest.json").unlink()  # as if killed before the manifest: one shard lost, one half-written
    (samples / "part-00001.parquet").unlink()
    (samples / "part-00002.parquet.tmp").write_bytes(b"partial")
    state = json.loads((copy / "state.json").read_text())
    state["finished"] = []
    (copy / "state.json").write_text(json.dumps(state))
    kept = (samples / "part-00000.parquet").stat().st_mtime_ns
    result = invoke("launch", recipe, "--run-dir", copy)
    assert result.exit_code == 0, result.output
    assert (samples / "part-00000.parquet").stat().st_mtime_ns == kept
    assert read_dataset(samples).equals(full)
    metrics = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    generate = [m for m in metrics if m["stage"] == "generate"]
    assert generate[-1]["resumed_shards"] == 2 and generate[-1]["new_samples"] == 8


def test_changed_config_is_refused_for_the_same_run_dir(launched):
    recipe, run_dir, _ = launched
    result = invoke("launch", recipe, "--run-dir", run_dir, "-o", "sampling.n=3")
    assert result.exit_code == 2 and "holds a run with another config" in result.output


def test_bad_inputs_exit_cleanly_with_the_key(tmp_path):
    result = invoke("launch", tmp_path / "missing.yaml")
    assert result.exit_code == 2 and "recipe file not found" in result.output
    (tmp_path / "r.yaml").write_text("sampling: {temperature: -1}\n")
    result = invoke("launch", tmp_path / "r.yaml")
    assert result.exit_code == 2 and "sampling.temperature: expected a value >= 0.0" in result.output
    result = invoke("launch", "--cluster", "nowhere", tmp_path / "r.yaml", "-o", "sampling.temperature=1")
    assert result.exit_code == 2 and "unknown cluster 'nowhere'" in result.output
    result = invoke("validate", tmp_path)
    assert result.exit_code == 2 and "no manifest.json" in result.output


def test_every_command_has_help_with_an_example():
    listed = invoke("--help").output
    for name, command in main.commands.items():
        if command.hidden:  # internal entry points started by other commands, not listed for users
            assert f"  {name} " not in listed, name
            continue
        result = invoke(name, "--help")
        assert result.exit_code == 0 and "Example" in result.output, name


def test_a_light_command_does_not_import_ray(tmp_path):
    """A command that needs no cluster (config, with a recipe error to report) does not pay for importing Ray: the
    error handling every command shares catches TrainerLostError from rayalign.failures, not actors.trainer."""
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text("sampling: {temperature: -1}\n")
    code = ("import sys\nfrom rayalign.cli import main\n"
            "for args in (['config'], ['config', sys.argv[1]]):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print('RAY', 'ray' in sys.modules, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=120)
    assert "sampling.temperature" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "RAY False" in done.stderr, done.stderr


def test_inspect_shows_every_recorded_iteration_metric(tmp_path, monkeypatch):
    import rayalign.cli
    from rayalign.data.inspect import iteration_table

    from conftest import write_one_sample_run

    run_dir = write_one_sample_run(tmp_path / "run")
    record = {"iteration": 1, "stage": "iteration", "policy": "tiny", "pairs_rows": 24, "loss_first": 0.6931,
              "loss_mean": 0.5, "steps": 6, "dropped_too_long": 2}
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    table = iteration_table([record])
    assert table.row(0, named=True)["steps"] == 6 and table.row(0, named=True)["dropped_too_long"] == 2
    assert "steps" not in iteration_table([{k: v for k, v in record.items() if k != "steps"}]).columns
    monkeypatch.setattr(rayalign.cli.console, "width", 160)
    result = invoke("inspect", run_dir)
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
             if line.count("│") >= 3}
    assert lines["training steps"] == "6" and lines["pairs dropped, too long"] == "2"


def test_inspect_skips_a_damaged_metrics_line_and_plan(tmp_path, monkeypatch):
    """metrics.jsonl with bytes that are not UTF-8 or a stage that is not a string, a plan.json of another shape:
    inspect shows the rest (each was a traceback)."""
    import rayalign.cli

    from conftest import write_one_sample_run

    monkeypatch.setattr(rayalign.cli.console, "width", 160)
    run_dir = write_one_sample_run(tmp_path / "run")
    record = {"iteration": 1, "stage": "generate", "wall_seconds": 1.5}
    (run_dir / "metrics.jsonl").write_bytes(json.dumps(record).encode() + b"\n\xff\xfe cut\n"
                                            + json.dumps({**record, "stage": 5}).encode() + b"\n")
    for plan in ("[1, 2]", '{"estimate": {"phases": {"generate": 5}}}',
                 '{"estimate": {"phases": {"generate": {"seconds": "x"}}}}'):
        (run_dir / "plan.json").write_text(plan)
        result = invoke("inspect", run_dir)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        assert "generate" in result.output


def test_plan_on_the_local_spec_counts_the_memory_ray_gives_actors(ray_session):
    """`plan --cluster local` read the physical memory (25 GB here) while launch checks Ray's `memory` resource
    (15 GB: what was available, less the object store's share), so a plan accepted what launch then refused."""
    import ray

    from rayalign.cluster import load_cluster_spec

    planned = load_cluster_spec("local").memory_gb_per_node
    given = ray.cluster_resources()["memory"] / 1e9  # this session's Ray, started earlier under another load
    assert 0.75 * given <= planned <= 1.25 * given, (planned, given)
