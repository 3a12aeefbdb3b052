"""Evaluate a policy checkpoint (`rayalign eval`) and scan for the semantic-hub layer (`rayalign hub-scan`).

Read top to bottom: generate responses to the recipe's prompts, score them once with pooled states at every layer
(rewards as the recipe configures them), score parallel candidate sets, optionally ask a judge, then turn it all
into rows of the `eval` schema. Every step writes a dataset under the output directory and is kept on a rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from rayalign.config import ConfigError, EvalConfig, RunConfig, build_dataclass
from rayalign.config.sections import ConsistencyRewardConfig
from rayalign.data.store import DatasetWriter, atomic_write_text, dataset_problems, read_dataset, read_manifest
from rayalign.eval import metrics
from rayalign.models import ModelLoadError, resolve_model_path
from rayalign.progress import console, model_build_progress, progress_bar
from rayalign.run_dir import dataset_complete, write_table
from rayalign.scoring.hub_scan import hub_scan
from rayalign.scoring.setup import forward_rewards, latent_layers, scoring_setup, with_scoring_prompts
from rayalign.scoring.rewards import REWARD_COLUMNS

EVAL_ITERATION = 0  # seeds of evaluation samples: (run seed, prompt, language, sample, iteration 0)


# ---- which checkpoint, and whether earlier outputs still hold ----

def run_policy(cfg: RunConfig, run_dir: Path, policy: str | None = None) -> tuple[str, str, str]:
    """(checkpoint path, name, label) of `policy`: a path, initial (the recipe's policy), iter-N (the run's
    iteration N), or None: the run's latest trained policy, else initial."""
    if policy is None:
        trained = sorted(run_dir.glob("iter-*/policy/config.json"), key=lambda p: int(p.parent.parent.name[5:]))
        policy = trained[-1].parent.parent.name if trained else "online" if cfg.mode == "online" and (
            run_dir / "online" / "policy" / "config.json").is_file() else "initial"
        if policy == "initial":
            console.print(f"eval: {run_dir} holds no trained policy (yet); evaluating the initial one, "
                          f"{cfg.policy.path} (--policy chooses)")
    if policy == "online":  # an online run's final policy
        path = run_dir / "online" / "policy"
        if not (path / "config.json").is_file():
            raise ConfigError(f"policy online: {path} holds no checkpoint ("
                              + ("has the online run finished?)" if cfg.mode == "online" else
                                 "the recipe is offline: iter-N names its trained policies)"))
        return str(path), "online/policy", "online"
    if policy == "initial":
        return resolve_model_path(cfg.policy.path, model_build_progress(cfg.policy.path)), cfg.policy.path, "initial"
    if policy.startswith("iter-") and policy[5:].isdigit():
        if int(policy[5:]) < 1:
            raise ConfigError(f"policy {policy}: iterations count from 1 (iter-1's policy is the first trained one; "
                              "initial is the recipe's)")
        path = run_dir / policy / "policy"
        if not (path / "config.json").is_file():
            raise ConfigError(f"policy {policy}: {path} holds no checkpoint (has the run trained iteration "
                              f"{policy[5:]}?)")
        return str(path), f"{policy}/policy", policy
    try:
        return resolve_model_path(policy), policy, Path(policy).name or "policy"
    except ModelLoadError as e:
        raise ModelLoadError(f"--policy {policy!r}: not initial, iter-N or a checkpoint found; {e}") from None


def eval_key(cfg: RunConfig, policy_path: str, policy_name: str, settings: dict | None = None) -> str:
    """What evaluation outputs depend on: the config (prompts, sampling, rewards), the checkpoint (its name and
    its files' modification times, so a retrained iteration is evaluated again) and the evaluation settings."""
    path = Path(policy_path)
    stamp = max((f.stat().st_mtime_ns for f in path.iterdir() if f.is_file()), default=0) if path.is_dir() else 0
    data = [cfg.config_hash(), policy_name, str(policy_path), stamp, settings or {}]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def key_file(path: Path) -> Path:
    """<dataset>.eval_key beside a dataset being written: the settings its shards are made with."""
    return path.with_name(path.name + ".eval_key")


