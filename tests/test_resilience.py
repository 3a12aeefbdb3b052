"""Runs that survive bad rows, changed recipes, SIGKILL and failed writes (issue 7)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import PROMPTS_DIR, checkpoint_recorded
from rayalign.cli import main
from rayalign.config import load_config
from rayalign.data.store import DatasetError, DatasetWriter, read_dataset
from rayalign.engines import Completion

LONG_PROMPT = "word " * 5000  # more tokens than the tiny model's 4096-position context


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def prompt_file(path: Path, ids: int, long_ids: dict[str, str] = {}) -> Path:  # noqa: B006 - read only
    """`ids` parallel prompts in en and de; (prompt_id -> lang) entries of `long_ids` get LONG_PROMPT."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(ids):
            for lang in ("en", "de"):
                pid = f"p{i}"
                text = LONG_PROMPT if long_ids.get(pid) == lang else f"Say something about number {i}."
                f.write(json.dumps({"prompt_id": pid, "lang": lang, "instruction": text}) + "\n")
    return path


def recipe_file(path: Path, model: str, prompts: Path | str, extra: str = "", limit: int = 4) -> Path:
    path.write_text(f"name: resilience\nlanguages: [en, de]\npolicy: {{path: {model}}}\n"
                    f"prompts: {{path: {prompts}, limit: {limit}}}\n"
                    "sampling: {n: 2, max_new_tokens: 8, seed: 5}\n"
                    "engines: {count: 1, batch_size: 8, shard_rows: 2}\n" + extra)
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- 1. rows that fail by themselves ----

class FakeEngine:
    """Echoes the prompt; raises for any batch holding a prompt with BOOM; a 50-token context."""

    class model:  # noqa: N801 - mimics HFEngine.model.config
        class config:  # noqa: N801
            max_position_embeddings = 50

    def encode_prompt(self, messages):
        return messages[-1]["content"].split()

    def generate(self, requests):
        if any("BOOM" in r.messages[-1]["content"] for r in requests):
            raise ValueError("cannot sample this prompt")
        return [Completion(text=r.messages[-1]["content"], num_tokens=3, finish_reason="stop") for r in requests]


def test_generation_isolates_rows_that_fail_alone():
    from rayalign.generation import generate_isolating

    cfg = load_config(None, ["languages=[en,de]", "sampling.n=2", "sampling.max_new_tokens=10"])
    texts = ["fine one", "BOOM here", "long " * 45, "fine two"]
    prompts = pa.Table.from_pylist([{"prompt_id": f"p{i}", "lang": "en", "messages": [{"role": "user", "content": t}],
                                     "reference": None, "source": "test"} for i, t in enumerate(texts)])
    samples, errors = generate_isolating(FakeEngine(), prompts, cfg.sampling, 1, "fake")
    assert samples.column("prompt_id").to_pylist() == ["p0", "p0", "p3", "p3"]
    assert samples.column("sample_idx").to_pylist() == [0, 1, 0, 1]
    failed = errors.to_pylist()
    assert [(e["stage"], e["prompt_id"], e["sample_idx"]) for e in failed] == [("generate", "p1", None),
                                                                            ("generate", "p2", None)]
    assert failed[0]["reason"] == "ValueError: cannot sample this prompt"
    assert "prompt of 45 tokens + max_new_tokens 10 exceeds the model's context of 50 tokens" in failed[1]["reason"]


