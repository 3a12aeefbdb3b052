"""`rayalign report` on small hand-made runs and studies: plot data against hand-worked numbers, real PNGs,
report.md contents, partial runs and bad paths."""

import json

import matplotlib.image
import polars as pl
import pyarrow as pa
import pytest

from rayalign.data.store import DatasetWriter
from rayalign.report import ReportError, report
from rayalign.report.run import eval_fidelity, fidelity_series, iteration_frame, reward_values, silhouette_series
from rayalign.report.study import fidelity_by_run, final_rows, numeric_axes, scaling_series
from rayalign.scoring.rewards import to_scores_schema

ITERATIONS = [  # the `iteration` records of metrics.jsonl; fidelity_mean: 0.8, then 0.9
    {"iteration": 1, "stage": "iteration", "policy": "iter-1/policy", "fidelity_en": 0.9, "fidelity_de": 0.7,
     "loss_first": 0.6931, "loss_mean": 0.65, "reward_margin_mean": 0.12, "accuracy_mean": 0.6, "pairs_rows": 40,
     "seconds_generate": 10.0, "seconds_score": 5.0, "seconds_pairs": 0.5, "seconds_train": 4.5},
    {"iteration": 2, "stage": "iteration", "policy": "iter-2/policy", "fidelity_en": 1.0, "fidelity_de": 0.8,
     "loss_first": 0.6931, "loss_mean": 0.55, "reward_margin_mean": 0.25, "accuracy_mean": 0.75, "pairs_rows": 36,
     "seconds_generate": 12.0, "seconds_score": 6.0, "seconds_pairs": 0.5, "seconds_train": 5.5},
]
LACOMSA = {"en": [0.9, 0.8, 0.7, 0.6], "de": [0.2, 0.1, 0.0, -0.1]}  # per language: p0 s0, p0 s1, p1 s0, p1 s1
RUN_PLOTS = ["rewards_by_language.png", "fidelity_by_iteration.png", "silhouette_by_layer.png",
             "training_by_iteration.png"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_scores(path, lacomsa=LACOMSA):
    rows = []
    for lang, values in lacomsa.items():
        for i, value in enumerate(values):
            prompt_id, sample_idx = f"p{i // 2}", i % 2
            rows.append({"prompt_id": prompt_id, "lang": lang, "messages": [{"role": "user", "content": prompt_id}],
                         "sample_idx": sample_idx, "response": "text", "num_tokens": 3, "finish_reason": "stop",
                         "seed": 0, "policy": "iter-1/policy", "lang_detected": lang, "score_tokens": 3,
                         "logp_policy": -4.0, "r_lacomsa": value, "r_msa": 2 * value})
    writer = DatasetWriter(path, "scores", languages=list(lacomsa), schema_params={"latent_dim": 0})
    writer.write_shard(0, to_scores_schema(pa.Table.from_pylist(rows)))
    writer.finalize(expected_shards=1)


def eval_rows(fidelity_en, fidelity_de, silhouette, rankc, accuracy, lacomsa):
    rows = [("fidelity", "share", "en", None, fidelity_en), ("fidelity", "share", "de", None, fidelity_de),
            ("fidelity", "share", "all", None, (fidelity_en + fidelity_de) / 2), ("rankc", "score", "all", None, rankc),
            ("rankc", "score", "en", None, rankc), ("accuracy", "share", "all", None, accuracy),
            ("r_lacomsa", "mean", "all", None, lacomsa), ("r_lacomsa", "std", "all", None, 0.1)]
    rows += [("silhouette", "score", "all", layer, value) for layer, value in enumerate(silhouette)]
    return [{"policy": "p", "metric": m, "stat": s, "lang": lang, "other_lang": "de" if m == "rankc" and lang == "en"
             else None, "layer": layer, "value": value, "count": 8} for m, s, lang, layer, value in rows]


def write_eval(path, rows):
    writer = DatasetWriter(path, "eval")
    writer.write_shard(0, pa.Table.from_pylist(rows))
    writer.finalize(expected_shards=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "demo"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [{"iteration": 1, "stage": "generate", "rows": 8}, ITERATIONS[0],
                                        {"iteration": 2, "stage": "train", "loss_mean": 0.55}, ITERATIONS[1]])
    write_scores(run / "iter-2" / "scores")
    write_eval(run / "eval" / "initial" / "results", eval_rows(0.6, 0.4, [0.05, 0.3, 0.2], 0.5, 0.55, 0.3))
    write_eval(run / "eval" / "iter-2" / "results", eval_rows(0.9, 0.7, [0.1, 0.4, 0.25], 0.65, 0.7, 0.45))
    write_scores(run / "eval" / "iter-2" / "scores", {"en": [0.95, 0.85], "de": [0.3, 0.2]})
    (run / "hub-scan.json").write_text(json.dumps({"policy": "base", "silhouette": {"0": 0.01, "1": 0.2, "2": 0.15},
                                                   "hub_layer": 1, "candidates": [1, 2], "prompts": 16}))
    (run / "hub-scan-iter-2").mkdir()  # `rayalign hub-scan --policy iter-2`
    (run / "hub-scan-iter-2" / "hub-scan.json").write_text(json.dumps({"silhouette": {"0": 0.02, "1": 0.3}}))
    return run


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    study = tmp_path_factory.mktemp("studies") / "grid"
    final = {("icr", 16): 0.8, ("icr", 64): 0.85, ("lacomsa", 16): 0.9, ("lacomsa", 64): 0.95}  # fidelity_mean
    runs, rows = [], []
    for (method, limit), fidelity in final.items():
        slug = f"{method}-{limit}"
        (study / "runs" / slug).mkdir(parents=True)
        runs.append({"run": slug, "run_dir": f"runs/{slug}", "params": {"method": method, "prompts.limit": limit},
                     "status": "finished", "error": None})
        for iteration in (1, 2):
            last = iteration == 2
            rows.append({"run": slug, "run_dir": f"runs/{slug}", "iteration": iteration, "method": method,
                         "prompts.limit": limit, "fidelity_en": fidelity + 0.05 if last else 0.5,
                         "fidelity_de": fidelity - 0.05 if last else 0.5, "fidelity_mean": fidelity if last else 0.5,
                         "loss_mean": 0.5 if last else 0.7, "accuracy_mean": 0.7 if last else 0.5,
                         "reward_margin_mean": 0.2 if last else 0.1, "pairs_rows": limit,
                         "eval_fidelity_mean": fidelity - 0.1 if last else None})
    runs.append({"run": "icr-256", "run_dir": "runs/icr-256", "params": {"method": "icr", "prompts.limit": 256},
                 "status": "failed", "error": "CUDA out of memory"})
    (study / "study.json").write_text(json.dumps({"name": "grid", "axes": ["method", "prompts.limit"], "runs": runs}))
    pl.DataFrame(rows).write_parquet(study / "results.parquet")
    return study


def assert_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 550, (path, image.shape)
    assert image.std() > 0.05, f"{path}: almost blank"


# ---- plot data, by hand ----

def test_fidelity_series_averages_languages_and_keeps_the_last_record_of_an_iteration():
    redone = dict(ITERATIONS[1], loss_mean=0.5, fidelity_de=0.5)  # iteration 2 redone: the later record wins
    iterations = iteration_frame([ITERATIONS[0], ITERATIONS[1], {"stage": "redo"}, redone])
    assert iterations["iteration"].to_list() == [1, 2] and iterations["loss_mean"].to_list() == [0.65, 0.5]
    series = fidelity_series(iterations)
    assert series["en"] == [(1, 0.9), (2, 1.0)] and series["de"] == [(1, 0.7), (2, 0.5)]
    assert [it for it, _ in series["mean"]] == [1, 2]
    assert [value for _, value in series["mean"]] == pytest.approx([0.8, 0.75])  # per iteration, over languages


def test_reward_values_group_by_language_and_skip_empty_columns(run_dir):
    from rayalign.data.store import read_dataset

    values = reward_values(pl.from_arrow(read_dataset(run_dir / "iter-2" / "scores")))
    assert list(values) == ["r_lacomsa", "r_msa"]  # r_icr, r_rm, r_user are all null
    assert values["r_lacomsa"] == LACOMSA
    assert values["r_msa"]["de"] == pytest.approx([0.4, 0.2, 0.0, -0.2])


def test_eval_fidelity_and_silhouette_series():
    results = {"initial": pl.DataFrame(eval_rows(0.6, 0.4, [0.05, 0.3], 0.5, 0.55, 0.3))}
    assert eval_fidelity(results) == {"initial": pytest.approx({"en": 0.6, "de": 0.4, "all": 0.5})}
    scans = {"hub scan": {"silhouette": {2: 0.15, 0: 0.01, 1: 0.2}}, "hub scan iter-2": {"silhouette": {1: 0.3}}}
    assert silhouette_series(results, scans) == {"initial": [(0, 0.05), (1, 0.3)],
                                                 "hub scan": [(0, 0.01), (1, 0.2), (2, 0.15)],
                                                 "hub scan iter-2": [(1, 0.3)]}


def test_scaling_series_takes_each_runs_final_iteration(study_dir):
    results = pl.read_parquet(study_dir / "results.parquet")
    assert scaling_series(results, "prompts.limit", "fidelity_mean", ["method"]) == {
        "icr": [(16, 0.8), (64, 0.85)], "lacomsa": [(16, 0.9), (64, 0.95)]}
    evals = scaling_series(results, "prompts.limit", "eval_fidelity_mean", ["method"])
    assert {k: [(x, round(y, 9)) for x, y in v] for k, v in evals.items()} == {
        "icr": [(16, 0.7), (64, 0.75)], "lacomsa": [(16, 0.8), (64, 0.85)]}
    assert numeric_axes(final_rows(results), ["method", "prompts.limit"]) == ["prompts.limit"]
    assert fidelity_by_run(final_rows(results))["icr-64"] == pytest.approx({"en": 0.9, "de": 0.8})


def test_scaling_series_counts_languages_of_a_list_axis():
    results = pl.DataFrame({"run": ["a", "b", "c"], "iteration": [1, 1, 1], "lr": [1e-5, 1e-5, 2e-5],
                            "languages": [["en", "de"], ["en", "de", "fr", "ru"], ["en", "de"]],
                            "fidelity_mean": [0.9, 0.8, 0.7]})
    assert scaling_series(results, "languages", "fidelity_mean", ["lr"]) == {"1e-05": [(2, 0.9), (4, 0.8)],
                                                                          "2e-05": [(2, 0.7)]}
    assert scaling_series(results, "languages", "fidelity_mean") == {"all runs": [(2, 0.7), (2, 0.9), (4, 0.8)]}


# ---- whole reports ----

def test_run_report_draws_every_plot_and_tabulates_the_numbers(run_dir, tmp_path):
    md_path = report(run_dir, tmp_path / "out")
    assert md_path == tmp_path / "out" / "report.md"
    md = md_path.read_text()
    for name in RUN_PLOTS:
        assert_png(tmp_path / "out" / name)
        assert f"]({name})" in md
    assert "| 1 | 40 | 0.65 | 0.6 | 0.12 | 0.8 | 20 |" in md  # iteration, pairs, loss, accuracy, margin, fidelity, s
    assert "| 2 | 36 | 0.55 | 0.75 | 0.25 | 0.9 | 24 |" in md
    assert "| 2 | 0.8 | 1 | 0.9 |" in md  # fidelity per language: de, en, mean
    assert "| initial | 0.5 | 0.5 | 0.55 | 0.3 (1) | 0.3 |" in md  # fidelity, rankc, accuracy, silhouette, r_lacomsa
    assert "| iter-2 | 0.8 | 0.65 | 0.7 | 0.4 (1) | 0.45 |" in md
    assert "hub-scan.json, hub-scan-iter-2/hub-scan.json" in " ".join(md.split())  # both scans are drawn
    assert "Notes" not in md


def test_report_defaults_to_a_report_folder_in_the_run(run_dir):
    assert report(run_dir) == run_dir / "report" / "report.md"


def test_partial_run_reports_with_notes(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [{"iteration": 1, "stage": "generate", "rows": 8},
                                             {"iteration": 1, "stage": "iteration", "loss_mean": 0.6}])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": "two", "stage": "iteration", "loss_mean": 0.5}\n')  # edited: text for numbers
        f.write('{"iteration": 2, "stage": "iteration", "fidelity_de": "high"}\n')
        f.write('{"iteration": 2, "stage": "gen')  # the run was killed while writing
    md = report(tmp_path).read_text()
    assert all(f"metrics.jsonl` line {n} skipped" in md for n in (3, 4, 5)) and "| 1 | 0.6 | 0.6 |" not in md
    from click.testing import CliRunner

    from rayalign.cli import main

    shown = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert shown.exit_code == 0 and "Traceback" not in shown.output, shown.output
    assert all(f"metrics.jsonl:{n}: skipped, not a metrics record" in shown.output for n in (3, 4, 5))
    assert "| iteration | loss_mean |" in md and "| 1 | 0.6 |" in md
    assert_png(tmp_path / "report" / "training_by_iteration.png")
    for name in ("rewards_by_language.png", "fidelity_by_iteration.png", "silhouette_by_layer.png"):
        assert f"`{name}` not drawn" in md and not (tmp_path / "report" / name).exists()
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "state.json").write_text("{}")
    md = report(tmp_path).read_text()
    assert "no iteration records" in md and "`training_by_iteration.png` not drawn" in md
    assert not (tmp_path / "report" / "training_by_iteration.png").exists()  # stale plot of the previous report


