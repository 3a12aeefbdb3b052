"""Offline self-alignment, one iteration after another: generate -> (score -> pairs -> train).

This release runs the generation stage; each later stage lands as a block below it. Read top to
bottom: set up the run directory and Ray, then each stage with its name and timer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from rayalign.config import ConfigError, RunConfig, save_config
from rayalign.data.prompts import load_prompts
from rayalign.data.store import DatasetError, DatasetWriter, read_manifest
from rayalign.models import resolve_model_path

console = Console(stderr=True)
STAGES = ("generate",)


# ---- run directory: config, state, metrics ----

def prepare_run_dir(cfg: RunConfig, run_dir: Path) -> dict:
    """Create the run directory or reopen it for resume; refuse a directory that holds another config."""
    state_path = run_dir / "state.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state["config_hash"] != cfg.config_hash():
            raise ConfigError(
                f"{run_dir}: holds a run with another config (hash {state['config_hash']}, this recipe "
                f"{cfg.config_hash()}); use another --run-dir, or delete the directory to start over"
            )
        console.print(f"[bold]resuming[/] {run_dir} (finished: {', '.join(state['finished']) or 'nothing yet'})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        state = {"config_hash": cfg.config_hash(), "finished": []}
    save_config(cfg, run_dir / "config.yaml")
    write_state(run_dir, state)
    return state


def write_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(run_dir / "state.json")


def log_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ---- generation stage ----

def generate_stage(cfg: RunConfig, prompts, policy_path: str, policy_name: str, iteration: int,
                   out_dir: Path) -> dict:
    """Sample n responses per prompt row on K GenerationActors into a samples dataset at `out_dir`.

    Shards already on disk (from an interrupted run with the same config) are kept, not recomputed.
    """
    from rayalign.actors.generator import GenerationGroup, split_shards

    shards = split_shards(prompts, cfg.engines.shard_rows)
    writer = DatasetWriter(
        out_dir, "samples", config_hash=cfg.config_hash(), languages=cfg.languages,
        models={"policy": policy_name}, seeds={"run_seed": cfg.sampling.seed, "iteration": iteration},
        description=f"Self-play samples: {cfg.sampling.n} per (prompt_id, language), temperature "
                    f"{cfg.sampling.temperature}, top_p {cfg.sampling.top_p}, iteration {iteration}.",
    )
    done = {i for i in range(len(shards)) if writer.has_shard(i)}
    group = GenerationGroup(policy_path, cfg.policy, cfg.engines)
    total_rows = prompts.num_rows
    with Progress(TextColumn(f"generate iter-{iteration}"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("generate", total=total_rows,
                            status=f"rows {sum(shards[i].num_rows for i in done)}/{total_rows}",
                            completed=sum(shards[i].num_rows for i in done))

        def progress(stats, total):
            rows = stats.rows + sum(shards[i].num_rows for i in done)
            rate = stats.samples / max(stats.seconds, 1e-9)
            bar.update(task, completed=rows, status=f"rows {rows}/{total} | {rate:.1f} samples/s")

        try:
            stats = group.run(shards, cfg.sampling, iteration, policy_name, writer.write_shard, skip=done,
                              progress=progress)
        finally:
            group.shutdown()
    manifest = writer.finalize(expected_shards=len(shards))
    return {
        "rows": total_rows, "samples": manifest["rows"], "new_samples": stats.samples,
        "resumed_shards": len(done), "retries": stats.retries, "seconds": round(stats.seconds, 3),
        "samples_per_s": round(stats.samples / max(stats.seconds, 1e-9), 2),
        "tokens_per_s": round(stats.tokens / max(stats.seconds, 1e-9), 2),
    }


# ---- the run ----

def run(cfg: RunConfig, run_dir: Path | None = None, *, cluster: str = "local", address: str | None = None,
        stages: tuple[str, ...] = STAGES) -> Path:
    from rayalign.cluster import connect, load_cluster_spec

    if cfg.iterations > 1:
        raise ConfigError(f"iterations: {cfg.iterations} needs the training stage to produce policy t from "
                          "iteration t-1; this release runs generation only (set iterations: 1)")
    run_dir = Path(run_dir or cfg.resolved_run_dir())
    spec = load_cluster_spec(cluster)
    prompts = load_prompts(cfg.prompts.path, cfg.languages, limit=cfg.prompts.limit,
                           system_prompt=cfg.prompts.system_prompt)
    state = prepare_run_dir(cfg, run_dir)
    console.print(f"run {cfg.name}: {prompts.num_rows} prompt rows ({prompts.num_rows // len(cfg.languages)} ids x "
                  f"{len(cfg.languages)} languages), n={cfg.sampling.n}, {cfg.engines.count} {cfg.engines.backend} "
                  f"engine(s) on cluster {spec.name} -> {run_dir}")
    policy_path = resolve_model_path(cfg.policy.path, progress=_model_build_progress())
    connect(spec, address)

    for iteration in range(1, cfg.iterations + 1):
        it_dir = run_dir / f"iter-{iteration}"
        if "generate" in stages:
            stage = f"iter-{iteration}/generate"
            samples_dir = it_dir / "samples"
            if stage in state["finished"] and _complete(samples_dir):
                console.print(f"{stage}: finished earlier, kept")
            else:
                started = time.perf_counter()
                result = generate_stage(cfg, prompts, policy_path, cfg.policy.path, iteration, samples_dir)
                result["wall_seconds"] = round(time.perf_counter() - started, 3)
                log_metrics(run_dir, {"iteration": iteration, "stage": "generate", **result})
                state["finished"].append(stage)
                write_state(run_dir, state)
                console.print(f"{stage}: {result['samples']} samples, {result['samples_per_s']} samples/s, "
                              f"{result['tokens_per_s']} tokens/s -> {samples_dir}")
    return run_dir


def _complete(dataset_dir: Path) -> bool:
    try:
        read_manifest(dataset_dir)
        return True
    except DatasetError:
        return False


def _model_build_progress():
    """Progress printer for the first build of the tiny model (cached afterwards)."""
    shown = {"last": 0}

    def progress(step, total, loss):
        if step == 1:
            console.print("building the tiny offline model (first run only; cached afterwards)")
        if step - shown["last"] >= max(1, total // 10) or step == total:
            shown["last"] = step
            console.print(f"  tiny model training step {step}/{total}  loss {loss:.3f}")

    return progress