def test_scoring_isolates_samples_that_fail_alone(tiny_model):
    from rayalign.engines.hf import HFEngine
    from rayalign.scoring.forward import ForwardSpec, forward_rows, forward_rows_isolating

    engine = HFEngine(tiny_model, dtype="float32", device="cpu", batch_size=8)
    real_score = engine.score
    engine.score = lambda requests, layers=(): (real_score(requests, layers) if all(
        "BOOM" not in r.response for r in requests) else (_ for _ in ()).throw(RuntimeError("bad sample")))
    rows = [{"prompt_id": "p", "lang": "en", "sample_idx": k, "messages": [{"role": "user", "content": "Hi"}],
             "response": response} for k, response in enumerate(["Hello.", "BOOM", LONG_PROMPT, "Good day."])]
    table = pa.Table.from_pylist(rows)
    specs = [ForwardSpec("policy", "messages", "logp_policy", (("h_hub", 1),), tokens_column="score_tokens")]
    scored, errors = forward_rows_isolating({"policy": engine}, table, specs)
    assert scored.column("sample_idx").to_pylist() == [0, 3]
    expected = forward_rows({"policy": engine}, table.take([0, 3]), specs)
    assert scored.column("logp_policy").to_pylist() == pytest.approx(expected.column("logp_policy").to_pylist())
    failed = errors.to_pylist()
    assert [(e["stage"], e["sample_idx"]) for e in failed] == [("score", 1), ("score", 2)]
    assert failed[0]["reason"] == "RuntimeError: bad sample"
    assert "exceed the model's context of 4096 tokens" in failed[1]["reason"]


@pytest.fixture(scope="module")
def long_prompt_run(tmp_path_factory, tiny_model, ray_session):
    """A launch over 4 prompt ids x 2 languages where p1/de is longer than the context: generate and score."""
    tmp = tmp_path_factory.mktemp("rows")
    prompts = prompt_file(tmp / "prompts.jsonl", 4, {"p1": "de"})
    recipe = recipe_file(tmp / "recipe.yaml", tiny_model, prompts, "rewards: {latent: {enabled: true}, actors: 1}\n")
    run_dir = tmp / "run"
    stopped = invoke("launch", recipe, "--run-dir", run_dir)  # 1 of 8 rows > the default 1%
    resumed = invoke("launch", recipe, "--run-dir", run_dir, "-o", "engines.max_failed_share=0.2")
    return run_dir, stopped, resumed


def test_too_many_failed_rows_stop_the_run_with_the_count_and_the_errors(long_prompt_run):
    run_dir, stopped, _ = long_prompt_run
    assert stopped.exit_code == 2
    message = " ".join(stopped.output.split())
    assert "generate iter-1: 1 of 8 rows (12.50%) failed by themselves" in message
    assert "engines.max_failed_share=0.01" in message and str(run_dir / "iter-1" / "errors") in message.replace(
        "\n", "")
    assert "launch with --redo generate to run the stage again" in message  # a plain relaunch keeps the shard


def test_failed_rows_go_to_the_errors_dataset_and_the_run_finishes(long_prompt_run):
    run_dir, _, resumed = long_prompt_run
    assert resumed.exit_code == 0, resumed.output
    errors = read_dataset(run_dir / "iter-1" / "errors", "errors").to_pylist()
    assert [(e["stage"], e["prompt_id"], e["lang"], e["sample_idx"]) for e in errors] == [
        ("generate", "p1", "de", None)]
    assert "exceeds the model's context of 4096 tokens" in errors[0]["reason"]
    samples = read_dataset(run_dir / "iter-1" / "samples", "samples")
    assert samples.num_rows == 7 * 2 and ("p1", "de") not in set(zip(samples.column("prompt_id").to_pylist(),
                                                                       samples.column("lang").to_pylist()))
    assert read_dataset(run_dir / "iter-1" / "scores", "scores").num_rows == 14
    by_stage = {m["stage"]: m for m in metrics(run_dir)}
    assert by_stage["generate"]["failed_rows"] == 1 and by_stage["score"]["failed_rows"] == 0
    assert by_stage["generate"]["resumed_shards"] == 2  # the stopped run kept shard 0 and the good rows of shard 1
    inspected = invoke("inspect", run_dir)
    assert inspected.exit_code == 0 and "failed" in inspected.output and "errors v1, 1 rows" in inspected.output


# ---- 2. a changed recipe on resume ----

