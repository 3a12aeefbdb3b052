"""`rayalign report`: PNG plots and a Markdown summary (report.md) of a run or a study directory.

The numbers behind each plot come from small pure functions over polars frames; the `plot_*` functions only draw
them. matplotlib is imported when a plot is drawn, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from rayalign.data.inspect import read_metrics

REWARD_COLUMNS = ("r_lacomsa", "r_msa", "r_icr", "r_rm", "r_user")
TRAINING_METRICS = ("loss_mean", "accuracy_mean", "reward_margin_mean")
STUDY_METRICS = ("fidelity_mean", "accuracy_mean", "reward_margin_mean", "loss_mean")
TITLES = {"loss_mean": "training loss, mean", "accuracy_mean": "pair accuracy, mean",
          "reward_margin_mean": "reward margin, mean", "fidelity_mean": "language fidelity, mean"}
DPI = 120
MAX_BAR_RUNS = 12  # fidelity_by_run.png: more runs are drawn as a heatmap


class ReportError(ValueError):
    """A path that is neither a run nor a study directory, or a study file that cannot be read; names the file."""


@dataclass
class Document:
    """report.md under construction: body lines, figures, and notes for what was skipped."""

    out: Path
    lines: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def figure(self, fig, name: str, caption: str, sentence: str) -> None:
        fig.savefig(self.out / name, dpi=DPI)
        self.figures += [f"![{caption}]({name})", "", sentence, ""]

    def skip(self, name: str, why: str) -> None:
        (self.out / name).unlink(missing_ok=True)  # a plot from an earlier report would no longer match
        self.notes.append(f"`{name}` not drawn: {why}.")

    def markdown(self) -> str:
        parts = self.lines + (["## Figures", ""] + self.figures if self.figures else [])
        if self.notes:
            parts += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(parts).rstrip() + "\n"


def report(path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write plots and report.md for a run or study directory into `out_dir` (default: <path>/report/);
    returns the path of report.md."""
    path = Path(path)
    out = Path(out_dir) if out_dir is not None else path / "report"
    if (path / "study.json").is_file():
        build = study_report
    elif (path / "metrics.jsonl").is_file() or (path / "state.json").is_file():
        build = run_report
    else:
        raise ReportError(f"{path}: not a run directory (no metrics.jsonl or state.json) nor a study directory "
                          "(no study.json)")
    out.mkdir(parents=True, exist_ok=True)
    doc = Document(out)
    build(path, doc)
    md = out / "report.md"
    md.write_text(doc.markdown(), encoding="utf-8")
    return md


# ---- formatting ----

def format_value(value) -> str:
    """A table cell or legend entry: floats to 4 significant digits, lists joined with '+', missing as '–'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines; numeric columns are right-aligned."""
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) for i in range(len(header))]
    cell = lambda v: format_value(v).replace("|", "\\|")  # noqa: E731
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
            + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows] + [""])


def _present(df: pl.DataFrame | None, column: str) -> bool:
    return df is not None and column in df.columns and df[column].null_count() < df.height


def _with_fidelity_mean(df: pl.DataFrame) -> pl.DataFrame:
    """Add fidelity_mean (mean over the fidelity_<lang> columns of a row) when the frame lacks it."""
    langs = fidelity_languages(df)
    if "fidelity_mean" in df.columns or not langs:
        return df
    return df.with_columns(pl.mean_horizontal(*(pl.col(f"fidelity_{lang}").cast(pl.Float64) for lang in langs))
                           .alias("fidelity_mean"))


def fidelity_languages(df: pl.DataFrame) -> list[str]:
    """Language codes of the fidelity_<lang> columns (fidelity_mean excluded)."""
    return [c.removeprefix("fidelity_") for c in df.columns if c.startswith("fidelity_") and c != "fidelity_mean"]


def eval_label_order(label: str) -> tuple:
    """initial, iter-1, iter-2, ..., final, then any other label alphabetically."""
    if label == "initial":
        return (0, 0, "")
    if label.startswith("iter-") and label[5:].isdigit():
        return (1, int(label[5:]), "")
    return (2, 0, "") if label == "final" else (3, 0, label)


# ---- run: data ----

