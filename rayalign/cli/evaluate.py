"""Commands that evaluate and report: eval, hub-scan, report."""

from __future__ import annotations

from pathlib import Path

import click

from rayalign.cli.common import (CLUSTER_HELP, OVERRIDE_HELP, POLICY_HELP, UserError, console, load_recipe, main,
                                 run_dir_of, user_errors)


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
@user_errors
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
    from rayalign.data.store import is_dataset_dir, refuse_inside_dataset
    from rayalign.pipelines.evaluate import eval_setup, evaluate_policy, print_summary, run_policy
    from rayalign.scoring.hub_scan import run_hub_layer

    cfg = load_recipe(recipe, overrides, trackers=False)
    run_dir = run_dir_of(cfg, run_dir)
    judge = None
    if judge_url or judge_model:
        if not (judge_url and judge_model):
            raise UserError("--judge-url and --judge-model go together")
        from rayalign.eval.judge import JudgeSettings

        judge = JudgeSettings(url=judge_url, model=judge_model, api_key=judge_api_key)
    path, name, label = run_policy(cfg, run_dir, policy)
    out = Path(out) if out else run_dir / "eval" / label
    options = dict(prompts_limit=prompts_limit, samples=samples, candidates_path=candidates_path,
                   silhouette_prompts=silhouette_prompts, likelihood=likelihood, accuracy=accuracy, judge=judge,
                   hub_layer=run_hub_layer(cfg, run_dir))
    eval_setup(cfg, path, name, **options, say=lambda note: None)  # its inputs refused before Ray starts
    refuse_inside_dataset(out, "an evaluation")
    run_part = next((p for p in (out, out.parent) if (p / "state.json").is_file()), None)
    if run_part is not None:  # samples/ and scores/ there are the run's own datasets
        raise UserError(f"--out {out}: {'a run directory' if run_part == out else f'part of the run {run_part}'}; an "
                        f"evaluation writes samples/, scores/ and results/ into a directory of its own (default: "
                        f"<run-dir>/eval/<label>)")
    if is_dataset_dir(out):
        raise UserError(f"--out {out}: holds a dataset; an evaluation writes samples/, scores/ and results/ into a "
                        "directory of its own")
    spec = load_cluster_spec(cluster)
    connect(spec, address)
    cfg = with_counts(cfg, spec, address)
    result = evaluate_policy(cfg, path, out, policy_name=name, **options)
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
@user_errors
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

    cfg = load_recipe(recipe, overrides, trackers=False)
    run_dir = run_dir_of(cfg, run_dir)
    limit = prompts_limit or cfg.rewards.latent.hub_scan_prompts
    cfg = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, limit=limit),
                              sampling=dataclasses.replace(cfg.sampling, n=samples))
    path, name, label = run_policy(cfg, run_dir, policy)
    out = run_dir / f"hub-scan-{label}"
    spec = load_cluster_spec(cluster)
    connect(spec, address)
    cfg = with_counts(cfg, spec, address)
    result = hub_scan(cfg, path, name, eval_samples(cfg, path, name, out / "samples"), limit)
    save_hub_scan(result, out / "hub-scan.json")
    print_hub_scan(result)
    console.print(f"hub layer {result['hub_layer']} (set rewards.latent.hub_layer: {result['hub_layer']}); "
                  f"saved {out / 'hub-scan.json'}")


@main.command("report")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="output directory (default: PATH/report)")
@user_errors
def report_cmd(path, out):
    """Plots (PNG) and a Markdown summary of a run or a study directory.

    A run: reward distributions per language, language fidelity per iteration, silhouette by layer (from
    `rayalign eval` results), training curves; an online run: its steps (reward, KL, clipping, entropy). A
    study: scaling curves (each metric against each numeric axis) and fidelity per language by run.

    \b
    Example:
      rayalign report runs/quickstart
    """
    from rayalign.report import report

    console.print(f"wrote {report(path, out)}")
