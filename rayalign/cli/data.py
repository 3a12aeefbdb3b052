"""Commands on datasets and run directories: rescore, inspect, validate, export, config, build-tiny-model."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from rayalign.cli.common import OVERRIDE_HELP, UserError, console, err, load_recipe, main, user_errors


@main.command()
@click.argument("scores", type=click.Path(exists=True, file_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="directory of the new scores dataset")
@click.option("--recipe", type=click.Path(dir_okay=False),
              help="recipe to start from (default: the config.yaml of the run that holds SCORES)")
@click.option("--replace", is_flag=True, help="when OUTPUT holds a dataset, move it to the trash (the run's "
              "trash-<time>/ when OUTPUT is in a run directory) and write there; without it, a non-empty OUTPUT is "
              "refused, and so, always, is a directory of other things (a run, an iteration)")
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@user_errors
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
    run_config = scores.absolute().parent.parent / "config.yaml"  # RUN/iter-N/scores (absolute: SCORES may be `.`)
    if not recipe and not run_config.is_file():
        raise UserError(f"{scores.absolute()}: no config.yaml of a run found for it (looked for {run_config}, as in "
                        "RUN/iter-N/scores), so no recipe to start from; pass --recipe RECIPE, the recipe it was "
                        "scored with")
    cfg = load_recipe(recipe or run_config, overrides, sources=False, trackers=False)
    if cfg.rewards.user.path:  # user code: say which file runs, and from where its path came
        source = f"--recipe {recipe}" if recipe else f"{run_config} (the scored run's config)"
        err.print(f"rescore: runs the user reward file {cfg.rewards.user.path} as code, named by {source}; pass "
                  "--recipe or -o rewards.user.path=... to choose another", soft_wrap=True)
    manifest = offline.rescore(cfg, scores, Path(output), replace=replace)
    console.print(f"done: {output} ({manifest['rows']} rows)")


ITERATION_HEADERS = {"policy": "generating policy", "pairs_rows": "pairs", "loss_first": "loss, first step",
                     "loss_mean": "loss, mean", "reward_margin_mean": "reward margin, mean",
                     "accuracy_mean": "pair accuracy, mean", "steps": "training steps",
                     "dropped_too_long": "pairs dropped, too long", "seconds_generate": "generate s",
                     "seconds_score": "score s", "seconds_pairs": "pairs s", "seconds_train": "train s"}


def planned_seconds(run_dir: Path) -> dict[str, float]:
    """Estimated seconds per phase of one iteration from the run's plan.json; empty without one."""
    import json

    try:
        phases = json.loads((run_dir / "plan.json").read_text()).get("estimate", {}).get("phases", {})
        return {phase: float(value["seconds"]) for phase, value in phases.items() if value.get("seconds") is not None}
    except (OSError, ValueError, AttributeError, TypeError):  # none, or not the shape launch writes: no estimates
        return {}


STEP_HEADERS = {"reward_mean": "reward", "clip_fraction": "clip", "value_loss": "value", "seconds_generate": "gen s",
                "seconds_reward": "rew s", "seconds_train": "trn s", "seconds_sync": "sync s"}


