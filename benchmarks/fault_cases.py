"""Try faults as a user would and tabulate the outcome: clean refusal, traceback, or data lost.

    python benchmarks/fault_cases.py --model DIR [--only NAME ...] [--out table.md]

Each case runs `rayalign` in a subprocess in a fresh directory. "clean" means the expected exit code and no
Python traceback in the output; "data lost" means a dataset that was complete before the fault no longer
validates, or a relaunch that should finish did not. The model is a local model directory (the tiny one:
`rayalign build-tiny-model DIR`). Cases needing a tmpfs mount (`unshare -m`, root) are skipped elsewhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LONG_PROMPT = "word " * 5000


def rayalign(*args, cwd: Path, prefix: tuple = (), env: dict | None = None) -> subprocess.CompletedProcess:
    command = [*prefix, sys.executable, "-m", "rayalign.cli", *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=3000, env=env)


def prompts(path: Path, ids: int = 4, long: dict = {}, drop: set = frozenset()) -> Path:  # noqa: B006
    with open(path, "w", encoding="utf-8") as f:
        for i in range(ids):
            for lang in ("en", "de"):
                if (f"p{i}", lang) not in drop:
                    text = LONG_PROMPT if long.get(f"p{i}") == lang else f"Say something about number {i}."
                    f.write(json.dumps({"prompt_id": f"p{i}", "lang": lang, "instruction": text}) + "\n")
    return path


def recipe(path: Path, model, prompt_file: Path, extra: str = "") -> Path:
    path.write_text(f"name: faults\nlanguages: [en, de]\npolicy: {{path: {model}}}\n"
                    f"prompts: {{path: {prompt_file}, limit: 4}}\nsampling: {{n: 2, max_new_tokens: 8, seed: 5}}\n"
                    "engines: {count: 1, batch_size: 8, shard_rows: 2}\nrewards: {latent: {enabled: true}, actors: 1}\n"
                    + extra)
    return path


TRAIN = ("pairs: {method: lacomsa}\ntraining: {loss: dpo, micro_batch_size: 2, gradient_accumulation: 1, "
         "world_size: 1, num_cpus: 1}\n")


def outcome(proc, expected_rc: int, expect: str = "") -> dict:
    text = proc.stdout + proc.stderr
    return {"rc": proc.returncode, "clean": proc.returncode == expected_rc and "Traceback" not in text
            and expect in " ".join(text.split()), "traceback": "Traceback" in text,
            "message": next((line for line in text.splitlines() if line.startswith("Error:")), "")[:300]}


# ---- the cases: each returns (outcome, data_lost) ----

def remote_code_model(tmp: Path, model: Path):
    custom = tmp / "custom"
    shutil.copytree(model, custom)
    config = json.loads((custom / "config.json").read_text())
    config |= {"model_type": "custom-llama", "auto_map": {"AutoConfig": "modeling_custom.CustomConfig"}}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_custom.py").write_text("from transformers import LlamaConfig\n"
                                               "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n")
    proc = rayalign("launch", recipe(tmp / "r.yaml", custom, prompts(tmp / "p.jsonl")), "--run-dir", tmp / "run", cwd=tmp)
    return outcome(proc, 2, "policy.trust_remote_code: true"), False


def truncated_weights(tmp: Path, model: Path):
    damaged = tmp / "model"
    shutil.copytree(model, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = rayalign("launch", recipe(tmp / "r.yaml", damaged, prompts(tmp / "p.jsonl")), "--run-dir", tmp / "run", cwd=tmp)
    return outcome(proc, 2, "damaged or incomplete weights file"), False


def garbled_config(tmp: Path, model: Path):
    damaged = tmp / "model"
    shutil.copytree(model, damaged)
    (damaged / "config.json").write_text("{\"model_type\": ")
    proc = rayalign("launch", recipe(tmp / "r.yaml", damaged, prompts(tmp / "p.jsonl")), "--run-dir", tmp / "run", cwd=tmp)
    return outcome(proc, 2, "config.json"), False


def prompt_without_anchor(tmp: Path, model: Path):
    file = prompts(tmp / "p.jsonl", drop={("p1", "en")})
    proc = rayalign("launch", recipe(tmp / "r.yaml", model, file), "--run-dir", tmp / "run", cwd=tmp)
    return outcome(proc, 2, "p1: en"), False


def empty_recipe(tmp: Path, model: Path):
    (tmp / "r.yaml").write_text("# nothing\n")
    return outcome(rayalign("launch", tmp / "r.yaml", "--run-dir", tmp / "run", cwd=tmp), 2), False


def nan_temperature(tmp: Path, model: Path):
    proc = rayalign("launch", recipe(tmp / "r.yaml", model, prompts(tmp / "p.jsonl")), "--run-dir", tmp / "run",
                    "-o", "sampling.temperature=.nan", cwd=tmp)
    return outcome(proc, 2, "sampling.temperature"), False


def run_name_outside_runs(tmp: Path, model: Path):
    proc = rayalign("launch", recipe(tmp / "r.yaml", model, prompts(tmp / "p.jsonl")), "-o", "name=../../x", cwd=tmp)
    return outcome(proc, 2, "name"), (tmp.parent.parent / "x").exists()


def prompt_id_a_list(tmp: Path, model: Path):
    file = prompts(tmp / "p.jsonl")
    file.write_text(file.read_text().replace('"p2"', '["p2"]', 1), encoding="utf-8")
    proc = rayalign("launch", recipe(tmp / "r.yaml", model, file), "--run-dir", tmp / "run", cwd=tmp)
    return outcome(proc, 2, "prompt_id must be a string or an integer, got list"), False


def prompt_file_with_byte_order_marks(tmp: Path, model: Path):
    """One at the start (accepted: Windows tools write it) and one starting line 3 (files joined): line 3 named."""
    lines = prompts(tmp / "p.jsonl").read_bytes().splitlines(keepends=True)
    bom = b"\xef\xbb\xbf"
    (tmp / "p.jsonl").write_bytes(bom + b"".join(lines[:2]) + bom + b"".join(lines[2:]))
    proc = rayalign("launch", recipe(tmp / "r.yaml", model, tmp / "p.jsonl"), "--run-dir", tmp / "run", cwd=tmp)
    return outcome(proc, 2, "p.jsonl:3: a UTF-8 byte order mark (BOM) starts this line"), False


def empty_section(tmp: Path, model: Path):
    r = recipe(tmp / "r.yaml", model, prompts(tmp / "p.jsonl"), "training:\n  # loss: dpo\n")
    proc = rayalign("launch", r, "--run-dir", tmp / "run", cwd=tmp)
    return outcome(proc, 2, "training: expected a mapping, got null (an empty section?)"), False


def key_given_twice(tmp: Path, model: Path):
    r = recipe(tmp / "r.yaml", model, prompts(tmp / "p.jsonl"), "sampling: {n: 4}\n")
    proc = rayalign("launch", r, "--run-dir", tmp / "run", cwd=tmp)
    return outcome(proc, 2, "duplicate key 'sampling'"), False


def empty_override_value(tmp: Path, model: Path):
    proc = rayalign("launch", recipe(tmp / "r.yaml", model, prompts(tmp / "p.jsonl")), "--run-dir", tmp / "run",
                    "-o", "sampling.n=", cwd=tmp)
    return outcome(proc, 2, "-o 'sampling.n=': sampling.n: expected an integer"), False


def rescore_outside_a_run(tmp: Path, model: Path):
    (tmp / "scores").mkdir()
    proc = rayalign("rescore", tmp / "scores", "--output", tmp / "out", cwd=tmp)
    return outcome(proc, 2, "pass --recipe"), (tmp / "out").exists()


def finished_run(tmp: Path, model: Path, extra: str = "") -> tuple[Path, Path]:
    r = recipe(tmp / "r.yaml", model, prompts(tmp / "p.jsonl"), extra)
    proc = rayalign("launch", r, "--run-dir", tmp / "run", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return r, tmp / "run"


def truncated_state(tmp: Path, model: Path):
    r, run = finished_run(tmp, model)
    text = (run / "state.json").read_text()
    (run / "state.json").write_text(text[:30])
    refused = rayalign("launch", r, "--run-dir", run, cwd=tmp)
    (run / "state.json").rename(run / "state.json.damaged")  # the advice: move it aside and launch again
    again = rayalign("launch", r, "--run-dir", run, cwd=tmp)
    lost = again.returncode != 0 or any(rayalign("validate", run / "iter-1" / d, cwd=tmp).returncode
                                        for d in ("samples", "scores"))
    return outcome(refused, 2, "is not valid JSON"), lost


def failed_anchor_row(tmp: Path, model: Path):
    r = recipe(tmp / "r.yaml", model, prompts(tmp / "p.jsonl", long={"p1": "en"}))
    stopped = rayalign("launch", r, "--run-dir", tmp / "run", cwd=tmp)
    resumed = rayalign("launch", r, "--run-dir", tmp / "run", "-o", "engines.max_failed_share=0.2", cwd=tmp)
    result = outcome(resumed, 0, "dropped 1 prompt(s) in every language")
    result["clean"] = result["clean"] and outcome(stopped, 2, "failed by themselves")["clean"]
    return result, resumed.returncode != 0


def full_disk_saving_policy(tmp: Path, model: Path):
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"]).returncode:
        return None, None
    r = recipe(tmp / "r.yaml", model, prompts(tmp / "p.jsonl"), TRAIN)
    run, kept = tmp / "run", tmp / "kept"
    run.mkdir()
    launch = f"{sys.executable} -m rayalign.cli launch {r} --run-dir {run}"
    script = (f"mount -t tmpfs -o size=1m tmpfs {run} && {{ {launch} > {tmp}/out.txt 2>&1; echo $? > {tmp}/rc.txt; "
              f"cp -a {run}/. {kept}/; }}")
    subprocess.run(["unshare", "-m", "sh", "-c", script], check=True, timeout=3000)
    proc = subprocess.CompletedProcess([], int((tmp / "rc.txt").read_text()), (tmp / "out.txt").read_text(), "")
    lost = any(rayalign("validate", kept / "iter-1" / d, cwd=tmp).returncode for d in ("samples", "scores", "pairs"))
    again = rayalign("launch", r, "--run-dir", kept, cwd=tmp)
    return outcome(proc, 2, "the trained policy could not be saved"), lost or again.returncode != 0


def wandb_online_without_key(tmp: Path, model: Path):
    import os

    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(home), "NETRC": str(home / ".netrc"), "WANDB_CONFIG_DIR": str(home / ".config" / "wandb")}
    r = recipe(tmp / "r.yaml", model, prompts(tmp / "p.jsonl"), "logging: {wandb: {project: faults, mode: online}}\n")
    proc = rayalign("launch", r, "--run-dir", tmp / "run", cwd=tmp, env=env)
    return outcome(proc, 2, "logging.wandb.mode"), (tmp / "run" / "state.json").exists()


def unreachable_ray_address(tmp: Path, model: Path):
    proc = rayalign("launch", recipe(tmp / "r.yaml", model, prompts(tmp / "p.jsonl")), "--run-dir", tmp / "run",
                    "--address", "127.0.0.1:1", cwd=tmp)
    return outcome(proc, 2, "could not join the Ray cluster"), False


CASES = {f.__name__: f for f in (remote_code_model, truncated_weights, garbled_config, prompt_without_anchor,
                                 empty_recipe, nan_temperature, run_name_outside_runs, truncated_state,
                                 failed_anchor_row, full_disk_saving_policy, wandb_online_without_key,
                                 unreachable_ray_address, prompt_id_a_list, prompt_file_with_byte_order_marks,
                                 empty_section, key_given_twice, empty_override_value, rescore_outside_a_run)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--only", nargs="*", choices=sorted(CASES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for name in args.only or CASES:
        with tempfile.TemporaryDirectory(prefix=f"fault-{name}-") as tmp:
            started = time.perf_counter()
            result, lost = CASES[name](Path(tmp), args.model.resolve())
            if result is None:
                print(f"{name}: skipped (needs unshare -m)", flush=True)
                continue
            rows.append((name, result, lost, time.perf_counter() - started))
            print(f"{name}: rc {result['rc']}, clean {result['clean']}, traceback {result['traceback']}, "
                  f"data lost {lost}: {result['message']}", flush=True)
    table = ["| case | exit code | clean refusal / finish | traceback | data lost |", "|---|---|---|---|---|"]
    table += [f"| {name} | {r['rc']} | {'yes' if r['clean'] else 'NO'} | {'YES' if r['traceback'] else 'no'} | "
              f"{'YES' if lost else 'no'} |" for name, r, lost, _ in rows]
    results, losses = [r for _, r, _, _ in rows], [lost for _, _, lost, _ in rows]
    table.append(f"| **{len(rows)} cases** | | {sum(r['clean'] for r in results)} clean | "
                 f"{sum(r['traceback'] for r in results)} | {sum(map(bool, losses))} |")
    print("\n".join(table))
    if args.out:
        args.out.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
