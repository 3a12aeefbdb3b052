"""Offline self-alignment, one iteration after another: generate -> score -> pairs -> train.

Read top to bottom: the run directory, then each stage (a function with its name and timer),
then `run`, which calls them in order and skips what an earlier run already finished.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from rayalign.config import ConfigError, RunConfig, save_config
from rayalign.data.prompts import load_prompts
from rayalign.data.store import DatasetError, DatasetWriter, atomic_write_text, read_manifest, write_parquet_atomic
from rayalign.generation import FailedRowsError
from rayalign.models import resolve_model_path
from rayalign.progress import deepspeed_op_notice, model_build_progress
from rayalign.tracking import Trackers, check_trackers

console = Console(stderr=True)
STAGES = ("generate", "score", "pairs", "train")
ERRORS_BY_SHARD = "errors.by-shard"  # iter-<t>/errors.by-shard/<stage>-<shard>.parquet, gathered into iter-<t>/errors/


# ---- run directory: config, state, metrics ----

def prepare_run_dir(cfg: RunConfig, run_dir: Path, redo: tuple[str, ...] = ()) -> dict:
    """Create the run directory or reopen it for resume.

    A directory that holds another config is refused unless `redo` names stages to recompute: those
    stages and every later one are moved to <run-dir>/trash-<time>/ (see `redo_stages`), the old
    config is kept as config.<old hash>.yaml and the state takes the new hash.
    """
    state_path = run_dir / "state.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        old_hash, new_hash = state["config_hash"], cfg.config_hash()
        if old_hash != new_hash and not redo:
            raise ConfigError(
                f"{run_dir}: holds a run with another config (hash {old_hash}, this recipe {new_hash}); run "
                f"`rayalign launch RECIPE --redo STAGE[,STAGE...]` ({', '.join(STAGES)}) to recompute those stages "
                "and every later one with this recipe (earlier ones are kept), use another --run-dir, or delete "
                "the directory to start over"
            )
        if redo:
            redo_stages(cfg, run_dir, state, redo, config_changed=old_hash != new_hash)
        if old_hash != new_hash:
            shutil.copyfile(run_dir / "config.yaml", run_dir / f"config.{old_hash}.yaml")
            state["config_hash"] = new_hash
        console.print(f"[bold]resuming[/] {run_dir} (finished: {', '.join(state['finished']) or 'nothing yet'})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        state = {"config_hash": cfg.config_hash(), "finished": []}
    save_config(cfg, run_dir / "config.yaml")
    write_state(run_dir, state)
    return state


STAGE_OUTPUTS = {  # what a stage leaves in iter-<t>/ (globs); "errors" is rebuilt by the next generate/score
    "generate": ("samples", "errors", f"{ERRORS_BY_SHARD}/generate-*"),
    "score": ("scores", "scores.forward", "errors", f"{ERRORS_BY_SHARD}/score-*"),
    "pairs": ("pairs", "candidate_scores"),
    "train": ("policy", "train.ckpt", "train_log.jsonl"),
}


def redo_stages(cfg: RunConfig, run_dir: Path, state: dict, redo: tuple[str, ...], config_changed: bool) -> None:
    """Move the outputs of the `redo` stages and every later stage to <run-dir>/trash-<time>/ and forget them.

    Iteration t+1 generates with policy t, so every stage of iterations after the first is redone too. When
    the config changed, unfinished stages' partial outputs (made with the old config) go as well.
    """
    first = min(STAGES.index(stage) for stage in redo)
    trash = run_dir / f"trash-{time.strftime('%Y%m%d-%H%M%S')}"
    moved, forgotten = [], set()
    for it_dir in sorted(run_dir.glob("iter-*"), key=lambda d: int(d.name.split("-")[1])):
        iteration = int(it_dir.name.split("-")[1])
        for index, stage in enumerate(STAGES):
            name = f"{it_dir.name}/{stage}"
            if index < first and iteration == 1 and (name in state["finished"] or not config_changed):
                continue
            forgotten |= {name, f"{it_dir.name}/summary"}
            for pattern in STAGE_OUTPUTS[stage]:
                for path in sorted(it_dir.glob(pattern)):
                    target = trash / path.relative_to(run_dir)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(path, target)
                    moved.append(str(path.relative_to(run_dir)))
    if first <= STAGES.index("score"):  # the hub scan (hub_layer: auto) reads iteration 1's samples before scoring
        forgotten.add("hub-scan")
        if (run_dir / "hub-scan.json").is_file():
            trash.mkdir(parents=True, exist_ok=True)
            shutil.move(run_dir / "hub-scan.json", trash / "hub-scan.json")
            moved.append("hub-scan.json")
    state["finished"] = [name for name in state["finished"] if name not in forgotten]
    log_metrics(run_dir, {"stage": "redo", "redo": list(redo), "config_hash": cfg.config_hash(),
                          "moved": moved, "trash": str(trash)})
    console.print(f"redo {', '.join(redo)}: moved {len(moved)} output(s) to {trash}")


def write_state(run_dir: Path, state: dict) -> None:
    atomic_write_text(run_dir / "state.json", json.dumps(state, indent=2))


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
    report_untrusted(writer.rejected)
    group = GenerationGroup(policy_path, cfg.policy, cfg.engines)
    total_rows, resumed_rows = prompts.num_rows, sum(shards[i].num_rows for i in done)
    it_dir = out_dir.parent
    on_errors, may_fail = errors_checkpoint(cfg, it_dir, "generate", done, total_rows)
    with _progress(f"generate iter-{iteration}", total_rows, "rows", done=resumed_rows) as update:
        try:
            stats = group.run(shards, cfg.sampling, iteration, policy_name, writer.write_shard, skip=done,
                              progress=update, on_errors=on_errors, max_failed_rows=may_fail)
            nodes = group.nodes()
        except FailedRowsError:
            record_failures(cfg, it_dir, iteration, "generate", total_rows)
            raise
        finally:
            group.shutdown()
    failed = record_failures(cfg, it_dir, iteration, "generate", total_rows)
    manifest = writer.finalize(expected_shards=len(shards))
    return {
        "rows": total_rows, "samples": manifest["rows"], "new_samples": stats.rows_out, "failed_rows": failed,
        "resumed_shards": len(done), "retries": stats.retries, "seconds": round(stats.seconds, 3),
        "samples_per_s": round(stats.rows_out / max(stats.seconds, 1e-9), 2),
        "tokens_per_s": round(stats.tokens / max(stats.seconds, 1e-9), 2), "actor_nodes": nodes,
    }


# ---- scoring stage ----

def num_hidden_layers(cfg: RunConfig, policy_path: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(policy_path, trust_remote_code=cfg.policy.trust_remote_code)
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).num_hidden_layers


def _layers(cfg: RunConfig, policy_path: str, hub_layer: int | None = None) -> dict[str, int]:
    """Pooled layers of the latent rewards; `hub_layer` is the hub scan's choice when the recipe says auto."""
    from rayalign.rewards.latent import default_hub_layer

    num_layers = num_hidden_layers(cfg, policy_path)
    lat = cfg.rewards.latent
    if hub_layer is None:
        if lat.hub_layer == "auto":
            raise ConfigError("rewards.latent.hub_layer: auto is resolved by a hub scan (`rayalign launch` runs one on "
                              "iteration 1's samples; or run `rayalign hub-scan` and set the layer)")
        hub_layer = default_hub_layer(num_layers) if lat.hub_layer is None else lat.hub_layer
    layers = {"h_hub": hub_layer, "h_last": num_layers if lat.language_layer is None else lat.language_layer}
    for column, layer in layers.items():
        if layer > num_layers:
            key = "hub_layer" if column == "h_hub" else "language_layer"
            raise ConfigError(f"rewards.latent.{key}: {layer} is beyond the model's {num_layers} layers")
    return layers


