"""A run directory: its config and state, the metrics log, verified resume of finished outputs, and redo.

<run-dir>/state.json lists finished stages and the checksums of what they wrote; nothing on disk is kept on
resume unless it matches them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from rayalign.config import ConfigError, RunConfig, save_config
from rayalign.config.run import absolute_paths, resolved_dict
from rayalign.config.sections import is_tiny_model
from rayalign.data.store import (DatasetError, DatasetWriter, atomic_write_text, checksum_path, directory_checksums,
                                  directory_problems, enclosing_dataset, is_dataset_dir, read_manifest,
                                  remove_untrusted_shards, shard_name, shard_problem, trash_dir, write_parquet_atomic)
from rayalign.progress import console

STAGES = ("generate", "score", "pairs", "train")
ERRORS_BY_SHARD = "errors.by-shard"  # iter-<t>/errors.by-shard/<stage>-<shard>.parquet, gathered into iter-<t>/errors/


class RunConfigChanged(ConfigError):
    """The run directory holds results of another config."""


def check_run_dir_config(cfg: RunConfig, run_dir: Path, redo: tuple[str, ...] = ()) -> dict | None:
    """The run state in `run_dir` (None for a new run); a run of another config is refused unless `redo` names
    stages. Cheap and read-only: made before models are built."""
    dataset = enclosing_dataset(run_dir) or (run_dir if is_dataset_dir(run_dir) else None)
    if dataset is not None:
        raise ConfigError(f"{run_dir}: the run directory would lie in the dataset {dataset}; datasets.load_dataset "
                          "would read the run as part of it: choose a run name or --run-dir outside datasets")
    state = read_state(run_dir)
    if state is None and run_dir.is_dir():  # iter-<t>: a stage command may start from a dataset put there by hand
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in BEFORE_STATE
                         and not re.fullmatch(r"config\.[0-9a-f]+\.yaml|.*\.tmp|iter-\d+", p.name))
        if foreign:
            raise ConfigError(f"{run_dir}: not empty ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}) "
                              "and not a run (no state.json): a run writes only into a new or empty directory, or "
                              "its own; choose another --run-dir")
    cfg = as_recorded(cfg, run_dir)
    if state is not None and not cfg.matches(state["config_hash"]) and not redo and holds_results(state):
        online_run = any(str(s).startswith("online/") for s in state["finished"])
        remedy = ("use another --run-dir" if cfg.mode == "online" or online_run else
                  f"run `rayalign launch RECIPE --redo STAGE[,STAGE...]` ({', '.join(STAGES)}) to recompute those "
                  "stages and every later one with this recipe (earlier ones are kept), use another --run-dir")
        raise RunConfigChanged(f"{run_dir}: holds {'an online' if online_run else 'a'} run with another config (hash "
                               f"{state['config_hash']}, this recipe {cfg.config_hash()}{changed_keys(run_dir, cfg)}); "
                               f"{remedy}, or delete the directory to start over")
    return state


AUTO_COUNTS = (("engines", "count"), ("rewards", "actors"), ("training", "world_size"))
BEFORE_STATE = {"plan.json", "run.lock", "launch.log", "error.log", "config.yaml"}  # may precede state.json


def as_recorded(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """`cfg` with its `auto` counts as the run in `run_dir` resolved them (its config.yaml), so that a relaunch of
    the same recipe matches the run; unchanged where the run recorded none. A resolution that then differs on this
    cluster is a config change like any other."""
    auto = [(section, key) for section, key in AUTO_COUNTS if getattr(getattr(cfg, section), key) == "auto"]
    if not auto:
        return cfg
    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        recorded = {(section, key): recorded[section][key]
                    for section, key in auto + [("training", "gradient_accumulation")]}
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return cfg
    for section, key in auto:
        if isinstance(recorded[section, key], int):
            fields = {key: recorded[section, key]}
            if key == "world_size" and cfg.training.global_batch_size:  # the accumulation was derived with it
                fields["gradient_accumulation"] = recorded["training", "gradient_accumulation"]
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})
    return cfg


def changed_keys(run_dir: Path, cfg: RunConfig, most: int = 6) -> str:
    """", changed: key (was -> now), ..." between the run's config.yaml and `cfg`; empty when unreadable."""
    def flat(data, prefix=""):
        if isinstance(data, dict):
            return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: data}

    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        absolute_paths(old)  # runs recorded before paths were saved absolute
        old = flat(old)
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return ""
    new = flat(resolved_dict(cfg))
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys[:most])
    return f"; changed: {shown}{', ...' if len(keys) > most else ''}" if keys else ""