def test_study_report_tables_links_and_plots(study_dir, tmp_path):
    md = report(study_dir, tmp_path / "out").read_text()
    for name in ("scaling_prompts.limit.png", "fidelity_by_run.png"):
        assert_png(tmp_path / "out" / name)
        assert f"]({name})" in md
    assert "scaling_method" not in md  # a string axis has no scale
    link = md.split("[icr-64](", 1)[1].split(")", 1)[0]
    assert (tmp_path / "out" / link).resolve() == (study_dir / "runs" / "icr-64").resolve()
    assert "| finished | icr | 64 | 2 | 0.85 | 0.7 | 0.2 | 0.5 | 64 |" in md
    assert "| lacomsa-16 | lacomsa | 16 | 0.8 |" in md  # eval table: eval_fidelity_mean
    assert "| failed | icr | 256 |" in md and "CUDA out of memory" in md


def test_bad_paths_raise_report_error_naming_the_path(tmp_path):
    with pytest.raises(ReportError, match=f"{tmp_path}: not a run directory .* nor a study directory"):
        report(tmp_path)
    (tmp_path / "study.json").write_text('{"name": "x"}')
    with pytest.raises(ReportError, match=r"study.json: expected an object with a 'runs' list"):
        report(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "stage": "online", "reward_mean": 0.5}])
    (run / "pairs").mkdir()
    (run / "pairs" / "manifest.json").write_text('{"schema": "pairs", "schema_version": 1, "shards": []}')
    for out in (run / "pairs", run / "pairs" / "report"):
        with pytest.raises(ReportError, match=f"{out}: inside the dataset {run / 'pairs'}"):
            report(run, out)
    assert sorted(p.name for p in (run / "pairs").iterdir()) == ["manifest.json"]


