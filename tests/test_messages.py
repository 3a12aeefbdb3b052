"""Messages instead of tracebacks: a wrong-typed language column, Ctrl-C, and the advice of stage commands."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from rayalign.cli import main
from rayalign.data.prompts import PromptError, load_prompts


def test_an_integer_lang_is_named_as_such_not_as_missing(tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"prompt_id": "p1", "lang": 7, "instruction": "hi"}) + "\n")
    with pytest.raises(PromptError, match=r"prompts.jsonl:1: lang must be an ISO 639-1 code such as 'de', got int 7"):
        load_prompts(source, ["en"])
    source.write_text(json.dumps({"prompt_id": "p1", "instruction": "hi"}) + "\n")
    with pytest.raises(PromptError, match=r"prompts.jsonl:1: missing lang"):
        load_prompts(source, ["en"])


def test_stage_commands_advise_a_command_that_takes_redo(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"config_hash": "0" * 16, "finished": ["iter-1/generate"]}))
    (run_dir / "config.yaml").write_text("name: old\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: new\npairs: {method: msa}\nrewards: {latent: {enabled: true}}\n")
    result = CliRunner().invoke(main, ["pairs", str(recipe), "--run-dir", str(run_dir)])
    assert result.exit_code == 2 and "holds a run with another config" in result.output
    assert "`rayalign launch RECIPE --redo STAGE[,STAGE...]`" in result.output


def test_ctrl_c_says_that_relaunching_resumes(tmp_path):
    recipe = tmp_path / "recipe.yaml"  # the tiny model is built first: a long wait to interrupt
    recipe.write_text("name: ctrlc\npolicy: {path: 'builtin:tiny-multilingual?train_steps=100000'}\n")
    env = {**os.environ, "RAYALIGN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "rayalign.cli", "launch", str(recipe), "--run-dir",
                             str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "run.lock").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: run the same command again to resume" in err and "Traceback" not in out + err
    assert not (tmp_path / "run" / "run.lock").exists()


@pytest.mark.parametrize("setting, file, expected", [
    ("rewards: {latent: {enabled: true, hub_layer: 9}}\n", None, "rewards.latent.hub_layer: 9 is beyond the model's 4"),
    ("rewards: {user: {path: reward.py}}\npairs: {method: user}\n", "def not_reward(group):\n    return []\n",
     "defines no function 'reward'"),
])
def test_inputs_that_need_the_model_or_user_code_are_refused_before_work(tmp_path, tiny_model, ray_session, setting,
                                                                         file, expected):
    from conftest import PROMPTS_DIR

    if file:
        (tmp_path / "reward.py").write_text(file)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: early\nlanguages: [en, de]\npolicy: {{path: {tiny_model}}}\n"
                      f"prompts: {{path: {PROMPTS_DIR}, limit: 2}}\nsampling: {{n: 2, max_new_tokens: 8}}\n" + setting)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["launch", str(recipe), "--run-dir", str(run_dir)])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not (run_dir / "state.json").exists() and not (run_dir / "iter-1").exists()
