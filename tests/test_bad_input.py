"""Bad input through the user's path, the CLI (issue 7): the message names the thing, nothing written is lost.

Already covered elsewhere, at the library level (message only), and not repeated here:
malformed YAML, a missing recipe, unknown keys and wrong types (tests/test_config.py: test_malformed_yaml_and_missing_file,
test_unknown_key_in_file_names_file_and_key, test_wrong_type_in_file, test_bad_overrides_name_the_key; the CLI's exit 2
in tests/test_cli.py: test_bad_inputs_exit_cleanly_with_the_key); prompt sets with missing languages, duplicate ids,
empty prompts, invalid UTF-8 or a missing file (tests/test_prompts.py); over-long prompts, which go to the errors
dataset (tests/test_resilience.py: test_failed_rows_go_to_the_errors_dataset_and_the_run_finishes); another schema
version, a truncated shard and a checksum mismatch in read_dataset (tests/test_store.py); NaN in check_finite
(tests/test_rewards_pipeline.py); a model directory without a tokenizer in load_tokenizer (tests/test_models.py);
a cluster spec that cannot fit, `rayalign plan` exit 2 (tests/test_cli_plan.py: test_plan_refusal_exits_2_with_the_reason).
The tests below add what those do not check: the CLI's clean exit and that an existing run or dataset is untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from rayalign.cli import main
from rayalign.data.schemas import schema_for
from rayalign.data.store import DatasetWriter, read_dataset


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line(output: str) -> str:
    """rich wraps long messages; compare on the text with the line breaks removed."""
    return "".join(output.split("\n"))


def snapshot(directory: Path) -> dict:
    """Every file under `directory` with its bytes and modification time."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def samples_dataset(path: Path, shards: int = 2) -> Path:
    schema = schema_for("samples")[1]
    writer = DatasetWriter(path, "samples", config_hash="abc", languages=["en"])
    for s in range(shards):
        writer.write_shard(s, pa.Table.from_pylist(
            [{"prompt_id": f"p{s}{i}", "lang": "en", "messages": [{"role": "user", "content": "hi"}],
              "reference": None, "source": "test", "sample_idx": 0, "response": "hello", "num_tokens": 2,
              "finish_reason": "stop", "seed": i, "policy": "tiny", "lang_detected": "en"} for i in range(3)],
            schema=schema))
    writer.finalize(expected_shards=shards)
    return path


@pytest.fixture
def existing_run(tmp_path) -> Path:
    """A run directory as a finished generation leaves it: state, config and a samples dataset."""
    run_dir = tmp_path / "run"
    samples_dataset(run_dir / "iter-1" / "samples")
    (run_dir / "state.json").write_text(json.dumps({"config_hash": "abc", "finished": ["iter-1/generate"]}))
    (run_dir / "config.yaml").write_text("name: earlier\n")
    return run_dir


def recipe(tmp_path: Path, model: str, prompts: Path | str, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: bad\nlanguages: [en, de]\npolicy: {{path: {model}}}\n"
                    f"prompts: {{path: {prompts}, limit: 2}}\n"
                    "sampling: {n: 2, max_new_tokens: 4, seed: 1}\n"
                    "engines: {count: 1, batch_size: 8, shard_rows: 2}\n" + extra)
    return path


# ---- recipes ----

