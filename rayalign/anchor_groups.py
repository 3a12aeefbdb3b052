"""Prompts that lost their anchor-language rows.

Rows that fail by themselves are set aside (the errors dataset, within engines.max_failed_share). Rewards and
LIDR pairs compare every language of a prompt with its anchor-language rows, so a prompt whose anchor rows
failed cannot be scored in any language: it is dropped whole, counted and named, instead of stopping the stage.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc


def anchor_rows_needed(cfg) -> int:
    """Anchor rows a prompt needs for the recipe's rewards: 2 for latent rewards (leave-one-out MSA among the
    anchor responses), else those it needs before scoring (`anchor_rows_before_scoring`)."""
    if cfg.rewards.latent.enabled:
        return 2
    return anchor_rows_before_scoring(cfg)


def anchor_rows_before_scoring(cfg) -> int:
    """Anchor rows a prompt needs before its forward pass: 1 when ICR scores under a prompt made from the anchor
    prompt (cross_lingual: G(x); translation: x^en, under which R_t scores t(y)), else 0. Prompts with fewer are
    dropped before scoring; the latent rewards' needs are checked after it."""
    imp = cfg.rewards.implicit
    return int(imp.enabled and imp.prompt in ("cross_lingual", "translation"))


def drop_prompts_without_anchor(table: pa.Table, anchor: str, anchor_rows: int,
                                other_rows: int = 0) -> tuple[pa.Table, list]:
    """(`table` without the prompts that have fewer than `anchor_rows` rows in the anchor language or fewer than
    `other_rows` in the other languages, the dropped prompt ids in sorted order)."""
    if table.num_rows == 0 or (anchor_rows <= 0 and other_rows <= 0):
        return table, []
    ids, langs = table.column("prompt_id").to_pylist(), table.column("lang").to_pylist()
    in_anchor = Counter(p for p, lang in zip(ids, langs) if lang == anchor)
    in_others = Counter(p for p, lang in zip(ids, langs) if lang != anchor)
    dropped = sorted(p for p in set(ids) if in_anchor[p] < anchor_rows or in_others[p] < other_rows)
    if not dropped:
        return table, []
    keep = pc.invert(pc.is_in(table.column("prompt_id"), value_set=pa.array(dropped, table.schema.field(
        "prompt_id").type)))
    return table.filter(keep), dropped


def dropped_message(stage: str, dropped: list, rows: int, anchor: str, needed: int) -> str:
    shown = ", ".join(map(str, dropped[:10])) + (f" and {len(dropped) - 10} more" if len(dropped) > 10 else "")
    return (f"{stage}: dropped {len(dropped)} prompt(s) in every language ({rows} rows): {shown}; fewer than "
            f"{needed} {anchor} rows were left after rows that failed by themselves (see the errors dataset), and "
            f"every language is compared with its {anchor} rows")
