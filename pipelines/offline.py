"""Offline self-alignment, one iteration after another: generate -> score -> pairs -> train.

Read top to bottom: the run directory, then each stage (a function with its name and timer),
then `run`, which calls them in order and skips what an earlier run already finished.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import ray
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from rayalign import pairs
from rayalign.actors.generator import GenerationGroup
from rayalign.actors.pool import split_shards
from rayalign.actors.preference_trainer import PreferenceTrainerGroup
from rayalign.actors.scorer import ModelRole, ScoringGroup
from rayalign.actors.trainer import TrainerLostError
from rayalign.anchor_groups import anchor_rows_before_scoring, drop_prompts_without_anchor, dropped_message
from rayalign.cluster import connect, load_cluster_spec
from rayalign.cluster.planner import plan, with_counts
from rayalign.cluster.schedule import choose_schedule
from rayalign.cluster.spec import check_run_dir_visible, running_cluster_spec
from rayalign.config import ConfigError, RunConfig
from rayalign.data.prompts import load_candidate_sets, load_prompts
from rayalign.data.schemas import schema_for
from rayalign.data.store import (atomic_write_text, claim_output_dir, directory_checksums, is_dataset_dir,
                                 read_dataset, read_manifest, trash_dir)
from rayalign.failures import errors_checkpoint, record_failures
from rayalign.generation import FailedRowsError
from rayalign.methods import schema_of
from rayalign.models import resolve_model_path
from rayalign.pairs import dco_tuples, lidr_pairs, lidr_requests
from rayalign.preflight import check_training_rows, preflight
from rayalign.progress import console, deepspeed_op_notice, model_build_progress, progress_bar
from rayalign.rewards.consistency import dco_gamma_table
from rayalign.run_dir import (samples_writer, STAGES, check_inputs_unchanged, check_prompts_unchanged,
                              check_run_dir_config, checkpoint, is_stage_output, iteration_summary, kept_output_problems,
                              log_metrics, prepare_run_dir, read_checkpoints, recipe_stages, record_checksums,
                              remove_older_tags, report_untrusted, set_aside_untrusted_checkpoint, stage_output,
                              write_state, write_table)
from rayalign.run_lock import run_dir_lock
from rayalign.scoring.finish import finish_scores, stage_centroids
from rayalign.scoring.forward import ForwardSpec
from rayalign.scoring.hub_scan import hub_layer_of_run
from rayalign.scoring.rewards import compute_rewards
from rayalign.scoring.setup import scoring_setup, with_scoring_prompts
from rayalign.scoring.translation import translated_rows, with_translations
from rayalign.tracking import Trackers
from rayalign.training.data import batch_alignment_languages


# ---- generation stage ----

def generate_stage(cfg: RunConfig, prompts, policy_path: str, policy_name: str, iteration: int,
                   out_dir: Path) -> dict:
    """Sample n responses per prompt row on K GenerationActors into a samples dataset at `out_dir`.

    Shards already on disk (from an interrupted run with the same config) are kept, not recomputed.
    """

    shards = split_shards(prompts, cfg.engines.shard_rows)
    writer = samples_writer(cfg, out_dir, policy_name, iteration)
    done = {i for i in range(len(shards)) if writer.has_shard(i)}
    report_untrusted(writer.rejected)
    group = GenerationGroup(policy_path, cfg.policy, cfg.engines)
    total_rows, resumed_rows = prompts.num_rows, sum(shards[i].num_rows for i in done)
    it_dir = out_dir.parent
    on_errors, may_fail = errors_checkpoint(cfg, it_dir, "generate", done, total_rows)
    with group, progress_bar(f"generate iter-{iteration}", total_rows, "rows", done=resumed_rows) as update:
        try:
            stats = group.run(shards, cfg.sampling, iteration, policy_name, writer.write_shard, skip=done,
                              progress=update, on_errors=on_errors, max_failed_rows=may_fail)
            nodes = group.nodes()
        except FailedRowsError:
            record_failures(cfg, it_dir, iteration, "generate", total_rows)
            raise
    failed = record_failures(cfg, it_dir, iteration, "generate", total_rows)
    manifest = writer.finalize(expected_shards=len(shards))
    return {
        "rows": total_rows, "samples": manifest["rows"], "new_samples": stats.rows_out, "failed_rows": failed,
        "resumed_shards": len(done), "retries": stats.retries, "seconds": round(stats.seconds, 3),
        "samples_per_s": round(stats.rows_out / max(stats.seconds, 1e-9), 2),
        "tokens_per_s": round(stats.tokens / max(stats.seconds, 1e-9), 2), "actor_nodes": nodes,
    }


# ---- scoring stage ----

def score_stage(cfg: RunConfig, samples_dir: Path, policy_path: str, iteration: int, out_dir: Path,
                hub_layer: int | None = None) -> dict:
    """One teacher-forced pass per needed model over every sample -> the scores dataset at `out_dir`."""

    samples = read_dataset(samples_dir, "samples")
    r = cfg.rewards
    roles, specs, reward_model, layers = scoring_setup(cfg, policy_path, hub_layer)
    # ICR's cross-lingual and translation prompts need the anchor prompt before the forward pass; latent rewards
    # check after it (finish_scores)
    kept, dropped = drop_prompts_without_anchor(samples, cfg.anchor_language, anchor_rows_before_scoring(cfg))
    dropped_rows, samples = samples.num_rows - kept.num_rows, with_scoring_prompts(cfg, kept)
    it_dir = out_dir.parent
    translated = translated_rows(cfg, samples)  # ICR's R_t: its failed translations count as generation's rows do
    if translated:
        on_errors, may_fail = errors_checkpoint(cfg, it_dir, "translate", set(), translated)
        try:
            samples = with_translations(cfg, samples, policy_path, iteration, on_errors, may_fail)
        except FailedRowsError:
            record_failures(cfg, it_dir, iteration, "translate", translated)
            raise
        translate_failed = record_failures(cfg, it_dir, iteration, "translate", translated)
    shards = split_shards(samples, cfg.engines.shard_rows * cfg.sampling.n)
    # Forward results are checkpointed shard by shard, so an interrupted stage redoes only what is missing;
    # rewards need every row (English anchors, centroids, alpha search) and are computed at the end (finish_scores).
    forward_dir = out_dir.with_name(out_dir.name + ".forward")
    results = read_checkpoints(forward_dir, len(shards))
    group = ScoringGroup.for_recipe(roles, r)
    on_errors, may_fail = errors_checkpoint(cfg, it_dir, "score", set(results), samples.num_rows)
    with group, progress_bar(f"score iter-{iteration}", samples.num_rows, "samples",
                             done=sum(shards[i].num_rows for i in results)) as update:
        try:
            stats = group.run(shards, specs, reward_model, checkpoint(forward_dir, results), skip=set(results),
                              progress=update, on_errors=on_errors, max_failed_rows=may_fail)
            centroids = stage_centroids(cfg, group, layers)
            nodes = group.nodes()
        except FailedRowsError:
            record_failures(cfg, it_dir, iteration, "score", samples.num_rows)
            raise
    failed = record_failures(cfg, it_dir, iteration, "score", samples.num_rows)
    table, fields = finish_scores(cfg, results, len(shards), out_dir, iteration, roles, layers, centroids, dropped,
                                  dropped_rows)
    tokens = sum(table.column("score_tokens").to_pylist()) * len(specs)
    return {**fields, "forward_passes": len(specs), "retries": stats.retries, "failed_rows": failed,
            "resumed_shards": stats.skipped_shards, "actor_nodes": nodes, "seconds": round(stats.seconds, 3),
            "tokens_per_s": round(tokens / max(stats.seconds, 1e-9), 2),
            **({"translate_failed_rows": translate_failed} if translated else {})}


# ---- pairs stage ----

def pairs_stage(cfg: RunConfig, run_dir: Path, policy_path: str, initial_policy_path: str, iteration: int,
                out_dir: Path) -> dict:
    """Scores (or candidate sets, for DCO) -> preference data at `out_dir`."""

    method, p, it_dir = cfg.pairs.method, cfg.pairs, run_dir / f"iter-{iteration}"
    extra = {}
    if method == "dco":
        table = dco_stage(cfg, initial_policy_path, iteration, it_dir / "candidate_scores")
        schema = "dco"
    elif method == "lidr":  # translates each prompt's anchor response: a prompt without one is dropped
        samples = read_dataset(it_dir / "samples", "samples")
        kept, dropped = drop_prompts_without_anchor(samples, cfg.anchor_language, 1, other_rows=1)
        if dropped:
            extra = {"dropped_prompts": len(dropped), "dropped_rows": samples.num_rows - kept.num_rows}
            console.print("[yellow]" + dropped_message(f"pairs iter-{iteration}", dropped, extra["dropped_rows"],
                                                       cfg.anchor_language, 1))
        table = lidr_stage(cfg, pl.from_arrow(kept), policy_path, iteration)
        schema = "pairs"
    else:
        scores = read_dataset(it_dir / "scores", "scores")
        scores = pl.from_arrow(scores.drop_columns([c for c in ("h_hub", "h_last") if c in scores.column_names]))
        options = dict(min_margin=p.min_margin, include_anchor=p.include_anchor, anchor=cfg.anchor_language,
                       truncated=p.truncated)
        if method == "kto":
            table, schema = pairs.kto_rows(scores, p.kto_reward, iteration, **options), "kto"
        else:
            table, schema = pairs.preference_pairs(scores, method, iteration, **options), "pairs"
        extra = {"truncated_samples": int((scores["finish_reason"] == "length").sum())}
        if extra["truncated_samples"] > scores.height / 2 and p.truncated != "keep":
            console.print(f"[yellow]pairs iter-{iteration}: {extra['truncated_samples']} of {scores.height} samples "
                          f"were cut at sampling.max_new_tokens, and pairs.truncated: {p.truncated} never chooses them "
                          f"({table.num_rows} rows): raise max_new_tokens, or relaunch with --redo pairs "
                          "-o pairs.truncated=keep")
    manifest = write_table(table, out_dir, schema, cfg, iteration, {"policy": cfg.policy.path}, {"method": method},
                           f"{method} preference data of iteration {iteration}.", shard_rows=4096)
    return {"method": method, "rows": manifest["rows"], **extra}


def dco_stage(cfg: RunConfig, initial_policy_path: str, iteration: int, out_dir: Path):
    """Score every candidate answer with pi_ref (fixed: the starting model unless set) in every language, then
    build DCO tuples."""

    c = cfg.rewards.consistency
    ref = c.reference or cfg.policy
    ref_path = resolve_model_path(ref.path, model_build_progress(ref.path)) if c.reference else initial_policy_path
    cands = load_candidate_sets(c.candidates_path, cfg.languages).rename_columns(
        ["prompt_id", "lang", "messages", "candidate_idx", "response", "gold"])
    group = ScoringGroup.for_recipe({"dco_reference": ModelRole(ref_path, ref)}, cfg.rewards)
    scored = group.collect(split_shards(cands, 256),
                           [ForwardSpec("dco_reference", "messages", "logp_ref", tokens_column="num_tokens")], None,
                           label=f"score candidates iter-{iteration}", unit="candidates").rename_columns(
        ["prompt_id", "lang", "messages", "candidate_idx", "candidate", "gold", "logp_ref", "num_tokens"])
    write_table(scored, out_dir, "candidate_scores", cfg, iteration, {"dco_reference": ref.path}, {},
                "pi_ref log-probs of every candidate answer in every language.", shard_rows=4096)
    anchor = cfg.anchor_language
    gammas = dco_gamma_table(cfg.languages, anchor, c.gamma_from_anchor, c.gamma_to_anchor, c.gamma_between)
    return dco_tuples(pl.from_arrow(scored), cfg.languages, anchor, gammas, c.pairs_per_question,
                      cfg.sampling.seed + iteration, iteration, c.language_pairs)


def lidr_stage(cfg: RunConfig, samples, policy_path: str, iteration: int):
    """LIDR: the policy translates its own responses; chosen/rejected as in docs/methods.md (ICR section, LIDR)."""

    requests = lidr_requests(samples, cfg.anchor_language, cfg.language_names())
    prompts = pa.Table.from_pylist(
        [{**r, "reference": None, "source": "lidr-translation"} for r in requests.to_dicts()],
        schema=schema_for("prompts")[1])
    sampling = dataclasses.replace(cfg.sampling, n=1, temperature=0.0,
                                   max_new_tokens=max(cfg.sampling.max_new_tokens * 2, 16))
    group = GenerationGroup(policy_path, cfg.policy, cfg.engines)
    translations = pl.from_arrow(group.collect(split_shards(prompts, cfg.engines.shard_rows), sampling, iteration,
                                               cfg.policy.path, label=f"translate iter-{iteration}",
                                               unit="translations"))
    table = lidr_pairs(samples, translations, cfg.anchor_language, iteration)
    return _with_reference_logps(cfg, table, policy_path)


def _with_reference_logps(cfg: RunConfig, pairs_table, policy_path: str):
    """Fill ref_logp_* and *_num_tokens of pairs with the policy's teacher-forced scores (the next DPO
    step's reference), for pairs whose responses were not scored before (LIDR translations)."""

    rows = pairs_table.to_pylist()
    requests = pa.Table.from_pylist([{"messages": r["prompt"], "response": r[side][0]["content"]}
                                     for side in ("chosen", "rejected") for r in rows])
    group = ScoringGroup.for_recipe({"policy": ModelRole(policy_path, cfg.policy)}, cfg.rewards)
    scored = group.collect(split_shards(requests, 256), [ForwardSpec("policy", "messages", "logp",
                                                                     tokens_column="num_tokens")], None,
                           label="score translations")
    logp, tokens, n = scored.column("logp").to_pylist(), scored.column("num_tokens").to_pylist(), len(rows)
    for column, values in (("ref_logp_chosen", logp[:n]), ("ref_logp_rejected", logp[n:]),
                           ("chosen_num_tokens", tokens[:n]), ("rejected_num_tokens", tokens[n:])):
        i = pairs_table.column_names.index(column)
        pairs_table = pairs_table.set_column(i, column, pa.array(values, pairs_table.schema.field(column).type))
    return pairs_table


