"""Summaries of datasets and runs with polars, for `rayalign inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from rayalign.data.store import read_dataset, read_manifest


def samples_summary(table) -> pl.DataFrame:
    """Per language: rows, prompts, mean response length (chars, tokens), share that ended with the
    end-of-turn token (stopped), and share whose detected language is the prompt's (lang_match)."""
    df = pl.from_arrow(table)
    return (
        df.group_by("lang", maintain_order=True)
        .agg(
            pl.len().alias("rows"),
            pl.col("prompt_id").n_unique().alias("prompts"),
            pl.col("response").str.len_chars().mean().round(1).alias("chars"),
            pl.col("num_tokens").mean().round(1).alias("tokens"),
            (pl.col("finish_reason") == "stop").mean().round(3).alias("stopped"),
            (pl.col("lang_detected") == pl.col("lang")).mean().round(3).alias("lang_match"),
        )
    )


def dataset_summary(path: Path) -> tuple[dict, pl.DataFrame | None]:
    manifest = read_manifest(path)
    table = read_dataset(path)
    if manifest["schema"] == "samples":
        return manifest, samples_summary(table)
    df = pl.from_arrow(table)
    return manifest, df.group_by("lang", maintain_order=True).agg(pl.len().alias("rows"))


def find_datasets(path: Path) -> list[Path]:
    """Dataset directories under `path` (itself, or a run directory's iter-*/<dataset>)."""
    if (path / "manifest.json").is_file():
        return [path]
    return sorted(p.parent for p in path.glob("iter-*/*/manifest.json"))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
