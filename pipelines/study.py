"""Studies: a grid of offline runs over one recipe, run and collected into one Arrow results table.

A study file names a base recipe, overrides for every run and a grid of axes (examples/study-quickstart.yaml).
Every point of the grid is one run in <runs_dir>/<name>/<slug>/. Read top to bottom: the study file, the grid,
running (in this process one after another, or side by side as `rayalign launch` subprocesses on one Ray
cluster), then collecting every run's iteration metrics and evaluation into results.parquet.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from rayalign.config import ConfigError
from rayalign.config.study import Study, StudyError, StudyRun, expand, load_study  # noqa: F401
from rayalign.data.store import atomic_write_text, write_parquet_atomic
from rayalign.run_dir import as_recorded

console = Console(stderr=True)
# ---- the study file ----

# ---- the grid ----

# ---- running ----

def run_finished(run: StudyRun) -> bool:
    """state.json holds this config and lists the summary of the last iteration."""
    try:
        state = json.loads((run.run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return (as_recorded(run.cfg, run.run_dir).matches(state.get("config_hash"))
            and f"iter-{run.cfg.iterations}/summary" in state.get("finished", []))


def eval_finished(study: Study, run: StudyRun) -> bool:
    """The run's final policy was evaluated with the study's current eval settings."""
    from rayalign.pipelines.evaluate import eval_setup, evaluation_kept
    from rayalign.scoring.hub_scan import run_hub_layer

    policy, name = final_policy(run)
    _, _, key = eval_setup(run.cfg, policy, name, hub_layer=run_hub_layer(run.cfg, run.run_dir), **study.eval)
    return evaluation_kept(run.run_dir / "eval" / "final", key)


def run_study(path: str | Path, *, cluster: str = "local", address: str | None = None, parallel: int | None = None,
              runs_dir: str | Path | None = None, progress: Callable[[str], Any] | None = None) -> Path:
    """Run every run of a study that has not finished, evaluate it (with an eval section), collect the results.

    parallel 1 runs in this process one after another; parallel > 1 starts or joins Ray here and runs up to that
    many `rayalign launch` subprocesses on it, each logging to <run_dir>/launch.log. Finished runs are kept,
    interrupted ones resume. Failed runs are recorded in study.json and the others go on; StudyError names them
    at the end. Returns the study directory.
    """
    from rayalign.cluster import ClusterError, connect, load_cluster_spec
    from rayalign.cluster.planner import PlanError
    from rayalign.cluster.slices import pin_slices, plan_side_by_side, runs_side_by_side, slices_text
    from rayalign.cluster.spec import running_cluster_spec

    say = progress or (lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True))
    study = load_study(path, runs_dir=runs_dir)
    runs = expand(study)
    parallel = study.parallel if parallel is None else parallel
    if parallel < 1:
        raise StudyError(f"parallel: expected an integer >= 1, got {parallel}")
    check_inputs(study, runs)
    spec = load_cluster_spec(cluster)
    connect(spec, address)
    running = running_cluster_spec(spec)
    side_by_side = runs_side_by_side(parallel, len(runs), running)
    try:  # every run fits the cluster (side by side: its slice; whole nodes pinned to alive ones) before any starts
        slices, plans = plan_side_by_side({run.slug: run.cfg for run in runs}, running, side_by_side)
        if side_by_side > 1:
            import ray

            slices = pin_slices(running, slices, ray.nodes())
    except (PlanError, ClusterError) as e:
        raise StudyError(f"{study.path}: {e}") from None
    if side_by_side > 1:
        say(slices_text(running, slices))

    record = {"name": study.name, "study_file": str(study.path), "recipe": str(study.recipe),
              "axes": [axis.name for axis in study.axes],
              "runs": [{"run": run.slug, "run_dir": str(run.run_dir.absolute()), "params": run.params,
                        "status": "finished" if _done(study, run) else "pending", "error": None, "log": None,
                        "seconds": None} for run in runs]}
    entries = {entry["run"]: entry for entry in record["runs"]}
    study.dir.mkdir(parents=True, exist_ok=True)
    write_study_json(study.dir, record)
    todo = [(i, run) for i, run in enumerate(runs, 1) if entries[run.slug]["status"] != "finished"]
    say(f"study {study.name}: {len(runs)} run(s), {len(runs) - len(todo)} finished earlier, {len(todo)} to run"
        + (f", {side_by_side} side by side" if side_by_side > 1 and len(todo) > 1 else "") + f" -> {study.dir}")

    def finish(index: int, run: StudyRun, error: BaseException | str | None, log: Path | None, seconds: float,
               evaluate: bool = True):
        if error is None and not run_finished(run):
            error = f"{run.run_dir / 'state.json'}: the run ended without iter-{run.cfg.iterations}/summary"
        if error is None and evaluate:
            try:
                evaluate_run(study, run)
            except Exception as e:  # noqa: BLE001 - recorded, the other runs go on
                error, log = e, _write_error_log(run, e)
        entry = entries[run.slug]
        entry.update(status="failed" if error else "finished", log=str(log) if log else None,
                     seconds=round(seconds, 1), error=None if error is None else
                     error if isinstance(error, str) else _last_line(error))
        write_study_json(study.dir, record)
        head = f"study {study.name}: run {index}/{len(runs)} {run.slug}"
        say(f"{head} failed after {seconds:.0f} s: {entry['error']} (log: {log})" if error else
            f"{head} finished in {seconds:.0f} s: {_headline(run.run_dir)}")

    if side_by_side == 1:
        _run_in_process(study, todo, plans, cluster, address, say, finish, len(runs))
    else:
        _run_side_by_side(study, todo, slices, address, side_by_side, say, finish, len(runs))

    table = collect_results(study.dir)
    say(summary_text(study, record, table))
    failed = [e for e in record["runs"] if e["status"] == "failed"]
    if failed:
        raise StudyError(f"{study.path}: {len(failed)} of {len(runs)} run(s) failed: "
                         + "; ".join(f"{e['run']} ({e['error']}; log {e['log']})" for e in failed)
                         + f". The other runs and {study.dir / 'results.parquet'} are kept; run the study again to "
                         "retry the failed ones")
    return study.dir


def check_inputs(study: Study, runs: list[StudyRun]) -> None:
    """Every run's prompts exist in its languages and its models load (the tiny model is built here, once)."""
    from rayalign.data.prompts import PromptError, load_prompts
    from rayalign.models import ModelLoadError, resolve_model_path
    from rayalign.pipelines.evaluate import eval_setup
    from rayalign.progress import model_build_progress
    from rayalign.run_dir import (RunConfigChanged, check_inputs_unchanged, check_prompts_unchanged,
                                  check_run_dir_config)

    checked = set()
    for run in runs:
        cfg, r = run.cfg, run.cfg.rewards
        try:
            state = check_run_dir_config(cfg, run.run_dir)
            if state and state.get("prompts_digest") and cfg.pairs.method != "dco":  # kept samples, as launch checks
                check_prompts_unchanged(cfg, state, load_prompts(cfg.prompts.path, cfg.languages,
                                                                 **cfg.prompts.load_kwargs()))
            check_inputs_unchanged(cfg, state)
        except RunConfigChanged:
            raise StudyError(f"{study.path}: run {run.slug}: {run.run_dir} holds a run of another config (the study "
                             f"file or its recipe changed since it ran); give the study another name (or runs_dir), "
                             f"or delete {study.dir} to start over. Nothing was changed") from None
        except (ConfigError, PromptError) as e:
            raise StudyError(f"{study.path}: run {run.slug}: {e} (a study's run: restore the files, or delete "
                             f"{run.run_dir} to run it again)") from None
        prompts = (cfg.prompts.path, tuple(cfg.languages), json.dumps(cfg.prompts.load_kwargs(), sort_keys=True))
        models = [m.path for m in (cfg.policy, r.implicit.reward_reference, r.reward_model.model,
                                   r.consistency.reference) if m is not None]
        try:
            if cfg.pairs.method != "dco" and prompts not in checked:
                load_prompts(prompts[0], list(prompts[1]), **{**cfg.prompts.load_kwargs(), "limit": 1})
            for model in set(models) - checked:
                resolve_model_path(model, progress=model_build_progress(model))
            if study.eval is not None:  # the eval settings fit the run (candidates in its languages, samples, ...)
                eval_setup(cfg, resolve_model_path(cfg.policy.path), cfg.policy.path, **study.eval)
        except (PromptError, ModelLoadError, ConfigError) as e:
            raise StudyError(f"{study.path}: run {run.slug}: {e}") from None
        checked |= {prompts, *models}


