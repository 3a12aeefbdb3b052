"""The report of one run: iteration metrics, rewards, fidelity, evaluations and the hub scan."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from rayalign.data.inspect import iteration_table, read_metrics
from rayalign.data.store import DatasetError, read_dataset
from rayalign.report.document import (REWARD_COLUMNS, TRAINING_METRICS, Document, fidelity_languages, format_value,
                                      markdown_table, present, with_fidelity_mean)
from rayalign.report.plots import plot_fidelity, plot_rewards, plot_silhouette, plot_small_multiples


def eval_label_order(label: str) -> tuple:
    """initial, iter-1, iter-2, ..., final, then any other label alphabetically."""
    if label == "initial":
        return (0, 0, "")
    if label.startswith("iter-") and label[5:].isdigit():
        return (1, int(label[5:]), "")
    return (2, 0, "") if label == "final" else (3, 0, label)


def iteration_frame(metrics: list[dict]) -> pl.DataFrame | None:
    """One row per iteration from metrics.jsonl's `iteration` records (the last record wins when a stage was
    redone), with fidelity_mean added; None when there is none."""

    table = iteration_table(metrics)
    if table is None:
        return None
    table = table.filter(pl.col("iteration").is_not_null()).with_columns(pl.col(pl.Null).cast(pl.Float64))
    return with_fidelity_mean(table.unique("iteration", keep="last", maintain_order=True).sort("iteration"))


def fidelity_series(iterations: pl.DataFrame) -> dict[str, list[tuple[int, float]]]:
    """{language or "mean": [(iteration, fidelity share)]}, null values left out."""
    series = {}
    for lang in fidelity_languages(iterations) + (["mean"] if "fidelity_mean" in iterations.columns else []):
        points = [(t, v) for t, v in iterations.select("iteration", f"fidelity_{lang}").iter_rows() if v is not None]
        if points:
            series[lang] = points
    return series


def reward_values(scores: pl.DataFrame) -> dict[str, dict[str, list[float]]]:
    """{reward column: {language: values}} for the reward columns holding values; languages in order of first
    appearance."""
    out = {}
    for column in (c for c in REWARD_COLUMNS if present(scores, c)):
        grouped = scores.filter(pl.col(column).is_not_null()).group_by("lang", maintain_order=True).agg(column)
        out[column] = dict(zip(grouped["lang"], (v.to_list() for v in grouped[column])))
    return out


def eval_value(results: pl.DataFrame, metric: str, stat: str, lang: str = "all") -> float | None:
    rows = results.filter((pl.col("metric") == metric) & (pl.col("stat") == stat) & (pl.col("lang") == lang))
    return rows["value"][0] if rows.height else None


def eval_fidelity(results: dict[str, pl.DataFrame]) -> dict[str, dict[str, float]]:
    """{eval label: {language or "all": fidelity share}} for the labels with fidelity rows."""
    out = {}
    for label, df in results.items():
        rows = df.filter((pl.col("metric") == "fidelity") & (pl.col("stat") == "share"))
        if rows.height:
            out[label] = dict(rows.select("lang", "value").iter_rows())
    return out


def silhouette_series(results: dict[str, pl.DataFrame], hub_scans: dict[str, dict]) -> dict[str, list[tuple[int, float]]]:
    """{eval label or hub scan name: [(layer, silhouette)]} sorted by layer."""
    series = {}
    for label, df in results.items():
        rows = df.filter((pl.col("metric") == "silhouette") & (pl.col("stat") == "score") & (pl.col("lang") == "all")
                         & pl.col("layer").is_not_null()).sort("layer")
        if rows.height:
            series[label] = list(rows.select("layer", "value").iter_rows())
    for name, scan in hub_scans.items():
        if scan.get("silhouette"):
            series[name] = sorted(scan["silhouette"].items())
    return series


def eval_summary(results: dict[str, pl.DataFrame]) -> tuple[list[str], list[list]]:
    """(header, rows) of the evaluation table: one row per label with the whole-prompt-set numbers."""
    rewards = [c for c in REWARD_COLUMNS if any(eval_value(df, c, "mean") is not None for df in results.values())]
    header = ["label", "fidelity", "rankc", "accuracy", "best silhouette (layer)"] + [f"{c} mean" for c in rewards]
    rows = []
    for label, df in results.items():
        silhouette = df.filter((pl.col("metric") == "silhouette") & (pl.col("stat") == "score")
                               & (pl.col("lang") == "all")).sort("value")
        best = f"{format_value(silhouette['value'][-1])} ({silhouette['layer'][-1]})" if silhouette.height else None
        rows.append([label, eval_value(df, "fidelity", "share"), eval_value(df, "rankc", "score"),
                     eval_value(df, "accuracy", "share"), best] + [eval_value(df, c, "mean") for c in rewards])
    return header, rows


def _read_scores(path: Path, doc: Document) -> pl.DataFrame | None:

    try:
        table = read_dataset(path, "scores")
    except DatasetError as e:
        doc.notes.append(f"`{path}` skipped: {e}")
        return None
    return pl.from_arrow(table.select(["prompt_id", "lang", *REWARD_COLUMNS]))


def _read_evals(run_dir: Path, doc: Document) -> tuple[dict[str, pl.DataFrame], dict[str, pl.DataFrame]]:
    """({label: eval results}, {label: eval scores}) under <run>/eval/, labels in eval order."""

    results, scores = {}, {}
    labels = sorted((p.name for p in (run_dir / "eval").glob("*") if p.is_dir()), key=eval_label_order)
    for label in labels:
        if (run_dir / "eval" / label / "results").is_dir():
            try:
                results[label] = pl.from_arrow(read_dataset(run_dir / "eval" / label / "results", "eval"))
            except DatasetError as e:
                doc.notes.append(f"`eval/{label}/results` skipped: {e}")
        if (run_dir / "eval" / label / "scores").is_dir():
            df = _read_scores(run_dir / "eval" / label / "scores", doc)
            if df is not None:
                scores[label] = df
    return results, scores


def _read_hub_scans(run_dir: Path, doc: Document) -> dict[str, dict]:
    """{"hub scan": launch's scan (hub_layer auto), "hub scan <label>": each `rayalign hub-scan` output}."""
    paths = {"hub scan": run_dir / "hub-scan.json"}
    paths |= {f"hub scan {p.parent.name.removeprefix('hub-scan-')}": p
              for p in sorted(run_dir.glob("hub-scan-*/hub-scan.json"))}
    scans = {}
    for name, path in paths.items():
        if not path.is_file():
            continue
        try:
            scan = json.loads(path.read_text(encoding="utf-8"))
            scan["silhouette"] = {int(k): float(v) for k, v in scan.get("silhouette", {}).items()}
            scans[name] = scan | {"file": str(path.relative_to(run_dir))}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
            doc.notes.append(f"`{path}` skipped: expected a JSON object with silhouette {{layer: score}} ({e})")
    return scans


def _last_scores(run_dir: Path) -> Path | None:
    """iter-<t>/scores of the highest t whose scores dataset is complete (has a manifest)."""
    done = [p.parent for p in run_dir.glob("iter-*/scores/manifest.json") if p.parent.parent.name[5:].isdigit()]
    return max(done, key=lambda p: int(p.parent.name[5:]), default=None)


ONLINE_METRICS = ("reward_mean", "kl", "clip_fraction", "entropy", "value_loss")


def online_steps(steps: dict[int, dict], doc: Document) -> None:
    """An online run's steps: a table (the step metrics and the mean reward per language) and their curves."""
    order = sorted(steps)
    columns = [c for c in ONLINE_METRICS if any(steps[s].get(c) is not None for s in order)]
    langs = sorted({k for s in order for k in steps[s] if k.startswith("reward_") and k != "reward_mean"})
    doc.lines += ["## Online steps", ""] + markdown_table(
        ["step", *columns, *langs], [[s, *(steps[s].get(c) for c in columns + langs)] for s in order])
    points = {c: [(s, steps[s][c]) for s in order if steps[s].get(c) is not None] for c in columns}
    doc.figure(plot_small_multiples(points, "step"), "online_by_step.png", "Online RL by step",
               "Per step: the rollouts' mean reward, the KL to the reference, the share of clipped ratios, the "
               "policy's entropy" + (" and the critic's value loss." if "value_loss" in columns else "."))


def run_report(run_dir: Path, doc: Document) -> None:
    metrics = read_metrics(run_dir, lambda path, number: doc.notes.append(
        f"`{path}` line {number} skipped: expected a JSON object of metrics (numbers where numbers belong)"))
    iterations = iteration_frame(metrics)
    scores_dir = _last_scores(run_dir)
    scores = _read_scores(scores_dir, doc) if scores_dir else None
    eval_results, eval_scores = _read_evals(run_dir, doc)
    hub_scans = _read_hub_scans(run_dir, doc)

    steps = {m["step"]: m for m in metrics if m.get("stage") == "online" and "step" in m}  # a relaunch's last wins
    read = [f"{iterations.height} iteration(s) in metrics.jsonl" if iterations is not None
            else f"{len(steps)} online step(s) in metrics.jsonl" if steps else "no iteration records in metrics.jsonl"]
    if scores is not None:
        read.append(f"the scores of {scores_dir.parent.name} ({scores.height} samples)")
    if eval_results or eval_scores:
        read.append(f"evaluations {', '.join(sorted(set(eval_results) | set(eval_scores), key=eval_label_order))}")
    if hub_scans:
        read.append(", ".join(scan["file"] for scan in hub_scans.values()))
    doc.lines += [f"# Run report: {run_dir.resolve().name}", "", f"Read from `{run_dir}`: {'; '.join(read)}.", ""]

    if iterations is not None:
        columns = [c for c in ("pairs_rows", *TRAINING_METRICS, "fidelity_mean") if present(iterations, c)]
        seconds = [c for c in iterations.columns if c.startswith("seconds_")]  # generate + score + pairs + train
        rows = [[r["iteration"], *(r[c] for c in columns)] + ([sum(r[c] or 0 for c in seconds)] if seconds else [])
                for r in iterations.iter_rows(named=True)]
        header = ["iteration", *columns] + (["seconds"] if seconds else [])
        doc.lines += ["## Iterations", ""] + markdown_table(header, rows)
        langs = fidelity_languages(iterations)
        if langs:
            rows = [[r["iteration"], *(r[f"fidelity_{lang}"] for lang in langs), r["fidelity_mean"]]
                    for r in iterations.iter_rows(named=True)]
            doc.lines += ["Share of generated samples in the prompt's language:", ""]
            doc.lines += markdown_table(["iteration", *langs, "mean"], rows)
    if steps:
        online_steps(steps, doc)
    if eval_results:
        header, rows = eval_summary(eval_results)
        doc.lines += ["## Evaluation", "", "Whole-prompt-set numbers per evaluated policy:", ""]
        doc.lines += markdown_table(header, rows)

    series = [(f"{scores_dir.parent.name} samples", reward_values(scores))] if scores is not None else []
    series += [(f"eval {label}", reward_values(df)) for label, df in eval_scores.items()]
    series = [(name, values) for name, values in series if values]
    if series:
        doc.figure(plot_rewards(series), "rewards_by_language.png", "Rewards by language",
                   "Distribution of each computed reward per language (box: quartiles, whiskers: 1.5 IQR) in: "
                   + ", ".join(name for name, _ in series) + ".")
    else:
        doc.skip("rewards_by_language.png", "no iter-*/scores or eval/*/scores dataset with reward values")

    fidelity = fidelity_series(iterations) if iterations is not None else {}
    fidelity_eval = eval_fidelity(eval_results)
    if fidelity or fidelity_eval:
        doc.figure(plot_fidelity(fidelity, fidelity_eval), "fidelity_by_iteration.png", "Language fidelity",
                   "Share of responses in the prompt's language, per language and averaged (thick line): "
                   + ("of the samples generated in each iteration" if fidelity else "")
                   + (" and " if fidelity and fidelity_eval else "")
                   + ("of each evaluated policy" if fidelity_eval else "") + ".")
    else:
        doc.skip("fidelity_by_iteration.png",
                 "no fidelity_<lang> in metrics.jsonl and no fidelity rows in eval/*/results")

    silhouette = silhouette_series(eval_results, hub_scans)
    if silhouette:
        hub_layer = hub_scans.get("hub scan", {}).get("hub_layer")
        doc.figure(plot_silhouette(silhouette, hub_layer), "silhouette_by_layer.png", "Silhouette by layer",
                   "Silhouette of the pooled hidden states clustered by prompt (one prompt in every language), per "
                   "layer: higher means the layer groups by meaning rather than by language"
                   + ("." if hub_layer is None else f"; the dotted red line marks the chosen hub layer {hub_layer}."))
    else:
        doc.skip("silhouette_by_layer.png", "no silhouette rows in eval/*/results and no hub-scan.json")

    training = [c for c in TRAINING_METRICS if present(iterations, c)]
    if training:
        points = {c: [(t, v) for t, v in iterations.select("iteration", c).iter_rows() if v is not None]
                  for c in training}
        doc.figure(plot_small_multiples(points, "iteration"), "training_by_iteration.png", "Training by iteration",
                   "Mean training loss, pair accuracy and reward margin of each iteration's training stage.")
    else:
        doc.skip("training_by_iteration.png", "no training metrics (loss_mean, accuracy_mean, reward_margin_mean) "
                 "in metrics.jsonl")
