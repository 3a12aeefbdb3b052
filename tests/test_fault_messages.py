"""Faults that once gave tracebacks: a model that needs its own code, damaged weights or state.json, prompts
without the anchor language (refused before Ray starts), a full disk while saving the policy, and a prompt whose
anchor rows failed under engines.max_failed_share (dropped whole, counted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from rayalign.cli import main

LONG_PROMPT = "word " * 5000  # more tokens than the tiny model's 4096-position context


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def prompt_file(path: Path, ids: int, long_ids: dict[str, str] = {}, drop: set = frozenset()) -> Path:  # noqa: B006
    """`ids` parallel prompts in en and de; (prompt_id -> lang) entries of `long_ids` get LONG_PROMPT; (prompt_id,
    lang) pairs in `drop` are left out."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(ids):
            for lang in ("en", "de"):
                if (f"p{i}", lang) in drop:
                    continue
                text = LONG_PROMPT if long_ids.get(f"p{i}") == lang else f"Say something about number {i}."
                f.write(json.dumps({"prompt_id": f"p{i}", "lang": lang, "instruction": text}) + "\n")
    return path


def recipe_file(path: Path, model: str, prompts: Path, extra: str = "") -> Path:
    path.write_text(f"name: faults\nlanguages: [en, de]\npolicy: {{path: {model}}}\n"
                    f"prompts: {{path: {prompts}, limit: 4}}\nsampling: {{n: 2, max_new_tokens: 8, seed: 5}}\n"
                    "engines: {count: 1, batch_size: 8, shard_rows: 2}\n" + extra)
    return path


# ---- refused before Ray starts: the run directory is not even created (plan.json is written once Ray runs) ----