def iteration_frame(metrics: list[dict]) -> pl.DataFrame | None:
    """One row per iteration from metrics.jsonl's `iteration` records (the last record wins when a stage was
    redone), with fidelity_mean added; None when there is none."""
    from rayalign.data.inspect import iteration_table

    table = iteration_table(metrics)
    if table is None:
        return None
    table = table.filter(pl.col("iteration").is_not_null()).with_columns(pl.col(pl.Null).cast(pl.Float64))
    return _with_fidelity_mean(table.unique("iteration", keep="last", maintain_order=True).sort("iteration"))


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
    for column in (c for c in REWARD_COLUMNS if _present(scores, c)):
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


def silhouette_series(results: dict[str, pl.DataFrame], hub_scan: dict | None) -> dict[str, list[tuple[int, float]]]:
    """{eval label or "hub scan": [(layer, silhouette)]} sorted by layer."""
    series = {}
    for label, df in results.items():
        rows = df.filter((pl.col("metric") == "silhouette") & (pl.col("stat") == "score") & (pl.col("lang") == "all")
                         & pl.col("layer").is_not_null()).sort("layer")
        if rows.height:
            series[label] = list(rows.select("layer", "value").iter_rows())
    if hub_scan and hub_scan.get("silhouette"):
        series["hub scan"] = sorted(hub_scan["silhouette"].items())
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


# ---- run: reading ----

def _read_scores(path: Path, doc: Document) -> pl.DataFrame | None:
    from rayalign.data.store import DatasetError, read_dataset

    try:
        table = read_dataset(path, "scores")
    except DatasetError as e:
        doc.notes.append(f"`{path}` skipped: {e}")
        return None
    return pl.from_arrow(table.select(["prompt_id", "lang", *REWARD_COLUMNS]))


def _read_evals(run_dir: Path, doc: Document) -> tuple[dict[str, pl.DataFrame], dict[str, pl.DataFrame]]:
    """({label: eval results}, {label: eval scores}) under <run>/eval/, labels in eval order."""
    from rayalign.data.store import DatasetError, read_dataset

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


def _read_hub_scan(run_dir: Path, doc: Document) -> dict | None:
    path = run_dir / "hub-scan.json"
    if not path.is_file():
        return None
    try:
        scan = json.loads(path.read_text(encoding="utf-8"))
        scan["silhouette"] = {int(k): float(v) for k, v in scan.get("silhouette", {}).items()}
        return scan
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
        doc.notes.append(f"`{path}` skipped: expected a JSON object with silhouette {{layer: score}} ({e})")
        return None


def _last_scores(run_dir: Path) -> Path | None:
    """iter-<t>/scores of the highest t whose scores dataset is complete (has a manifest)."""
    done = [p.parent for p in run_dir.glob("iter-*/scores/manifest.json") if p.parent.parent.name[5:].isdigit()]
    return max(done, key=lambda p: int(p.parent.name[5:]), default=None)


def run_report(run_dir: Path, doc: Document) -> None:
    metrics = read_metrics(run_dir, lambda path, number: doc.notes.append(
        f"`{path}` line {number} skipped: expected a JSON object"))
    iterations = iteration_frame(metrics)
    scores_dir = _last_scores(run_dir)
    scores = _read_scores(scores_dir, doc) if scores_dir else None
    eval_results, eval_scores = _read_evals(run_dir, doc)
    hub_scan = _read_hub_scan(run_dir, doc)

    read = [f"{iterations.height} iteration(s) in metrics.jsonl" if iterations is not None
            else "no iteration records in metrics.jsonl"]
    if scores is not None:
        read.append(f"the scores of {scores_dir.parent.name} ({scores.height} samples)")
    if eval_results or eval_scores:
        read.append(f"evaluations {', '.join(sorted(set(eval_results) | set(eval_scores), key=eval_label_order))}")
    if hub_scan:
        read.append("hub-scan.json")
    doc.lines += [f"# Run report: {run_dir.resolve().name}", "", f"Read from `{run_dir}`: {'; '.join(read)}.", ""]

    if iterations is not None:
        columns = [c for c in ("pairs_rows", *TRAINING_METRICS, "fidelity_mean") if _present(iterations, c)]
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

    silhouette = silhouette_series(eval_results, hub_scan)
    if silhouette:
        hub_layer = (hub_scan or {}).get("hub_layer")
        doc.figure(plot_silhouette(silhouette, hub_layer), "silhouette_by_layer.png", "Silhouette by layer",
                   "Silhouette of the pooled hidden states clustered by prompt (one prompt in every language), per "
                   "layer: higher means the layer groups by meaning rather than by language"
                   + ("." if hub_layer is None else f"; the dotted red line marks the chosen hub layer {hub_layer}."))
    else:
        doc.skip("silhouette_by_layer.png", "no silhouette rows in eval/*/results and no hub-scan.json")

    training = [c for c in TRAINING_METRICS if _present(iterations, c)]
    if training:
        points = {c: [(t, v) for t, v in iterations.select("iteration", c).iter_rows() if v is not None]
                  for c in training}
        doc.figure(plot_small_multiples(points, "iteration"), "training_by_iteration.png", "Training by iteration",
                   "Mean training loss, pair accuracy and reward margin of each iteration's training stage.")
    else:
        doc.skip("training_by_iteration.png", "no training metrics (loss_mean, accuracy_mean, reward_margin_mean) "
                 "in metrics.jsonl")