def online_steps_table(steps, estimated: dict[str, float], most: int = 20) -> Table:
    """An online run's steps (at most `most`, evenly spaced, first and last kept), their mean over every step,
    and the plan's estimate of each phase's seconds per step."""
    from rich import box

    n = steps.height
    shown = sorted({round(i * (n - 1) / (most - 1)) for i in range(most)}) if n > most else range(n)
    table = Table(*(STEP_HEADERS.get(c, c) for c in steps.columns),
                  title=f"online steps ({len(shown)} of {n} shown)" if n > most else "online steps",
                  caption="estimate: the plan's, saved at launch (plan.json), per step without start-up"
                  if estimated else None, caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    number = lambda v: "" if v is None else f"{v:.3g}"  # noqa: E731
    for i in shown:
        table.add_row(*(str(v) if c == "step" else number(v) for c, v in zip(steps.columns, steps.row(i))))
    means = steps.mean().row(0)
    table.add_row("mean", *(number(v) for v in means[1:]), end_section=not estimated)
    if estimated:
        table.add_row("estimate", *(number(estimated.get(c.removeprefix("seconds_"))) if c.startswith("seconds_")
                                    else "" for c in steps.columns[1:]))
    return table


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@user_errors
def inspect(path):
    """Summarise a dataset or a run directory: per-language rows, lengths, detected-language share; a run's
    stage times (and an online run's steps) beside the plan's estimates.

    \b
    Example:
      rayalign inspect runs/quickstart
      rayalign inspect runs/quickstart/iter-1/samples
    """
    from rayalign.data.inspect import dataset_summary, find_datasets, iteration_table, read_metrics, step_table

    path = Path(path)
    datasets = find_datasets(path)
    metrics = read_metrics(path, lambda file, number: err.print(
        f"{file}:{number}: skipped, not a metrics record (a write cut short, or edited)", soft_wrap=True))
    if not datasets and not metrics:
        study = " It is a study's directory: `rayalign report` summarises a study" if (path / "study.json").is_file() \
            else ""
        raise UserError(f"{path}: no datasets (no manifest.json here, under iter-*/ or under online/step-*/) and no "
                        f"metrics.jsonl.{study}")
    rollouts = [ds for ds in datasets if ds.parent.name == "online"]
    for ds in [ds for ds in datasets if ds not in rollouts] + rollouts[-1:]:  # of an online run's steps, the last
        manifest, summary = dataset_summary(ds)
        console.print(f"[bold]{ds}[/]  {manifest['schema']} v{manifest['schema_version']}, {manifest['rows']} rows, "
                      f"{len(manifest['shards'])} shard(s), config {manifest.get('config_hash', '')}")
        if summary is not None:
            table = Table(*summary.columns)
            for row in summary.iter_rows():
                table.add_row(*(str(v) for v in row))
            console.print(table)
    if len(rollouts) > 1:
        console.print(f"{rollouts[0].parent}: {len(rollouts)} rollout datasets, {rollouts[0].name} to "
                      f"{rollouts[-1].name} (the last summarised above)")
    estimated = planned_seconds(path)
    steps = step_table(metrics)
    if steps is not None:
        console.print(online_steps_table(steps, estimated))
    stages = [m for m in metrics if m.get("stage") not in ("iteration", "online")]
    if stages:
        table = Table("iteration", "stage", "seconds", "estimate s", "samples/s", "tokens/s", "retries", "failed rows",
                      caption="estimate: the plan's, saved at launch (plan.json), start-up included; a streamed score stage's seconds are its wait after generation"
                      if estimated else None, caption_justify="left")
        for m in stages:
            seconds = m.get("wall_seconds", m.get("seconds", ""))  # a "redo" record has neither, nor an iteration
            estimate = estimated.get(m.get("stage")) if "iteration" in m else None
            table.add_row(str(m.get("iteration", "")), str(m.get("stage", "")), str(seconds),
                          "" if estimate is None else f"{estimate:.3g}",
                          str(m.get("samples_per_s", "")), str(m.get("tokens_per_s", "")), str(m.get("retries", "")),
                          str(m.get("failed_rows", "")))
        console.print(table)
    iterations = iteration_table(metrics)
    if iterations is not None:
        table = Table("metric", *(f"iter {i}" for i in iterations["iteration"]), title="iterations")
        for column in iterations.columns[1:]:
            label = ITERATION_HEADERS.get(column) or f"fidelity {column.removeprefix('fidelity_')}"
            table.add_row(label, *("" if v is None else f"{v + 0.0:.4g}" if isinstance(v, float) else str(v)
                                   for v in iterations[column]))  # + 0.0: -0.0 prints as 0
        console.print(table)


RUN_DATASETS = {"samples": ("samples",), "scores": ("scores",), "pairs": ("pairs", "kto", "dco"),
                "errors": ("errors",), "candidate_scores": ("candidate_scores",)}  # by a run's directory names


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@user_errors
def validate(path):
    """Check datasets against their manifests: schema version, shard checksums, row counts, columns.

    Exits non-zero and names the file when something is wrong.

    \b
    Example:
      rayalign validate runs/quickstart/iter-1/samples
    """
    from rayalign.data.inspect import find_datasets
    from rayalign.data.store import DatasetError, dataset_problems, foreign_files, read_dataset, read_manifest

    path = Path(path)
    datasets = find_datasets(path)
    # shards without a manifest: an unfinished dataset (reported, never skipped); scores.forward/ holds checkpoints
    shards = [*path.glob("part-*.parquet"), *path.glob("iter-*/*/part-*.parquet"),
              *path.glob("online/step-*/part-*.parquet"), *path.glob("eval/*/*/part-*.parquet")]
    datasets += sorted({p.parent for p in shards if not p.parent.name.endswith(".forward")
                        and ".stale-" not in p.parent.name} - set(datasets))
    missing = []
    if (path / "state.json").is_file():  # a run: every stage it records as finished has its dataset
        from rayalign.run_dir import read_state, stage_output

        for entry in (read_state(path) or {}).get("finished", []):
            iteration, _, stage = entry.partition("/")
            if stage in ("generate", "score", "pairs") and path / iteration / stage_output(stage) not in datasets:
                missing.append(path / iteration / stage_output(stage))
                err.print(f"FAILED  {missing[-1]}: missing, though state.json records {entry} as finished; "
                          "relaunching the run recomputes it", soft_wrap=True)
    if not datasets and not missing:
        raise UserError(f"{path}: no manifest.json here, under iter-*/ or under online/step-*/ (incomplete or not a "
                        "rayalign dataset)")
    failed = list(missing)
    for ds in datasets:
        problems = [message for _, message in dataset_problems(ds)]
        if others := foreign_files(ds):
            problems.append(f"{ds}: holds files that are not this dataset's ({', '.join(others[:3])}"
                            f"{', ...' if len(others) > 3 else ''}); datasets.load_dataset would read them as its "
                            "rows: move them out")
        if not problems:
            try:
                table, manifest = read_dataset(ds), read_manifest(ds)
            except DatasetError as e:
                problems = [str(e)]
            else:
                expected = RUN_DATASETS.get(ds.name) if ds != path and ds.parent.name.startswith("iter-") else None
                if expected and manifest["schema"] not in expected:
                    problems = [f"{ds}: holds a {manifest['schema']} dataset where a run keeps its "
                                f"{' or '.join(expected)} (written over by another command?)"]
        if problems:
            failed.append(ds)
            for problem in problems:
                err.print(f"FAILED  {problem}", soft_wrap=True)
            continue
        console.print(f"ok  {ds}: {manifest['schema']} v{manifest['schema_version']}, {table.num_rows} rows, "
                      f"{len(manifest['shards'])} shard(s), checksums match")
    if failed:
        raise UserError(f"{len(failed)} of {len(datasets) + len(missing)} dataset(s) failed: "
                        f"{', '.join(map(str, failed))}")


@main.command("build-tiny-model")
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.option("--steps", type=click.IntRange(min=1), help="training steps (default: the cached model's)")
@user_errors
def build_tiny_model_cmd(out_dir, steps):
    """Build the tiny offline chat model (Llama architecture, local tokenizer).

    Without OUT_DIR, builds into the cache that `builtin:tiny-multilingual` uses and prints the path.

    \b
    Example:
      rayalign build-tiny-model /tmp/tiny --steps 100
    """
    from rayalign.data.store import refuse_inside_dataset
    from rayalign.models import build_tiny_model, ensure_tiny_model

    if out_dir and Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty; the model is built only into a new or empty directory")
    if out_dir:
        refuse_inside_dataset(Path(out_dir), "a model")
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
@user_errors
def export_cmd(source, out, fmt, stage, license_id, repo, private, overrides):
    """Export a run's dataset in Hugging Face Hub layout, or a prompt set as verl's RL Parquet.

    \b
    Example:
      rayalign export runs/quickstart hub/quickstart-pairs
      python -c "import datasets; print(datasets.load_dataset('hub/quickstart-pairs', 'de'))"
      rayalign export --format verl examples/quickstart.yaml verl/prompts
    """
    from rayalign.data.export import (ExportError, check_license, check_repo_id, export_hub, export_verl, find_dataset,
                                      push_to_hub)

    source, out = Path(source), Path(out)
    ctx = click.get_current_context()
    given = {name for name in ("stage", "license_id", "repo", "private", "overrides")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    flag = {"stage": "--stage", "license_id": "--license", "repo": "--push-to-hub", "private": "--private",
            "overrides": "-o"}
    ignored = given & ({"stage", "license_id"} if fmt == "verl" else {"overrides"})
    if ignored:
        raise UserError(f"{', '.join(sorted(flag[n] for n in ignored))}: not used by --format {fmt} (see --help)")
    if "stage" in given and (source / "manifest.json").is_file():
        raise UserError(f"--stage {stage}: chooses a dataset of a run directory; {source} is a dataset itself (export "
                        f"it without --stage, or give the run directory)")
    try:
        if repo:
            check_repo_id(repo)
        if fmt == "verl":
            if source.is_dir() and not (source / "config.yaml").is_file():
                raise UserError(f"{source}: neither a recipe file nor a run directory (no config.yaml); --format verl "
                                "exports a recipe's prompt set")
            recipe = source / "config.yaml" if source.is_dir() else source
            console.print(f"wrote {export_verl(load_recipe(recipe, overrides, models=False, trackers=False), out)}")
        else:
            check_license(license_id)
            dataset = find_dataset(source, stage)
            last = max((int(p.name[5:]) for p in source.glob("iter-*") if p.name[5:].isdigit()), default=None)
            if dataset != source and last is not None and dataset.parent.name != f"iter-{last}":
                err.print(f"export: iter-{last} has no finished {stage} dataset; exporting {dataset}", soft_wrap=True)
            header = export_hub(dataset, out, stage=stage, license=license_id)
            verb = "kept (it already holds this export)" if header.get("kept") else "wrote"
            console.print(f"{verb} {out} from {dataset}: configs "
                          f"{', '.join(c['config_name'] for c in header['configs'])}", soft_wrap=True)
        if repo:
            console.print(f"pushed: {push_to_hub(out, repo, private=private)}")
    except ExportError as e:
        raise UserError(str(e)) from None


@main.command("config")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@click.option("--study", "study_keys", is_flag=True, help="list the keys of a study file (rayalign study) instead")
@user_errors
def config_cmd(recipe, overrides, study_keys):
    """Print the resolved config of a recipe, or every setting with its help when no recipe is given.

    \b
    Example:
      rayalign config examples/quickstart.yaml -o sampling.temperature=0.7
      rayalign config --study
    """
    import yaml

    from rayalign.config import describe_fields
    from rayalign.config.study import StudyConfig

    if study_keys and (recipe or overrides):
        raise UserError("--study lists a study file's keys; give it alone (no recipe, no -o)")
    if recipe is None and not overrides:
        table = Table("key", "default", "help")
        for key, default, help_text in describe_fields(StudyConfig if study_keys else None):
            table.add_row(key, default, help_text)
        console.print(table)
        return
    cfg = load_recipe(recipe, overrides)
    console.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
    console.print(f"# config hash {cfg.config_hash()}")