# ---- training stage ----

def train_stage(cfg: RunConfig, data_dir: Path, policy_path: str, iteration: int, out_dir: Path,
                state: dict | None = None) -> dict:
    """Train policy t from policy t-1 on iteration t's preference data -> a Hugging Face checkpoint at `out_dir`.

    The training reference is policy t-1, whose log-probs the pairs carry. Mid-stage checkpoints go to
    `iter-t/train.ckpt` (training.checkpoint_every) and an interrupted stage resumes from the latest one.
    """

    t = cfg.training
    schema = schema_of(t.loss)
    if t.backend == "openrlhf":
        from rayalign.integrations.openrlhf import train_dpo

        return train_dpo(cfg, data_dir, policy_path, out_dir)

    ckpt_dir = out_dir.with_name("train.ckpt")
    run_dir = out_dir.parent.parent
    state = state if state is not None else {}
    records = state.setdefault("checkpoints", {})
    key = str(ckpt_dir.relative_to(run_dir))
    set_aside_untrusted_checkpoint(ckpt_dir, records.get(key), t.checkpoint_every, run_dir)

    def on_checkpoint(tag_dir: Path) -> None:  # recorded in the run state: only these files are ever loaded
        records[key] = {"tag": tag_dir.name, "files": directory_checksums(tag_dir)}
        write_state(run_dir, state)
        remove_older_tags(ckpt_dir, tag_dir.name)

    aligned = batch_alignment_languages(cfg.languages, cfg.anchor_language, t.batch_alignment)
    deepspeed_op_notice()
    group = PreferenceTrainerGroup(policy_path, cfg.policy, t, cfg.rewards.consistency.beta)
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
            nodes = group.nodes()
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