@pytest.mark.parametrize("text, overrides, expected", [
    ("sampling: {n: 2\nname: [\n", [], "malformed YAML"),
    ("sampling:\n  n: 2\n  temprature: 0.3\n", [], "sampling.temprature: unknown key"),
    ("sampling: {max_new_tokens: long}\n", [], "sampling.max_new_tokens: expected an integer, got str 'long'"),
    ("name: x\n", ["-o", "engines.count=two"], "engines.count: expected an integer >= 1 or auto, got 'two'"),
    ("name: x\n", ["-o", "engines.cuont=2"], "override engines.cuont: unknown key 'cuont' in engines"),
])
def test_bad_recipe_on_an_existing_run_exits_2_and_leaves_the_run_untouched(existing_run, tmp_path, text, overrides,
                                                                            expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    before = snapshot(existing_run)
    result = invoke("launch", path, "--run-dir", existing_run, *overrides)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert expected in one_line(result.output)
    if not overrides:
        assert str(path) in one_line(result.output)  # the file is named
    assert snapshot(existing_run) == before


# ---- prompt sets and missing files, through `rayalign launch` ----

def prompt_dir(tmp_path: Path, en: bytes, de: bytes | None) -> Path:
    d = tmp_path / "prompts"
    d.mkdir()
    (d / "en.jsonl").write_bytes(en)
    if de is not None:
        (d / "de.jsonl").write_bytes(de)
    return d


def line(pid, text) -> bytes:
    return json.dumps({"instruction_id": pid, "instruction": text}).encode() + b"\n"


@pytest.mark.parametrize("en, de, expected", [
    (line(0, "q") + line(1, "r"), line(0, "f"), "1 prompt_id(s) lack languages: 1: de"),
    (line(0, "q") + line(0, "r"), line(0, "f"), "en.jsonl:2: duplicate (prompt_id, lang) ('0', 'en')"),
    (line(0, "q"), line(0, "   "), "de.jsonl:1: empty prompt for prompt_id 0 (de)"),
    (line(0, "q"), b'{"instruction_id": 0, "instruction": "\xff"}\n', "de.jsonl:1: invalid UTF-8 (byte 0xff"),
    (line(0, "q"), None, "no prompt file for language 'de'"),
])
def test_bad_prompt_set_exits_2_naming_file_and_row_and_keeps_the_run(existing_run, tmp_path, tiny_model, ray_session,
                                                                      en, de, expected):
    prompts = prompt_dir(tmp_path, en, de)
    before = snapshot(existing_run)
    result = invoke("launch", recipe(tmp_path, tiny_model, prompts), "--run-dir", existing_run)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert expected in one_line(result.output)
    assert snapshot(existing_run) == before  # checked before the run directory is touched


def test_missing_prompt_source_and_model_dir_are_named(tmp_path, tiny_model, ray_session):
    result = invoke("launch", recipe(tmp_path, tiny_model, tmp_path / "no-prompts"), "--run-dir", tmp_path / "r1")
    assert result.exit_code == 2 and f"{tmp_path / 'no-prompts'}: prompt source not found" in one_line(result.output)
    assert not (tmp_path / "r1" / "state.json").exists()  # only launch's plan.json
    from conftest import PROMPTS_DIR

    result = invoke("launch", recipe(tmp_path, str(tmp_path / "no-model"), PROMPTS_DIR), "--run-dir", tmp_path / "r2")
    assert result.exit_code == 2 and f"{tmp_path / 'no-model'}: " in one_line(result.output)


def test_model_dir_without_tokenizer_is_refused_before_work_starts(existing_run, tmp_path, tiny_model, ray_session):
    from conftest import PROMPTS_DIR

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model) / f, bare / f)
    run_dir = tmp_path / "fresh"
    result = invoke("launch", recipe(tmp_path, str(bare), PROMPTS_DIR), "--run-dir", run_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{bare}: no tokenizer" in one_line(result.output)
    assert not list(run_dir.glob("iter-*"))  # no actor was started, no shard written


# ---- datasets: `rayalign validate`, and nothing is rewritten ----

def edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def truncate(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def flip_bytes(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8):  # inside the column data; the size stays the same
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))


def wrong_checksum(path: Path) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, expected", [
    (lambda ds: edit_manifest(ds, schema_version=99), "schema samples version 99, this rayalign"),
    (lambda ds: truncate(ds / "part-00001.parquet"), "part-00001.parquet: sha256 does not match the manifest"),
    (lambda ds: flip_bytes(ds / "part-00000.parquet"), "part-00000.parquet: sha256 does not match the manifest"),
    (wrong_checksum, "part-00001.parquet: sha256 does not match the manifest"),
])
def test_damaged_dataset_fails_validate_naming_the_file_and_is_not_rewritten(tmp_path, damage, expected):
    ds = samples_dataset(tmp_path / "samples")
    damage(ds)
    before = snapshot(ds)
    result = invoke("validate", ds)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert expected in one_line(result.output)
    assert invoke("inspect", ds).exit_code == 2  # inspect refuses it too, cleanly
    assert snapshot(ds) == before