def prompt_digest(prompts) -> str:
    """A digest of the prompt rows a run generates from (ids, languages and chat messages, in order)."""
    sha = hashlib.sha256()
    for column in ("prompt_id", "lang", "messages"):
        sha.update(json.dumps(prompts.column(column).to_pylist(), ensure_ascii=False, sort_keys=True).encode())
    return sha.hexdigest()[:16]


def check_prompts_unchanged(cfg: RunConfig, state: dict | None, prompts, redo: tuple[str, ...] = ()) -> str:
    """The digest of `prompts`; refuses a resume whose kept samples, finished or partial, came from other prompt
    rows (the files edited since the run started), unless generate is redone or nothing is kept (another config
    that finished nothing: prepare_run_dir sets its partial outputs aside). Read-only: the caller records it."""
    digest = prompt_digest(prompts)
    recorded = (state or {}).get("prompts_digest")
    kept = state is not None and (cfg.matches(state["config_hash"]) or holds_results(state))
    if recorded not in (None, digest) and kept and "generate" not in redo:
        raise ConfigError(f"prompts.path: {cfg.prompts.path}: the prompt rows differ from those this run started "
                          f"with (digest {recorded}, now {digest}), and its kept samples came from those; restore the "
                          "prompt files, or relaunch with --redo generate to generate again from these (use another "
                          "--run-dir for an online run)")
    return digest


def input_files(cfg: RunConfig) -> dict[str, str]:
    """{recipe key: path} of the files, besides prompts, whose content decides the scores: the user reward code and
    the centroid texts."""
    files = {"rewards.user.path": cfg.rewards.user.path} if cfg.rewards.user.path else {}
    if cfg.rewards.latent.enabled:
        files |= {f"rewards.latent.centroid_texts.{lang}": path
                  for lang, path in (cfg.rewards.latent.centroid_texts or {}).items()}
    return files