def set_aside(path: Path, why: str) -> None:
    """Move `path` (and its key file) to <path>.stale-<time>, saying why."""
    stale = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(stale)
    if key_file(path).exists():
        key_file(path).rename(key_file(stale))
    console.print(f"{path}: {why}; moved to {stale}, computing it again")


def kept(path: Path, key: str) -> bool:
    """True when `path` holds a complete, intact dataset made with `key`. One made otherwise, a damaged one, and
    the shards of an interrupted one made with other settings (its key file) are moved aside."""
    if not path.exists():
        return False
    if not dataset_complete(path):
        made = key_file(path).read_text().strip() if key_file(path).is_file() else None
        if made != key:
            set_aside(path, "shards of an interrupted evaluation with other settings or another checkpoint")
        return False
    if read_manifest(path).get("params", {}).get("eval_key") != key:
        set_aside(path, "made with other settings or another checkpoint")
        return False
    problems = dataset_problems(path)
    if problems:
        set_aside(path, f"damaged ({problems[0][1]})")
        return False
    return True


# ---- the steps ----

def eval_samples(cfg: RunConfig, policy_path: str, policy_name: str, out_dir: Path) -> pa.Table:
    """Responses of the policy to the recipe's prompts (its prompts.limit and sampling.n) -> a samples dataset."""
    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.pool import split_shards
    from rayalign.data.prompts import load_prompts

    key = eval_key(cfg, policy_path, policy_name)
    if kept(out_dir, key):
        return read_dataset(out_dir, "samples")
    prompts = load_prompts(cfg.prompts.path, cfg.languages, **cfg.prompts.load_kwargs())
    shards = split_shards(prompts, cfg.engines.shard_rows)
    writer = DatasetWriter(out_dir, "samples", config_hash=cfg.config_hash(), languages=cfg.languages,
                           models={"policy": policy_name}, seeds={"run_seed": cfg.sampling.seed, "iteration": 0},
                           params={"eval_key": key},
                           description=f"Evaluation samples of {policy_name}: {cfg.sampling.n} per (prompt_id, "
                                       f"language), temperature {cfg.sampling.temperature}.")
    atomic_write_text(key_file(out_dir), key)  # the shards' settings, should this run be interrupted
    done = {i for i in range(len(shards)) if writer.has_shard(i)}
    with GenerationGroup(policy_path, cfg.policy, cfg.engines) as group, \
            progress_bar("eval generate", prompts.num_rows, "rows") as update:
        group.run(shards, cfg.sampling, EVAL_ITERATION, policy_name, writer.write_shard, skip=done, progress=update)
    writer.finalize(expected_shards=len(shards))
    key_file(out_dir).unlink(missing_ok=True)  # the manifest holds it now
    return read_dataset(out_dir, "samples")


def score_rows(cfg: RunConfig, roles: dict, specs: list, reward_model: str | None, rows: pa.Table, label: str,
               shard_rows: int | None = None) -> pa.Table:
    """One scoring pass over `rows` on the recipe's scoring actors; returns them with the specs' columns."""
    from rayalign.actors.pool import split_shards
    from rayalign.actors.scorer import ScoringGroup

    return ScoringGroup.for_recipe(roles, cfg.rewards).collect(
        split_shards(rows, shard_rows or cfg.engines.shard_rows * cfg.sampling.n), specs, reward_model, label=label)


# ---- evaluation ----

