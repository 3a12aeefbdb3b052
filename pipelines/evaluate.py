"""Evaluate a policy checkpoint (`rayalign eval`) and scan for the semantic-hub layer (`rayalign hub-scan`).

Read top to bottom: generate responses to the recipe's prompts, score them once with pooled states at every layer
(rewards as the recipe configures them), score parallel candidate sets, optionally ask a judge, then turn it all
into rows of the `eval` schema. Every step writes a dataset under the output directory and is kept on a rerun.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from rayalign.config import ConfigError, RunConfig
from rayalign.data.store import DatasetWriter, read_dataset
from rayalign.eval import metrics
from rayalign.pipelines.offline import (_complete, _progress, console, forward_rewards, num_hidden_layers, scoring_setup,
                                        with_scoring_prompts, write_table)

EVAL_ITERATION = 0  # seeds of evaluation samples: (run seed, prompt, language, sample, iteration 0)


def eval_samples(cfg: RunConfig, policy_path: str, policy_name: str, out_dir: Path) -> pa.Table:
    """Responses of the policy to the recipe's prompts (its prompts.limit and sampling.n) -> a samples dataset."""
    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.pool import split_shards
    from rayalign.data.prompts import load_prompts

    if _complete(out_dir):
        return read_dataset(out_dir, "samples")
    prompts = load_prompts(cfg.prompts.path, cfg.languages, limit=cfg.prompts.limit,
                           system_prompt=cfg.prompts.system_prompt)
    shards = split_shards(prompts, cfg.engines.shard_rows)
    writer = DatasetWriter(out_dir, "samples", config_hash=cfg.config_hash(), languages=cfg.languages,
                           models={"policy": policy_name}, seeds={"run_seed": cfg.sampling.seed, "iteration": 0},
                           description=f"Evaluation samples of {policy_name}: {cfg.sampling.n} per (prompt_id, "
                                       f"language), temperature {cfg.sampling.temperature}.")
    done = {i for i in range(len(shards)) if writer.has_shard(i)}
    group = GenerationGroup(policy_path, cfg.policy, cfg.engines)
    with _progress("eval generate", prompts.num_rows, "rows") as update:
        try:
            group.run(shards, cfg.sampling, EVAL_ITERATION, policy_name, writer.write_shard, skip=done,
                      progress=update)
        finally:
            group.shutdown()
    writer.finalize(expected_shards=len(shards))
    return read_dataset(out_dir, "samples")


def score_layers(cfg: RunConfig, roles: dict, specs: list, reward_model: str | None, samples: pa.Table,
                 label: str) -> pa.Table:
    """One scoring pass of `samples` on the recipe's scoring actors; returns the rows with the specs' columns."""
    from rayalign.actors.pool import split_shards
    from rayalign.actors.scorer import ScoringGroup

    r = cfg.rewards
    shards = split_shards(samples, cfg.engines.shard_rows * cfg.sampling.n)
    results: dict[int, pa.Table] = {}
    group = ScoringGroup(roles, r.actors, r.batch_size, r.num_cpus, r.num_gpus)
    with _progress(label, samples.num_rows, "samples") as update:
        try:
            group.run(shards, specs, reward_model, results.__setitem__, progress=update)
        finally:
            group.shutdown()
    return pa.concat_tables([results[i] for i in range(len(shards))])


def layer_columns(layers) -> tuple[tuple[str, int], ...]:
    return tuple((f"h_layer_{layer}", layer) for layer in layers)


def pooled_by_layer(table: pa.Table, layers) -> dict[int, np.ndarray]:
    from rayalign.scoring import latent_matrix

    return {layer: latent_matrix(table.column(column)) for column, layer in layer_columns(layers)}


# ---- the semantic-hub scan ----

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
    mask = pa.array([p in keep for p in samples.column("prompt_id").to_pylist()])
    return samples.filter(mask)