def test_damaged_samples_stop_the_next_stage_and_keep_the_run(tmp_path, tiny_model, ray_session):
    """A run whose samples shard was damaged after generation: scoring refuses it, naming the shard."""
    from conftest import PROMPTS_DIR

    run_dir = tmp_path / "run"
    path = recipe(tmp_path, tiny_model, PROMPTS_DIR, "rewards: {latent: {enabled: true}, actors: 1}\n")
    generated = invoke("generate", path, "--run-dir", run_dir)
    assert generated.exit_code == 0, generated.output
    flip_bytes(run_dir / "iter-1" / "samples" / "part-00000.parquet")
    before = snapshot(run_dir / "iter-1")
    result = invoke("score", path, "--run-dir", run_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "part-00000.parquet: sha256 does not match the manifest" in one_line(result.output)
    assert snapshot(run_dir / "iter-1") == before and not (run_dir / "iter-1" / "scores").exists()


def test_single_stage_commands_run_only_the_iterations_whose_inputs_exist(tmp_path, tiny_model, ray_session):
    """`rayalign generate` on a two-iteration training recipe generated iteration 2 with the starting policy and
    marked both iterations summarised, so a later launch kept those samples; `rayalign pairs` in a new directory
    failed on a missing scores directory."""
    from conftest import PROMPTS_DIR

    run_dir = tmp_path / "run"
    path = recipe(tmp_path, tiny_model, PROMPTS_DIR, "iterations: 2\nrewards: {latent: {enabled: true}, actors: 1}\n"
                  "pairs: {method: lacomsa}\ntraining: {loss: dpo, micro_batch_size: 2, num_cpus: 1}\n")
    result = invoke("pairs", path, "--run-dir", run_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"{run_dir}: the pairs stage needs iter-1/score's output, which this run has not finished: run "
            "`rayalign score RECIPE` (same --run-dir) first") in one_line(result.output)
    assert not (run_dir / "state.json").exists()
    result = invoke("generate", path, "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    assert "iter-2: not run; it starts from iter-1's trained policy" in one_line(result.output)
    assert json.loads((run_dir / "state.json").read_text())["finished"] == ["iter-1/generate"]
    assert not (run_dir / "iter-2").exists()


def test_a_stage_command_whose_actors_do_not_fit_is_refused_as_launch_is(tmp_path, tiny_model, ray_session):
    """`rayalign generate -o engines.count=5` on 2 CPUs waited for actors that could never start ("waiting 180 s for
    3 of 5 generation actors to start", over and over) where launch refused at once."""
    from conftest import PROMPTS_DIR

    run_dir = tmp_path / "run"
    path = recipe(tmp_path, tiny_model, PROMPTS_DIR, "")
    result = invoke("generate", path, "--run-dir", run_dir, "-o", "engines.count=500")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "generate: 500 actors x 1 CPUs do not fit on local" in one_line(result.output)
    assert "set engines.count <= 4" in one_line(result.output)
    assert not (run_dir / "iter-1" / "samples").exists()


# ---- NaN or infinite rewards from a user reward file ----

def test_nan_user_reward_names_the_reward_file_and_the_prompt_and_keeps_the_samples(tmp_path, tiny_model,
                                                                                     ray_session):
    from conftest import PROMPTS_DIR

    second_id = json.loads((PROMPTS_DIR / "en.jsonl").read_text().splitlines()[1])["instruction_id"]
    reward = tmp_path / "my_reward.py"
    reward.write_text("import math\n\ndef reward(group):\n"
                      "    return [math.nan if (s['prompt_id'], s['lang'], s['sample_idx']) == (PID, 'de', 1) else 1.0 "
                      "for s in group]\n".replace("PID", repr(second_id)))
    path = recipe(tmp_path, tiny_model, PROMPTS_DIR, f"rewards: {{user: {{path: {reward}}}, actors: 1}}\n")
    run_dir = tmp_path / "run"
    result = invoke("launch", path, "--run-dir", run_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = one_line(result.output)
    assert f"{reward}:reward" in message and "nan" in message
    assert f"prompt_id {str(second_id)!r} (de) sample 1" in message
    samples = run_dir / "iter-1" / "samples"
    kept = snapshot(samples)
    assert read_dataset(samples, "samples").num_rows == 8 and not (run_dir / "iter-1" / "scores").exists()
    assert list((run_dir / "iter-1" / "scores.forward").glob("part-*.parquet"))  # forward passes kept for resume

    reward.write_text(reward.read_text().replace("math.nan", "math.inf"))
    result = invoke("launch", path, "--run-dir", run_dir)
    assert result.exit_code == 2 and "inf" in one_line(result.output) and f"{reward}:reward" in one_line(result.output)
    reward.write_text("def reward(group):\n    return [1.0 for s in group]\n")  # fixed: launching again resumes
    result = invoke("launch", path, "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    assert snapshot(samples) == kept
    assert read_dataset(run_dir / "iter-1" / "scores", "scores").column("r_user").to_pylist() == [1.0] * 8


# ---- files the rewards read, checked before Ray starts ----

def test_missing_centroid_text_and_dco_candidates_are_named_before_ray_starts(tmp_path, tiny_model):
    """A typo in rewards.latent.centroid_texts or rewards.consistency.candidates_path: exit 2 naming the key and the
    path, before the cluster is connected (launch writes plan.json once it is) and before any work."""
    from conftest import PROMPTS_DIR

    (tmp_path / "en.txt").write_text("The cat sleeps.\n", encoding="utf-8")
    path = recipe(tmp_path, tiny_model, PROMPTS_DIR, "rewards:\n  latent:\n    enabled: true\n    centroid_texts:\n"
                  "      en: en.txt\n      de: de.tx\n")
    result = invoke("launch", path, "--run-dir", tmp_path / "r1")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "rewards.latent.centroid_texts.de: de.tx not found (a relative path is taken from the recipe's directory" \
        in one_line(result.output)
    assert not (tmp_path / "r1").exists()

    missing = tmp_path / "no-candidates"
    path = recipe(tmp_path, tiny_model, PROMPTS_DIR, f"rewards: {{consistency: {{enabled: true, candidates_path: "
                  f"{missing}}}}}\npairs: {{method: dco}}\ntraining: {{loss: dco}}\n")
    result = invoke("launch", path, "--run-dir", tmp_path / "r2")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert (f"rewards.consistency.candidates_path: {missing}: candidate set directory not found"
            in one_line(result.output))
    assert not (tmp_path / "r2").exists()