def test_changed_recipe_needs_redo_which_keeps_earlier_stages(long_prompt_run, tmp_path):
    import shutil

    source, _, _ = long_prompt_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    recipe = source.parent / "recipe.yaml"
    old_hash = json.loads((run_dir / "state.json").read_text())["config_hash"]
    samples = {p.name: p.stat().st_mtime_ns for p in (run_dir / "iter-1" / "samples").glob("part-*")}
    scores_before = read_dataset(run_dir / "iter-1" / "scores", "scores")
    changed = ["-o", "engines.max_failed_share=0.2", "-o", "rewards.latent.alpha=1.0"]

    refused = invoke("launch", recipe, "--run-dir", run_dir, *changed)
    assert refused.exit_code == 2 and "holds a run with another config" in refused.output
    assert "--redo" in refused.output and not list(run_dir.glob("trash-*"))
    bad = invoke("launch", recipe, "--run-dir", run_dir, *changed, "--redo", "score,polish")
    assert bad.exit_code == 2 and "--redo 'score,polish': expected stages among generate, score" in bad.output

    redone = invoke("launch", recipe, "--run-dir", run_dir, *changed, "--redo", "score")
    assert redone.exit_code == 0, redone.output
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "iter-1" / "samples").glob("part-*")} == samples
    scores = read_dataset(run_dir / "iter-1" / "scores", "scores")
    assert scores.column("logp_policy").equals(scores_before.column("logp_policy"))  # same forward pass
    assert scores.column("r_lacomsa").to_pylist() != scores_before.column("r_lacomsa").to_pylist()  # new alpha
    (trash,) = run_dir.glob("trash-*")
    assert read_dataset(trash / "iter-1" / "scores", "scores").equals(scores_before)  # nothing is lost
    state = json.loads((run_dir / "state.json").read_text())
    assert state["config_hash"] != old_hash and (run_dir / f"config.{old_hash}.yaml").is_file()
    assert [m["stage"] for m in metrics(run_dir)][-3:] == ["redo", "score", "iteration"]
    errors = read_dataset(run_dir / "iter-1" / "errors", "errors")  # rebuilt: generation's failures kept
    assert errors.column("stage").to_pylist() == ["generate"]
    again = invoke("launch", recipe, "--run-dir", run_dir, *changed)  # the new config resumes as it is
    assert again.exit_code == 0 and "finished earlier, kept" in again.output
    assert "redo" in invoke("inspect", run_dir).output


# ---- 3. SIGKILL during generation and scoring, then the same command again ----