def hub_scan(cfg: RunConfig, policy_path: str, policy_name: str, samples: pa.Table, max_prompts: int | None) -> dict:
    """Silhouette of the pooled response states, clustered by prompt id, at every layer 0..L; the hub layer is
    the argmax over 1..L-1 (METHODS.md section 1)."""
    from rayalign.actors.scorer import ModelRole
    from rayalign.scoring import ForwardSpec

    subset = scan_subset(samples, cfg.languages, max_prompts)
    num_layers = num_hidden_layers(cfg, policy_path)
    layers = list(range(num_layers + 1))
    spec = ForwardSpec("policy", "messages", "logp_policy", layer_columns(layers), tokens_column="score_tokens")
    table = score_layers(cfg, {"policy": ModelRole(policy_path, cfg.policy)}, [spec], None, subset, "hub scan")
    rows = metrics.silhouette_rows(pooled_by_layer(table, layers), table.column("prompt_id").to_pylist())
    silhouette = {r["layer"]: r["value"] for r in rows}
    return {"policy": policy_name, "hub_layer": metrics.choose_hub_layer(silhouette, num_layers),
            "num_layers": num_layers, "silhouette": {str(k): round(v, 6) for k, v in silhouette.items()},
            "candidates": list(range(1, num_layers)), "prompts": rows[0]["count"], "samples": table.num_rows}


def print_hub_scan(result: dict) -> None:
    best = result["hub_layer"]
    console.print(f"hub scan of {result['policy']} ({result['prompts']} prompts, {result['samples']} samples): "
                  f"silhouette by layer (0 = embeddings, {result['num_layers']} = language layer)")
    for layer, value in result["silhouette"].items():
        bar = "#" * max(0, int(round(max(value, 0.0) * 40)))
        console.print(f"  layer {int(layer):>3}  {value:+.4f}  {bar}{'  <- hub' if int(layer) == best else ''}")


# ---- evaluation ----