def test_fidelity_by_run_reads_sample_or_eval_columns():
    final = pl.DataFrame({"run": ["a"], "fidelity_en": [0.9], "fidelity_mean": [0.9], "eval_fidelity_en": [0.5],
                          "eval_fidelity_de": [0.25], "eval_fidelity_mean": [0.375]})
    assert fidelity_by_run(final) == {"a": {"en": 0.9}}
    assert fidelity_by_run(final, "eval_fidelity_") == {"a": {"en": 0.5, "de": 0.25}}


def test_online_run_report_tables_and_plots_its_steps(tmp_path):
    steps = [{"step": s, "stage": "online", "reward_mean": r, "kl": k, "clip_fraction": 0.0, "entropy": 4.5,
              "reward_de": r + 0.1, "reward_en": r - 0.1} for s, r, k in ((1, 0.5, 0.0), (2, 0.6, 0.01), (3, 0.7, 0.02))]
    write_jsonl(tmp_path / "metrics.jsonl", [*steps, dict(steps[1], reward_mean=0.65)])  # step 2 again: the last wins
    md = report(tmp_path).read_text()
    assert "3 online step(s) in metrics.jsonl" in md
    assert "| step | reward_mean | kl | clip_fraction | entropy | reward_de | reward_en |" in md
    assert "| 2 | 0.65 | 0.01 | 0 | 4.5 | 0.7 | 0.5 |" in md and "| 2 | 0.6 |" not in md
    assert_png(tmp_path / "report" / "online_by_step.png")