def eval_setup(cfg: RunConfig, policy_path: str, policy_name: str, *, prompts_limit: int | None = None,
               samples: int | None = None, candidates_path: str | None = None, silhouette_prompts: int | None = None,
               likelihood: str = "sum", accuracy: str = "likelihood", judge=None,
               hub_layer: int | None = None, say=console.print) -> tuple[RunConfig, dict, str]:
    """Check an evaluation's inputs (before anything is generated); returns the evaluation's config, its settings
    and the key its outputs are kept under. `say` prints its notes."""
    from rayalign.data.prompts import load_candidate_sets, load_prompts

    cfg = dataclasses.replace(
        cfg, prompts=dataclasses.replace(cfg.prompts, limit=prompts_limit or cfg.prompts.limit),
        sampling=dataclasses.replace(cfg.sampling, n=samples or cfg.sampling.n))
    lat = cfg.rewards.latent
    silhouette_prompts = lat.hub_scan_prompts if silhouette_prompts is None else silhouette_prompts
    shipped = ConsistencyRewardConfig().candidates_path  # the repository's example set, relative to its root
    c = cfg.rewards.consistency
    if not candidates_path and not c.enabled and c.candidates_path == shipped and not Path(shipped).is_dir():
        say(f"eval: no candidate set at {shipped} (the default, relative to the current directory): "
            "RankC and accuracy skipped; pass --candidates DIR to compute them")
    else:
        candidates_path = candidates_path or c.candidates_path
    build_dataclass(EvalConfig, {"likelihood": likelihood, "accuracy": accuracy}, "eval.")  # the choices' one home
    if lat.enabled and cfg.sampling.n < 2:
        raise ConfigError(f"eval: latent rewards need at least 2 samples per prompt, got {cfg.sampling.n}")
    if lat.enabled and lat.hub_layer == "auto" and hub_layer is None and silhouette_prompts < 2:
        raise ConfigError("eval: rewards.latent.hub_layer is auto and the run has no hub scan, so the evaluation "
                          "scans itself: it needs silhouette prompts >= 2")
    if lat.enabled and (lat.hub_layer != "auto" or hub_layer is not None):
        latent_layers(cfg, policy_path, hub_layer)  # refuses layers beyond the model's
    candidates = load_candidate_sets(candidates_path, cfg.languages) if candidates_path else None
    if judge is not None:
        prompts = load_prompts(cfg.prompts.path, cfg.languages, **cfg.prompts.load_kwargs())
        missing = [r["prompt_id"] for r in prompts.select(["prompt_id", "reference"]).to_pylist() if not r["reference"]]
        if missing:
            raise ConfigError(f"eval: the judge compares with reference answers, but {len(missing)} prompt row(s) of "
                              f"{cfg.prompts.path} have none (e.g. {missing[0]}); give them an output/reference field")
        judge.check_reachable()
    settings = {"candidates_path": candidates_path, "likelihood": likelihood, "accuracy": accuracy,
                "silhouette_prompts": silhouette_prompts,
                "hub_layer": hub_layer, "judge": judge and [judge.url, judge.model]}
    rows = None if candidates is None else hashlib.sha256(  # an edited candidate set is evaluated again
        json.dumps(candidates.to_pylist(), sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return cfg, settings, eval_key(cfg, policy_path, policy_name, {**settings, "candidate_rows": rows})


def evaluation_kept(out_dir: Path, key: str) -> bool:
    return dataset_complete(out_dir / "results") and read_manifest(out_dir / "results")["params"].get("eval_key") == key


def evaluate_policy(cfg: RunConfig, policy_path: str, out_dir: str | Path, *, policy_name: str | None = None,
                    judge=None, **settings) -> pa.Table:
    """Evaluate one checkpoint; returns (and writes to `out_dir`/results) the `eval` table. Ray must be connected.

    Language fidelity and response length per language; statistics of the recipe's rewards (`hub_layer`: the
    run's scanned layer when the recipe says auto); the silhouette of pooled states at every layer on
    `silhouette_prompts` prompts (default rewards.latent.hub_scan_prompts; 0 = none); RankC and accuracy on a
    parallel candidate set (`candidates_path`, default rewards.consistency.candidates_path; `likelihood` sum, mean
    per candidate token or sequence_mean as the RankC code; `accuracy` by that likelihood or by the continuation
    without the end-of-turn token, as the DCO paper); the judge's win rate against reference answers (`judge`: a JudgeSettings). Other
    settings: `prompts_limit`, `samples` (see `eval_setup`). The samples and the results are kept on a rerun with
    the same settings and checkpoint (outputs made otherwise are moved aside); scores are recomputed.
    """
    out_dir = Path(out_dir)
    policy_name = policy_name or policy_path
    cfg, settings, key = eval_setup(cfg, policy_path, policy_name, judge=judge, **settings)
    if kept(out_dir / "results", key):
        console.print(f"eval {policy_name}: finished earlier, kept ({out_dir / 'results'})")
        return read_dataset(out_dir / "results", "eval")
    silhouette_prompts, candidates_path, hub_layer = (settings[k] for k in ("silhouette_prompts", "candidates_path",
                                                                            "hub_layer"))
    scan_self = cfg.rewards.latent.enabled and cfg.rewards.latent.hub_layer == "auto" and hub_layer is None

    from rayalign.eval.confusion import confusion_rows

    table = eval_samples(cfg, policy_path, policy_name, out_dir / "samples")
    langs = table.column("lang").to_pylist()
    rows = metrics.fidelity_rows(langs, table.column("lang_detected").to_pylist())
    rows += confusion_rows(langs, table.column("response").to_pylist())
    rows += [r for r in metrics.distribution_rows("response_tokens", table.column("num_tokens").to_pylist(), langs)
             if r["stat"] == "mean"]
    if silhouette_prompts >= 2 and len(set(table.column("prompt_id").to_pylist())) >= 2:
        scan = hub_scan(cfg, policy_path, policy_name, table, silhouette_prompts)
        rows += [metrics.row("silhouette", "score", "all", v, scan["prompts"], layer=int(k))
                 for k, v in scan["silhouette"].items()]
        rows += [metrics.row("silhouette", "score", cfg.anchor_language, v, scan["prompts"], other_lang=other,
                             layer=int(k)) for other, by_layer in scan["silhouette_pairs"].items()
                 for k, v in by_layer.items()]
        hub_layer = scan["hub_layer"] if scan_self else hub_layer
    elif silhouette_prompts:
        console.print("eval: the silhouette needs at least 2 prompts; skipped")

    roles, specs, reward_model, layers = scoring_setup(cfg, policy_path, hub_layer)
    from rayalign.actors.pool import split_shards
    from rayalign.actors.scorer import ScoringGroup
    from rayalign.anchor_groups import anchor_rows_before_scoring, drop_prompts_without_anchor, dropped_message
    from rayalign.scoring.finish import stage_centroids
    from rayalign.scoring.translation import with_translations

    # as the score stage: ICR's cross-lingual and translation prompts are made from the anchor prompt
    anchor, before = cfg.anchor_language, anchor_rows_before_scoring(cfg)
    kept_rows, dropped = drop_prompts_without_anchor(table, anchor, before)
    if dropped:
        console.print("[yellow]" + dropped_message("eval score", dropped, table.num_rows - kept_rows.num_rows, anchor,
                                                   before))
    inputs = with_translations(cfg, with_scoring_prompts(cfg, kept_rows), policy_path, EVAL_ITERATION)
    with ScoringGroup.for_recipe(roles, cfg.rewards) as group, \
            progress_bar("eval score", inputs.num_rows, "samples") as update:
        scored = group.gather(split_shards(inputs, cfg.engines.shard_rows * cfg.sampling.n), specs, reward_model,
                              progress=update)
        centroids = stage_centroids(cfg, group, layers)  # as the score stage: rewards.latent.centroid_texts
    scored, params = forward_rewards(cfg, scored, centroids)
    params["layers"] = layers
    if (out_dir / "scores").exists():  # recomputed on every evaluation that is not kept
        set_aside(out_dir / "scores", "scores of an earlier evaluation")
    write_table(scored.drop_columns([c for c in ("h_hub", "h_last") if c in scored.column_names]), out_dir / "scores",
                "scores", cfg, EVAL_ITERATION, {n: role.path for n, role in roles.items()}, params,
                f"Evaluation scores of {policy_name}.", shard_rows=max(1, scored.num_rows))
    for column in (c for c in REWARD_COLUMNS if c.startswith("r_")):
        if scored.column(column).null_count < scored.num_rows:
            rows += metrics.distribution_rows(column, scored.column(column).to_pylist(),
                                              scored.column("lang").to_pylist())
    if candidates_path:
        rows += candidate_metrics(cfg, policy_path, candidates_path, settings["likelihood"], settings["accuracy"])
    if judge is not None:
        rows += judge_metrics(table, judge)

    writer = DatasetWriter(out_dir / "results", "eval", config_hash=cfg.config_hash(), languages=cfg.languages,
                           models={"policy": policy_name}, description=f"Evaluation of {policy_name}.",
                           params={"eval_key": key, "prompts_limit": cfg.prompts.limit, "samples": cfg.sampling.n,
                                   **settings, "hub_layer": layers.get("h_hub")})
    writer.write_shard(0, pa.Table.from_pylist([{"policy": policy_name, **r} for r in rows]))
    writer.finalize(expected_shards=1)
    return read_dataset(out_dir / "results", "eval")


def candidate_metrics(cfg: RunConfig, policy_path: str, candidates_path: str, likelihood: str,
                      accuracy: str = "likelihood") -> list[dict]:
    """The policy's log-likelihood of every candidate answer in every language -> accuracy and RankC rows."""
    import polars as pl

    from rayalign.actors.scorer import ModelRole
    from rayalign.data.prompts import load_candidate_sets
    from rayalign.scoring.forward import ForwardSpec

    cands = load_candidate_sets(candidates_path, cfg.languages).rename_columns(
        ["prompt_id", "lang", "messages", "candidate_idx", "response", "gold"])
    spec = ForwardSpec("policy", "messages", "logp", tokens_column="num_tokens", likelihood_parts=True)
    scored = score_rows(cfg, {"policy": ModelRole(policy_path, cfg.policy)}, [spec], None, cands,
                        "eval candidates", shard_rows=256)
    return metrics.candidate_rows(pl.from_arrow(scored.drop_columns(["messages", "response"])), cfg.languages,
                                  cfg.anchor_language, likelihood, accuracy)


def judge_metrics(samples: pa.Table, judge) -> list[dict]:
    """The judge's win rate of each prompt's first sample against the prompt's reference answer."""
    import types

    import pyarrow.compute as pc

    from rayalign.eval.judge import judge_items, win_rates

    first = samples.filter(pc.equal(samples.column("sample_idx"), 0)).to_pylist()
    items = [{"prompt_id": r["prompt_id"], "lang": r["lang"], "prompt": r["messages"][-1]["content"],
              "response": r["response"], "reference": r["reference"]} for r in first]
    started = time.perf_counter()
    with progress_bar("eval judge", len(items), "items") as update:
        judged = judge_items(items, judge, progress=lambda done, total: update(types.SimpleNamespace(
            rows_in=done, rows_out=done, seconds=time.perf_counter() - started)))
    rates = win_rates(judged)
    rows = [metrics.row("judge_win_rate", "share", lang, value, count)
            for lang, (value, count) in rates.items() if lang not in ("all", "invalid") and count]
    if rows:  # as every metric's "all": the mean of the languages, so every language weighs the same
        rows.append(metrics.row("judge_win_rate", "share", "all", float(np.mean([r["value"] for r in rows])),
                                rates["all"][1]))
    share, invalid = rates["invalid"]
    return rows + [metrics.row("judge_invalid", "share", "all", share, invalid)]  # items with no valid verdict


def print_summary(result: pa.Table, languages: list[str], anchor: str) -> None:
    """Per-language table of the headline metrics, then the silhouette by layer."""
    from rich.table import Table

    rows = result.to_pylist()
    value = {(r["metric"], r["stat"], r["lang"], r["other_lang"]): r["value"] for r in rows}
    rewards = sorted({r["metric"] for r in rows if r["metric"].startswith("r_")})
    columns = [("fidelity", "share", None), ("lpr", "share", None), ("wpr", "share", None), ("lcpr", "share", None),
               ("response_tokens", "mean", None)]
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
    narrow = console.width  # whole numbers and names also where the terminal (or a pipe) is narrower
    console.width = max(narrow, 12 + 12 * len(present))
    try:
        console.print(table)
    finally:
        console.width = narrow
    silhouette = sorted((r["layer"], r["value"]) for r in rows if r["metric"] == "silhouette" and r["lang"] == "all")
    if silhouette:
        best = max(silhouette, key=lambda lv: lv[1])
        console.print("silhouette by layer: " + "  ".join(f"{layer}:{v:+.3f}" for layer, v in silhouette)
                      + f"  (max at layer {best[0]})")