def evaluate_policy(cfg: RunConfig, policy_path: str, out_dir: str | Path, *, policy_name: str | None = None,
                    prompts_limit: int | None = None, samples: int | None = None, candidates_path: str | None = None,
                    layers: str | list[int] = "all", likelihood: str = "sum", judge=None,
                    hub_layer: int | None = None) -> pa.Table:
    """Evaluate one checkpoint; returns (and writes to `out_dir`/results) the `eval` table.

    Language fidelity and response length per language, statistics of the recipe's rewards, the silhouette of
    pooled states per layer (`layers`: "all", "none" or hidden_states indices), RankC and accuracy on a parallel
    candidate set (`candidates_path`, default rewards.consistency.candidates_path), and the judge's win rate
    against reference answers (`judge`: a JudgeSettings). Ray must be connected.
    """
    out_dir = Path(out_dir)
    policy_name = policy_name or policy_path
    if _complete(out_dir / "results"):
        console.print(f"eval {policy_name}: finished earlier, kept ({out_dir / 'results'})")
        return read_dataset(out_dir / "results", "eval")
    cfg = dataclasses.replace(
        cfg, prompts=dataclasses.replace(cfg.prompts, limit=prompts_limit or cfg.prompts.limit),
        sampling=dataclasses.replace(cfg.sampling, n=samples or cfg.sampling.n))
    if cfg.rewards.latent.enabled and cfg.sampling.n < 2:
        raise ConfigError(f"eval: latent rewards need at least 2 samples per prompt, got {cfg.sampling.n}")
    num_layers = num_hidden_layers(cfg, policy_path)
    scan = list(range(num_layers + 1)) if layers == "all" else [] if layers == "none" else sorted(set(layers))
    if any(not 0 <= layer <= num_layers for layer in scan):
        raise ConfigError(f"eval: layers {scan} must lie in 0..{num_layers} (the hidden_states of {policy_name})")
    table = eval_samples(cfg, policy_path, policy_name, out_dir / "samples")
    rows = metrics.fidelity_rows(table.column("lang").to_pylist(), table.column("lang_detected").to_pylist())
    rows += [dict(r, metric="response_tokens") for r in metrics.distribution_rows(
        "response_tokens", table.column("num_tokens").to_pylist(), table.column("lang").to_pylist())
        if r["stat"] == "mean"]

    num_prompts = len(set(table.column("prompt_id").to_pylist()))
    if num_prompts < 2:
        if layers != "none":
            console.print("eval: the silhouette needs at least 2 prompts; skipped")
        scan = []
    lat = cfg.rewards.latent
    latent = {}
    if lat.enabled:
        if hub_layer is None and lat.hub_layer != "auto":
            hub_layer = num_layers // 2 if lat.hub_layer is None else lat.hub_layer
        if hub_layer is None:  # auto: this evaluation's own silhouette chooses
            if layers == "none" or num_prompts < 2:
                raise ConfigError("eval: rewards.latent.hub_layer is auto and no run hub scan was found, so the "
                                  "evaluation scans itself: it needs at least 2 prompts and --layers other than none")
            scan = list(range(num_layers + 1))
        latent = {"h_hub": hub_layer, "h_last": num_layers if lat.language_layer is None else lat.language_layer}
    roles, specs, reward_model, _ = scoring_setup(dataclasses.replace(
        cfg, rewards=dataclasses.replace(cfg.rewards, latent=dataclasses.replace(lat, enabled=False))), policy_path)
    pooled_layers = sorted(set(scan) | {layer for layer in latent.values() if layer is not None})
    specs[0] = dataclasses.replace(specs[0], layers=layer_columns(pooled_layers))
    scored = score_layers(cfg, roles, specs, reward_model, with_scoring_prompts(cfg, table), "eval score")
    pooled = pooled_by_layer(scored, pooled_layers)
    silhouette = metrics.silhouette_rows({k: pooled[k] for k in scan}, scored.column("prompt_id").to_pylist())
    rows += silhouette
    if lat.enabled and latent["h_hub"] is None:
        latent["h_hub"] = metrics.choose_hub_layer({r["layer"]: r["value"] for r in silhouette}, num_layers)
    for column, layer in latent.items():
        scored = scored.append_column(column, scored.column(f"h_layer_{layer}"))
    scored = scored.drop_columns([c for c, _ in layer_columns(pooled_layers)])
    scored, params = forward_rewards(cfg, scored)
    params["layers"] = latent
    write_table(scored.drop_columns([c for c in ("h_hub", "h_last") if c in scored.column_names]), out_dir / "scores",
                "scores", cfg, EVAL_ITERATION, {"policy": policy_name}, params,
                f"Evaluation scores of {policy_name}.", shard_rows=max(1, scored.num_rows))
    langs = scored.column("lang").to_pylist()
    for column in ("r_lacomsa", "r_msa", "r_icr", "r_rm", "r_user"):
        if scored.column(column).null_count < scored.num_rows:
            rows += metrics.distribution_rows(column, scored.column(column).to_pylist(), langs)

    candidates_path = candidates_path or cfg.rewards.consistency.candidates_path
    if candidates_path:
        rows += candidate_metrics(cfg, policy_path, candidates_path, likelihood)
    if judge is not None:
        rows += judge_metrics(table, judge)

    result = pa.Table.from_pylist([{"policy": policy_name, **r} for r in rows])
    writer = DatasetWriter(out_dir / "results", "eval", config_hash=cfg.config_hash(), languages=cfg.languages,
                           models={"policy": policy_name}, description=f"Evaluation of {policy_name}.",
                           params={"prompts_limit": cfg.prompts.limit, "samples": cfg.sampling.n,
                                   "candidates_path": candidates_path, "likelihood": likelihood,
                                   "layers": pooled_layers, "hub_layer": latent.get("h_hub")})
    writer.write_shard(0, result)
    writer.finalize(expected_shards=1)
    return read_dataset(out_dir / "results", "eval")


