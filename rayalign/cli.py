"""The `rayalign` command line: parse, load the config, call a pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from rayalign import __version__

console = Console()
err = Console(stderr=True)

OVERRIDE_HELP = "override a recipe setting, e.g. -o sampling.n=8 -o languages=[en,de] (repeatable)"


class UserError(click.ClickException):
    """A problem with the user's input: printed without a traceback, exit code 2."""

    exit_code = 2


def _user_errors(fn):
    """Turn rayalign's input errors into clean messages (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rayalign.cluster.planner import PlanError
        from rayalign.cluster.spec import ClusterError
        from rayalign.config import ConfigError
        from rayalign.data.prompts import PromptError
        from rayalign.data.store import DatasetError
        from rayalign.eval.judge import JudgeError
        from rayalign.generation import FailedRowsError
        from rayalign.models import ModelLoadError
        from rayalign.pipelines.offline import TrainerLostError
        from rayalign.pipelines.study import StudyError
        from rayalign.report import ReportError
        from rayalign.scoring.rewards import RewardError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, PromptError, DatasetError, ModelLoadError, ClusterError, PlanError, FailedRowsError,
                RewardError, JudgeError, StudyError, ReportError, TrainerLostError) as e:
            raise UserError(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted: run the same command again to resume (finished stages, shards and "
                       "checkpoints are kept)", err=True)
            sys.exit(130)

    return wrapper


def _load(recipe, overrides, *, sources: bool = True, models: bool = True):
    """The recipe, validated, its trackers' packages installed; with `sources`, its prompt set (and with `models`, its models) checked readable from
    here before Ray starts: a Hub name neither cached nor reachable is refused at once."""
    from rayalign.config import load_config
    from rayalign.data.hub import HubError, check_sources
    from rayalign.tracking import check_trackers

    cfg = load_config(recipe, overrides)
    check_trackers(cfg)
    if sources:
        try:
            check_sources(cfg, models=models)
        except HubError as e:
            raise UserError(str(e)) from None
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rayalign")
def main():
    """rayalign: multilingual self-alignment of LLMs on Ray.

    \b
    Quick start (tiny offline model, CPU, a few minutes):
      rayalign launch --cluster local examples/quickstart.yaml
      rayalign inspect runs/quickstart
    """


CLUSTER_HELP = "cluster spec: a shipped name (local, a100x8, a100x64, h100x16, h200x8) or the path of a spec YAML"


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--cluster", default="local", show_default=True, help=CLUSTER_HELP)
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@click.option("--run-dir", type=click.Path(file_okay=False), help="run directory (default: runs/<name>)")
@click.option("--address", help="join the Ray cluster at this address (default: $RAY_ADDRESS, or start one)")
@click.option("--dry-run", is_flag=True, help="print the placement plan and exit; starts nothing")
@click.option("--allow-mismatch", is_flag=True, help="run even when the Ray cluster differs from the spec (warns)")
@click.option("--redo", help="STAGE[,STAGE...] (generate, score, pairs, train): recompute these stages and every later "
              "one, in every iteration; needed to reuse a run directory with a changed recipe. Their outputs are "
              "moved to <run-dir>/trash-<time>/")
@_user_errors
def launch(recipe, cluster, overrides, run_dir, address, dry_run, allow_mismatch, redo):
    """Run a recipe into a run directory: its iterations (offline), or its RL steps (mode: online).

    Offline: plans the recipe on the cluster spec first (see `rayalign plan`), checks the Ray cluster against the
    spec, and saves the plan as <run-dir>/plan.json. Re-running with the same recipe and run directory
    resumes: finished stages and shards are kept. A changed recipe needs --redo.

    \b
    Example:
      rayalign launch --cluster local examples/quickstart.yaml -o sampling.n=2
      rayalign launch --cluster local examples/online-grpo-quickstart.yaml
      rayalign launch --cluster a100x64 --dry-run examples/lacomsa-llama3-8b.yaml
      rayalign launch examples/quickstart.yaml -o rewards.latent.alpha=1.0 --redo score
    """
    from rayalign.cluster import connect, load_cluster_spec
    from rayalign.cluster.estimate import estimate_table
    from rayalign.cluster.planner import plan, save_plan
    from rayalign.cluster.spec import running_cluster_spec
    from rayalign.pipelines import offline

    redo_stages = tuple(s.strip() for s in redo.split(",") if s.strip()) if redo else ()
    unknown = [s for s in redo_stages if s not in offline.STAGES]
    if unknown or (redo is not None and not redo_stages):
        raise UserError(f"--redo {redo!r}: expected stages among {', '.join(offline.STAGES)}, comma-separated")
    # the models are loaded where the actors run: checked here unless this is only a plan or a Ray client
    cfg = _load(recipe, overrides, models=not dry_run and not (address or "").startswith("ray://"))
    if cfg.mode == "online":
        if redo_stages:
            raise UserError("--redo: an online recipe (mode: online) has no stages to redo")
        if not dry_run:
            return _run_online(cfg, run_dir, cluster, address)
    spec = load_cluster_spec(cluster)
    if dry_run:
        dry_plan = plan(cfg, spec, strict=True)
        console.print(dry_plan.table())
        console.print(estimate_table(dry_plan.estimate, dry_plan.config.iterations))
        return
    connect(spec, address, allow_mismatch=allow_mismatch)
    run_plan = plan(cfg, running_cluster_spec(spec), strict=True)
    err.print(run_plan.table())
    err.print(estimate_table(run_plan.estimate, run_plan.config.iterations))
    save_plan(run_plan, Path(run_dir) if run_dir else cfg.resolved_run_dir())
    out = offline.run(cfg, Path(run_dir) if run_dir else None, cluster=cluster, address=address,
                      **({"redo": redo_stages} if redo_stages else {}))
    console.print(f"done: {out}  (see `rayalign inspect {out}`)")


@main.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--cluster", default="local", show_default=True, help=CLUSTER_HELP)
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON (as launch saves it in plan.json)")
@_user_errors
def plan_cmd(recipe, cluster, overrides, as_json):
    """Show how a recipe's phases map onto a cluster: actors, placement, memory per GPU.

    Exits with code 2 and the reason when the recipe does not fit (say, a 70B model at tensor parallel
    size 1 on 80 GB GPUs). On a CPU-only spec a GPU recipe is previewed as CPU actors, with its problems.

    \b
    Example:
      rayalign plan --cluster a100x64 examples/lacomsa-llama3-8b.yaml
      rayalign plan --cluster a100x8 examples/icr-llama3-8b.yaml -o engines.tensor_parallel_size=2 -o engines.num_gpus=2
    """
    import json

    from rayalign.cluster import load_cluster_spec
    from rayalign.cluster.estimate import estimate_table
    from rayalign.cluster.planner import plan

    result = plan(_load(recipe, overrides, models=False), load_cluster_spec(cluster))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        console.print(result.table())
        console.print(estimate_table(result.estimate, result.config.iterations))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--address", envvar="RAY_ADDRESS", default="http://127.0.0.1:8265", show_default=True,
              help="the Ray cluster's dashboard (default: $RAY_ADDRESS)")
@click.option("--working-dir", default=".", show_default=True, type=click.Path(exists=True, file_okay=False),
              help="directory uploaded as the job's working directory (runs/ and caches excluded)")
@click.option("--pip", multiple=True, help="a pip requirement the job's runtime environment installs (repeatable)")
@click.option("--env", "env_vars", multiple=True, help="KEY=VALUE environment variable for the job (repeatable)")
@click.option("--wait", is_flag=True, help="wait for the job and stream its logs")
@_user_errors
def submit(command, address, working_dir, pip, env_vars, wait):
    """Run a rayalign command as a Ray Job on a running cluster.

    Everything after `--` is the rayalign command the job runs; the working directory is uploaded.

    \b
    Example:
      rayalign submit --address http://head:8265 --pip 'rayalign[gpu]' --wait -- \\
        launch --cluster a100x64 examples/lacomsa-llama3-8b.yaml
    """
    from rayalign.cluster.submit import job_spec, submit as submit_job

    env = {}
    for item in env_vars:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    spec = job_spec(list(command), working_dir, pip=list(pip), env=env)
    job_id, status = submit_job(address, spec, wait=wait, echo=lambda text, end="": click.echo(text, nl=False))
    console.print(f"job {job_id}: {status}")
    if wait and status != "SUCCEEDED":
        sys.exit(1)


def _stage_command(stage: str, summary: str, example: str):
    """`rayalign generate|score|pairs`: one stage of a recipe's iteration 1 into its run directory."""

    @main.command(stage, help=f"{summary}\n\n\b\nExample:\n  {example}")
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
    @click.option("--run-dir", type=click.Path(file_okay=False), help="run directory (default: runs/<name>)")
    @click.option("--cluster", default="local", show_default=True, help="cluster spec name or path")
    @click.option("--address", help="join the Ray cluster at this address")
    @_user_errors
    def command(recipe, overrides, run_dir, cluster, address):
        from rayalign.pipelines import offline

        cfg = _load(recipe, overrides)
        out = offline.run(cfg, Path(run_dir) if run_dir else None, cluster=cluster, address=address, stages=(stage,))
        console.print(f"done: {out}")

    return command