def scoring_setup(cfg: RunConfig, policy_path: str, hub_layer: int | None = None):
    """What the scoring pass needs for the recipe's rewards: (model roles, forward specs, the reward-model role or
    None, pooled layers). Samples get their extra prompt column from `with_scoring_prompts`."""
    from rayalign.actors.scorer import ModelRole
    from rayalign.scoring.forward import ForwardSpec

    r = cfg.rewards
    roles = {"policy": ModelRole(policy_path, cfg.policy)}
    layers = _layers(cfg, policy_path, hub_layer) if r.latent.enabled else {}
    specs = [ForwardSpec("policy", "messages", "logp_policy", tuple(layers.items()), tokens_column="score_tokens")]
    if r.implicit.enabled:
        ref = r.implicit.reward_reference
        roles["reward_reference"] = ModelRole(resolve_model_path(ref.path, progress=model_build_progress(ref.path)), ref)
        prompt = "messages"
        if r.implicit.prompt == "cross_lingual":
            prompt = "messages_cross_lingual"
            specs.append(ForwardSpec("policy", prompt, "logp_policy_icr"))
        specs.append(ForwardSpec("reward_reference", prompt, "logp_reward_ref"))
    reward_model = None
    if r.reward_model.enabled:
        reward_model = "reward_model"
        rm_path = r.reward_model.model.path
        roles[reward_model] = ModelRole(resolve_model_path(rm_path, model_build_progress(rm_path)), r.reward_model.model,
                                        kind="reward_model")
    return roles, specs, reward_model, layers


def forward_rewards(cfg: RunConfig, table):
    """Rewards from the scoring pass's forward results: (scores table, reward parameters). R_m scores under the
    native prompt, whose log-probs are the policy's own."""
    from rayalign.scoring.rewards import compute_rewards

    if cfg.rewards.implicit.enabled and cfg.rewards.implicit.prompt == "native":
        table = table.append_column("logp_policy_icr", table.column("logp_policy"))
    return compute_rewards(table, cfg)


def with_scoring_prompts(cfg: RunConfig, samples):
    """Samples with the cross-lingual prompt G(x) that ICR's R_c scores under, when the recipe asks for it."""
    import pyarrow as pa

    from rayalign.scoring.rewards import cross_lingual_messages

    if not (cfg.rewards.implicit.enabled and cfg.rewards.implicit.prompt == "cross_lingual"):
        return samples
    return samples.append_column("messages_cross_lingual",
                                 pa.array(cross_lingual_messages(samples, cfg.anchor_language)))