# ---- study: data ----

def final_rows(results: pl.DataFrame) -> pl.DataFrame:
    """Each run's row at its last iteration, with fidelity_mean added when absent."""
    if "iteration" in results.columns:
        results = results.filter(pl.col("iteration") == pl.col("iteration").max().over("run"))
    return _with_fidelity_mean(results.unique("run", keep="last", maintain_order=True))


def axis_number(value) -> float | None:
    """An axis value as a number on the x axis: numbers as they are, lists by their length, others None."""
    if isinstance(value, (list, tuple, pl.Series)):
        return len(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


def numeric_axes(final: pl.DataFrame, axes: list[str]) -> list[str]:
    """The axes whose values are all numbers (or lists) with at least two distinct values."""
    out = []
    for axis in (a for a in axes if a in final.columns):
        values = [v for v in final[axis].to_list() if v is not None]
        numbers = {axis_number(v) for v in values}
        if values and None not in numbers and len(numbers) >= 2:
            out.append(axis)
    return out


def scaling_series(results: pl.DataFrame, axis: str, metric: str,
                   other_axes: Sequence[str] = ()) -> dict[str, list[tuple[float, float]]]:
    """{combination of the other axes' values: [(axis value, metric at the run's final iteration)]}, points
    sorted by x; runs without a value are left out. With no other axes the one label is "all runs"."""
    final = final_rows(results)
    if metric not in final.columns:
        return {}
    series = {}
    for row in final.iter_rows(named=True):
        x, y = axis_number(row.get(axis)), row[metric]
        if x is None or y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        label = ", ".join(format_value(row.get(a)) for a in other_axes) or "all runs"
        series.setdefault(label, []).append((x, y))
    return {label: sorted(points) for label, points in series.items()}


def study_metrics(final: pl.DataFrame) -> list[str]:
    """Key metrics present at the final iterations: the training ones, then the eval_* means and maxima."""
    evals = [c for c in final.columns if c.startswith("eval_") and c.endswith(("_mean", "_max", "_win_rate"))]
    return [c for c in (*STUDY_METRICS, *evals) if _present(final, c) and final[c].dtype.is_numeric()]


def fidelity_by_run(final: pl.DataFrame, prefix: str = "fidelity_") -> dict[str, dict[str, float]]:
    """{run: {language: fidelity share}} from the `<prefix><lang>` columns of the final-iteration rows (prefix
    eval_fidelity_: of the evaluated final policies), null values left out."""
    langs = [c.removeprefix(prefix) for c in final.columns if c.startswith(prefix) and c != f"{prefix}mean"]
    out = {}
    for row in final.iter_rows(named=True):
        shares = {lang: row[f"{prefix}{lang}"] for lang in langs if row[f"{prefix}{lang}"] is not None}
        if shares:
            out[row["run"]] = shares
    return out


# ---- study: reading ----

def read_study(study_dir: Path) -> dict:
    path = study_dir / "study.json"
    try:
        study = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(study, dict) or not isinstance(study.get("runs"), list):
        raise ReportError(f"{path}: expected an object with a 'runs' list")
    for i, run in enumerate(study["runs"]):
        if not isinstance(run, dict) or "run" not in run:
            raise ReportError(f"{path}: runs[{i}] should be an object with a 'run' slug")
    study.setdefault("axes", [])
    return study


def _run_link(study_dir: Path, out: Path, run_dir: str | None) -> str | None:
    """run_dir (as study.json or results.parquet gives it: relative to the study or the working directory)
    as a path relative to the report."""
    if not run_dir:
        return None
    target = next((p for p in (study_dir / run_dir, Path(run_dir)) if p.is_dir()), study_dir / run_dir)
    return Path(os.path.relpath(target.resolve(), out.resolve())).as_posix()


def study_report(study_dir: Path, doc: Document) -> None:
    study = read_study(study_dir)
    axes, runs = list(study["axes"]), study["runs"]
    results_path = study_dir / "results.parquet"
    results = None
    if results_path.is_file():
        try:
            results = pl.read_parquet(results_path)
        except (pl.exceptions.PolarsError, OSError) as e:
            raise ReportError(f"{results_path}: unreadable Parquet ({e})") from None
        if "run" not in results.columns:
            raise ReportError(f"{results_path}: missing column 'run'")
    else:
        doc.notes.append("no results.parquet: the table lists the runs only and no plot is drawn")
    final = final_rows(results) if results is not None and results.height else None
    by_run = {r["run"]: r for r in final.iter_rows(named=True)} if final is not None else {}

    status = {}
    for run in runs:
        status[run.get("status", "unknown")] = status.get(run.get("status", "unknown"), 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in status.items())
    doc.lines += [f"# Study report: {study.get('name') or study_dir.resolve().name}", "",
                  f"Read from `{study_dir}`: study.json ({len(runs)} run{'s' * (len(runs) != 1)}: {counts}; axes: "
                  f"{', '.join(axes) or 'none'})" + (f" and results.parquet ({results.height} rows)."
                                                     if results is not None else "."), ""]

    metrics = study_metrics(final) if final is not None else []
    training = [m for m in (*STUDY_METRICS, "pairs_rows") if final is not None and _present(final, m)]
    evals = [m for m in metrics if m.startswith("eval_")]
    rows, eval_rows = [], []
    for run in runs:
        row = by_run.get(run["run"], {})
        link = _run_link(study_dir, doc.out, run.get("run_dir") or row.get("run_dir"))
        name = f"[{run['run']}]({link})" if link else run["run"]
        params = run.get("params") or {}
        values = [params.get(a, row.get(a)) for a in axes]
        rows.append([name, run.get("status"), *values, row.get("iteration"), *(row.get(m) for m in training)])
        if evals and row:
            eval_rows.append([run["run"], *values, *(row.get(m) for m in evals)])
        if run.get("error"):
            doc.notes.append(f"run `{run['run']}` {run.get('status', '')}: {run['error']}")
    doc.lines += ["## Runs at their final iteration", ""]
    doc.lines += markdown_table(["run", "status", *axes, "iteration", *training], rows)
    if eval_rows:
        doc.lines += ["## Evaluation of the final policies", ""] + markdown_table(["run", *axes, *evals], eval_rows)

    if final is None:
        if results is not None:
            doc.notes.append("results.parquet has no rows: no plot is drawn")
        return
    scaled = numeric_axes(final, axes)
    for axis in scaled:
        others = [a for a in axes if a != axis and a in final.columns]
        panels = {m: scaling_series(results, axis, m, others) for m in metrics}
        panels = {m: s for m, s in panels.items() if s}
        name = f"scaling_{axis.replace('/', '_').replace(' ', '_')}.png"
        if not panels:
            doc.skip(name, f"no metric values for the runs along {axis}")
            continue
        xlabel = f"number of {axis}" if any(isinstance(v, list) for v in final[axis].to_list()) else axis
        doc.figure(plot_scaling(panels, xlabel, ", ".join(others)), name, f"Scaling with {axis}",
                   f"Each metric at a run's final iteration against {xlabel}"
                   + (f", one line per {', '.join(others)}." if others else "."))
    if not scaled:
        doc.notes.append("no scaling plot: no axis has two or more numeric (or list) values")
    shares, source = fidelity_by_run(final, "eval_fidelity_"), "each run's evaluated final policy (rayalign eval)"
    if not shares:
        shares, source = fidelity_by_run(final), "each run's final-iteration samples"
    if shares:
        doc.figure(plot_fidelity_by_run(shares), "fidelity_by_run.png", "Fidelity by run",
                   f"Share of the responses of {source} in the prompt's language, per language"
                   + (" (a heatmap: too many runs for bars)." if len(shares) > MAX_BAR_RUNS else "."))
    else:
        doc.skip("fidelity_by_run.png", "no fidelity_<lang> values in results.parquet")


# ---- plots ----

def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), layout="constrained")


