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
        from rayalign.cluster.spec import ClusterError
        from rayalign.config import ConfigError
        from rayalign.data.prompts import PromptError
        from rayalign.data.store import DatasetError
        from rayalign.models import ModelLoadError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, PromptError, DatasetError, ModelLoadError, ClusterError) as e:
            raise UserError(str(e)) from None

    return wrapper


def _load(recipe, overrides):
    from rayalign.config import load_config

    return load_config(recipe, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rayalign")
def main():
    """rayalign: multilingual self-alignment of LLMs on Ray.

    \b
    Quick start (tiny offline model, CPU, a few minutes):
      rayalign launch --cluster local examples/quickstart.yaml
      rayalign inspect runs/quickstart
    """


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--cluster", default="local", show_default=True,
              help="cluster spec: a shipped name (local, ...) or the path of a spec YAML")
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@click.option("--run-dir", type=click.Path(file_okay=False), help="run directory (default: runs/<name>)")
@click.option("--address", help="join the Ray cluster at this address (default: $RAY_ADDRESS, or start one)")
@_user_errors
def launch(recipe, cluster, overrides, run_dir, address):
    """Run a recipe's stages for every iteration into a run directory.

    Re-running with the same recipe and run directory resumes: finished stages and shards are kept.

    \b
    Example:
      rayalign launch --cluster local examples/quickstart.yaml -o sampling.n=2
    """
    from rayalign.pipelines import offline

    cfg = _load(recipe, overrides)
    out = offline.run(cfg, Path(run_dir) if run_dir else None, cluster=cluster, address=address)
    console.print(f"done: {out}  (see `rayalign inspect {out}`)")


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
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@_user_errors
def rescore(scores, output, recipe, overrides):
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
    recipe = recipe or scores.parent.parent / "config.yaml"
    cfg = _load(recipe, overrides)
    manifest = offline.rescore(cfg, scores, Path(output))
    console.print(f"done: {output} ({manifest['rows']} rows)")


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
    from rayalign.data.inspect import dataset_summary, find_datasets, read_metrics

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
        table = Table("iteration", "stage", "seconds", "samples/s", "tokens/s", "retries")
        for m in metrics:
            table.add_row(str(m.get("iteration")), m.get("stage", ""), str(m.get("wall_seconds", m.get("seconds"))),
                          str(m.get("samples_per_s", "")), str(m.get("tokens_per_s", "")), str(m.get("retries", "")))
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
    from rayalign.data.store import read_dataset, read_manifest

    datasets = find_datasets(Path(path))
    if not datasets:
        raise UserError(f"{path}: no manifest.json here or under iter-*/ (incomplete or not a rayalign dataset)")
    for ds in datasets:
        table = read_dataset(ds)
        manifest = read_manifest(ds)
        console.print(f"ok  {ds}: {manifest['schema']} v{manifest['schema_version']}, {table.num_rows} rows, "
                      f"{len(manifest['shards'])} shard(s), checksums match")


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


if __name__ == "__main__":
    sys.exit(main())