def candidate_metrics(cfg: RunConfig, policy_path: str, candidates_path: str, likelihood: str) -> list[dict]:
    """The policy's log-likelihood of every candidate answer in every language -> accuracy and RankC rows."""
    import polars as pl

    from rayalign.actors.scorer import ModelRole
    from rayalign.data.prompts import load_candidate_sets
    from rayalign.scoring import ForwardSpec

    cands = load_candidate_sets(candidates_path, cfg.languages).rename_columns(
        ["prompt_id", "lang", "messages", "candidate_idx", "response", "gold"])
    spec = ForwardSpec("policy", "messages", "logp", tokens_column="num_tokens")
    scored = score_layers(cfg, {"policy": ModelRole(policy_path, cfg.policy)}, [spec], None, cands,
                          "eval candidates")
    return metrics.candidate_rows(pl.from_arrow(scored.drop_columns(["messages", "response"])), cfg.languages,
                                  cfg.anchor_language, likelihood)


def judge_metrics(samples: pa.Table, judge) -> list[dict]:
    """The judge's win rate of each prompt's first sample against the prompt's reference answer."""
    from rayalign.eval.judge import judge_items, win_rates

    first = samples.filter(pa.compute.equal(samples.column("sample_idx"), 0)).to_pylist()
    items = [{"prompt_id": r["prompt_id"], "lang": r["lang"], "prompt": r["messages"][-1]["content"],
              "response": r["response"], "reference": r["reference"]} for r in first]
    with _progress("eval judge", len(items), "items") as update:
        judged = judge_items(items, judge, progress=lambda done, total: update(_Done(done)))
    return [metrics.row("judge_win_rate", "share", lang, value, count)
            for lang, (value, count) in sorted(win_rates(judged).items()) if lang != "invalid" and count]


@dataclasses.dataclass
class _Done:  # the shape of ShardStats that the progress bar reads
    rows_in: int
    rows_out: int = 0
    seconds: float = 1.0


def print_summary(result: pa.Table, languages: list[str], anchor: str) -> None:
    """Per-language table of the headline metrics, then the silhouette by layer."""
    from rich.table import Table

    rows = result.to_pylist()
    value = {(r["metric"], r["stat"], r["lang"], r["other_lang"]): r["value"] for r in rows}
    rewards = sorted({r["metric"] for r in rows if r["metric"].startswith("r_")})
    columns = [("fidelity", "share", None), ("response_tokens", "mean", None)]
    columns += [(m, "mean", None) for m in rewards] + [("accuracy", "share", None), ("rankc", "score", anchor),
                                                        ("judge_win_rate", "share", None)]
    present = [c for c in columns if any(k[:2] == c[:2] for k in value)]
    policy = rows[0]["policy"] if rows else "?"
    table = Table(title=f"eval of {policy}")
    table.add_column("language")
    for metric, stat, _ in present:
        table.add_column({"response_tokens": "tokens", "judge_win_rate": "judge"}.get(metric, metric), justify="right")
    for lang in [*languages, "all"]:
        cells = []
        for metric, stat, _ in present:
            if metric == "rankc":
                v = value.get((metric, stat, "all", None)) if lang == "all" else value.get((metric, stat, anchor, lang))
            else:
                v = value.get((metric, stat, lang, None))
            cells.append("" if v is None else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}")
        table.add_row(lang, *cells)
    console.print(table)
    silhouette = sorted((r["layer"], r["value"]) for r in rows if r["metric"] == "silhouette")
    if silhouette:
        best = max(silhouette, key=lambda lv: lv[1])
        console.print("silhouette by layer: " + "  ".join(f"{layer}:{v:+.3f}" for layer, v in silhouette)
                      + f"  (max at layer {best[0]})")


def save_hub_scan(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