_stage_command("generate", "Run only the generation stage: <run-dir>/iter-1/samples.",
               "rayalign generate examples/quickstart.yaml -o engines.count=2 --run-dir runs/gen-k2")
_stage_command("score", "Run only the scoring stage on the run's samples: <run-dir>/iter-1/scores.",
               "rayalign score examples/quickstart.yaml")
_stage_command("pairs", "Run only the pairs stage: <run-dir>/iter-1/pairs (from scores, or candidates for DCO).",
               "rayalign pairs examples/quickstart.yaml -o pairs.method=msa --run-dir runs/quickstart")


@main.command()
@click.argument("scores", type=click.Path(exists=True, file_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="directory of the new scores dataset")
@click.option("--recipe", type=click.Path(dir_okay=False),
              help="recipe to start from (default: the config.yaml of the run that holds SCORES)")
@click.option("--replace", is_flag=True, help="when OUTPUT exists and is not empty, move it to the trash (the run's "
              "trash-<time>/ when OUTPUT is in a run directory) and write there; without it, such an OUTPUT is refused")
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@_user_errors
def rescore(scores, output, recipe, overrides, replace):
    """Recompute rewards from a scores dataset without a forward pass.

    Latent rewards use the stored pooled states (new alpha, gamma, weight form, centroid mode or
    anchor language); ICR re-runs its alpha search or takes a fixed alpha.

    \b
    Example:
      rayalign rescore runs/quickstart/iter-1/scores --output runs/quickstart/iter-1/scores-a1 \\
        -o rewards.latent.alpha=1.0 -o rewards.latent.centroid_mode=prompt
    """
    from rayalign.pipelines import offline

    scores = Path(scores)
    cfg = _load(recipe or scores.parent.parent / "config.yaml", overrides, sources=False)
    if cfg.rewards.user.path:  # user code: say which file runs, and from where its path came
        source = f"--recipe {recipe}" if recipe else f"{scores.parent.parent / 'config.yaml'} (the scored run's config)"
        err.print(f"rescore: runs the user reward file {cfg.rewards.user.path} as code, named by {source}; pass "
                  "--recipe or -o rewards.user.path=... to choose another", soft_wrap=True)
    manifest = offline.rescore(cfg, scores, Path(output), replace=replace)
    console.print(f"done: {output} ({manifest['rows']} rows)")


ITERATION_HEADERS = {"policy": "generating policy", "pairs_rows": "pairs", "loss_first": "loss, first step",
                     "loss_mean": "loss, mean", "reward_margin_mean": "reward margin, mean",
                     "accuracy_mean": "pair accuracy, mean", "seconds_generate": "generate s",
                     "seconds_score": "score s", "seconds_pairs": "pairs s", "seconds_train": "train s"}


def planned_seconds(run_dir: Path) -> dict[str, float]:
    """Estimated seconds per phase of one iteration from the run's plan.json; empty without one."""
    import json

    try:
        phases = json.loads((run_dir / "plan.json").read_text()).get("estimate", {}).get("phases", {})
    except (OSError, ValueError):
        return {}
    return {phase: value["seconds"] for phase, value in phases.items() if value.get("seconds") is not None}


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@_user_errors
def inspect(path):
    """Summarise a dataset or a run directory: per-language rows, lengths, detected-language share.

    \b
    Example:
      rayalign inspect runs/quickstart
      rayalign inspect runs/quickstart/iter-1/samples
    """
    from rayalign.data.inspect import dataset_summary, find_datasets, iteration_table, read_metrics

    path = Path(path)
    datasets = find_datasets(path)
    if not datasets:
        raise UserError(f"{path}: no datasets (no manifest.json here or under iter-*/)")
    for ds in datasets:
        manifest, summary = dataset_summary(ds)
        console.print(f"[bold]{ds}[/]  {manifest['schema']} v{manifest['schema_version']}, {manifest['rows']} rows, "
                      f"{len(manifest['shards'])} shard(s), config {manifest.get('config_hash', '')}")
        if summary is not None:
            table = Table(*summary.columns)
            for row in summary.iter_rows():
                table.add_row(*(str(v) for v in row))
            console.print(table)
    metrics = read_metrics(path)
    if metrics:
        estimated = planned_seconds(path)
        table = Table("iteration", "stage", "seconds", "estimate s", "samples/s", "tokens/s", "retries", "failed rows",
                      caption="estimate: the plan's, saved at launch (plan.json); start-up not counted"
                      if estimated else None, caption_justify="left")
        for m in (m for m in metrics if m.get("stage") != "iteration"):
            seconds = m.get("wall_seconds", m.get("seconds", ""))  # a "redo" record has neither, nor an iteration
            estimate = estimated.get(m.get("stage")) if "iteration" in m else None
            table.add_row(str(m.get("iteration", "")), m.get("stage", ""), str(seconds),
                          "" if estimate is None else f"{estimate:.3g}",
                          str(m.get("samples_per_s", "")), str(m.get("tokens_per_s", "")), str(m.get("retries", "")),
                          str(m.get("failed_rows", "")))
        console.print(table)
        iterations = iteration_table(metrics)
        if iterations is not None:
            table = Table("metric", *(f"iter {i}" for i in iterations["iteration"]), title="iterations")
            for column in iterations.columns[1:]:
                label = ITERATION_HEADERS.get(column) or f"fidelity {column.removeprefix('fidelity_')}"
                table.add_row(label, *("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                                       for v in iterations[column]))
            console.print(table)


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@_user_errors
def validate(path):
    """Check datasets against their manifests: schema version, shard checksums, row counts, columns.

    Exits non-zero and names the file when something is wrong.

    \b
    Example:
      rayalign validate runs/quickstart/iter-1/samples
    """
    from rayalign.data.inspect import find_datasets
    from rayalign.data.store import DatasetError, dataset_problems, read_dataset, read_manifest

    path = Path(path)
    datasets = find_datasets(path)
    # shards without a manifest: an unfinished dataset (reported, never skipped); scores.forward/ holds checkpoints
    datasets += sorted({p.parent for p in [*path.glob("part-*.parquet"), *path.glob("iter-*/*/part-*.parquet")]
                        if not p.parent.name.endswith(".forward")} - set(datasets))
    if not datasets:
        raise UserError(f"{path}: no manifest.json here or under iter-*/ (incomplete or not a rayalign dataset)")
    failed = []
    for ds in datasets:
        problems = [message for _, message in dataset_problems(ds)]
        if not problems:
            try:
                table, manifest = read_dataset(ds), read_manifest(ds)
            except DatasetError as e:
                problems = [str(e)]
        if problems:
            failed.append(ds)
            for problem in problems:
                err.print(f"FAILED  {problem}", soft_wrap=True)
            continue
        console.print(f"ok  {ds}: {manifest['schema']} v{manifest['schema_version']}, {table.num_rows} rows, "
                      f"{len(manifest['shards'])} shard(s), checksums match")
    if failed:
        raise UserError(f"{len(failed)} of {len(datasets)} dataset(s) failed: {', '.join(map(str, failed))}")


@main.command("build-tiny-model")
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.option("--steps", type=int, help="training steps (default: the cached model's)")
def build_tiny_model_cmd(out_dir, steps):
    """Build the tiny offline chat model (Llama architecture, local tokenizer).

    Without OUT_DIR, builds into the cache that `builtin:tiny-multilingual` uses and prints the path.

    \b
    Example:
      rayalign build-tiny-model /tmp/tiny --steps 100
    """
    from rayalign.models import build_tiny_model, ensure_tiny_model

    overrides = {"train_steps": steps} if steps else {}
    progress = lambda step, total, loss: step % max(1, total // 10) == 0 and err.print(  # noqa: E731
        f"step {step}/{total} loss {loss:.3f}")
    path = build_tiny_model(out_dir, progress=progress, **overrides) if out_dir else ensure_tiny_model(
        progress=progress, **overrides)
    console.print(str(path))


@main.command("export")
@click.argument("source", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["hub", "verl"]), default="hub", show_default=True,
              help="hub: a run's dataset in Hugging Face Hub layout (one config per language plus default); verl: the "
              "recipe's prompt set (SOURCE a recipe or a run directory) as verl's RL Parquet")
@click.option("--stage", type=click.Choice(["pairs", "scores", "samples"]), default="pairs", show_default=True,
              help="with a run directory as SOURCE: which dataset of its last iteration")
@click.option("--license", "license_id", default="other", show_default=True, help="license id for the card")
@click.option("--push-to-hub", "repo", help="upload OUT to this Hub dataset repo (needs the network and a token)")
@click.option("--private", is_flag=True, help="with --push-to-hub: create the repo private")
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP + " (--format verl)")
@_user_errors
def export_cmd(source, out, fmt, stage, license_id, repo, private, overrides):
    """Export a run's dataset in Hugging Face Hub layout, or a prompt set as verl's RL Parquet.

    \b
    Example:
      rayalign export runs/quickstart hub/quickstart-pairs
      python -c "import datasets; print(datasets.load_dataset('hub/quickstart-pairs', 'de'))"
      rayalign export --format verl examples/quickstart.yaml verl/prompts
    """
    from rayalign.data.export import ExportError, export_hub, export_verl, push_to_hub

    source, out = Path(source), Path(out)
    try:
        if fmt == "verl":
            recipe = source / "config.yaml" if source.is_dir() else source
            console.print(f"wrote {export_verl(_load(recipe, overrides, models=False), out)}")
        else:
            header = export_hub(source, out, stage=stage, license=license_id)
            console.print(f"wrote {out}: configs {', '.join(c['config_name'] for c in header['configs'])}")
        if repo:
            console.print(f"pushed: {push_to_hub(out, repo, private=private)}")
    except ExportError as e:
        raise UserError(str(e)) from None


@main.command("config")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@_user_errors
def config_cmd(recipe, overrides):
    """Print the resolved config of a recipe, or every setting with its help when no recipe is given.

    \b
    Example:
      rayalign config examples/quickstart.yaml -o sampling.temperature=0.7
    """
    import yaml

    from rayalign.config import describe_fields

    if recipe is None and not overrides:
        table = Table("key", "default", "help")
        for key, default, help_text in describe_fields():
            table.add_row(key, default, help_text)
        console.print(table)
        return
    cfg = _load(recipe, overrides)
    console.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
    console.print(f"# config hash {cfg.config_hash()}")


@main.command("online")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--cluster", default="local", show_default=True, help="cluster spec name or path")
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@click.option("--run-dir", type=click.Path(file_okay=False), help="run directory (default: runs/<name>)")
@click.option("--address", help="join the Ray cluster at this address (default: $RAY_ADDRESS, or start one)")
@click.option("--openrlhf-reward-file", type=click.Path(dir_okay=False),
              help="write the recipe's rewards as an OpenRLHF reward_func file (for its --remote_rm_url) and exit")
@_user_errors
def online_cmd(recipe, cluster, overrides, run_dir, address, openrlhf_reward_file):
    """Online RL (GRPO, RLOO or PPO): rollouts, rewards, update and weight sync, step after step.

    The same as `rayalign launch` on a recipe with `mode: online`; here the mode is implied.

    Each step's rollouts are written to <run-dir>/online/step-XXXX/ and its reward mean, KL and phase
    timings to metrics.jsonl; the final policy to <run-dir>/online/policy.

    \b
    Example:
      rayalign online --cluster local examples/online-grpo-quickstart.yaml
    """
    if openrlhf_reward_file:
        from rayalign.integrations.openrlhf_reward import write_reward_file

        path = write_reward_file(_load(recipe, overrides + ("mode=online",)), openrlhf_reward_file)
        console.print(f"wrote {path}: use it with OpenRLHF's train_ppo_ray --remote_rm_url {path} --label_key lang")
        return
    _run_online(_load(recipe, overrides + ("mode=online",)), run_dir, cluster, address)


def _run_online(cfg, run_dir, cluster, address):
    from rayalign.pipelines import online

    out = online.run(cfg, Path(run_dir) if run_dir else None, cluster=cluster, address=address)
    console.print(f"done: {out}  (see {out / 'metrics.jsonl'})")


def _run_dir(cfg, run_dir) -> Path:
    return Path(run_dir) if run_dir else cfg.resolved_run_dir()


def _eval_option(name: str, flag: str, **kwargs):
    """A `rayalign eval` option whose help, choices, range and default come from EvalConfig (their one home)."""
    import dataclasses

    from rayalign.config import EvalConfig

    f = next(f for f in dataclasses.fields(EvalConfig) if f.name == name)
    meta = f.metadata
    if "choices" in meta:
        kwargs = {"type": click.Choice(meta["choices"]), "default": f.default, "show_default": True, **kwargs}
    elif "ge" in meta:
        kwargs = {"type": click.IntRange(min=meta["ge"]), **kwargs}
    return click.option(flag, name, help=meta["help"], **kwargs)


POLICY_HELP = "checkpoint to evaluate: initial (the recipe's policy), iter-N (the run's iteration N), or a path; " \
              "default: the run's latest trained policy, else initial"


@main.command("eval")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--policy", help=POLICY_HELP)
@click.option("--run-dir", type=click.Path(file_okay=False), help="the run directory (default: runs/<name>)")
@click.option("--out", type=click.Path(file_okay=False), help="output directory (default: <run-dir>/eval/<label>)")
@_eval_option("prompts_limit", "--prompts")
@_eval_option("samples", "--samples")
@_eval_option("candidates_path", "--candidates", type=click.Path(exists=True, file_okay=False))
@_eval_option("silhouette_prompts", "--silhouette-prompts")
@_eval_option("likelihood", "--likelihood")
@_eval_option("accuracy", "--accuracy")
@click.option("--judge-url", help="OpenAI-compatible endpoint of a judge you run (e.g. http://localhost:8000/v1); "
              "adds the win rate against the prompts' reference answers")
@click.option("--judge-model", help="the judge's model name on that endpoint")
@click.option("--judge-api-key", help="bearer token for the judge (default: $RAYALIGN_JUDGE_API_KEY)")
@click.option("--cluster", default="local", show_default=True, help=CLUSTER_HELP)
@click.option("--address", help="join the Ray cluster at this address (default: $RAY_ADDRESS, or start one)")
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@_user_errors
def eval_cmd(recipe, policy, run_dir, out, prompts_limit, samples, candidates_path, silhouette_prompts, likelihood,
             accuracy, judge_url, judge_model, judge_api_key, cluster, address, overrides):
    """Evaluate a policy checkpoint on the recipe's prompts.

    Language fidelity and response length per language, statistics of the recipe's rewards, the silhouette
    of pooled states at every layer (clustered by prompt: higher = more language-neutral), RankC and
    accuracy on a parallel candidate set, and optionally a judge's win rate. Writes samples/, scores/ and
    results/ (an Arrow `eval` table, one row per metric, statistic, language and layer) and prints a summary.

    \b
    Example:
      rayalign eval examples/quickstart.yaml --policy initial --candidates examples/data/mc
      rayalign eval examples/quickstart.yaml --candidates examples/data/mc     # the latest iteration
    """
    from rayalign.cluster import connect, load_cluster_spec
    from rayalign.cluster.planner import with_counts
    from rayalign.pipelines.evaluate import evaluate_policy, print_summary, run_policy
    from rayalign.scoring.hub_scan import run_hub_layer

    cfg = _load(recipe, overrides)
    run_dir = _run_dir(cfg, run_dir)
    judge = None
    if judge_url or judge_model:
        if not (judge_url and judge_model):
            raise UserError("--judge-url and --judge-model go together")
        from rayalign.eval.judge import JudgeSettings

        judge = JudgeSettings(url=judge_url, model=judge_model, api_key=judge_api_key)
    path, name, label = run_policy(cfg, run_dir, policy)
    out = Path(out) if out else run_dir / "eval" / label
    connect(load_cluster_spec(cluster), address)
    cfg = with_counts(cfg, load_cluster_spec(cluster), address)
    result = evaluate_policy(cfg, path, out, policy_name=name, prompts_limit=prompts_limit, samples=samples,
                             candidates_path=candidates_path, silhouette_prompts=silhouette_prompts,
                             likelihood=likelihood, accuracy=accuracy, judge=judge, hub_layer=run_hub_layer(cfg, run_dir))
    print_summary(result, cfg.languages, cfg.anchor_language)
    console.print(f"results: {out / 'results'}")


@main.command("hub-scan")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--policy", help=POLICY_HELP.replace("default: the run's latest trained policy, else initial",
                                                   "default: initial"), default="initial")