def model_fingerprint(path: str) -> str | None:
    """A digest of a local model directory: every file's name and size, files up to 8 MiB whole and larger ones
    (weights) at 16 evenly spaced 64 KiB blocks, so a checkpoint replaced in place is told apart without reading
    gigabytes. A hub id's is its cached snapshot's commit; None for the builtin tiny model or a model not found."""
    if is_tiny_model(path):
        return None
    local = Path(path).expanduser()
    if not local.is_dir():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(path, "config.json")
        except ValueError:  # not a hub id either (a local path not found): check_sources names it
            return None
        return Path(cached).parent.name if isinstance(cached, str) else None
    sha = hashlib.sha256()
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        size = f.stat().st_size
        sha.update(f"{f.relative_to(local)}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 8 << 20:
                sha.update(fh.read())
                continue
            for k in range(16):
                fh.seek((size - (64 << 10)) * k // 15)
                sha.update(fh.read(64 << 10))
    return sha.hexdigest()[:16]


def check_inputs_unchanged(cfg: RunConfig, state: dict | None, redo: tuple[str, ...] = ()) -> dict[str, str]:
    """{recipe key: digest} of `input_files` (sha256) and of every model the recipe loads (`model_fingerprint`,
    keyed <section>.path); refuses a resume whose kept outputs came from other contents (the config hash names the
    paths only), unless the stage that used them is redone. Read-only: prepare_run_dir records them."""
    files = input_files(cfg)
    models = {f"{key}.path": model.path for key, model in cfg.models()}
    digests = {key: hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] for key, path in files.items()
               if Path(path).is_file()}
    digests |= {key: fp for key, path in models.items() if (fp := model_fingerprint(path))}
    recorded = (state or {}).get("input_digests", {})
    partial = state is not None and (cfg.matches(state["config_hash"]) or holds_results(state))  # shards written
    scored = state is not None and (any(f.endswith("/score") for f in state["finished"])
                                    or bool(state.get("online_checkpoint")))
    for key, digest in digests.items():  # models: every shard they wrote; files: used as a score stage ends
        used_by = "generate" if key == "policy.path" else "score"
        if recorded.get(key) in (None, digest) or not (partial if key in models else scored) \
                or set(STAGES[:STAGES.index(used_by) + 1]) & set(redo):
            continue
        what = "model's files differ from those" if key in models else "content differs from the one"
        kept_data = "samples" if used_by == "generate" else "scores"
        raise ConfigError(f"{key}: {files.get(key) or models[key]}: its {what} this run started with (digest "
                          f"{recorded[key]}, now {digest}), and its kept {kept_data} came from that; restore it, or "
                          f"relaunch with --redo {used_by} to {used_by} again with it (use another --run-dir for an "
                          "online run)")
    return digests


def holds_results(state: dict) -> bool:
    """Whether a run state records a finished stage or step (a launch refused or failed before any holds none)."""
    return bool(state["finished"] or state.get("online_checkpoint"))


def prepare_run_dir(cfg: RunConfig, run_dir: Path, redo: tuple[str, ...] = (),
                    prompts_digest: str | None = None, input_digests: dict | None = None) -> dict:
    """Create the run directory or reopen it for resume.

    A directory that holds another config is refused unless `redo` names stages to recompute: those
    stages and every later one are moved to <run-dir>/trash-<time>/ (see `redo_stages`), the old
    config is kept as config.<old hash>.yaml and the state takes the new hash.
    """

    state = check_run_dir_config(cfg, run_dir, redo)
    if state is not None:
        old_hash, new_hash = state["config_hash"], cfg.config_hash()
        if old_hash != new_hash and cfg.matches(old_hash):  # recorded with the paths as spelled: the same config
            old_hash = state["config_hash"] = new_hash
        if old_hash != new_hash and not redo:  # nothing finished under the other config: its partial outputs go
            redo = ("generate",) if cfg.mode == "offline" else ()
            if (run_dir / "online").exists():
                trash = trash_dir(run_dir)
                trash.mkdir(parents=True, exist_ok=True)
                shutil.move(run_dir / "online", trash / "online")
        if old_hash != new_hash and (run_dir / "config.yaml").is_file():  # kept before anything moves
            shutil.copyfile(run_dir / "config.yaml", run_dir / f"config.{old_hash}.yaml")
        if redo:
            redo_stages(cfg, run_dir, state, redo, config_changed=old_hash != new_hash)
        state["config_hash"] = new_hash
        console.print(f"[bold]resuming[/] {run_dir} (finished: {', '.join(state['finished']) or 'nothing yet'})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        state = {"config_hash": cfg.config_hash(), "finished": []}
    if prompts_digest:  # check_prompts_unchanged's, for the next resume
        state["prompts_digest"] = prompts_digest
    if input_digests:  # check_inputs_unchanged's
        state["input_digests"] = input_digests
    save_config(cfg, run_dir / "config.yaml")
    write_state(run_dir, state)
    return state


def recipe_stages(cfg: RunConfig) -> tuple[str, ...]:
    """The stages an iteration of this recipe runs, in order."""
    r, stages = cfg.rewards, STAGES
    if not (r.latent.enabled or r.implicit.enabled or r.reward_model.enabled or r.user.path):
        stages = tuple(st for st in stages if st != "score")  # LIDR needs no scores; DCO scores its candidates
    if cfg.pairs.method is None:
        stages = tuple(st for st in stages if st != "pairs")
    if cfg.training.loss is None:
        stages = tuple(st for st in stages if st != "train")
    if cfg.pairs.method == "dco":  # DCO learns from parallel candidate sets, not from samples
        stages = tuple(st for st in stages if st in ("pairs", "train"))
    return stages


STAGE_OUTPUTS = {  # what a stage leaves in iter-<t>/ (globs); "errors" is rebuilt by the next generate/score
    "generate": ("samples", "errors", f"{ERRORS_BY_SHARD}/generate-*"),
    "score": ("scores", "scores.forward", "errors", f"{ERRORS_BY_SHARD}/score-*", f"{ERRORS_BY_SHARD}/translate-*"),
    "pairs": ("pairs", "candidate_scores"),
    "train": ("policy", "train.ckpt", "train_log.jsonl"),
}


def is_stage_output(path: Path) -> bool:
    """Whether `path` is where a run's stage writes (<run>/iter-<t>/samples, scores, pairs, ...)."""
    path = path.absolute()
    names = {glob.split("/")[0] for outputs in STAGE_OUTPUTS.values() for glob in outputs}
    return path.name in names and re.fullmatch(r"iter-\d+", path.parent.name) is not None and \
        (path.parent.parent / "state.json").is_file()


def stage_output(stage: str) -> str:
    """The directory in iter-<t>/ that holds a stage's result: samples, scores, pairs or policy."""
    return STAGE_OUTPUTS[stage][0]


def record_checksums(run_dir: Path, state: dict, out_dir: Path) -> None:
    """The checksums of a saved policy's files, kept in the run state for `kept_output_problems`."""
    state.setdefault("checksums", {})[str(out_dir.relative_to(run_dir))] = directory_checksums(out_dir)


def redo_stages(cfg: RunConfig, run_dir: Path, state: dict, redo: tuple[str, ...], config_changed: bool) -> None:
    """Move the outputs of the `redo` stages and every later stage to <run-dir>/trash-<time>/ and forget them.

    Iteration t+1 generates with policy t, so every stage of iterations after the first is redone too. When
    the config changed, unfinished stages' partial outputs (made with the old config) go as well.
    """
    first = min(STAGES.index(stage) for stage in redo)
    trash = trash_dir(run_dir)
    moved, forgotten = [], set()
    for it_dir in sorted(run_dir.glob("iter-*"), key=lambda d: int(d.name.split("-")[1])):
        iteration = int(it_dir.name.split("-")[1])
        for index, stage in enumerate(STAGES):
            name = f"{it_dir.name}/{stage}"
            if index < first and iteration == 1 and (name in state["finished"] or not config_changed):
                continue
            forgotten |= {name, f"{it_dir.name}/summary"}
            for pattern in STAGE_OUTPUTS[stage]:
                for path in sorted(it_dir.glob(pattern)):
                    target = trash / path.relative_to(run_dir)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(path, target)
                    moved.append(str(path.relative_to(run_dir)))
    if first <= STAGES.index("score"):  # the hub scan (hub_layer: auto) reads iteration 1's samples before scoring
        forgotten.add("hub-scan")
        if (run_dir / "hub-scan.json").is_file():
            trash.mkdir(parents=True, exist_ok=True)
            shutil.move(run_dir / "hub-scan.json", trash / "hub-scan.json")
            moved.append("hub-scan.json")
    state["finished"] = [name for name in state["finished"] if name not in forgotten]
    log_metrics(run_dir, {"stage": "redo", "redo": list(redo), "config_hash": cfg.config_hash(),
                          "moved": moved, "trash": str(trash)})
    console.print(f"redo {', '.join(redo)}: moved {len(moved)} output(s) to {trash}")


def write_state(run_dir: Path, state: dict) -> None:
    atomic_write_text(run_dir / "state.json", json.dumps(state, indent=2))


def log_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_checkpoints(directory: Path, count: int) -> dict:
    """Forward-result shards finished by an earlier, interrupted run: complete files that match the checksum
    recorded when they were written (others are removed and computed again)."""


    for stale in directory.glob("*.tmp"):
        stale.unlink()
    results, rejected = {}, []
    for i in range(count):
        shard = directory / shard_name(i)
        if not shard.is_file():
            continue
        problem = shard_problem(shard)
        if problem:
            rejected.append(f"{shard}: {problem}")
            shard.unlink()
            checksum_path(shard).unlink(missing_ok=True)
        else:
            results[i] = pq.read_table(shard)
    report_untrusted(rejected)
    return results


def report_untrusted(problems: list[str]) -> None:
    """Say which kept files failed their check and are computed again."""
    for problem in problems:
        console.print(f"[yellow]not kept[/]: {problem}; computing it again")


def checkpoint(directory: Path, results: dict):
    """An on_shard callback that keeps a shard's table and writes it under a temporary name, then renames it."""

    directory.mkdir(parents=True, exist_ok=True)

    def on_shard(index, table):
        write_parquet_atomic(table, directory / shard_name(index), checksum=True)
        results[index] = table

    return on_shard


def samples_writer(cfg: RunConfig, out_dir: Path, policy_name: str, iteration: int) -> DatasetWriter:
    """The writer of an iteration's self-play samples (whichever schedule generates them)."""
    return DatasetWriter(
        out_dir, "samples", config_hash=cfg.config_hash(), languages=cfg.languages,
        models={"policy": policy_name}, seeds={"run_seed": cfg.sampling.seed, "iteration": iteration},
        description=f"Self-play samples: {cfg.sampling.n} per (prompt_id, language), temperature "
                    f"{cfg.sampling.temperature}, top_p {cfg.sampling.top_p}, iteration {iteration}.")


def write_table(table, out_dir: Path, schema: str, cfg: RunConfig, iteration: int, models: dict, params: dict,
                description: str, shard_rows: int, latent_dim: int = 0) -> dict:
    """Write a whole table as a dataset (shards of `shard_rows` rows, then card and manifest)."""
    from rayalign.actors.pool import split_shards

    writer = DatasetWriter(out_dir, schema, config_hash=cfg.config_hash(), languages=cfg.languages, models=models,
                           seeds={"run_seed": cfg.sampling.seed, "iteration": iteration}, description=description,
                           schema_params={"latent_dim": latent_dim} if schema == "scores" else None, params=params)
    shards = split_shards(table, max(1, shard_rows)) or [table.slice(0, 0)]  # an empty dataset keeps one empty shard:
    # without a part-*.parquet file, datasets.load_dataset(dir) would serve manifest.json as a row
    for i, shard in enumerate(shards):
        writer.write_shard(i, shard)
    return writer.finalize(expected_shards=len(shards))


def remove_older_tags(ckpt_dir: Path, tag: str) -> None:
    """Remove the checkpoint tags in `ckpt_dir` other than `tag` (never loaded again); called once state.json
    records `tag`, so that a run stopped in between still finds the checkpoint it recorded before."""
    for old in ckpt_dir.iterdir():
        if old.is_dir() and old.name != tag:
            shutil.rmtree(old)


def set_aside_untrusted_checkpoint(ckpt_dir: Path, record: dict | None, checkpoint_every: int, run_dir: Path) -> None:
    """Leave in `ckpt_dir` only a checkpoint that this run wrote and recorded, unchanged, named by `latest`; anything
    else (checkpointing off, no record, changed files) is moved to the run's trash, and training starts over. A later
    save that was not recorded (the run stopped between DeepSpeed's save and the record) goes to the trash, and
    training resumes from the recorded one."""

    if not ckpt_dir.exists():
        return
    trash = trash_dir(run_dir) / ckpt_dir.relative_to(run_dir)
    if not checkpoint_every:
        why = ["training.checkpoint_every is 0 (checkpointing is off)"]
    elif record is None:
        why = ["no checkpoint was recorded in state.json by this run"]
    else:
        why = directory_problems(ckpt_dir / record["tag"], record["files"])
        if not why:
            latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
            for name in (p.name for p in ckpt_dir.iterdir() if p.name not in ("latest", record["tag"])):
                if name == latest:  # saved after the recorded one, never recorded: not loaded, kept aside
                    trash.mkdir(parents=True, exist_ok=True)
                    shutil.move(ckpt_dir / name, trash / name)
                    console.print(f"[yellow]{ckpt_dir / name}: saved but not recorded[/] (the run stopped between "
                                  f"the two); moved to {trash}; resuming from the recorded {record['tag']}")
                else:  # older tags: never loaded, no longer needed
                    shutil.rmtree(ckpt_dir / name) if (ckpt_dir / name).is_dir() else (ckpt_dir / name).unlink()
            if latest != record["tag"]:
                atomic_write_text(ckpt_dir / "latest", record["tag"])
            return
    trash.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(ckpt_dir, trash)
    console.print(f"[yellow]{ckpt_dir}: not loaded[/] ({'; '.join(why)}); moved to {trash}; training starts from "
                  "step 0")


def dataset_complete(dataset_dir: Path) -> bool:
    """A dataset with a readable manifest, or a saved policy checkpoint."""
    if (dataset_dir / "config.json").is_file():  # a policy checkpoint, renamed into place when complete
        return True
    try:
        read_manifest(dataset_dir)
        return True
    except DatasetError:
        return False


def kept_output_problems(run_dir: Path, state: dict, out_dir: Path) -> list[str]:
    """Why a finished stage's output cannot be kept: a dataset whose manifest or shards fail their recorded
    checksums (untrusted shards are removed, so the stage recomputes only those when it can), or a policy whose
    files differ from the checksums recorded when it was saved, or that has none recorded. Empty when intact."""
    if out_dir.name != "policy":
        return remove_untrusted_shards(out_dir)
    recorded = state.get("checksums", {}).get(str(out_dir.relative_to(run_dir)))
    if not (out_dir / "config.json").is_file():
        return [f"{out_dir}: missing"]
    if recorded is None:
        return [f"{out_dir}: no checksums recorded for it in {run_dir / 'state.json'}, so it cannot be verified"]
    return directory_problems(out_dir, recorded)


SUMMARY_KEYS = {"generate": ("fidelity_",), "pairs": ("rows",), "train": (
    "loss_first", "loss_mean", "reward_margin_mean", "accuracy_mean", "dropped_too_long", "steps")}


def iteration_summary(run_dir: Path, iteration: int) -> dict:
    """One iteration's headline metrics and phase timings, from the last record of each of its stages in
    metrics.jsonl (a stage redone, say for other languages, leaves nothing of its earlier record)."""
    from rayalign.data.inspect import read_metrics  # polars: not needed by the actors that import this module

    last = {r["stage"]: r for r in read_metrics(run_dir) if r.get("iteration") == iteration
            and r.get("stage") not in (None, "iteration")}
    out = {}
    for stage, record in last.items():
        out[f"seconds_{stage}"] = record.get("wall_seconds")
        for key, value in record.items():
            if any(key.startswith(prefix) for prefix in SUMMARY_KEYS.get(stage, ())):
                out[f"pairs_{key}" if stage == "pairs" else key] = value
    return out


def read_state(run_dir: Path) -> dict | None:
    """The run state in `run_dir`, None when there is none; a damaged one is refused naming the file and what to
    do (rayalign replaces state.json atomically, so a damaged one was changed outside a run)."""
    path = Path(run_dir) / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        problem = None
    except (OSError, UnicodeDecodeError) as e:
        state, problem = None, f"cannot be read ({e})"
    except ValueError as e:
        state, problem = None, f"is not valid JSON ({e}; truncated or edited?)"
    if problem is None:
        if not isinstance(state, dict):
            problem = f"holds a JSON {type(state).__name__}, not an object"
        elif not isinstance(state.get("config_hash"), str):
            problem = "has no config_hash"
        elif not (isinstance(state.get("finished"), list) and all(isinstance(s, str) for s in state["finished"])):
            problem = "has no list of finished stages"
    if problem:
        raise ConfigError(
            f"{path}: {problem}. rayalign replaces this file whole, so it was damaged outside a run. Restore it "
            f"from a backup, or move it aside and launch again: every stage then runs again, keeping the shards "
            f"whose checksum files match; training checkpoints and saved policies are recomputed, since their "
            f"checksums were recorded in this file")
    return state