def _done(study: Study, run: StudyRun) -> bool:
    return run_finished(run) and (study.eval is None or eval_finished(study, run))


def _run_in_process(study, todo, plans, cluster, address, say, finish, total):
    from rayalign.cluster import save_plan
    from rayalign.pipelines import offline

    for index, run in todo:
        say(f"study {study.name}: run {index}/{total} {run.slug} ...")
        started = time.perf_counter()
        try:
            if not run_finished(run):  # finished but not evaluated: only the eval is left
                save_plan(plans[run.slug], run.run_dir)
                offline.run(run.cfg, run.run_dir, cluster=cluster, address=address, planned=True)
        except Exception as e:  # noqa: BLE001 - recorded, the other runs go on
            finish(index, run, e, _write_error_log(run, e), time.perf_counter() - started)
        else:
            finish(index, run, None, None, time.perf_counter() - started)


def _run_side_by_side(study, todo, slices, address, parallel, say, finish, total):
    """Up to `parallel` `rayalign launch` subprocesses on this driver's Ray cluster, each on a free slice of it
    (its spec written to <study dir>/slices/, with the node ids a slice of whole nodes is pinned to), the run's
    evaluation after it on the same slice."""
    import queue

    import ray

    from rayalign.cluster.slices import write_slice_spec

    address = address or os.environ.get("RAY_ADDRESS") or ray.get_runtime_context().gcs_address
    children: set[subprocess.Popen] = set()
    lock, stopping = threading.Lock(), threading.Event()
    free_slices: queue.Queue = queue.Queue()
    for i, slice_spec in enumerate(slices):
        free_slices.put(write_slice_spec(slice_spec, study.dir / "slices" / f"slice-{i + 1}.yaml"))

    def launch(index: int, run: StudyRun) -> tuple[int, float]:
        """The run, then its evaluation, on one slice, which no other run takes until both are done."""
        cluster = free_slices.get()
        try:
            code, seconds = (0, 0.0) if run_finished(run) else launch_on(index, run, str(cluster), "launch", [
                str(study.recipe), "--cluster", str(cluster), "--run-dir", str(run.run_dir.absolute()),
                "--address", address, *(arg for o in run.overrides for arg in ("-o", o))])
            if code == 0 and run_finished(run) and study.eval is not None and not eval_finished(study, run):
                code, more = launch_on(index, run, str(cluster), "study-eval", [
                    str(study.path), str(study.runs_dir.absolute()), run.slug, str(cluster), address])
                seconds += more
            return code, seconds
        finally:
            free_slices.put(cluster)

    def launch_on(index: int, run: StudyRun, cluster: str, command: str, args: list[str]) -> tuple[int, float]:
        """`rayalign COMMAND ARGS` in a subprocess of this Python, its output appended to the run's launch.log."""
        started = time.perf_counter()
        what = "evaluation" if command == "study-eval" else "run"
        say(f"study {study.name}: {what} {index}/{total} {run.slug} on {Path(cluster).stem} ... "
            f"(log: {run.run_dir / 'launch.log'})")
        run.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-c", "from rayalign.cli import main; main(prog_name='rayalign')", command, *args]
        with open(run.run_dir / "launch.log", "a", encoding="utf-8") as log:
            log.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            log.flush()
            with lock:
                if stopping.is_set():
                    return -1, 0.0
                child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
                children.add(child)
            code = child.wait()
        with lock:
            children.discard(child)
        return code, time.perf_counter() - started

    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="study-run")
    try:
        futures = {pool.submit(launch, index, run): (index, run) for index, run in todo}
        for future in as_completed(futures):
            index, run = futures[future]
            try:
                code, seconds = future.result()
            except Exception as e:  # noqa: BLE001 - could not start the subprocess
                finish(index, run, e, _write_error_log(run, e), 0.0)
                continue
            log = run.run_dir / "launch.log"
            finish(index, run, None if code == 0 else f"exit code {code}: {_log_error(log)}",
                   log if code else None, seconds, evaluate=False)  # evaluated on the run's slice
    finally:  # on an interrupt, stop the runs this study started (they resume next time)
        with lock:
            stopping.set()
            for child in children:
                child.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def evaluate_on_slice(study_path: str, runs_dir: str, slug: str, slice_spec: str, address: str) -> None:
    """A study run's evaluation in a process of its own (`rayalign study-eval`), its actors kept on the run's slice
    (what `_run_side_by_side` starts after the run's launch, on the same slice)."""
    from rayalign.cluster import connect, load_cluster_spec
    from rayalign.cluster.spec import pinned_nodes

    study = load_study(study_path, runs_dir=runs_dir)
    run = next(r for r in expand(study) if r.slug == slug)
    connect(load_cluster_spec(slice_spec), address)
    name, nodes = pinned_nodes()
    console.print(f"eval {slug}: on slice {Path(slice_spec).stem}"
                  + (f", pinned to node(s) {', '.join(nodes)} ({name})" if nodes else ""), soft_wrap=True)
    evaluate_run(study, run)