def language_fidelity(samples_dir: Path) -> dict[str, float]:
    """Share of each language's samples detected in that language."""

    df = pl.from_arrow(read_dataset(samples_dir, "samples").select(["lang", "lang_detected"]))
    share = df.group_by("lang").agg((pl.col("lang") == pl.col("lang_detected")).mean().alias("share")).sort("lang")
    return {lang: round(v, 4) for lang, v in share.iter_rows()}


# ---- rescoring without a forward pass ----

def rescore(cfg: RunConfig, scores_dir: Path, out_dir: Path, replace: bool = False) -> dict:
    """New rewards from a scores dataset's stored log-probs and states into `out_dir`, which must be new or empty
    (with `replace`, a non-empty one is moved to the trash of the run that holds it, as --redo does)."""

    out, source = out_dir.resolve(), scores_dir.resolve()
    if out == source or out in source.parents:
        raise ConfigError(f"--output {out_dir}: choose a new directory; the scores dataset is not overwritten")
    if cfg.rewards.latent.enabled and cfg.rewards.latent.centroid_texts:
        raise ConfigError("rescore: rewards.latent.centroid_texts are pooled by the policy, which rescore does not "
                          "load; score again (rayalign launch --redo score) or leave centroid_texts out")
    manifest = read_manifest(scores_dir)
    scores = read_dataset(scores_dir, "scores")
    scored = sorted(set(scores.column("lang").to_pylist()))
    if set(cfg.languages) != set(scored):  # the anchor absent was a ValueError; others, a manifest naming the wrong ones
        raise ConfigError(f"languages: {cfg.languages} (anchor {cfg.anchor_language}) differ from the languages of "
                          f"{scores_dir}, {scored}; rescore recomputes the rewards of the scored rows: give a recipe with "
                          f"those languages (-o languages=[{','.join(scored)}])")
    pooled = manifest.get("params", {}).get("layers", {})
    lat = cfg.rewards.latent
    for key, column in (("hub_layer", "h_hub"), ("language_layer", "h_last")):
        asked = getattr(lat, key)
        if lat.enabled and isinstance(asked, int) and column in pooled and asked != pooled[column]:
            raise ConfigError(f"rewards.latent.{key}: {asked}, but {scores_dir} holds states pooled at layer "
                              f"{pooled[column]}; rescore recomputes rewards from the stored states: score again "
                              "(rayalign launch --redo score) to pool another layer")
    claim_output_dir(out_dir, "scores", replace=replace, check_only=True)  # refused before any work
    if is_stage_output(out):
        raise ConfigError(f"--output {out_dir}: a run's own stage directory (its relaunch keeps what it finds there "
                          "as its own); choose another name, such as scores-rescored")
    table, params = compute_rewards(scores, cfg)
    run_root = next((d for d in out.parents if (d / "state.json").is_file()), None)
    trash = trash_dir(run_root) / out.parent.relative_to(run_root) if run_root else None
    moved = claim_output_dir(out_dir, "scores", replace=replace, trash=trash)
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

    run_dir = Path(run_dir or cfg.resolved_run_dir())
    with run_dir_lock(run_dir, console.print):
        return _run(cfg, run_dir, **options)


