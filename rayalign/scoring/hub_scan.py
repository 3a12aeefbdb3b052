"""The semantic-hub scan (`hub_layer: auto`): the silhouette of pooled response states, clustered by prompt id,
at every layer; the hub is the best inner layer (docs/methods.md section 1)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa

from rayalign.config import ConfigError, RunConfig
from rayalign.data.store import atomic_write_text
from rayalign.eval import metrics
from rayalign.progress import console
from rayalign.run_dir import log_metrics, write_state
from rayalign.scoring.setup import num_hidden_layers


def run_hub_layer(cfg: RunConfig, run_dir: Path) -> int | None:
    """The layer a run's own hub scan chose when the recipe says `hub_layer: auto` (None otherwise)."""
    path = run_dir / "hub-scan.json"
    if cfg.rewards.latent.hub_layer != "auto" or not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["hub_layer"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: expected a JSON object with an integer hub_layer (delete it to scan again)") \
            from None


def scan_subset(samples: pa.Table, languages: list[str], max_prompts: int | None) -> pa.Table:
    """The samples of the first `max_prompts` prompt ids (sorted) that have responses in every language."""
    import polars as pl

    df = pl.from_arrow(samples.select(["prompt_id", "lang"]))
    complete = (df.group_by("prompt_id").agg(pl.col("lang").n_unique().alias("n"))
                .filter(pl.col("n") == len(languages))["prompt_id"].sort().to_list())
    keep = set(complete[:max_prompts] if max_prompts else complete)
    if len(keep) < 2:
        raise ConfigError(f"hub scan: needs at least 2 prompts with responses in every language {languages}; "
                          f"found {len(keep)}")
    return samples.filter(pa.array([p in keep for p in samples.column("prompt_id").to_pylist()]))


def hub_scan(cfg: RunConfig, policy_path: str, policy_name: str, samples: pa.Table, max_prompts: int | None) -> dict:
    """Silhouette of the pooled response states, clustered by prompt id, at every layer 0..L; the hub layer is
    the argmax over 1..L-1 (docs/methods.md section 1)."""
    from rayalign.actors.pool import split_shards
    from rayalign.actors.scorer import ModelRole, ScoringGroup
    from rayalign.scoring.forward import ForwardSpec, latent_matrix

    subset = scan_subset(samples, cfg.languages, max_prompts)
    num_layers = num_hidden_layers(cfg, policy_path)
    columns = [(f"h_layer_{layer}", layer) for layer in range(num_layers + 1)]
    spec = ForwardSpec("policy", "messages", "logp_policy", tuple(columns), tokens_column="score_tokens")
    group = ScoringGroup.for_recipe({"policy": ModelRole(policy_path, cfg.policy)}, cfg.rewards)
    table = group.collect(split_shards(subset, cfg.engines.shard_rows * cfg.sampling.n), [spec], None,
                          label="hub scan")
    pooled = {layer: latent_matrix(table.column(column)) for column, layer in columns}
    rows = metrics.silhouette_rows(pooled, table.column("prompt_id").to_pylist())
    silhouette = {r["layer"]: r["value"] for r in rows}
    pairs = metrics.silhouette_pair_rows(pooled, table.column("prompt_id").to_pylist(),
                                         table.column("lang").to_pylist(), cfg.anchor_language)
    return {"policy": policy_name, "config_hash": cfg.config_hash(),
            "hub_layer": metrics.choose_hub_layer(silhouette, num_layers), "num_layers": num_layers,
            "silhouette": {str(k): round(v, 6) for k, v in silhouette.items()},
            "silhouette_pairs": {other: {str(r["layer"]): round(r["value"], 6) for r in pairs
                                         if r["other_lang"] == other}
                                 for other in dict.fromkeys(r["other_lang"] for r in pairs)},
            "candidates": list(range(1, num_layers)), "prompts": rows[0]["count"], "samples": table.num_rows}


def print_hub_scan(result: dict) -> None:
    best = result["hub_layer"]
    console.print(f"hub scan of {result['policy']} ({result['prompts']} prompts, {result['samples']} samples): "
                  f"silhouette by layer (0 = embeddings, {result['num_layers']} = language layer)")
    for layer, value in result["silhouette"].items():
        bar = "#" * max(0, int(round(max(value, 0.0) * 40)))
        console.print(f"  layer {int(layer):>3}  {value:+.4f}  {bar}{'  <- hub' if int(layer) == best else ''}")


def save_hub_scan(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def hub_layer_of_run(cfg: RunConfig, run_dir: Path, state: dict, initial_path: str) -> int | None:
    """The hub layer when the recipe says `hub_layer: auto`: scanned once on iteration 1's samples with the starting
    policy (so every iteration's rewards use the same layer), saved in hub-scan.json; None otherwise."""
    from rayalign.data.store import read_dataset

    lat = cfg.rewards.latent
    if not (lat.enabled and lat.hub_layer == "auto"):
        return None
    path = run_dir / "hub-scan.json"
    if "hub-scan" in state["finished"] and path.is_file():
        return run_hub_layer(cfg, run_dir)
    started = time.perf_counter()
    result = hub_scan(cfg, initial_path, cfg.policy.path, read_dataset(run_dir / "iter-1" / "samples", "samples"),
                      lat.hub_scan_prompts)
    save_hub_scan(result, path)
    print_hub_scan(result)
    log_metrics(run_dir, {"iteration": 1, "stage": "hub-scan", "hub_layer": result["hub_layer"],
                          "prompts": result["prompts"],
                          **{f"silhouette_{k}": v for k, v in result["silhouette"].items()},
                          "wall_seconds": round(time.perf_counter() - started, 3)})
    state["finished"].append("hub-scan")
    write_state(run_dir, state)
    return result["hub_layer"]