def hub_layer_of_run(cfg: RunConfig, run_dir: Path, state: dict, initial_path: str) -> int | None:
    """The hub layer when the recipe says `hub_layer: auto`: scanned once on iteration 1's samples with the starting
    policy (so every iteration's rewards use the same layer), saved in hub-scan.json; None otherwise."""
    from rayalign.data.store import read_dataset
    from rayalign.pipelines.evaluate import hub_scan, print_hub_scan, run_hub_layer, save_hub_scan

    lat = cfg.rewards.latent
    if not (lat.enabled and lat.hub_layer == "auto"):
        return None
    path = run_dir / "hub-scan.json"
    if "hub-scan" in state["finished"] and path.is_file():
        return run_hub_layer(cfg, run_dir)
    started = time.perf_counter()
    result = hub_scan(cfg, initial_path, cfg.policy.path, read_dataset(run_dir / "iter-1" / "samples", "samples"),
                      lat.hub_scan_prompts)
    save_hub_scan(result, path)
    print_hub_scan(result)
    log_metrics(run_dir, {"iteration": 1, "stage": "hub-scan", "hub_layer": result["hub_layer"],
                          "prompts": result["prompts"],
                          **{f"silhouette_{k}": v for k, v in result["silhouette"].items()},
                          "wall_seconds": round(time.perf_counter() - started, 3)})
    state["finished"].append("hub-scan")
    write_state(run_dir, state)
    return result["hub_layer"]


def score_stage(cfg: RunConfig, samples_dir: Path, policy_path: str, iteration: int, out_dir: Path,
                hub_layer: int | None = None) -> dict:
    """One teacher-forced pass per needed model over every sample -> the scores dataset at `out_dir`."""
    import pyarrow as pa

    from rayalign.actors.pool import split_shards
    from rayalign.actors.scorer import ScoringGroup
    from rayalign.data.store import read_dataset

    samples = read_dataset(samples_dir, "samples")
    r = cfg.rewards
    roles, specs, reward_model, layers = scoring_setup(cfg, policy_path, hub_layer)
    samples = with_scoring_prompts(cfg, samples)
    shards = split_shards(samples, cfg.engines.shard_rows * cfg.sampling.n)
    # Forward results are checkpointed shard by shard, so an interrupted stage redoes only what is missing;
    # rewards need every row (English anchors, centroids, alpha search) and are computed at the end.
    forward_dir = out_dir.with_name(out_dir.name + ".forward")
    results = read_checkpoints(forward_dir, len(shards))
    group = ScoringGroup(roles, r.actors, r.batch_size, r.num_cpus, r.num_gpus)
    it_dir = out_dir.parent
    on_errors, may_fail = errors_checkpoint(cfg, it_dir, "score", set(results), samples.num_rows)
    with _progress(f"score iter-{iteration}", samples.num_rows, "samples",
                   done=sum(shards[i].num_rows for i in results)) as update:
        try:
            stats = group.run(shards, specs, reward_model, checkpoint(forward_dir, results), skip=set(results),
                              progress=update, on_errors=on_errors, max_failed_rows=may_fail)
            nodes = group.nodes()
        except FailedRowsError:
            record_failures(cfg, it_dir, iteration, "score", samples.num_rows)
            raise
        finally:
            group.shutdown()
    failed = record_failures(cfg, it_dir, iteration, "score", samples.num_rows)
    # a shard whose every row failed holds no scored columns
    table = pa.concat_tables([results[i] for i in range(len(shards)) if results[i].num_rows])
    table, params = forward_rewards(cfg, table)
    params["layers"] = layers
    write_table(table, out_dir, "scores", cfg, iteration, {n: role.path for n, role in roles.items()}, params,
                f"Teacher-forced scores of iteration {iteration}'s samples: log-probs, rewards"
                f"{' and pooled states' if layers else ''}.", shard_rows=cfg.engines.shard_rows * cfg.sampling.n,
                latent_dim=table.schema.field("h_hub").type.list_size if layers else 0)
    shutil.rmtree(forward_dir, ignore_errors=True)
    tokens = sum(table.column("score_tokens").to_pylist()) * len(specs)
    return {"samples": table.num_rows, "forward_passes": len(specs), "retries": stats.retries, "failed_rows": failed,
            "resumed_shards": stats.skipped_shards, "actor_nodes": nodes,
            "seconds": round(stats.seconds, 3), "tokens_per_s": round(tokens / max(stats.seconds, 1e-9), 2), **{
                f"alpha_{lang}": a for lang, a in params.get("icr", {}).get("alpha_per_language", {}).items()}}


def read_checkpoints(directory: Path, count: int) -> dict:
    """Forward-result shards finished by an earlier, interrupted run: complete files that match the checksum
    recorded when they were written (others are removed and computed again)."""
    import pyarrow.parquet as pq

    from rayalign.data.store import checksum_path, shard_name, shard_problem

    for stale in directory.glob("*.tmp"):
        stale.unlink()
    results, rejected = {}, []
    for i in range(count):
        shard = directory / shard_name(i)
        if not shard.is_file():
            continue
        problem = shard_problem(shard)
        if problem:
            rejected.append(f"{shard}: {problem}")
            shard.unlink()
            checksum_path(shard).unlink(missing_ok=True)
        else:
            results[i] = pq.read_table(shard)
    report_untrusted(rejected)
    return results


def report_untrusted(problems: list[str]) -> None:
    """Say which kept files failed their check and are computed again."""
    for problem in problems:
        console.print(f"[yellow]not kept[/]: {problem}; computing it again")


def checkpoint(directory: Path, results: dict):
    """An on_shard callback that keeps a shard's table and writes it under a temporary name, then renames it."""
    from rayalign.data.store import shard_name

    directory.mkdir(parents=True, exist_ok=True)

    def on_shard(index, table):
        write_parquet_atomic(table, directory / shard_name(index), checksum=True)
        results[index] = table

    return on_shard