def _colors(names) -> dict:
    from matplotlib import colormaps

    names = list(dict.fromkeys(names))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _grid(fig, panels: int, columns: int = 3):
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return axes[:panels]


def _integer_ticks(ax) -> None:
    """x ticks at the iterations or layers drawn (call after plotting); one point gets some room either side."""
    from matplotlib.ticker import MaxNLocator

    xs = sorted({int(x) for line in ax.get_lines() for x in line.get_xdata()})
    if len(xs) > 12:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    elif xs:
        ax.set_xticks(xs)
        if len(xs) == 1:
            ax.set_xlim(xs[0] - 1, xs[0] + 1)


def _plain_y(ax) -> None:
    """Tick labels as plain numbers: no '1e-5+6.819e-1' offset over the panel title."""
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def plot_rewards(series: list[tuple[str, dict[str, dict[str, list[float]]]]]):
    """Box plots per language, one panel per reward column, one box colour per series (samples or eval label)."""
    from matplotlib.patches import Patch

    columns = list(dict.fromkeys(c for _, values in series for c in values))
    langs = list(dict.fromkeys(lang for _, values in series for by_lang in values.values() for lang in by_lang))
    colors = _colors(name for name, _ in series)
    width = 0.8 / len(series)
    panel_width = min(9.0, max(3.5, 0.45 * len(langs) * len(series) + 1.5))
    ncols = min(3, len(columns))
    fig = _figure(panel_width * ncols, 3.6 * math.ceil(len(columns) / ncols) + 0.4)
    for ax, column in zip(_grid(fig, len(columns)), columns):
        for j, (name, values) in enumerate(series):
            by_lang = values.get(column, {})
            positions = [i - 0.4 + width * (j + 0.5) for i, lang in enumerate(langs) if lang in by_lang]
            if not positions:
                continue
            ax.boxplot([by_lang[lang] for lang in langs if lang in by_lang], positions=positions, widths=width * 0.85,
                       patch_artist=True, boxprops={"facecolor": colors[name], "alpha": 0.75},
                       medianprops={"color": "black"}, flierprops={"markersize": 2, "alpha": 0.4})
        ax.set_xticks(range(len(langs)), langs)
        ax.set_xlim(-0.6, len(langs) - 0.4)
        ax.set_title(column)
        ax.set_xlabel("language")
        ax.set_ylabel("reward")
        ax.grid(axis="y", alpha=0.3)
    fig.legend([Patch(facecolor=colors[name], alpha=0.75) for name, _ in series], [name for name, _ in series],
               loc="outside lower center", ncols=min(4, len(series)), frameon=False)
    return fig