@click.option("--run-dir", type=click.Path(file_okay=False), help="the run directory (default: runs/<name>)")
@click.option("--prompts", "prompts_limit", type=click.IntRange(min=2),
              help="prompts scanned (default: rewards.latent.hub_scan_prompts)")
@click.option("--samples", type=click.IntRange(min=1), default=2, show_default=True, help="responses per prompt")
@click.option("--cluster", default="local", show_default=True, help=CLUSTER_HELP)
@click.option("--address", help="join the Ray cluster at this address (default: $RAY_ADDRESS, or start one)")
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@_user_errors
def hub_scan_cmd(recipe, policy, run_dir, prompts_limit, samples, cluster, address, overrides):
    """Choose the semantic-hub layer: the layer whose pooled response states cluster best by prompt across
    languages (silhouette score; docs/methods.md, section 1).

    Generates responses to the recipe's prompts in every language, scores them once with pooled states at
    every layer, and prints the silhouette by layer. Writes <run-dir>/hub-scan-<label>/ (samples and
    hub-scan.json). A recipe may instead say `rewards.latent.hub_layer: auto`, and launch runs this scan on
    iteration 1's samples.

    \b
    Example:
      rayalign hub-scan examples/quickstart.yaml --prompts 16
    """
    import dataclasses

    from rayalign.cluster import connect, load_cluster_spec
    from rayalign.cluster.planner import with_counts
    from rayalign.pipelines.evaluate import eval_samples, run_policy
    from rayalign.scoring.hub_scan import hub_scan, print_hub_scan, save_hub_scan

    cfg = _load(recipe, overrides)
    run_dir = _run_dir(cfg, run_dir)
    limit = prompts_limit or cfg.rewards.latent.hub_scan_prompts
    cfg = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, limit=limit),
                              sampling=dataclasses.replace(cfg.sampling, n=samples))
    path, name, label = run_policy(cfg, run_dir, policy)
    out = run_dir / f"hub-scan-{label}"
    connect(load_cluster_spec(cluster), address)
    cfg = with_counts(cfg, load_cluster_spec(cluster), address)
    result = hub_scan(cfg, path, name, eval_samples(cfg, path, name, out / "samples"), limit)
    save_hub_scan(result, out / "hub-scan.json")
    print_hub_scan(result)
    console.print(f"hub layer {result['hub_layer']} (set rewards.latent.hub_layer: {result['hub_layer']}); "
                  f"saved {out / 'hub-scan.json'}")