def process_group(pgid: int) -> list[int]:
    """Live processes of a process group (zombies excluded)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def launch_and_kill(command: list[str], log: Path, wait_for, timeout: float = 240, what: str | None = None) -> None:
    """Start `command` in a new process group, SIGKILL the whole group (driver, local Ray, actors) once
    `wait_for` (a path, or a condition described by `what`) exists or holds, and wait until none of its processes
    is left."""
    what = what or str(wait_for)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not (wait_for() if callable(wait_for) else wait_for.exists()):
        assert proc.poll() is None, f"the run ended before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while process_group(proc.pid):
        assert time.monotonic() < deadline, f"processes of the killed run linger: {process_group(proc.pid)}"
        time.sleep(0.2)


def launch_subprocess(command: list[str], log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "ab") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                timeout=300)
    assert result.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_sigkill_during_generation_and_scoring_resumes_to_the_uninterrupted_result(tmp_path, tiny_model, ray_session):
    recipe = recipe_file(tmp_path / "recipe.yaml", tiny_model, PROMPTS_DIR,
                         "rewards: {latent: {enabled: true}, actors: 1, batch_size: 2}\n", limit=6)
    recipe.write_text(recipe.read_text().replace("shard_rows: 2", "shard_rows: 1").replace("max_new_tokens: 8",
                                                                                          "max_new_tokens: 24"))
    baseline = tmp_path / "baseline"
    assert invoke("launch", recipe, "--run-dir", baseline).exit_code == 0
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    command = [sys.executable, "-m", "rayalign.cli", "launch", "--cluster", "local", str(recipe), "--run-dir",
               str(run_dir)]
    samples, forward = run_dir / "iter-1" / "samples", run_dir / "iter-1" / "scores.forward"

    launch_and_kill(command, log, samples / "part-00000.parquet")
    assert not (samples / "manifest.json").exists()  # killed during generation
    kept = {p.name: p.stat().st_mtime_ns for p in samples.glob("part-*.parquet")}
    launch_and_kill(command, log, forward / "part-00000.parquet")
    assert not (run_dir / "iter-1" / "scores" / "manifest.json").exists()  # killed during scoring
    assert {p.name: p.stat().st_mtime_ns for p in samples.glob("part-*.parquet") if p.name in kept} == kept
    forward_kept = len(list(forward.glob("part-*.parquet")))
    launch_subprocess(command, log)

    for dataset, schema in (("samples", "samples"), ("scores", "scores")):
        assert read_dataset(run_dir / "iter-1" / dataset, schema).equals(
            read_dataset(baseline / "iter-1" / dataset, schema)), dataset
    generate = [m for m in metrics(run_dir) if m["stage"] == "generate"]
    score = [m for m in metrics(run_dir) if m["stage"] == "score"]
    assert len(generate) == len(score) == 1  # each stage finished once, in the run after its kill
    assert generate[0]["resumed_shards"] == len(kept) and score[0]["resumed_shards"] == forward_kept >= 1


# ---- 4. a failed shard or manifest write ----

def sample_table(rows: int, start: int = 0) -> pa.Table:
    from rayalign.data.schemas import schema_for

    return pa.Table.from_pylist([{"prompt_id": f"p{start + i}", "lang": "en",
                                  "messages": [{"role": "user", "content": "hi"}], "reference": None,
                                  "source": "test", "sample_idx": 0, "response": "hello", "num_tokens": 2,
                                  "finish_reason": "stop", "seed": i, "policy": "tiny", "lang_detected": "en"}
                                 for i in range(rows)], schema=schema_for("samples")[1])


def fail_on_call(monkeypatch, target, name: str, call: int, error: OSError) -> None:
    """Make `target.name` raise `error` on its `call`-th call (1-based) and work as before otherwise."""
    original, calls = getattr(target, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


def fail_writes_under(monkeypatch, directory: str, error: OSError) -> None:
    """Make pq.write_table raise `error` on its first write into a dataset directory named `directory`."""
    original, failed = pq.write_table, []

    def failing(table, where, *args, **kwargs):
        if not failed and Path(where).parent.name == directory:
            failed.append(where)
            raise error
        return original(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", failing)


def test_disk_full_on_a_shard_keeps_earlier_shards_and_names_the_shard(tmp_path, monkeypatch):
    path = tmp_path / "samples"
    writer = DatasetWriter(path, "samples", languages=["en"])
    fail_on_call(monkeypatch, pq, "write_table", 3, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    writer.write_shard(0, sample_table(3))
    writer.write_shard(1, sample_table(3, 3))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()}
    with pytest.raises(DatasetError, match=r"part-00002\.parquet: could not be written \(No space left on device\)"):
        writer.write_shard(2, sample_table(3, 6))
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()} == before  # no partial file
    monkeypatch.undo()
    resumed = DatasetWriter(path, "samples", languages=["en"])  # as a resumed stage does: redo what is missing
    assert [resumed.has_shard(i) for i in range(3)] == [True, True, False]
    resumed.write_shard(2, sample_table(3, 6))
    resumed.finalize(expected_shards=3)
    assert read_dataset(path, "samples").column("prompt_id").to_pylist() == [f"p{i}" for i in range(9)]


def test_permission_denied_on_the_manifest_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "samples"
    writer = DatasetWriter(path, "samples", languages=["en"])
    writer.write_shard(0, sample_table(2))
    writer.finalize(expected_shards=1)
    manifest = (path / "manifest.json").read_bytes()
    writer.write_shard(1, sample_table(2, 2))  # a second shard: the manifest has to change
    original = Path.write_text

    def deny_manifest(self, *args, **kwargs):
        if self.name == "manifest.json.tmp":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", deny_manifest)
    with pytest.raises(DatasetError, match=r"manifest\.json: could not be written \(Permission denied\); the "
                                           r"previous version is kept"):
        writer.finalize(expected_shards=2)
    monkeypatch.undo()
    assert (path / "manifest.json").read_bytes() == manifest and not list(path.glob("*.tmp"))
    writer.finalize(expected_shards=2)  # once the manifest can be written, the retry lists both shards
    assert read_dataset(path, "samples").num_rows == 4


def test_disk_full_during_generation_stops_the_launch_naming_the_shard(long_prompt_run, tmp_path, monkeypatch):
    import shutil

    source, _, _ = long_prompt_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    recipe = source.parent / "recipe.yaml"
    kept = {p.name: p.stat().st_mtime_ns for p in (run_dir / "iter-1" / "samples").glob("part-*")}
    (run_dir / "iter-1" / "samples" / "manifest.json").unlink()  # as if generation was interrupted
    (run_dir / "iter-1" / "samples" / "part-00003.parquet").unlink()
    state = json.loads((run_dir / "state.json").read_text())
    (run_dir / "state.json").write_text(json.dumps({**state, "finished": []}))
    # scoring streams behind generation and may write first: the disk fills on the first samples shard
    fail_writes_under(monkeypatch, "samples", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    result = invoke("launch", recipe, "--run-dir", run_dir, "-o", "engines.max_failed_share=0.2")
    assert result.exit_code == 2
    assert "part-00003.parquet: could not be written (No space left on device)" in "".join(result.output.split("\n"))
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "iter-1" / "samples").glob("part-*")} == {
        k: v for k, v in kept.items() if k != "part-00003.parquet"}


# ---- 5. SIGKILL during training, then the same command again ----

@pytest.mark.slow
def test_sigkill_during_training_resumes_from_the_latest_checkpoint(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    recipe = recipe_file(tmp_path / "recipe.yaml", tiny_model, PROMPTS_DIR,
                         "rewards: {latent: {enabled: true}, actors: 1}\npairs: {method: lacomsa, truncated: keep}\n"
                         "training: {loss: dpo, micro_batch_size: 1, gradient_accumulation: 1, checkpoint_every: 1, "
                         "world_size: 1, num_cpus: 1}\n", limit=8)  # 8 prompts x 2 languages: 16 pairs, 16 steps
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    command = [sys.executable, "-m", "rayalign.cli", "launch", "--cluster", "local", str(recipe), "--run-dir",
               str(run_dir)]
    ckpt = run_dir / "iter-1" / "train.ckpt"

    # once the checkpoint is recorded in the run state (a checkpoint written but not recorded is set aside)
    launch_and_kill(command, log, lambda: checkpoint_recorded(run_dir), timeout=480,
                    what="checkpoint recorded in the run state")
    assert not (run_dir / "iter-1" / "policy").exists()  # killed during training
    assert "iter-1/pairs" in json.loads((run_dir / "state.json").read_text())["finished"]
    launch_subprocess(command, log)

    train = [m for m in metrics(run_dir) if m["stage"] == "train"]
    assert len(train) == 1 and 0 < train[0]["resumed_from_step"] < train[0]["steps"], train
    assert [m["stage"] for m in metrics(run_dir)].count("generate") == 1  # earlier stages were kept
    assert not ckpt.exists() and not list((run_dir / "iter-1").glob("*.tmp"))
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "iter-1" / "policy")
    assert policy.config.num_hidden_layers == 4
    # the same as training without the kill: the uninterrupted run's stages on a copy of the finished pairs
    copy = tmp_path / "straight"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("policy", "train_log.jsonl"))
    state = json.loads((copy / "state.json").read_text())
    state["finished"] = [s for s in state["finished"] if not s.startswith("iter-1/train") and "summary" not in s]
    (copy / "state.json").write_text(json.dumps(state))
    launch_subprocess([*command[:-1], str(copy)], log)
    assert [m for m in metrics(copy) if m["stage"] == "train"][-1]["resumed_from_step"] == 0
    straight = AutoModelForCausalLM.from_pretrained(copy / "iter-1" / "policy").state_dict()
    for name, value in policy.state_dict().items():
        assert (value - straight[name]).abs().max() < 1e-6, name
