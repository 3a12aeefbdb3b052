"""report.md under construction, and what every part of a report shares: metric names, formatting, tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from rayalign.methods import REWARD_COLUMN


REWARD_COLUMNS = tuple(REWARD_COLUMN.values())
TRAINING_METRICS = ("loss_mean", "accuracy_mean", "reward_margin_mean")
STUDY_METRICS = ("fidelity_mean", "accuracy_mean", "reward_margin_mean", "loss_mean")
TITLES = {"loss_mean": "training loss, mean", "accuracy_mean": "pair accuracy, mean",
          "reward_margin_mean": "reward margin, mean", "fidelity_mean": "language fidelity, mean",
          "reward_mean": "reward, mean", "kl": "KL to the reference", "clip_fraction": "clipped share",
          "entropy": "entropy", "value_loss": "value loss"}
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


# ---- formatting ----

def format_value(value) -> str:
    """A table cell or legend entry: floats to 4 significant digits, lists joined with '+', missing as '–'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        value += 0.0  # -0.0 prints as 0
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


def present(df: pl.DataFrame | None, column: str) -> bool:
    return df is not None and column in df.columns and df[column].null_count() < df.height


def with_fidelity_mean(df: pl.DataFrame) -> pl.DataFrame:
    """Add fidelity_mean (mean over the fidelity_<lang> columns of a row) when the frame lacks it."""
    langs = fidelity_languages(df)
    if "fidelity_mean" in df.columns or not langs:
        return df
    return df.with_columns(pl.mean_horizontal(*(pl.col(f"fidelity_{lang}").cast(pl.Float64) for lang in langs))
                           .alias("fidelity_mean"))


def fidelity_languages(df: pl.DataFrame) -> list[str]:
    """Language codes of the fidelity_<lang> columns (fidelity_mean excluded)."""
    return [c.removeprefix("fidelity_") for c in df.columns if c.startswith("fidelity_") and c != "fidelity_mean"]