def test_iteration_summary_takes_each_stages_last_record_only(tmp_path):
    """After `--redo generate` with other languages, fidelity_es of the run before the redo stayed in the new
    iteration record beside en and de, and the report averaged three languages."""
    from rayalign.run_dir import iteration_summary

    records = [
        {"stage": "generate", "iteration": 1, "fidelity_en": 0.75, "fidelity_es": 0.375, "wall_seconds": 9.0},
        {"stage": "pairs", "iteration": 1, "rows": 12, "wall_seconds": 1.0},
        {"stage": "iteration", "iteration": 1, "fidelity_en": 0.75, "fidelity_es": 0.375},
        {"stage": "redo", "redo": ["generate"]},
        {"stage": "generate", "iteration": 1, "fidelity_en": 0.625, "fidelity_de": 0.5, "wall_seconds": 7.0},
        {"stage": "generate", "iteration": 2, "fidelity_en": 0.125, "wall_seconds": 3.0},
        {"stage": "pairs", "iteration": 1, "rows": 10, "wall_seconds": 2.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert iteration_summary(tmp_path, 1) == {"seconds_generate": 7.0, "fidelity_en": 0.625, "fidelity_de": 0.5,
                                              "seconds_pairs": 2.0, "pairs_rows": 10}


def test_scaling_series_leave_out_runs_that_did_not_finish():
    """A failed run's partial iteration was plotted beside the finished runs' final ones, unmarked."""
    results = pl.DataFrame([
        {"run": "a", "status": "finished", "iteration": 1, "prompts.limit": 4, "fidelity_mean": 0.5},
        {"run": "a", "status": "finished", "iteration": 2, "prompts.limit": 4, "fidelity_mean": 0.9},
        {"run": "b", "status": "failed", "iteration": 1, "prompts.limit": 8, "fidelity_mean": 0.4},
        {"run": "c", "status": "finished", "iteration": 2, "prompts.limit": 16, "fidelity_mean": 0.7}])
    assert scaling_series(results, "prompts.limit", "fidelity_mean") == {"all runs": [(4, 0.9), (16, 0.7)]}
