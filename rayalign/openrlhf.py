"""The `openrlhf` trainer backend: hand a pairs dataset to OpenRLHF's DPO trainer (`openrlhf.cli.train_dpo`).

For users who already run OpenRLHF on GPU clusters. OpenRLHF reads the dataset directory as written
(`prompt`, `chosen`, `rejected` message lists, its chat-template path) and holds its own reference model
(the generating policy), so the reference log-probs stored in the pairs are not used.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def dpo_command(t, data_dir: str | Path, policy_path: str, out_dir: str | Path, launcher: str = "deepspeed") -> list[str]:
    """The `deepspeed --module openrlhf.cli.train_dpo ...` command for TrainingConfig `t`."""
    args = [
        "--pretrain", str(policy_path), "--ref_pretrain", str(policy_path),
        "--dataset", str(data_dir), "--prompt_key", "prompt", "--chosen_key", "chosen", "--rejected_key", "rejected",
        "--apply_chat_template", "--save_path", str(out_dir),
        "--beta", str(t.beta), "--learning_rate", str(t.lr), "--l2", str(t.weight_decay), "--max_norm",
        str(t.max_grad_norm), "--max_epochs", str(t.epochs), "--max_len", str(t.max_length),
        "--micro_train_batch_size", str(t.micro_batch_size),
        "--train_batch_size", str(t.micro_batch_size * t.gradient_accumulation * t.world_size),
        "--zero_stage", str(t.zero_stage), "--seed", str(t.seed), "--bf16",
    ]
    if t.loss == "ipo":
        args.append("--ipo")
    if t.loss == "cdpo":
        args += ["--label_smoothing", str(t.label_smoothing)]
    if t.nll_weight:
        args += ["--nll_loss_coef", str(t.nll_weight)]
    if t.gradient_checkpointing:
        args.append("--gradient_checkpointing")
    return [launcher, "--num_gpus", str(t.world_size), "--module", "openrlhf.cli.train_dpo", *args]


def train_dpo(cfg, data_dir: Path, policy_path: str, out_dir: Path) -> dict:
    """Run OpenRLHF's DPO on iteration data -> a Hugging Face checkpoint at `out_dir` (written to a temporary
    directory first, renamed when OpenRLHF finishes)."""
    try:
        import openrlhf  # noqa: F401
    except ImportError as e:
        raise RuntimeError("training.backend: openrlhf needs the openrlhf extra on a CUDA machine: "
                           "pip install 'rayalign[openrlhf]'") from e
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    command = dpo_command(cfg.training, data_dir, policy_path, tmp)
    log = out_dir.with_name("openrlhf.log")
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not (tmp / "config.json").is_file():
        raise RuntimeError(f"OpenRLHF's DPO failed (exit {done.returncode}); see {log}; command: {' '.join(command)}")
    tmp.rename(out_dir)
    return {"objective": cfg.training.loss, "backend": "openrlhf", "seconds": round(time.perf_counter() - started, 3),
            "log": str(log)}