def remote_code_model(tiny_model: str, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny model under a model type transformers does not know, defined by its own (marker-writing) code."""
    model, marker = tmp_path / "custom-model", tmp_path / "remote-code-ran"
    shutil.copytree(tiny_model, model)
    (model / "modeling_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "custom-llama", "auto_map": {"AutoConfig": "modeling_custom.CustomConfig",
                                                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def test_a_model_that_needs_its_own_code_is_refused_before_ray_starts_naming_the_key(tmp_path, tiny_model):
    from rayalign.config import load_config
    from rayalign.preflight import check_sources

    model, marker = remote_code_model(tiny_model, tmp_path)
    prompts = prompt_file(tmp_path / "prompts.jsonl", 2)
    run_dir = tmp_path / "run"
    result = invoke("launch", recipe_file(tmp_path / "recipe.yaml", str(model), prompts), "--run-dir", run_dir)
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"policy.path: {model}: this model needs its own Python code" in message
    assert "auto_map: AutoConfig -> modeling_custom.CustomConfig" in message
    assert "set policy.trust_remote_code: true if you trust the code it ships" in message
    assert not run_dir.exists() and not marker.exists()
    # trusted, the check lets it through (the model's code then runs where the model is loaded)
    check_sources(load_config(None, [f"policy.path={model}", "policy.trust_remote_code=true",
                                     f"prompts.path={prompts}", "languages=[en,de]"]))


@pytest.mark.parametrize("damage, expected", [
    ("truncate-weights", "model.safetensors: damaged or incomplete weights file (Error while deserializing header"),
    ("garble-config", "config.json: "),
])
def test_a_damaged_model_directory_is_refused_before_ray_starts_naming_the_file(tmp_path, tiny_model, damage,
                                                                               expected):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    if damage == "truncate-weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (model / "config.json").write_text((model / "config.json").read_text()[:40])
    run_dir = tmp_path / "run"
    result = invoke("launch", recipe_file(tmp_path / "recipe.yaml", str(model),
                                          prompt_file(tmp_path / "prompts.jsonl", 2)), "--run-dir", run_dir)
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
    assert not run_dir.exists()


def test_prompt_ids_without_the_anchor_language_are_refused_before_ray_starts(tmp_path, tiny_model):
    prompts = prompt_file(tmp_path / "prompts.jsonl", 3, drop={("p1", "en"), ("p2", "en")})
    run_dir = tmp_path / "run"
    result = invoke("launch", recipe_file(tmp_path / "recipe.yaml", tiny_model, prompts), "--run-dir", run_dir)
    assert result.exit_code == 2, result.output
    assert f"{prompts}: 2 prompt_id(s) lack languages: p1: en; p2: en" in " ".join(result.output.split())
    assert not run_dir.exists()


# ---- a damaged state.json ----

@pytest.mark.parametrize("text, problem", [
    ('{\n  "config_hash": "b3669e13', "is not valid JSON (Unterminated string"),
    ("[]", "holds a JSON list, not an object"),
    ('{"finished": []}', "has no config_hash"),
    ('{"config_hash": "0", "finished": "iter-1/generate"}', "has no list of finished stages"),
])
def test_a_damaged_state_json_is_refused_naming_the_file_and_left_as_it_is(tmp_path, tiny_model, ray_session, text,
                                                                          problem):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(text)
    recipe = recipe_file(tmp_path / "recipe.yaml", tiny_model, prompt_file(tmp_path / "prompts.jsonl", 2))
    result = invoke("launch", recipe, "--run-dir", run_dir)
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{run_dir / 'state.json'}: {problem}" in message, result.output
    assert "move it aside and launch again" in message
    assert (run_dir / "state.json").read_text() == text and not (run_dir / "iter-1").exists()


# ---- anchor rows that failed by themselves: the prompt is dropped whole, and counted ----

def test_dropping_prompts_without_enough_anchor_rows_by_hand():
    from rayalign.anchor_groups import drop_prompts_without_anchor

    rows = [("a", "en"), ("a", "en"), ("a", "de"), ("b", "en"), ("b", "de"), ("b", "de"), ("c", "de"), ("d", "en")]
    table = pa.Table.from_pylist([{"prompt_id": p, "lang": lang, "row": i} for i, (p, lang) in enumerate(rows)])
    kept, dropped = drop_prompts_without_anchor(table, "en", 2)
    assert dropped == ["b", "c", "d"] and kept.column("row").to_pylist() == [0, 1, 2]
    kept, dropped = drop_prompts_without_anchor(table, "en", 1)
    assert dropped == ["c"] and kept.column("row").to_pylist() == [0, 1, 2, 3, 4, 5, 7]
    kept, dropped = drop_prompts_without_anchor(table, "en", 1, other_rows=1)
    assert dropped == ["c", "d"] and kept.column("row").to_pylist() == [0, 1, 2, 3, 4, 5]
    assert drop_prompts_without_anchor(table, "en", 0) == (table, [])


@pytest.mark.parametrize("setting, stage", [
    ("rewards: {latent: {enabled: true}, actors: 1}\n", "score"),
    ("rewards: {implicit: {enabled: true, prompt: cross_lingual, reward_reference: {path: MODEL}}, actors: 1}\n",
     "score"),
    ("pairs: {method: lidr}\n", "pairs"),
])
def test_a_failed_anchor_row_under_max_failed_share_drops_its_prompt_and_the_run_finishes(tmp_path, tiny_model,
                                                                                          ray_session, setting, stage):
    """p1's English prompt is longer than the context: its generation fails. Within engines.max_failed_share the
    relaunch finishes; p1 is dropped in every language, counted in metrics.jsonl and named on screen (latent
    rewards and ICR's cross-lingual prompt in the score stage, LIDR's translations in the pairs stage)."""
    from rayalign.data.store import read_dataset

    prompts = prompt_file(tmp_path / "prompts.jsonl", 4, {"p1": "en"})
    recipe = recipe_file(tmp_path / "recipe.yaml", tiny_model, prompts, setting.replace("MODEL", tiny_model))
    run_dir = tmp_path / "run"
    stopped = invoke("launch", recipe, "--run-dir", run_dir)  # 1 of 8 rows > the default 1%
    assert stopped.exit_code == 2 and "1 of 8 rows (12.50%) failed" in " ".join(stopped.output.split())
    resumed = invoke("launch", recipe, "--run-dir", run_dir, "-o", "engines.max_failed_share=0.2")
    assert resumed.exit_code == 0, resumed.output
    assert "dropped 1 prompt(s) in every language (2 rows): p1" in " ".join(resumed.output.split())
    output = read_dataset(run_dir / "iter-1" / {"score": "scores", "pairs": "pairs"}[stage])
    assert sorted(set(output.column("prompt_id").to_pylist())) == ["p0", "p2", "p3"]
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if f'"stage": "{stage}"' in line][-1]
    assert (record["dropped_prompts"], record["dropped_rows"]) == (1, 2)
    if stage == "score":
        assert record["samples"] == output.num_rows == 12
    errors = read_dataset(run_dir / "iter-1" / "errors", "errors").to_pylist()
    assert [(e["stage"], e["prompt_id"], e["lang"]) for e in errors] == [("generate", "p1", "en")]


# ---- a full disk while saving the policy ----

def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


WRITE_PROBE = """
import sys
import numpy as np
import torch
from safetensors.numpy import save_file
from rayalign.actors.trainer import write_failure
for write in (lambda: save_file({"x": np.zeros(1 << 20)}, sys.argv[1] + "/w.safetensors"),
              lambda: torch.save({"x": torch.zeros(1 << 20)}, sys.argv[1] + "/w.pt"),
              lambda: (_ for _ in ()).throw(ValueError("not a write"))):
    try:
        write()
    except Exception as e:
        print(f"{type(e).__name__}|{isinstance(e, OSError)}|{write_failure(e)}")
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -m and tmpfs mounts (root)")
def test_full_disk_errors_of_safetensors_and_torch_are_recognised_as_failed_writes(tmp_path):
    """On a real full file system (1 MiB tmpfs) safetensors raises SafetensorError and torch.save a RuntimeError
    ("unexpected pos"), neither an OSError: both are still named as failed writes; other errors are not."""
    (tmp_path / "probe.py").write_text(WRITE_PROBE)
    mount = tmp_path / "full"
    mount.mkdir()
    out = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount} && "
                          f"{sys.executable} {tmp_path / 'probe.py'} {mount}"], capture_output=True, text=True,
                         timeout=600, check=True).stdout.splitlines()
    assert out == ["SafetensorError|False|Error while serializing: I/O error: No space left on device (os error 28)",
                   out[1], "ValueError|False|None"]
    assert out[1].startswith("RuntimeError|False|[enforce fail at inline_container.cc")
    assert out[1].endswith("a failed write; is the disk full?")


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -m and tmpfs mounts (root)")
def test_a_full_disk_while_saving_the_policy_names_the_path_and_loses_nothing(tmp_path, tiny_model):
    """The run directory is a 1 MiB tmpfs in a private mount namespace: samples, scores and pairs fit, the 4 MiB
    policy does not. The launch stops with the policy's path and exit 2, no traceback; the earlier stages'
    datasets validate, and the same run directory with room again finishes training only."""
    prompts = prompt_file(tmp_path / "prompts.jsonl", 4)
    recipe = recipe_file(tmp_path / "recipe.yaml", tiny_model, prompts,
                         "rewards: {latent: {enabled: true}, actors: 1}\npairs: {method: lacomsa, truncated: keep}\n"
                         "training: {loss: dpo, micro_batch_size: 2, gradient_accumulation: 1, world_size: 1, "
                         "num_cpus: 1}\n")
    run_dir, kept = tmp_path / "run", tmp_path / "kept"
    run_dir.mkdir()
    launch = f"{sys.executable} -m rayalign.cli launch {recipe} --run-dir {run_dir}"
    script = (f"mount -t tmpfs -o size=1m tmpfs {run_dir} && {{ {launch} > {tmp_path}/out.txt 2>&1; "
              f"echo $? > {tmp_path}/rc.txt; cp -a {run_dir}/. {kept}/; }}")
    subprocess.run(["unshare", "-m", "sh", "-c", script], check=True, timeout=1500)
    output = (tmp_path / "out.txt").read_text()
    message = " ".join(output.split())
    assert (tmp_path / "rc.txt").read_text().strip() == "2", output[-3000:]
    assert f"{run_dir}/iter-1/policy: the trained policy could not be saved" in message, output[-3000:]
    assert "No space left on device" in message and "Traceback" not in output
    for dataset in ("samples", "scores", "pairs"):
        assert invoke("validate", kept / "iter-1" / dataset).exit_code == 0, dataset
    state = json.loads((kept / "state.json").read_text())
    assert state["finished"] == ["iter-1/generate", "iter-1/score", "iter-1/pairs"]
    resumed = subprocess.run([sys.executable, "-m", "rayalign.cli", "launch", str(recipe), "--run-dir", str(kept)],
                             capture_output=True, text=True, timeout=1500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for stage in ("generate", "score", "pairs"):
        assert f"iter-1/{stage}: finished earlier, kept" in resumed.stderr
    assert (kept / "iter-1" / "policy" / "model.safetensors").is_file()