def plot_fidelity(by_iteration: dict[str, list[tuple[int, float]]], by_eval: dict[str, dict[str, float]]):
    """Left: fidelity per iteration (one line per language, the mean thick); right: fidelity per eval label."""
    langs = [k for k in by_iteration if k != "mean"] + [k for v in by_eval.values() for k in v if k != "all"]
    colors = _colors(sorted(set(langs)))
    panels = [p for p in ("iterations", "eval") if (by_iteration if p == "iterations" else by_eval)]
    fig = _figure(5.2 * len(panels) + 1.0, 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    handles = {}
    for ax, panel in zip(axes, panels):
        if panel == "iterations":
            lines = {k: v for k, v in by_iteration.items() if k != "mean"}
            mean = by_iteration.get("mean")
            ax.set_xlabel("iteration")
            ax.set_title("samples generated in each iteration")
        else:
            labels = list(by_eval)
            lines = {lang: [(i, by_eval[label][lang]) for i, label in enumerate(labels) if lang in by_eval[label]]
                     for lang in sorted({k for v in by_eval.values() for k in v if k != "all"})}
            mean = [(i, by_eval[label]["all"]) for i, label in enumerate(labels) if "all" in by_eval[label]]
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.3, len(labels) - 0.7)
            ax.set_xlabel("evaluated policy")
            ax.set_title("evaluation")
        for lang, points in lines.items():
            handles[lang], = ax.plot(*zip(*points), marker="o", markersize=4, linewidth=1.3, color=colors[lang])
        if mean:
            handles["mean"], = ax.plot(*zip(*mean), marker="o", linewidth=3.2, color="black")
        if panel == "iterations":
            _integer_ticks(ax)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share in the prompt's language")
    order = sorted(k for k in handles if k != "mean") + (["mean"] if "mean" in handles else [])
    fig.legend([handles[k] for k in order], order, loc="outside right upper", title="language")
    return fig


