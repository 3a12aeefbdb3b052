"""Commands that run a recipe: launch, plan, submit, one stage, online, study."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rayalign.cli.common import (CLUSTER_HELP, OVERRIDE_HELP, UserError, console, err, load_recipe, main, run_dir_of,
                                 user_errors)


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
@user_errors
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
    from rayalign.cluster.planner import plan, save_plan
    from rayalign.cluster.spec import running_cluster_spec
    from rayalign.pipelines import offline
    from rayalign.run_dir import check_run_dir_config
    from rayalign.run_lock import run_dir_lock

    redo_stages = tuple(s.strip() for s in redo.split(",") if s.strip()) if redo else ()
    unknown = [s for s in redo_stages if s not in offline.STAGES]
    if unknown or (redo is not None and not redo_stages):
        raise UserError(f"--redo {redo!r}: expected stages among {', '.join(offline.STAGES)}, comma-separated")
    # the models are loaded where the actors run: checked here unless this is only a plan or a Ray client
    cfg = load_recipe(recipe, overrides, models=not dry_run and not (address or "").startswith("ray://"))
    if cfg.mode == "online":
        if redo_stages:
            raise UserError("--redo: an online recipe (mode: online) has no stages to redo")
        if not dry_run:
            return _run_online(cfg, run_dir, cluster, address)
    prompts = None
    if not dry_run:  # before Ray starts and plan.json is written: a run of another config is refused as it is,
        state = check_run_dir_config(cfg, run_dir_of(cfg, run_dir), redo_stages)  # and one of other prompt rows
        if state and state.get("prompts_digest") and cfg.pairs.method != "dco":
            from rayalign.data.prompts import load_prompts
            from rayalign.run_dir import check_prompts_unchanged

            prompts = load_prompts(cfg.prompts.path, cfg.languages, **cfg.prompts.load_kwargs())
            check_prompts_unchanged(cfg, state, prompts, redo_stages)
    spec = load_cluster_spec(cluster)
    if dry_run:
        dry_plan = plan(cfg, spec, strict=True)
        console.print(dry_plan.table())
        console.print(dry_plan.estimate_table())
        return
    with run_dir_lock(run_dir_of(cfg, run_dir), err.print):  # before plan.json: a run in progress keeps its plan
        early_plan, preflighted = None, not (address or "").startswith("ray://")  # a Ray client's models are remote
        if preflighted:  # refused before Ray starts and plan.json is written
            import ray

            from rayalign.models import resolve_model_path
            from rayalign.preflight import preflight
            from rayalign.progress import model_build_progress

            if not (address or ray.is_initialized()) or not spec.auto_fields:
                early_plan = plan(cfg, spec, strict=True)
            preflight(cfg, resolve_model_path(cfg.policy.path, model_build_progress(cfg.policy.path)),
                      run_dir_of(cfg, run_dir))
        connect(spec, address, allow_mismatch=allow_mismatch)
        running = running_cluster_spec(spec)  # the spec itself unless it has auto fields
        run_plan = early_plan if early_plan is not None and running is spec else plan(cfg, running, strict=True)
        err.print(run_plan.table())
        err.print(run_plan.estimate_table())
        save_plan(run_plan, run_dir_of(cfg, run_dir))
        extra = {**({"redo": redo_stages} if redo_stages else {}),
                 **({"prompts": prompts} if prompts is not None else {})}
        out = offline.run(cfg, Path(run_dir) if run_dir else None, cluster=cluster, address=address, planned=True,
                          preflighted=preflighted, **extra)
    console.print(f"done: {out}  (see `rayalign inspect {out}`)")


@main.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--cluster", default="local", show_default=True, help=CLUSTER_HELP)
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON (as launch saves it in plan.json)")
@user_errors
def plan_cmd(recipe, cluster, overrides, as_json):
    """Show how a recipe's phases map onto a cluster: actors, placement, memory per GPU.

    Exits with code 2 and the reason when the recipe does not fit (say, a 70B model at tensor parallel
    size 1 on 80 GB GPUs, or more CPU actors than the CPUs there are). On a CPU-only spec a GPU recipe is
    previewed as CPU actors, with its problems (exit code 0).

    \b
    Example:
      rayalign plan --cluster a100x64 examples/lacomsa-llama3-8b.yaml
      rayalign plan --cluster a100x8 examples/icr-llama3-8b.yaml -o engines.tensor_parallel_size=2 -o engines.num_gpus=2
    """
    import json

    from rayalign.cluster import load_cluster_spec
    from rayalign.cluster.planner import plan

    cfg = load_recipe(recipe, overrides, models=False)
    result = plan(cfg, load_cluster_spec(cluster))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        console.print(result.table())
        console.print(result.estimate_table())
    if result.problems and not any((cfg.engines.num_gpus, cfg.rewards.num_gpus, cfg.training.num_gpus)):
        raise UserError(f"does not fit: {result.problems[0]}")  # a CPU recipe: not a preview of a GPU one


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--address", envvar="RAY_ADDRESS", default="http://127.0.0.1:8265", show_default=True,
              help="the Ray cluster's dashboard (default: $RAY_ADDRESS)")
@click.option("--working-dir", default=".", show_default=True, type=click.Path(exists=True, file_okay=False),
              help="directory uploaded as the job's working directory (runs/ and caches excluded)")
@click.option("--pip", multiple=True, help="a pip requirement the job's runtime environment installs (repeatable)")
@click.option("--env", "env_vars", multiple=True, help="KEY=VALUE environment variable for the job (repeatable)")
@click.option("--wait", is_flag=True, help="wait for the job and stream its logs")
@user_errors
def submit(command, address, working_dir, pip, env_vars, wait):
    """Run a rayalign command as a Ray Job on a running cluster.

    Everything after `--` is the rayalign command the job runs; the working directory is uploaded. Give the
    command a --run-dir on the cluster's shared file system: a run left in the uploaded copy is lost with it.

    \b
    Example:
      rayalign submit --address http://head:8265 --pip 'vllm>=0.32,<0.33' --wait -- \\
        launch --cluster a100x64 examples/lacomsa-llama3-8b.yaml --run-dir /shared/runs/lacomsa
    """
    from rayalign.cluster.submit import job_spec, submit as submit_job

    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address!r}: the Ray dashboard's HTTP address, such as http://head:8265 (not "
                        "the host:6379 address that `ray start --address` takes)")
    if command[0] not in main.commands:
        drop = " (drop the leading 'rayalign')" if command[0] == "rayalign" else ""
        raise UserError(f"{command[0]!r}: not a rayalign command{drop}; after -- comes what follows `rayalign`, "
                        f"one of: {', '.join(sorted(main.commands))}")
    env = {}
    for item in env_vars:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    spec = job_spec(list(command), working_dir, pip=list(pip), env=env)
    try:
        job_id, status = submit_job(address, spec, wait=wait, echo=lambda text, end="": click.echo(text, nl=False))
    except (ConnectionError, RuntimeError, ValueError) as e:  # what the Jobs client raises for an unreachable dashboard
        raise UserError(f"--address {address}: the Ray Jobs API did not answer ({str(e).splitlines()[0][:300]}); "
                        "is the cluster up, and is this its dashboard (port 8265 by default)?") from None
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
    @user_errors
    def command(recipe, overrides, run_dir, cluster, address):
        from rayalign.pipelines import offline

        cfg = load_recipe(recipe, overrides)
        out = offline.run(cfg, Path(run_dir) if run_dir else None, cluster=cluster, address=address, stages=(stage,))
        console.print(f"done: {out}")

    return command


LATER = (" Later iterations start from a trained policy, so they run only once `rayalign launch` has trained the one "
         "before; the same recipe and --run-dir resume with launch.")
_stage_command("generate", "Run only the generation stage: <run-dir>/iter-1/samples." + LATER,
               "rayalign generate examples/quickstart.yaml -o engines.count=2 --run-dir runs/gen-k2")
_stage_command("score", "Run only the scoring stage on the run's samples (after `rayalign generate`): "
               "<run-dir>/iter-1/scores." + LATER, "rayalign score examples/quickstart.yaml --run-dir runs/gen-k2")
_stage_command("pairs", "Run only the pairs stage (after `rayalign score`; DCO: from its candidates): "
               "<run-dir>/iter-1/pairs. Other pairs from a finished run's scores: `rayalign launch RECIPE --redo "
               "pairs -o pairs.method=...`." + LATER, "rayalign pairs examples/quickstart.yaml --run-dir runs/gen-k2")


@main.command("online")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--cluster", default="local", show_default=True, help="cluster spec name or path")
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@click.option("--run-dir", type=click.Path(file_okay=False), help="run directory (default: runs/<name>)")
@click.option("--address", help="join the Ray cluster at this address (default: $RAY_ADDRESS, or start one)")
@click.option("--openrlhf-reward-file", type=click.Path(dir_okay=False),
              help="write the recipe's rewards as an OpenRLHF reward_func file (for its --reward.remote_url) and exit")
@user_errors
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

        path = write_reward_file(load_recipe(recipe, overrides + ("mode=online",), trackers=False),
                                 openrlhf_reward_file)
        console.print(f"wrote {path}: use it with OpenRLHF's train_ppo_ray --reward.remote_url {path} "
                      "--data.label_key lang")
        return
    _run_online(load_recipe(recipe, overrides + ("mode=online",)), run_dir, cluster, address)


def _run_online(cfg, run_dir, cluster, address):
    from rayalign.pipelines import online

    out = online.run(cfg, Path(run_dir) if run_dir else None, cluster=cluster, address=address)
    console.print(f"done: {out}  (see {out / 'metrics.jsonl'})")


@main.command("study")
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option("--cluster", default="local", show_default=True, help=CLUSTER_HELP)
@click.option("--address", help="join the Ray cluster at this address (default: $RAY_ADDRESS, or start one)")
@click.option("--parallel", type=click.IntRange(min=1), help="runs side by side (default: the study's parallel)")
@click.option("--runs-dir", type=click.Path(file_okay=False), help="parent of the study directory (default: the "
              "study's runs_dir, else runs)")
@click.option("--dry-run", is_flag=True, help="print the slices and each run's actors on its slice; starts nothing")
@user_errors
def study_cmd(study_file, cluster, address, parallel, runs_dir, dry_run):
    """Run a scaling study: a grid of runs over one base recipe, then one results table.

    The grid's axes (language subsets, prompts per language, samples per prompt, reward method, model,
    iterations, ...) expand into runs under <runs_dir>/<name>/; finished runs are skipped, interrupted ones
    resume. Every run's per-iteration metrics (and its evaluation, when the study has an `eval:` section)
    are collected into <study dir>/results.parquet. With parallel N, each run gets its own slice of the cluster
    (whole nodes, or equal shares of every node), planned so the N runs fit side by side; --dry-run shows them.
    `rayalign config --study` lists a study file's keys.

    \b
    Example:
      rayalign study examples/study-quickstart.yaml
      rayalign report runs/study-quickstart
    """
    from rayalign.pipelines.study import run_study

    if dry_run:
        from rayalign.cluster import load_cluster_spec
        from rayalign.cluster.slices import plan_side_by_side, runs_side_by_side, slice_table, slices_text
        from rayalign.pipelines.study import expand, load_study

        study = load_study(study_file, runs_dir=runs_dir)
        runs = expand(study)
        spec = load_cluster_spec(cluster)
        side_by_side = runs_side_by_side(parallel or study.parallel, len(runs), spec)
        slices, plans = plan_side_by_side({run.slug: run.cfg for run in runs}, spec, side_by_side)
        if side_by_side > 1:
            console.print(slices_text(spec, slices), markup=False, highlight=False)
        console.print(slice_table(slices, plans))
        return
    out = run_study(study_file, cluster=cluster, address=address, parallel=parallel, runs_dir=runs_dir)
    console.print(f"done: {out}/results.parquet  (see `rayalign report {out}`)")


@main.command("study-eval", hidden=True)
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.argument("runs_dir", type=click.Path(file_okay=False))
@click.argument("slug")
@click.argument("slice_spec")
@click.argument("address")
@user_errors
def study_eval_cmd(study_file, runs_dir, slug, slice_spec, address):
    """One study run's evaluation on its slice (started by `rayalign study` beside the run's launch)."""
    from rayalign.pipelines.study import evaluate_on_slice

    evaluate_on_slice(study_file, runs_dir, slug, slice_spec, address)