@main.command("study")
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option("--cluster", default="local", show_default=True, help=CLUSTER_HELP)
@click.option("--address", help="join the Ray cluster at this address (default: $RAY_ADDRESS, or start one)")
@click.option("--parallel", type=click.IntRange(min=1), help="runs side by side (default: the study's parallel)")
@click.option("--runs-dir", type=click.Path(file_okay=False), help="parent of the study directory (default: the "
              "study's runs_dir, else runs)")
@click.option("--dry-run", is_flag=True, help="print the slices and each run's actors on its slice; starts nothing")
@_user_errors
def study_cmd(study_file, cluster, address, parallel, runs_dir, dry_run):
    """Run a scaling study: a grid of runs over one base recipe, then one results table.

    The grid's axes (language subsets, prompts per language, samples per prompt, reward method, model,
    iterations, ...) expand into runs under <runs_dir>/<name>/; finished runs are skipped, interrupted ones
    resume. Every run's per-iteration metrics (and its evaluation, when the study has an `eval:` section)
    are collected into <study dir>/results.parquet. With parallel N, each run gets its own slice of the cluster
    (whole nodes, or equal shares of every node), planned so the N runs fit side by side; --dry-run shows them.

    \b
    Example:
      rayalign study examples/study-quickstart.yaml
      rayalign report runs/study-quickstart
    """
    from rayalign.pipelines.study import run_study

    if dry_run:
        from rayalign.cluster import load_cluster_spec
        from rayalign.cluster.slices import plan_side_by_side, slice_table, slices_text
        from rayalign.pipelines.study import expand, load_study

        study = load_study(study_file, runs_dir=runs_dir)
        runs = expand(study)
        side_by_side, spec = min(parallel or study.parallel, len(runs)), load_cluster_spec(cluster)
        slices, plans = plan_side_by_side({run.slug: run.cfg for run in runs}, spec, side_by_side)
        if side_by_side > 1:
            console.print(slices_text(spec, slices), markup=False, highlight=False)
        console.print(slice_table(slices, plans))
        return
    out = run_study(study_file, cluster=cluster, address=address, parallel=parallel, runs_dir=runs_dir)
    console.print(f"done: {out}/results.parquet  (see `rayalign report {out}`)")


@main.command("report")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="output directory (default: PATH/report)")
@_user_errors
def report_cmd(path, out):
    """Plots (PNG) and a Markdown summary of a run or a study directory.

    A run: reward distributions per language, language fidelity per iteration, silhouette by layer (from
    `rayalign eval` results), training curves. A study: scaling curves (each metric against each numeric
    axis) and fidelity per language by run.

    \b
    Example:
      rayalign report runs/quickstart
    """
    from rayalign.report import report

    console.print(f"wrote {report(path, out)}")


if __name__ == "__main__":
    sys.exit(main())
