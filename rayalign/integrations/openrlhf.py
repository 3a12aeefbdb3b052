"""The `openrlhf` trainer backend: hand a pairs dataset to OpenRLHF's DPO trainer (`openrlhf.cli.train_dpo`).

For users who already run OpenRLHF on GPU clusters. Supported: OpenRLHF 0.10.4 to 0.11.2, whose `train_dpo`
takes namespaced flags (`--model.model_name_or_path`, `--data.dataset`, `--adam.lr`, `--ds.zero_stage`, ...).
OpenRLHF reads the pairs' Parquet shards as written (`prompt`, `chosen`, `rejected` message lists, its
chat-template path) and holds its own reference model (the generating policy), so the reference log-probs
stored in the pairs are not used. OpenRLHF pins its own deepspeed, ray and transformers, so it usually lives in
an environment of its own: `RAYALIGN_OPENRLHF_DEEPSPEED` names that environment's `deepspeed` launcher
(docs/openrlhf.md).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

SUPPORTED_VERSIONS = ">=0.10.4,<0.12"
LAUNCHER_ENV = "RAYALIGN_OPENRLHF_DEEPSPEED"


class OpenRLHFError(RuntimeError):
    """OpenRLHF's trainer cannot run or failed; the message names the launcher, the flag or the log."""


def launcher() -> str:
    return os.environ.get(LAUNCHER_ENV, "deepspeed")


def check_backend(cfg, run_dir: Path) -> None:
    """Before any work: the launcher exists, OpenRLHF can read the run's dataset path (its `--data.dataset` is a
    list split at ',' and '@'), and, when OpenRLHF imports here, its parser takes every flag."""
    where = str(Path(run_dir).resolve())
    if any(c in where for c in ",@[]*?"):
        raise OpenRLHFError(f"training.backend: openrlhf: OpenRLHF splits --data.dataset at ',' and '@' and reads it "
                            f"as a glob ('[', ']', '*', '?'), and the run directory {where} holds one of them; choose "
                            "a run name or --run-dir without them")
    if shutil.which(launcher()) is None:
        raise OpenRLHFError(f"training.backend: openrlhf runs `{launcher()} --module openrlhf.cli.train_dpo`, and "
                            f"`{launcher()}` was not found; install OpenRLHF {SUPPORTED_VERSIONS} "
                            f"(docs/openrlhf.md) and set {LAUNCHER_ENV} to its environment's deepspeed launcher")
    if importlib.util.find_spec("openrlhf") is not None:  # same environment: check the flags before a GPU job
        t = cfg.training  # world_size auto is resolved on the cluster; the flags' form is what is checked here
        t = t if isinstance(t.world_size, int) else dataclasses.replace(t, world_size=1)
        try:
            parse_dpo_command(dpo_command(t, run_dir / "iter-1" / "pairs", cfg.policy.path,
                                          run_dir / "iter-1" / "policy", launcher()))
        except ValueError as e:
            raise OpenRLHFError(f"training.backend: openrlhf: {e}") from None