def final_policy(run: StudyRun) -> tuple[str, str]:
    """(path, name) of the run's final policy: its last iteration's checkpoint, or the recipe's without training."""
    from rayalign.pipelines.evaluate import run_policy

    path, name, _ = run_policy(run.cfg, run.run_dir, f"iter-{run.cfg.iterations}" if run.cfg.training.loss
                               else "initial")
    return path, name


def evaluate_run(study: Study, run: StudyRun) -> None:
    """Evaluate the run's final policy into <run_dir>/eval/final (with an eval section; kept when done)."""
    from rayalign.pipelines.evaluate import evaluate_policy
    from rayalign.scoring.hub_scan import run_hub_layer

    if study.eval is not None:
        policy, name = final_policy(run)
        evaluate_policy(run.cfg, policy, out_dir=run.run_dir / "eval" / "final", policy_name=name,
                        hub_layer=run_hub_layer(run.cfg, run.run_dir), **study.eval)


def write_study_json(study_dir: Path, record: dict) -> None:
    atomic_write_text(study_dir / "study.json", json.dumps(record, indent=2))


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def _write_error_log(run: StudyRun, error: BaseException) -> Path | None:
    try:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        path = run.run_dir / "error.log"
        path.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
        return path
    except OSError:
        return None


def _log_error(log: Path) -> str:
    """The error a `rayalign launch` log ends with: click's `Error: ...` or a traceback's last line."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return f"{log} unreadable"
    errors = [line for line in lines if line.startswith("Error:") or re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (errors or [line for line in lines if line] or ["no output"])[-1]


def _headline(run_dir: Path) -> str:
    from rayalign.data.inspect import read_metrics

    last = ([m for m in read_metrics(run_dir) if m.get("stage") == "iteration"] or [{}])[-1]
    parts = [f"{label} {_number(last.get(key))}" for label, key in (
        ("pairs", "pairs_rows"), ("loss", "loss_mean"), ("accuracy", "accuracy_mean")) if key in last]
    fidelity = [v for k, v in last.items() if k.startswith("fidelity_") and v is not None]
    if fidelity:
        parts.append(f"fidelity {_number(sum(fidelity) / len(fidelity))}")
    return ", ".join(parts) or "no iteration metrics"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


# ---- results ----

EVAL_STATS = ("mean", "share", "score")  # preferred statistic when a metric has several


def collect_results(study_dir: str | Path) -> pa.Table:
    """One row per (run, iteration) from the runs' metrics.jsonl `iteration` records, with the axis values, the
    mean fidelity over the languages and the final evaluation on each run's last row; written to
    <study dir>/results.parquet. Runs come from <study dir>/study.json."""
    from rayalign.data.inspect import read_metrics

    study_dir = Path(study_dir)
    try:
        record = json.loads((study_dir / "study.json").read_text())
    except (OSError, ValueError) as e:
        raise StudyError(f"{study_dir / 'study.json'}: cannot read the study record ({e}); run the study first") \
            from None
    rows = []
    for entry in record["runs"]:
        run_dir = study_dir / entry["run"]
        iterations = {m["iteration"]: m for m in read_metrics(run_dir) if m.get("stage") == "iteration"}  # last wins
        evaluation = eval_columns(run_dir / "eval" / "final" / "results")
        for iteration in sorted(iterations):
            metrics = {k: v for k, v in iterations[iteration].items() if k != "stage"}
            fidelity = [v for k, v in metrics.items() if k.startswith("fidelity_") and v is not None]
            rows.append({"run": entry["run"], "run_dir": str(run_dir), "status": entry["status"], **entry["params"],
                         **metrics, "fidelity_mean": sum(fidelity) / len(fidelity) if fidelity else None,
                         **(evaluation if iteration == max(iterations) else {})})
    leading = ["run", "run_dir", "status", *record["axes"], "iteration", "policy", "pairs_rows", "loss_first",
               "loss_mean", "reward_margin_mean", "accuracy_mean", "fidelity_mean"]
    seen = list(dict.fromkeys(k for row in rows for k in row))
    fidelity = sorted(k for k in seen if k.startswith("fidelity_") and k != "fidelity_mean")
    names = list(dict.fromkeys([*leading, *fidelity, *(k for k in seen if not k.startswith("eval_")),
                                *(k for k in seen if k.startswith("eval_"))]))
    names = [n for n in names if n in seen or n in ("run", "run_dir", "status", "iteration", *record["axes"])]
    table = pa.table({name: _column([row.get(name) for row in rows]) for name in names})
    write_parquet_atomic(table, study_dir / "results.parquet")
    return table


def _column(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them readable as text
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def eval_columns(results_dir: Path) -> dict[str, float]:
    """Headline numbers of an `eval` dataset: eval_fidelity_mean and per language, eval_rankc_mean,
    eval_accuracy_mean, eval_silhouette_max (over layers), eval_<reward>_mean, eval_judge_win_rate and the
    language-confusion rates over the languages (eval_lpr, eval_wpr, eval_lcpr)."""
    from rayalign.data.store import read_dataset

    if not (results_dir / "manifest.json").is_file():
        return {}
    rows = read_dataset(results_dir, "eval").to_pylist()

    def value(metric: str, lang: str = "all", stat: str | None = None):
        found = [r for r in rows if r["metric"] == metric and r["lang"] == lang and stat in (None, r["stat"])]
        found.sort(key=lambda r: (r["other_lang"] is not None, r["layer"] is not None,
                                  EVAL_STATS.index(r["stat"]) if r["stat"] in EVAL_STATS else len(EVAL_STATS)))
        return found[0]["value"] if found else None

    out = {"eval_fidelity_mean": value("fidelity")}
    for lang in sorted({r["lang"] for r in rows if r["metric"] == "fidelity" and r["lang"] != "all"}):
        out[f"eval_fidelity_{lang}"] = value("fidelity", lang)
    out |= {"eval_rankc_mean": value("rankc"), "eval_accuracy_mean": value("accuracy")}
    silhouette = [r for r in rows if r["metric"] == "silhouette"]
    silhouette = [r for r in silhouette if r["lang"] == "all"] or silhouette
    out["eval_silhouette_max"] = max((r["value"] for r in silhouette), default=None)
    for reward in sorted({r["metric"] for r in rows if r["metric"].startswith("r_")}):
        out[f"eval_{reward}_mean"] = value(reward, stat="mean")
    out["eval_judge_win_rate"] = value("judge_win_rate")
    out |= {f"eval_{metric}": value(metric) for metric in ("lpr", "wpr", "lcpr")}  # language confusion, mean
    return {k: v for k, v in out.items() if v is not None}


def summary_text(study: Study, record: dict, table: pa.Table) -> str:
    """The study's final table (one line per run: its last iteration) as plain text."""
    last = {row["run"]: row for row in table.to_pylist()}  # rows come in iteration order: the last one stays
    columns = [("pairs", "pairs_rows"), ("loss", "loss_mean"), ("accuracy", "accuracy_mean"),
               ("fidelity", "fidelity_mean"), ("eval fidelity", "eval_fidelity_mean"), ("eval lcpr", "eval_lcpr")]
    columns = [(label, key) for label, key in columns if key in table.column_names]
    out = Table("run", "status", *(label for label, _ in columns), title=f"study {study.name}: {study.dir}")
    for entry in record["runs"]:
        row = last.get(entry["run"], {})
        out.add_row(entry["run"], entry["status"], *(_number(row.get(key)) for _, key in columns))
    buffer = io.StringIO()
    Console(file=buffer, width=console.width if console.is_terminal else 160, no_color=True).print(out)
    return buffer.getvalue().rstrip() + f"\nresults: {study.dir / 'results.parquet'}"