def _run(cfg: RunConfig, run_dir: Path, *, cluster: str = "local", address: str | None = None,
         stages: tuple[str, ...] = STAGES, redo: tuple[str, ...] = (), prompts=None, planned: bool = False,
         preflighted: bool = False) -> Path:
    """`prompts`: the prompt table when the caller has read it already (launch checks it before Ray starts).
    `stages`: a subset runs those stages only (rayalign generate|score|pairs), in the iterations whose inputs exist:
    iteration t > 1 generates with policy t - 1, so without training only the first. `planned`: the caller has
    checked that the actors fit the running cluster (launch). `preflighted`: the caller ran `preflight` (launch,
    before Ray started), so the user's reward file is not imported twice."""

    every = recipe_stages(cfg)
    stages = tuple(st for st in every if st in stages)
    spec = load_cluster_spec(cluster)
    cfg = with_counts(cfg, spec, address)
    if "generate" not in stages:
        prompts = None
    elif prompts is None:
        prompts = load_prompts(cfg.prompts.path, cfg.languages, **cfg.prompts.load_kwargs())
    prior = check_run_dir_config(cfg, run_dir, redo)  # a refusal should not wait for a model build
    needed = every[every.index(stages[0]) - 1] if stages and every.index(stages[0]) else None
    if needed and needed not in stages and f"iter-1/{needed}" not in (prior or {}).get("finished", ()) \
            and not is_dataset_dir(run_dir / "iter-1" / stage_output(needed)):
        raise ConfigError(f"{run_dir}: the {stages[0]} stage needs iter-1/{needed}'s output, which this run has not "
                          f"finished: run `rayalign {needed} RECIPE` (same --run-dir) first, or `rayalign launch "
                          "RECIPE` for every stage")
    digest = check_prompts_unchanged(cfg, prior, prompts, redo) if prompts is not None else None
    inputs = check_inputs_unchanged(cfg, prior, redo)
    if prompts is not None and "train" in stages:
        check_training_rows(cfg, prompts.num_rows // len(cfg.languages))
    initial_path = resolve_model_path(cfg.policy.path, progress=model_build_progress(cfg.policy.path))
    if not preflighted:  # before the run directory is touched: a refused recipe leaves nothing
        preflight(cfg, initial_path, run_dir)
    state = prepare_run_dir(cfg, run_dir, redo, prompts_digest=digest, input_digests=inputs)
    source = (f"{prompts.num_rows} prompt rows ({prompts.num_rows // len(cfg.languages)} ids x {len(cfg.languages)} "
              f"languages), n={cfg.sampling.n}, {cfg.engines.count} {cfg.engines.backend} engine(s)"
              if prompts is not None else f"{len(cfg.languages)} languages")
    console.print(f"run {cfg.name}: {source}, {cfg.iterations} iteration(s) of {', '.join(stages)} on cluster "
                  f"{spec.name} -> {run_dir}")
    connect(spec, address)
    check_run_dir_visible(run_dir)
    if not planned and {"generate", "score"} & set(stages):  # a stage command's actors must fit, as launch checks
        plan(dataclasses.replace(cfg, iterations=1, training=dataclasses.replace(cfg.training, loss=None)),
             running_cluster_spec(spec), strict=True)
    schedule = choose_schedule(cfg, running_cluster_spec(spec)) if {"generate", "score"} <= set(stages) else None
    if schedule:
        console.print(schedule.text())

    policy_path, policy_name = initial_path, cfg.policy.path
    with Trackers(cfg, run_dir) as tracker:
        for iteration in range(1, cfg.iterations + 1):
            it_dir = run_dir / f"iter-{iteration}"
            if iteration > 1 and "train" in every and f"iter-{iteration - 1}/train" not in state["finished"]:
                console.print(f"iter-{iteration}: not run; it starts from iter-{iteration - 1}'s trained policy "
                              "(rayalign launch runs every stage)")
                break
            streamed = {}  # the score stage's result when it ran streaming behind generation
            for stage in stages:
                name = f"iter-{iteration}/{stage}"
                out_dir = it_dir / stage_output(stage)
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
                    record_checksums(run_dir, state, out_dir)
                state["finished"].append(name)
                write_state(run_dir, state)
                shown = {k: len(set(v)) if k == "actor_nodes" else v + 0.0 if isinstance(v, float) else v
                         for k, v in result.items()}  # + 0.0: -0.0 prints as 0.0
                console.print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in shown.items()) + f" -> {out_dir}")
            done = all(f"iter-{iteration}/{stage}" in state["finished"] for stage in every)
            if done and f"iter-{iteration}/summary" not in state["finished"]:
                summary = {"iteration": iteration, "stage": "iteration", "policy": policy_name,
                           **iteration_summary(run_dir, iteration)}
                log_metrics(run_dir, summary)
                tracker.update()
                state["finished"].append(f"iter-{iteration}/summary")
                write_state(run_dir, state)
            if "train" in every:
                policy_path, policy_name = str(it_dir / "policy"), f"iter-{iteration}/policy"
    return run_dir


def stream_now(cfg: RunConfig, schedule, state: dict, iteration: int) -> bool:
    """Whether this iteration's generate and score stages run at once (pipelines/streaming.py): the schedule
    streams, neither finished earlier, and the hub layer is known (hub_layer auto scans iteration 1's samples)."""
    names = {f"iter-{iteration}/generate", f"iter-{iteration}/score"}
    scan_pending = cfg.rewards.latent.enabled and cfg.rewards.latent.hub_layer == "auto" and \
        "hub-scan" not in state["finished"]
    translating = cfg.rewards.implicit.enabled and cfg.rewards.implicit.prompt == "translation"  # needs every row
    return bool(schedule and schedule.stream) and not names & set(state["finished"]) and not scan_pending \
        and not translating