def write_table(table, out_dir: Path, schema: str, cfg: RunConfig, iteration: int, models: dict, params: dict,
                description: str, shard_rows: int, latent_dim: int = 0) -> dict:
    """Write a whole table as a dataset (shards of `shard_rows` rows, then card and manifest)."""
    from rayalign.actors.pool import split_shards

    writer = DatasetWriter(out_dir, schema, config_hash=cfg.config_hash(), languages=cfg.languages, models=models,
                           seeds={"run_seed": cfg.sampling.seed, "iteration": iteration}, description=description,
                           schema_params={"latent_dim": latent_dim} if schema == "scores" else None, params=params)
    shards = split_shards(table, max(1, shard_rows))
    for i, shard in enumerate(shards):
        writer.write_shard(i, shard)
    return writer.finalize(expected_shards=len(shards))


# ---- rows that failed by themselves ----

def errors_checkpoint(cfg: RunConfig, it_dir: Path, stage: str, done: set[int], total_rows: int):
    """(on_errors callback, failed rows still allowed) for a stage over `total_rows` rows.

    The callback writes a shard's failed rows before the shard itself, so the failures of a finished shard
    survive an interruption; failures recorded for shards not in `done` are stale and removed here.
    """
    directory = it_dir / ERRORS_BY_SHARD
    for path in directory.glob(f"{stage}-*.parquet"):
        if int(path.stem.rsplit("-", 1)[1]) not in done:
            path.unlink()

    def on_errors(index, errors):
        directory.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(errors, directory / f"{stage}-{index:05d}.parquet")

    allowed = int(cfg.engines.max_failed_share * total_rows)
    return on_errors, max(0, allowed - _count_failed(it_dir, stage))


def _count_failed(it_dir: Path, stage: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in (it_dir / ERRORS_BY_SHARD).glob(f"{stage}-*.parquet"))


