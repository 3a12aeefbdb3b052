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


def scores_summary(df: pl.DataFrame) -> pl.DataFrame:
    """Per language: rows and the mean of every reward column that was computed."""
    rewards = [c for c in ("r_msa", "phi", "w", "r_lacomsa", "r_icr", "r_rm", "r_user") if df[c].null_count() < df.height]
    return df.group_by("lang", maintain_order=True).agg(
        pl.len().alias("rows"), pl.col("logp_policy").mean().round(2), *(pl.col(c).mean().round(4) for c in rewards))


def pairs_summary(df: pl.DataFrame) -> pl.DataFrame:
    """Per language: pairs and the mean reward margin between chosen and rejected."""
    return df.group_by("lang", maintain_order=True).agg(
        pl.len().alias("pairs"), (pl.col("score_chosen") - pl.col("score_rejected")).mean().round(4).alias("margin"),
        pl.col("method").first())


def dataset_summary(path: Path) -> tuple[dict, pl.DataFrame | None]:
    manifest = read_manifest(path)
    table = read_dataset(path)
    schema = manifest["schema"]
    if schema == "samples":
        return manifest, samples_summary(table)
    if schema == "rollouts":  # samples with the step's reward and advantage
        rewards = pl.from_arrow(table.select(["lang", "reward"])).group_by("lang", maintain_order=True).agg(
            pl.col("reward").mean().round(4).alias("reward"))
        return manifest, samples_summary(table).join(rewards, on="lang", how="left", maintain_order="left")
    df = pl.from_arrow(table.drop_columns([c for c in ("h_hub", "h_last") if c in table.column_names]))
    if schema == "scores":
        return manifest, scores_summary(df)
    if schema == "pairs":
        return manifest, pairs_summary(df)
    # DCO tuples: per language pair (with rewards.consistency.language_pairs: all, side 2 alone would merge en-ru
    # with de-ru)
    langs = ("lang_1", "lang_2") if schema == "dco" else ("lang",)
    return manifest, df.group_by(*langs, maintain_order=True).agg(pl.len().alias("rows"))


def find_datasets(path: Path) -> list[Path]:
    """Dataset directories under `path` (itself, a run directory's iter-*/<dataset>, online/step-* and
    eval/<label>/<dataset>, or those directly inside it); outputs set aside (*.stale-*) are not the run's."""
    if (path / "manifest.json").is_file():
        return [path]
    order = {"samples": 0, "scores": 1, "candidate_scores": 2, "pairs": 3}
    found = {p.parent for p in [*path.glob("iter-*/*/manifest.json"), *path.glob("online/step-*/manifest.json"),
                                *path.glob("eval/*/*/manifest.json"),
                                *path.glob("*/manifest.json")]  # the last: an iteration, online/ or an eval's --out
             if ".stale-" not in p.parent.name}
    return sorted(found, key=lambda d: (d.parent.name, order.get(d.name, 9), d.name))


STEP_COLUMNS = ("reward_mean", "kl", "clip_fraction", "entropy", "value_loss", "seconds_generate", "seconds_reward",
                "seconds_train", "seconds_sync")  # the rest of a step's record is in metrics.jsonl


def step_table(metrics: list[dict]) -> pl.DataFrame | None:
    """An online run's step records: reward, KL, clip fraction, entropy, PPO's value loss and seconds per phase."""
    rows = [m for m in metrics if m.get("stage") == "online"]
    if not rows:
        return None
    columns = ["step", *(c for c in STEP_COLUMNS if any(c in r for r in rows))]
    return pl.DataFrame([{c: r.get(c) for c in columns} for r in rows],
                        schema={c: pl.Int64 if c == "step" else pl.Float64 for c in columns})


NUMERIC = ("iteration", "step", "loss", "reward", "accuracy", "fidelity_", "seconds", "kl", "clip", "entropy",
           "value_loss", "grad_norm", "lr", "approx_kl", "pairs_rows", "steps", "dropped", "retries", "failed_rows",
           "rows", "samples", "tokens")  # prefixes of the fields that tables and plots read as numbers


def _numbers_where_expected(record: dict) -> bool:
    for key, value in record.items():
        if key.startswith(NUMERIC) and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            if key in ("iteration", "step") and not isinstance(value, int):
                return False
    return True


def read_metrics(run_dir: Path, on_bad_line=None) -> list[dict]:
    """metrics.jsonl's records. A line that is not a JSON object (a write cut short by a killed run), or that holds
    text where a number belongs (an edit), is skipped and passed to `on_bad_line(path, line_number)`."""
    path = run_dir / "metrics.jsonl"
    records = []
    for number, line in enumerate(path.read_bytes().splitlines() if path.is_file() else [], 1):
        try:
            record = json.loads(line) if line.strip() else {}
        except ValueError:  # a cut write, bytes that are not UTF-8, an integer of too many digits
            record = None
        if isinstance(record, dict) and _numbers_where_expected(record):
            if record:
                records.append(record)
        elif on_bad_line is not None:
            on_bad_line(path, number)
    return records


def iteration_table(metrics: list[dict]) -> pl.DataFrame | None:
    """One row per finished iteration: training loss and reward margins, pair accuracy, language fidelity per
    language and phase timings (the `iteration` records of metrics.jsonl)."""
    rows = [m for m in metrics if m.get("stage") == "iteration"]
    if not rows:
        return None
    columns = ["iteration", "policy", "pairs_rows", "loss_first", "loss_mean", "reward_margin_mean", "accuracy_mean"]
    columns += [k for k in ("steps", "dropped_too_long") if any(k in r for r in rows)]
    columns += sorted({k for r in rows for k in r if k.startswith("fidelity_")})
    columns += [k for k in ("seconds_generate", "seconds_score", "seconds_pairs", "seconds_train")
                if any(k in r for r in rows)]
    return pl.DataFrame([{c: r.get(c) for c in columns} for r in rows], schema_overrides={"policy": pl.String})