def dpo_command(t, data_dir: str | Path, policy_path: str, out_dir: str | Path, launcher: str = "deepspeed") -> list[str]:
    """The `deepspeed --module openrlhf.cli.train_dpo ...` command for TrainingConfig `t` (OpenRLHF 0.10.4+).

    The optimizer and schedule follow rayalign's trainer: AdamW with betas (0.9, 0.999), linear warmup over
    `warmup_ratio` of the steps, cosine decay to 0."""
    args = [
        "--model.model_name_or_path", str(policy_path), "--ref.model_name_or_path", str(policy_path),
        "--data.dataset", f"{Path(data_dir)}/part-*.parquet", "--data.prompt_key", "prompt",
        "--data.chosen_key", "chosen", "--data.rejected_key", "rejected", "--data.apply_chat_template",
        "--data.max_len", str(t.max_length), "--ckpt.output_dir", str(out_dir),
        "--model.beta", str(t.beta), "--adam.lr", str(t.lr), "--adam.betas", "0.9", "0.999",
        "--adam.weight_decay", str(t.weight_decay), "--lr_warmup_ratio", str(t.warmup_ratio), "--min_lr_ratio", "0",
        "--max_norm", str(t.max_grad_norm), "--train.max_epochs", str(t.epochs),
        "--train.micro_batch_size", str(t.micro_batch_size),
        "--train.batch_size", str(t.micro_batch_size * t.gradient_accumulation * t.world_size),
        "--ds.zero_stage", str(t.zero_stage), "--train.seed", str(t.seed), "--ds.param_dtype", "bf16",
    ]
    if t.loss == "ipo":
        args.append("--model.ipo_enable")
    if t.loss == "cdpo":
        args += ["--model.label_smoothing", str(t.label_smoothing)]
    if t.nll_weight:
        args += ["--model.nll_loss_coef", str(t.nll_weight)]
    if t.gradient_checkpointing:
        args.append("--model.gradient_checkpointing_enable")
    return [launcher, "--num_gpus", str(t.world_size), "--module", "openrlhf.cli.train_dpo", *args]


def dpo_parser() -> argparse.ArgumentParser:
    """The argument parser of the installed `openrlhf.cli.train_dpo`, built by OpenRLHF's own statements.

    OpenRLHF builds it inside `if __name__ == "__main__":` of a module whose top-level imports need CUDA-only
    packages (flash-attn), so neither importing the module nor running it yields the parser here. Its source is
    read instead, and the statements before `parse_args` (only `parser = argparse.ArgumentParser()` and
    `parser.add_argument(...)`; anything else is refused) are run as written."""
    spec = importlib.util.find_spec("openrlhf.cli.train_dpo")
    if spec is None or spec.origin is None:
        raise OpenRLHFError("openrlhf is not installed in this environment")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin)
    main = next(node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
    body = []
    for stmt in main.body:
        code = ast.unparse(stmt)
        if "parse_args" in code:
            break
        if not (code == "parser = argparse.ArgumentParser()" or code.startswith("parser.add_argument(")):
            raise OpenRLHFError(f"{spec.origin}:{stmt.lineno}: unexpected statement while building the parser: "
                               f"{code[:80]}")
        body.append(stmt)
    namespace = {"argparse": argparse, "datetime": datetime.datetime}
    exec(compile(ast.Module(body=body, type_ignores=[]), spec.origin, "exec"), namespace)  # noqa: S102
    return namespace["parser"]


def parse_dpo_command(command: list[str]):
    """OpenRLHF's parsed (nested) arguments for `command`, as `train_dpo` sees them after `hierarchize`."""
    from openrlhf.utils.config import hierarchize

    parser = dpo_parser()
    parser.exit_on_error = False
    args, unknown = parser.parse_known_args(command[command.index("openrlhf.cli.train_dpo") + 1:])
    if unknown:
        flags = " ".join(u for u in unknown if u.startswith("-")) or " ".join(unknown)
        raise ValueError(f"OpenRLHF's train_dpo does not take {flags} (supported OpenRLHF versions: "
                         f"{SUPPORTED_VERSIONS})")
    return hierarchize(args)


def train_dpo(cfg, data_dir: Path, policy_path: str, out_dir: Path) -> dict:
    """Run OpenRLHF's DPO on iteration data -> a Hugging Face checkpoint at `out_dir` (written to a temporary
    directory first, renamed when OpenRLHF finishes)."""
    check_backend(cfg, out_dir.parent.parent)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    command = dpo_command(cfg.training, data_dir, policy_path, tmp, launcher())
    log = out_dir.with_name("openrlhf.log")
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not (tmp / "config.json").is_file():
        raise OpenRLHFError(f"OpenRLHF's DPO failed (exit {done.returncode}); see {log}; command: "
                            f"{' '.join(command)}")
    tmp.rename(out_dir)
    return {"objective": cfg.training.loss, "backend": "openrlhf", "seconds": round(time.perf_counter() - started, 3),
            "log": str(log)}