def record_failures(cfg: RunConfig, it_dir: Path, iteration: int, stage: str, total_rows: int) -> int:
    """Gather the iteration's failed rows (every stage so far) into the errors dataset iter-<t>/errors/ and
    return this stage's count; stop the run when they pass engines.max_failed_share."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = it_dir / "errors"
    shutil.rmtree(out, ignore_errors=True)  # rebuilt from errors.by-shard/, which stays the source
    parts = sorted((it_dir / ERRORS_BY_SHARD).glob("*.parquet"))
    if parts:
        table = pa.concat_tables([pq.read_table(p) for p in parts])
        write_table(table, out, "errors", cfg, iteration, {}, {},
                    f"Rows of iteration {iteration} that failed by themselves and were left out, with the reason.",
                    shard_rows=table.num_rows)
    failed, share = _count_failed(it_dir, stage), cfg.engines.max_failed_share
    if failed > int(share * total_rows):
        raise FailedRowsError(
            f"{stage} iter-{iteration}: {failed} of {total_rows} rows ({failed / max(total_rows, 1):.2%}) failed by "
            f"themselves, more than engines.max_failed_share={share} allows; their reasons are in {out} "
            f"(`rayalign inspect {out}`). Fix the input, or raise the share and launch again to resume")
    return failed


# ---- pairs stage ----

def pairs_stage(cfg: RunConfig, run_dir: Path, policy_path: str, initial_policy_path: str, iteration: int,
                out_dir: Path) -> dict:
    """Scores (or candidate sets, for DCO) -> preference data at `out_dir`."""
    import polars as pl

    from rayalign import pairs
    from rayalign.data.store import read_dataset

    method, p, it_dir = cfg.pairs.method, cfg.pairs, run_dir / f"iter-{iteration}"
    if method == "dco":
        table = dco_stage(cfg, initial_policy_path, iteration, it_dir / "candidate_scores")
        schema = "dco"
    elif method == "lidr":
        samples = pl.from_arrow(read_dataset(it_dir / "samples", "samples"))
        table = lidr_stage(cfg, samples, policy_path, iteration)
        schema = "pairs"
    else:
        scores = pl.from_arrow(read_dataset(it_dir / "scores", "scores").drop_columns(
            [c for c in ("h_hub", "h_last") if c in read_dataset(it_dir / "scores").column_names]))
        if method == "kto":
            table = pairs.kto_rows(scores, p.kto_reward, iteration, min_margin=p.min_margin,
                                   include_anchor=p.include_anchor, anchor=cfg.anchor_language)
            schema = "kto"
        else:
            table = pairs.preference_pairs(scores, method, iteration, min_margin=p.min_margin,
                                           include_anchor=p.include_anchor, anchor=cfg.anchor_language)
            schema = "pairs"
    manifest = write_table(table, out_dir, schema, cfg, iteration, {"policy": cfg.policy.path}, {"method": method},
                           f"{method} preference data of iteration {iteration}.", shard_rows=4096)
    return {"method": method, "rows": manifest["rows"]}


def dco_stage(cfg: RunConfig, initial_policy_path: str, iteration: int, out_dir: Path):
    """Score every candidate answer with pi_ref (fixed: the starting model unless set) in every language, then
    build DCO tuples."""
    import polars as pl
    import pyarrow as pa

    from rayalign.actors.pool import split_shards
    from rayalign.actors.scorer import ModelRole, ScoringGroup
    from rayalign.data.prompts import load_candidate_sets
    from rayalign.pairs import dco_tuples
    from rayalign.rewards.consistency import dco_gamma_table
    from rayalign.scoring.forward import ForwardSpec

    c = cfg.rewards.consistency
    ref = c.reference or cfg.policy
    ref_path = resolve_model_path(ref.path, model_build_progress(ref.path)) if c.reference else initial_policy_path
    cands = load_candidate_sets(c.candidates_path, cfg.languages).rename_columns(
        ["prompt_id", "lang", "messages", "candidate_idx", "response", "gold"])
    group = ScoringGroup({"dco_reference": ModelRole(ref_path, ref)}, cfg.rewards.actors, cfg.rewards.batch_size,
                         cfg.rewards.num_cpus, cfg.rewards.num_gpus)
    shards = split_shards(cands, 256)
    results: dict[int, pa.Table] = {}
    with _progress(f"score candidates iter-{iteration}", cands.num_rows, "candidates") as update:
        try:
            group.run(shards, [ForwardSpec("dco_reference", "messages", "logp_ref", tokens_column="num_tokens")],
                      None, results.__setitem__, progress=update)
        finally:
            group.shutdown()
    scored = pa.concat_tables([results[i] for i in range(len(shards))]).rename_columns(
        ["prompt_id", "lang", "messages", "candidate_idx", "candidate", "gold", "logp_ref", "num_tokens"])
    write_table(scored, out_dir, "candidate_scores", cfg, iteration, {"dco_reference": ref.path}, {},
                "pi_ref log-probs of every candidate answer in every language.", shard_rows=4096)
    anchor = cfg.anchor_language
    gammas = dco_gamma_table(cfg.languages, anchor, c.gamma_from_anchor, c.gamma_to_anchor, c.gamma_between)
    return dco_tuples(pl.from_arrow(scored), cfg.languages, anchor, gammas, c.pairs_per_question,
                      cfg.sampling.seed + iteration, iteration)


def lidr_stage(cfg: RunConfig, samples, policy_path: str, iteration: int):
    """LIDR: the policy translates its own responses; chosen/rejected as in docs/methods.md (ICR section, LIDR)."""
    import dataclasses

    import polars as pl
    import pyarrow as pa

    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.pool import split_shards
    from rayalign.data.schemas import schema_for
    from rayalign.pairs import lidr_pairs, lidr_requests

    requests = lidr_requests(samples, cfg.anchor_language, cfg.language_names())
    prompts = pa.Table.from_pylist(
        [{**r, "reference": None, "source": "lidr-translation"} for r in requests.to_dicts()],
        schema=schema_for("prompts")[1])
    sampling = dataclasses.replace(cfg.sampling, n=1, temperature=0.0,
                                   max_new_tokens=max(cfg.sampling.max_new_tokens * 2, 16))
    group = GenerationGroup(policy_path, cfg.policy, cfg.engines)
    shards = split_shards(prompts, cfg.engines.shard_rows)
    out: dict[int, pa.Table] = {}
    with _progress(f"translate iter-{iteration}", prompts.num_rows, "translations") as update:
        try:
            group.run(shards, sampling, iteration, cfg.policy.path, out.__setitem__, progress=update)
        finally:
            group.shutdown()
    translations = pl.from_arrow(pa.concat_tables([out[i] for i in range(len(shards))]))
    table = lidr_pairs(samples, translations, cfg.anchor_language, iteration)
    return _with_reference_logps(cfg, table, policy_path)


def _with_reference_logps(cfg: RunConfig, pairs_table, policy_path: str):
    """Fill ref_logp_* and *_num_tokens of pairs with the policy's teacher-forced scores (the next DPO
    step's reference), for pairs whose responses were not scored before (LIDR translations)."""
    import pyarrow as pa

    from rayalign.actors.pool import split_shards
    from rayalign.actors.scorer import ModelRole, ScoringGroup
    from rayalign.scoring.forward import ForwardSpec

    rows = pairs_table.to_pylist()
    requests = pa.Table.from_pylist([{"messages": r["prompt"], "response": r[side][0]["content"]}
                                     for side in ("chosen", "rejected") for r in rows])
    group = ScoringGroup({"policy": ModelRole(policy_path, cfg.policy)}, cfg.rewards.actors, cfg.rewards.batch_size,
                         cfg.rewards.num_cpus, cfg.rewards.num_gpus)
    shards = split_shards(requests, 256)
    results: dict[int, pa.Table] = {}
    try:
        group.run(shards, [ForwardSpec("policy", "messages", "logp", tokens_column="num_tokens")], None,
                  results.__setitem__)
    finally:
        group.shutdown()
    scored = pa.concat_tables([results[i] for i in range(len(shards))])
    logp, tokens, n = scored.column("logp").to_pylist(), scored.column("num_tokens").to_pylist(), len(rows)
    for column, values in (("ref_logp_chosen", logp[:n]), ("ref_logp_rejected", logp[n:]),
                           ("chosen_num_tokens", tokens[:n]), ("rejected_num_tokens", tokens[n:])):
        i = pairs_table.column_names.index(column)
        pairs_table = pairs_table.set_column(i, column, pa.array(values, pairs_table.schema.field(column).type))
    return pairs_table


# ---- training stage ----

class TrainerLostError(RuntimeError):
    """A trainer rank died mid-stage (a lost node, OOM); the message says how the run resumes."""