def plot_silhouette(series: dict[str, list[tuple[int, float]]], hub_layer: int | None):
    colors = _colors(series)
    fig = _figure(7.0, 4.2)
    ax = fig.subplots()
    for label, points in series.items():
        style = {"linestyle": "--", "color": "dimgray"} if label == "hub scan" else {"color": colors[label]}
        ax.plot(*zip(*points), marker="o", markersize=4, linewidth=1.6, label=label, **style)
    if hub_layer is not None:
        ax.axvline(hub_layer, color="firebrick", linestyle=":", linewidth=1.5, label=f"hub layer {hub_layer}")
    ax.set_xlabel("layer (hidden_states index)")
    ax.set_ylabel("silhouette score")
    ax.set_title("silhouette of pooled states by layer")
    _integer_ticks(ax)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper")
    return fig


def plot_small_multiples(panels: dict[str, list[tuple[float, float]]], xlabel: str):
    """One panel per metric: y against x with markers."""
    fig = _figure(min(max(5.0, 4.0 * len(panels)), 12.0), 3.4)
    for ax, (metric, points) in zip(_grid(fig, len(panels)), panels.items()):
        ax.plot(*zip(*points), marker="o", linewidth=1.6)
        ax.set_title(TITLES.get(metric, metric))
        ax.set_xlabel(xlabel)
        _integer_ticks(ax)
        _plain_y(ax)
        ax.grid(alpha=0.3)
    return fig


def plot_scaling(panels: dict[str, dict[str, list[tuple[float, float]]]], xlabel: str, legend_title: str):
    """One panel per metric; one line per combination of the other axes."""
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    colors = _colors(labels)
    # a marker per line, so lines with equal values stay visible; past 20 lines (tab20) the colours repeat but
    # never with the same marker
    markers = {label: "osD^vP*Xph"[(i + i // 20) % 10] for i, label in enumerate(labels)}
    ncols = math.ceil(len(panels) / math.ceil(len(panels) / 4))
    fig = _figure(3.4 * ncols + 1.6, 2.9 * math.ceil(len(panels) / ncols) + 0.3)
    handles = {}
    for ax, (metric, series) in zip(_grid(fig, len(panels), ncols), panels.items()):
        for label, points in series.items():
            handles[label], = ax.plot(*zip(*points), marker=markers[label], markersize=6, markerfacecolor="none",
                                      linewidth=1.6, color=colors[label])
        xs = sorted({x for points in series.values() for x, _ in points})
        if len(xs) > 2 and xs[0] > 0 and xs[-1] / xs[0] >= 20:  # e.g. 16, 64, 256, 1024 prompts
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xs, [format_value(x) for x in xs])
        ax.set_title(TITLES.get(metric, metric))
        ax.set_xlabel(xlabel)
        _plain_y(ax)
        ax.grid(alpha=0.3)
    fig.legend([handles[k] for k in labels], labels, loc="outside right upper", title=legend_title or None)
    return fig


def plot_fidelity_by_run(shares: dict[str, dict[str, float]]):
    """Grouped bars (one group per run, one bar per language); a run x language heatmap past MAX_BAR_RUNS runs,
    where bars would be too thin to read."""
    langs = sorted({lang for v in shares.values() for lang in v})
    runs = list(shares)
    if len(runs) > MAX_BAR_RUNS:
        return _fidelity_heatmap(shares, runs, langs)
    colors = _colors(langs)
    width = 0.8 / len(langs)
    fig = _figure(min(16.0, max(6.0, 0.35 * len(runs) * len(langs) + 2.5)), 4.4)
    ax = fig.subplots()
    for j, lang in enumerate(langs):
        xs = [i - 0.4 + width * (j + 0.5) for i, run in enumerate(runs) if lang in shares[run]]
        ax.bar(xs, [shares[run][lang] for run in runs if lang in shares[run]], width=width, color=colors[lang],
               label=lang)
    rotate = len(runs) > 3
    ax.set_xticks(range(len(runs)), runs, rotation=25 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel("share in the prompt's language")
    ax.set_ylim(0, 1.05)
    ax.set_title("language fidelity at the final iteration")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", title="language")
    return fig


def _fidelity_heatmap(shares: dict[str, dict[str, float]], runs: list[str], langs: list[str]):
    import numpy as np

    matrix = np.array([[shares[run].get(lang, np.nan) for lang in langs] for run in runs])  # (runs, langs)
    fig = _figure(min(14.0, 0.7 * len(langs) + 0.08 * max(map(len, runs)) + 2.5), 0.24 * len(runs) + 1.4)
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 else "white")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_yticks(range(len(runs)), runs, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title("language fidelity at the final iteration")
    fig.colorbar(image, ax=ax, label="share in the prompt's language", shrink=min(1.0, 12 / len(runs) + 0.3))
    return fig
