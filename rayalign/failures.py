"""Rows that fail by themselves: written per shard as they happen, gathered into iter-<t>/errors/, and counted
against engines.max_failed_share. Also TrainerLostError, a trainer rank lost mid-stage, CheckpointError and
NonFiniteLossError (no Ray import here, so the CLI can catch them cheaply)."""

from __future__ import annotations

import shutil
from pathlib import Path

from rayalign.config import RunConfig
from rayalign.data.store import write_parquet_atomic
from rayalign.generation import FailedRowsError
from rayalign.run_dir import ERRORS_BY_SHARD, write_table


class CheckpointError(RuntimeError):
    """A training checkpoint that cannot be loaded; the message names the file."""


class NonFiniteLossError(RuntimeError):
    """A training loss that is NaN or infinite, refused on every rank before it reaches the weights."""


class TrainerLostError(RuntimeError):
    """A trainer rank died mid-stage (a lost node, OOM); the message says how the run resumes.

    Defined here, not in actors/trainer.py (which imports Ray), so the CLI's error handling stays light."""


def errors_checkpoint(cfg: RunConfig, it_dir: Path, stage: str, done: set[int], total_rows: int):
    """(on_errors callback, failed rows still allowed) for a stage over `total_rows` rows.

    The callback writes a shard's failed rows before the shard itself, so the failures of a finished shard
    survive an interruption; failures recorded for shards not in `done` are stale and removed here.
    """
    directory = it_dir / ERRORS_BY_SHARD
    for path in directory.glob(f"{stage}-*.parquet"):
        if int(path.stem.rsplit("-", 1)[1]) not in done:
            path.unlink()

    def on_errors(index, errors):
        directory.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(errors, directory / f"{stage}-{index:05d}.parquet")

    allowed = int(cfg.engines.max_failed_share * total_rows)
    return on_errors, max(0, allowed - count_failed(it_dir, stage))


def count_failed(it_dir: Path, stage: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in (it_dir / ERRORS_BY_SHARD).glob(f"{stage}-*.parquet"))


def record_failures(cfg: RunConfig, it_dir: Path, iteration: int, stage: str, total_rows: int) -> int:
    """Gather the iteration's failed rows (every stage so far) into the errors dataset iter-<t>/errors/ and
    return this stage's count; stop the run when they pass engines.max_failed_share."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = it_dir / "errors"
    shutil.rmtree(out, ignore_errors=True)  # rebuilt from errors.by-shard/, which stays the source
    parts = sorted((it_dir / ERRORS_BY_SHARD).glob("*.parquet"))
    if parts:
        table = pa.concat_tables([pq.read_table(p) for p in parts])
        write_table(table, out, "errors", cfg, iteration, {}, {},
                    f"Rows of iteration {iteration} that failed by themselves and were left out, with the reason.",
                    shard_rows=table.num_rows)
    failed, share = count_failed(it_dir, stage), cfg.engines.max_failed_share
    if failed > int(share * total_rows):
        raise FailedRowsError(
            f"{stage} iter-{iteration}: {failed} of {total_rows} rows ({failed / max(total_rows, 1):.2%}) failed by "
            f"themselves, more than engines.max_failed_share={share} allows; their reasons are in {out} "
            f"(`rayalign inspect {out}`). Raise the share (-o engines.max_failed_share=..., not part of the config "
            f"hash) and launch again to resume without them, or fix the input (prompt files, model or engine "
            f"settings) and launch with --redo {stage} to run the stage again")
    return failed