def train_stage(cfg: RunConfig, data_dir: Path, policy_path: str, iteration: int, out_dir: Path,
                state: dict | None = None) -> dict:
    """Train policy t from policy t-1 on iteration t's preference data -> a Hugging Face checkpoint at `out_dir`.

    The training reference is policy t-1, whose log-probs the pairs carry. Mid-stage checkpoints go to
    `iter-t/train.ckpt` (training.checkpoint_every) and an interrupted stage resumes from the latest one.
    """
    from rayalign.training.data import schema_for_loss

    t = cfg.training
    schema = schema_for_loss(t.loss)
    if t.backend == "openrlhf":
        from rayalign.integrations.openrlhf import train_dpo

        return train_dpo(cfg, data_dir, policy_path, out_dir)
    from rayalign.actors.trainer import TrainerGroup
    from rayalign.training.data import batch_alignment_languages

    ckpt_dir = out_dir.with_name("train.ckpt")
    run_dir = out_dir.parent.parent
    state = state if state is not None else {}
    records = state.setdefault("checkpoints", {})
    key = str(ckpt_dir.relative_to(run_dir))
    set_aside_untrusted_checkpoint(ckpt_dir, records.get(key), t.checkpoint_every, run_dir)

    def on_checkpoint(tag_dir: Path) -> None:  # recorded in the run state: only these files are ever loaded
        from rayalign.data.store import directory_checksums

        records[key] = {"tag": tag_dir.name, "files": directory_checksums(tag_dir)}
        write_state(run_dir, state)

    import ray

    aligned = batch_alignment_languages(cfg.languages, cfg.anchor_language, t.batch_alignment)
    deepspeed_op_notice()
    group = TrainerGroup(policy_path, cfg.policy, t, cfg.rewards.consistency.beta)
    with Progress(TextColumn(f"train iter-{iteration}"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("train", total=None, status="loading data")

        def progress(step, total, record):
            bar.update(task, total=total, completed=step, status=f"step {step}/{total} | loss {record['loss']:.4f}"
                       f" | margin {record.get('reward_margin', float('nan')):.3f} | lr {record['lr']:.2e}")

        try:
            fit = group.fit(str(data_dir), schema, t.loss, aligned_languages=aligned, checkpoint_dir=str(ckpt_dir),
                            checkpoint_every=t.checkpoint_every, progress=progress, on_checkpoint=on_checkpoint)
            group.save(str(out_dir))
            nodes = group.nodes
        except ray.exceptions.RayActorError as e:
            resume = (f"resumes from the last checkpoint in {ckpt_dir} (training.checkpoint_every {t.checkpoint_every})"
                      if t.checkpoint_every else "trains this stage from step 0 (set training.checkpoint_every to "
                      "resume mid-stage)")
            raise TrainerLostError(f"train iter-{iteration}: a trainer rank died ({str(e).splitlines()[0][:200]}); "
                                   f"DeepSpeed cannot go on without it. Once the cluster is whole, the same command "
                                   f"{resume}; earlier stages are kept") from None
        finally:
            group.shutdown()
    steps = fit["steps"]  # every step, those before a resume included
    atomic_write_text(out_dir.with_name("train_log.jsonl"), "".join(json.dumps(r) + "\n" for r in steps))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    records.pop(key, None)
    seconds = sum(r["seconds"] for r in steps)
    result = {"objective": t.loss, "rows": fit["prepare"]["rows"], "dropped_too_long": fit["prepare"]["dropped_too_long"],
              "steps": fit["prepare"]["steps"], "resumed_from_step": fit["resumed_from"],
              "global_batch": fit["prepare"]["global_batch"], "world_size": t.world_size,
              "seconds": round(seconds, 3), "tokens_per_s": round(sum(r["tokens"] for r in steps) / max(seconds, 1e-9), 1),
              "actor_nodes": nodes}
    for key in ("loss", "loss_at_reference", "reward_margin", "accuracy", "reward_chosen", "reward_rejected", "nll",
                "kl"):
        values = [r[key] for r in steps if key in r]
        if values:  # the first step and the mean over the stage's steps
            result[f"{key}_first"] = round(values[0], 5)
            result[f"{key}_mean"] = round(sum(values) / len(values), 5)
    return result


def set_aside_untrusted_checkpoint(ckpt_dir: Path, record: dict | None, checkpoint_every: int, run_dir: Path) -> None:
    """Leave in `ckpt_dir` only a checkpoint that this run wrote and recorded, unchanged; anything else (checkpointing
    off, no record, other or changed files) is moved to the run's trash, and training starts over."""
    from rayalign.data.store import directory_problems

    if not ckpt_dir.exists():
        return
    if not checkpoint_every:
        why = ["training.checkpoint_every is 0 (checkpointing is off)"]
    elif record is None:
        why = ["no checkpoint was recorded in state.json by this run"]
    else:
        tag = ckpt_dir / record["tag"]
        latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
        why = [] if latest == record["tag"] else [f"{ckpt_dir / 'latest'}: names {latest!r}, not {record['tag']!r}"]
        why += directory_problems(tag, record["files"])
        others = [p.name for p in ckpt_dir.iterdir() if p.name not in ("latest", record["tag"])]
        if not why:
            for name in others:  # older tags: never loaded, no longer needed
                shutil.rmtree(ckpt_dir / name) if (ckpt_dir / name).is_dir() else (ckpt_dir / name).unlink()
            return
    trash = run_dir / f"trash-{time.strftime('%Y%m%d-%H%M%S')}" / ckpt_dir.relative_to(run_dir)
    trash.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(ckpt_dir, trash)
    console.print(f"[yellow]{ckpt_dir}: not loaded[/] ({'; '.join(why)}); moved to {trash}; training starts from "
                  "step 0")


def language_fidelity(samples_dir: Path) -> dict[str, float]:
    """Share of each language's samples detected in that language."""
    import polars as pl

    from rayalign.data.store import read_dataset

    df = pl.from_arrow(read_dataset(samples_dir, "samples").select(["lang", "lang_detected"]))
    share = df.group_by("lang").agg((pl.col("lang") == pl.col("lang_detected")).mean().alias("share")).sort("lang")
    return {lang: round(v, 4) for lang, v in share.iter_rows()}


def _progress(label: str, total: int, unit: str, done: int = 0):
    """A progress bar context; yields an update(stats) callback for run_shards (`done`: resumed rows)."""
    import contextlib

    @contextlib.contextmanager
    def bar():
        with Progress(TextColumn(label), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task(label, total=total, completed=done, status=f"{done}/{total} {unit}")

            def update(stats):
                rows = done + stats.rows_in
                rate = stats.rows_out / max(stats.seconds, 1e-9)
                progress.update(task, completed=rows, status=f"{rows}/{total} {unit} | {rate:.1f} rows out/s")

            yield update

    return bar()


# ---- rescoring without a forward pass ----

def rescore(cfg: RunConfig, scores_dir: Path, out_dir: Path, replace: bool = False) -> dict:
    """New rewards from a scores dataset's stored log-probs and states into `out_dir`, which must be new or empty
    (with `replace`, a non-empty one is moved to the trash of the run that holds it, as --redo does)."""
    from rayalign.data.store import claim_output_dir, read_dataset, read_manifest
    from rayalign.scoring.rewards import compute_rewards

    out, source = out_dir.resolve(), scores_dir.resolve()
    if out == source or out in source.parents:
        raise ConfigError(f"--output {out_dir}: choose a new directory; the scores dataset is not overwritten")
    manifest = read_manifest(scores_dir)
    table, params = compute_rewards(read_dataset(scores_dir, "scores"), cfg)
    run_root = next((d for d in out.parents if (d / "state.json").is_file()), None)
    trash = (run_root / f"trash-{time.strftime('%Y%m%d-%H%M%S')}" / out.parent.relative_to(run_root)
             if run_root else None)
    moved = claim_output_dir(out_dir, replace=replace, trash=trash)
    if moved:
        console.print(f"--replace: moved the old {out_dir} to {moved}")
    params["layers"] = manifest.get("params", {}).get("layers", {})
    params["rescored_from"] = str(scores_dir)
    return write_table(table, out_dir, "scores", cfg, manifest["seeds"].get("iteration", 1), manifest["models"],
                       params, f"Rewards recomputed from {scores_dir} without a forward pass.",
                       shard_rows=max(s["rows"] for s in manifest["shards"]),
                       latent_dim=manifest.get("schema_params", {}).get("latent_dim", 0))


# ---- the run ----

def run(cfg: RunConfig, run_dir: Path | None = None, **options) -> Path:
    """Run the recipe's iterations into `run_dir`, holding the run directory's lock throughout."""
    from rayalign.run_lock import run_dir_lock

    run_dir = Path(run_dir or cfg.resolved_run_dir())
    with run_dir_lock(run_dir, console.print):
        return _run(cfg, run_dir, **options)


def preflight(cfg: RunConfig, policy_path: str) -> None:
    """Checks that need the model or user code, made before any work: the trackers' packages, the latent layers
    against the model's, and the user reward file's function (importing the file runs it, as scoring would)."""
    from rayalign.scoring.rewards import load_user_reward

    check_trackers(cfg)
    r = cfg.rewards
    if r.latent.enabled and r.latent.hub_layer != "auto":
        _layers(cfg, policy_path)
    if r.user.path:
        load_user_reward(r.user.path, r.user.function)


def _run(cfg: RunConfig, run_dir: Path, *, cluster: str = "local", address: str | None = None,
         stages: tuple[str, ...] = STAGES, redo: tuple[str, ...] = ()) -> Path:
    from rayalign.cluster import connect, load_cluster_spec
    from rayalign.cluster.planner import with_counts
    from rayalign.cluster.schedule import choose_schedule
    from rayalign.cluster.spec import check_run_dir_visible, running_cluster_spec

    r = cfg.rewards
    if not (r.latent.enabled or r.implicit.enabled or r.reward_model.enabled or r.user.path):
        stages = tuple(st for st in stages if st != "score")  # LIDR needs no scores; DCO scores its candidates
    if cfg.pairs.method is None:
        stages = tuple(st for st in stages if st != "pairs")
    if cfg.training.loss is None:
        stages = tuple(st for st in stages if st != "train")
    if cfg.pairs.method == "dco":  # DCO learns from parallel candidate sets, not from samples
        stages = tuple(st for st in stages if st in ("pairs", "train"))
    spec = load_cluster_spec(cluster)
    cfg = with_counts(cfg, spec, address)
    prompts = None
    if "generate" in stages:
        prompts = load_prompts(cfg.prompts.path, cfg.languages, **cfg.prompts.load_kwargs())
    initial_path = resolve_model_path(cfg.policy.path, progress=model_build_progress(cfg.policy.path))
    preflight(cfg, initial_path)  # before the run directory is touched: a refused recipe leaves nothing behind
    state = prepare_run_dir(cfg, run_dir, redo)
    source = (f"{prompts.num_rows} prompt rows ({prompts.num_rows // len(cfg.languages)} ids x {len(cfg.languages)} "
              f"languages), n={cfg.sampling.n}, {cfg.engines.count} {cfg.engines.backend} engine(s)"
              if prompts is not None else f"{len(cfg.languages)} languages")
    console.print(f"run {cfg.name}: {source}, {cfg.iterations} iteration(s) of {', '.join(stages)} on cluster "
                  f"{spec.name} -> {run_dir}")
    connect(spec, address)
    check_run_dir_visible(run_dir)
    schedule = choose_schedule(cfg, running_cluster_spec(spec)) if {"generate", "score"} <= set(stages) else None
    if schedule:
        console.print(schedule.text())

    policy_path, policy_name = initial_path, cfg.policy.path
    with Trackers(cfg, run_dir) as tracker:
        for iteration in range(1, cfg.iterations + 1):
            it_dir = run_dir / f"iter-{iteration}"
            streamed = {}  # the score stage's result when it ran streaming behind generation
            for stage in stages:
                name = f"iter-{iteration}/{stage}"
                out_dir = it_dir / {"generate": "samples", "score": "scores", "train": "policy"}.get(stage, stage)
                if name in state["finished"]:
                    problems = kept_output_problems(run_dir, state, out_dir)
                    if not problems:
                        console.print(f"{name}: finished earlier, kept")
                        continue
                    report_untrusted(problems)
                    log_metrics(run_dir, {"stage": "verify", "output": f"{it_dir.name}/{out_dir.name}",
                                          "untrusted": problems})
                    state["finished"].remove(name)
                    write_state(run_dir, state)
                started = time.perf_counter()
                if stage == "generate":
                    if stream_now(cfg, schedule, state, iteration):
                        from rayalign.pipelines.streaming import generate_score_stage

                        result, streamed["score"] = generate_score_stage(
                            cfg, prompts, policy_path, policy_name, iteration, it_dir,
                            hub_layer_of_run(cfg, run_dir, state, initial_path))
                    else:
                        result = generate_stage(cfg, prompts, policy_path, policy_name, iteration, out_dir)
                    result |= {f"fidelity_{lang}": v for lang, v in language_fidelity(out_dir).items()}
                elif stage == "score" and streamed:
                    result = streamed.pop("score")
                elif stage == "score":
                    hub_layer = hub_layer_of_run(cfg, run_dir, state, initial_path)
                    result = score_stage(cfg, it_dir / "samples", policy_path, iteration, out_dir, hub_layer)
                elif stage == "pairs":
                    result = pairs_stage(cfg, run_dir, policy_path, initial_path, iteration, out_dir)
                else:
                    result = train_stage(cfg, it_dir / "pairs", policy_path, iteration, out_dir, state)
                result.setdefault("wall_seconds", round(time.perf_counter() - started, 3))  # streamed: set per stage
                log_metrics(run_dir, {"iteration": iteration, "stage": stage, **result})
                tracker.update()
                if stage == "train" and (out_dir / "config.json").is_file():
                    from rayalign.data.store import directory_checksums

                    state.setdefault("checksums", {})[f"{it_dir.name}/policy"] = directory_checksums(out_dir)
                state["finished"].append(name)
                write_state(run_dir, state)
                shown = {k: (len(set(v)) if k == "actor_nodes" else v) for k, v in result.items()}
                console.print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in shown.items()) + f" -> {out_dir}")
            if f"iter-{iteration}/summary" not in state["finished"]:
                summary = {"iteration": iteration, "stage": "iteration", "policy": policy_name,
                           **iteration_summary(run_dir, iteration)}
                log_metrics(run_dir, summary)
                tracker.update()
                state["finished"].append(f"iter-{iteration}/summary")
                write_state(run_dir, state)
            if "train" in stages:
                policy_path, policy_name = str(it_dir / "policy"), f"iter-{iteration}/policy"
    return run_dir


def stream_now(cfg: RunConfig, schedule, state: dict, iteration: int) -> bool:
    """Whether this iteration's generate and score stages run at once (pipelines/streaming.py): the schedule
    streams, neither finished earlier, and the hub layer is known (hub_layer auto scans iteration 1's samples)."""
    names = {f"iter-{iteration}/generate", f"iter-{iteration}/score"}
    scan_pending = cfg.rewards.latent.enabled and cfg.rewards.latent.hub_layer == "auto" and \
        "hub-scan" not in state["finished"]
    return bool(schedule and schedule.stream) and not names & set(state["finished"]) and not scan_pending


def _complete(dataset_dir: Path) -> bool:
    if (dataset_dir / "config.json").is_file():  # a policy checkpoint, renamed into place when complete
        return True
    try:
        read_manifest(dataset_dir)
        return True
    except DatasetError:
        return False


def kept_output_problems(run_dir: Path, state: dict, out_dir: Path) -> list[str]:
    """Why a finished stage's output cannot be kept: a dataset whose manifest or shards fail their recorded
    checksums (untrusted shards are removed, so the stage recomputes only those when it can), or a policy whose
    files differ from the checksums recorded when it was saved. Empty when intact."""
    from rayalign.data.store import directory_problems, remove_untrusted_shards

    if out_dir.name != "policy":
        return remove_untrusted_shards(out_dir)
    recorded = state.get("checksums", {}).get(str(out_dir.relative_to(run_dir)))
    if not (out_dir / "config.json").is_file():
        return [f"{out_dir}: missing"]
    return [] if recorded is None else directory_problems(out_dir, recorded)


SUMMARY_KEYS = {"generate": ("fidelity_",), "pairs": ("rows",), "train": (
    "loss_first", "loss_mean", "reward_margin_mean", "accuracy_mean", "dropped_too_long", "steps")}


def iteration_summary(run_dir: Path, iteration: int) -> dict:
    """One iteration's headline metrics and phase timings, from its stage records in metrics.jsonl."""
    from rayalign.data.inspect import read_metrics

    out = {}
    for record in read_metrics(run_dir):
        stage = record.get("stage")
        if record.get("iteration") != iteration or stage == "iteration":
            continue
        out[f"seconds_{stage}"] = record.get("wall_seconds")
        for key, value in record.items():
            if any(key.startswith(prefix) for prefix in SUMMARY_KEYS.get(stage, ())):
                out[f"pairs_{key}" if stage == "pairs" else key] = value
    return out
