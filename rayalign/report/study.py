"""The report of a study: final results per run, scaling curves over numeric axes, fidelity by run."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from rayalign.report.document import (MAX_BAR_RUNS, STUDY_METRICS, Document, ReportError, format_value,
                                      markdown_table, present, with_fidelity_mean)
from rayalign.report.plots import plot_fidelity_by_run, plot_scaling


def final_rows(results: pl.DataFrame) -> pl.DataFrame:
    """Each run's row at its last iteration, with fidelity_mean added when absent."""
    if "iteration" in results.columns:
        results = results.filter(pl.col("iteration") == pl.col("iteration").max().over("run"))
    return with_fidelity_mean(results.unique("run", keep="last", maintain_order=True))


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
    sorted by x; runs without a value, and runs that did not finish (their last iteration is not a final one), are
    left out. With no other axes the one label is "all runs"."""
    final = final_rows(results)
    if "status" in final.columns:
        final = final.filter(pl.col("status") == "finished")
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
    return [c for c in (*STUDY_METRICS, *evals) if present(final, c) and final[c].dtype.is_numeric()]


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


def read_study(study_dir: Path) -> dict:
    path = study_dir / "study.json"
    try:
        study = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # malformed JSON, not UTF-8, or an integer of too many digits
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(study, dict) or not isinstance(study.get("runs"), list):
        raise ReportError(f"{path}: expected an object with a 'runs' list")
    for i, run in enumerate(study["runs"]):
        if not isinstance(run, dict) or not isinstance(run.get("run"), str):
            raise ReportError(f"{path}: runs[{i}] should be an object with a 'run' slug (a string)")
        for key, kind, what in (("status", str, "a string"), ("run_dir", str, "a path"), ("params", dict, "an object"),
                                ("error", str, "a string")):
            if run.get(key) is not None and not isinstance(run[key], kind):
                raise ReportError(f"{path}: runs[{i}] ({run['run']}): {key}: expected {what}, got {run[key]!r}")
    study.setdefault("axes", [])
    if not isinstance(study["axes"], list) or not all(isinstance(a, str) for a in study["axes"]):
        raise ReportError(f"{path}: axes: expected a list of recipe keys, got {study['axes']!r}")
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
    training = [m for m in (*STUDY_METRICS, "pairs_rows") if final is not None and present(final, m)]
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
