"""The end of a score stage, whichever schedule ran its forward passes (the barrier's `score_stage` in
pipelines/offline.py, the stream's `generate_score_stage` in pipelines/streaming.py): rewards need every row
(anchors, centroids, alpha search), so they are computed here, once every shard is scored.

The scoring actors must still be up for `stage_centroids` (LaCoMSA's centroids from rewards.latent.centroid_texts
are pooled by the policy they hold); `finish_scores` then needs no actor.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa

from rayalign.config import RunConfig


def stage_centroids(cfg: RunConfig, group, layers: dict):
    """phi's language centroids for the stage: pooled on `group` (the running scoring actors, which hold the
    policy) from rewards.latent.centroid_texts; None (the run's own centroids) without them or latent rewards."""
    from rayalign.scoring.centroid_texts import centroids_from_texts

    return centroids_from_texts(cfg, group, layers["h_last"]) if layers else None


def finish_scores(cfg: RunConfig, results: dict[int, pa.Table], count: int, out_dir: Path, iteration: int,
                  roles: dict, layers: dict, centroids, dropped: list, dropped_rows: int) -> tuple[pa.Table, dict]:
    """The scores dataset at `out_dir` from the forward results of scoring shards 0..count-1 (checkpointed in
    `out_dir`.forward, removed once the dataset is written).

    Prompts with fewer anchor rows than the rewards need are dropped and named (added to `dropped`, `dropped_rows`:
    those dropped before scoring); rewards use `centroids` (`stage_centroids`). Returns (the scores table, the
    stage result's fields: samples, dropped_prompts, dropped_rows and the ICR alphas per language).
    """
    from rayalign.anchor_groups import anchor_rows_needed, drop_prompts_without_anchor, dropped_message
    from rayalign.progress import console
    from rayalign.run_dir import write_table
    from rayalign.scoring.setup import forward_rewards

    anchor, needed = cfg.anchor_language, anchor_rows_needed(cfg)
    # a shard whose every row failed holds no scored columns
    table = pa.concat_tables([results[i] for i in range(count) if results[i].num_rows])
    scored, table, more = table.num_rows, *drop_prompts_without_anchor(table, anchor, needed)
    dropped, dropped_rows = sorted(dropped + more), dropped_rows + scored - table.num_rows
    if dropped:
        console.print(f"[yellow]{dropped_message(f'score iter-{iteration}', dropped, dropped_rows, anchor, needed)}")
    table, params = forward_rewards(cfg, table, centroids)
    params["layers"] = layers
    write_table(table, out_dir, "scores", cfg, iteration, {name: role.path for name, role in roles.items()}, params,
                f"Teacher-forced scores of iteration {iteration}'s samples: log-probs, rewards"
                f"{' and pooled states' if layers else ''}.", shard_rows=cfg.engines.shard_rows * cfg.sampling.n,
                latent_dim=table.schema.field("h_hub").type.list_size if layers else 0)
    shutil.rmtree(out_dir.with_name(out_dir.name + ".forward"), ignore_errors=True)
    return table, {"samples": table.num_rows, "dropped_prompts": len(dropped), "dropped_rows": dropped_rows,
                   **{f"alpha_{lang}": a for lang, a in params.get("icr", {}).get("alpha_per_language", {}).items()}}
