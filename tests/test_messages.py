"""Messages instead of tracebacks: a wrong-typed language column, Ctrl-C, and the advice of stage commands."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO
from rayalign.cli import main
from rayalign.config import ConfigError
from rayalign.data.prompts import PromptError, load_prompts


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


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


def test_misplaced_inputs_get_a_pointer_to_the_right_command(tmp_path, tiny_model):
    """A study file given as a recipe, a study directory to inspect, an eval --policy that is nothing, an eval --out
    that is a dataset: each refused with what to do instead, before Ray starts."""
    study = REPO / "examples" / "study-quickstart.yaml"
    for command in ("config", "plan", "launch"):
        result = invoke(command, study)
        assert result.exit_code == 2 and f"{study}: a study file (recipe and grid), not a recipe: run it with " \
            f"`rayalign study {study}`" in " ".join(result.output.split()), result.output
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.json").write_text("{}")
    result = invoke("inspect", tmp_path / "study")
    assert result.exit_code == 2 and "`rayalign report` summarises a study" in " ".join(result.output.split())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\npolicy: {{path: {tiny_model}}}\nlanguages: [en, de]\nprompts: {{limit: 2}}\n")
    result = invoke("eval", recipe, "--policy", tmp_path / "nothing", "--run-dir", tmp_path / "run")
    assert result.exit_code == 2 and f"--policy '{tmp_path / 'nothing'}': not initial, iter-N or a checkpoint" in \
        " ".join(result.output.split())
    result = invoke("eval", recipe, "--policy", "iter-0", "--run-dir", tmp_path / "run")
    assert result.exit_code == 2 and "policy iter-0: iterations count from 1" in " ".join(result.output.split())
    dataset = tmp_path / "pairs"
    dataset.mkdir()
    (dataset / "manifest.json").write_text('{"schema": "pairs", "schema_version": 1, "shards": []}')
    result = invoke("eval", recipe, "--policy", "initial", "--run-dir", tmp_path / "run", "--out", dataset)
    assert result.exit_code == 2 and "holds a dataset; an evaluation writes" in " ".join(result.output.split())
    assert "Ray" not in result.output and not (tmp_path / "run").exists()


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


def test_sigterm_once_ray_runs_stops_like_ctrl_c(tmp_path, tiny_model):
    """SIGTERM (kill, a scheduler, Ray Jobs' stop) after Ray started aborted the driver with Ray's stack dump."""
    from conftest import PROMPTS_DIR

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: term\npolicy: {{path: {tiny_model}}}\nprompts: {{path: {PROMPTS_DIR}, limit: 64}}\n"
                      "engines: {count: 1, shard_rows: 5}\n")
    proc = subprocess.Popen([sys.executable, "-m", "rayalign.cli", "launch", str(recipe), "--run-dir",
                             str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "run" / "iter-1" / "samples").glob("part-*.parquet")):  # generating on Ray
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: run the same command again to resume" in err and "SIGTERM received" not in err
    assert "Traceback" not in out + err and not (tmp_path / "run" / "run.lock").exists()


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


@pytest.mark.slow
def test_a_trainer_rank_killed_mid_training_is_a_message_and_the_relaunch_resumes(tmp_path, tiny_model):
    from conftest import PROMPTS_DIR, checkpoint_recorded

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: lost\nlanguages: [en, de]\npolicy: {{path: {tiny_model}}}\n"
                      f"prompts: {{path: {PROMPTS_DIR}, limit: 8}}\nsampling: {{n: 2, max_new_tokens: 8}}\n"
                      "rewards: {latent: {enabled: true}, actors: 1}\npairs: {method: lacomsa, truncated: keep}\n"
                      "training: {loss: dpo, micro_batch_size: 1, checkpoint_every: 1, world_size: 1, num_cpus: 1}\n")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "rayalign.cli", "launch", "--cluster", "local", str(recipe), "--run-dir",
               str(run_dir)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not checkpoint_recorded(run_dir):  # a checkpoint written but not yet recorded is set aside
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        ranks = []  # the run's trainer rank: a Ray worker in the launch's session
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if re.match(rb"ray::\w*Trainer", cmdline.read_bytes()) and os.getsid(int(cmdline.parent.name)) == proc.pid:
                    ranks.append(int(cmdline.parent.name))
            except (OSError, ProcessLookupError):
                continue
        assert ranks, "no trainer actor process found"
        os.kill(ranks[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2 and "train iter-1: a trainer rank died" in out, out[-3000:]
    assert "resumes from the last checkpoint" in out and "Traceback" not in out
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("stage") == "train"]
    assert len(train) == 1 and train[0]["resumed_from_step"] >= 1, again.stdout[-3000:]


def test_launch_into_a_run_of_another_config_is_refused_before_its_plan_is_replaced(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"config_hash": "0" * 16, "finished": ["iter-1/generate"]}))
    (run_dir / "config.yaml").write_text("name: old\n")
    (run_dir / "plan.json").write_text('{"the": "old run\'s plan"}')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: new\n")
    result = CliRunner().invoke(main, ["launch", str(recipe), "--run-dir", str(run_dir)])
    assert result.exit_code == 2 and "holds a run with another config" in result.output
    assert (run_dir / "plan.json").read_text() == '{"the": "old run\'s plan"}'
    from rayalign.config import load_config, save_config

    save_config(load_config(recipe, ["sampling.n=3"]), run_dir / "config.yaml")  # the keys that changed are named
    result = CliRunner().invoke(main, ["launch", str(recipe), "--run-dir", str(run_dir), "-o", "sampling.top_p=0.5"])
    assert "changed: sampling.n (3 -> 4), sampling.top_p (1.0 -> 0.5));" in " ".join(result.output.split())
    # an online run's directory: never advice to redo offline stages in it
    (run_dir / "state.json").write_text(json.dumps({"config_hash": "0" * 16, "finished": ["online/step-1"]}))
    result = " ".join(CliRunner().invoke(main, ["launch", str(recipe), "--run-dir", str(run_dir)]).output.split())
    assert "holds an online run with another config" in result and "use another --run-dir" in result
    assert "--redo" not in result


def test_a_ray_cluster_that_cannot_be_joined_is_named_without_a_traceback(tmp_path):
    from conftest import REPO

    done = subprocess.run([sys.executable, "-m", "rayalign.cli", "launch", str(REPO / "examples" / "quickstart.yaml"),
                           "--address", "256.1.1.1:x", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert "could not join the Ray cluster at 256.1.1.1:x (ValueError: Unable to parse port number" in \
        " ".join(done.stderr.split())


def test_an_address_where_nothing_answers_is_refused_at_once(tmp_path):
    """Ray retries an address that refuses connections for ever, printing warnings; the launch names it instead."""
    import socket

    from conftest import REPO

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "rayalign.cli", "launch", str(REPO / "examples" / "quickstart.yaml"),
                           "--address", f"127.0.0.1:{port}", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert f"could not join the Ray cluster at 127.0.0.1:{port}: nothing answers there" in " ".join(done.stderr.split())


def test_a_launch_that_finished_nothing_does_not_block_the_corrected_recipe(tmp_path):
    """A run directory whose state records no finished stage (a launch that failed at its first model load) takes
    the corrected recipe; its partial outputs, made with the other config, go to trash rather than being resumed."""
    from rayalign.config import load_config
    from rayalign.run_dir import check_run_dir_config, prepare_run_dir

    run_dir = tmp_path / "run"
    shard = run_dir / "iter-1" / "samples" / "part-00000.parquet"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"made with the other config")
    (run_dir / "state.json").write_text(json.dumps({"config_hash": "0" * 16, "finished": []}))
    (run_dir / "config.yaml").write_text("name: old\n")
    cfg = load_config(None, ["name=new"])
    assert check_run_dir_config(cfg, run_dir) is not None  # not refused
    state = prepare_run_dir(cfg, run_dir)
    assert state == {"config_hash": cfg.config_hash(), "finished": []}
    assert not shard.exists()
    assert [p.read_bytes() for p in run_dir.glob("trash-*/iter-1/samples/part-00000.parquet")] == \
        [b"made with the other config"]
    # one finished stage, and the other config is refused as before
    (run_dir / "state.json").write_text(json.dumps({"config_hash": "0" * 16, "finished": ["iter-1/generate"]}))
    with pytest.raises(ConfigError, match="holds a run with another config"):
        check_run_dir_config(cfg, run_dir)


def test_errors_raised_inside_actors_and_os_errors_reach_the_user_as_messages(ray_session, tmp_path):
    """rayalign's own error raised in a Ray task (as a trainer raises TrainingDataError), a path that cannot be
    written, and input nested too deeply: each a message with exit code 2, no traceback."""
    import click
    import ray

    from rayalign.cli.common import user_errors
    from rayalign.training.data import TrainingDataError

    @ray.remote
    def train():
        raise TrainingDataError("runs/x/iter-1/pairs: no rows")

    @click.command()
    @user_errors
    def in_actor():
        ray.get(train.remote())

    result = CliRunner().invoke(in_actor, [])
    assert result.exit_code == 2 and result.output == "Error: runs/x/iter-1/pairs: no rows\n"
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "sub"
    result = invoke("export", "--format", "verl", REPO / "examples" / "quickstart.yaml", out)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{out}" in result.output and "Not a directory" in result.output
    nested = tmp_path / "prompts.json"
    nested.write_text("[" * 100000 + "]" * 100000)
    result = invoke("config", REPO / "examples" / "quickstart.yaml", "-o", f"prompts.path={nested}")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output


HUGE = "9" * 5000  # more digits than Python converts to an int by default


def test_integers_of_too_many_digits_are_named_not_tracebacks(tmp_path):
    """`ValueError: Exceeds the limit (4300 digits) for integer string conversion` reached the user from the recipe,
    an override, a prompt file, a manifest, metrics.jsonl and study.json."""
    from rayalign.config import load_config
    from rayalign.data.inspect import read_metrics
    from rayalign.data.store import DatasetError, read_manifest
    from rayalign.report.study import ReportError, read_study

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: big\nsampling: {{seed: {HUGE}}}\n")
    with pytest.raises(ConfigError, match=f"{recipe}: Exceeds the limit"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="override sampling.seed: Exceeds the limit"):
        load_config(None, [f"sampling.seed={HUGE}"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(f'{{"prompt_id": {HUGE}, "lang": "en", "instruction": "hi"}}\n')
    with pytest.raises(PromptError, match="prompts.jsonl:1: Exceeds the limit"):
        load_prompts(prompts, ["en"])
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text(f'{{"rows": {HUGE}}}')
    with pytest.raises(DatasetError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path / "ds")
    (tmp_path / "metrics.jsonl").write_text(f'{{"iteration": {HUGE}}}\n{{"iteration": 1, "stage": "x"}}\n')
    skipped = []
    assert len(read_metrics(tmp_path, lambda path, number: skipped.append(number))) == 1 and skipped == [1]
    (tmp_path / "study.json").write_text(f'{{"runs": [], "n": {HUGE}}}')
    with pytest.raises(ReportError, match="study.json: not valid JSON"):
        read_study(tmp_path)


@pytest.mark.parametrize("field, value, expected", [
    ("schema", ["pairs"], "schema: expected a schema name such as 'pairs', got a list"),
    ("models", [], "models: expected an object, got a list"),
    ("languages", [1], "languages: expected language codes (strings), got [1]"),
])
def test_a_manifest_with_fields_of_other_types_is_named(tmp_path, field, value, expected):
    from rayalign.data.store import DatasetError, read_manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "pairs", "schema_version": 1, "rows": 0,
                                                        "shards": [], field: value}))
    with pytest.raises(DatasetError, match=re.escape(expected)):
        read_manifest(tmp_path)
    result = invoke("validate", tmp_path)
    assert result.exit_code != 0 and "Traceback" not in result.output and expected in " ".join(result.output.split())


@pytest.mark.parametrize("study, expected", [
    ({"runs": [{"run": "a", "status": ["finished"]}]}, "runs[0] (a): status: expected a string"),
    ({"runs": [{"run": ["a"]}]}, "runs[0] should be an object with a 'run' slug"),
    ({"runs": [{"run": "a", "params": [1]}]}, "runs[0] (a): params: expected an object"),
    ({"runs": [{"run": "a", "run_dir": 5}]}, "runs[0] (a): run_dir: expected a path"),
    ({"runs": [], "axes": 5}, "axes: expected a list of recipe keys"),
])
def test_an_edited_study_json_is_named_by_report(tmp_path, study, expected):
    (tmp_path / "study.json").write_text(json.dumps(study))
    result = invoke("report", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert expected in " ".join(result.output.split())


def test_non_finite_references_and_an_empty_model_path_are_refused(tmp_path):
    from rayalign.config import load_config

    prompts = tmp_path / "prompts.jsonl"
    for value in ("NaN", "Infinity"):
        prompts.write_text(f'{{"prompt_id": "p", "lang": "en", "instruction": "hi", "reference": {value}}}\n')
        with pytest.raises(PromptError, match=r"prompts.jsonl:1: reference is (nan|inf) \(JSON NaN or Infinity\)"):
            load_prompts(prompts, ["en"])
    with pytest.raises(ConfigError, match="policy.path: empty; expected a model directory"):
        load_config(REPO / "examples" / "quickstart.yaml", ["policy.path="])
